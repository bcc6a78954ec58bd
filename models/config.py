"""MiniMindConfig: one configuration for the whole MiniMind family (MiniMind2 and minimind-3, dense and MoE).

The flags below are the only differences between the generations, so one model definition serves all:
`qk_norm` (minimind-3's per-head RMSNorm on q and k), `use_moe` with `n_shared_experts` (MiniMind2-MoE has one
shared expert, minimind-3-MoE none), tied embeddings and RoPE parameters.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig


def default_intermediate_size(hidden_size: int, generation: int = 2) -> int:
    """Upstream's rule for the SwiGLU width: 8/3 x hidden (MiniMind2) or pi x hidden (minimind-3), rounded up to 64."""
    if generation >= 3:
        return math.ceil(hidden_size * math.pi / 64) * 64
    width = int(hidden_size * 8 / 3)
    return 64 * ((width + 64 - 1) // 64)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_POSITIVE_INT = (lambda v: _int(v) and v > 0, "a positive integer")
_OPTIONAL_POSITIVE_INT = (lambda v: v is None or (_int(v) and v > 0), "a positive integer or null")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_POSITIVE_NUMBER = (lambda v: _number(v) and v > 0, "a positive number")
# field -> (check, what it must be), for every field that sets a shape or a count
FIELD_RULES = {
    "vocab_size": _POSITIVE_INT,
    "hidden_size": _POSITIVE_INT,
    "num_hidden_layers": _POSITIVE_INT,
    "num_attention_heads": _POSITIVE_INT,
    "num_key_value_heads": _POSITIVE_INT,
    "max_position_embeddings": _POSITIVE_INT,
    "n_routed_experts": _POSITIVE_INT,
    "num_experts_per_tok": _POSITIVE_INT,
    "head_dim": _OPTIONAL_POSITIVE_INT,
    "intermediate_size": _OPTIONAL_POSITIVE_INT,
    "moe_intermediate_size": _OPTIONAL_POSITIVE_INT,
    "n_shared_experts": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "rms_norm_eps": _POSITIVE_NUMBER,
    "rope_theta": _POSITIVE_NUMBER,
    "dropout": (lambda v: _number(v) and 0 <= v < 1, "a number from 0 to below 1"),
    "qk_norm": _BOOL,
    "attention_bias": _BOOL,
    "use_moe": _BOOL,
    "norm_topk_prob": _BOOL,
    "tie_word_embeddings": _BOOL,
}


def field_error(name: str, value: Any) -> str | None:
    """Why `value` cannot be config field `name` (None when it can)."""
    check, wanted = FIELD_RULES[name]
    return None if check(value) else f"field {name!r} must be {wanted}, got {value!r}"


def check_fields(values: dict[str, Any]) -> None:
    """Types and ranges of the shape fields, checked before any is used: a config.json with "hidden_size": "64"
    or -64 is refused by name instead of failing inside torch with a traceback."""
    for name in FIELD_RULES:
        problem = field_error(name, values[name])
        if problem:
            raise ValueError(problem)
    if values["head_dim"] is None and values["hidden_size"] % values["num_attention_heads"]:
        raise ValueError(
            f"field 'hidden_size' ({values['hidden_size']}) must be a multiple of num_attention_heads "
            f"({values['num_attention_heads']}), or head_dim must be given"
        )


class MiniMindConfig(PretrainedConfig):
    model_type = "minimind"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 6400,
        hidden_size: int = 512,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        intermediate_size: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 1e6,
        rope_scaling: dict[str, Any] | None = None,
        rope_parameters: dict[str, Any] | None = None,
        qk_norm: bool = False,
        attention_bias: bool = False,
        dropout: float = 0.0,
        use_moe: bool = False,
        n_routed_experts: int = 4,
        num_experts_per_tok: int = 2,
        n_shared_experts: int = 0,
        moe_intermediate_size: int | None = None,
        norm_topk_prob: bool = True,
        aux_loss_alpha: float = 0.01,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        bos_token_id: int = 1,
        eos_token_id: int | list[int] = 2,
        pad_token_id: int | None = 0,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        check_fields(locals())
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size or default_intermediate_size(hidden_size)
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = float(rope_theta)
        # RoPE in transformers 5's `rope_parameters` vocabulary (rope_type, rope_theta, factor,
        # original_max_position_embeddings, beta_fast, beta_slow, attention_factor), so that export to
        # llama/qwen3 copies it verbatim and the tables come from transformers' own functions.
        # `rope_scaling` (upstream's and transformers 4's name for the same dict) is accepted on input.
        rope = dict(rope_parameters or rope_scaling or {})
        rope["rope_type"] = rope.pop("type", rope.get("rope_type", "default"))
        rope["rope_theta"] = self.rope_theta
        self.rope_parameters = rope
        self.qk_norm = qk_norm
        self.attention_bias = attention_bias
        self.dropout = dropout
        self.use_moe = use_moe
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_shared_experts = n_shared_experts
        self.moe_intermediate_size = moe_intermediate_size or self.intermediate_size
        self.norm_topk_prob = norm_topk_prob
        self.aux_loss_alpha = aux_loss_alpha
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_shapes()

    def validate_shapes(self) -> None:
        """Refuse impossible shapes at construction, with the field names, instead of a matmul error later."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.use_moe and not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                f"n_routed_experts ({self.n_routed_experts})"
            )
