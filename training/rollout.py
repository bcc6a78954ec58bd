"""Rollouts for the RL stages on the native engine (engine/llm.py), over the policy's weights.

The engine is built once around the trainer's model object: no reload. When the rollouts compute in the
parameters' own dtype (CPU training, fp32 training), the engine runs on those very parameters: every optimizer
step updates them in place, so the next rollout samples from the new policy by construction (the engine neither
fuses projections nor keeps transposed weight copies of a model object it is handed: that is done only to a copy
it loaded itself, see models/fusion.py). With mixed precision on a GPU (fp32 parameters, bf16 autocast) the
rollouts compute in the autocast dtype, as the trainer's forward does: the engine runs on a copy of the policy in
that dtype, refreshed in place from the parameters before every rollout (one copy kernel per tensor; the CUDA
graphs keep reading the same storage). In an H200 probe (minimind2-small, 48 sequences of 1,024 tokens) the fp32
decode step was bound by the GPU (1.0-2.2 ms per replay) and the bf16 one by the host (0.8-0.9 ms): 41.5k against
26.2k tok/s.
The KV cache is preallocated once and sized by `rollout_kv_cache_mb`; requests beyond it wait their turn
(continuous batching).

Sampling uses the serving SamplingParams (temperature, top-p, max tokens, stop strings), one seeded request of
n = G completions per prompt (the prompt is prefilled once), and asks for the log-probabilities of the
distribution each token was drawn from (`logprobs_mode="processed"`): the old policy of the importance ratio.
"""

from __future__ import annotations

import copy
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
        dtype: torch.dtype | None = None,
    ) -> None:
        """`dtype`: what the rollouts compute in; None or the parameters' own dtype runs the engine on the policy's
        parameters themselves, another dtype on a copy refreshed before each rollout (see the module doc)."""
        from engine.llm import LLM

        param = next(model.parameters())
        training = model.training
        self.model = model
        engine_model = model
        if dtype is not None and dtype != param.dtype:
            engine_model = copy.deepcopy(model).to(dtype).requires_grad_(False)
        self.llm = LLM(
            engine_model,
            tokenizer=tokenizer,
            device=str(param.device),
            dtype=next(engine_model.parameters()).dtype,  # the engine converts nothing itself
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            kv_cache_memory=kv_cache_bytes,
        )
        model.train(training)  # LLM puts the model in eval mode; training continues in its own mode
        if any(p.data_ptr() != q.data_ptr() for p, q in zip(engine_model.parameters(), self.llm.model.parameters())):
            raise RuntimeError("the rollout engine must run on the model object it was given, not a converted copy")

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the policy's current parameters into the engine's copy (no-op when the engine runs on them)."""
        if self.llm.model is not self.model:
            for mine, policy in zip(self.llm.model.parameters(), self.model.parameters(), strict=True):
                mine.copy_(policy)

    def generate(self, prompts: list[list[int]], params: Any) -> list[Completion]:
        """params.n completions of each prompt (token ids), in prompt order; the model in eval mode meanwhile.
        `params` is one SamplingParams or one per prompt. Requests with `detokenize` off (no stop strings to
        watch) get their texts decoded here, once per completion, instead of token by token inside the engine."""
        self.refresh()
        with eval_mode(self.model), torch.no_grad():
            outputs = self.llm.generate(prompts, params)
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        completions, undecoded = [], []
        for index, request in enumerate(outputs):
            for out in sorted(request.outputs, key=lambda o: o.index):
                logprobs = [lp.logprob for lp in out.logprobs or []]
                if len(logprobs) != len(out.token_ids):
                    raise RuntimeError("the engine returned no log-probability for some tokens (set logprobs=0)")
                completions.append(Completion(index, list(out.token_ids), logprobs, out.text, out.finish_reason))
                if not per_prompt[index].detokenize:
                    undecoded.append(completions[-1])
        if undecoded:
            # A "stop" finish here is always a stop token (EOS or stop_token_ids; stop strings need detokenize),
            # whose text the engine leaves out of the output: leave it out here too.
            shown = [c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids for c in undecoded]
            skip = per_prompt[0].skip_special_tokens
            for completion, text in zip(undecoded, self.llm.tokenizer.batch_decode(shown, skip_special_tokens=skip)):
                completion.text = text
        return completions
