"""Training stages and the contract between a stage and the loop (training/trainer.py).

A stage contributes a dataset, a collate function, a loss and how its result is saved; the loop is shared.
The loss contract, in two calls per micro-batch:

- `count(batch) -> int`: what the stage normalises by (trained tokens, preference pairs, sequences), read on
  the host from the collated batch. The loop sums it over the optimizer step's micro-batches and processes
  (all-reduced under DDP/FSDP) *before* any forward, so each micro-batch's loss can be divided by the whole
  step's count before its backward: every unit then weighs the same whatever micro-batch it fell in (batch 8 x 1
  equals batch 2 x 4), and no large un-normalised sum is ever back-propagated (which fp16 could overflow).
- `loss(model, batch) -> StageLoss`: the loss *summed* over the batch's counted units, an optional auxiliary
  loss (MoE load balancing, averaged over micro-batches) and extra named metrics, each also a sum over the same
  units. The loop reports every metric as sum / count over the log window, so a stage's metrics (DPO's reward
  margin, distillation's KL) reach the progress bar, metrics.jsonl and TensorBoard without the loop knowing them.

Optional hooks: `prepare_model` (LoRA wrapping), `setup` (a reference or teacher model, after the policy model
is on its device) and `save_final`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.config import TrainConfig
from training.data import IGNORE, PretrainDataset, SFTDataset, pad_collate


@dataclass
class StageLoss:
    """One micro-batch's loss: summed over the units `Stage.count` counts; metrics are sums over them too."""

    loss_sum: torch.Tensor
    aux: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StageContext:
    """What a stage's `setup` may use: the policy model (unwrapped, on its device) and where it runs."""

    model: nn.Module
    cfg: TrainConfig
    tokenizer: Any
    device: torch.device
    amp_dtype: torch.dtype | None
    dataset: Any
    is_main: bool = True


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over targets that are not -100 (targets are already shifted)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["targets"] != IGNORE).sum())


class Stage:
    """The base stage: next-token prediction on packed documents (pretraining). Other stages override parts."""

    name = "pretrain"
    unit = "tokens"  # what count() counts, for the log
    save_name = "pretrain"  # upstream's .pth prefix with --save-format pth
    cross_entropy = staticmethod(cross_entropy_sum)  # the trainer swaps in a compiled copy with --compile

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return trained_tokens(batch)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StageLoss:
        out = model(input_ids=batch["input_ids"], use_cache=False)
        aux = out.aux_loss if out.aux_loss is not None else out.logits.new_zeros((), dtype=torch.float32)
        return StageLoss(self.cross_entropy(out.logits, batch["targets"]), aux)

    def build_dataset(self, cfg: TrainConfig, tokenizer: Any) -> Any:
        return PretrainDataset(cfg.data_files, tokenizer, cfg.max_seq_len, cfg.skip_bad_lines, cfg.cache_dir)

    def collate(self, items: list[dict[str, torch.Tensor]], tokenizer: Any) -> dict[str, torch.Tensor]:
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}

    def prepare_model(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        return model

    def setup(self, context: StageContext) -> None:
        """Called once the policy model is on its device (and again, identically, on resume)."""

    def save_final(self, model: nn.Module, tokenizer: Any, cfg: TrainConfig, out_dir: Path) -> None:
        from training.checkpoint import save_hf_model, save_pth

        if cfg.save_format in ("hf", "both"):
            save_hf_model(model, tokenizer, out_dir)
        if cfg.save_format in ("pth", "both"):
            save_pth(model, out_dir / f"{self.save_name}_{model.config.hidden_size}.pth")


PretrainStage = Stage  # the name the benchmarks and tests use


def require_chat_template(tokenizer: Any, stage: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        from training.errors import TrainingError

        raise TrainingError(
            f"the tokenizer has no chat_template; {stage} needs one (set tokenizer: to a directory that has it)"
        )


class SFTStage(Stage):
    """Full fine-tuning on conversations; loss on assistant tokens only."""

    name = "sft"
    save_name = "full_sft"

    def build_dataset(self, cfg: TrainConfig, tokenizer: Any) -> Any:
        require_chat_template(tokenizer, self.name)
        return SFTDataset(cfg.data_files, tokenizer, cfg.max_seq_len, cfg.skip_bad_lines, cfg.cache_dir)

    def collate(self, items: list[dict[str, torch.Tensor]], tokenizer: Any) -> dict[str, torch.Tensor]:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return pad_collate(items, pad)


class LoRAStage(SFTStage):
    """SFT loss, base frozen, adapters trained; saves a PEFT adapter (and the merged model beside it)."""

    name = "lora"

    def prepare_model(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        from training.lora import apply_lora

        apply_lora(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        return model

    def save_final(self, model: nn.Module, tokenizer: Any, cfg: TrainConfig, out_dir: Path) -> None:
        from training.checkpoint import save_hf_model
        from training.lora import merge_and_unwrap, save_adapter

        save_adapter(model, out_dir, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.init_from)
        tokenizer.save_pretrained(str(out_dir))
        save_hf_model(merge_and_unwrap(model), tokenizer, out_dir.with_name(out_dir.name + "-merged"))


class OptionalLoRA:
    """For stages that train all weights or, with use_lora, LoRA adapters (saved as LoRAStage saves them)."""

    def prepare_model(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        return LoRAStage.prepare_model(self, model, cfg) if cfg.use_lora else model

    def save_final(self, model: nn.Module, tokenizer: Any, cfg: TrainConfig, out_dir: Path) -> None:
        (LoRAStage.save_final if cfg.use_lora else Stage.save_final)(self, model, tokenizer, cfg, out_dir)


def stage_classes() -> dict[str, type[Stage]]:
    """Every stage by name (the alignment stages live in their own modules, which import this one)."""
    from training.agent import AgentStage
    from training.distill import DistillStage
    from training.dpo import DPOStage
    from training.grpo import GRPOStage
    from training.ppo import PPOStage
    from training.reason import ReasonStage
    from training.vlm import VLMPretrainStage, VLMSFTStage

    stages = (
        Stage,
        SFTStage,
        LoRAStage,
        DPOStage,
        DistillStage,
        ReasonStage,
        GRPOStage,
        PPOStage,
        AgentStage,
        VLMPretrainStage,
        VLMSFTStage,
    )
    return {stage.name: stage for stage in stages}


def get_stage(name: str) -> Stage:
    return stage_classes()[name]()
