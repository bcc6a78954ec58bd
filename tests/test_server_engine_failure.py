"""An engine step that fails mid-stream: the client gets an error event, then `data: [DONE]`, and the server lives on.

The app and the native backend are the real ones, served by uvicorn on 127.0.0.1 in this process, so that one
engine step can be made to fail (a fault injected into `core.step`, as a CUDA error or out-of-memory would).
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from engine.backends.native import NativeBackend
from server.app import create_app
from server.settings import Settings
from tests.test_server_support import free_port, needs_own_server, tiny_model_dir

MESSAGES = [{"role": "user", "content": "hi"}]


class FailingSteps:
    """Wraps the engine's step(): the `fail_at`-th call from now raises, every other call runs normally."""

    def __init__(self, step) -> None:
        self.step, self.calls, self.fail_at = step, 0, None

    def arm(self, after: int) -> None:
        self.calls, self.fail_at = 0, after

    def __call__(self):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            self.fail_at = None
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        return self.step()


@pytest.fixture(scope="module")
def live():
    needs_own_server("a fault injected into the engine")
    backend = NativeBackend(str(tiny_model_dir()), device="cpu", max_model_len=256, max_num_seqs=4)
    steps = FailingSteps(backend.core.step)
    backend.core.step = steps
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(backend, Settings()), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "in-process server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", steps
    server.should_exit = True
    thread.join(30)


def test_raw_stream_ends_with_an_error_event_then_done(live):
    url, steps = live
    steps.arm(after=6)  # prefill and a few tokens, then the failure
    # Seeded: unseeded, a random tiny model's first tokens could all be pieces of one UTF-8 character (no content
    # yet); greedy, it repeats one special token (no content at all).
    body = {"messages": MESSAGES, "max_tokens": 50, "stream": True, "ignore_eos": True, "seed": 1}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "illegal memory access" in error["message"] and set(error) == {"message", "type", "param", "code"}
    chunks = [json.loads(e) for e in events[:-2]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert any(c["choices"][0]["delta"].get("content") for c in chunks[1:])  # it failed mid-stream
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)


def test_sdk_raises_and_the_next_request_succeeds(live):
    url, steps = live
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    before = aborted(url)
    steps.arm(after=3)
    stream = client.chat.completions.create(
        model="tiny-minimind", messages=MESSAGES, max_tokens=50, stream=True, extra_body={"ignore_eos": True}
    )
    with pytest.raises(openai.APIError, match="illegal memory access"):
        for _ in stream:
            pass
    out = client.chat.completions.create(
        model="tiny-minimind", messages=MESSAGES, max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
    assert aborted(url) == before + 1  # the failed request, counted as finished with reason "abort" (as vLLM does)


def aborted(url: str) -> float:
    lines = httpx.get(url + "/metrics").text.splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("minimind:request_success_total{") and 'finished_reason="abort"' in line
    )


def test_responses_stream_ends_with_response_failed(live):
    """/v1/responses: an engine failure midway ends the stream with a response.failed event carrying the error."""
    url, steps = live
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    steps.arm(after=3)
    events = list(client.responses.create(model="tiny-minimind", input="hi", max_output_tokens=50, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.failed"
    failed = events[-1].response
    assert failed.status == "failed" and "illegal memory access" in failed.error.message
    assert failed.id == events[0].response.id
    out = client.responses.create(model="tiny-minimind", input="hi", max_output_tokens=3)
    assert out.usage.output_tokens == 3  # the server lives on
