"""POST /tokenize and /detokenize (vLLM's extension): the served tokenizer, for clients that count tokens."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from server.errors import APIError
from server.params import check_model, check_token_ids
from server.prompts import chat_prompt, encode, request_template
from server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.workers import json_response, offload

router = APIRouter(tags=["tokenizer"])


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> Any:
    backend = request.app.state.backend
    check_model(body.model, backend)
    if body.messages:
        trusted = request.app.state.settings.trust_request_chat_template
        template = request_template(body.chat_template, body.chat_template_kwargs, trusted)
        _, tokens = await offload(
            request,
            chat_prompt,
            backend.tokenizer,
            body.messages,
            chat_template_kwargs=body.chat_template_kwargs,
            add_generation_prompt=body.add_generation_prompt,
            chat_template=template,
        )
    elif body.prompt is not None:
        tokens = await offload(
            request, encode, backend.tokenizer, body.prompt, add_special_tokens=body.add_special_tokens
        )
    else:
        raise APIError(400, "send either 'prompt' (a string) or 'messages' (a chat)", param="prompt")
    return await json_response(request, _tokenize_response, tokens, backend.info.max_model_len)


def _tokenize_response(tokens: list[int], max_model_len: int) -> TokenizeResponse:
    return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=max_model_len)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    backend = request.app.state.backend
    check_model(body.model, backend)
    return DetokenizeResponse(
        prompt=await offload(request, _decode, backend.tokenizer, backend.info.vocab_size, body.tokens)
    )


def _decode(tokenizer: Any, vocab_size: int, tokens: list[int]) -> str:
    check_token_ids(tokens, vocab_size, "tokens")
    return tokenizer.decode(tokens)
