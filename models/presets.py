"""Named model shapes whose parameter counts match upstream MiniMind's published models."""

from __future__ import annotations

from typing import Any

from models.config import MiniMindConfig, default_intermediate_size

_MINIMIND2 = dict(vocab_size=6400, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768, qk_norm=False)
_MINIMIND3 = dict(vocab_size=6400, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, qk_norm=True)

PRESETS: dict[str, dict[str, Any]] = {
    # MiniMind2 (2025): Llama layout. 25.8M / 104.0M / 145M parameters.
    "minimind2-small": dict(
        _MINIMIND2, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2
    ),
    "minimind2": dict(_MINIMIND2, hidden_size=768, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2),
    "minimind2-moe": dict(
        _MINIMIND2,
        hidden_size=640,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        use_moe=True,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        aux_loss_alpha=0.01,
    ),
    # minimind-3 (2026): Qwen3 layout with per-head q/k norm. 63.9M dense; MoE with 4 experts, top-1.
    "minimind3": dict(
        _MINIMIND3,
        hidden_size=768,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=default_intermediate_size(768, generation=3),
    ),
    "minimind3-moe": dict(
        _MINIMIND3,
        hidden_size=768,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=default_intermediate_size(768, generation=3),
        use_moe=True,
        n_routed_experts=4,
        num_experts_per_tok=1,
        n_shared_experts=0,
        aux_loss_alpha=0.0005,
    ),
    # minimind-3 layout at 512 hidden (30.0M), the shape of upstream's small minimind-3.
    "minimind3-small": dict(
        _MINIMIND3,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=default_intermediate_size(512, generation=3),
    ),
}


def preset_config(name: str, **overrides: Any) -> MiniMindConfig:
    """A MiniMindConfig for a named preset; unknown names list the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return MiniMindConfig(**{**PRESETS[name], **overrides})
