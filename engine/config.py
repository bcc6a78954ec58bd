"""`EngineConfig`: every knob of the native engine in one place (engine/build.py `build_engine` makes the engine).

Each front end maps its own options to these fields once: `LLM(model, **fields)`, `NativeBackend` (the server's
`minimind serve` settings), and `minimind generate` / `chat` (engine/cli/args.py). `EngineConfig.from_fields`
keeps the names it knows from whatever a front end holds, so a new knob is a field here plus a flag there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.errors import InvalidRequestError
from models.quantization import QUANTIZATION_CHOICES

if TYPE_CHECKING:
    from models.model import MiniMindForCausalLM

DEFAULT_MAX_MODEL_LEN = 8192  # the cache is preallocated, so the default context is capped (set max_model_len)
KV_CACHE_LAYOUTS = ("contiguous", "paged")


@dataclass
class EngineConfig:
    """`model`: a checkpoint path (None: the bundled default model) or a model object, used as it is (never
    fused or re-laid out, so that a trainer sharing it sees its own parameters; then `tokenizer` must be given).
    `max_prefill_tokens` is also the chunk size of chunked prefill (vLLM's max_num_batched_tokens).
    `compile_model`: run decode steps through torch.compile (the first decode step compiles, about a minute on a
    GPU). `cuda_graphs=False` runs every step eagerly (for debugging). `quantization` applies to a
    checkpoint the engine loads itself, on the CPU."""

    model: str | Path | MiniMindForCausalLM | None = None
    tokenizer: Any = None  # a tokenizer object or directory; None: the one beside the checkpoint
    dtype: str | torch.dtype | None = None  # None: bf16 on a GPU, float32 on the CPU
    device: str | None = None  # None: cuda when available, else cpu
    lora: str | Path | None = None  # a PEFT adapter directory merged into the model at load
    max_model_len: int | None = None  # prompt + output; None: the model's, at most DEFAULT_MAX_MODEL_LEN
    max_num_seqs: int = 256  # sequences decoded together (fewer if their KV cache does not fit)
    max_prefill_tokens: int = 8192  # prompt tokens admitted into one prefill step
    max_queue: int | None = None  # sequences that may wait for a slot; None: unbounded
    kv_cache_memory: int | None = None  # bytes; None: half the free GPU memory, or 2 GiB on the CPU
    # "contiguous": a max_model_len slot per sequence (engine/kv_cache.py); "paged": blocks taken as tokens arrive,
    # shared by prompts with a common prefix (engine/paged_cache.py)
    kv_cache: str = "contiguous"
    enable_prefix_caching: bool = True  # paged cache only: reuse the blocks of identical prompt prefixes
    draft_model: str | Path | MiniMindForCausalLM | None = None  # speculative decoding's proposer
    num_speculative_tokens: int = 4  # tokens the draft proposes per step
    cuda_graphs: bool = True
    compile_model: bool = False
    quantization: str = "none"  # CPU: "int8" or "int4" weight-only linear layers (models/quantization.py)

    @classmethod
    def from_fields(cls, source: Mapping[str, Any], **overrides: Any) -> EngineConfig:
        """The fields this config knows, taken from `source` (a front end's options), then `overrides`."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in {**source, **overrides}.items() if k in names})

    def validate(self) -> None:
        """Refuse values no engine can run with; the message names the field (as the flags spell it)."""
        checks = [
            (self.max_num_seqs >= 1, "max_num_seqs", f"must be at least 1, got {self.max_num_seqs}"),
            (self.max_prefill_tokens >= 1, "max_prefill_tokens", f"must be at least 1, got {self.max_prefill_tokens}"),
            (
                self.kv_cache in KV_CACHE_LAYOUTS,
                "kv_cache",
                f"must be one of {', '.join(KV_CACHE_LAYOUTS)}, got {self.kv_cache!r}",
            ),
            (self.max_queue is None or self.max_queue >= 0, "max_queue", f"must be >= 0, got {self.max_queue}"),
            (
                self.kv_cache_memory is None or self.kv_cache_memory > 0,
                "kv_cache_memory",
                f"must be more than 0 bytes, got {self.kv_cache_memory}",
            ),
            (
                self.num_speculative_tokens >= 1,
                "num_speculative_tokens",
                f"must be at least 1, got {self.num_speculative_tokens}",
            ),
            (
                self.max_model_len is None or self.max_model_len >= 2,
                "max_model_len",
                f"must be at least 2, got {self.max_model_len}",
            ),
            (
                self.quantization in QUANTIZATION_CHOICES,
                "quantization",
                f"must be one of {', '.join(QUANTIZATION_CHOICES)}, got {self.quantization!r}",
            ),
        ]
        for ok, name, problem in checks:
            if not ok:
                raise InvalidRequestError(f"{name} {problem}", param=name)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
