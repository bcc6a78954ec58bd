"""The chat page's pure logic: history trimming, the request it builds, stream folding, error sentences."""

from __future__ import annotations

import importlib

import httpx
import openai
from openai.types.chat import ChatCompletionChunk

from webui.chat_logic import (
    StreamAccumulator,
    api_settings_from_env,
    build_messages,
    completion_request,
    friendly_error,
    trim_history,
)

BASE = "http://127.0.0.1:1/v1"


def _history(turns: int) -> list[dict]:
    history = []
    for i in range(turns):
        history.append({"role": "user", "content": f"q{i}"})
        history.append({"role": "assistant", "content": f"a{i}", "reasoning": f"r{i}", "stats": "x"})
    return history


def test_trim_history_keeps_whole_turns():
    history = _history(5)
    assert trim_history(history, 0) == []
    assert [m["content"] for m in trim_history(history, 2)] == ["q3", "a3", "q4", "a4"]
    assert trim_history(history, 10) == history
    assert trim_history(history, 10) is not history  # a copy: the page's own history is never altered


def test_build_messages_sends_role_and_content_only():
    messages = build_messages("  Be brief. ", _history(3), "new question", max_turns=1)
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "new question"},
    ]
    assert build_messages("", [], "hi", max_turns=4) == [{"role": "user", "content": "hi"}]


def test_build_messages_skips_failed_exchanges():
    history = _history(1) + [
        {"role": "user", "content": "lost"},
        {"role": "assistant", "content": "", "error": "server down"},
    ]
    messages = build_messages("", history, "again", max_turns=5)
    assert [m["content"] for m in messages] == ["q0", "a0", "again"]
    # A partial answer (stream dropped after some text) is kept and sent.
    history[-1] = {"role": "assistant", "content": "half an ans", "error": "dropped"}
    assert [m["content"] for m in build_messages("", history, "x", 5)] == ["q0", "a0", "lost", "half an ans", "x"]


def test_stopped_answers_are_sent_as_far_as_they_went():
    acc = StreamAccumulator()
    stopped = acc.to_message(stopped=True)
    assert stopped["stopped"] and stopped["stats"] == "stopped"
    history = _history(1) + [{"role": "user", "content": "stopped at once"}, stopped]
    assert [m["content"] for m in build_messages("", history, "next", 5)] == ["q0", "a0", "next"]
    history[-1] = dict(stopped, content="the first words")
    assert [m["content"] for m in build_messages("", history, "next", 5)][-3:] == [
        "stopped at once",
        "the first words",
        "next",
    ]


def test_completion_request_streams_with_usage_and_thinking_switch():
    request = completion_request(
        model="m", messages=[{"role": "user", "content": "hi"}], temperature=0.3, top_p=0.9, max_tokens=7, thinking=True
    )
    assert request["stream"] is True
    assert request["stream_options"] == {"include_usage": True}
    assert request["extra_body"]["chat_template_kwargs"]["enable_thinking"] is True
    assert (request["model"], request["temperature"], request["top_p"], request["max_tokens"]) == ("m", 0.3, 0.9, 7)


def test_api_settings_from_env():
    assert api_settings_from_env({}) == ("http://127.0.0.1:8998/v1", "none")
    env = {"MINIMIND_API_BASE": "http://api:8998/v1", "MINIMIND_API_KEY": "sk-1"}
    assert api_settings_from_env(env) == ("http://api:8998/v1", "sk-1")


def _chunk(content=None, reasoning=None, finish=None, usage=None, choices=True) -> ChatCompletionChunk:
    delta = {"role": "assistant"}
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    data = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else [],
    }
    if usage:
        data["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    # The SDK's models keep fields outside its schema (reasoning_content) as attributes, as in a real stream.
    return ChatCompletionChunk.model_validate(data)


def test_stream_accumulator_separates_reasoning_and_counts_usage():
    acc = StreamAccumulator()
    chunks = [
        _chunk(reasoning="think "),
        _chunk(content="Hel"),
        _chunk(content="lo", finish="length"),
        _chunk(usage=(12, 5), choices=False),
    ]
    deltas = [acc.feed(c) for c in chunks]
    assert deltas[0] == ("think ", "")
    assert deltas[1] == ("", "Hel")
    assert (acc.reasoning, acc.content, acc.finish_reason) == ("think ", "Hello", "length")
    message = acc.to_message()
    assert message["prompt_tokens"] == 12 and message["completion_tokens"] == 5
    assert "12 prompt + 5 completion tokens" in message["stats"]
    assert "tok/s" in message["stats"] and "cut at max tokens" in message["stats"]
    assert message["reasoning"] == "think "


def test_friendly_errors_name_the_problem_and_the_fix():
    request = httpx.Request("POST", BASE + "/chat/completions")

    def status_error(cls, code, message):
        response = httpx.Response(code, request=request, json={"error": {"message": message}})
        return cls(message, response=response, body={"error": {"message": message}})

    down = friendly_error(openai.APIConnectionError(request=request), BASE)
    assert "Cannot reach the API at " + BASE in down and "minimind serve" in down
    assert "401" in friendly_error(status_error(openai.AuthenticationError, 401, "bad key"), BASE)
    assert "busy" in friendly_error(status_error(openai.RateLimitError, 429, "queue full"), BASE)
    bad = friendly_error(status_error(openai.BadRequestError, 400, "max_tokens must be >= 1"), BASE)
    assert bad == "The API answered 400: max_tokens must be >= 1"
    dropped = friendly_error(httpx.RemoteProtocolError("peer closed connection"), BASE)
    assert "broke off" in dropped and "Regenerate" in dropped
    # The SDK's own HTTP library (httpx2 from openai 3.x on) raises the same kind of error mid-stream.
    sdk_http_client = type(openai.OpenAI(base_url=BASE, api_key="k")._client)
    library = next(c.__module__.split(".")[0] for c in sdk_http_client.__mro__ if c.__module__.startswith("httpx"))
    transport = importlib.import_module(library)
    sdk_dropped = friendly_error(transport.RemoteProtocolError("peer closed connection"), BASE)
    assert "broke off" in sdk_dropped
    assert "Unexpected" in friendly_error(ValueError("not a transport error"), BASE)
