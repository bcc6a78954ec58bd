"""`minimind serve`: build the backend from the settings, wrap it in the app, run uvicorn.

SIGTERM/Ctrl-C: new requests get 503 at once (app.state.draining), running ones may finish for up to
--drain-timeout seconds, then the backend aborts what is left and the process exits.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from server import settings as settings_mod
from server.listen import bind_port
from server.settings import Settings

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
        from engine.default_model import default_model_path

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
        )
    from engine.backends.native import NativeBackend

    return NativeBackend(
        model=model,
        dtype=settings.dtype,
        device=settings.device,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        draft_model=settings.draft_model,
        num_speculative_tokens=settings.num_speculative_tokens,
        lora=settings.lora,
        tokenizer=settings.tokenizer,
        served_model_name=settings.served_model_name,
        max_queue=settings.max_queue,
        compile_model=settings.compile,
    )


def serve(settings: Settings) -> None:
    sock = bind_port(settings.host, settings.port)  # before the imports and the model load: a busy port fails at once
    import uvicorn
    from sse_starlette.sse import AppStatus

    from server.app import create_app

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

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not app.state.draining:
                log.info("shutting down: no new requests; draining running ones (up to %.0fs)", settings.drain_timeout)
            app.state.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout)),
    )
    DrainingServer(config).run(sockets=[sock])


def run(args: argparse.Namespace) -> int:
    settings = settings_mod.from_args(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(settings)
    return 0
