"""The sandboxed tools of tool-use RL (the `agent` stage): a calculator and a lookup over a local JSON file.

Tools never reach the network, the file system beyond the one JSON file read at start-up, or Python's `eval`:
the calculator walks the expression's syntax tree and allows numbers, + - * / // % ** and parentheses only,
with bounded sizes, so every call ends quickly by construction; a wall-clock limit (`tool_timeout_s`, by
SIGALRM on the main thread) is the second guard. A failed call returns an `error: ...` text as its result,
which the model sees like any result: a bad call is part of what RL teaches away.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.tool_calls import ParsedCall
from training.errors import TrainingError

MAX_EXPRESSION = 200  # characters
MAX_MAGNITUDE = 1e30
MAX_EXPONENT = 64

BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class ToolError(Exception):
    """A call the tool refuses; its message becomes the tool's result."""


def evaluate(expression: str) -> float | int:
    """The value of an arithmetic expression, without eval: only numbers and arithmetic operators."""
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"expression longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None

    def walk(node: ast.AST) -> float | int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            value = node.value
        elif isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
            value = UNARY[type(node.op)](walk(node.operand))
        elif isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ToolError(f"exponent above {MAX_EXPONENT}")
            try:
                value = BINARY[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ToolError("division by zero") from None
        else:
            raise ToolError(f"only numbers and + - * / // % ** are allowed, not {type(node).__name__}")
        if isinstance(value, complex) or not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
            raise ToolError("result out of range")
        return value

    return walk(tree)


def format_number(value: float | int) -> str:
    """7 not 7.0; 3.5; at most 10 significant digits for fractions."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else format(value, ".10g")


def calculator(arguments: dict[str, Any]) -> str:
    expression = arguments.get("expression")
    if not isinstance(expression, str):
        raise ToolError('calculator takes {"expression": "arithmetic, e.g. 3 * (4 + 5)"}')
    return format_number(evaluate(expression))


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments
    run: Callable[[dict[str, Any]], str]

    def schema(self) -> dict[str, Any]:
        """The OpenAI function form the chat template lists in the system turn."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


def calculator_tool() -> Tool:
    return Tool(
        "calculator",
        "Evaluate an arithmetic expression (numbers, + - * / // % ** and parentheses).",
        {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
        calculator,
    )


def lookup_tool(path: str) -> Tool:
    """Looks keys up in a JSON object read once from `path` (the only file a tool touches)."""
    if not path:
        raise TrainingError("tools: lists lookup but tool_lookup_file: is empty; set it to a JSON object file")
    file = Path(path).expanduser()
    try:
        table = json.loads(file.read_text(encoding="utf-8"))
    except OSError as err:
        raise TrainingError(f"tool_lookup_file {file}: cannot read it ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise TrainingError(f"tool_lookup_file {file}: not valid JSON ({err})") from None
    if not isinstance(table, dict):
        raise TrainingError(f"tool_lookup_file {file}: expected a JSON object of key: value")

    def lookup(arguments: dict[str, Any]) -> str:
        key = arguments.get("key")
        if not isinstance(key, str):
            raise ToolError('lookup takes {"key": "text"}')
        if key not in table:
            raise ToolError(f"no entry for {key!r}")
        value = table[key]
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    return Tool(
        "lookup",
        "Look a key up in the reference table and return its value.",
        {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]},
        lookup,
    )


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ToolError when the block runs longer than `seconds` (main thread only: elsewhere the tools' own
    bounds are the limit, since Python cannot interrupt another thread)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise ToolError(f"timed out after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class ToolResult:
    name: str
    arguments: str
    output: str
    ok: bool


class ToolRegistry:
    """The tools a config enables (`tools: [calculator, lookup]`), run by name with a time limit."""

    def __init__(self, names: list[str], lookup_file: str = "", timeout_s: float = 1.0) -> None:
        makers: dict[str, Callable[[], Tool]] = {
            "calculator": calculator_tool,
            "lookup": lambda: lookup_tool(lookup_file),
        }
        unknown = [name for name in names if name not in makers]
        if unknown or not names:
            raise TrainingError(
                f"tools: {', '.join(unknown) or 'empty'}; choose from {', '.join(makers)} (e.g. tools: [calculator])"
            )
        self.tools = {name: makers[name]() for name in names}
        self.timeout_s = timeout_s

    def schemas(self) -> list[dict[str, Any]]:
        return [tool.schema() for tool in self.tools.values()]

    def run(self, call: ParsedCall) -> ToolResult:
        """The call's result text; `ok` is False for an unknown tool, bad arguments or a refused call."""
        tool = self.tools.get(call.name)
        try:
            if tool is None:
                raise ToolError(f"unknown tool {call.name!r}; available: {', '.join(self.tools)}")
            try:
                arguments = json.loads(call.arguments)
            except json.JSONDecodeError:
                raise ToolError("arguments are not valid JSON") from None
            if not isinstance(arguments, dict):
                raise ToolError("arguments must be a JSON object")
            with time_limit(self.timeout_s):
                output = tool.run(arguments)
            return ToolResult(call.name, call.arguments, output, True)
        except ToolError as err:
            return ToolResult(call.name, call.arguments, f"error: {err}", False)
