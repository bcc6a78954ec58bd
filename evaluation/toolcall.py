"""Tool calling (`minimind eval toolcall`): does the model call the right tool with the right arguments, and does
it answer correctly once it has the tool's result?

One case per JSONL line:

    {"messages": [{"role": "user", "content": "What is 3 + 4?"}],      (or "prompt": "What is 3 + 4?")
     "tools": [{"type": "function", "function": {"name": "calculator", "parameters": {...}}}],
     "expected_call": {"name": "calculator", "arguments": {"expression": "3+4"}},   (null: no call expected)
     "tool_result": "7",                                               (what the tool returns to the model)
     "answer": "7"}                                                    (optional: the final answer)

The model answers greedily with the tools listed. The call is correct when its first call names the expected
tool with arguments equal to the expected ones as JSON (an `expected_call` without "arguments" checks the name
only), or, with `expected_call: null`, when it calls nothing. The canned `tool_result` (the same text for each
call made) is then given back as the tool turn, so the evaluation needs no live tools and is repeatable, and the
model answers again. The answer is correct when the reply's last number equals a numeric `answer`, or when the
reply contains a text `answer` (case and surrounding space ignored).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluation.backends import EvalError, EvalModel

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
NO_CALL = object()  # expected_call: null


@dataclass
class Case:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    expected_call: Any  # {"name", "arguments"?}, NO_CALL, or None when the line does not check calls
    tool_result: str
    answer: str | None
    where: str  # FILE:LINE


def read_cases(path: Path) -> list[Case]:
    if not path.is_file():
        raise EvalError(f"{path}: no such file (a JSONL of tool-calling cases)")
    cases = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if raw.strip():
            cases.append(parse_case(raw, f"{path}:{lineno}"))
    if not cases:
        raise EvalError(f"{path}: no cases")
    return cases


def parse_case(raw: str, where: str) -> Case:
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as err:
        raise EvalError(f"{where}: invalid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise EvalError(f"{where}: expected a JSON object")
    messages = row.get("messages", row.get("prompt"))
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise EvalError(f'{where}: expected "messages": a list of {{"role", "content"}} (or "prompt": text)')
    tools = row.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise EvalError(f'{where}: "tools" must be a list of OpenAI tool objects {{"type": "function", ...}}')
    expected: Any = None
    if "expected_call" in row:
        expected = row["expected_call"]
        if expected is None:
            expected = NO_CALL
        elif not isinstance(expected, dict) or not isinstance(expected.get("name"), str):
            raise EvalError(f'{where}: "expected_call" must be {{"name": ..., "arguments": {{...}}}} or null')
    answer = row.get("answer")
    if expected is None and answer is None:
        raise EvalError(f'{where}: nothing to check; give "expected_call", "answer" or both')
    result = row.get("tool_result", "")
    if not isinstance(result, str):
        result = json.dumps(result, ensure_ascii=False)
    return Case(messages, tools, expected, result, None if answer is None else str(answer), where)


def call_correct(expected: Any, calls: list[tuple[str, str]]) -> bool:
    if expected is NO_CALL:
        return not calls
    if not calls:
        return False
    name, arguments = calls[0]
    if name != expected["name"]:
        return False
    if "arguments" not in expected:
        return True
    try:
        return json.loads(arguments) == expected["arguments"]
    except json.JSONDecodeError:
        return False


def answer_correct(answer: str, reply: str) -> bool:
    truth = NUMBER.fullmatch(answer.strip())
    if truth:
        found = NUMBER.findall(reply)
        return bool(found) and math.isclose(float(found[-1]), float(truth.group()), rel_tol=1e-6, abs_tol=1e-6)
    return answer.strip().lower() in reply.lower()


def tool_turns(calls: list[tuple[str, str]], content: str, result: str) -> list[dict[str, Any]]:
    """The assistant's calls and one tool message per call, in the OpenAI message form."""
    ids = [f"call_{n}" for n in range(len(calls))]
    assistant = {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {"id": i, "type": "function", "function": {"name": name, "arguments": arguments}}
            for i, (name, arguments) in zip(ids, calls)
        ],
    }
    return [assistant, *({"role": "tool", "tool_call_id": i, "content": result} for i in ids)]


def evaluate_toolcall(model: EvalModel, cases: list[Case], max_tokens: int) -> dict[str, Any]:
    rows = []
    for case in cases:
        content, calls = model.chat_with_tools(case.messages, case.tools, max_tokens)
        reply = content
        if calls:
            messages = case.messages + tool_turns(calls, content, case.tool_result)
            reply, _ = model.chat_with_tools(messages, case.tools, max_tokens)
        row: dict[str, Any] = {"where": case.where, "calls": [list(c) for c in calls], "reply": reply}
        if case.expected_call is not None:
            row["call_correct"] = call_correct(case.expected_call, calls)
        if case.answer is not None:
            row["answer_correct"] = answer_correct(case.answer, reply)
        rows.append(row)

    def fraction(key: str) -> float | None:
        checked = [row[key] for row in rows if key in row]
        return sum(checked) / len(checked) if checked else None

    return {
        "model": model.name,
        "cases": len(rows),
        "call_accuracy": fraction("call_correct"),
        "answer_accuracy": fraction("answer_correct"),
        "results": rows,
    }
