"""/v1/responses through the real OpenAI SDK (`client.responses.*`) against a live `minimind serve`.

Text in and out, the typed stream events, previous_response_id, retrieve/delete, and the 400s for what a
text model cannot do run on the shared tiny server. Function tools run on the model of
tests/test_server_reasoning.py, taught to answer the weather question with reasoning, a sentence and a
`get_weather` call: so the tool call, the reasoning item and a completed stream are the model's real output.
"""

from __future__ import annotations

import json

import openai
import pytest
from transformers import AutoTokenizer

from server.responses_store import ResponseStore, StoredResponse
from tests.test_server_reasoning import CONTENT, MESSAGES, REASONING, TOOLS, taught_model_dir
from tests.test_server_support import main_server, needs_own_server, start_server, tiny_model_dir

# the same weather tool in the Responses form (name and parameters at the top level)
RESPONSES_TOOLS = [{"type": "function", **TOOLS[0]["function"]}]


@pytest.fixture(scope="module")
def server():
    return main_server()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key or "none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def taught():
    needs_own_server("the taught model")
    server = start_server("--max-model-len", "512", model=taught_model_dir())
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tiny_model_dir())


def prompt_tokens(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> int:
    """What the chat template makes of `messages`, counted as the server's usage counts it."""
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_text_in_text_out(client, server, tokenizer):
    out = client.responses.create(
        model=server.model, input="Hello there", instructions="Be brief.", max_output_tokens=6, temperature=0
    )
    assert out.id.startswith("resp_") and out.object == "response" and out.model == server.model
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    [message] = out.output
    assert message.type == "message" and message.role == "assistant"
    assert out.output_text == message.content[0].text and out.usage.output_tokens == 6
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    assert out.usage.input_tokens == prompt_tokens(tokenizer, expected)
    assert out.usage.total_tokens == out.usage.input_tokens + 6


def test_stream_sends_the_typed_events_and_the_same_text(client, server):
    kwargs = dict(model=server.model, input="Hello there", max_output_tokens=6, temperature=0)
    reference = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    types = [event.type for event in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == reference.output_text == events[-1].response.output_text
    assert len({event.response.id for event in events if hasattr(event, "response")}) == 1


def test_previous_response_id_continues_the_conversation(client, server, tokenizer):
    first = client.responses.create(model=server.model, input="Tell me a story.", max_output_tokens=5, temperature=0)
    second = client.responses.create(
        model=server.model, input="And then?", previous_response_id=first.id, max_output_tokens=3, temperature=0
    )
    assert second.previous_response_id == first.id
    conversation = [
        {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"},
    ]
    assert second.usage.input_tokens == prompt_tokens(tokenizer, conversation)
    # a stored response is retrieved as it was sent; deleted, it can no longer be continued
    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=server.model, input="x", previous_response_id=first.id)
    assert err.value.body["param"] == "previous_response_id"


def test_store_false_keeps_nothing(client, server):
    out = client.responses.create(model=server.model, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(out.id)


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}}, "text.format"),
        ({"background": True}, "background"),
        ({"tool_choice": "required", "tools": RESPONSES_TOOLS}, "tool_choice"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"temperature": 2.5}, "temperature"),
        ({"input": [{"type": "function_call", "call_id": "c1", "name": 7, "arguments": "{}"}]}, "input[0].name"),
        ({"tools": [{"type": "function", "name": "f", "parameters": "not an object"}]}, "tools[0].parameters"),
        ({"text": {"format": "json"}}, "text.format"),
    ],
)
def test_what_is_not_supported_is_a_400_naming_the_field(client, server, extra, param):
    kwargs = {"model": server.model, "input": "Hi", "max_output_tokens": 2, **extra}
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(**kwargs)
    assert (err.value.body["param"] or "").startswith(param), err.value.body


def test_function_tool_call_with_reasoning(taught, tokenizer):
    out = taught.responses.create(
        model="tiny", input=MESSAGES[0]["content"], tools=RESPONSES_TOOLS, temperature=0, max_output_tokens=80
    )
    assert out.status == "completed"
    assert [item.type for item in out.output] == ["reasoning", "message", "function_call"]
    reasoning, message, call = out.output
    assert reasoning.content[0].text == REASONING
    assert message.content[0].text == CONTENT == out.output_text
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.status == "completed"

    # the tool's result goes back with previous_response_id; the server rebuilds the whole conversation
    follow = taught.responses.create(
        model="tiny",
        previous_response_id=out.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 21}'}],
        tools=RESPONSES_TOOLS,
        temperature=0,
        max_output_tokens=4,
    )
    tool_call = {
        "id": call.call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": call.arguments},
    }
    conversation = [
        *MESSAGES,
        {"role": "assistant", "content": CONTENT, "tool_calls": [tool_call]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"celsius": 21}'},
    ]
    assert follow.usage.input_tokens == prompt_tokens(tokenizer, conversation, TOOLS)


def test_function_tool_call_streamed_through_the_sdk_stream_helper(taught):
    with taught.responses.stream(
        model="tiny", input=MESSAGES[0]["content"], tools=RESPONSES_TOOLS, temperature=0, max_output_tokens=80
    ) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.reasoning_text.delta" in types and "response.function_call_arguments.done" in types
    assert types[-1] == "response.completed"
    assert [item.type for item in final.output] == ["reasoning", "message", "function_call"]
    assert final.output_text == CONTENT
    assert json.loads(final.output[2].arguments) == {"city": "Paris"}


def test_store_keeps_the_newest_and_drops_the_least_recently_used():
    store = ResponseStore(capacity=2)
    for name in ("a", "b"):
        store.put(StoredResponse({"id": name}, []))
    assert store.get("a") is not None  # "a" used: "b" is now the oldest
    store.put(StoredResponse({"id": "c"}, []))
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None
    assert len(store) == 2
