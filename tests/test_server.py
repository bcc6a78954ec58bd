"""The real OpenAI Python SDK (sync and async) against a live `minimind serve` with a tiny model.

Also the client suite for any running server: MINIMIND_TEST_BASE_URL (see tests/test_server_support.py).
"""

from __future__ import annotations

import asyncio
import base64
import math

import httpx
import numpy as np
import openai
import pytest

from tests.test_server_support import LAYOUTS, main_server, metric

MESSAGES = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module", params=list(LAYOUTS))
def server(request):
    return main_server(request.param)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key or "none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(server) -> str:
    return server.model


@pytest.fixture(scope="module")
def sampled_text(client, model) -> str:
    """A seeded 24-token answer (reproducible), the reference that stream/stop tests compare against."""
    out = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=24, seed=7, extra_body={"ignore_eos": True}
    )
    return out.choices[0].message.content


def test_models_list(client, model):
    models = client.models.list()
    assert [m.id for m in models.data] == [model]
    assert client.models.retrieve(model).id == model


def test_chat_non_stream_has_openai_shape_and_usage(client, sampled_text, model):
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion" and out.model == model
    assert out.choices[0].message.role == "assistant" and isinstance(out.choices[0].message.content, str)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert isinstance(sampled_text, str) and sampled_text


def test_chat_stream_matches_non_stream(client, sampled_text, model):
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=24,
        seed=7,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == ""
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == sampled_text


def test_content_part_arrays_equal_plain_strings(client, model):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello, who are you?"}]}]
    a = client.chat.completions.create(model=model, messages=parts, max_tokens=6, temperature=0)
    b = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_n2_returns_two_choices(client, model):
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, n=2, seed=1)
    assert sorted(c.index for c in out.choices) == [0, 1]
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, n=2, stream=True)
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in stream if c.choices[0].finish_reason}
    assert set(finished) == {0, 1}


def test_stop_string_ends_the_text_before_it(client, sampled_text, model):
    # a 2-character stop string from the second half whose first occurrence is where we take it from
    candidates = [
        sampled_text[i : i + 2]
        for i in range(max(1, len(sampled_text) // 2), len(sampled_text) - 1)
        if sampled_text[i : i + 2].strip()
        and "\ufffd" not in sampled_text[i : i + 2]
        and sampled_text.find(sampled_text[i : i + 2]) == i
    ]
    assert candidates, f"no usable stop string in {sampled_text!r}"
    stop = candidates[0]
    out = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=24, seed=7, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == sampled_text[: sampled_text.find(stop)]


def test_max_tokens_gives_finish_reason_length(client, model):
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
    out = client.chat.completions.create(
        model=model, messages=MESSAGES, max_completion_tokens=3, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == 3


def test_include_usage_sends_a_final_usage_chunk(client, model):
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_logprobs(client, model):
    out = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    entries = out.choices[0].logprobs.content
    assert len(entries) == 4
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_completions_prompt_forms_and_echo(server, client, model):
    out = client.completions.create(model=model, prompt=["Once upon", "a time"], max_tokens=3, temperature=0)
    assert out.id.startswith("cmpl-") and [c.index for c in out.choices] == [0, 1]
    # one prompt at a time (same batch shape, so greedy decoding is bit-identical on GPUs too)
    single = client.completions.create(model=model, prompt="Once upon", max_tokens=3, temperature=0)
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "Once upon"}).json()["tokens"]
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == single.choices[0].text
    echoed = client.completions.create(model=model, prompt="Once upon", max_tokens=2, echo=True, temperature=0)
    assert echoed.choices[0].text.startswith("Once upon")


def test_completions_prompt_logprobs_for_loglikelihood(server, client, model):
    """lm-evaluation-harness local-completions: echo=True, logprobs=1, max_tokens 0 or 1."""
    prompt = "The capital of France is Paris"
    n_prompt = len(httpx.post(server.url + "/tokenize", json={"prompt": prompt}).json()["tokens"])
    for max_tokens in (0, 1):
        out = client.completions.create(
            model=model, prompt=prompt, echo=True, logprobs=1, max_tokens=max_tokens, temperature=0
        )
        lp = out.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n_prompt + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
        assert all(max(top.values()) >= v for top, v in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
        assert lp.text_offset == sorted(lp.text_offset)


def test_completions_stream(client, model):
    chunks = list(
        client.completions.create(
            model=model,
            prompt="Once upon",
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-2].choices[0].finish_reason == "length"


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_embeddings_are_unit_vectors(server, client, encoding_format, model):
    out = client.embeddings.create(model=model, input=["hello", "world"], encoding_format=encoding_format)
    assert [d.index for d in out.data] == [0, 1] and out.usage.prompt_tokens > 0
    vectors = [
        np.frombuffer(base64.b64decode(d.embedding), dtype="<f4")
        if isinstance(d.embedding, str)
        else np.array(d.embedding)
        for d in out.data
    ]
    for vector in vectors:
        assert math.isclose(float(np.linalg.norm(vector)), 1.0, rel_tol=1e-3)
    assert len(vectors[0]) == len(vectors[1]) > 0 and not np.allclose(vectors[0], vectors[1])
    if not server.external:
        assert len(vectors[0]) == 64  # the tiny model's hidden size


def test_async_client_stream_and_non_stream(server, model):
    async def go():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key or "none", max_retries=0)
        whole = await client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
        )
        stream = await client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=6,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        parts = [c.choices[0].delta.content or "" async for c in stream]
        await client.close()
        return whole, "".join(parts)

    whole, streamed = asyncio.run(go())
    assert whole.choices[0].message.content == streamed and whole.usage.completion_tokens == 6


def test_base_url_with_trailing_slashes(server, model):
    client = openai.OpenAI(base_url=server.url + "//v1//", api_key=server.api_key or "none", max_retries=0)
    assert client.models.list().data[0].id == model


def test_tokenize_detokenize_round_trip(server):
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": "hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == server.max_model_len
    text = httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "hello world"


def test_health_and_metrics_need_no_key_and_cors_answers(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert f"minimind:{name}_bucket" in metrics
    for name in ("num_requests_running", "num_requests_waiting", "prompt_tokens_total", "generation_tokens_total"):
        assert f"minimind:{name}" in metrics
    preflight = httpx.options(
        server.url + "/v1/chat/completions",
        headers={"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.headers.get("access-control-allow-origin") == "http://ui.example"


def test_metrics_count_a_request(server, client, model):
    """One 4-token request: +1 TTFT and e2e observation, +3 inter-token gaps, its prompt and output tokens."""
    names = [
        "minimind:time_to_first_token_seconds_count",
        "minimind:inter_token_latency_seconds_count",
        "minimind:e2e_request_latency_seconds_count",
        "minimind:prompt_tokens_total",
        "minimind:generation_tokens_total",
    ]
    before = {name: metric(server, name) for name in names}
    steps_before = None if server.external else engine_steps(server)
    out = client.completions.create(model=model, prompt="Once upon", max_tokens=4, extra_body={"ignore_eos": True})
    after = {name: metric(server, name) for name in names}
    ttft, itl, e2e, prompt, generated = (after[name] - before[name] for name in names)
    assert (ttft, e2e, prompt, generated) == (1, 1, out.usage.prompt_tokens, 4)
    # gaps between output deltas; an engine may hand over two tokens in one delta when the server lags (vLLM)
    assert itl == 3 if not server.external else 1 <= itl <= 3
    assert metric(server, "minimind:num_requests_running") == 0 and metric(server, "minimind:num_requests_waiting") == 0
    if steps_before is not None:  # the native engine counts its steps: the first token from one prefill, 3 decode steps
        steps_after = engine_steps(server)
        assert {kind: steps_after[kind] - steps_before[kind] for kind in steps_after} == {"prefill": 1, "decode": 3}


def engine_steps(server) -> dict[str, float]:
    return {kind: metric(server, "minimind:engine_steps_total", kind=kind) for kind in ("prefill", "decode")}
