"""`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in model output → OpenAI `tool_calls`.

The format is read by models/tool_calls.py (training reads it too); this module gives the calls their OpenAI
shape and ids, streams them, and builds the grammar that forces one. Only used when the request lists `tools`.
"""

from __future__ import annotations

import json
from typing import Any

from models.tool_calls import CLOSE, OPEN
from models.tool_calls import parse_tool_calls as parse_calls
from server.errors import APIError
from server.protocol import FunctionCall, Tool, ToolCall, random_id


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content outside the calls or None, calls). Text whose calls are not valid JSON stays content."""
    content, calls = parse_calls(text)
    return content, [
        ToolCall(id=random_id("call_"), function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls
    ]


def tool_call_deltas(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """The stream form: one entry per call with its index, id, name and whole arguments string."""
    return [
        {
            "index": i,
            "id": c.id,
            "type": "function",
            "function": {"name": c.function.name, "arguments": c.function.arguments},
        }
        for i, c in enumerate(calls)
    ]


class ToolCallStreamParser:
    """Passes content through until a `<tool_call>` starts, then holds the rest until the stream ends.

    A partial `<tool_call` at the end of a delta is held back too, so the tag never leaks into content.
    """

    def __init__(self) -> None:
        self.held = ""
        self.in_call = False

    def feed(self, delta: str) -> str:
        if self.in_call:
            self.held += delta
            return ""
        text = self.held + delta
        start = text.find(OPEN)
        if start >= 0:
            self.in_call = True
            self.held = text[start:]
            return text[:start]
        keep = max((k for k in range(1, len(OPEN)) if text.endswith(OPEN[:k])), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still to emit, parsed calls) at the end of the stream."""
        held, self.held = self.held, ""
        if not self.in_call:
            return held, []
        content, calls = parse_tool_calls(held)
        if not calls:
            return held, []
        return content or "", calls


def _tag(tokenizer: Any, text: str) -> str:
    """A tag as a Lark terminal: by token id when the tokenizer has it as one added token (llguidance treats
    every added token as special, matched only by id, never by its text), else as a string."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if tokenizer is not None else []
    if len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == text:
        return f"<[{ids[0]}]>"
    return json.dumps(text)


def tool_call_grammar(tools: list[Tool], tool_choice: Any, tokenizer: Any = None) -> str | None:
    """A Lark grammar (llguidance dialect) forcing one call in this module's format, for `tool_choice`
    "required" (any listed tool) or {"type": "function", "function": {"name": ...}} (that tool); None for
    "auto"/"none"/absent, where the model decides. Raises APIError for a choice that names no listed tool."""
    if tool_choice in (None, "auto", "none"):
        return None
    if not tools:
        raise APIError(400, "tool_choice needs `tools`: list the functions the model may call", param="tool_choice")
    if tool_choice == "required":
        chosen = tools
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        chosen = [t for t in tools if t.function.name == name]
        if not chosen:
            names = ", ".join(t.function.name for t in tools)
            raise APIError(400, f"tool_choice names '{name}', which is not in tools ({names})", param="tool_choice")
    else:
        raise APIError(
            400,
            "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    schema = {"anyOf": calls, "x-guidance": {"whitespace_flexible": False}}
    return f"start: {_tag(tokenizer, OPEN)} call {_tag(tokenizer, CLOSE)}\ncall: %json {json.dumps(schema)}\n"
