"""POST /v1/chat/completions: messages → chat template → backend → OpenAI response or SSE chunks.

Reasoning (`<think>…</think>`) goes to `reasoning_content`; with `tools`, `<tool_call>` output becomes
`tool_calls` and finish_reason `tool_calls`; response_format and tool_choice "required"/named constrain the output
by grammar (server/structured.py). Streams: a role chunk per choice, content chunks, a finish
chunk per choice, a usage chunk when stream_options.include_usage, then [DONE].
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request

from engine.backend import CompletionDelta, TokenLogprob
from engine.reasoning import ReasoningStreamParser, reasoning_opened_by_prompt
from server.media import load_images
from server.params import check_fits_queue, check_model, resolve_max_tokens, sampling_params
from server.prompts import chat_prompt, request_template
from server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobContent,
    ChatLogprobEntry,
    ChatLogprobs,
    ResponseMessage,
    Usage,
    random_id,
)
from server.streaming import first_then_rest, run_backend, sse_response, until_disconnect
from server.structured import structured_outputs
from server.tool_calls import ToolCallStreamParser, tool_call_deltas
from server.workers import offload

router = APIRouter(tags=["chat"])


def chat_logprobs(logprobs: list[TokenLogprob] | None, top: int) -> list[ChatLogprobContent]:
    return [
        ChatLogprobContent(
            token=lp.token,
            logprob=lp.logprob,
            bytes=list(lp.token.encode("utf-8")),
            top_logprobs=[
                ChatLogprobEntry(token=tok, logprob=value, bytes=list(tok.encode("utf-8")))
                for _, tok, value in lp.top[:top]
            ],
        )
        for lp in logprobs or []
        if lp is not None
    ]


@dataclass
class ChoiceState:
    """What one of the n completions has produced so far, split into reasoning, content and tool calls."""

    reasoning: ReasoningStreamParser
    tools: ToolCallStreamParser | None
    reasoning_text: str = ""
    content_text: str = ""
    logprobs: list[ChatLogprobContent] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    tool_calls: list = field(default_factory=list)
    generated: int = 0

    def feed(self, delta: CompletionDelta, top: int | None) -> tuple[str, str, list[ChatLogprobContent]]:
        """New (reasoning, content, logprobs) from one engine delta; at the end, flush what was held."""
        reasoning, content = self.reasoning.feed(delta.text)
        if delta.finished:
            more_reasoning, more_content = self.reasoning.flush()
            reasoning, content = reasoning + more_reasoning, content + more_content
        if self.tools is not None:
            content = self.tools.feed(content)
            if delta.finished:
                rest, self.tool_calls = self.tools.finish()
                content += rest
        logprobs = chat_logprobs(delta.logprobs, top) if top is not None else []
        self.reasoning_text += reasoning
        self.content_text += content
        self.logprobs += logprobs
        self.generated = max(self.generated, delta.num_generated_tokens)
        if delta.finished:
            self.finish_reason = "tool_calls" if self.tool_calls else delta.finish_reason
            self.stop_reason = delta.stop_reason
        return reasoning, content, logprobs


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
    backend = request.app.state.backend
    check_model(body.model, backend)
    structured = structured_outputs(body, body.tools, body.tool_choice, backend.tokenizer)
    check_fits_queue(body.n, backend.info, "n")
    use_tools = bool(body.tools) and body.tool_choice != "none"
    trusted = request.app.state.settings.trust_request_chat_template
    template = request_template(body.chat_template, body.chat_template_kwargs, trusted)
    settings = request.app.state.settings
    vision = getattr(backend, "vision", None)
    images = await offload(
        request,
        load_images,
        body.messages,
        vision,
        allowed_local_path=settings.allowed_local_media_path,
        max_image_bytes=settings.max_image_bytes,
    )
    prompt_text, prompt = await offload(
        request,
        chat_prompt,
        backend.tokenizer,
        body.messages,
        tools=body.tools if use_tools else None,
        chat_template_kwargs=body.chat_template_kwargs,
        add_generation_prompt=body.add_generation_prompt,
        chat_template=template,
        image_text=vision.image_token * vision.image_token_len if vision is not None else None,
    )
    wanted = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(len(prompt), wanted, backend.info.max_model_len, param)
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(
        body, max_tokens=max_tokens, vocab_size=backend.info.vocab_size, logprobs=top, structured=structured
    )

    request_id = random_id("chatcmpl-")
    opens_think = reasoning_opened_by_prompt(prompt_text)
    states = [
        ChoiceState(ReasoningStreamParser(opens_think), ToolCallStreamParser() if use_tools else None)
        for _ in range(body.n)
    ]
    stream = run_backend(request, prompt, params, request_id, images)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        deltas = await first_then_rest(stream)
        return sse_response(_chunks(deltas, states, request_id, backend.info.name, len(prompt), top, include_usage))
    return await until_disconnect(request, _collect(stream, states, request_id, backend.info.name, len(prompt), top))


async def _collect(
    stream: AsyncIterator[CompletionDelta],
    states: list[ChoiceState],
    request_id: str,
    model: str,
    num_prompt: int,
    top: int | None,
) -> ChatCompletionResponse:
    async for delta in stream:
        states[delta.index].feed(delta, top)
    choices = [
        ChatChoice(
            index=i,
            message=ResponseMessage(
                content=s.content_text if (s.content_text or not s.tool_calls) else None,
                reasoning_content=s.reasoning_text or None,
                tool_calls=s.tool_calls,
            ),
            logprobs=ChatLogprobs(content=s.logprobs) if top is not None else None,
            finish_reason=s.finish_reason or "length",
            stop_reason=s.stop_reason,
        )
        for i, s in enumerate(states)
    ]
    generated = sum(s.generated for s in states)
    usage = Usage(prompt_tokens=num_prompt, completion_tokens=generated, total_tokens=num_prompt + generated)
    return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage)


async def _chunks(
    stream: AsyncIterator[CompletionDelta],
    states: list[ChoiceState],
    request_id: str,
    model: str,
    num_prompt: int,
    top: int | None,
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    created = int(time.time())

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None, logprobs=None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
        }

    for i in range(len(states)):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for delta in stream:
        state = states[delta.index]
        reasoning, content, logprobs = state.feed(delta, top)
        message: dict[str, Any] = {}
        if reasoning:
            message["reasoning_content"] = reasoning
        if content:
            message["content"] = content
        if message or logprobs:
            lp = {"content": [entry.model_dump() for entry in logprobs]} if top is not None else None
            yield chunk(delta.index, message or {"content": ""}, logprobs=lp)
        if delta.finished:
            if state.tool_calls:
                yield chunk(delta.index, {"tool_calls": tool_call_deltas(state.tool_calls)})
            yield chunk(delta.index, {}, finish_reason=state.finish_reason)
    for i, state in enumerate(states):
        if state.finish_reason is None:  # the engine ended without a final delta for this choice
            yield chunk(i, {}, finish_reason="length")
    if include_usage:
        generated = sum(s.generated for s in states)
        usage = Usage(prompt_tokens=num_prompt, completion_tokens=generated, total_tokens=num_prompt + generated)
        yield {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage.model_dump(),
        }
