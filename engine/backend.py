"""The one async protocol every backend (native, vllm) implements, so the server never knows which runs.

The server calls `generate()` once per request and iterates deltas; breaking out of the iteration (client
disconnect) or calling `abort()` must free the request's cache at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.sampling_params import SamplingParams


@dataclass
class TokenLogprob:
    token_id: int
    token: str  # decoded text of this token alone (may be a partial UTF-8 sequence rendered with U+FFFD)
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token_id, token, logprob), best first


@dataclass
class CompletionDelta:
    """What one request produced since the last delta, for one of its `n` completions."""

    request_id: str
    index: int  # which of the n completions (0..n-1)
    text: str  # new text, safe to show: whole UTF-8 characters, no part of a pending stop string
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" when finished
    stop_reason: int | str | None = None  # the stop string or token id that ended it, if any
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0  # cumulative for this completion
    prompt_logprobs: list[TokenLogprob | None] | None = None  # only on the first delta, when asked for


def merge_deltas(first: CompletionDelta, later: CompletionDelta) -> CompletionDelta:
    """One delta standing for two consecutive deltas of the same completion.

    A stream whose reader falls behind the engine (many streams, one event loop) gets fewer, larger events
    instead of a growing backlog, as vLLM's output collector does; the text and tokens are unchanged.
    """
    logprobs = None
    if first.logprobs is not None or later.logprobs is not None:
        logprobs = (first.logprobs or []) + (later.logprobs or [])
    return CompletionDelta(
        request_id=first.request_id,
        index=first.index,
        text=first.text + later.text,
        token_ids=first.token_ids + later.token_ids,
        logprobs=logprobs,
        finished=later.finished,
        finish_reason=later.finish_reason,
        stop_reason=later.stop_reason,
        num_prompt_tokens=first.num_prompt_tokens or later.num_prompt_tokens,
        num_generated_tokens=later.num_generated_tokens,
        prompt_logprobs=first.prompt_logprobs if first.prompt_logprobs is not None else later.prompt_logprobs,
    )


class DeltaStream:
    """One request's deltas as a backend receives them (put into `queue` from the engine's side), read the way a
    client should get them: deltas that piled up while the reader was busy go out merged, an exception put into
    the queue is raised, and the iteration ends when all `n` completions have finished. `live` counts those that
    have not, so that a backend whose reader left early knows to abort the request."""

    def __init__(self, n: int) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.live = n

    async def __aiter__(self) -> AsyncIterator[CompletionDelta]:
        pending: CompletionDelta | BaseException | None = None
        while self.live:
            item = pending if pending is not None else await self.queue.get()
            pending = None
            if isinstance(item, BaseException):
                raise item
            while not item.finished and not self.queue.empty():
                later = self.queue.get_nowait()
                if isinstance(later, BaseException) or later.index != item.index:
                    pending = later
                    break
                item = merge_deltas(item, later)
            if item.finished:
                self.live -= 1
            yield item


@dataclass
class ModelInfo:
    name: str  # served model name
    path: str
    max_model_len: int
    vocab_size: int
    backend: str  # "native" | "vllm"
    device: str
    dtype: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineStats:
    running: int
    waiting: int
    cache_usage: float  # fraction of KV cache in use, 0..1
    free_slots: int
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (paged KV cache), since start
    prefix_cache_hits: int = 0  # of those, tokens whose keys were found cached
    prefill_steps: int = 0  # engine steps that computed prompt tokens, since start (native engine)
    decode_steps: int = 0  # engine steps that decoded the running sequences, since start (native engine)


@dataclass
class VisionInputs:
    """What the server needs to turn a request's images into a VLM's inputs: the placeholder text of one image
    (`image_token` x `image_token_len`) and the image -> pixel_values function of the model's encoder."""

    image_token: str
    image_token_len: int
    preprocess: Any  # models.vision.image.ImagePreprocessor: PIL image -> [3, H, W]


def vision_inputs(model: Any, source: Any) -> VisionInputs | None:
    """The VisionInputs of a loaded VLM (preprocessing from the `source` directory's preprocessor_config.json
    when it has one); None for a text-only model."""
    config = model.config
    if getattr(config, "vision_config", None) is None:
        return None
    from pathlib import Path

    from models.vision.image import ImagePreprocessor

    folder = Path(source) if isinstance(source, (str, Path)) and Path(source).is_dir() else None
    preprocess = ImagePreprocessor.for_encoder(config.vision_config, folder)
    return VisionInputs(config.image_token, config.image_token_len, preprocess)


class Backend(Protocol):
    info: ModelInfo
    tokenizer: Any  # a transformers PreTrainedTokenizerBase (chat template, encode/decode)
    vision: VisionInputs | None  # None: a text-only model (requests with images get HTTP 400)

    async def start(self) -> None: ...

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting, let running requests finish for up to drain_timeout seconds, then abort the rest."""

    def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str, images: Any = None
    ) -> AsyncIterator[CompletionDelta]:
        """Raises PromptTooLongError / QueueFullError / InvalidRequestError before yielding anything. `images`:
        pixel_values [images, 3, H, W] for the prompt's image placeholders (VLM backends only)."""

    async def abort(self, request_id: str) -> None: ...

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """Mean-pooled, L2-normalised last hidden states, one vector per prompt."""

    def stats(self) -> EngineStats: ...
