"""Merge a LoRA adapter in PEFT's format into a model's linear weights: W += (B @ A) * alpha / r.

PEFT's on-disk format is the interchange format (adapter_config.json + adapter_model.safetensors, keys like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so adapters trained here, with PEFT, or
by anyone else's PEFT-based trainer merge the same way. Merging is a few lines, so it is written here
rather than importing PEFT into the serving path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from models.errors import CheckpointError

PEFT_PREFIX = "base_model.model."


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(adapter_config, {module path: {"A": tensor [r, in], "B": tensor [out, r]}}) from a PEFT directory."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(
                f"{path} not found: a LoRA adapter directory holds adapter_config.json and adapter_model.safetensors"
            )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: invalid JSON ({err})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(
            f"{config_path}: peft_type is {config.get('peft_type')!r}; only LORA adapters can be merged"
        )
    if config.get("use_dora"):
        raise CheckpointError(
            f"{config_path}: DoRA adapters (use_dora: true) are not supported; train a plain LoRA adapter"
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_path)).items():
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                pairs.setdefault(name.split(marker)[0], {})[part[-1]] = tensor
                break
        else:
            raise CheckpointError(
                f"{weights_path}: unexpected tensor {key!r} (only lora_A/lora_B weights can be merged)"
            )
    return config, pairs


def adapter_scale(config: dict) -> float:
    rank, alpha = config["r"], config.get("lora_alpha", config["r"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


@torch.no_grad()
def merge_lora_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Add the adapter's update to each targeted nn.Linear of `model` in place and return the model."""
    config, pairs = read_adapter(adapter_dir)
    scale = adapter_scale(config)
    modules = dict(model.named_modules())
    for path, weights in pairs.items():
        linear = modules.get(path)
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{adapter_dir}: adapter targets {path!r}, which is not a linear layer of this model")
        if set(weights) != {"A", "B"}:
            raise CheckpointError(
                f"{adapter_dir}: {path} has only lora_{next(iter(weights))}; both lora_A and lora_B are needed"
            )
        delta = weights["B"].float() @ weights["A"].float()
        if config.get("fan_in_fan_out"):
            delta = delta.T
        if delta.shape != linear.weight.shape:
            raise CheckpointError(
                f"{adapter_dir}: {path} update has shape {tuple(delta.shape)} but the weight is {tuple(linear.weight.shape)}; "
                "the adapter was trained on a different model shape"
            )
        linear.weight += (delta * scale).to(linear.weight.dtype)
    return model
