"""What the trainer sets up before its loop: processes and devices, precision, the model, optimizer groups,
compilation. Plain functions, so that benchmarks and tests can build the same pieces the trainer does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from models.dtypes import dtype_name
from training.config import TrainConfig
from training.errors import TrainingError


def setup_distributed(device: str) -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device); joins torchrun's process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device={device} but torch sees no CUDA GPU; use --device cpu")
    if device == "cuda":
        device = f"cuda:{local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return rank, local_rank, world, dev


def precision(dtype: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed)."""
    dtype = dtype_name(dtype)
    if device.type != "cuda":
        if dtype in ("bf16", "fp16"):
            raise TrainingError(f"dtype={dtype} needs a GPU; on CPU training runs in fp32 (dtype auto or fp32)")
        return None, False
    if dtype == "auto":
        dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, True), "fp32": (None, False)}[dtype]


def build_model(cfg: TrainConfig, tokenizer: Any) -> nn.Module:
    """Weights from init_from (any checkpoint models.loader reads) or a fresh preset-shaped model (seeded)."""
    from models.model import MiniMindForCausalLM

    if cfg.init_from:
        from models.loader import load_model

        source = Path(cfg.init_from).expanduser()
        shaped = source.is_file() and source.suffix == ".pth"
        model, _ = load_model(
            source, dtype="fp32", tokenizer=cfg.tokenizer or None, preset=cfg.preset if shaped else None
        )
        for module in model.modules():  # the checkpoint's dropout is an inference setting; training picks its own
            if isinstance(module, nn.Dropout):
                module.p = cfg.dropout
            elif hasattr(module, "dropout") and isinstance(module.dropout, float):
                module.dropout = cfg.dropout
        return model.train()
    from models.presets import preset_config

    overrides = {"dropout": cfg.dropout, **cfg.model_config}
    if len(tokenizer) > overrides.get("vocab_size", 0):
        overrides.setdefault("vocab_size", len(tokenizer))
    for key, token in (
        ("eos_token_id", tokenizer.eos_token_id),
        ("bos_token_id", tokenizer.bos_token_id),
        ("pad_token_id", tokenizer.pad_token_id),
    ):
        if token is not None:
            overrides.setdefault(key, token)
    try:
        config = preset_config(cfg.preset, **overrides)
    except ValueError as err:
        raise TrainingError(f"preset/model_config: {err}") from None
    if config.vocab_size < len(tokenizer):
        raise TrainingError(
            f"model_config vocab_size={config.vocab_size} is smaller than the tokenizer ({len(tokenizer)})"
        )
    torch.manual_seed(cfg.seed)
    return MiniMindForCausalLM(config).train()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on norms, biases or the (tied) embedding."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 and "embed" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def compile_model(model: nn.Module, stage: Any, scope: str, mode: str = "default") -> None:
    """torch.compile the decoder (scope "model": one graph for the whole stack, the fewest kernel launches per
    step; scope "layers": each decoder layer, "regional compilation", whose warm-up compile takes seconds
    instead of a minute because the layers share one graph) and the loss.

    The loss is compiled so the logits' float upcast, log-softmax and gather fuse into one pass.
    """
    if scope == "model":
        model.model.compile(mode=mode)
    else:
        for layer in model.model.layers:
            layer.compile(mode=mode)
    stage.cross_entropy = torch.compile(stage.cross_entropy)
