"""Concurrency through the live server: 64 streams at once, disconnect frees the slot, SIGTERM drains."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.test_server_support import (
    LAYOUTS,
    LONG_CONTEXT,
    MODEL_NAME,
    layout_flags,
    long_context_model_dir,
    main_server,
    metric,
    start_server,
)

MESSAGES = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module", params=list(LAYOUTS))
def server(request):
    return main_server(request.param)


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll until condition() holds (a bounded wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        time.sleep(0.1)


def test_64_concurrent_streams_complete_without_errors(server):
    async def go():
        client = openai.AsyncOpenAI(
            base_url=server.base_url, api_key=server.api_key or "none", max_retries=0, timeout=300
        )

        async def one(i: int) -> tuple[str, int]:
            stream = await client.chat.completions.create(
                model=server.model,
                messages=[{"role": "user", "content": f"Story number {i}"}],
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            finish, tokens = None, 0
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            return finish, tokens

        results = await asyncio.gather(*(one(i) for i in range(64)))
        await client.close()
        return results

    before = metric(server, "minimind:generation_tokens_total")
    results = asyncio.run(go())
    assert results == [("length", 8)] * 64
    assert metric(server, "minimind:generation_tokens_total") - before == 64 * 8
    wait_for(lambda: metric(server, "minimind:num_requests_running") == 0, what="all requests leaving the batch")


def test_disconnect_frees_the_engine_slot(server):
    """A client that goes away mid-stream: its request leaves the running batch (seen in /metrics)."""
    wait_for(lambda: metric(server, "minimind:num_requests_running") == 0, what="an idle engine")
    aborted_before = _aborted(server)
    # long enough to still be running when the client leaves, even on a fast GPU (an external server)
    max_tokens = 200 if not server.external else server.max_model_len - 64
    body = {
        "model": server.model,
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.base_url + "/chat/completions", json=body, headers=headers) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]  # the role chunk and a few tokens
            assert metric(server, "minimind:num_requests_running") == 1
        # leaving the `with` closes the connection mid-stream
    assert any(line.startswith("data: ") for line in received)
    wait_for(lambda: metric(server, "minimind:num_requests_running") == 0, what="the slot being freed")
    wait_for(lambda: _aborted(server) == aborted_before + 1, what="the request counted as aborted")


def _aborted(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("minimind:request_success_total{") and 'finished_reason="abort"' in line
    )


@pytest.mark.parametrize("layout", ["in-process", "api-4"])
def test_sigterm_drains_running_requests_then_exits(layout):
    """SIGTERM: the running stream still finishes, new requests are refused, the process exits cleanly."""
    server = start_server("--drain-timeout", "60", *layout_flags(layout), fresh=True)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    outcome: dict[str, object] = {}
    started = threading.Event()

    def long_request() -> None:
        stream = client.completions.create(
            model=MODEL_NAME, prompt="hello", max_tokens=150, stream=True, extra_body={"ignore_eos": True}
        )
        for chunk in stream:
            started.set()
            if chunk.choices and chunk.choices[0].finish_reason:
                outcome["finish"] = chunk.choices[0].finish_reason

    worker = threading.Thread(target=long_request)
    worker.start()
    assert started.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: _refused(server), timeout=30, what="new requests being refused")
    worker.join(120)
    assert outcome.get("finish") == "length"
    # uvicorn re-raises the signal once shut down, so the exit status is "terminated by SIGTERM"
    assert server.proc.wait(60) in (0, -signal.SIGTERM)
    assert "Traceback" not in server.log_tail()


def _refused(server) -> bool:
    """/health answers 503 (through the listening socket, which stays open while draining)."""
    return httpx.get(server.url + "/health", timeout=5).status_code == 503


@pytest.mark.parametrize("layout", ["in-process", "api-4"])
def test_sigterm_past_the_drain_timeout_ends_every_request_with_an_error(layout):
    """A stream still running when --drain-timeout ends gets an error event and [DONE]; a request still
    waiting for a slot gets 503; while draining, new requests get 503 (not a refused connection)."""
    server = start_server(
        "--drain-timeout",
        "2",
        "--max-num-seqs",
        "1",
        "--max-model-len",
        str(LONG_CONTEXT),
        *layout_flags(layout),
        fresh=True,
        model=long_context_model_dir(),
    )
    long = {"prompt": "hello", "max_tokens": LONG_CONTEXT - 16, "ignore_eos": True}
    events: list[str] = []
    waiting: dict[str, httpx.Response] = {}

    def stream() -> None:
        with httpx.stream("POST", server.base_url + "/completions", json={**long, "stream": True}, timeout=120) as r:
            events.extend(line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: "))

    def queued() -> None:  # the one batch slot is taken: this one waits
        waiting["response"] = httpx.post(server.base_url + "/completions", json=long, timeout=120)

    streamer = threading.Thread(target=stream)
    streamer.start()
    wait_for(lambda: metric(server, "minimind:num_requests_running") == 1, what="the stream running")
    waiter = threading.Thread(target=queued)
    waiter.start()
    wait_for(lambda: metric(server, "minimind:num_requests_waiting") == 1, what="a request waiting")
    server.proc.send_signal(signal.SIGTERM)

    wait_for(lambda: _refused(server), timeout=10, what="/health turning 503")
    new = httpx.post(server.base_url + "/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
    assert new.status_code == 503 and new.json()["error"]["type"] == "service_unavailable"
    assert int(new.headers["retry-after"]) >= 1

    streamer.join(60)
    waiter.join(60)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "server_shutting_down" and "drain timeout" in error["message"]
    chunks = [json.loads(e) for e in events[:-2]]
    assert len(chunks) > 1 and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert waiting["response"].status_code == 503
    assert waiting["response"].json()["error"]["code"] == "server_shutting_down"
    assert server.proc.wait(60) in (0, -signal.SIGTERM)
    assert "Traceback" not in server.log_tail()
