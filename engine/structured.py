"""Structured outputs: a grammar (JSON schema, regex, choice list or Lark) that every generated token must follow.

llguidance does the work: it compiles the grammar against the tokenizer and, per step, gives the set of tokens
that keep the output valid as a bitmask. The engine applies the mask to a constrained row's logits before
sampling and advances that row's matcher after the token commits; when the grammar is complete only EOS is
allowed, so the completion ends with finish_reason "stop". Rows without a grammar are never touched, and a batch
without any constrained row skips this module entirely. A completion cut by max_tokens or the context window
ends with finish_reason "length" and its text is an unfinished (invalid) prefix, as in vLLM.

`StructuredOutputsParams` has the fields of vLLM's class of the same name, so the server fills it the same way
for both backends; the vLLM backend passes it on to vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import InvalidRequestError

# Compact JSON (no free whitespace between tokens): a model cannot wander off into endless blank space, and the
# output is what json.dumps would print. A schema may turn it back on with {"x-guidance": {...}}.
JSON_DEFAULTS = {"whitespace_flexible": False}


@dataclass
class StructuredOutputsParams:
    """One constraint (exactly one field set), vLLM's names: `json` a JSON schema (dict or JSON text), `regex`,
    `choice` (the output is one of these strings), `grammar` (a Lark grammar in llguidance's dialect, which may
    embed JSON schemas with `%json {...}`), `json_object` (any JSON object)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def llguidance_grammar(self) -> str:
        """The constraint as an llguidance grammar; raises InvalidRequestError for a malformed one."""
        from llguidance import LLMatcher

        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise InvalidRequestError(
                f"structured outputs take exactly one of json, regex, choice, grammar, json_object; got {kinds or 'none'}",
                param="structured_outputs",
            )
        if self.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_DEFAULTS)
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as err:
                    raise InvalidRequestError(f"the JSON schema is not valid JSON: {err}", param="json") from None
            if not isinstance(schema, dict):
                raise InvalidRequestError(f"a JSON schema must be an object, got {type(schema).__name__}", param="json")
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise InvalidRequestError("choice must be a non-empty list of strings", param="choice")
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        return LLMatcher.grammar_from_lark(self.grammar)

    def validate(self) -> None:
        """Compile the grammar once without a tokenizer: a bad schema or regex is refused before it is queued."""
        from llguidance import LLMatcher

        error = LLMatcher.validate_grammar(self.llguidance_grammar())
        if error:
            kind = next(k for k in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, k))
            raise InvalidRequestError(f"invalid {kind.replace('_', ' ')} constraint: {error}", param=kind)


class StructuredOutputs:
    """The engine's grammar matchers, one per constrained sequence (kept on `Sequence.matcher`)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> None:
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, eos_ids
        self._ll_tokenizer = None  # built on the first constrained request (~0.1 s for a small vocabulary)

    def matcher(self, params: StructuredOutputsParams):
        """A fresh matcher for one sequence; raises InvalidRequestError if the grammar does not compile."""
        import llguidance.hf
        from llguidance import LLMatcher

        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self.tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_ids
            )
        matcher = LLMatcher(self._ll_tokenizer, params.llguidance_grammar(), log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"invalid structured outputs constraint: {matcher.get_error()}")
        return matcher

    def mask_logits(self, matchers: list, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] with -inf for the tokens a row's grammar does not allow next (rows whose matcher is
        None keep theirs). Unpacked by hand rather than with llguidance.torch's helper, which compiles a kernel
        with torch.compile on first use (seconds, and a C compiler on the CPU)."""
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

        bitmask = allocate_token_bitmask(len(matchers), self.vocab_size)  # all ones: every token allowed
        for i, matcher in enumerate(matchers):
            if matcher is not None:
                fill_next_token_bitmask(matcher, bitmask, i)
        bitmask = bitmask.to(logits.device, non_blocking=True)
        bits = torch.arange(32, device=logits.device, dtype=torch.int32)
        allowed = ((bitmask[:, :, None] >> bits) & 1).reshape(len(matchers), -1)[:, : logits.shape[-1]]
        return logits.masked_fill(allowed == 0, float("-inf"))

    @staticmethod
    def advance(matcher, tokens: list[int]) -> bool:
        """Feed committed tokens to a sequence's matcher; True once the grammar has ended (EOS consumed, or the
        matcher in error, which only a bug could cause: the mask allowed the token)."""
        for token in tokens:
            if not matcher.consume_token(token):
                return True
        return matcher.is_stopped()
