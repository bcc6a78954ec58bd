"""Render a conversation with the tokenizer's chat template and mark which tokens the model is trained on.

Only what the model would have to generate is trained: for each assistant turn, the text after the generation
prompt up to and including the end-of-turn token. Found generically, for any template, by rendering:
  before   = template(messages[:i])                              text before assistant turn i
  prompted = template(messages[:i], add_generation_prompt=True)  what inference would feed the model
  after    = template(messages[:i+1])                            text including assistant turn i
The trained span starts where `prompted` and `after` stop agreeing (so a prompt that pre-fills `<think>` is not
trained) and ends at the end of `after`. The template must be prefix-stable (rendering a conversation's prefix
gives a prefix of the full rendering); templates that rewrite earlier turns are refused with a clear error.
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class ConversationError(ValueError):
    """A conversation the chat template cannot train on; the message says why (the caller adds file:line)."""


def normalise_messages(conversations: Any) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """MiniMind JSONL turns -> (messages for the template, tools). tools/tool_calls may be JSON strings."""
    if not isinstance(conversations, list) or not conversations:
        raise ConversationError('"conversations" must be a non-empty list of {"role", "content"} objects')
    messages, tools = [], None
    for n, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise ConversationError(f"conversations[{n}] is not an object")
        role = turn.get("role")
        if role not in ROLES:
            raise ConversationError(f"conversations[{n}].role is {role!r}; expected one of {', '.join(ROLES)}")
        content = turn.get("content", "")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ConversationError(f"conversations[{n}].content must be a string")
        message: dict[str, Any] = {"role": role, "content": content}
        if turn.get("reasoning_content"):
            message["reasoning_content"] = str(turn["reasoning_content"])
        if turn.get("tool_calls"):
            message["tool_calls"] = _maybe_json(turn["tool_calls"], f"conversations[{n}].tool_calls")
        if turn.get("tools"):
            tools = _maybe_json(turn["tools"], f"conversations[{n}].tools")
        messages.append(message)
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError("conversation has no assistant turn, so there is nothing to train on")
    return messages, tools


def _maybe_json(value: Any, where: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ConversationError(f"{where} is a string but not valid JSON: {err}") from None
    return value


def render_with_spans(
    tokenizer: Any, messages: list[dict[str, Any]], tools: Any = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of the text to train on."""

    def render(msgs: list[dict[str, Any]], prompt: bool = False) -> str:
        if not msgs:
            return ""
        return tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=prompt)

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, prompted, after = render(messages[:i]), render(messages[:i], True), render(messages[: i + 1])
        if not (after.startswith(before) and full.startswith(after)):
            raise ConversationError(
                f"the chat template is not prefix-stable at turn {i} (rendering earlier turns changes them), "
                "so assistant tokens cannot be located; use a tokenizer whose template keeps earlier turns verbatim"
            )
        start = len(before)
        while start < len(after) and start < len(prompted) and after[start] == prompted[start]:
            start += 1
        spans.append((start, len(after)))
    return full, spans


def tokenize_conversation(
    tokenizer: Any, messages: list[dict[str, Any]], tools: Any = None
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is trained (starts inside a span)."""
    text, spans = render_with_spans(tokenizer, messages, tools)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = [any(lo <= start < hi for lo, hi in spans) for start, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), trained
