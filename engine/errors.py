"""The engine's error type (one per layer). The server maps the subclasses to HTTP statuses."""

from minimind.errors import MiniMindError


class EngineError(MiniMindError):
    """A request or model the engine cannot serve; the message says why and how to fix it."""


class InvalidRequestError(EngineError):
    """Bad sampling parameters or prompt (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidRequestError):
    """Prompt plus max_tokens exceed the context window (HTTP 400, naming both numbers)."""


class QueueFullError(EngineError):
    """The waiting queue is at its bound (HTTP 429)."""


class EngineShutdownError(EngineError):
    """The engine stopped (shutdown past the drain timeout) before the request finished (HTTP 503)."""
