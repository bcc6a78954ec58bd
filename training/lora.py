"""LoRA layers for training: the base weight frozen, a low-rank update B @ A trained, saved in PEFT's format.

Written here (not PEFT's injection) so the trained module tree stays our own model's: the trainer, FSDP and
torch.compile see plain nn.Linear sub-modules, and every linear layer (q, k, v, o, gate, up, down; square or
not) can be targeted. The files written are PEFT's, so `peft.PeftModel.from_pretrained(base, dir)` loads them
and `models.lora.merge_lora_adapter` merges them.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from models.lora import PEFT_PREFIX
from training.errors import TrainingError


class LoRALinear(nn.Module):
    """y = base(x) + lora_B(lora_A(dropout(x))) * alpha / r; lora_B starts at zero so training starts at the base."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.dropout = nn.Dropout(dropout)
        self.scale = alpha / rank
        self.disabled = False  # set by adapters_disabled(): the base layer alone (DPO's reference)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's initialisation
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x)
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale


def apply_lora(
    model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float, within: str = ""
) -> list[str]:
    """Freeze every parameter, wrap each nn.Linear whose name ends in one of `targets` (and starts with `within`,
    e.g. "model." for a VLM's LLM but not its vision encoder); return wrapped paths."""
    for param in model.parameters():
        param.requires_grad_(False)
    wrapped = []
    for path, module in list(model.named_modules()):
        if (
            isinstance(module, nn.Linear)
            and path.rsplit(".", 1)[-1] in targets
            and path != "lm_head"
            and path.startswith(within)
        ):
            parent_path, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent_path), name, LoRALinear(module, rank, alpha, dropout))
            wrapped.append(path)
    if not wrapped:
        names = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise TrainingError(f"lora_targets {targets} match no linear layer; this model's linear layers are {names}")
    return wrapped


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model, computed by the same modules with every adapter switched off (no second copy)."""
    layers = [module for module in model.modules() if isinstance(module, LoRALinear)]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights under PEFT's key names (base_model.model.<path>.lora_A.weight)."""
    state = {}
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = module.lora_A.weight.detach().cpu().contiguous()
            state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = module.lora_B.weight.detach().cpu().contiguous()
    return state


def save_adapter(
    model: nn.Module, out_dir: Path, rank: int, alpha: float, dropout: float, targets: list[str], base: str = ""
) -> None:
    """Write adapter_config.json + adapter_model.safetensors as PEFT does."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(model), str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base or None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))


@torch.no_grad()
def merge_and_unwrap(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear back into a plain nn.Linear (W += B @ A * scale), in place."""
    for path, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            base = module.base_layer
            base.weight += (module.lora_B.weight.float() @ module.lora_A.weight.float() * module.scale).to(
                base.weight.dtype
            )
            parent_path, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent_path), name, base)
    return model
