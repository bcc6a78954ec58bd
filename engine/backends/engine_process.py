"""The native engine in a process of its own, so that stepping it never waits for the GIL of HTTP work.

`EngineProcess.start(config)` spawns the process; it loads the model, warms it up (engine/warmup.py) and then
runs `EngineLoop`: between two steps it reads every message the API processes sent (new requests, aborts,
embeddings), then steps the engine and sends each API process one `Outputs` message with all of that step's
deltas for its streams (engine/backends/wire.py). An abort therefore takes effect before the next step.

The process reports over a one-way pipe: ("ready",) once it serves, or ("error", message) if loading failed.
The pipe's read end doubles as the death notice: when the engine process exits, for whatever reason, the pipe
reaches end-of-file in every API process that holds it (engine/backends/remote.py turns that into HTTP 503).

The engine process ignores SIGINT (Ctrl-C reaches the whole terminal's process group, but the API processes
must drain first); whoever started it stops it with `stop()`, and it exits by itself when its parent dies.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import tempfile
from collections import deque
from collections.abc import Generator
from multiprocessing.connection import Connection
from typing import Any

import msgspec
import zmq

from engine.backend import EngineStats, vision_inputs
from engine.backends import wire
from engine.backends.native import EMBED_CHUNK_TOKENS, engine_stats, model_info
from engine.build import build_engine
from engine.config import EngineConfig
from engine.errors import EngineError
from engine.warmup import freeze_heap, warm_up

log = logging.getLogger("minimind.engine")

IDLE_POLL_MS = 100  # how long an idle engine blocks on its socket before checking that its parent lives


class EngineProcess:
    """The handle the launching process keeps: the socket address, the death pipe, stop()."""

    def __init__(self, process: Any, address: str, death: Connection, folder: tempfile.TemporaryDirectory) -> None:
        self.process, self.address, self.death, self._folder = process, address, death, folder

    @classmethod
    def start(
        cls, config: EngineConfig, served_model_name: str | None = None, log_level: str = "info"
    ) -> EngineProcess:
        folder = tempfile.TemporaryDirectory(prefix="minimind-engine-")  # private (0700): only we reach the socket
        address = f"ipc://{folder.name}/engine.sock"
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked CUDA or thread state
        death, notice = context.Pipe(duplex=False)
        process = context.Process(
            target=run_engine,
            args=(config, served_model_name, address, notice, log_level),
            name="minimind-engine",
        )
        process.start()
        notice.close()  # only the engine holds the write end now: its exit is our end-of-file
        return cls(process, address, death, folder)

    def wait_ready(self) -> None:
        """Block until the engine serves; raise EngineError with the engine's own message if it failed."""
        while True:
            if self.death.poll(1.0):
                try:
                    message = self.death.recv()
                except EOFError:
                    self.process.join(5)
                    raise EngineError(
                        f"the engine process exited during start-up (exit code {self.process.exitcode}); "
                        "its log above says why"
                    ) from None
                if message[0] == "ready":
                    return
                raise EngineError(message[1])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine process (running requests end); safe to call more than once."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self._folder.cleanup()


def run_engine(
    config: EngineConfig, served_model_name: str | None, address: str, notice: Connection, log_level: str
) -> None:
    """The engine process's main function."""
    os.setpgrp()  # out of the terminal's process group: Ctrl-C goes to the launcher, which drains first
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        core = build_engine(config)
        warm_up(core)
        loop = EngineLoop(core, address, engine_info(core, config, served_model_name))
    except Exception as err:  # the launcher prints it as the CLI's error
        notice.send(("error", str(err) or type(err).__name__))
        raise SystemExit(1) from None
    freeze_heap("engine process")
    notice.send(("ready",))
    loop.run()


def engine_info(core: Any, config: EngineConfig, served_model_name: str | None) -> bytes:
    """The encoded handshake answer (wire.EngineInfo) for this engine."""
    info = wire.EngineInfo(
        info=pickle.dumps(model_info(core, config, served_model_name)),
        tokenizer=pickle.dumps(core.tokenizer),
        vision=pickle.dumps(vision_inputs(core.model, config.model)),
        pid=os.getpid(),
    )
    return wire.encoder.encode(info)


class EngineLoop:
    """Receive, step, send: one iteration per engine step (see the module docstring)."""

    def __init__(self, core: Any, address: str, info: bytes) -> None:
        self.core, self.info = core, info
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(address)
        self.owners: dict[str, list] = {}  # request id -> [API process identity, completions still running]
        self.embeds: deque[tuple[bytes, int, Generator[None, None, list[list[float]]]]] = deque()
        self.pending: dict[bytes, wire.Outputs] = {}  # what this iteration has for each API process
        self.embed_chunk = EMBED_CHUNK_TOKENS["cpu" if core.device.type == "cpu" else "other"]
        self.stopped = False  # set from another thread to end run() (tests run the loop in a thread)

    def run(self) -> None:
        parent = os.getppid()
        while not self.stopped:
            busy = self.core.has_work() or bool(self.embeds)
            if self.socket.poll(0 if busy else IDLE_POLL_MS):
                self.receive()
            elif not busy and os.getppid() != parent:
                return  # the launcher died without stopping us
            self.embed_one_chunk()
            if self.core.has_work():
                self.step()
            self.send()

    # ---- in ----------------------------------------------------------------------------------------------------------

    def receive(self) -> None:
        while True:
            try:
                identity, payload = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = wire.to_engine.decode(payload)
            except msgspec.DecodeError as err:
                log.error("dropped a malformed message from an API process: %s", err)
                continue
            if isinstance(message, wire.AddRequest):
                self.add(identity, message)
            elif isinstance(message, wire.Abort):
                for request_id in message.request_ids:
                    self.route(self.core.abort(request_id))
            elif isinstance(message, wire.Embed):
                self.embeds.append((identity, message.job_id, self.embed_batch(message.prompts)))
            elif isinstance(message, wire.GetStats):
                self.outputs(identity).stats = self.stats()
            elif isinstance(message, wire.Hello):
                self.socket.send_multipart([identity, self.info])

    def add(self, identity: bytes, message: wire.AddRequest) -> None:
        images = message.images.to_torch() if message.images is not None else None
        try:
            self.core.add_request(message.request_id, message.prompt_token_ids, message.params, message.prompt, images)
        except Exception as err:  # refused: the API process raises it from generate()
            self.outputs(identity).acks.append(wire.Ack(message.request_id, wire.ErrorInfo.of(err)))
            return
        self.owners[message.request_id] = [identity, message.params.n]
        self.outputs(identity).acks.append(wire.Ack(message.request_id))

    # ---- work --------------------------------------------------------------------------------------------------------

    def step(self) -> None:
        try:
            deltas = self.core.step()
        except Exception as err:  # a broken step must not hang every waiting client; the engine lives on
            log.exception("an engine step failed; ending every running request")
            self.fail_all(err)
            return
        self.route(deltas)

    def fail_all(self, err: BaseException) -> None:
        error = wire.ErrorInfo("EngineError", str(err) or type(err).__name__)
        for request_id, (identity, _) in list(self.owners.items()):
            self.core.abort(request_id)
            self.outputs(identity).failed.append(wire.Failed(request_id, error))
        self.owners.clear()

    def embed_one_chunk(self) -> None:
        """One forward pass of the oldest embeddings batch, between two steps (as the in-process backend does)."""
        if not self.embeds:
            return
        identity, job_id, job = self.embeds[0]
        try:
            with self.core.lock:
                next(job)
            return
        except StopIteration as done:
            result = wire.EmbedDone(job_id, vectors=done.value)
        except Exception as err:
            result = wire.EmbedDone(job_id, error=wire.ErrorInfo.of(err))
        self.embeds.popleft()
        self.outputs(identity).embeds.append(result)

    def embed_batch(self, prompts: list[list[int]]) -> Generator[None, None, list[list[float]]]:
        vectors = []
        for prompt in prompts:
            vectors.append((yield from self.core.runner.embed_chunks(prompt, self.embed_chunk)))
        return vectors

    # ---- out ---------------------------------------------------------------------------------------------------------

    def route(self, deltas: list) -> None:
        """Each delta to the pending Outputs of the API process that owns its request."""
        for delta in deltas:
            owner = self.owners.get(delta.request_id)
            if owner is None:
                continue
            self.outputs(owner[0]).deltas.append(delta)
            if delta.finished:
                owner[1] -= 1
                if owner[1] == 0:
                    del self.owners[delta.request_id]

    def outputs(self, identity: bytes) -> wire.Outputs:
        out = self.pending.get(identity)
        if out is None:
            out = self.pending[identity] = wire.Outputs(deltas=[], acks=[], failed=[], embeds=[])
        return out

    def send(self) -> None:
        if not self.pending:
            return
        stats = self.stats()
        for identity, out in self.pending.items():
            out.stats = stats
            self.socket.send_multipart([identity, wire.encoder.encode(out)])
        self.pending = {}

    def stats(self) -> EngineStats:
        return engine_stats(self.core)
