"""Model, checkpoints, tokenizer and the native inference engine.

Importing `engine` registers the `minimind` model type with transformers' AutoConfig and
AutoModelForCausalLM, so `AutoModelForCausalLM.from_pretrained(dir)` works on our checkpoints.
"""

from engine.config import MiniMindConfig
from engine.model import MiniMindForCausalLM

__all__ = ["MiniMindConfig", "MiniMindForCausalLM"]
