"""Reading upstream minimind-v checkpoints: the LLM + projector `.pth` plus the encoder directory beside it.

Upstream saves the vision encoder separately (a transformers directory, `vision_encoder/` in its layout) and
leaves it out of `model.pth`; here the two become one state dict under our keys (`vision_encoder.*`).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import read_json, read_safetensors_dir
from models.config import MiniMindConfig
from models.errors import CheckpointError
from models.vision.config import MiniMindVLMConfig

UPSTREAM_VLM_TYPE = "minimind-v"


def find_vision_encoder(pth: Path, given: str | Path | None) -> Path | None:
    """The encoder directory: the one given, else `vision_encoder/` beside the .pth, else None."""
    if given is not None:
        folder = Path(given).expanduser()
        if not (folder / "config.json").is_file():
            raise CheckpointError(
                f"{folder}: not a vision encoder directory (no config.json); pass a transformers "
                "SigLIP/CLIP vision model directory"
            )
        return folder
    beside = pth.parent / "vision_encoder"
    return beside if (beside / "config.json").is_file() else None


def vlm_config_from(llm: MiniMindConfig, encoder: Path | dict[str, Any], upstream: dict[str, Any]) -> MiniMindVLMConfig:
    """Our VLM config: the LLM fields already read, the encoder's config (its directory, or the config itself
    for a fresh encoder) and upstream's image fields."""
    raw = read_json(encoder / "config.json") if isinstance(encoder, Path) else dict(encoder)
    vision = raw.get("vision_config", raw) if raw.get("model_type") in ("siglip", "clip") else raw
    if raw.get("model_type") in ("siglip", "clip"):
        vision = {**vision, "model_type": f"{raw['model_type']}_vision_model"}
    known = set(inspect.signature(MiniMindConfig.__init__).parameters) - {"self", "kwargs"}
    fields = {k: v for k, v in llm.to_dict().items() if k in known}
    image_ids = upstream.get("image_ids") or [12]
    try:
        return MiniMindVLMConfig(
            vision_config={k: v for k, v in vision.items() if k not in ("architectures", "transformers_version")},
            image_token=upstream.get("image_special_token", "<|image_pad|>"),
            image_token_id=int(image_ids[0]),
            image_token_len=upstream.get("image_token_len"),
            **fields,
        )
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{encoder if isinstance(encoder, Path) else 'vision_config'}: {err}") from err


def encoder_state(encoder_dir: Path) -> dict[str, torch.Tensor]:
    """The encoder's weights under our `vision_encoder.` prefix (a full SiglipModel/CLIPModel keeps its vision
    tower only)."""
    state = read_safetensors_dir(encoder_dir)
    out = {}
    for key, value in state.items():
        if key.startswith(("text_model.", "logit_", "text_projection", "visual_projection")):
            continue
        key = key.removeprefix("vision_model.")
        out[f"vision_encoder.{key}"] = value
    return out
