"""`--api-server-count N`: N API processes answer HTTP on one port, all fed by the one engine process.

The launching process has bound the port (server/listen.py): on Linux one socket per API process, all on the
port with SO_REUSEPORT, so the kernel spreads new connections evenly over the processes; elsewhere one socket that
they all accept from. Each API process runs uvicorn on its socket; the launcher closes its own copies once the
processes hold theirs, so a process that dies takes its socket out of the port's group. Every API process talks
to the engine over its own ZMQ socket (engine/backends/remote.py) and holds the engine's death pipe.

Signals: the API processes leave the terminal's process group, so Ctrl-C reaches only the launcher; the launcher
forwards SIGTERM/SIGINT to each API process (which then drains, server/drain.py; a second signal stops them at
once) and stops the engine once they have all exited. Metrics of all API processes are summed through
prometheus_client's multiprocess mode (server/metrics.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from server.settings import Settings

log = logging.getLogger("minimind.server")


def run_api_processes(settings: Settings, socks: list[socket.socket], engine: Any) -> None:
    """Start settings.api_server_count API processes, process i on socks[i] (or all on the one socket given), and
    wait for all of them to exit."""
    metrics = tempfile.TemporaryDirectory(prefix="minimind-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics.name  # inherited by the API processes before they import it
    context = multiprocessing.get_context("spawn")
    ready = ReadyCount(context.Value("i", 0), settings.api_server_count)
    processes = [
        context.Process(
            target=api_process,
            args=(settings, socks[index % len(socks)], engine.address, engine.death, index, ready),
            name=f"minimind-api-{index}",
        )
        for index in range(settings.api_server_count)
    ]
    for process in processes:
        process.start()  # the child has its copy of the socket once start() returns
    for sock in socks:
        sock.close()

    def forward(sig: int, frame: Any) -> None:
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while any(process.is_alive() for process in processes):
            for process in processes:
                process.join(0.2)
        failed = [p for p in processes if p.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT)]
        for process in failed:
            log.error("API process %s exited with code %s", process.name, process.exitcode)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for process in processes:
            if process.is_alive():
                process.kill()
        metrics.cleanup()


class ReadyCount:
    """How many of the API processes have started and warmed up (shared memory). Each one's /health says "ok" only
    once all have: a client that begins at the first "ok" must not meet a process still starting (its first
    requests would wait for it, and the others' start-up shares the CPU with them)."""

    def __init__(self, value: Any, total: int) -> None:
        self.value, self.total = value, total

    def mark_ready(self) -> None:
        with self.value.get_lock():
            self.value.value += 1

    def all_ready(self) -> bool:
        return self.value.value >= self.total


def api_process(
    settings: Settings, sock: socket.socket, address: str, death: Connection, index: int, ready: ReadyCount
) -> None:
    """One API process: the app around a RemoteBackend, served on its socket."""
    os.setpgrp()  # Ctrl-C goes to the launcher, which forwards it once (see the module docstring)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    watch_parent()
    from engine.backends.remote import RemoteBackend
    from server.http_server import run_api_server

    run_api_server(RemoteBackend(address, death), settings, sock, announce=index == 0, peers=ready)


def watch_parent() -> None:
    """Exit if the launcher dies without stopping us (killed): an orphan would keep answering on the port."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="minimind-parent-watch", daemon=True).start()
