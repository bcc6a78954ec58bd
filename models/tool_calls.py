"""`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in model output: the format our chat template
(models/chat_template.jinja) teaches, read back into calls.

The Hermes/Qwen convention of MiniMind's and Qwen's templates. It lives beside the template because both the
server (OpenAI `tool_calls`) and training (tool-use rollouts) read it. Hand-written: a few lines of the
product's own format.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


@dataclass
class ParsedCall:
    name: str
    arguments: str  # a JSON text, as OpenAI's `function.arguments`


def _to_call(body: str) -> ParsedCall | None:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ParsedCall(data["name"], arguments)


def parse_tool_calls(text: str) -> tuple[str | None, list[ParsedCall]]:
    """(content outside the calls or None, calls). Text whose calls are not all valid JSON stays content."""
    if OPEN not in text:
        return text, []
    calls = [_to_call(m.group(1)) for m in _CALL.finditer(text)]
    if not calls or any(call is None for call in calls):
        return text, []
    content = _CALL.sub("", text).strip()
    return content or None, [call for call in calls if call is not None]
