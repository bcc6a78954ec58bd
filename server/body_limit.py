"""--max-request-bytes: a body over the limit gets HTTP 413 in OpenAI's error shape, before it is read.

FastAPI's own `max_body_size` answers a too-large Content-Length with a plain-text 413, which OpenAI clients
cannot parse; this middleware answers it with the usual error body. A body without Content-Length (chunked)
is counted while the route reads it and refused as soon as it passes the limit.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_response, too_large_message


class LimitBody:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(413, too_large_message(self.max_bytes), code="request_too_large")
            response.headers["Connection"] = "close"  # the rest of the body is never read
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413)  # answered by server/errors.py in OpenAI's shape
            return message

        await self.app(scope, counted, send)
