"""MiniMind-V: vision-language models on our one LLM definition (encoder + projector + placeholder splice).

Importing `models.vision` registers the `minimind_vlm` model type with AutoConfig, AutoModelForCausalLM and
AutoModelForImageTextToText.
"""

from models.vision.config import IMAGE_TOKEN, MiniMindVLMConfig
from models.vision.model import MiniMindVLMForCausalLM

__all__ = ["IMAGE_TOKEN", "MiniMindVLMConfig", "MiniMindVLMForCausalLM"]
