"""`warm_api(app)`: an API process's own first times, paid at start-up instead of by the first client.

The engine warms its shapes and sampling paths (engine/warmup.py), but the process that answers HTTP has first
times of its own: the chat template is compiled (a Jinja program; about 16 ms here), the worker threads that
render prompts are started, and anyio's thread-pool backend, where FastAPI runs the sync dependencies (the API-key
check), is imported. Measured on the 2-core CPU here (tiny model, one streamed chat request at a time), the first
request after start-up took 41-50 ms against a steady 9-13 ms; with `--api-server-count 4` each process's first
one paid it again. Every API process runs this in its lifespan, before it reports ready.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import anyio
from fastapi import FastAPI

from server.prompts import chat_prompt
from server.protocol import ChatMessage
from server.workers import WORKER_THREADS

log = logging.getLogger("minimind.server")


def render_sample_prompt(tokenizer: Any, together: threading.Barrier) -> None:
    """One chat prompt through the model's template (compiled once per process, then cached by transformers), then
    wait for the other jobs: the pool starts a new thread only while none is idle, so all must be busy at once."""
    try:
        chat_prompt(tokenizer, [ChatMessage(role="user", content="warm-up")])
    except Exception as err:  # a tokenizer without a chat template: chat requests get that error, not this
        log.debug("warm-up renders no chat prompt: %s", err)
    try:
        together.wait(timeout=30)
    except threading.BrokenBarrierError:  # a pool smaller than WORKER_THREADS: nothing more to start
        pass


async def warm_api(app: FastAPI) -> None:
    tokenizer = getattr(app.state.backend, "tokenizer", None)
    loop = asyncio.get_running_loop()
    together = threading.Barrier(WORKER_THREADS)
    jobs = [
        loop.run_in_executor(app.state.workers, render_sample_prompt, tokenizer, together)
        for _ in range(WORKER_THREADS)
    ]
    await asyncio.gather(*jobs)
    await anyio.to_thread.run_sync(lambda: None)
