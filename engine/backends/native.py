"""NativeBackend: the server's async Backend protocol (engine/backend.py) on the native engine.

The engine loop runs in one background thread (model work blocks, so it must not run on the event loop): it
steps the engine while there is work and sleeps on an event otherwise. Each request has an asyncio queue; the
thread hands it deltas with `call_soon_threadsafe`. Leaving the `generate()` iteration early (client gone) or
`abort()` finishes the request in the engine, which frees its cache slot at once.

The event loop never takes the engine's lock: a step holds it for milliseconds and the engine thread takes it
again at once, so an event loop waiting on it would stop every stream from being written. New requests and
aborts go to an inbox instead, which the engine thread empties between steps.

Embeddings run on the engine thread too, one forward pass of at most EMBED_CHUNK_TOKENS tokens between two
steps: a large batch then slows the running streams down instead of stopping them until it is done. On a CPU
the chunk is small (a 135M model takes a few milliseconds per token there, so 128 tokens keep a stream's
gap to a fraction of a second); on a GPU a larger chunk costs the streams little.

Both threads share the GIL. Every torch call and every GPU wait releases it, and with Python's default switch
interval (5 ms) the engine thread then waits up to 5 ms to get it back while the event loop is busy writing
streams: under load a 1 ms decode step took 5-7 ms. The server therefore runs with a 0.1 ms switch interval
(measured on an H200 with a 25.8M model: 256 concurrent streams 9.5k -> 16.9k output tok/s, batch 1 0.95k ->
1.65k tok/s; benchmarks/results/serve-native-switch-interval-h200-20261202.json).
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Generator
from pathlib import Path
from typing import Any

from engine.backend import CompletionDelta, DeltaStream, EngineStats, ModelInfo, vision_inputs
from engine.build import build_engine
from engine.config import EngineConfig
from engine.errors import EngineError, EngineShutdownError, PromptTooLongError
from engine.sampling_params import SamplingParams
from engine.warmup import warm_up

GIL_SWITCH_INTERVAL_S = 0.0001  # see the module docstring
EMBED_CHUNK_TOKENS = {"cpu": 128, "other": 1024}  # tokens of one embeddings forward pass between two steps


class NativeBackend:
    def __init__(
        self,
        model: Any = None,
        *,
        served_model_name: str | None = None,
        config: EngineConfig | None = None,
        **fields: Any,
    ) -> None:
        """`model` and `fields` are `EngineConfig`'s fields (engine/config.py), or pass a whole `config`;
        `max_queue` (sequences that may wait, more give QueueFullError, HTTP 429) defaults to 1024 here."""
        if config is None:
            config = EngineConfig(model=model, **{"max_queue": 1024, **fields})
        self.core = build_engine(config)
        self.tokenizer = self.core.tokenizer
        self.vision = vision_inputs(self.core.model, config.model)
        self.info = model_info(self.core, config, served_model_name)
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        # Work for the engine thread, run between steps: (function, args, future or None).
        self._inbox: queue.SimpleQueue[tuple[Any, tuple, asyncio.Future | None]] = queue.SimpleQueue()
        # Embeddings batches in progress, oldest first (only the engine thread touches it).
        self._embeds: deque[tuple[Generator[None, None, list[list[float]]], asyncio.Future]] = deque()
        self._stop = False
        self._accepting = False
        self.error: BaseException | None = None
        self._saved_switch_interval: float | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        # Every decode shape and sampling path now, not in the first client's request (engine/warmup.py).
        await asyncio.to_thread(warm_up, self.core)
        self._loop = asyncio.get_running_loop()
        self._saved_switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._stop, self._accepting = False, True
        self._thread = threading.Thread(target=self._run, name="minimind-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting, let running requests finish for up to drain_timeout seconds, then end the rest with
        EngineShutdownError (streams send it as an error event, requests not yet answered get HTTP 503)."""
        self._accepting = False
        deadline = asyncio.get_running_loop().time() + drain_timeout
        while (self.core.has_work() or self._queues or self._embeds) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        if self._thread is not None:
            stopped = EngineShutdownError(
                f"the server shut down before this request finished (drain timeout {drain_timeout:g}s); "
                "retry it on another replica"
            )
            await self._submit(self._fail_all, stopped, wait=True)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None
        if self._saved_switch_interval is not None:
            sys.setswitchinterval(self._saved_switch_interval)
            self._saved_switch_interval = None

    def _run(self) -> None:
        while not self._stop:
            self._drain_inbox()
            embedding = self._embed_chunk()
            if not self.core.has_work():
                if not embedding:
                    self._wake.wait(0.05)
                    self._wake.clear()
                continue
            try:
                deltas = self.core.step()
            except BaseException as err:  # a broken step must not hang every waiting client
                self.error = err
                self._fail_all(err)
                continue
            if deltas and self._loop is not None:
                # One wake-up of the event loop per step, not one per stream.
                self._loop.call_soon_threadsafe(self._hand_out, deltas)
        self._drain_inbox()  # aborts sent during shutdown

    def _drain_inbox(self) -> None:
        while True:
            try:
                func, args, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                result, error = func(*args), None
            except Exception as err:  # handed to the waiting request, which raises it
                result, error = None, err
            if future is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(_settle, future, result, error)
            elif isinstance(result, list) and result and self._loop is not None:  # an abort's final deltas
                self._loop.call_soon_threadsafe(self._hand_out, result)

    def _submit(self, func: Any, *args: Any, wait: bool) -> asyncio.Future | None:
        """Run func(*args) on the engine thread between steps; with wait=True, a future of its result."""
        future = asyncio.get_running_loop().create_future() if wait else None
        self._inbox.put((func, args, future))
        self._wake.set()
        return future

    def _hand_out(self, deltas: list[CompletionDelta]) -> None:
        """On the event loop: each delta to its request's stream (gone streams are skipped)."""
        for delta in deltas:
            stream = self._queues.get(delta.request_id)
            if stream is not None:
                stream.put_nowait(delta)

    def _embed_chunk(self) -> bool:
        """One forward pass of the oldest embeddings batch; False when there is none."""
        while self._embeds and self._embeds[0][1].cancelled():  # the client left
            self._embeds.popleft()
        if not self._embeds:
            return False
        job, future = self._embeds[0]
        try:
            with self.core.lock:
                next(job)
            return True
        except StopIteration as done:
            result, error = done.value, None
        except Exception as err:  # handed to the waiting request, which raises it
            result, error = None, err
        self._embeds.popleft()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(_settle, future, result, error)
        return True

    def _fail_all(self, err: BaseException) -> None:
        failure = err
        if not isinstance(err, EngineShutdownError):
            failure = EngineError(f"the engine failed while running this request: {err}")
            failure.__cause__ = err
        for request_id, stream in list(self._queues.items()):
            self.core.abort(request_id)
            if self._loop is not None:
                self._loop.call_soon_threadsafe(stream.put_nowait, failure)
        if isinstance(err, EngineShutdownError):
            while self._embeds:
                _, future = self._embeds.popleft()
                if self._loop is not None:
                    self._loop.call_soon_threadsafe(_settle, future, None, err)

    # ---- requests -----------------------------------------------------------------------------------------------------

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str, images: Any = None
    ) -> AsyncIterator[CompletionDelta]:
        """Stream one request's deltas; raises PromptTooLongError / QueueFullError / InvalidRequestError first."""
        if not self._accepting or self._thread is None:
            raise EngineShutdownError("the engine is not running (not started, or shutting down): retry later")
        if request_id in self._queues:
            raise EngineError(f"request id {request_id!r} is already running; use a unique id")
        text, ids = self.core.encode(prompt)
        stream = DeltaStream(params.n)
        self._queues[request_id] = stream.queue
        try:
            await self._submit(self.core.add_request, request_id, ids, params, text, images, wait=True)
        except BaseException as err:
            del self._queues[request_id]
            if isinstance(err, asyncio.CancelledError):  # the client left while the request was being queued
                self._submit(self.core.abort, request_id, wait=False)
            raise
        try:
            async for item in stream:
                yield item
        finally:
            self._queues.pop(request_id, None)
            if stream.live:
                self._submit(self.core.abort, request_id, wait=False)  # client left early: free the cache now

    async def abort(self, request_id: str) -> None:
        """Finish a request now; its stream gets the final deltas (finish_reason "abort")."""
        if self._thread is None:
            self.core.abort(request_id)
            return
        self._submit(self.core.abort, request_id, wait=False)

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """Mean-pooled, L2-normalised last hidden states, one vector per prompt, computed on the engine thread a
        chunk at a time between steps (see the module docstring)."""
        for i, prompt in enumerate(prompts):
            if not 0 < len(prompt) <= self.core.max_model_len:
                raise PromptTooLongError(
                    f"input {i} has {len(prompt)} tokens; embeddings need 1 to {self.core.max_model_len} tokens",
                    param="input",
                )
        if not self._accepting or self._thread is None:
            raise EngineShutdownError("the engine is not running (not started, or shutting down): retry later")
        future = asyncio.get_running_loop().create_future()
        self._submit(self._embeds.append, (self._embed_batch(prompts), future), wait=False)
        return await future

    def _embed_batch(self, prompts: list[list[int]]) -> Generator[None, None, list[list[float]]]:
        chunk = EMBED_CHUNK_TOKENS["cpu" if self.core.device.type == "cpu" else "other"]
        vectors = []
        for prompt in prompts:
            vectors.append((yield from self.core.runner.embed_chunks(prompt, chunk)))
        return vectors

    def stats(self) -> EngineStats:
        return engine_stats(self.core)


def model_info(core: Any, config: EngineConfig, served_model_name: str | None) -> ModelInfo:
    """What /v1/models and the logs say about a native engine (in this process or in the engine process)."""
    param = next(core.model.parameters())
    path = str(config.model) if isinstance(config.model, (str, Path)) else ""
    extra: dict[str, Any] = {
        "kv_cache_slots": core.cache.num_slots,  # the most sequences that run at once
        "kv_cache_bytes": core.kv_cache_budget,
        "kv_cache_bytes_per_seq": core.kv_bytes_per_seq,
        "max_num_seqs": core.max_num_seqs,
        "max_queue_seqs": config.max_queue,  # sequences (n per request) that may wait for a slot
    }
    if core.spec is not None:
        extra["num_speculative_tokens"] = core.spec.k
    return ModelInfo(
        name=served_model_name or (path.rstrip("/").split("/")[-1] if path else "minimind"),
        path=path,
        max_model_len=core.max_model_len,
        vocab_size=core.model.config.vocab_size,
        backend="native",
        device=str(param.device),
        dtype=str(param.dtype).replace("torch.", ""),
        extra=extra,
    )


def engine_stats(core: Any) -> EngineStats:
    return core.stats()


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
