"""`run_api_server`: one API process — the app around a backend, served by uvicorn on a listening socket.

SIGTERM/Ctrl-C: new requests get 503 at once while the server keeps listening, running ones may finish for
up to --drain-timeout seconds, then the backend ends what is left (server/drain.py) and the process exits.
A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from server import settings as settings_mod
from server.settings import Settings, format_size

log = logging.getLogger("minimind.server")


def run_api_server(backend: Any, settings: Settings, sock: Any, announce: bool = True, peers: Any = None) -> None:
    """The app around `backend`, served by uvicorn on the listening socket `sock` until SIGTERM has drained it.
    `peers`: the other API processes' readiness (server/processes.py ReadyCount), when there are several."""
    import uvicorn
    from sse_starlette.sse import AppStatus

    from server.app import create_app
    from server.drain import drain

    # sse-starlette would end every open stream on SIGTERM; we drain them instead (uvicorn's graceful
    # shutdown waits up to --drain-timeout, then the backend aborts what is left).
    AppStatus.disable_automatic_graceful_drain()

    app = create_app(backend, settings, peers)
    if announce:
        announce_server(backend.info, settings)

    class DrainingServer(uvicorn.Server):
        """uvicorn stops listening as soon as it is told to exit; this one first drains (server/drain.py)."""

        drain_task: asyncio.Task | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if app.state.draining:  # a second signal: stop now
                super().handle_exit(sig, frame)
                return
            log.info("shutting down: no new requests; draining running ones (up to %gs)", settings.drain_timeout)
            app.state.draining = True
            self._captured_signals.append(sig)  # uvicorn re-raises it at exit, for the exit status

        async def on_tick(self, counter: int) -> bool:
            if app.state.draining and self.drain_task is None:
                self.drain_task = asyncio.create_task(drain(app, settings.drain_timeout))
            if self.drain_task is not None and self.drain_task.done():
                self.should_exit = True
            return await super().on_tick(counter)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,  # the drain has run by then: this only closes idle connections
    )
    DrainingServer(config).run(sockets=[sock])


def announce_server(info: Any, settings: Settings) -> None:
    shown_host = "localhost" if settings.host in ("0.0.0.0", "::") else settings.host
    layout = ""
    if settings_mod.uses_engine_process(settings):
        layout = f", engine in its own process, {settings.api_server_count} API process(es)"
    log.info(
        "serving model %s (%s) on the %s backend%s, device %s, dtype %s, max_model_len %d, at http://%s:%d/v1%s",
        info.name,
        info.path,
        info.backend,
        layout,
        info.device,
        info.dtype,
        info.max_model_len,
        shown_host,
        settings.port,
        " (API key required)" if settings.api_key else "",
    )
    log_capacity(info, settings.max_num_seqs)


def log_capacity(info: Any, max_num_seqs: int) -> None:
    """How many requests can run at once: --max-num-seqs, or fewer when the KV cache budget holds fewer."""
    slots = info.extra.get("kv_cache_slots")
    if slots is None:  # the vllm backend sizes its own cache and logs it
        return
    per_seq, budget = info.extra["kv_cache_bytes_per_seq"], info.extra["kv_cache_bytes"]
    log.info(
        "KV cache: %d sequences of up to %d tokens (%s each, budget %s): at most %d requests decode at once",
        slots,
        info.max_model_len,
        format_size(per_seq),
        format_size(budget),
        slots,
    )
    if slots < max_num_seqs:
        log.warning(
            "--max-num-seqs is %d but the KV cache budget (%s) holds only %d sequences of %d tokens: at most %d "
            "requests run at once and the rest wait; raise --kv-cache-memory (to at least %s) or lower "
            "--max-model-len",
            max_num_seqs,
            format_size(budget),
            slots,
            info.max_model_len,
            slots,
            format_size(per_seq * max_num_seqs),
        )
