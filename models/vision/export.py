"""Writing a VLM as one Hugging Face directory: encoder + projector + LLM weights, config, tokenizer,
generation_config and the encoder's preprocessor_config.json.

Only our own `minimind_vlm` type is written. No plain-transformers VLM class computes the same function: the
LLM part has per-head q/k RMSNorm and tied embeddings (Qwen3's text model), but transformers' Qwen3-based VLMs
pair it with their own vision towers, and its SigLIP-based ones (PaliGemma, Idefics3/SmolVLM, LLaVA) use other
LLMs, projectors or prefix attention; see docs/convert.md.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from models.errors import CheckpointError
from models.export import _replace, generation_config
from models.loader import build_model, resolve_dtype, stored_dtype
from models.vision.config import MiniMindVLMConfig
from models.vision.image import PREPROCESSOR_FILE, ImagePreprocessor

VLM_TARGETS = ("auto", "minimind", "minimind_vlm")


def convert_vlm(
    config: MiniMindVLMConfig,
    state: dict[str, torch.Tensor],
    out: Path,
    to: str,
    source: str | Path,
    *,
    tok: Any,
    dtype: str | torch.dtype | None,
    merge_lora: str | Path | None,
    force: bool,
) -> tuple[Path, str]:
    if to not in VLM_TARGETS:
        raise CheckpointError(
            f"cannot convert a vision-language model to {to}: only our own type is written (--to auto or minimind); "
            "no plain-transformers class represents it exactly (see docs/convert.md)"
        )
    model = build_model(config, state, str(source))
    if merge_lora is not None:
        from models.lora import merge_lora_adapter

        model = merge_lora_adapter(model.float(), merge_lora)
    out_dtype = resolve_dtype(dtype, "cuda") or stored_dtype(state)
    write_vlm_dir(out, model.to(out_dtype), tok, force=force)
    return out, "minimind_vlm"


def write_vlm_dir(out: str | Path, model: Any, tokenizer: Any, *, force: bool = False) -> Path:
    """save_pretrained plus tokenizer, generation_config and preprocessor_config.json, written atomically."""
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise CheckpointError(f"{out}: already exists; choose another output directory or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        generation_config(model.config, tokenizer).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp, save_jinja_files=False)
        processor = ImagePreprocessor.for_encoder(model.config.vision_config)
        (tmp / PREPROCESSOR_FILE).write_text(json.dumps(processor.to_dict(), indent=2) + "\n")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
