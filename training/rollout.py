"""Rollouts for the RL stages on the native engine (engine/llm.py), over the policy's own parameters.

The engine is built once around the trainer's model object: no second copy, no reload. Every optimizer step
updates the parameters in place, so the next rollout samples from the new policy by construction (the engine
neither fuses projections nor keeps transposed weight copies of a model object it is handed: that is done only to
a copy it loaded itself, see models/fusion.py). The KV cache is preallocated once and
sized by `rollout_kv_cache_mb`; requests beyond it wait their turn (continuous batching).

Sampling uses the serving SamplingParams (temperature, top-p, max tokens, stop strings), one seeded request of
n = G completions per prompt (the prompt is prefilled once), and asks for the log-probabilities of the
distribution each token was drawn from (`logprobs_mode="processed"`): the old policy of the importance ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from training.dpo import eval_mode


@dataclass
class Completion:
    prompt_index: int  # which prompt of the call it answers
    token_ids: list[int]
    logprobs: list[float]  # the sampling distribution's log-probability of each token
    text: str
    finish_reason: str | None


class RolloutEngine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        max_model_len: int,
        kv_cache_bytes: int,
        max_num_seqs: int = 256,
    ) -> None:
        from engine.llm import LLM

        param = next(model.parameters())
        training = model.training
        self.model = model
        self.llm = LLM(
            model,
            tokenizer=tokenizer,
            device=str(param.device),
            dtype=param.dtype,  # the parameters as they are: never a converted copy
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            kv_cache_memory=kv_cache_bytes,
        )
        model.train(training)  # LLM puts the model in eval mode; training continues in its own mode
        if any(p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(), self.llm.model.parameters())):
            raise RuntimeError("the rollout engine must run on the policy's own parameters")

    def generate(self, prompts: list[list[int]], params: Any) -> list[Completion]:
        """params.n completions of each prompt (token ids), in prompt order; the model in eval mode meanwhile."""
        with eval_mode(self.model), torch.no_grad():
            outputs = self.llm.generate(prompts, params)
        completions = []
        for index, request in enumerate(outputs):
            for out in sorted(request.outputs, key=lambda o: o.index):
                logprobs = [lp.logprob for lp in out.logprobs or []]
                if len(logprobs) != len(out.token_ids):
                    raise RuntimeError("the engine returned no log-probability for some tokens (set logprobs=0)")
                completions.append(Completion(index, list(out.token_ids), logprobs, out.text, out.finish_reason))
        return completions
