"""`minimind serve`: build the backend from the settings, wrap it in the app, run uvicorn.

SIGTERM/Ctrl-C: new requests get 503 at once while the server keeps listening, running ones may finish for
up to --drain-timeout seconds, then the backend ends what is left (server/drain.py) and the process exits.
A second signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from server import settings as settings_mod
from server.listen import bind_port
from server.settings import Settings, format_size

log = logging.getLogger("minimind.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve a model through an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
        "/v1/responses, /v1/embeddings, /v1/models, /tokenize, /tokenizer_info, /health, /metrics). Every flag "
        "can also be set as a MINIMIND_* "
        "environment variable, e.g. MINIMIND_PORT=9000."
    )
    parser.epilog = "example:\n  minimind serve --model out/minimind2-sft --port 8998 --api-key secret"
    settings_mod.add_arguments(parser)


def build_backend(settings: Settings) -> Any:
    """The Backend the settings ask for; the model path defaults to the embedded SmolLM2-135M-Instruct."""
    model = settings.model
    if model is None:
        from models.default_model import default_model_path

        model = str(default_model_path())
    if settings.backend == "vllm":
        from engine.backends.vllm import VllmBackend

        return VllmBackend(
            model,
            served_model_name=settings.served_model_name,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            max_queue=settings.max_queue,
            dtype=settings.dtype,
            tokenizer=settings.tokenizer,
            draft_model=settings.draft_model,
            num_speculative_tokens=settings.num_speculative_tokens,
            lora=settings.lora,
            kv_cache_memory=settings.kv_cache_memory,
        )
    from dataclasses import asdict

    from engine.backends.native import NativeBackend
    from engine.config import EngineConfig

    # The one place where serve's settings become engine fields (same names, but --compile).
    config = EngineConfig.from_fields(asdict(settings), model=model, compile_model=settings.compile)
    return NativeBackend(served_model_name=settings.served_model_name, config=config)


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


def serve(settings: Settings) -> None:
    sock = bind_port(settings.host, settings.port)  # before the imports and the model load: a busy port fails at once
    import uvicorn
    from sse_starlette.sse import AppStatus

    from server.app import create_app
    from server.drain import drain

    # sse-starlette would end every open stream on SIGTERM; we drain them instead (uvicorn's graceful
    # shutdown waits up to --drain-timeout, then the backend aborts what is left).
    AppStatus.disable_automatic_graceful_drain()

    backend = build_backend(settings)
    app = create_app(backend, settings)
    info = backend.info
    shown_host = "localhost" if settings.host in ("0.0.0.0", "::") else settings.host
    log.info(
        "serving model %s (%s) on the %s backend, device %s, dtype %s, max_model_len %d, at http://%s:%d/v1%s",
        info.name,
        info.path,
        info.backend,
        info.device,
        info.dtype,
        info.max_model_len,
        shown_host,
        settings.port,
        " (API key required)" if settings.api_key else "",
    )
    log_capacity(info, settings.max_num_seqs)

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


def run(args: argparse.Namespace) -> int:
    settings = settings_mod.from_args(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(settings)
    return 0
