"""RemoteBackend: the Backend protocol (engine/backend.py) in an API process, served by the engine process.

Each API process has one ZMQ DEALER socket to the engine process (engine/backends/engine_process.py). A request
is an `AddRequest` message; its acknowledgement (or refusal: 429, 400...) comes back in the engine's next
`Outputs` message, and from then on its deltas, one message per engine step for all of this process's streams.
A reader task hands each delta to its request's asyncio queue. Leaving `generate()` early (the client went away)
sends an `Abort`, which the engine applies before its next step.

The engine process's death pipe (its end-of-file) marks the backend dead: every running request fails with an
error, new ones get 503, and /health answers 503.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

import zmq
import zmq.asyncio

from engine.backend import CompletionDelta, DeltaStream, EngineStats
from engine.backends import wire
from engine.errors import EngineError, EngineShutdownError, PromptTooLongError
from engine.sampling_params import SamplingParams

HANDSHAKE_TIMEOUT_S = 600.0  # the engine answers Hello once loaded and warmed up
STATS_TIMEOUT_S = 2.0


class RemoteBackend:
    def __init__(self, address: str, death: Connection | None = None, owner: Any = None) -> None:
        """Connect to the engine process at `address` and read its model info (blocks until the engine serves).
        `owner`: the EngineProcess, when this backend is its only user and stops it at shutdown."""
        self.address, self.death, self.owner = address, death, owner
        self.dead: str | None = None  # why the engine is gone, once it is
        self.info, self.tokenizer, self.vision = self._handshake()
        self._tag = f"{os.getpid()}-{id(self):x}"  # request ids are made unique across API processes
        self._queues: dict[str, asyncio.Queue] = {}
        self._acks: dict[str, asyncio.Future] = {}
        self._embeds: dict[int, asyncio.Future] = {}
        self._stats_waiters: list[asyncio.Future] = []
        self._stats = EngineStats(running=0, waiting=0, cache_usage=0.0, free_slots=0)
        self._job_ids = itertools.count()
        self._accepting = False
        self._socket: Any = None
        self._reader: asyncio.Task | None = None

    def _handshake(self) -> tuple[Any, Any, Any]:
        socket = zmq.Context.instance().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.connect(self.address)
            socket.send(wire.encoder.encode(wire.Hello()))
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
            while not socket.poll(1000):
                if self.death is not None and self.death.poll(0):
                    raise EngineError("the engine process exited before it answered; its log says why")
                if time.monotonic() > deadline:
                    raise EngineError(f"the engine process did not answer within {HANDSHAKE_TIMEOUT_S:g}s")
            return wire.engine_info.decode(socket.recv()).unpack()
        finally:
            socket.close()

    # ---- lifecycle --------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(self.address)
        self._reader = asyncio.create_task(self._read())
        if self.death is not None:
            loop.add_reader(self.death.fileno(), self._engine_died)
        self._accepting = True

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting, let this process's requests finish for up to drain_timeout seconds, then end the rest
        with EngineShutdownError. The engine process itself is stopped by whoever started it."""
        self._accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        while (self._queues or self._embeds) and loop.time() < deadline and self.dead is None:
            await asyncio.sleep(0.01)
        if self._queues:
            self._send(wire.Abort([*self._queues]))
            self._fail_all(
                EngineShutdownError(
                    f"the server shut down before this request finished (drain timeout {drain_timeout:g}s); "
                    "retry it on another replica"
                )
            )
        if drain_timeout == 0:
            return  # the drain's early end (server/drain.py): the server still answers, the socket stays
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        if self.death is not None and self.dead is None:
            loop.remove_reader(self.death.fileno())
        if self._socket is not None:
            self._socket.close()
            self._context.term()
            self._socket = None
        if self.owner is not None:  # uvicorn ends the process with the signal right after: stop the engine now
            await asyncio.to_thread(self.owner.stop)

    def _engine_died(self) -> None:
        asyncio.get_running_loop().remove_reader(self.death.fileno())
        self.dead = "the engine process exited; restart the server (its log says why the engine stopped)"
        self._fail_all(EngineError(self.dead))

    def _fail_all(self, err: EngineError) -> None:
        for stream in self._queues.values():
            stream.put_nowait(err)
        for future in [*self._acks.values(), *self._embeds.values(), *self._stats_waiters]:
            if not future.done():
                future.set_exception(err)
        self._acks.clear()
        self._embeds.clear()
        self._stats_waiters.clear()

    # ---- the channel ------------------------------------------------------------------------------------------------

    def _send(self, message: Any) -> None:
        self._socket.send(wire.encoder.encode(message))

    async def _read(self) -> None:
        while True:
            out = wire.outputs.decode(await self._socket.recv(copy=False))
            for ack in out.acks:
                future = self._acks.pop(ack.request_id, None)
                if future is not None and not future.done():
                    if ack.error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(ack.error.to_exception())
            for delta in out.deltas:
                stream = self._queues.get(delta.request_id)
                if stream is not None:
                    stream.put_nowait(delta)
            for failed in out.failed:
                stream = self._queues.get(failed.request_id)
                if stream is not None:
                    stream.put_nowait(
                        EngineError(f"the engine failed while running this request: {failed.error.message}")
                    )
            for done in out.embeds:
                future = self._embeds.pop(done.job_id, None)
                if future is not None and not future.done():
                    if done.error is None:
                        future.set_result(done.vectors)
                    else:
                        future.set_exception(done.error.to_exception())
            if out.stats is not None:
                self._stats = out.stats
                for future in self._stats_waiters:
                    if not future.done():
                        future.set_result(None)
                self._stats_waiters.clear()

    def _check_running(self) -> None:
        if self.dead is not None:
            raise EngineShutdownError(self.dead)
        if not self._accepting or self._socket is None:
            raise EngineShutdownError("the engine is not running (not started, or shutting down): retry later")

    # ---- requests ---------------------------------------------------------------------------------------------------

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str, images: Any = None
    ) -> AsyncIterator[CompletionDelta]:
        """Stream one request's deltas; raises PromptTooLongError / QueueFullError / InvalidRequestError first."""
        self._check_running()
        key = f"{self._tag}-{request_id}"
        if key in self._queues:
            raise EngineError(f"request id {request_id!r} is already running; use a unique id")
        text, ids = (prompt, self.tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else (None, prompt)
        stream = DeltaStream(params.n)
        ack = asyncio.get_running_loop().create_future()
        self._queues[key], self._acks[key] = stream.queue, ack
        tensor = wire.Tensor.of(images) if images is not None else None
        self._send(wire.AddRequest(key, list(ids), params, text, tensor))
        try:
            await ack
        except BaseException as err:
            self._queues.pop(key, None)
            self._acks.pop(key, None)
            if isinstance(err, asyncio.CancelledError) and self.dead is None:  # left while being queued
                self._send(wire.Abort([key]))
            raise
        try:
            async for item in stream:
                item.request_id = request_id
                yield item
        finally:
            self._queues.pop(key, None)
            if stream.live and self.dead is None and self._socket is not None:
                self._send(wire.Abort([key]))  # the client left early: free the cache before the next step

    async def abort(self, request_id: str) -> None:
        if self.dead is None and self._socket is not None:
            self._send(wire.Abort([f"{self._tag}-{request_id}"]))

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        for i, prompt in enumerate(prompts):
            if not 0 < len(prompt) <= self.info.max_model_len:
                raise PromptTooLongError(
                    f"input {i} has {len(prompt)} tokens; embeddings need 1 to {self.info.max_model_len} tokens",
                    param="input",
                )
        self._check_running()
        job_id = next(self._job_ids)
        future = self._embeds[job_id] = asyncio.get_running_loop().create_future()
        self._send(wire.Embed(job_id, prompts))
        try:
            return await future
        finally:
            self._embeds.pop(job_id, None)

    def stats(self) -> EngineStats:
        """The engine's numbers as of its last message (`refresh_stats()` asks for new ones)."""
        return self._stats

    async def refresh_stats(self) -> None:
        """Ask the engine for its current numbers (before a /metrics scrape); keeps the old ones if it is gone."""
        if self.dead is not None or self._socket is None:
            return
        future = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(future)
        self._send(wire.GetStats())
        try:
            await asyncio.wait_for(future, STATS_TIMEOUT_S)
        except (TimeoutError, EngineError):
            pass
