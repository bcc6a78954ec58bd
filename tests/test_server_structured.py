"""Structured outputs on the live server: JSON schemas, json_object, forced tool calls, errors, LangChain.

The tiny random model writes arbitrary tokens, so validity comes from the grammar alone. Every schema bounds
its output (maxLength on strings, maxItems on arrays, closed objects, bounded numbers) so that the grammar, not
max_tokens, ends each completion: finish_reason must be "stop" and the text must validate.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.test_server_support import long_context_model_dir, main_server, start_server

S = {"type": "string", "maxLength": 6}
SEED = 1  # a seed whose json_object samples close some objects within max_tokens (see that test)


def obj(properties: dict, required: list | None = None) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


SCHEMAS = [
    obj({"name": S}),
    obj({"age": {"type": "integer", "minimum": 0, "maximum": 150}}),
    obj({"ok": {"type": "boolean"}}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"score": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.25}}),
    obj({"tags": {"type": "array", "items": S, "maxItems": 3}}),
    obj(
        {
            "point": obj(
                {
                    "x": {"type": "integer", "minimum": -9, "maximum": 9},
                    "y": {"type": "integer", "minimum": 0, "maximum": 99},
                }
            )
        }
    ),
    obj({"name": S, "nick": S}, required=["name"]),
    obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}),
    obj({"word": {"type": "string", "minLength": 2, "maxLength": 4}}),
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 4},
    {"enum": ["yes", "no", "maybe"]},
    obj({"kind": {"const": "event"}, "at": {"type": "integer", "minimum": 0, "maximum": 2359}}),
    obj({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "boolean"}]}}),
    obj({"maybe": {"type": ["string", "null"], "maxLength": 4}}),
    obj(
        {
            "items": {
                "type": "array",
                "items": obj({"id": {"type": "integer", "minimum": 1, "maximum": 99}}),
                "maxItems": 2,
            }
        }
    ),
    obj({"a": obj({"b": obj({"c": {"type": "boolean"}})})}),
    obj(
        {"pair": {"type": "array", "prefixItems": [S, {"type": "integer", "minimum": 0, "maximum": 9}], "items": False}}
    ),
    obj(
        {
            "email": {"type": "string", "pattern": "^[a-z]{1,5}@[a-z]{1,5}\\.com$"},
            "n": {"type": "integer", "minimum": 1, "maximum": 3},
        }
    ),
    obj({"level": {"enum": [1, 2, 3]}, "label": S, "on": {"type": "boolean"}}, required=["level"]),
]
assert len(SCHEMAS) == 20


@pytest.fixture(scope="module")
def server():
    return main_server()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key or "none", max_retries=0, timeout=300)


def ask(client, stream: bool, max_tokens: int = 200, **extra) -> tuple[str, str, list]:
    """(content, finish_reason, tool_calls) of one chat completion, streamed or not."""
    kwargs = {"model": client.models.list().data[0].id, "max_tokens": max_tokens, "temperature": 0, **extra}
    messages = [{"role": "user", "content": "Reply in JSON."}]
    if not stream:
        choice = client.chat.completions.create(messages=messages, **kwargs).choices[0]
        return choice.message.content or "", choice.finish_reason, choice.message.tool_calls or []
    text, finish, calls = "", None, []
    for chunk in client.chat.completions.create(messages=messages, stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    return text, finish, calls


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_twenty_schemas_validate_stream_and_not_batched_with_free_requests(client):
    jobs = [(schema, stream) for schema in SCHEMAS for stream in (False, True)]
    with ThreadPoolExecutor(16) as pool:
        free = [pool.submit(ask, client, i % 2 == 0, 40) for i in range(6)]  # unconstrained, same batches
        constrained = [pool.submit(ask, client, s, response_format=json_schema_format(sc)) for sc, s in jobs]
        results = [f.result() for f in constrained]
        free_results = [f.result() for f in free]
    unfinished = [
        (schema, stream, text[:80]) for (schema, stream), (text, finish, _) in zip(jobs, results) if finish != "stop"
    ]
    assert not unfinished
    for (schema, _), (text, _, _) in zip(jobs, results):
        jsonschema.validate(json.loads(text), schema)
    # the unconstrained rows are untouched: the random model's free text, cut by max_tokens, is not JSON
    assert all(finish == "length" for _, finish, _ in free_results)
    assert any(not text.lstrip().startswith(("{", "[", '"')) for text, _, _ in free_results)


def test_json_object_mode_gives_json_objects(client):
    """Free-form JSON has no bounds, so a random model may not close its object within max_tokens: of 16 seeded
    samples, each that stops must parse as an object, and each cut by length is still an object's beginning."""
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "JSON"}],
        max_tokens=200,
        n=16,
        temperature=1,
        seed=SEED,
        response_format={"type": "json_object"},
    )
    stopped = [c.message.content for c in reply.choices if c.finish_reason == "stop"]
    assert len(stopped) >= 2
    assert all(isinstance(json.loads(text), dict) for text in stopped)
    assert all(c.message.content.startswith("{") for c in reply.choices)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": obj({"city": S, "days": {"type": "integer", "minimum": 1, "maximum": 7}}),
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": obj({"zone": {"enum": ["UTC", "CET"]}})}}


@pytest.fixture(scope="module")
def long_client():
    """Tool definitions make a long prompt: a server with room for it."""
    server = start_server("--max-model-len", "2048", model=long_context_model_dir())
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=300)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_tool_choice_forces_a_valid_call(long_client, stream, choice):
    _, finish, calls = ask(long_client, stream, tools=[WEATHER, TIME], tool_choice=choice)
    assert finish == "tool_calls" and len(calls) == 1
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    name = calls[0].function.name
    assert name in tools and (choice == "required" or name == "get_time")
    jsonschema.validate(json.loads(calls[0].function.arguments), tools[name])


def test_completions_take_guided_fields(client):
    model = client.models.list().data[0].id
    out = client.completions.create(
        model=model, prompt="Pick:", max_tokens=20, temperature=0, extra_body={"guided_choice": ["alpha", "beta"]}
    )
    assert out.choices[0].text in ("alpha", "beta") and out.choices[0].finish_reason == "stop"
    out = client.completions.create(
        model=model, prompt="Code:", max_tokens=20, temperature=0, extra_body={"guided_regex": "[A-Z]{2}[0-9]{3}"}
    )
    assert re.fullmatch("[A-Z]{2}[0-9]{3}", out.choices[0].text)


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"response_format": json_schema_format({"type": "nonsense"})}, "response_format", "Invalid type"),
        ({"response_format": json_schema_format({"type": "string", "pattern": "("})}, "response_format", "regex"),
        ({"response_format": {"type": "yaml"}}, "response_format", "'yaml' is not supported"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema needs"),
        ({"extra_body": {"guided_regex": "[a-"}}, "guided_regex", "regex"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        (
            {"response_format": {"type": "json_object"}, "extra_body": {"guided_choice": ["a"]}},
            "response_format",
            "one output constraint",
        ),
    ],
)
def test_bad_constraints_are_a_400_naming_the_field(client, extra, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, False, **extra)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param and words in error["message"], error


def test_langchain_with_structured_output(server):
    chat_models = pytest.importorskip("langchain_openai", reason="langchain-openai is in the dev extra")
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=6)
        age: int = pydantic.Field(ge=0, le=120)
        member: bool

    model = openai.OpenAI(base_url=server.base_url, api_key=server.api_key or "none").models.list().data[0].id
    llm = chat_models.ChatOpenAI(
        model=model, base_url=server.base_url, api_key=server.api_key or "none", temperature=0, max_tokens=200
    )
    person = llm.with_structured_output(Person).invoke("Describe a person.")
    assert isinstance(person, Person) and len(person.name) <= 6 and 0 <= person.age <= 120
