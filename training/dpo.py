"""The `dpo` stage: Direct Preference Optimization on chosen/rejected pairs against a frozen reference model.

The reference is, by default, a frozen copy of the start weights, taken before a resumed run loads its
checkpoint (so a resumed run has exactly the reference an uninterrupted one has); `ref_model: PATH` loads
another checkpoint; with `use_lora` it is the policy itself with its adapters switched off (no second copy).
`precompute_ref_logps` runs the reference once over the whole data set before training and keeps only two
numbers per pair, so training holds one model on the GPU.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from training.config import TrainConfig
from training.data_preference import PreferenceDataset, preference_collate
from training.errors import TrainingError
from training.losses import dpo_loss, sequence_logps
from training.stages import OptionalLoRA, SFTStage, StageContext, StageLoss, require_chat_template

log = logging.getLogger("minimind.train")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """No dropout for a reference pass through the policy's own modules; the training mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def load_reference(cfg: TrainConfig, context: StageContext) -> nn.Module:
    """ref_model's weights, checked to share the policy's vocabulary."""
    from training.setup import build_model

    reference = build_model(dataclasses.replace(cfg, init_from=cfg.ref_model), context.tokenizer)
    if reference.config.vocab_size != context.model.config.vocab_size:
        raise TrainingError(
            f"ref_model {cfg.ref_model} has a vocabulary of {reference.config.vocab_size} tokens, the policy "
            f"{context.model.config.vocab_size}; DPO compares log-probabilities token by token, so they must match"
        )
    return frozen(reference).to(context.device)


class DPOStage(OptionalLoRA, SFTStage):
    """Sigmoid DPO (cDPO with label_smoothing) or IPO; log-probabilities summed over assistant tokens only."""

    name = "dpo"
    unit = "pairs"
    save_name = "rlhf"

    def build_dataset(self, cfg: TrainConfig, tokenizer: Any) -> Any:
        require_chat_template(tokenizer, self.name)
        return PreferenceDataset(cfg.data_files, tokenizer, cfg.max_seq_len, cfg.skip_bad_lines, cfg.cache_dir)

    def collate(self, items: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return preference_collate(items, pad)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["pair_index"].numel())

    def setup(self, context: StageContext) -> None:
        cfg = self.cfg = context.cfg
        self.policy, self.reference, self.cached = context.model, None, None
        if cfg.ref_model:
            self.reference = load_reference(cfg, context)
        elif not cfg.use_lora:
            self.reference = frozen(copy.deepcopy(context.model))
        if cfg.precompute_ref_logps:
            self.cached = self.precompute(context)
            self.reference = None  # training holds one model from here on
            if context.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed reference log-probabilities of the batch's 2B rows (chosen first)."""
        if self.cached is not None:
            pairs = self.cached[batch["pair_index"].cpu()].to(batch["input_ids"].device)
            return torch.cat([pairs[:, 0], pairs[:, 1]])
        if self.reference is not None:
            logits = self.reference(input_ids=batch["input_ids"], use_cache=False).logits
        else:
            from training.lora import adapters_disabled

            with adapters_disabled(self.policy), eval_mode(self.policy):
                logits = self.policy(input_ids=batch["input_ids"], use_cache=False).logits
        return sequence_logps(logits, batch["targets"])[0]

    def precompute(self, context: StageContext) -> torch.Tensor:
        """(pairs, 2) reference log-probabilities of the whole data set; each process computes its share."""
        from tqdm import tqdm

        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        dataset, size = context.dataset, context.cfg.batch_size
        cached = torch.zeros(len(dataset), 2, dtype=torch.float32, device=context.device)
        mine = list(range(rank, len(dataset), world))
        autocast = torch.autocast(
            context.device.type, dtype=context.amp_dtype or torch.float32, enabled=context.amp_dtype is not None
        )
        for first in tqdm(range(0, len(mine), size), desc="reference log-probs", disable=not context.is_main):
            indices = mine[first : first + size]
            batch = self.collate([dataset[i] for i in indices], context.tokenizer)
            batch = {key: value.to(context.device) for key, value in batch.items()}
            with autocast:
                logps = self.reference_logps(batch)
            cached[torch.tensor(indices, device=context.device)] = logps.view(2, -1).T.float()
        if dist.is_initialized():
            dist.all_reduce(cached)
        if context.is_main:
            log.info("reference log-probabilities precomputed for %d pairs", len(dataset))
        return cached.cpu()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StageLoss:
        out = model(input_ids=batch["input_ids"], use_cache=False)
        logps, lengths = sequence_logps(out.logits, batch["targets"])
        reference = self.reference_logps(batch)
        n = logps.shape[0] // 2
        losses, chosen, rejected = dpo_loss(
            logps[:n],
            logps[n:],
            reference[:n],
            reference[n:],
            self.cfg.beta,
            self.cfg.dpo_loss,
            self.cfg.label_smoothing,
            lengths[:n],
            lengths[n:],
        )
        metrics = {
            "reward_margin": (chosen - rejected).sum(),
            "reward_accuracy": (chosen > rejected).float().sum(),
            "reward_chosen": chosen.sum(),
            "reward_rejected": rejected.sum(),
            "logps_chosen": logps[:n].detach().sum(),
            "logps_rejected": logps[n:].detach().sum(),
        }
        return StageLoss(losses.sum(), out.aux_loss, metrics)
