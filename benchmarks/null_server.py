"""A streaming completions server that does no work: the most a load client can take in on this machine.

`vllm bench serve` is one Python process, and it parses every SSE event. Past some tens of thousands of events a
second the client, not the server, sets the pace; a server measured near that figure says little about itself.
Run against this server, the client measures its own ceiling for the workload at hand, in the same run as the
servers it measures.

Each worker answers POST /v1/completions (any body with `max_tokens`) with that many tokens as pre-encoded SSE
events of `tokens_per_event` tokens each (as a server started with --stream-interval sends them): one event to every
open stream per turn of its event loop, as a real server sends one per engine step, then the usage event and
`[DONE]`. Any GET answers 200 with `{}` (health checks).

HTTP/1.1 (keep-alive, chunked) is written by hand here on purpose: a web framework would spend time per event,
which is exactly what this server exists not to do. Several worker processes share the port (SO_REUSEPORT), so the
server side is never the one that is busy.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import socket
import time

EVENT = (
    'data: {"id":"cmpl-null","object":"text_completion","created":0,"model":"m","choices":'
    '[{"index":0,"text":"%s","logprobs":null,"finish_reason":null}]}\n\n'
)
USAGE = (
    'data: {"id":"cmpl-null","object":"text_completion","created":0,"model":"m","choices":[],'
    '"usage":{"prompt_tokens":0,"completion_tokens":%d,"total_tokens":%d}}\n\ndata: [DONE]\n\n'
)
STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
EMPTY_JSON = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class Stream:
    def __init__(self, writer: asyncio.StreamWriter, tokens: int) -> None:
        self.writer, self.left, self.done = writer, tokens, asyncio.get_running_loop().create_future()


async def serve(sock: socket.socket, tokens_per_event: int) -> None:
    streams: list[Stream] = []
    wake = asyncio.Event()
    events = {n: chunk((EVENT % (" x" * n)).encode()) for n in range(1, tokens_per_event + 1)}

    async def pump() -> None:
        while True:
            if not streams:
                wake.clear()
                await wake.wait()
            await asyncio.sleep(0)  # one turn: new requests and the client's reads get in between
            for stream in list(streams):
                n = min(tokens_per_event, stream.left)
                stream.writer.write(events[n])
                stream.left -= n
                if stream.left == 0:
                    streams.remove(stream)
                    stream.done.set_result(None)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: one request after another on this connection
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                if not head.startswith(b"POST"):
                    writer.write(EMPTY_JSON)
                    continue
                tokens = int(json.loads(body).get("max_tokens") or 16)
                writer.write(STREAM_HEAD)
                stream = Stream(writer, tokens)
                streams.append(stream)
                wake.set()
                await stream.done
                writer.write(chunk((USAGE % (tokens, tokens)).encode()) + b"0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            writer.close()

    asyncio.get_running_loop().create_task(pump())
    server = await asyncio.start_server(handle, sock=sock, backlog=4096)
    async with server:
        await server.serve_forever()


def worker(port: int, tokens_per_event: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    asyncio.run(serve(sock, tokens_per_event))


class NullServer:
    """`workers` processes on 127.0.0.1:`port`; use as a context manager (stops them on exit)."""

    def __init__(self, port: int, tokens_per_event: int = 1, workers: int = 4) -> None:
        if tokens_per_event < 1:
            raise ValueError(f"tokens_per_event must be 1 or more, got {tokens_per_event}")
        context = multiprocessing.get_context("spawn")
        self.port = port
        self.processes = [
            context.Process(target=worker, args=(port, tokens_per_event), daemon=True) for _ in range(workers)
        ]

    def __enter__(self) -> NullServer:
        for process in self.processes:
            process.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # every worker binds on its own: wait until one answers
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"the null server did not listen on port {self.port} within 30 s")

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.join(5)
