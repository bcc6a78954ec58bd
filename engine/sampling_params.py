"""SamplingParams: vLLM's field names and semantics, so the server maps a request 1:1 onto either backend."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError
from engine.structured import StructuredOutputsParams


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/MiniMind semantics: logits of seen tokens divided (>0) or multiplied (<0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16  # None: up to the context window
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # number of top logprobs per generated token (0 = only the chosen token's)
    prompt_logprobs: int | None = None  # same for prompt tokens (echo + logprobs in /v1/completions)
    # raw: the model's own distribution (vLLM's default); processed: the distribution actually sampled from
    # (after penalties, temperature and top-k/top-p/min-p), which is what on-policy RL needs (training/rollout.py)
    logprobs_mode: str = "raw"
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None  # a grammar the output must follow (engine/structured.py)
    # False: token ids only, no text (vLLM's field). For callers that decode whole outputs themselves, such as RL
    # rollouts (training/rollout.py): incremental detokenizing is most of the engine's host work per token.
    detokenize: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None or self.top_k < 0:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Refuse values no engine can honour; the message names the field (it becomes `param` in HTTP 400)."""
        checks = [
            (self.n >= 1, "n", f"n must be at least 1, got {self.n}"),
            (self.temperature >= 0, "temperature", f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p}"),
            (
                self.repetition_penalty > 0,
                "repetition_penalty",
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
            ),
            (
                -2 <= self.presence_penalty <= 2,
                "presence_penalty",
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2 <= self.frequency_penalty <= 2,
                "frequency_penalty",
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                self.max_tokens is None or self.max_tokens >= 0,
                "max_tokens",
                f"max_tokens must be >= 0, got {self.max_tokens}",
            ),
            (self.min_tokens >= 0, "min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "min_tokens",
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= 20,
                "logprobs",
                f"logprobs must be between 0 and 20, got {self.logprobs}",
            ),
            (
                self.logprobs_mode in ("raw", "processed"),
                "logprobs_mode",
                f"logprobs_mode must be raw or processed, got {self.logprobs_mode!r}",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                "prompt_logprobs",
                f"prompt_logprobs must be between 0 and 20, got {self.prompt_logprobs}",
            ),
            (
                self.detokenize or not self.stop,
                "stop",
                "stop strings need the output text: set detokenize=True or use stop_token_ids",
            ),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequestError(message, param=param)
        if self.structured_outputs is not None:
            self.structured_outputs.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
