"""Every error status in OpenAI's shape, seen through the real OpenAI SDK and raw HTTP."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest

from tests.test_server_support import LAYOUTS, MODEL_NAME, main_server, needs_own_server, tight_server

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module", params=list(LAYOUTS))
def server(request):
    return main_server(request.param)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key or "none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(server) -> str:
    return server.model


def assert_openai_shape(body: dict, status: int) -> dict:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] in (status, error["code"])  # a number or a specific code string
    return error


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_missing_or_wrong_key_is_401(server, key):
    if not server.api_key:
        pytest.skip("the server under test was started without --api-key")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(server.base_url + "/chat/completions", json={"messages": MESSAGES}, headers=headers)
    assert response.status_code == 401
    assert assert_openai_shape(response.json(), 401)["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong-key", max_retries=0).models.list()


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES, max_tokens=2)
    assert err.value.body["param"] == "model" and "gpt-9" in err.value.body["message"]


def test_malformed_json_is_400_not_422(server):
    response = httpx.post(
        server.base_url + "/chat/completions",
        content=b'{"messages": [',
        headers={"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert "JSON" in assert_openai_shape(response.json(), 400)["message"]


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"messages": []}, "messages"),
        ({"n": 0}, "n"),
        ({"top_p": 5}, "top_p"),
    ],
)
def test_invalid_fields_are_400_naming_the_field(client, model, extra, param):
    kwargs = {"model": model, "messages": MESSAGES, "max_tokens": 2, **extra}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**kwargs)
    assert err.value.status_code == 400 and param in (err.value.body["param"] or "")


def test_unknown_fields_are_ignored(client, model):
    out = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=2, extra_body={"frobnicate": True, "owui_session": {"a": 1}}
    )
    assert out.choices[0].message.content is not None


def test_prompt_plus_max_tokens_over_context_is_400_naming_both(server, client, model):
    prompt_tokens = len(httpx.post(server.url + "/tokenize", json={"prompt": "hello"}).json()["tokens"])
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="hello", max_tokens=server.max_model_len)
    message = err.value.body["message"]
    assert str(server.max_model_len) in message and f"{prompt_tokens} in the prompt" in message
    too_long = [{"role": "user", "content": "word " * (server.max_model_len + 10)}]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=too_long)


def test_unknown_route_is_404_in_openai_shape(server):
    response = httpx.get(server.url + "/v1/nothing-here", headers={"Authorization": f"Bearer {server.api_key}"})
    assert response.status_code == 404 and assert_openai_shape(response.json(), 404)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_queue_full_is_429(layout):
    """One batch slot + one queue place: of several long requests at once, some must be refused with 429."""
    server = tight_server(layout)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)

    def one(_):
        try:
            client.completions.create(model=MODEL_NAME, prompt="hello", max_tokens=120, extra_body={"ignore_eos": True})
            return 200
        except openai.RateLimitError as err:
            assert err.body["type"] == "rate_limit_error"
            return 429

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(one, range(6)))
    assert 429 in statuses and 200 in statuses


def test_429_says_when_to_retry():
    server = tight_server()
    body = {"prompt": "hello", "max_tokens": 120, "ignore_eos": True}

    def one(_):
        return httpx.post(server.base_url + "/completions", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        refused = [r for r in pool.map(one, range(6)) if r.status_code == 429]
    assert refused and all(int(r.headers["retry-after"]) >= 1 for r in refused)


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/chat/completions", {"messages": MESSAGES, "n": 2, "max_tokens": 2}, "n"),
        ("/completions", {"prompt": ["one", "two"], "max_tokens": 2}, "prompt"),
    ],
)
def test_a_request_that_can_never_be_queued_is_400_not_429(path, body, param):
    """One queue place: two sequences can never wait at once, so retrying (429) would never help."""
    server = tight_server()
    response = httpx.post(server.base_url + path, json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = assert_openai_shape(response.json(), 400)
    assert error["param"] == param and "--max-queue" in error["message"]


@pytest.mark.parametrize(
    "path, raw, param",
    [
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages.0.content"),
        ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
        ("/v1/embeddings", '{"input": ["fine", "a\\udfffb"]}', "input"),
        ("/tokenize", '{"prompt": "a\\ud800b"}', "prompt"),
        ("/detokenize", '{"model": "a\\ud800b", "tokens": [1]}', "model"),
    ],
)
def test_a_lone_surrogate_is_400_naming_the_field(server, path, raw, param):
    """Valid JSON, but no valid Unicode: nothing can tokenize or echo it back."""
    assert "\\ud" in raw  # a JSON escape, sent as is
    headers = {"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"}
    response = httpx.post(server.url + path, content=raw.encode(), headers=headers, timeout=60)
    assert response.status_code == 400, response.text
    error = assert_openai_shape(response.json(), 400)
    assert error["param"] == param and "surrogate" in error["message"]


def test_json_syntax_error_says_where(server):
    response = httpx.post(
        server.base_url + "/chat/completions",
        content=b'{"messages": [\n  {"role": "user",, "content": "hi"}]}',
        headers={"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    message = assert_openai_shape(response.json(), 400)["message"]
    assert "line 2 column 19 (char 33)" in message, message


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_413_in_openai_shape(server, chunked):
    """The default --max-request-bytes is 4 MiB; /tokenize needs no key, so anyone could send one."""
    needs_own_server("the default body limit")
    body = ('{"prompt": "' + "x" * (5 << 20) + '"}').encode()
    content = iter([body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20)]) if chunked else body
    response = httpx.post(server.url + "/tokenize", content=content, timeout=60)
    assert response.status_code == 413
    error = assert_openai_shape(response.json(), 413)
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"
    assert "4MiB" in error["message"] and "--max-request-bytes" in error["message"]


def test_a_50mb_body_is_refused_before_it_is_read(server):
    needs_own_server("the default body limit")
    try:
        response = httpx.post(server.url + "/tokenize", content=b"x" * (50 << 20), timeout=60)
        assert response.status_code == 413
    except httpx.TransportError:
        pass  # answered 413 and closed while the client was still sending: refused as well
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize(
    "path, fields",
    [
        ("/v1/chat/completions", {"chat_template": "{{ 'x' }}"}),
        ("/v1/chat/completions", {"chat_template_kwargs": {"chat_template": "{{ 'x' }}"}}),
        ("/tokenize", {"chat_template": "{{ 'x' }}"}),
    ],
)
def test_a_chat_template_in_the_request_is_refused_unless_trusted(server, path, fields):
    """A template is a program (nested loops ran for minutes on the event loop); as vLLM, refuse it by default."""
    body = {"messages": MESSAGES, "max_tokens": 2, **fields}
    headers = {"Authorization": f"Bearer {server.api_key}"}
    response = httpx.post(server.url + path, json=body, headers=headers, timeout=60)
    assert response.status_code == 400, response.text
    error = assert_openai_shape(response.json(), 400)
    assert "chat_template" in error["param"] and "--trust-request-chat-template" in error["message"]


def test_a_client_that_leaves_a_non_stream_request_is_no_error_in_the_log(server):
    needs_own_server("reading the server's log")
    before = server.log.stat().st_size
    # n=8 completions of the whole context: far more than the 0.2 s the client waits, however fast the machine
    body = {"model": server.model, "messages": MESSAGES, "n": 8, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.base_url + "/chat/completions", json=body, headers=headers, timeout=httpx.Timeout(10, read=0.2)
        )
    time.sleep(1.0)  # the server notices the disconnect on its next poll (every 0.25 s)
    log = server.log.read_bytes()[before:].decode(errors="replace")
    assert "Traceback" not in log and "ERROR" not in log, log
