"""GET /health (load balancers, compose healthchecks) and GET /metrics (Prometheus); both need no key."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.metrics import CONTENT_TYPE

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while serving; 503 before the engine and every API process are up, once shutdown began, and when the
    engine process died."""
    state = request.app.state
    dead = getattr(state.backend, "dead", None)  # engine/backends/remote.py
    if dead:
        return JSONResponse({"status": "engine dead", "error": dead}, status_code=503)
    starting = not state.ready or (state.peers is not None and not state.peers.all_ready())
    if state.draining or starting:
        return JSONResponse({"status": "draining" if state.draining else "starting"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    refresh = getattr(request.app.state.backend, "refresh_stats", None)  # an engine in another process
    if refresh is not None:
        await refresh()
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
