"""Every error status in OpenAI's shape, seen through the real OpenAI SDK and raw HTTP."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest

from tests.test_server_support import MODEL_NAME, main_server, tight_server

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server():
    return main_server()


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


def test_queue_full_is_429():
    """One batch slot + one queue place: of several long requests at once, some must be refused with 429."""
    server = tight_server()
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
