"""`VllmBackend`: the server's Backend protocol on vLLM's async engine (vllm.v1 AsyncLLM), for GPU serving.

Serves the Hugging Face directories `minimind convert` writes (llama / qwen3 / qwen3_moe / qwen2_moe), which
vLLM loads natively. The request → vLLM SamplingParams mapping is a pure function (`vllm_sampling_kwargs`)
so it is tested without vLLM installed; vLLM itself is imported only when the backend is built.

Two things vLLM's generation engine does not do are filled in here: `max_tokens=0` (echo + logprobs
scoring, as lm-evaluation-harness asks) runs one token and reports none, and /v1/embeddings runs the same
weights through transformers (loaded on the first embeddings request), pooled as the native backend pools.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.backend import CompletionDelta, EngineStats, ModelInfo, TokenLogprob
from engine.errors import EngineError, EngineShutdownError, InvalidRequestError, PromptTooLongError, QueueFullError
from engine.sampling_params import SamplingParams
from models.dtypes import LONG_NAMES, dtype_name


def vllm_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` (same field names; only top_k's "off" value differs).

    `output_kind` is left to the caller (it is a vLLM enum): the backend asks for deltas. `logprobs_mode` is an
    engine-wide setting in vLLM (`--logprobs-mode`), not a request field: only the default (raw) is served.
    """
    if params.logprobs_mode != "raw":
        raise InvalidRequestError(
            f"logprobs_mode {params.logprobs_mode!r}: the vLLM backend returns raw log-probs only; use the native "
            "backend for the sampled distribution's log-probs",
            param="logprobs_mode",
        )
    return dict(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else -1,  # vLLM: -1 = off in every version since 0.8
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        max_tokens=params.max_tokens,
        min_tokens=params.min_tokens,
        stop=list(params.stop) or None,
        stop_token_ids=list(params.stop_token_ids) or None,
        ignore_eos=params.ignore_eos,
        seed=params.seed,
        logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
        skip_special_tokens=params.skip_special_tokens,
        include_stop_str_in_output=params.include_stop_str_in_output,
        detokenize=params.detokenize,
        # passed on as vLLM's StructuredOutputsParams (same field names); vLLM's own grammar backend enforces it
        structured_outputs=None if params.structured_outputs is None else asdict(params.structured_outputs),
    )


def hf_embeddings(model: Any, prompts: list[list[int]], device: Any) -> list[list[float]]:
    """Mean of the last hidden states (after the final norm) over each prompt, L2-normalised.

    `model` is a transformers base model (AutoModel); the native backend pools its own model the same way, so
    both backends give the same vectors for the same weights.
    """
    import torch
    import torch.nn.functional as F

    vectors = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            hidden = model(input_ids=ids).last_hidden_state[0].float()
            vectors.append(F.normalize(hidden.mean(0), dim=-1).tolist())
    return vectors


def _token_logprob(token_id: int, position: dict[int, Any], top: int) -> TokenLogprob:
    """One vLLM logprobs position ({token_id: Logprob(logprob, rank, decoded_token)}) in the engine's form."""
    chosen = position[token_id]
    ranked = sorted(position.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 30)
    best = [(tid, lp.decoded_token or "", lp.logprob) for tid, lp in ranked if lp.rank is not None and lp.rank <= top]
    return TokenLogprob(token_id=token_id, token=chosen.decoded_token or "", logprob=chosen.logprob, top=best)


def _prompt_logprobs(ids: list[int], positions: Any, top: int) -> list[TokenLogprob | None]:
    out: list[TokenLogprob | None] = []
    for token_id, position in zip(ids, positions):
        out.append(None if position is None else _token_logprob(token_id, position, top))
    return out


def refuse_vision_model(model: str | Any) -> None:
    """vLLM has no implementation of our minimind_vlm type: say so at start-up, not at the first image."""
    config_file = Path(str(model)) / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "minimind_vlm":
        raise EngineError(
            f"{model} is a MiniMind-V vision-language model, which --backend vllm cannot serve (vLLM has no "
            "implementation of it); serve it with --backend native"
        )


class VllmBackend:
    """Backend protocol over `vllm.v1.engine.async_llm.AsyncLLM` (continuous batching, paged attention)."""

    def __init__(
        self,
        model: str,
        *,
        served_model_name: str | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_queue: int = 256,
        dtype: str | None = None,
        tokenizer: str | None = None,
        draft_model: str | None = None,
        num_speculative_tokens: int = 4,
        lora: str | None = None,
        gpu_memory_utilization: float = 0.85,
        kv_cache_memory: int | None = None,
    ) -> None:
        refuse_vision_model(model)
        if lora is not None:
            raise InvalidRequestError(
                "--lora is not supported with --backend vllm: merge the adapter first "
                "(minimind convert --lora ADAPTER) and serve the merged directory",
                param="lora",
            )
        try:
            from vllm import AsyncEngineArgs
        except ImportError as err:
            raise EngineError(
                f"--backend vllm needs vLLM installed (pip install 'my-minimind[vllm]' on a GPU machine): {err}"
            ) from None
        from transformers import AutoTokenizer

        self.model_path = str(model)
        self.vision = None  # refuse_vision_model above: text models only
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        speculative = {"model": draft_model, "num_speculative_tokens": num_speculative_tokens} if draft_model else None
        self.engine_args = AsyncEngineArgs(
            model=self.model_path,
            tokenizer=tokenizer or self.model_path,
            served_model_name=served_model_name,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            dtype=LONG_NAMES[dtype_name(dtype or "auto")],
            gpu_memory_utilization=gpu_memory_utilization,
            speculative_config=speculative,
            disable_log_stats=False,
            **({"kv_cache_memory_bytes": kv_cache_memory} if kv_cache_memory is not None else {}),
        )
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.served_model_name = served_model_name or Path(self.model_path.rstrip("/")).name
        self.engine: Any = None
        self.embedder: Any = None  # transformers copy of the weights, loaded on the first embeddings request
        self.embedder_lock = asyncio.Lock()
        self.in_flight: set[str] = set()
        self.accepting = True
        self.info = ModelInfo(
            name=self.served_model_name,
            path=self.model_path,
            max_model_len=max_model_len or 0,
            vocab_size=len(self.tokenizer),
            backend="vllm",
            device="cuda",
            dtype=LONG_NAMES[dtype_name(dtype or "auto")],
        )

    async def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        self.engine = AsyncLLM.from_engine_args(self.engine_args)
        model_config = self.engine.model_config
        self.info.max_model_len = model_config.max_model_len
        self.info.vocab_size = max(model_config.get_vocab_size(), len(self.tokenizer))
        self.info.dtype = str(model_config.dtype).removeprefix("torch.")

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        self.accepting = False
        deadline = asyncio.get_running_loop().time() + drain_timeout
        while self.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self.in_flight):
            await self.abort(request_id)
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str, images: Any = None
    ) -> AsyncIterator[CompletionDelta]:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        if not self.accepting:
            raise EngineShutdownError("the server is shutting down and accepts no new requests")
        if len(self.in_flight) >= self.max_num_seqs + self.max_queue:
            raise QueueFullError(
                f"{len(self.in_flight)} requests are running or waiting (limit {self.max_num_seqs} + "
                f"--max-queue {self.max_queue}); retry later"
            )
        ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        limit = self.info.max_model_len
        if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
            raise PromptTooLongError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceed the context of {limit} tokens",
                param="max_tokens",
            )
        kwargs = vllm_sampling_kwargs(params)
        score_only = params.max_tokens == 0  # vLLM generates at least one token: run one, report none
        if score_only:
            kwargs.update(max_tokens=1, min_tokens=0)
        if kwargs["structured_outputs"] is not None:
            from vllm.sampling_params import StructuredOutputsParams as VllmStructuredOutputsParams

            kwargs["structured_outputs"] = VllmStructuredOutputsParams(**kwargs["structured_outputs"])
        vllm_params = VllmSamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA)
        generated: dict[int, int] = {}
        self.in_flight.add(request_id)
        first = True
        done = False
        try:
            async for out in self.engine.generate({"prompt_token_ids": ids}, vllm_params, request_id):
                for completion in out.outputs:
                    if completion.finish_reason == "abort" and not self.accepting:
                        raise EngineShutdownError(
                            "the server shut down before this request finished (drain timeout); retry it elsewhere"
                        )
                    if score_only and completion.finish_reason is None:
                        continue  # the one token it ran is not part of the answer
                    token_ids = [] if score_only else list(completion.token_ids)
                    generated[completion.index] = generated.get(completion.index, 0) + len(token_ids)
                    logprobs = None
                    if params.logprobs is not None and completion.logprobs is not None and token_ids:
                        logprobs = [
                            _token_logprob(tid, position, params.logprobs)
                            for tid, position in zip(completion.token_ids, completion.logprobs)
                        ]
                    prompt_lp = None
                    if first and params.prompt_logprobs is not None and out.prompt_logprobs is not None:
                        prompt_lp = _prompt_logprobs(ids, out.prompt_logprobs, params.prompt_logprobs)
                    first = False
                    yield CompletionDelta(
                        request_id=request_id,
                        index=completion.index,
                        text="" if score_only else completion.text,
                        token_ids=token_ids,
                        logprobs=logprobs,
                        finished=completion.finish_reason is not None,
                        finish_reason="length" if score_only else completion.finish_reason,
                        stop_reason=completion.stop_reason,
                        num_prompt_tokens=len(ids),
                        num_generated_tokens=generated[completion.index],
                        prompt_logprobs=prompt_lp,
                    )
            done = True
        finally:
            self.in_flight.discard(request_id)
            if not done and self.engine is not None:
                await self.engine.abort(request_id)

    async def abort(self, request_id: str) -> None:
        if self.engine is not None and request_id in self.in_flight:
            self.in_flight.discard(request_id)
            await self.engine.abort(request_id)

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """/v1/embeddings: the served weights through transformers on the same GPU (vLLM's generation engine
        returns no hidden states), pooled as the native backend pools."""
        limit = self.info.max_model_len
        for i, prompt in enumerate(prompts):
            if not 0 < len(prompt) <= limit:
                raise PromptTooLongError(
                    f"input {i} has {len(prompt)} tokens; embeddings need 1 to {limit} tokens", param="input"
                )
        async with self.embedder_lock:
            if self.embedder is None:
                self.embedder = await asyncio.to_thread(self._load_embedder)
            return await asyncio.to_thread(hf_embeddings, self.embedder, prompts, self.embedder.device)

    def _load_embedder(self) -> Any:
        import torch
        from transformers import AutoModel

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return AutoModel.from_pretrained(self.model_path, dtype=torch.float32).to(device).eval()

    def stats(self) -> EngineStats:
        # vLLM keeps its scheduler's queue lengths to itself; requests in flight are the closest view
        running = min(len(self.in_flight), self.max_num_seqs)
        return EngineStats(
            running=running,
            waiting=len(self.in_flight) - running,
            cache_usage=0.0,
            free_slots=max(0, self.max_num_seqs - running),
        )
