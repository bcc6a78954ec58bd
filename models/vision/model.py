"""MiniMindVLMForCausalLM: our LLM plus a transformers vision encoder and a projector.

The LLM part is MiniMindForCausalLM itself (same keys: `model.*`, `lm_head.*`), so the engine, fusion, LoRA and
export treat a VLM as the LLM it contains. Images enter in one place: `splice_images` replaces the embeddings of
the `<|image_pad|>` positions, in order, by the projected features of the images (one run of `image_token_len`
placeholders per image). That happens on the prefill forward only; later tokens attend to the cached keys.
Text-only prompts never run the encoder.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from models.model import MiniMindForCausalLM
from models.vision.config import MiniMindVLMConfig
from models.vision.projector import VisionProjector


class MiniMindVLMForCausalLM(MiniMindForCausalLM):
    config_class = MiniMindVLMConfig

    def __init__(self, config: MiniMindVLMConfig) -> None:
        super().__init__(config)
        self.vision_encoder = AutoModel.from_config(config.vision_config)
        self.vision_proj = VisionProjector(config.vision_config.hidden_size, config.hidden_size)
        self.post_init()

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, 3, H, W] (or [batch, images, 3, H, W]) -> projected features [images, image_token_len, hidden]."""
        pixels = pixel_values.reshape(-1, *pixel_values.shape[-3:])
        encoder_dtype = next(self.vision_encoder.parameters()).dtype
        features = self.vision_encoder(pixel_values=pixels.to(encoder_dtype)).last_hidden_state
        return self.vision_proj(features.to(self.vision_proj.mlp[1].weight.dtype))

    def splice_images(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the placeholder positions replaced, in reading order, by the image features."""
        embeds = self.model.embed_tokens(input_ids)
        slots = input_ids == self.config.image_token_id
        features = image_features.reshape(-1, image_features.shape[-1]).to(embeds.dtype)
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(
                f"the prompt has {int(slots.sum())} {self.config.image_token} tokens but the images give "
                f"{features.shape[0]} features ({self.config.image_token_len} per image); put one run of "
                f"{self.config.image_token_len} placeholders per image"
            )
        return embeds.masked_scatter(slots.unsqueeze(-1), features)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        *args: Any,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if inputs_embeds is None and (pixel_values is not None or image_features is not None):
            if image_features is None:
                image_features = self.encode_images(pixel_values)
            inputs_embeds = self.splice_images(input_ids, image_features)
            input_ids = None
        return super().forward(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs: Any) -> dict[str, Any]:
        """generate(): the images are spliced on the first step only (later steps see them through the cache)."""
        pixel_values = kwargs.pop("pixel_values", None)
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        cache = inputs.get("past_key_values", inputs.get("cache"))
        first_step = cache is None or cache.get_seq_length() == 0
        if first_step and pixel_values is not None:
            inputs["pixel_values"] = pixel_values
        return inputs


AutoConfig.register("minimind_vlm", MiniMindVLMConfig, exist_ok=True)
AutoModelForCausalLM.register(MiniMindVLMConfig, MiniMindVLMForCausalLM, exist_ok=True)
AutoModelForImageTextToText.register(MiniMindVLMConfig, MiniMindVLMForCausalLM, exist_ok=True)
