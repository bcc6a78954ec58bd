"""The Responses API's wire format (POST /v1/responses) mapped onto the chat pieces this server already has.

Input items become chat messages (so the same chat template renders them), function tools become chat
tools, and the model's reasoning, text and tool calls become output items. What a text model cannot do
(images, files, built-in tools, structured output, background runs) is refused with a 400 naming the field.
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from server.errors import APIError
from server.protocol import ChatMessage, FunctionCall, FunctionDefinition, Request, Tool, ToolCall, random_id

M = TypeVar("M", bound=BaseModel)


def _build(model: type[M], where: str, **fields: Any) -> M:
    """A protocol object from client-given fields; a field of the wrong type is a 400 naming where it was."""
    try:
        return model(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise APIError(400, f"{where}.{field}: {first['msg']}", param=f"{where}.{field}") from None


class ResponsesRequest(Request):
    """OpenAI's ResponseCreateParams; fields this server does not use are ignored, unsupported ones refused."""

    model: str | None = None
    input: str | list[dict[str, Any]] = ""
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = "auto"
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    stream: bool = False
    store: bool = True
    metadata: dict[str, str] | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    truncation: str | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    user: str | None = None


def check_supported(req: ResponsesRequest) -> None:
    """400 for the Responses features a local text model does not have."""
    refused = [
        (req.background, "background", "background runs are not supported; omit background"),
        (req.conversation is not None, "conversation", "conversations are not supported; use previous_response_id"),
        (req.prompt is not None, "prompt", "stored prompt templates are not supported; send input (and instructions)"),
        (
            req.truncation not in (None, "disabled"),
            "truncation",
            "only truncation 'disabled' is supported: shorten the input instead",
        ),
    ]
    for bad, param, message in refused:
        if bad:
            raise APIError(400, message, param=param)
    text_format = (req.text or {}).get("format") or {}
    if not isinstance(text_format, dict) or text_format.get("type", "text") != "text":
        raise APIError(400, "text.format: only {'type': 'text'} is supported by this server", param="text.format")
    if isinstance(req.tool_choice, dict) or req.tool_choice not in (None, "auto", "none"):
        raise APIError(
            400, "tool_choice: only 'auto' and 'none' are supported (the model decides itself)", param="tool_choice"
        )


def chat_tools(tools: list[dict[str, Any]] | None) -> list[Tool]:
    """Responses function tools (`{"type": "function", "name", "parameters"}`) as chat tools."""
    out = []
    for i, tool in enumerate(tools or []):
        where = f"tools[{i}]"
        if tool.get("type") != "function":
            raise APIError(
                400,
                f"tools[{i}]: type {tool.get('type')!r} is not supported; this server runs only function tools",
                param=f"tools[{i}].type",
            )
        spec = tool.get("function") if isinstance(tool.get("function"), dict) else tool  # chat form accepted too
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise APIError(400, f"{where}: a function tool needs a 'name'", param=f"{where}.name")
        fields = {k: spec.get(k) for k in ("name", "description", "parameters")}
        out.append(Tool(function=_build(FunctionDefinition, where, **fields)))
    return out


def _text_of(content: Any, where: str) -> str:
    """A message's content as text: a string, or its text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}: content must be a string or a list of parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise APIError(
                400,
                f"{where}[{j}]: content type {kind!r} is not supported by this text model; send input_text parts",
                param=f"{where}[{j}].type",
            )
        texts.append(str(part.get("text") or ""))
    return "\n".join(texts)


def input_messages(value: str | list[dict[str, Any]]) -> list[ChatMessage]:
    """Input items as chat messages: messages, function calls (assistant tool_calls) and their outputs."""
    if isinstance(value, str):
        return [ChatMessage(role="user", content=value)]
    messages: list[ChatMessage] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(
                    400, f"{where}: role {role!r} is not one of user, assistant, system, developer", param=where
                )
            text = _text_of(item.get("content", ""), f"{where}.content")
            messages.append(ChatMessage(role="system" if role == "developer" else role, content=text))
        elif kind == "function_call":
            function = _build(FunctionCall, where, name=item.get("name"), arguments=item.get("arguments") or "{}")
            call = _build(ToolCall, where, id=item.get("call_id") or random_id("call_"), function=function)
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif kind == "function_call_output":
            output = item.get("output", "")
            text = output if isinstance(output, str) else _text_of(output, f"{where}.output")
            messages.append(_build(ChatMessage, where, role="tool", content=text, tool_call_id=item.get("call_id")))
        elif kind == "reasoning":
            continue  # earlier reasoning is not shown to the model again, as with chat completions
        else:
            raise APIError(
                400,
                f"{where}: item type {kind!r} is not supported; send message, function_call or function_call_output "
                "items",
                param=f"{where}.type",
            )
    return messages


def message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
    return {
        "id": item_id or random_id("msg_"),
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [output_text_part(text)],
    }


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def reasoning_item(text: str, item_id: str | None = None, status: str = "completed") -> dict[str, Any]:
    return {
        "id": item_id or random_id("rs_"),
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def function_call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {
        "id": random_id("fc_"),
        "type": "function_call",
        "call_id": call.id,
        "name": call.function.name,
        "arguments": call.function.arguments,
        "status": status,
    }


def output_messages(output: list[dict[str, Any]]) -> list[ChatMessage]:
    """A response's output items as the assistant message a follow-up request continues from."""
    text = "".join(
        part["text"] for item in output if item["type"] == "message" for part in item["content"] if "text" in part
    )
    calls = [
        ToolCall(id=item["call_id"], function=FunctionCall(name=item["name"], arguments=item["arguments"]))
        for item in output
        if item["type"] == "function_call"
    ]
    return [ChatMessage(role="assistant", content=text or None, tool_calls=calls or None)]


def response_object(
    req: ResponsesRequest,
    *,
    response_id: str,
    model: str,
    created_at: int | None = None,
    status: str = "in_progress",
    output: list[dict[str, Any]] | None = None,
    usage: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Response object (as OpenAI sends it), echoing the request's settings."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at or int(time.time()),
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": model,
        "output": output or [],
        "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "reasoning": req.reasoning,
        "store": req.store,
        "temperature": req.temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": req.tool_choice or "auto",
        "tools": req.tools or [],
        "top_p": req.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": req.user,
        "metadata": req.metadata or {},
    }


def usage_object(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }
