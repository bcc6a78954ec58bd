"""`minimind serve`: build the backend from the settings and run the API process(es) (server/http_server.py).

Process layouts: the engine in this process (a thread steps it; the default on the CPU), or in a process of its
own (the default on a GPU) with this process or --api-server-count processes answering HTTP (server/processes.py).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from server import settings as settings_mod
from server.http_server import run_api_server
from server.listen import bind_ports
from server.settings import Settings


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
    from engine.backends.native import NativeBackend

    return NativeBackend(served_model_name=settings.served_model_name, config=engine_config(settings))


def engine_config(settings: Settings) -> Any:
    """The one place where serve's settings become engine fields (same names, but --compile)."""
    from dataclasses import asdict

    from engine.config import EngineConfig

    model = settings.model
    if model is None:
        from models.default_model import default_model_path

        model = str(default_model_path())
    return EngineConfig.from_fields(asdict(settings), model=model, compile_model=settings.compile)


def serve(settings: Settings) -> None:
    """In-process engine: this process answers HTTP and steps the engine in a thread. Engine process
    (--engine-process, the default on a GPU): the engine steps in a process of its own, and this process, or
    --api-server-count processes on the one port (server/listen.py), answer HTTP (engine/backends/engine_process.py)."""
    socks = bind_ports(settings.host, settings.port, settings.api_server_count)  # before the model load: fail fast
    if not settings_mod.uses_engine_process(settings):  # (then --api-server-count is 1: settings checks it)
        run_api_server(build_backend(settings), settings, socks[0])
        return
    from engine.backends.engine_process import EngineProcess

    engine = EngineProcess.start(engine_config(settings), settings.served_model_name, settings.log_level)
    try:
        engine.wait_ready()
        if settings.api_server_count == 1:
            from engine.backends.remote import RemoteBackend

            run_api_server(RemoteBackend(engine.address, engine.death, owner=engine), settings, socks[0])
        else:
            from server.processes import run_api_processes

            run_api_processes(settings, socks, engine)
    finally:
        engine.stop()


def run(args: argparse.Namespace) -> int:
    settings = settings_mod.from_args(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(settings)
    return 0
