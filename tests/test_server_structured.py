"""Structured outputs on the live server: JSON schemas, json_object, forced tool calls, errors, LangChain.

The tiny random model writes arbitrary tokens, so validity comes from the grammar alone. Every schema bounds
its output (maxLength on strings, maxItems on arrays, closed objects, bounded numbers) so that the grammar, not
max_tokens, ends each completion: finish_reason must be "stop" and the text must validate.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.test_server_support import main_server

S = {"type": "string", "maxLength": 6}


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
