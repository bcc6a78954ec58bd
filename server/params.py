"""Turn an OpenAI request into what the backend takes: checked prompt token ids and engine SamplingParams.

Checks that would otherwise fail deep inside an engine (token ids outside the vocabulary, seeds torch
refuses, a prompt that leaves no room for output) are done here, so the client gets a 400 naming the field.
"""

from __future__ import annotations

from typing import Any

from engine.backend import Backend, ModelInfo
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.structured import StructuredOutputsParams
from server.errors import APIError
from server.protocol import SamplingFields

MAX_N = 64  # completions per request; more would fill the batch for one client
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
TEMPERATURE_RANGE = (0.0, 2.0)  # OpenAI's rule; outside it is a 400, not a silent clamp


def check_model(requested: str | None, backend: Backend) -> None:
    """404 for a model id this server does not serve (an empty or missing id means the served model)."""
    info = backend.info
    if requested and requested not in (info.name, info.path):
        raise APIError(
            404,
            f"model '{requested}' does not exist; this server serves '{info.name}' (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def check_fits_queue(num_seqs: int, info: ModelInfo, param: str) -> None:
    """400 for a request whose sequences (prompts x n) outnumber the waiting queue: it could never be queued,
    so a 429 (retry later) would be wrong. Backends that bound the queue by sequences say so in info.extra.
    --max-queue 0 (no waiting room at all) keeps answering 429: the server is busy, not the request wrong."""
    limit = info.extra.get("max_queue_seqs")
    if limit and num_seqs > limit:
        raise APIError(
            400,
            f"this request needs {num_seqs} sequences (prompts x n) but the server queues at most {limit} "
            f"(--max-queue); send fewer prompts or a smaller n per request",
            param=param,
            code="request_too_large",
        )


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param=param)


def resolve_max_tokens(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, param: str) -> int:
    """max_tokens to use; 400 naming both numbers when prompt + max_tokens do not fit in the context."""
    if num_prompt_tokens == 0:
        raise APIError(400, "the prompt is empty: send at least one token of text", param="prompt")
    if max_tokens is not None and max_tokens < 0:
        raise APIError(400, f"{param} must be >= 0, got {max_tokens}", param=param)
    if max_tokens is None:
        max_tokens = max_model_len - num_prompt_tokens
        if max_tokens <= 0:
            raise APIError(
                400,
                f"this model's maximum context length is {max_model_len} tokens, but the prompt has "
                f"{num_prompt_tokens} tokens, which leaves no room for output; shorten the prompt",
                param="messages",
                code="context_length_exceeded",
            )
    if num_prompt_tokens + max_tokens > max_model_len:
        raise APIError(
            400,
            f"this model's maximum context length is {max_model_len} tokens, but you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} in "
            f"{param}); shorten the prompt or lower {param}",
            param=param,
            code="context_length_exceeded",
        )
    return max_tokens


def sampling_params(
    req: SamplingFields,
    *,
    max_tokens: int,
    vocab_size: int,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    structured: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """SamplingParams from the request's fields (vLLM names, so the mapping is 1:1)."""
    if not 1 <= req.n <= MAX_N:
        raise APIError(400, f"n must be between 1 and {MAX_N}, got {req.n}", param="n")
    if req.temperature is not None and not TEMPERATURE_RANGE[0] <= req.temperature <= TEMPERATURE_RANGE[1]:
        raise APIError(400, f"temperature must be between 0 and 2, got {req.temperature}", param="temperature")
    if req.seed is not None and not SEED_RANGE[0] <= req.seed <= SEED_RANGE[1]:
        raise APIError(400, f"seed must be a 64-bit integer, got {req.seed}", param="seed")
    stop_token_ids = list(req.stop_token_ids or [])
    check_token_ids(stop_token_ids, vocab_size, "stop_token_ids")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    kwargs: dict[str, Any] = dict(
        n=req.n,
        max_tokens=max_tokens,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        seed=req.seed,
        stop=stop,
        stop_token_ids=stop_token_ids,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        structured_outputs=structured,
    )
    optional = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    try:
        return SamplingParams(**kwargs)
    except InvalidRequestError as err:
        raise APIError(400, str(err), param=err.param) from None
