"""The `grpo` stage: group-relative policy optimisation (GRPO, or CISPO's loss) from rewards on sampled completions.

Each micro-batch is batch_size prompts; `collate` samples num_generations (G) completions of each on the native
engine over the policy's current weights (training/rollout.py), scores them (training/rewards.py) and normalises
the rewards within each prompt's group into advantages. The trainer collates every micro-batch of a step before
its first backward, so all of a step's rollouts come from the same weights: the step is on-policy, and the
engine's log-probabilities of the sampling distribution are the importance ratio's denominator.

The loss (training/rl_losses.py) is summed per sequence (`loss_norm: sequence`, upstream MiniMind's and TRL's
"grpo": each completion's mean token loss) or per token (`token`, DAPO's), and the trainer divides by the step's
sequences or completion tokens. KL to the reference (beta x k3) uses a frozen copy of the start weights, taken
before a resumed run loads its checkpoint, as in training/dpo.py. The sampling seeds come from the torch RNG
that checkpoints save, so a resumed run draws the same completions as one never stopped.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from training.config import TrainConfig
from training.data import IGNORE
from training.data_prompts import PromptDataset
from training.dpo import frozen, load_reference
from training.errors import TrainingError
from training.losses import token_logps
from training.rewards import RewardSet, Sample
from training.rl_losses import group_advantages, k3_kl, masked_sum, policy_loss
from training.rollout import RolloutEngine, Trajectory, training_rows
from training.stages import SFTStage, StageContext, StageLoss, require_chat_template

CISPO_DEFAULT_CAP = 5.0


class GRPOStage(SFTStage):
    name = "grpo"
    unit = "sequences"
    save_name = "grpo"

    def build_dataset(self, cfg: TrainConfig, tokenizer: Any) -> Any:
        require_chat_template(tokenizer, self.name)
        if cfg.use_lora:
            raise TrainingError("use_lora is not supported by the grpo stage yet; train all weights (use_lora: false)")
        if cfg.distributed == "fsdp":
            raise TrainingError("the grpo stage samples on unsharded weights; use distributed: ddp")
        self.rewards = RewardSet(cfg.rewards, cfg.reward_model)  # bad names and paths fail before any model is built
        return PromptDataset(
            cfg.data_files, tokenizer, cfg.max_seq_len - cfg.max_completion_len, cfg.skip_bad_lines, self.tools(cfg)
        )

    def tools(self, cfg: TrainConfig) -> list[dict[str, Any]] | None:
        """Tool schemas the prompts list (none here; the agent stage's)."""
        return None

    def setup(self, context: StageContext) -> None:
        cfg = self.cfg = context.cfg
        self.rewards.to(context.device)
        self.unit = "tokens" if cfg.loss_norm == "token" else "sequences"
        if cfg.compile:
            raise TrainingError("compile is not supported by the grpo stage yet (compile: false)")
        self.reference = None
        if cfg.beta > 0:
            self.reference = load_reference(cfg, context) if cfg.ref_model else frozen(copy.deepcopy(context.model))
        self.engine = RolloutEngine(
            context.model,
            context.tokenizer,
            cfg.max_seq_len,
            cfg.rollout_kv_cache_mb << 20,
            max_num_seqs=256,
            dtype=context.amp_dtype,  # compute as the trainer's forward does (training/rollout.py)
        )
        self.epsilon_high = cfg.epsilon_high or (CISPO_DEFAULT_CAP if cfg.rl_loss == "cispo" else cfg.epsilon)

    def sampling_params(self, seed: int, n: int = 0, max_tokens: int = 0) -> Any:
        """The rollouts' SamplingParams: n completions (default num_generations) of max_tokens (default
        max_completion_len) each."""
        from engine.sampling_params import SamplingParams

        cfg = self.cfg
        return SamplingParams(
            n=n or cfg.num_generations,
            temperature=cfg.rollout_temperature,
            top_p=cfg.rollout_top_p,
            max_tokens=max_tokens or cfg.max_completion_len,
            stop=list(cfg.rollout_stop),
            seed=seed,
            logprobs=0,
            logprobs_mode="processed",
            detokenize=bool(cfg.rollout_stop),  # texts are decoded once per completion (training/rollout.py)
        )

    def collate(self, items: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        """Roll out G completions per prompt and return the training batch (rows prompt-major: i * G + g)."""
        batch = self.rollout(items, tokenizer)
        batch["advantages"] = group_advantages(batch["rewards"], self.cfg.num_generations)
        return batch

    def rollout(self, items: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        """Sample and score G completions per prompt: the rows (prompt + completion), the completion targets at
        the positions whose logits predict them, the sampling log-probabilities there and the rewards. Shared
        by the RL stages (training/ppo.py adds values and GAE to it)."""
        seed = int(torch.randint(0, 2**62, ()))  # from the checkpointed RNG: a resumed run samples the same
        start = time.perf_counter()
        completions = self.engine.generate([item["prompt_ids"] for item in items], self.sampling_params(seed))
        elapsed = time.perf_counter() - start
        trajectories = []
        for c in completions:
            trajectory = Trajectory.start(c.prompt_index, items[c.prompt_index]["prompt_ids"])
            trajectory.add_model_turn(c)
            trajectories.append(trajectory)
        return self.scored_batch(trajectories, items, tokenizer, elapsed)

    def scored_batch(
        self, trajectories: list[Trajectory], items: list[dict[str, Any]], tokenizer: Any, rollout_s: float
    ) -> dict[str, torch.Tensor]:
        """The training rows of the rollouts, their rewards (the total, and each reward's own as reward/NAME) and
        the rollout speed (sampled tokens per second of engine time, `rollout_s`)."""
        samples = [
            Sample(
                items[t.prompt_index]["messages"],
                items[t.prompt_index]["answer"],
                t.text,
                t.sampled_ids(),
                t.finish_reason,
                self.cfg.max_completion_len * max(t.turns, 1),
                t.calls,
            )
            for t in trajectories
        ]
        totals, parts = self.rewards.score(samples)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        batch = training_rows(trajectories, pad)
        batch["rewards"] = torch.tensor(totals, dtype=torch.float32)
        sampled = sum(len(t.sampled_ids()) for t in trajectories)
        batch["rollout_tokens_per_s"] = torch.tensor(sampled / max(rollout_s, 1e-9), dtype=torch.float32)
        for name, values in parts.items():
            batch[f"reward/{name}"] = torch.tensor(values, dtype=torch.float32)
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        if self.cfg.loss_norm == "token":
            return int((batch["targets"] != IGNORE).sum())
        return int(batch["rewards"].numel())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StageLoss:
        cfg = self.cfg
        out = model(input_ids=batch["input_ids"], use_cache=False)
        logps = completion_logps(out.logits, batch["targets"], cfg.rollout_temperature)
        mask = batch["targets"] != IGNORE
        ref_logps = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logits = self.reference(input_ids=batch["input_ids"], use_cache=False).logits
                ref_logps = completion_logps(ref_logits, batch["targets"], cfg.rollout_temperature)
        per_token, clipped = policy_loss(
            cfg.rl_loss,
            logps,
            batch["old_logps"],
            batch["advantages"],
            cfg.epsilon,
            self.epsilon_high,
            ref_logps,
            cfg.beta,
        )
        loss_sum = masked_sum(per_token, mask, cfg.loss_norm)
        return StageLoss(loss_sum, out.aux_loss, self.metrics(batch, logps.detach(), ref_logps, clipped, mask))

    def metrics(
        self,
        batch: dict[str, torch.Tensor],
        logps: torch.Tensor,
        ref_logps: torch.Tensor | None,
        clipped: torch.Tensor,
        mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Means over this micro-batch, times its count: the loop's sum / count then gives their mean (weighted
        by each micro-batch's count when a step has several)."""
        weight = float(self.count(batch))
        tokens = mask.sum().clamp(min=1)
        rewards = batch["rewards"]
        groups = rewards.view(-1, self.cfg.num_generations)
        values = {
            "reward": rewards.mean(),
            "reward_std": groups.std(dim=1, unbiased=False).mean(),
            "clip_fraction": (clipped & mask).sum() / tokens,
            "completion_len": mask.sum(-1).float().mean(),
            "rollout_tokens_per_s": batch["rollout_tokens_per_s"],
        }
        if ref_logps is not None:
            values["kl"] = (k3_kl(logps, ref_logps) * mask).sum() / tokens
        for key in batch:
            if key.startswith("reward/"):
                values[key] = batch[key].mean()
        return {key: value.detach().float() * weight for key, value in values.items()}


def completion_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(target) per position under the sampling temperature (0 where the target is -100)."""
    return token_logps(logits if temperature == 1 else logits.float() / temperature, targets)
