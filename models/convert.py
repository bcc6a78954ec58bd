"""`convert(SRC, OUT, to=...)`: read any checkpoint kind through the loader, optionally merge a LoRA adapter,
and write a Hugging Face directory for the chosen target (see models/export.py), a GGUF file
(models/gguf_export.py) or an upstream MiniMind .pth file (models/pth_export.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.errors import CheckpointError
from models.export import choose_target, write_hf_dir
from models.loader import build_model, load_tokenizer, read_checkpoint, resolve_dtype, stored_dtype


def convert(
    source: str | Path,
    out: str | Path,
    to: str = "auto",
    *,
    preset: str | None = None,
    config: str | Path | None = None,
    tokenizer: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    merge_lora: str | Path | None = None,
    force: bool = False,
    quant: str = "f16",
    vision_encoder: str | Path | None = None,
) -> tuple[Path, str]:
    """Convert SOURCE into OUT; returns (OUT, the target used). dtype None keeps the source's dtype.

    `to="gguf"` writes a .gguf file (`quant`: f32, f16, q8_0, q4_0) and returns its architecture as the target;
    `to="pth"` writes upstream's .pth (fp16 unless `dtype`). Everything that can fail (reading, checking,
    refusing the target, the tokenizer) is done before OUT is touched, and OUT itself is written into a
    temporary sibling and renamed.
    """
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise CheckpointError(f"{out}: already exists; choose another output directory or pass --force to replace it")
    model_config, state, tok_dir, gguf = read_checkpoint(
        source, preset=preset, config=config, vision_encoder=vision_encoder
    )
    if model_config.model_type == "minimind_vlm":
        from models.vision.export import convert_vlm

        return convert_vlm(
            model_config,
            state,
            out,
            to,
            source,
            tok=_tokenizer_for(tokenizer, tok_dir, gguf, source),
            dtype=dtype,
            merge_lora=merge_lora,
            force=force,
        )
    target = choose_target(model_config, to) if to not in ("gguf", "pth") else to
    model = build_model(model_config, state, str(source))
    out_dtype = resolve_dtype(dtype, "cuda") or stored_dtype(state)
    if merge_lora is not None:
        from models.lora import merge_lora_adapter

        model = merge_lora_adapter(model.float(), merge_lora)
    if to == "pth":
        from models.pth_export import write_pth

        pth_dtype = resolve_dtype(dtype) if dtype is not None else torch.float16
        return write_pth(out, model.config, model.state_dict(), dtype=pth_dtype, force=force), to
    tok = _tokenizer_for(tokenizer, tok_dir, gguf, source)
    if to == "gguf":
        from models.gguf_export import write_gguf

        return write_gguf(out, model.config, model.state_dict(), tok, quant=quant, force=force)
    write_hf_dir(out, model.config, model.state_dict(), tok, target=target, dtype=out_dtype, force=force)
    return out, target


def _tokenizer_for(tokenizer: str | Path | None, tok_dir: Path, gguf: str | None, source: str | Path) -> Any:
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    try:
        return load_tokenizer(tok_dir, gguf_file=gguf)
    except CheckpointError as err:
        raise CheckpointError(
            f"{source}: no tokenizer found beside it ({err}); pass --tokenizer DIR so OUT gets one"
        ) from err
