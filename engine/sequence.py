"""State of one sequence (one of a request's `n` completions) as it moves waiting -> running -> finished."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from engine.backend import TokenLogprob
from engine.sampling_params import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


# eq=False: a sequence is equal only to itself. The generated __eq__ compared every field (prompt and output
# lists included), and `running.remove(seq)` ran it against each sequence before this one: 0.27 ms per finished
# sequence at 192 running on a 2-core CPU, ~17 ms for a step where 64 requests end together.
@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    max_total_len: int  # prompt + generated may not exceed this (the engine's max_model_len)
    prompt: str | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int = -1
    output_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    detok: Any = None  # per-sequence incremental detokenizer
    num_pending: int = 0  # tokens sampled on the device but not yet collected (pipelined steps)
    matcher: Any = None  # the grammar matcher of a structured-outputs request (engine/structured.py)
    images: Any = None  # pixel_values [images, 3, H, W] of a VLM request, spliced in at prefill, then dropped
    num_computed_tokens: int = 0  # prompt tokens whose keys are in the cache (cached prefix + prefilled chunks)
    num_scheduled_tokens: int = 0  # prompt tokens the current prefill step computes for this sequence
    block_hashes: list[int] | None = None  # prefix-cache hashes of the prompt's full blocks (paged cache)
    sampling_row: Any = None  # engine/sampling.py SamplingRow, made at its first sampling step (engine/sampler.py)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_prefilled(self) -> bool:
        return self.num_computed_tokens >= len(self.prompt_token_ids)

    @property
    def text(self) -> str:
        """The output text emitted so far (all of it once finished); the detokenizer holds it."""
        return self.detok.output_text if self.detok is not None else ""

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def max_new_tokens(self) -> int:
        """Tokens this sequence may still produce: the smaller of max_tokens and what the context leaves."""
        generated = len(self.output_token_ids)  # (called per sequence per step: plain arithmetic, no properties)
        room = self.max_total_len - len(self.prompt_token_ids) - generated
        max_tokens = self.params.max_tokens
        if max_tokens is not None and max_tokens - generated < room:
            room = max_tokens - generated
        return room if room > 0 else 0
