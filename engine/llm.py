"""`LLM`: the offline API of the native engine, shaped like vLLM's (`generate`, `chat`) plus a streaming form.

    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM("path/to/checkpoint")            # any checkpoint models.loader reads; None = the bundled default
    out = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    print(out[0].outputs[0].text)

All requests of one call are batched continuously (they join and leave the running batch as they start and
finish); the results come back in the order of the prompts.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from engine.backend import CompletionDelta
from engine.engine_core import EngineCore
from engine.errors import InvalidRequestError
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from models.model import MiniMindForCausalLM, fuse_projections

Prompt = str | list[int]
Messages = list[dict[str, Any]]

DEFAULT_MAX_MODEL_LEN = 8192  # the cache is preallocated, so the default context is capped (pass max_model_len)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(
    model: str | Path | MiniMindForCausalLM | None,
    *,
    device: str,
    dtype: str | torch.dtype | None,
    tokenizer: Any = None,
    lora: str | Path | None = None,
) -> tuple[MiniMindForCausalLM, Any]:
    """A checkpoint path (or None: the bundled default model) through models.loader, or a model object as given
    (moved to device/dtype; then `tokenizer` must be a tokenizer object or a directory)."""
    if dtype is None and torch.device(device).type == "cuda":
        dtype = "bf16"
    if isinstance(model, MiniMindForCausalLM):
        from models.loader import load_tokenizer, resolve_dtype

        if tokenizer is None:
            raise InvalidRequestError(
                "a model object needs tokenizer= (a tokenizer or its directory)", param="tokenizer"
            )
        if lora is not None:
            from models.lora import merge_lora_adapter

            model = merge_lora_adapter(model, lora)
        target = resolve_dtype(dtype, device)
        model = model.to(device=device, dtype=target) if target is not None else model.to(device)
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        return model.eval(), tokenizer
    from models.loader import load_model

    if model is None:
        from models.default_model import default_model_path

        model = default_model_path()
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        loaded, _ = load_model(model, dtype=dtype, device=device, lora=lora)
    else:
        loaded, tokenizer = load_model(model, dtype=dtype, device=device, tokenizer=tokenizer, lora=lora)
    return loaded, tokenizer


class LLM:
    """Offline generation on the native engine (continuous batching, CUDA graphs on GPU, optional draft model)."""

    def __init__(
        self,
        model: str | Path | MiniMindForCausalLM | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        draft_model: str | Path | MiniMindForCausalLM | None = None,
        num_speculative_tokens: int = 4,
        lora: str | Path | None = None,
        tokenizer: Any = None,
        cuda_graphs: bool = True,
        max_queue: int | None = None,
        kv_cache_memory: int | None = None,
        compile_model: bool = False,
    ) -> None:
        """`compile_model`: run decode steps through torch.compile (fewer, fused kernels per step; the first decode
        step compiles, about a minute on a GPU). `cuda_graphs=False` runs every step eagerly (for debugging)."""
        device = device or default_device()
        target, self.tokenizer = load(model, device=device, dtype=dtype, tokenizer=tokenizer, lora=lora)
        cpu_layouts = None
        device_type = torch.device(device).type
        if device_type == "cpu" and not isinstance(model, MiniMindForCausalLM):
            from engine.model_runner import CpuWeightLayouts

            cpu_layouts = CpuWeightLayouts(target)  # our own copy of the weights: lay them out per step size
        elif device_type == "cuda":
            fuse_projections(target)  # fewer kernels per decode step
        draft = None
        if draft_model is not None:
            draft, _ = load(draft_model, device=device, dtype=next(target.parameters()).dtype, tokenizer=self.tokenizer)
            if device_type == "cuda":
                fuse_projections(draft)
            if draft.config.vocab_size != target.config.vocab_size:
                raise InvalidRequestError(
                    f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                    f"({target.config.vocab_size}): speculative decoding needs the same tokenizer",
                    param="draft_model",
                )
        limit = target.config.max_position_embeddings
        if max_model_len is None:
            max_model_len = min(limit, DEFAULT_MAX_MODEL_LEN)
        elif max_model_len > limit:
            raise InvalidRequestError(
                f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {limit}",
                param="max_model_len",
            )
        self.model = target
        self.engine = EngineCore(
            target,
            self.tokenizer,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            cuda_graphs=cuda_graphs,
            max_queue=max_queue,
            kv_cache_memory=kv_cache_memory,
            draft_model=draft,
            num_speculative_tokens=num_speculative_tokens,
            compile_model=compile_model,
            cpu_layouts=cpu_layouts,
        )
        self._ids = itertools.count()

    # ---- prompts ----------------------------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt)["input_ids"]
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise InvalidRequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def apply_chat_template(self, messages: Messages, chat_template_kwargs: dict | None = None) -> str:
        """The tokenizer's chat template with the assistant turn opened (the text the model continues)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                "this tokenizer has no chat template; use generate() with plain prompts", param="messages"
            )
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
        )

    def _encode_chat(self, messages: Messages, chat_template_kwargs: dict | None) -> tuple[str, list[int]]:
        text = self.apply_chat_template(messages, chat_template_kwargs)
        return text, self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ---- offline API --------------------------------------------------------------------------------------------------

    def generate(
        self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Complete every prompt (a string, a list of token ids, or a list of either); one RequestOutput each."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run([self.encode(p) for p in prompts], params)

    def chat(
        self,
        messages: Messages | list[Messages],
        params: SamplingParams | list[SamplingParams] | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} dicts) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self._run([self._encode_chat(c, chat_template_kwargs) for c in conversations], params)

    def stream(
        self,
        prompt_or_messages: Prompt | Messages,
        params: SamplingParams | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> Iterator[CompletionDelta]:
        """Yield deltas of one request as they are produced; stopping the iteration aborts it (frees its cache)."""
        if isinstance(prompt_or_messages, list) and prompt_or_messages and isinstance(prompt_or_messages[0], dict):
            text, ids = self._encode_chat(prompt_or_messages, chat_template_kwargs)
        else:
            text, ids = self.encode(prompt_or_messages)
        request_id = f"stream-{next(self._ids)}"
        seqs = self.engine.add_request(request_id, ids, params or SamplingParams(), prompt=text)
        try:
            while not all(s.is_finished for s in seqs):
                for delta in self.engine.step():
                    if delta.request_id == request_id:
                        yield delta
        finally:
            self.engine.abort(request_id)

    def _run(
        self, prompts: list[tuple[str | None, list[int]]], params: SamplingParams | list[SamplingParams] | None
    ) -> list[RequestOutput]:
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"{len(params)} SamplingParams for {len(prompts)} prompts", param="params")
        requests: list[tuple[str, str | None, list[int], list[Sequence]]] = []
        try:
            for (text, ids), p in zip(prompts, params):
                request_id = str(next(self._ids))
                requests.append((request_id, text, ids, self.engine.add_request(request_id, ids, p, prompt=text)))
            while self.engine.has_work():
                self.engine.step()
        finally:
            for request_id, *_ in requests:
                self.engine.abort(request_id)
        return [
            RequestOutput(
                request_id=request_id,
                prompt=text,
                prompt_token_ids=ids,
                outputs=[
                    CompletionOutput(
                        s.index,
                        s.text,
                        list(s.output_token_ids),
                        s.finish_reason,
                        s.stop_reason,
                        s.logprobs,
                        s.cumulative_logprob if s.params.logprobs is not None else None,
                    )
                    for s in seqs
                ],
                prompt_logprobs=seqs[0].prompt_logprobs,
            )
            for request_id, text, ids, seqs in requests
        ]
