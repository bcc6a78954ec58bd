"""The projector from image features into the LLM's hidden size, as upstream minimind-v defines it.

Keys `mlp.0` (LayerNorm), `mlp.1` and `mlp.3` (Linear) match upstream's `vision_proj.mlp.*`, so an upstream
state dict loads by name.
"""

from __future__ import annotations

import torch
from torch import nn


class VisionProjector(nn.Module):
    def __init__(self, image_hidden_size: int, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(image_hidden_size),
            nn.Linear(image_hidden_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)
