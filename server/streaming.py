"""Running requests on the backend: metrics, cancel-on-disconnect, merging several prompts, SSE framing.

Shared by the chat and completions routes so that both cancel, count and fail the same way.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from contextvars import ContextVar
from typing import Any, TypeVar

import anyio
from fastapi import Request
from sse_starlette import EventSourceResponse

from engine.backend import CompletionDelta, merge_deltas
from engine.sampling_params import SamplingParams
from server.errors import ClientDisconnected, api_error_from, error_body

T = TypeVar("T")
DISCONNECT_POLL_S = 0.25
# Set while an API process sends its own start-up requests (server/warmup.py): they are left out of /metrics.
WARMING_UP: ContextVar[bool] = ContextVar("minimind_warming_up", default=False)


async def run_backend(
    request: Request, prompt: list[int], params: SamplingParams, request_id: str, images: Any = None
) -> AsyncIterator[CompletionDelta]:
    """Deltas of one prompt; if the consumer stops early (disconnect, error) the backend aborts the request.

    The first `__anext__` raises the backend's PromptTooLongError / QueueFullError before any delta, so a
    route can still answer with a plain HTTP error.
    """
    state = request.app.state
    started = time.perf_counter()
    stream = state.backend.generate(prompt, params, request_id, **({"images": images} if images is not None else {}))
    interval = state.settings.stream_interval
    deltas = coalesce(stream, interval) if interval > 1 else stream
    counted = not WARMING_UP.get()
    tracked = state.metrics.track(deltas, started) if counted else deltas
    done = False
    try:
        async for delta in tracked:
            yield delta
        done = True
    finally:
        if not done:
            if counted:
                state.metrics.record_abort()
            # shielded: when a disconnect cancels the surrounding task, the abort must still run
            with anyio.CancelScope(shield=True):
                await state.backend.abort(request_id)
                await tracked.aclose()
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()


async def coalesce(deltas: AsyncIterator[CompletionDelta], interval: int) -> AsyncIterator[CompletionDelta]:
    """--stream-interval: hold each completion's deltas until `interval` tokens have gathered. A completion's first
    delta (time to first token) and its last go out at once; merged deltas carry the same text and tokens."""
    held: dict[int, CompletionDelta] = {}
    seen: set[int] = set()
    async for delta in deltas:
        index = delta.index
        if index in held:
            delta = merge_deltas(held.pop(index), delta)
        if delta.finished or index not in seen or len(delta.token_ids) >= interval:
            seen.add(index)
            yield delta
        else:
            held[index] = delta
    for delta in held.values():  # a stream that ended without a finished delta
        yield delta


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they arrive, tagged with the iterator's position."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    finished = object()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item, None))
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put((i, None, exc))
        finally:
            await queue.put((i, finished, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is finished:
                remaining -= 1
                continue
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def first_then_rest(stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """Pull the first item now (so start-up errors become HTTP errors), then replay it and the rest."""
    iterator = aiter(stream)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        first = None

    async def replay() -> AsyncIterator[T]:
        if first is not None:
            yield first
            async for item in iterator:
                yield item

    return replay()


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it as soon as the client goes away (non-stream requests; ClientDisconnected then)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(task, return_exceptions=True)
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()


def sse_response(events: AsyncIterator[dict[str, Any]]) -> EventSourceResponse:
    """`data: {json}` per event, `data: {"error": ...}` if the engine fails midway, then `data: [DONE]`."""

    async def frames() -> AsyncIterator[dict[str, str]]:
        try:
            async for event in events:
                yield {"data": json.dumps(event, ensure_ascii=False, separators=(",", ":"))}
        except Exception as exc:
            err = api_error_from(exc)
            yield {"data": json.dumps(error_body(err.status, err.message, err.param, err.code))}
        yield {"data": "[DONE]"}

    return EventSourceResponse(frames(), sep="\n", ping=15)
