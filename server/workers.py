"""The thread pool for the CPU work a request brings: chat templates, tokenizing and detokenizing.

On the event loop, that work would stop every other client while it runs (a 5 MB prompt takes seconds to
tokenize, a chat template is a program); in these threads the event loop keeps writing streams. The fast
tokenizers encode and decode through shared references, so several threads may use one tokenizer at once.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request, Response
from pydantic import BaseModel

T = TypeVar("T")
WORKER_THREADS = 4


def create_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="minimind-prompts")


async def offload(request: Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) in the app's worker pool; its exception (an APIError, say) is raised here."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app.state.workers, functools.partial(fn, *args, **kwargs))


async def json_response(request: Request, build: Callable[..., BaseModel], *args: Any) -> Response:
    """`build(*args)` serialised to JSON in the worker pool: a large answer (a million token ids, thousands of
    embedding values) takes a while to validate and encode, which on the event loop would stall every stream."""

    def render() -> bytes:
        return build(*args).model_dump_json().encode()

    return Response(await offload(request, render), media_type="application/json")
