"""The `ppo` stage: proximal policy optimisation with a critic (a value head on the policy) and GAE.

Rollouts are the grpo stage's (training/grpo.py `rollout`: the native engine over the policy's current weights,
scored by the same rewards). The critic is a linear value head on the final (normed) hidden state of the same
model: it shares the trunk with the actor, so one forward gives both the token log-probabilities and the values,
and the head is a submodule of the model, so the optimizer, DDP, checkpoints and exact resume cover it as they
cover every other weight. The final model is saved without it (a plain causal LM), the head beside it as
critic/value_head.safetensors.

Per completion token t: the reward is -beta x (log pi_old - log pi_ref) (the KL penalty to the frozen reference;
log-probabilities at the sampling temperature), plus the sequence's reward on its last token. GAE (`gamma`, `lam`)
over the rollout-time values gives advantages (whitened over the micro-batch's tokens) and returns. The loss per
token is PPO's clipped surrogate (`epsilon`, training/rl_losses.py `policy_loss`) plus vf_coef x the clipped
value loss (`value_clip`), normalised per token or per sequence (`loss_norm`) as in grpo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.config import TrainConfig
from training.data import IGNORE
from training.dpo import eval_mode
from training.grpo import GRPOStage, completion_logps
from training.rl_losses import gae, masked_sum, policy_loss, value_loss, whiten
from training.stages import Stage, StageLoss

VALUE_HEAD_FILE = (
    "critic/value_head.safetensors"  # in a subdirectory: loaders read every *.safetensors beside config.json
)


def add_value_head(model: nn.Module) -> nn.Module:
    """Attach the critic: hidden state -> one scalar. Zero-initialised, so every value starts at 0 (no noise in
    the first advantages)."""
    head = nn.Linear(model.config.hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model.value_head = head.to(dtype=next(model.parameters()).dtype)
    return model


def logps_and_values(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float) -> tuple[torch.Tensor, ...]:
    """One forward through the (possibly DDP-wrapped) model: (log p(target) per position, value per position,
    MoE aux loss). The value at position t is the critic's estimate for the state whose next token is target t."""
    out = model(input_ids=batch["input_ids"], use_cache=False, output_hidden_states=True)
    head = model.module.value_head if hasattr(model, "module") else model.value_head
    values = head(out.hidden_states[-1]).squeeze(-1).float()
    return completion_logps(out.logits, batch["targets"], temperature), values, out.aux_loss


class PPOStage(GRPOStage):
    name = "ppo"
    save_name = "ppo"

    def prepare_model(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        return add_value_head(model)

    def setup(self, context: Any) -> None:
        super().setup(context)
        self.model = context.model

    def collate(self, items: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        """The rollout, then the rollout-time values (and reference log-probabilities), per-token rewards and GAE."""
        cfg = self.cfg
        batch = self.rollout(items, tokenizer)
        device = next(self.model.parameters()).device
        on_device = {key: batch[key].to(device) for key in ("input_ids", "targets")}
        with torch.no_grad(), eval_mode(self.model):
            _, values, _ = logps_and_values(self.model, on_device, cfg.rollout_temperature)
            ref_logps = None
            if self.reference is not None:
                ref_logits = self.reference(input_ids=on_device["input_ids"], use_cache=False).logits
                ref_logps = completion_logps(ref_logits, on_device["targets"], cfg.rollout_temperature).cpu()
        mask = batch["targets"] != IGNORE
        values = values.cpu() * mask
        rewards = token_rewards(batch["rewards"], batch["old_logps"], ref_logps, mask, cfg.beta)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        batch.update(old_values=values, returns=returns, advantages=whiten(advantages, mask))
        if ref_logps is not None:
            batch["ref_logps"] = ref_logps
        return batch

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StageLoss:
        cfg = self.cfg
        logps, values, aux = logps_and_values(model, batch, cfg.rollout_temperature)
        mask = batch["targets"] != IGNORE
        pg, clipped = policy_loss(
            "grpo", logps, batch["old_logps"], batch["advantages"], cfg.epsilon, self.epsilon_high
        )
        vf = value_loss(values, batch["old_values"], batch["returns"], cfg.value_clip)
        loss_sum = masked_sum(pg + cfg.vf_coef * vf, mask, cfg.loss_norm)
        metrics = self.metrics(batch, logps.detach(), None, clipped, mask)
        tokens = mask.sum().clamp(min=1)
        weight = float(self.count(batch))
        metrics["value_loss"] = (vf.detach() * mask).sum() / tokens * weight
        metrics["value"] = (values.detach() * mask).sum() / tokens * weight
        if "ref_logps" in batch:  # the penalised KL estimate of the rollouts (k1: old - reference)
            metrics["kl"] = ((batch["old_logps"] - batch["ref_logps"]) * mask).sum() / tokens * weight
        return StageLoss(loss_sum, aux, metrics)

    def save_final(self, model: nn.Module, tokenizer: Any, cfg: TrainConfig, out_dir: Path) -> None:
        from safetensors.torch import save_file

        head = model.value_head
        del model.value_head  # the policy alone is a plain causal LM checkpoint
        Stage.save_final(self, model, tokenizer, cfg, out_dir)
        (out_dir / VALUE_HEAD_FILE).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(out_dir / VALUE_HEAD_FILE))


def token_rewards(
    rewards: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-token rewards: -beta x (old - reference log-probability) on every completion token, plus each
    sequence's reward on its last completion token. (batch, positions), 0 off the mask."""
    per_token = torch.zeros(mask.shape, dtype=torch.float32)
    if ref_logps is not None and beta:
        per_token = -beta * (old_logps - ref_logps) * mask
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    last = torch.where(mask, positions, -1).max(dim=1).values
    rows = torch.arange(mask.shape[0])
    has_tokens = last >= 0
    per_token[rows[has_tokens], last[has_tokens]] += rewards[has_tokens].float()
    return per_token
