"""Incremental detokenization of one completion, with stop tokens, stop strings and max_tokens.

Text is produced token by token with `tokenizers.decoders.DecodeStream`, which holds back bytes of an
incomplete UTF-8 character (a Chinese character or an emoji split over byte-level BPE tokens) until the
character is whole, and decodes with a little prompt context so SentencePiece-style leading spaces come
out right. On top of that this module holds back any text that could still become a stop string, so a
client never sees part of a stop string that is later cut away.

Stop semantics (vLLM's): EOS (unless ignore_eos) and stop_token_ids end the completion with
finish_reason "stop" (stop_reason = the token id for stop_token_ids, None for EOS); their text is not
part of the output unless include_stop_str_in_output. A stop string ends it with finish_reason "stop",
stop_reason = the string, and the output is cut before it (or after it with include_stop_str_in_output).
None of these are checked before min_tokens tokens exist. max_tokens gives finish_reason "length".
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from engine.errors import EngineError
from engine.sampling_params import SamplingParams

# Prompt tokens given to the decoder as context (vLLM uses 5): enough for a leading space or a
# multi-token character to decode as it would inside the full text.
_PROMPT_CONTEXT = 6


def backend_tokenizer(tokenizer: Any) -> Tokenizer:
    """The `tokenizers.Tokenizer` behind a transformers tokenizer (or the object itself)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise EngineError(
            f"tokenizer {type(tokenizer).__name__} has no fast (tokenizers) backend; "
            "save the checkpoint with a tokenizer.json so it loads as a fast tokenizer"
        )
    return backend


def stop_hold_length(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string: that much text
    must wait, because the next tokens may complete the stop string."""
    hold = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:length]):
                hold = length
                break
    return hold


def find_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """The earliest stop string occurring in text[start:], as (position, string); None if none does."""
    best: tuple[int, str] | None = None
    for stop in stops:
        pos = text.find(stop, start)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, stop)
    return best


class IncrementalDetokenizer:
    """Turns one completion's tokens into safe-to-show text deltas and decides when it stops.

    Usage: `delta = d.add_tokens([tok])` after every step (several at once after a speculative step);
    when `d.finished`, stop generating: `d.token_ids` are the tokens kept (tokens after the stop are
    dropped), `d.output_text` the final text, `d.finish_reason`/`d.stop_reason` why. If the engine ends
    the completion itself (context window full, abort), `d.finish("length" | "abort")` returns the text
    that was still held back.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: list[int] | tuple[int, ...] | set[int] = (),
    ) -> None:
        self._tokenizer = backend_tokenizer(tokenizer)
        self._params = params
        self._stream = (
            DecodeStream(ids=list(prompt_token_ids[-_PROMPT_CONTEXT:]), skip_special_tokens=params.skip_special_tokens)
            if params.detokenize
            else None  # token ids only: stops and max_tokens still apply, no text is made
        )
        self._eos = set() if params.ignore_eos else set(eos_token_ids)
        self._stop_ids = set(params.stop_token_ids)
        self._enders = self._eos | self._stop_ids  # one lookup per token for both
        self._max_stop_len = max((len(s) for s in params.stop), default=0)
        self.token_ids: list[int] = []
        self.text = ""  # everything decoded so far (may run past a stop string)
        self._emitted = 0  # how much of self.text has been handed out
        self._end: int | None = None  # where the output text ends once finished
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def output_text(self) -> str:
        """The completion's text: final once finished, the emitted part while running."""
        return self.text[: self._end if self._end is not None else self._emitted]

    def add_tokens(self, token_ids: list[int]) -> str:
        """Append newly generated tokens; returns the text that became safe to show."""
        for token_id in token_ids:
            if self.finish_reason is not None:
                break
            self._add_one(int(token_id))
        return self._take()

    def finish(self, reason: str) -> str:
        """End the completion for a reason of the engine's ("length", "abort"); returns held-back text.
        Bytes of an unfinished UTF-8 character at the very end are dropped, never shown broken."""
        if not self.finished:
            self.finish_reason = reason
            self._end = len(self.text)
        return self._take()

    def _add_one(self, token_id: int) -> None:
        # Runs once per row per engine step, so the common case (no stop hit, no stop strings) is kept to a few
        # plain operations: at 256 streams this loop is a large share of a decode step's host time.
        token_ids = self.token_ids
        token_ids.append(token_id)
        params = self._params
        count = len(token_ids)
        can_stop = count >= params.min_tokens
        stop_token = can_stop and token_id in self._enders
        if stop_token and not params.include_stop_str_in_output:
            self._stop_at_token(token_id)
            return
        before = len(self.text)
        if self._stream is not None:
            piece = self._stream.step(self._tokenizer, token_id)
            if piece:
                self.text += piece
        if stop_token:
            self._stop_at_token(token_id)
            return
        if can_stop and self._max_stop_len:
            found = find_stop(self.text, params.stop, max(self._emitted, before - self._max_stop_len + 1))
            if found is not None:
                pos, stop = found
                self.finish_reason, self.stop_reason = "stop", stop
                self._end = pos + len(stop) if params.include_stop_str_in_output else pos
                return
        if params.max_tokens is not None and count >= params.max_tokens:
            self.finish_reason = "length"
            self._end = len(self.text)

    def _stop_at_token(self, token_id: int) -> None:
        self.finish_reason = "stop"
        self.stop_reason = None if token_id in self._eos else token_id
        self._end = len(self.text)

    def _take(self) -> str:
        if self._end is not None:
            end = self._end
        elif not self._max_stop_len:  # no stop strings: nothing to hold back
            end = len(self.text)
        else:
            end = len(self.text) - stop_hold_length(self.text[self._emitted :], self._params.stop)
        delta = self.text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return delta
