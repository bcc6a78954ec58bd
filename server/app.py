"""`create_app(backend, settings)`: the FastAPI application around any Backend.

The lifespan starts the backend and, on shutdown, drains it (running requests may finish within
--drain-timeout). `app.state.draining` is set on SIGTERM (see server/drain.py) so new requests get 503 while
the running ones finish. Request bodies over --max-request-bytes get 413 (server/body_limit.py).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.backend import Backend
from engine.warmup import freeze_heap
from server import (
    routes_chat,
    routes_completions,
    routes_embeddings,
    routes_health,
    routes_models,
    routes_responses,
    routes_tokenize,
    routes_tokenizer_info,
)
from server.auth import check_api_key
from server.body_limit import LimitBody
from server.drain import CountRequests, RequestCounter
from server.errors import APIError, install_error_handlers
from server.metrics import ServerMetrics
from server.openapi import install_openapi
from server.request_id import RequestId
from server.responses_store import ResponseStore
from server.settings import Settings
from server.warmup import warm_api
from server.workers import create_pool

_SLASHES = re.compile(r"/{2,}")


class NormalizePath:
    """`//v1//models/` → `/v1/models`: clients such as Open-WebUI join base URLs with extra slashes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = _SLASHES.sub("/", scope["path"])
            if len(path) > 1:
                path = path.rstrip("/")
            if path != scope["path"]:
                scope = dict(scope, path=path, raw_path=path.encode())
        await self.app(scope, receive, send)


def admit(request: Request) -> None:
    """503 for new work once shutdown began; running requests are left to finish."""
    if request.app.state.draining:
        raise APIError(503, "the server is shutting down and accepts no new requests; retry on another replica")


def create_app(backend: Backend, settings: Settings | None = None, peers: Any = None) -> FastAPI:
    """`peers`: the API processes' ReadyCount when there are several (server/processes.py); /health waits for all."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        await warm_api(app)
        freeze_heap("API process")  # after every warm-up: the long-lived objects are all there now
        app.state.ready = True
        if app.state.peers is not None:
            app.state.peers.mark_ready()
        try:
            yield
        finally:
            app.state.draining = True
            await backend.shutdown(drain_timeout=settings.drain_timeout)
            app.state.workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="my-minimind OpenAI-compatible API",
        version="0.1.0",
        description="OpenAI-compatible endpoints (chat, completions, embeddings, models) plus tokenize, health, metrics.",
        lifespan=lifespan,
    )
    app.state.backend = backend
    app.state.settings = settings
    app.state.metrics = ServerMetrics(backend, backend.info.name)
    app.state.draining = False
    app.state.ready = False
    app.state.peers = peers
    app.state.responses = ResponseStore()
    app.state.requests = RequestCounter()
    app.state.workers = create_pool()

    install_error_handlers(app)
    v1 = [Depends(check_api_key), Depends(admit)]
    app.include_router(routes_models.router, dependencies=v1)
    app.include_router(routes_chat.router, dependencies=v1)
    app.include_router(routes_completions.router, dependencies=v1)
    app.include_router(routes_embeddings.router, dependencies=v1)
    app.include_router(routes_responses.router, dependencies=v1)
    app.include_router(routes_tokenize.router, dependencies=[Depends(admit)])
    app.include_router(routes_tokenizer_info.router, dependencies=[Depends(admit)])
    app.include_router(routes_health.router)
    install_openapi(app)

    app.add_middleware(LimitBody, max_bytes=settings.max_request_bytes)  # inside CORS: a 413 keeps its headers
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials="*" not in settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.add_middleware(RequestId)
    app.add_middleware(NormalizePath)
    app.add_middleware(CountRequests, counter=app.state.requests)
    return app
