"""Training stages. A stage contributes a dataset, a collate function, a loss and how its result is saved;
the loop (training/trainer.py) is shared. Adding a stage (DPO, distillation, ...) means adding a class here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.config import TrainConfig
from training.data import IGNORE, PretrainDataset, SFTDataset, pad_collate


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over targets that are not -100 (targets are already shifted)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


class PretrainStage:
    """Next-token prediction on packed documents."""

    name = "pretrain"
    cross_entropy = staticmethod(cross_entropy_sum)  # the trainer swaps in a compiled copy with --compile

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed cross-entropy over trained targets, MoE aux loss).

        The sum (not the mean) is returned so the trainer can divide by the token count of the whole optimizer
        step: every trained token then weighs the same, whatever micro-batch it fell in.
        """
        out = model(input_ids=batch["input_ids"], use_cache=False)
        aux = out.aux_loss if out.aux_loss is not None else out.logits.new_zeros((), dtype=torch.float32)
        return self.cross_entropy(out.logits, batch["targets"]), aux

    def build_dataset(self, cfg: TrainConfig, tokenizer: Any) -> Any:
        return PretrainDataset(cfg.data_files, tokenizer, cfg.max_seq_len, cfg.skip_bad_lines, cfg.cache_dir)

    def collate(self, items: list[dict[str, torch.Tensor]], tokenizer: Any) -> dict[str, torch.Tensor]:
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}

    def prepare_model(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        return model

    def save_final(self, model: nn.Module, tokenizer: Any, cfg: TrainConfig, out_dir: Path) -> None:
        from training.checkpoint import save_hf_model, save_pth

        if cfg.save_format in ("hf", "both"):
            save_hf_model(model, tokenizer, out_dir)
        if cfg.save_format in ("pth", "both"):
            save_pth(
                model,
                out_dir / f"{'pretrain' if self.name == 'pretrain' else 'full_sft'}_{model.config.hidden_size}.pth",
            )


class SFTStage(PretrainStage):
    """Full fine-tuning on conversations; loss on assistant tokens only."""

    name = "sft"

    def build_dataset(self, cfg: TrainConfig, tokenizer: Any) -> Any:
        if not getattr(tokenizer, "chat_template", None):
            from training.errors import TrainingError

            raise TrainingError(
                "the tokenizer has no chat_template; SFT needs one (set tokenizer: to a directory that has it)"
            )
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


STAGES = {stage.name: stage for stage in (PretrainStage, SFTStage, LoRAStage)}


def get_stage(name: str) -> PretrainStage:
    return STAGES[name]()
