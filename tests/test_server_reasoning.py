"""reasoning_content and tool_calls through the live server and the real OpenAI SDK, stream and non-stream.

A random model never writes `<think>` or `<tool_call>`, so the tiny model is first taught one answer (a few
dozen optimizer steps on one sequence, seconds on a CPU): for the weather question with a weather tool it
answers, greedily, with a think block, a sentence and a tool call. Everything after that is the real server.
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch

from tests.conftest import tiny_model
from tests.test_server_support import _tmp, needs_own_server, start_server, tiny_model_dir

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
REASONING = "The user asks for the weather."
CONTENT = "I will check."
ANSWER = (
    f"<think>\n{REASONING}\n</think>\n\n{CONTENT}"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)
MAX_STEPS = 400


def taught_model_dir() -> Path:
    """The tiny model trained until greedy decoding of the tool prompt gives exactly ANSWER then <|im_end|>."""
    path = Path(_tmp.name) / "taught-minimind"
    if (path / "config.json").exists():
        return path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())
    prompt = tokenizer.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"] + [
        tokenizer.convert_tokens_to_ids("<|im_end|>")
    ]
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
    targets = torch.tensor(answer_ids)
    model = tiny_model(seed=0, max_position_embeddings=1024).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is several times faster than two fighting over 2 cores
    try:
        for _ in range(MAX_STEPS):  # about 100 steps
            out = model(input_ids=ids, labels=labels)
            if bool((out.logits[0, len(prompt_ids) - 1 : -1].argmax(-1) == targets).all()):
                break
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        else:
            raise AssertionError(f"the tiny model did not learn its answer in {MAX_STEPS} steps")
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def client():
    needs_own_server("the taught model")
    server = start_server("--max-model-len", "512", model=taught_model_dir())
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)


def test_non_stream_splits_reasoning_content_and_tool_calls(client):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=80)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.model_extra["reasoning_content"] == REASONING
    assert choice.message.content == CONTENT
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_stream_sends_reasoning_then_content_then_tool_call_deltas(client):
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=80, stream=True
    )
    reasoning, content, calls, finish = "", "", [], None
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert reasoning.strip() == REASONING and content == CONTENT
    assert finish == "tool_calls"
    assert [c.function.name for c in calls] == ["get_weather"] and calls[0].index == 0
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}


def test_without_tools_the_markup_stays_in_content(client):
    """tool_choice "none": no tool parsing, so the model's <tool_call> text is plain content (finish "stop")."""
    out = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=80
    )
    assert out.choices[0].finish_reason in ("stop", "length") and not out.choices[0].message.tool_calls
