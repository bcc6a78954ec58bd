"""Policy-gradient losses of the RL stages as plain tensor functions (tested against a direct formulation and
TRL's GRPOTrainer in tests/test_training_grpo.py).

Every function returns per-token values (batch, completion positions); the stage masks and normalises them
(per sequence or per token, see training/grpo.py), so the trainer's count contract applies unchanged.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps), groups being `group_size` consecutive rows (the G
    completions of one prompt). The population standard deviation, as upstream MiniMind computes it."""
    grouped = rewards.float().view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=False, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate exp(d) - d - 1 with d = ref - policy (Schulman's k3: unbiased,
    never negative), the estimator GRPO uses."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def policy_loss(
    loss_type: str,
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float,
    epsilon_high: float,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, per-token bool: the clip was active), both (batch, positions); advantages are one per
    sequence (batch,) as GRPO's, or one per token (batch, positions) as PPO's GAE.

    grpo: -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) with r = exp(logp - old_logp) (PPO's clipped
    surrogate; epsilon_high > epsilon is DAPO's clip-higher).
    cispo: -sg(min(r, epsilon_high)) A logp (MiniMax-M1): the importance weight is capped and not
    differentiated, so every token keeps a gradient (none is clipped away), the cap bounds its size.
    Both add beta x k3 KL to the reference when ref_logps is given.
    """
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # per sequence or per token
    ratio = torch.exp(logps - old_logps)
    if loss_type == "grpo":
        clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
        loss = -torch.min(ratio * adv, clipped * adv)
        active = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    elif loss_type == "cispo":
        weight = torch.clamp(ratio, max=epsilon_high).detach()
        loss = -weight * adv * logps
        active = ratio > epsilon_high
    else:
        raise ValueError(f"unknown RL loss {loss_type!r}; use grpo or cispo")
    if ref_logps is not None and beta:
        loss = loss + beta * k3_kl(logps, ref_logps)
    return loss, active


def masked_sum(values: torch.Tensor, mask: torch.Tensor, per: str) -> torch.Tensor:
    """Sum of the per-token values over the completion tokens: per "token", or each sequence's mean summed
    per "sequence" (the stage then divides by the step's tokens or sequences)."""
    mask = mask.to(values.dtype)
    if per == "token":
        return (values * mask).sum()
    if per == "sequence":
        return ((values * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    raise ValueError(f"unknown normalisation {per!r}; use token or sequence")


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation (Schulman et al. 2016), per token.

    rewards, values, mask: (batch, positions), each row's completion a contiguous run of True in mask (the
    episode; the value after its last token is 0). delta_t = r_t + gamma V_{t+1} - V_t and
    A_t = delta_t + gamma lam A_{t+1}, computed backwards; returns = A + V are the value targets. 0 off the mask.
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t] * mask[:, t]
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (the population std), 0 off the mask: PPO's advantage scaling."""
    mask = mask.to(values.dtype)
    count = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / count
    var = (((values - mean) * mask) ** 2).sum() / count
    return (values - mean) * torch.rsqrt(var + eps) * mask


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-token clipped value loss 0.5 max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old,
    -clip, clip): the critic moves at most `clip` from its rollout-time values per update, as PPO's policy does."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
