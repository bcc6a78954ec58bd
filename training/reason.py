"""The `reason` stage (reasoning distillation): SFT on reasoning data, with the think tags weighted.

The loss on the tag tokens `<think>`, `</think>` (and `<answer>`, `</answer>` when the tokenizer has them as
single tokens) is multiplied by think_tag_weight (upstream MiniMind uses 10), so the model learns early to
open and close its reasoning; the sum is divided by the number of trained tokens, as upstream's train_reason.py
does. Data: conversations whose assistant turns carry `reasoning_content` (rendered by the chat template) or
write `<think>...</think>` inline in their content; both tokenize to the same tag tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.errors import TrainingError
from training.losses import weighted_cross_entropy_sum
from training.stages import OptionalLoRA, SFTStage, StageContext, StageLoss

REQUIRED_TAGS = ("<think>", "</think>")
OPTIONAL_TAGS = ("<answer>", "</answer>")


def tag_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the tags that are single tokens; refuses a tokenizer without single-token think tags."""
    ids = []
    for tag in REQUIRED_TAGS + OPTIONAL_TAGS:
        encoded = tokenizer(tag, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids.append(encoded[0])
        elif tag in REQUIRED_TAGS:
            raise TrainingError(
                f"the tokenizer has no single token for {tag} (it becomes {len(encoded)} tokens), so the reason "
                "stage cannot weight it; use a tokenizer with the think tags (minimind tokenizer train adds them, "
                "minimind-3's has them)"
            )
    return ids


class ReasonStage(OptionalLoRA, SFTStage):
    name = "reason"
    save_name = "reason"

    def setup(self, context: StageContext) -> None:
        self.weight = context.cfg.think_tag_weight
        self.tag_ids = torch.tensor(tag_token_ids(context.tokenizer), device=context.device)

    def token_weights(self, targets: torch.Tensor) -> torch.Tensor:
        """1 per trained token, think_tag_weight on the tag tokens (0 where the target is -100)."""
        tags = torch.isin(targets, self.tag_ids.to(targets.device))
        return torch.where(tags, self.weight, 1.0) * (targets != -100)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StageLoss:
        out = model(input_ids=batch["input_ids"], use_cache=False)
        weights = self.token_weights(batch["targets"])
        return StageLoss(weighted_cross_entropy_sum(out.logits, batch["targets"], weights), out.aux_loss)
