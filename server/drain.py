"""Graceful shutdown: SIGTERM drains the server while it keeps listening, so that clients are told, not refused.

While draining, new requests get HTTP 503 (and /health 503, so a load balancer takes the replica out) through
the still-open listening socket; the requests already running may finish for up to --drain-timeout seconds.
Past it, the backend ends what is left with EngineShutdownError: a stream sends it as an error event and then
`data: [DONE]`, a request not yet answered (waiting for a batch slot, say) gets 503. Only then does the
server stop listening and exit.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("minimind.server")

FLUSH_S = 5.0  # after the timeout: time for the ended requests to send their last event


class RequestCounter:
    """How many HTTP requests are being answered right now (shared by the middleware and the drain)."""

    def __init__(self) -> None:
        self.count = 0


class CountRequests:
    """ASGI middleware: keeps a RequestCounter up to date."""

    def __init__(self, app: ASGIApp, counter: RequestCounter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.counter.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.counter.count -= 1


async def drain(app: FastAPI, timeout: float) -> None:
    """Refuse new work, wait up to `timeout` seconds for the running requests, then end the rest (see above)."""
    state = app.state
    state.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while state.requests.count and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if not state.requests.count:
        return
    log.warning(
        "drain timeout of %gs reached: ending %d request(s) still running (streams get an error event, "
        "waiting requests HTTP 503)",
        timeout,
        state.requests.count,
    )
    await state.backend.shutdown(drain_timeout=0)
    deadline = loop.time() + FLUSH_S
    while state.requests.count and loop.time() < deadline:
        await asyncio.sleep(0.05)
