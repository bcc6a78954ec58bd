"""MiniMindVLMConfig: our LLM config plus a vision encoder config and the image placeholder.

It extends MiniMindConfig (as upstream minimind-v's VLMConfig extends its MiniMindConfig) so that every part of
the project that reads LLM fields (engine, training, export) reads a VLM config unchanged.
"""

from __future__ import annotations

from typing import Any

from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

from models.config import MiniMindConfig

IMAGE_TOKEN = "<|image_pad|>"
# Where an image goes in a data file's text (upstream minimind-v's marker); it becomes one run of placeholders.
IMAGE_MARKER = "<image>"
# The vision encoders transformers provides that the VLM accepts (their last_hidden_state is projected).
VISION_MODEL_TYPES = ("siglip_vision_model", "clip_vision_model")


def vision_config_from(value: PretrainedConfig | dict[str, Any] | None) -> PretrainedConfig:
    """A transformers vision config from a config object or its dict (default: SigLIP's defaults)."""
    if isinstance(value, PretrainedConfig):
        return value
    fields = dict(value or {"model_type": "siglip_vision_model"})
    model_type = fields.pop("model_type", "siglip_vision_model")
    if model_type not in VISION_MODEL_TYPES:
        raise ValueError(
            f"vision_config.model_type {model_type!r} is not supported; use one of {', '.join(VISION_MODEL_TYPES)}"
        )
    return CONFIG_MAPPING[model_type](**fields)


class MiniMindVLMConfig(MiniMindConfig):
    model_type = "minimind_vlm"
    sub_configs = {"vision_config": AutoConfig}

    def __init__(
        self,
        vision_config: PretrainedConfig | dict[str, Any] | None = None,
        image_token: str = IMAGE_TOKEN,
        image_token_id: int = 12,
        image_token_len: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.vision_config = vision_config_from(vision_config)
        patches = (self.vision_config.image_size // self.vision_config.patch_size) ** 2
        # CLIP prepends a class token to its patch features; SigLIP has none.
        features = patches + (1 if self.vision_config.model_type == "clip_vision_model" else 0)
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.image_token_len = image_token_len or features
        if self.image_token_len != features:
            raise ValueError(
                f"image_token_len ({self.image_token_len}) must equal the encoder's features per image ({features}: "
                f"image_size {self.vision_config.image_size} / patch_size {self.vision_config.patch_size})"
            )
        super().__init__(**kwargs)
