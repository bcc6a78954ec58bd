"""The dtype names every `--dtype` accepts, in one place: the spellings torch, transformers and vLLM users type
(`bfloat16`, `float16`, `half`, `float32`, `float`, `auto`) beside the short ones (`bf16`, `fp16`, `fp32`).

Kept free of torch so that argument parsers can use it without importing the framework.
"""

from __future__ import annotations

# spelling -> the short name the code works with
DTYPE_ALIASES = {
    "auto": "auto",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
}
DTYPE_CHOICES = tuple(DTYPE_ALIASES)
# short name -> the spelling torch and vLLM use
LONG_NAMES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPE_HELP = "bf16/bfloat16, fp16/float16/half, fp32/float32/float or auto"


def dtype_name(value: str) -> str:
    """The short name (auto, bf16, fp16, fp32) of any accepted spelling; ValueError names the accepted ones."""
    name = DTYPE_ALIASES.get(str(value).strip().lower())
    if name is None:
        raise ValueError(f"unknown dtype {value!r}; use one of {DTYPE_HELP}")
    return name
