"""The model family: definition, config, presets, checkpoints, loader, export, tokenizer.

Importing `models` registers the `minimind` model type with transformers' AutoConfig and
AutoModelForCausalLM, so `AutoModelForCausalLM.from_pretrained(dir)` works on our checkpoints.
"""

from models.config import MiniMindConfig
from models.model import MiniMindForCausalLM

__all__ = ["MiniMindConfig", "MiniMindForCausalLM"]
