"""POST /v1/completions: the legacy text API (prompt string/list/token ids, echo, logprobs).

`echo=True, logprobs=1, max_tokens=0|1` returns the prompt's own token logprobs (first one null), which is
what lm-evaluation-harness's `local-completions` needs for log-likelihood tasks.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request

from engine.backend import CompletionDelta, TokenLogprob
from server.params import check_fits_queue, check_model, check_token_ids, resolve_max_tokens, sampling_params
from server.prompts import encode, normalize_prompts
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    random_id,
)
from server.streaming import first_then_rest, merge, run_backend, sse_response, until_disconnect
from server.structured import structured_outputs
from server.workers import offload

router = APIRouter(tags=["completions"])


@dataclass
class LegacyLogprobs:
    """OpenAI's legacy logprobs (tokens, token_logprobs, top_logprobs, text_offset), built token by token."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    length: int = 0  # characters so far, for the next text_offset

    def add(self, token: str, entry: TokenLogprob | None, top: int) -> None:
        self.tokens.append(token)
        self.text_offset.append(self.length)
        self.length += len(token)
        if entry is None:
            self.token_logprobs.append(None)
            self.top_logprobs.append(None)
            return
        self.token_logprobs.append(entry.logprob)
        best = {tok: value for _, tok, value in entry.top[:top]}
        best.setdefault(entry.token, entry.logprob)  # the chosen token is always listed, as in vLLM
        self.top_logprobs.append(best)

    def model(self, start: int = 0) -> CompletionLogprobs:
        return CompletionLogprobs(
            tokens=self.tokens[start:],
            token_logprobs=self.token_logprobs[start:],
            top_logprobs=self.top_logprobs[start:],
            text_offset=self.text_offset[start:],
        )


@dataclass
class Choice:
    text: str = ""
    echoed: bool = False
    logprobs: LegacyLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    generated: int = 0


def _echo(job: Job, p: int, choice: Choice, delta: CompletionDelta | None) -> str:
    """Put prompt `p` in front of a choice (echo): its text, and with logprobs its tokens' logprobs."""
    text, token_texts = job.echo_texts[p]
    choice.text += text
    if choice.logprobs is not None:
        ids = job.prompt_ids[p]
        entries = (delta.prompt_logprobs if delta is not None else None) or [None] * len(ids)
        for token_text, entry in zip(token_texts, entries):
            choice.logprobs.add(token_text, entry, job.top or 0)
    return text


def _prepare(
    tokenizer: Any, vocab_size: int, prompts: list[str | list[int]], echo: bool, with_tokens: bool
) -> tuple[list[list[int]], list[tuple[str, list[str]]]]:
    """Token ids of every prompt and, for echo, each prompt's text and token texts (in the worker pool)."""
    prompt_ids = []
    for prompt in prompts:
        if isinstance(prompt, str):
            prompt_ids.append(encode(tokenizer, prompt, add_special_tokens=True))
        else:
            check_token_ids(prompt, vocab_size, "prompt")
            prompt_ids.append(prompt)
    echo_texts = []
    if echo:
        for prompt, ids in zip(prompts, prompt_ids):
            text = prompt if isinstance(prompt, str) else tokenizer.decode(ids)
            echo_texts.append((text, [tokenizer.decode([t]) for t in ids] if with_tokens else []))
    return prompt_ids, echo_texts


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request) -> Any:
    backend = request.app.state.backend
    info = backend.info
    check_model(body.model, backend)
    prompts = normalize_prompts(body.prompt)
    check_fits_queue(len(prompts) * body.n, info, "prompt" if len(prompts) > 1 else "n")
    with_tokens = body.echo and body.logprobs is not None
    prompt_ids, echo_texts = await offload(
        request, _prepare, backend.tokenizer, info.vocab_size, prompts, body.echo, with_tokens
    )
    max_tokens = min(
        resolve_max_tokens(len(ids), body.max_tokens, info.max_model_len, "max_tokens") for ids in prompt_ids
    )
    top = body.logprobs
    params = sampling_params(
        body,
        max_tokens=max_tokens,
        vocab_size=info.vocab_size,
        logprobs=top,
        prompt_logprobs=top if body.echo and top is not None else None,
        structured=structured_outputs(body),
    )
    request_id = random_id("cmpl-")
    streams = [run_backend(request, ids, params, f"{request_id}-{i}") for i, ids in enumerate(prompt_ids)]
    choices = [Choice(logprobs=LegacyLogprobs() if top is not None else None) for _ in range(len(prompts) * body.n)]
    num_prompt = sum(len(ids) for ids in prompt_ids)
    ctx = Job(prompt_ids, echo_texts, choices, body.n, body.echo, top)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        merged = await first_then_rest(merge(streams))
        return sse_response(_chunks(merged, ctx, request_id, info.name, num_prompt, include_usage))
    return await until_disconnect(request, _collect(merge(streams), ctx, request_id, info.name, num_prompt))


@dataclass
class Job:
    """One /v1/completions request in flight: its prompts and the choices being filled (n per prompt)."""

    prompt_ids: list[list[int]]
    echo_texts: list[tuple[str, list[str]]]  # per prompt when echo: its text and its tokens' texts
    choices: list[Choice]
    n: int
    echo: bool
    top: int | None


def _apply(job: Job, p: int, delta: CompletionDelta) -> tuple[int, str]:
    """Fold one delta of prompt `p` into its choice; returns (choice index, new text incl. any echoed prompt)."""
    index = p * job.n + delta.index
    choice = job.choices[index]
    new_text = ""
    if job.echo and not choice.echoed:
        choice.echoed = True
        new_text += _echo(job, p, choice, delta)
    choice.text += delta.text
    new_text += delta.text
    if choice.logprobs is not None and delta.logprobs:
        for entry in delta.logprobs:
            if entry is not None:
                choice.logprobs.add(entry.token, entry, job.top or 0)
    choice.generated = max(choice.generated, delta.num_generated_tokens)
    if delta.finished:
        choice.finish_reason = delta.finish_reason
        choice.stop_reason = delta.stop_reason
    return index, new_text


async def _collect(
    merged: AsyncIterator[tuple[int, CompletionDelta]], ctx: Job, request_id: str, model: str, num_prompt: int
) -> CompletionResponse:
    choices = ctx.choices
    async for p, delta in merged:
        _apply(ctx, p, delta)
    out = [
        CompletionChoice(
            index=i,
            text=c.text,
            logprobs=c.logprobs.model() if c.logprobs is not None else None,
            finish_reason=c.finish_reason or "length",
            stop_reason=c.stop_reason,
        )
        for i, c in enumerate(choices)
    ]
    generated = sum(c.generated for c in choices)
    usage = Usage(prompt_tokens=num_prompt, completion_tokens=generated, total_tokens=num_prompt + generated)
    return CompletionResponse(id=request_id, model=model, choices=out, usage=usage)


async def _chunks(
    merged: AsyncIterator[tuple[int, CompletionDelta]],
    ctx: Job,
    request_id: str,
    model: str,
    num_prompt: int,
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    created = int(time.time())
    choices = ctx.choices

    def chunk(index: int, text: str, logprobs: CompletionLogprobs | None, finish_reason: str | None) -> dict[str, Any]:
        choice = {
            "index": index,
            "text": text,
            "logprobs": logprobs.model_dump() if logprobs is not None else None,
            "finish_reason": finish_reason,
        }
        return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}

    async for p, delta in merged:
        before = len(choices[p * ctx.n + delta.index].logprobs.tokens) if ctx.top is not None else 0
        index, text = _apply(ctx, p, delta)
        choice = choices[index]
        logprobs = choice.logprobs.model(before) if choice.logprobs is not None else None
        if text or delta.finished or (logprobs is not None and logprobs.tokens):
            yield chunk(index, text, logprobs, choice.finish_reason if delta.finished else None)
    for i, choice in enumerate(choices):
        if choice.finish_reason is None:
            yield chunk(i, "", None, "length")
    if include_usage:
        generated = sum(c.generated for c in choices)
        usage = Usage(prompt_tokens=num_prompt, completion_tokens=generated, total_tokens=num_prompt + generated)
        yield {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage.model_dump(),
        }
