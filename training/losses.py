"""Loss functions of the alignment and distillation stages, as plain tensor functions (tested against TRL and
direct PyTorch formulations in tests/test_training_align.py).

All of them return per-unit values (per pair, per token) so a stage can sum them: the trainer divides by the
step's count, see training/stages.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.data import IGNORE


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position (0 where the target is -100), in float32: (batch, seq)."""
    flat = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    )
    return -flat.view(targets.shape)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's trained targets, number of trained targets per row)."""
    return token_logps(logits, targets).sum(-1), (targets != IGNORE).sum(-1)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen reward, rejected reward); rewards are beta x (policy - reference) log-ratios.

    sigmoid: -log sigmoid(beta x delta), delta = chosen log-ratio - rejected log-ratio (Rafailov et al. 2023);
    with label_smoothing e (conservative DPO): -(1 - e) log sigmoid(beta delta) - e log sigmoid(-beta delta).
    ipo: (delta' - 1 / (2 beta))^2 with each log-ratio averaged per trained token, as TRL computes it (Azar et
    al. 2023, with the length normalisation TRL confirmed with the authors); needs the lengths.
    """
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * delta)
        if label_smoothing:
            loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss needs chosen_lengths and rejected_lengths")
        per_token = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        loss = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; use sigmoid or ipo")
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kd_token_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, direction: str = "forward"
) -> torch.Tensor:
    """KL divergence per position between the temperature-softened distributions, float32: (...,).

    forward: KL(teacher || student) = sum p_t (log p_t - log p_s), the classic distillation loss (Hinton et al.);
    reverse: KL(student || teacher) = sum p_s (log p_s - log p_t), mode-seeking (MiniLLM, Gu et al. 2023).
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if direction == "forward":
        return (teacher.exp() * (teacher - student)).sum(-1)
    if direction == "reverse":
        return (student.exp() * (student - teacher)).sum(-1)
    raise ValueError(f"unknown KL direction {direction!r}; use forward or reverse")


def weighted_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over trained targets of weight x cross-entropy (weights 0 where the target is -100 do not matter)."""
    return -(token_logps(logits, targets) * weights).sum()
