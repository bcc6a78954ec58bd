"""What the offline `LLM` returns: vLLM's RequestOutput / CompletionOutput shapes, so code written for one works here."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.backend import TokenLogprob


@dataclass
class CompletionOutput:
    index: int  # which of the request's n completions
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it (None for EOS)
    logprobs: list[TokenLogprob] | None = None  # one per generated token when SamplingParams.logprobs is set
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when SamplingParams.prompt_logprobs is set
    finished: bool = True
