"""The messages between API processes and the engine process (engine/backends/engine_process.py, remote.py).

Every API process holds one ZMQ DEALER socket connected to the engine's ROUTER socket; both directions carry
msgpack (msgspec) messages. The hot direction is engine -> API: one `Outputs` message per engine step and API
process, carrying every stream's deltas of that step (not one message per token per stream). The one-time
handshake (`Hello` -> `EngineInfo`) carries the tokenizer and the image preprocessor as pickles, which only
these two processes of one server ever read.
"""

from __future__ import annotations

import pickle
from typing import Any

import msgspec
import torch

from engine.backend import CompletionDelta, EngineStats
from engine.errors import EngineError, EngineShutdownError, InvalidRequestError, PromptTooLongError, QueueFullError
from engine.sampling_params import SamplingParams


class Tensor(msgspec.Struct, array_like=True):
    """A tensor as raw bytes (pixel values of a VLM request cross the channel this way)."""

    dtype: str
    shape: list[int]
    data: bytes

    @classmethod
    def of(cls, tensor: torch.Tensor) -> Tensor:
        tensor = tensor.detach().cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        return cls(str(tensor.dtype).removeprefix("torch."), list(tensor.shape), raw)

    def to_torch(self) -> torch.Tensor:
        flat = torch.frombuffer(bytearray(self.data), dtype=torch.uint8)
        return flat.view(getattr(torch, self.dtype)).reshape(self.shape)


# ---- API process -> engine ------------------------------------------------------------------------------------------


class Hello(msgspec.Struct, tag=True):
    """Asks for `EngineInfo` (the reply arrives once the engine is loaded and warmed up)."""


class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    images: Tensor | None = None


class Abort(msgspec.Struct, tag=True):
    request_ids: list[str]


class Embed(msgspec.Struct, tag=True):
    job_id: int
    prompts: list[list[int]]


class GetStats(msgspec.Struct, tag=True):
    """Asks for an `Outputs` message carrying the current `EngineStats` (for /metrics)."""


ToEngine = Hello | AddRequest | Abort | Embed | GetStats


# ---- engine -> API process ------------------------------------------------------------------------------------------


class ErrorInfo(msgspec.Struct, array_like=True):
    """An engine error by class name, so the API process raises the same type (and the same HTTP status)."""

    kind: str
    message: str
    param: str | None = None

    @classmethod
    def of(cls, err: BaseException) -> ErrorInfo:
        kind = type(err).__name__ if type(err).__name__ in ERRORS else "EngineError"
        return cls(kind, str(err), getattr(err, "param", None))

    def to_exception(self) -> EngineError:
        kind = ERRORS[self.kind]
        return kind(self.message, param=self.param) if issubclass(kind, InvalidRequestError) else kind(self.message)


ERRORS: dict[str, type[EngineError]] = {
    cls.__name__: cls
    for cls in (EngineError, InvalidRequestError, PromptTooLongError, QueueFullError, EngineShutdownError)
}


class Ack(msgspec.Struct, array_like=True):
    """An `AddRequest` was queued (error None) or refused (the error `generate()` raises)."""

    request_id: str
    error: ErrorInfo | None = None


class Failed(msgspec.Struct, array_like=True):
    """A running request ended by an engine failure (a step raised): its stream raises the error."""

    request_id: str
    error: ErrorInfo


class EmbedDone(msgspec.Struct, array_like=True):
    job_id: int
    vectors: list[list[float]] | None = None
    error: ErrorInfo | None = None


class Outputs(msgspec.Struct):
    """What one engine loop iteration has for one API process."""

    deltas: list[CompletionDelta] = []
    acks: list[Ack] = []
    failed: list[Failed] = []
    embeds: list[EmbedDone] = []
    stats: EngineStats | None = None


class EngineInfo(msgspec.Struct):
    """The handshake's answer: what a Backend exposes besides generate/abort/embed (engine/backend.py)."""

    info: bytes  # pickled ModelInfo
    tokenizer: bytes  # pickled tokenizer
    vision: bytes  # pickled VisionInputs | None
    pid: int

    def unpack(self) -> tuple[Any, Any, Any]:
        return pickle.loads(self.info), pickle.loads(self.tokenizer), pickle.loads(self.vision)


encoder = msgspec.msgpack.Encoder()
to_engine = msgspec.msgpack.Decoder(ToEngine)
outputs = msgspec.msgpack.Decoder(Outputs)
engine_info = msgspec.msgpack.Decoder(EngineInfo)
