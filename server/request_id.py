"""`X-Request-Id` on every response: the client's own id echoed back, or a new one, as vLLM and OpenAI do.

The id ties a client's log line to the server's; it is not the engine's request id, so a client that sends
the same id twice cannot make two requests collide.
"""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
_USABLE = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-Id when it is a plain token of at most 128 characters, else a new uuid4 hex."""
    for name, value in headers:
        if name.lower() == HEADER:
            text = value.decode("latin-1").strip()
            if _USABLE.fullmatch(text):
                return text
    return uuid.uuid4().hex


class RequestId:
    """ASGI middleware: sets `scope["state"]["request_id"]` and the X-Request-Id response header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope.get("headers", []))
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = dict(message, headers=[*headers, (HEADER, request_id.encode())])
            await send(message)

        await self.app(scope, receive, send_with_id)
