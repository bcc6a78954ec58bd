"""Shared fixtures: paths to the upstream parity cases and tiny random models built on the spot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Parity cases made with upstream MiniMind's own code (see the README there); they ship with the repository.
UPSTREAM_FIXTURES = ROOT / "tests" / "fixtures" / "upstream-minimind"


def tiny_config(**overrides):
    """A MiniMindConfig small enough for CPU tests (vocab 6400 so the real MiniMind tokenizers fit)."""
    from models.config import MiniMindConfig

    base = dict(
        vocab_size=6400,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    base.update(overrides)
    return MiniMindConfig(**base)


def tiny_model(seed: int = 0, **overrides):
    from models.model import MiniMindForCausalLM

    torch.manual_seed(seed)
    return MiniMindForCausalLM(tiny_config(**overrides)).eval()


@pytest.fixture(scope="session")
def upstream_fixtures() -> Path:
    if not UPSTREAM_FIXTURES.is_dir():
        pytest.fail(f"upstream fixtures not found at {UPSTREAM_FIXTURES}: the checkout is incomplete")
    return UPSTREAM_FIXTURES
