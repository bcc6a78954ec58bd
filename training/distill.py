"""The `distill` stage (white-box distillation): SFT data, the student learns from the labels and from a
teacher's full next-token distributions.

loss per trained token = alpha x CE + (1 - alpha) x T^2 x KL(teacher_T || student_T)   (or the reverse KL)
The T^2 keeps the KL gradient's size independent of T (Hinton et al. 2015). The teacher is any checkpoint the
loader reads (ours, upstream .pth, HF Llama/Qwen directories) with the student's vocabulary; it runs in eval
mode without an autograd graph, in bf16 on a GPU. It is loaded from its file at every start, so a resumed run
has exactly the teacher an uninterrupted one has.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from training.config import TrainConfig
from training.data import IGNORE
from training.errors import TrainingError
from training.losses import kd_token_kl, token_logps
from training.stages import OptionalLoRA, SFTStage, StageContext, StageLoss

log = logging.getLogger("minimind.train")


def load_teacher(cfg: TrainConfig, context: StageContext) -> nn.Module:
    """The teacher on the student's device, frozen; refused when its vocabulary differs from the student's."""
    from models.errors import CheckpointError
    from models.loader import build_model, load_tokenizer, read_checkpoint

    source = Path(cfg.teacher).expanduser()
    try:
        config, state, tokenizer_dir, _ = read_checkpoint(source, preset=cfg.teacher_preset or None)
    except CheckpointError as err:
        raise TrainingError(f"teacher {cfg.teacher}: {err} (a .pth teacher's shape: teacher_preset)") from None
    student_vocab = context.model.config.vocab_size
    if config.vocab_size != student_vocab:
        raise TrainingError(
            f"teacher {cfg.teacher} has a vocabulary of {config.vocab_size} tokens, the student {student_vocab}; "
            "distillation compares next-token distributions token by token, so teacher and student must share "
            "one tokenizer (distill from a teacher trained with the student's tokenizer)"
        )
    try:
        teacher_tokenizer = load_tokenizer(tokenizer_dir)
    except CheckpointError:
        teacher_tokenizer = None  # a bare .pth: only the vocabulary size can be checked
    if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != context.tokenizer.get_vocab():
        raise TrainingError(
            f"teacher {cfg.teacher}: its tokenizer ({tokenizer_dir}) gives tokens other ids than the student's; "
            "distillation needs one tokenizer for both"
        )
    dtype = torch.bfloat16 if context.device.type == "cuda" else torch.float32
    teacher = build_model(config, state, str(source)).to(device=context.device, dtype=dtype)
    teacher.requires_grad_(False)
    return teacher.eval()


class DistillStage(OptionalLoRA, SFTStage):
    """SFT data and masks; the loss mixes the labels' cross-entropy with the KL to the teacher."""

    name = "distill"
    save_name = "full_dist"

    def setup(self, context: StageContext) -> None:
        self.cfg = context.cfg
        self.teacher = load_teacher(context.cfg, context)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StageLoss:
        cfg, targets = self.cfg, batch["targets"]
        out = model(input_ids=batch["input_ids"], use_cache=False)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch["input_ids"], use_cache=False).logits
        trained = targets != IGNORE
        ce = -token_logps(out.logits, targets).sum()
        kl = kd_token_kl(out.logits[trained], teacher_logits[trained], cfg.temperature, cfg.kl_direction).sum()
        loss = cfg.distill_alpha * ce + (1 - cfg.distill_alpha) * cfg.temperature**2 * kl
        return StageLoss(loss, out.aux_loss, {"ce": ce.detach(), "kl": kl.detach()})
