"""POST /v1/embeddings: mean-pooled, L2-normalised last hidden states (FastGPT needs an embedding model)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from server.errors import APIError
from server.params import check_model, check_token_ids
from server.prompts import encode, normalize_prompts
from server.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, Usage
from server.workers import json_response, offload

router = APIRouter(tags=["embeddings"])


def _token_ids(tokenizer: Any, vocab_size: int, inputs: list[str | list[int]]) -> list[list[int]]:
    """Every input as token ids (in the worker pool: long texts take a while to tokenize)."""
    batch = []
    for text in inputs:
        if isinstance(text, str):
            batch.append(encode(tokenizer, text, add_special_tokens=True))
        else:
            check_token_ids(text, vocab_size, "input")
            batch.append(text)
    return batch


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> Any:
    backend = request.app.state.backend
    info = backend.info
    check_model(body.model, backend)
    batch = await offload(
        request, _token_ids, backend.tokenizer, info.vocab_size, normalize_prompts(body.input, "input")
    )
    for ids in batch:
        if not ids:
            raise APIError(400, "input: an empty string has no tokens to embed", param="input")
        if len(ids) > info.max_model_len:
            raise APIError(
                400,
                f"input has {len(ids)} tokens, more than this model's maximum context length of "
                f"{info.max_model_len} tokens; split it into shorter pieces",
                param="input",
            )
    vectors = await backend.embed(batch)
    if body.dimensions is not None and body.dimensions != len(vectors[0]):
        raise APIError(
            400,
            f"dimensions={body.dimensions} is not supported: this model's embeddings have {len(vectors[0])} dimensions",
            param="dimensions",
        )
    tokens = sum(len(ids) for ids in batch)
    return await json_response(request, _response, vectors, body.encoding_format, info.name, tokens)


def _response(vectors: list[list[float]], encoding_format: str, model: str, tokens: int) -> EmbeddingResponse:
    data = []
    for i, vector in enumerate(vectors):
        if encoding_format == "base64":  # little-endian float32, as OpenAI's SDK decodes it
            embedding: list[float] | str = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        else:
            embedding = [float(x) for x in vector]
        data.append(EmbeddingData(index=i, embedding=embedding))
    return EmbeddingResponse(data=data, model=model, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))
