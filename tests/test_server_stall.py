"""Heavy requests must not stop the streams that are running: tokenizing and chat templates run in a worker
pool, embeddings a chunk at a time between engine steps.

While one long stream runs, each disturbance below is sent and the largest gap between two stream events
during it is measured: it must stay under STALL_LIMIT_S (the disturbances themselves take seconds, which is
what a stream used to wait for).
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.test_server_support import LONG_CONTEXT, long_context_model_dir, needs_own_server, start_server

STALL_LIMIT_S = 0.5
FIVE_MB_PROMPT = "hello world, " * (5_000_000 // 13)
# two nested loops: seconds of template work (three would run for hours)
SLOW_TEMPLATE = (
    "{% for i in range(5000) %}{% for j in range(5000) %}{% endfor %}{% endfor %}{{ messages[0]['content'] }}"
)
EMBED_BATCH = [[100 + i] * 4000 for i in range(24)]  # 24 inputs x 4000 tokens


@pytest.fixture(scope="module")
def server():
    needs_own_server("a server that trusts request templates and takes 5 MB bodies")
    return start_server(
        "--max-model-len",
        str(LONG_CONTEXT),
        "--max-request-bytes",
        "8MiB",
        "--trust-request-chat-template",
        "--max-num-seqs",
        "4",
        model=long_context_model_dir(),
    )


class Stream:
    """A long completion stream read in a thread, recording when each event arrives."""

    def __init__(self, server) -> None:
        self.arrivals: list[float] = []
        self.client = httpx.Client(timeout=300)
        body = {"prompt": "hi", "max_tokens": LONG_CONTEXT - 16, "ignore_eos": True, "stream": True}
        self.response = self.client.send(
            self.client.build_request("POST", server.base_url + "/completions", json=body), stream=True
        )
        assert self.response.status_code == 200
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for line in self.response.iter_lines():
                if line.startswith("data: {"):
                    self.arrivals.append(time.monotonic())
        except httpx.HTTPError:
            pass  # closed by close()

    def wait_flowing(self, events: int = 20) -> None:
        deadline = time.monotonic() + 60
        while len(self.arrivals) < events:
            assert time.monotonic() < deadline, "the stream did not start"
            time.sleep(0.05)

    def largest_gap(self, start: float, end: float) -> float:
        """Largest time without an event inside [start, end], the interval's edges included."""
        times = [start] + [t for t in list(self.arrivals) if start < t < end] + [end]
        return max(b - a for a, b in zip(times, times[1:]))

    def close(self) -> None:
        self.response.close()
        self.client.close()
        self.thread.join(10)


# Each disturbance sends its request and returns the response; it is checked once the measurement is over
# (parsing a large answer in this process would hold its GIL and delay the stream reader, not the server).


def tokenize_5mb(server) -> httpx.Response:
    return httpx.post(server.url + "/tokenize", json={"prompt": FIVE_MB_PROMPT}, timeout=300)


def check_tokenize_5mb(server, response: httpx.Response) -> None:
    assert response.json()["count"] > 1_000_000


def request_template(server) -> httpx.Response:
    body = {
        "messages": [{"role": "user", "content": "hello"}],
        "chat_template_kwargs": {"chat_template": SLOW_TEMPLATE},
    }
    return httpx.post(server.url + "/tokenize", json=body, timeout=300)


def check_request_template(server, response: httpx.Response) -> None:
    plain = httpx.post(server.url + "/tokenize", json={"prompt": "hello", "add_special_tokens": False}).json()
    assert response.json()["tokens"] == plain["tokens"]  # the request's template made the prompt


def embeddings_batch(server) -> httpx.Response:
    return httpx.post(server.base_url + "/embeddings", json={"input": EMBED_BATCH}, timeout=300)


def check_embeddings_batch(server, response: httpx.Response) -> None:
    assert len(response.json()["data"]) == len(EMBED_BATCH)


@pytest.mark.parametrize(
    "send, check",
    [
        (tokenize_5mb, check_tokenize_5mb),
        (request_template, check_request_template),
        (embeddings_batch, check_embeddings_batch),
    ],
    ids=["5MB-tokenize", "template", "embeddings"],
)
def test_a_heavy_request_does_not_stall_a_running_stream(server, send, check):
    stream = Stream(server)
    try:
        stream.wait_flowing()
        start = time.monotonic()
        response = send(server)
        end = time.monotonic()
        assert stream.thread.is_alive(), "the stream ended during the disturbance"
        gap = stream.largest_gap(start, end)
    finally:
        stream.close()
    assert response.status_code == 200, response.text[:300]
    check(server, response)
    # the disturbance took long enough that a stall would show (the old server stopped streams for all of it)
    assert end - start > 2 * STALL_LIMIT_S, f"the disturbance took only {end - start:.2f}s"
    assert gap < STALL_LIMIT_S, f"the stream stalled {gap:.2f}s while the request ran ({end - start:.1f}s)"
