"""`warm_api(app)`: an API process's own first times, paid at start-up instead of by the first client.

The engine warms its shapes and sampling paths (engine/warmup.py), but the process that answers HTTP has first
times of its own: the chat template is compiled (a Jinja program; about 16 ms here), the worker threads that
render prompts are started, and anyio's thread-pool backend, where FastAPI runs the sync dependencies (the API-key
check), is imported. Measured on the 2-core CPU here (tiny model, one streamed chat request at a time), the first
request after start-up took 41-50 ms against a steady 9-13 ms; with `--api-server-count 4` each process's first
one paid it again. Every API process runs this in its lifespan, before it reports ready.

Then it sends itself one short request of each common shape (completions and chat, streamed and not) through its
own ASGI app, in-process: the middleware stack is built, the routes, request models, SSE framing and the channel to
the engine each run once. They are left out of /metrics (server/streaming.py WARMING_UP). They were added when
`vllm bench serve` on an H200 (minimind2-small, `--api-server-count 4`, one stream) saw a median TTFT of 9.6 ms but
a p99 of 75 ms. That p99 turned out to be the engine's (cuDNN attention planning each new prompt length, see
engine/model_runner.py); these still take the API process's own first times off the first clients.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import anyio
import httpx
from fastapi import FastAPI

from server.prompts import chat_prompt
from server.protocol import ChatMessage
from server.streaming import WARMING_UP
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
    await warm_routes(app)


def sample_requests(model: str) -> list[tuple[str, dict[str, Any]]]:
    """(path, body) of the warm-up requests: two tokens each, the way clients and load generators ask."""
    usage = {"stream_options": {"include_usage": True}}
    return [
        ("/v1/completions", {"model": model, "prompt": "warm-up", "max_tokens": 2}),
        ("/v1/completions", {"model": model, "prompt": "warm-up", "max_tokens": 2, "stream": True, **usage}),
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        (
            "/v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True, **usage},
        ),
    ]


async def warm_routes(app: FastAPI) -> int:
    """Send the sample requests through the app itself; returns how many answered 200 (a failure is only logged:
    the first client then pays that first time, and gets the route's own error if there is one)."""
    keys = app.state.settings.api_key
    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    answered = 0
    flag = WARMING_UP.set(True)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://warm-up", timeout=120) as client:
            for path, body in sample_requests(app.state.backend.info.name):
                try:
                    response = await client.post(path, json=body, headers=headers)
                except Exception as err:  # noqa: BLE001 - warming must never stop the server from starting
                    log.debug("warm-up request to %s failed: %s", path, err)
                    continue
                if response.status_code == 200:
                    answered += 1
                else:
                    log.debug("warm-up request to %s answered %s: %s", path, response.status_code, response.text)
    finally:
        WARMING_UP.reset(flag)
    return answered
