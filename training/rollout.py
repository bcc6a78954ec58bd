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

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from training.data import IGNORE
from training.dpo import eval_mode


@dataclass
class Completion:
    prompt_index: int  # which prompt of the call it answers
    token_ids: list[int]
    logprobs: list[float]  # the sampling distribution's log-probability of each token
    text: str
    finish_reason: str | None


@dataclass
class Trajectory:
    """One rollout as the trainer sees it: the prompt, then the model's turns and (agent stage) the tool turns
    between them, with which tokens the model sampled (trained) and their sampling log-probabilities."""

    prompt_index: int
    ids: list[int]
    trained: list[bool]
    logprobs: list[float]
    text: str = ""  # the model's last turn
    finish_reason: str | None = None
    calls: list[Any] = field(default_factory=list)  # training/tools.py ToolResult of each call made
    turns: int = 0

    @classmethod
    def start(cls, prompt_index: int, prompt_ids: list[int]) -> Trajectory:
        return cls(prompt_index, list(prompt_ids), [False] * len(prompt_ids), [0.0] * len(prompt_ids))

    def add_model_turn(self, completion: Completion) -> None:
        self.ids += completion.token_ids
        self.trained += [True] * len(completion.token_ids)
        self.logprobs += completion.logprobs
        self.text, self.finish_reason = completion.text, completion.finish_reason
        self.turns += 1

    def add_context(self, ids: list[int]) -> None:
        """Tokens the model reads but did not sample (a tool turn): no loss on them."""
        self.ids += ids
        self.trained += [False] * len(ids)
        self.logprobs += [0.0] * len(ids)

    def sampled_ids(self) -> list[int]:
        return [token for token, trained in zip(self.ids, self.trained) if trained]


def training_rows(trajectories: list[Trajectory], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, and at each position whose logits predict a sampled token: that token (targets,
    -100 elsewhere) and its sampling log-probability (old_logps, 0 elsewhere)."""
    width = max(len(t.ids) for t in trajectories)
    input_ids = torch.full((len(trajectories), width), pad, dtype=torch.long)
    targets = torch.full((len(trajectories), width), IGNORE, dtype=torch.long)
    old_logps = torch.zeros(len(trajectories), width, dtype=torch.float32)
    for i, t in enumerate(trajectories):
        ids = torch.tensor(t.ids, dtype=torch.long)
        input_ids[i, : len(ids)] = ids
        sampled = torch.tensor(t.trained[1:], dtype=torch.bool)  # position p predicts token p + 1
        targets[i, : len(ids) - 1][sampled] = ids[1:][sampled]
        old_logps[i, : len(ids) - 1][sampled] = torch.tensor(t.logprobs[1:], dtype=torch.float32)[sampled]
    return {"input_ids": input_ids, "targets": targets, "old_logps": old_logps}


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
