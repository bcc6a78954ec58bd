"""One error shape for every failure: OpenAI's `{"error": {"message", "type", "param", "code"}}`.

FastAPI answers invalid bodies with 422 and its own shape; OpenAI clients expect 400 and this shape, so
every handler below funnels into `error_response`. Engine errors map to statuses by their class.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import EngineError, EngineShutdownError, InvalidRequestError, QueueFullError
from minimind.errors import MiniMindError
from server.settings import format_size

log = logging.getLogger("minimind.server")

# status -> OpenAI error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(MiniMindError):
    """An HTTP error with OpenAI's fields; raise it anywhere in a route."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


class ClientDisconnected(APIError):
    """The client went away before a non-stream answer was ready: its work is cancelled, nothing is sent."""

    def __init__(self) -> None:
        super().__init__(499, "client disconnected before the answer was ready", code="client_disconnected")


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict:
    """The JSON body of an error (also sent as an SSE event when a stream fails midway)."""
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error"),
            "param": param,
            "code": code if code is not None else status,
        }
    }


RETRY_AFTER_S = 1  # 429 (queue full) and 503 (shutting down): the OpenAI SDKs wait this long before a retry


def error_response(status: int, message: str, param: str | None = None, code: str | int | None = None) -> JSONResponse:
    headers = None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    elif status in (429, 503):
        headers = {"Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def api_error_from(exc: Exception) -> APIError:
    """Map any exception to an APIError: engine errors keep their message, anything else is a 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), code="queue_full")
    if isinstance(exc, EngineShutdownError):
        return APIError(503, str(exc), code="server_shutting_down")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, EngineError):
        return APIError(500, str(exc), code="engine_error")
    log.exception("unexpected server error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """First problem of a 422, as one sentence naming the field, and the field as `param`."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        where = _json_position(exc.body, first.get("loc", ()))
        return f"request body is not valid JSON: {ctx.get('error', 'parse error')}{where}; send a JSON object", None
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(loc) or None
    where = f"field '{field}'" if field else "request body"
    detail = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}" for e in errors[:3]
    )
    return f"invalid {where}: {detail}", field


def _not_json_message(content_type: str) -> str:
    """The body was not read as JSON because of its Content-Type (curl -d sends a form type)."""
    got = f"'{content_type}'" if content_type else "none"
    return (
        f"the request body must be JSON sent with the header 'Content-Type: application/json' (Content-Type was "
        f"{got}); with curl add -H 'Content-Type: application/json'"
    )


def too_large_message(limit: int) -> str:
    return (
        f"the request body is larger than this server accepts ({format_size(limit)}, --max-request-bytes); "
        "send a smaller request (fewer or shorter inputs)"
    )


def _json_position(doc: object, loc: tuple) -> str:
    """' at line L column C (char P)' of a JSON syntax error, as json.JSONDecodeError words it."""
    pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
    if pos is None:
        return ""
    if not isinstance(doc, str):
        return f" at char {pos}"
    line = doc.count("\n", 0, pos) + 1
    column = pos - doc.rfind("\n", 0, pos)
    return f" at line {line} column {column} (char {pos})"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if isinstance(exc, ClientDisconnected):  # an everyday event, not a server error: no traceback
            log.info("%s %s: client disconnected; its generation was cancelled", request.method, request.url.path)
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        err = api_error_from(exc)
        return error_response(err.status, err.message, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if "json" not in content_type.lower() and any(e.get("loc") == ("body",) for e in exc.errors()):
            return error_response(400, _not_json_message(content_type))
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message, code = str(exc.detail), None
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see GET /docs for the API"
        elif exc.status_code == 413:
            message, code = too_large_message(request.app.state.settings.max_request_bytes), "request_too_large"
        return error_response(exc.status_code, message, code=code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        err = api_error_from(exc)
        return error_response(err.status, err.message, err.param, err.code)
