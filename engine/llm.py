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

from engine.backend import CompletionDelta
from engine.build import build_engine
from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from models.model import MiniMindForCausalLM

Prompt = str | list[int]
Messages = list[dict[str, Any]]


class LLM:
    """Offline generation on the native engine (continuous batching, CUDA graphs on GPU, optional draft model)."""

    def __init__(
        self,
        model: str | Path | MiniMindForCausalLM | None = None,
        *,
        config: EngineConfig | None = None,
        **fields: Any,
    ) -> None:
        """`model` and `fields` are `EngineConfig`'s fields (engine/config.py: dtype, device, max_model_len,
        max_num_seqs, max_prefill_tokens, max_queue, kv_cache_memory, kv_cache, enable_prefix_caching, draft_model,
        num_speculative_tokens, lora, tokenizer, cuda_graphs, compile_model), or pass a whole `config`."""
        if config is None:
            config = EngineConfig(model=model, **fields)
        elif model is not None or fields:
            raise InvalidRequestError("give either config= or the model and its fields, not both", param="config")
        self.engine = build_engine(config)
        self.model, self.tokenizer = self.engine.model, self.engine.tokenizer
        self._ids = itertools.count()

    # ---- prompts ----------------------------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        return self.engine.encode(prompt)

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
