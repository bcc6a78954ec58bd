"""`build_engine(config)`: the one way to make the native engine, used by `LLM`, the server's native backend and
(through `LLM`) `minimind generate` / `chat`.

It loads the model the config names (or takes the model object given), lays out the engine's own copy for its
device (fused projections on a GPU, CPU weight layouts or int8/int4 layers on the CPU; a model object handed in is
left as it is),
loads the draft model for speculative decoding, and caps the context window.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from engine.config import DEFAULT_MAX_MODEL_LEN, EngineConfig, default_device
from engine.engine_core import EngineCore
from engine.errors import InvalidRequestError
from engine.model_runner import CpuWeightLayouts
from models.model import MiniMindForCausalLM


def build_engine(config: EngineConfig) -> EngineCore:
    """Load the model (and draft) the config names, lay out the engine's own copy for its device, size the KV cache
    and return the engine core."""
    config.validate()
    device = config.device or default_device()
    device_type = torch.device(device).type
    target, tokenizer = load(
        config.model, device=device, dtype=config.dtype, tokenizer=config.tokenizer, lora=config.lora
    )
    own_copy = not isinstance(config.model, MiniMindForCausalLM)  # a model object handed in stays as it is
    cpu_layouts = None
    if config.quantization != "none":
        quantize_weights(target, config.quantization, device_type, own_copy)
    elif own_copy and device_type == "cpu":
        cpu_layouts = CpuWeightLayouts(target)  # our own copy of the weights: lay them out per step size
    elif own_copy and device_type == "cuda":
        target.fuse()  # fewer kernels per decode step (models/fusion.py)
    draft = None
    if config.draft_model is not None:
        draft, _ = load(config.draft_model, device=device, dtype=next(target.parameters()).dtype, tokenizer=tokenizer)
        if device_type == "cuda" and not isinstance(config.draft_model, MiniMindForCausalLM):
            draft.fuse()
        if draft.config.vocab_size != target.config.vocab_size:
            raise InvalidRequestError(
                f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                f"({target.config.vocab_size}): speculative decoding needs the same tokenizer",
                param="draft_model",
            )
    limit = target.config.max_position_embeddings
    max_model_len = config.max_model_len
    if max_model_len is None:
        max_model_len = min(limit, DEFAULT_MAX_MODEL_LEN)
    elif max_model_len > limit:
        raise InvalidRequestError(
            f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {limit}",
            param="max_model_len",
        )
    return EngineCore(
        target,
        tokenizer,
        dataclasses.replace(config, device=device, max_model_len=max_model_len),
        draft_model=draft,
        cpu_layouts=cpu_layouts,
    )


def quantize_weights(model: MiniMindForCausalLM, method: str, device_type: str, own_copy: bool) -> None:
    """Replace the linear layers of the engine's own copy with int8/int4 ones (models/quantization.py); they are
    already packed for every step size, so the CPU weight layouts are not needed."""
    from models.quantization import quantize

    if device_type != "cpu":
        raise InvalidRequestError(
            f"quantization {method} runs on the CPU only (torch's packed int8/int4 kernels), not on {device_type}; "
            "use --device cpu, or on a GPU --dtype bf16 without --quantization",
            param="quantization",
        )
    if not own_copy:
        raise InvalidRequestError(
            "quantization applies to a checkpoint the engine loads; quantize a model object yourself first "
            "(models.quantization.quantize(model, method)) and pass it without quantization=",
            param="quantization",
        )
    quantize(model, method)


def load(
    model: str | Path | MiniMindForCausalLM | None,
    *,
    device: str,
    dtype: str | torch.dtype | None,
    tokenizer: Any = None,
    lora: str | Path | None = None,
) -> tuple[MiniMindForCausalLM, Any]:
    """A checkpoint path (or None: the bundled default model) through models.loader, or a model object as given
    (moved to device/dtype; then `tokenizer` must be a tokenizer object or a directory)."""
    from models.loader import load_model, load_tokenizer, resolve_dtype

    if dtype is None and torch.device(device).type == "cuda":
        dtype = "bf16"
    if isinstance(model, MiniMindForCausalLM):
        if tokenizer is None:
            raise InvalidRequestError(
                "a model object needs tokenizer= (a tokenizer or its directory)", param="tokenizer"
            )
        if lora is not None:
            from models.lora import merge_lora_adapter

            model = merge_lora_adapter(model, lora)
        target = resolve_dtype(dtype, device)
        model = model.to(device=device, dtype=target) if target is not None else model.to(device)
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        return model.eval(), tokenizer
    if model is None:
        from models.default_model import default_model_path

        model = default_model_path()
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        loaded, _ = load_model(model, dtype=dtype, device=device, lora=lora)
    else:
        loaded, tokenizer = load_model(model, dtype=dtype, device=device, tokenizer=tokenizer, lora=lora)
    return loaded, tokenizer
