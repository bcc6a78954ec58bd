"""Projections that read the same input (q/k/v, gate/up) as one GEMM for inference, separate for training.

A small model's decode step is bound by the number of kernels it launches (docs/engine.md), and one GEMM of the
concatenated weights costs about what one of its parts does. Training, PEFT and checkpoints name the separate
layers (`q_proj`, `k_proj`, ...), so those stay the model's shape; `fuse()` swaps them for one `FusedLinear` with
real parameters (moved by `.to()`, in `parameters()`), and state-dict hooks keep the separate names both ways:
a fused module saves and loads the same checkpoints. `unfuse()` gives the separate layers back, same values.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class FusedLinear(nn.Module):
    """Linear layers of one input as one: the output is split back into the parts' outputs."""

    def __init__(self, parts: list[nn.Linear]) -> None:
        super().__init__()
        self.in_features = parts[0].in_features
        self.sizes = [part.out_features for part in parts]
        requires_grad = parts[0].weight.requires_grad
        with torch.no_grad():
            self.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=requires_grad)
            has_bias = parts[0].bias is not None
            self.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad) if has_bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)

    def parts(self) -> list[nn.Linear]:
        """The separate layers again (copies of the rows, so the fused storage can be freed)."""
        layers = []
        weights = self.weight.detach().split(self.sizes)
        biases = self.bias.detach().split(self.sizes) if self.bias is not None else [None] * len(self.sizes)
        for weight, bias in zip(weights, biases):
            layer = nn.Linear(self.in_features, weight.shape[0], bias=bias is not None, device="meta")
            layer.weight = nn.Parameter(weight.clone(), requires_grad=self.weight.requires_grad)
            if bias is not None:
                layer.bias = nn.Parameter(bias.clone(), requires_grad=self.weight.requires_grad)
            layers.append(layer)
        return layers


class FusableProjections(nn.Module):
    """A module whose Linear layers `part_names` read the same input and can run as one `fused_name` layer."""

    fused_name: str
    part_names: tuple[str, ...]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The parts' outputs, in order: one GEMM once fused, one per part otherwise."""
        fused = self._modules.get(self.fused_name)
        if fused is not None:
            return fused(x)
        return tuple(self._modules[name](x) for name in self.part_names)

    @property
    def is_fused(self) -> bool:
        return self._modules.get(self.fused_name) is not None

    def fuse(self) -> None:
        if self.is_fused:
            return
        fused = FusedLinear([self._modules[name] for name in self.part_names])
        for name in self.part_names:
            delattr(self, name)
        setattr(self, self.fused_name, fused)
        self._fusion_hooks = (
            self.register_state_dict_post_hook(_save_parts),
            self.register_load_state_dict_pre_hook(_load_parts),
        )

    def unfuse(self) -> None:
        if not self.is_fused:
            return
        for name, layer in zip(self.part_names, self._modules[self.fused_name].parts()):
            setattr(self, name, layer)
        delattr(self, self.fused_name)
        for handle in self._fusion_hooks:
            handle.remove()


def _keys(module: FusableProjections, prefix: str, kind: str) -> tuple[str, list[str]]:
    return f"{prefix}{module.fused_name}.{kind}", [f"{prefix}{name}.{kind}" for name in module.part_names]


def _save_parts(module: FusableProjections, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict() of a fused module: the separate layers' names, as checkpoints and PEFT know them."""
    fused: FusedLinear = module._modules[module.fused_name]
    for kind in ("weight", "bias"):
        fused_key, part_keys = _keys(module, prefix, kind)
        if fused_key in state_dict:
            tensor = state_dict.pop(fused_key)
            for key, part in zip(part_keys, tensor.split(fused.sizes)):
                state_dict[key] = part.clone()  # own storage: safetensors refuses tensors that share memory


def _load_parts(module: FusableProjections, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict() into a fused module: the separate layers' tensors are concatenated into the fused one."""
    for kind in ("weight", "bias"):
        fused_key, part_keys = _keys(module, prefix, kind)
        if all(key in state_dict for key in part_keys):
            state_dict[fused_key] = torch.cat([state_dict.pop(key) for key in part_keys])


def fuse(model: nn.Module) -> nn.Module:
    """Fuse every fusable module of `model` in place (the engine does this to its own copy on a GPU)."""
    for module in list(model.modules()):
        if isinstance(module, FusableProjections):
            module.fuse()
    return model


def unfuse(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        if isinstance(module, FusableProjections):
            module.unfuse()
    return model
