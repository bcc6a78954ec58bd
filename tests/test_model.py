"""The model definition: presets' sizes, upstream parity, transformers integration, MoE and the engine cache hook."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from models.config import MiniMindConfig
from models.fusion import FusedLinear
from models.model import MiniMindForCausalLM
from models.presets import PRESETS, preset_config
from tests.conftest import tiny_model

EXPECTED_MILLIONS = {
    "minimind2-small": 25.8,
    "minimind2": 104.0,
    "minimind2-moe": 145.0,
    "minimind3": 63.9,
    "minimind3-moe": 198.4,
    "minimind3-small": 30.0,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_match_upstream(name):
    with torch.device("meta"):
        model = MiniMindForCausalLM(preset_config(name))
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(millions, 1) == EXPECTED_MILLIONS[name]


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="minimind2-small"):
        preset_config("minimind9")


@pytest.mark.parametrize("generation", ["minimind2-dense", "minimind3-dense"])
def test_upstream_parity_logits_and_greedy(upstream_fixtures, generation):
    folder = upstream_fixtures / generation
    up = json.loads((folder / "config.json").read_text())
    config = MiniMindConfig(
        **{
            k: up[k]
            for k in (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
                "rms_norm_eps",
                "rope_theta",
            )
        },
        head_dim=up.get("head_dim"),
        qk_norm=generation.startswith("minimind3"),
    )
    model = MiniMindForCausalLM(config).eval()
    model.load_state_dict(torch.load(folder / "model.pth"), strict=True)
    cases = torch.load(folder / "cases.pt")
    with torch.no_grad():
        logits = model(cases["input_ids"]).logits
    assert (logits - cases["logits"]).abs().max().item() <= 1e-4
    prompt = cases["input_ids"][:, : cases["greedy_prompt_len"]]
    out = model.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out[:, prompt.shape[1] :].tolist() == cases["greedy_continuations"]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"qk_norm": True},
        {"use_moe": True, "n_shared_experts": 1},
        {"use_moe": True, "num_experts_per_tok": 1, "qk_norm": True},
    ],
)
def test_cached_decoding_matches_full_forward(overrides):
    model = tiny_model(**overrides)
    ids = torch.randint(0, 6400, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :8], use_cache=True)
        rest = model(ids[:, 8:], past_key_values=first.past_key_values, use_cache=True).logits
    assert torch.allclose(full[:, 8:], rest, atol=1e-5)


def test_save_and_load_through_automodel(tmp_path):
    model = tiny_model(use_moe=True, n_shared_experts=1, tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "MiniMindForCausalLM"
    ids = torch.randint(0, 6400, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_moe_aux_loss_only_in_training_and_positive():
    model = tiny_model(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)
    ids = torch.randint(0, 6400, (2, 16))
    assert model(ids).aux_loss.item() == 0.0
    model.train()
    out = model(ids, labels=ids)
    assert out.aux_loss.item() > 0
    out.loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad is not None


def test_moe_routing_reference():
    """Top-k routing with renormalised weights equals a per-token loop written the obvious way."""
    model = tiny_model(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)
    moe = model.model.layers[0].mlp
    x = torch.randn(5, 64)
    with torch.no_grad():
        out, _ = moe(x)
        for t in range(5):
            probs = torch.softmax(moe.gate(x[t]), -1)
            w, idx = probs.topk(2)
            w = w / w.sum()
            ref = sum(wi * moe.experts[i](x[t]) for wi, i in zip(w, idx.tolist())) + moe.shared_experts[0](x[t])
            assert torch.allclose(out[t], ref, atol=1e-5)


def test_engine_kv_cache_hook_receives_every_layer():
    class RecordingCache:
        def __init__(self):
            self.layers = []

        def attend(self, layer_idx, q, k, v):
            self.layers.append(layer_idx)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    model = tiny_model()
    ids = torch.randint(0, 6400, (1, 6))
    cache = RecordingCache()
    with torch.no_grad():
        hooked = model(ids, kv_cache=cache, position_ids=torch.arange(6)[None]).logits
        plain = model(ids).logits
    assert cache.layers == [0, 1]
    assert torch.allclose(hooked, plain, atol=1e-6)


def test_yarn_rope_changes_long_range_frequencies_only():
    plain = tiny_model(seed=1)
    yarn = tiny_model(
        seed=1,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "attention_factor": 1.0,
        },
    )
    f_plain = plain.model.rotary.inv_freq(torch.device("cpu"))
    f_yarn = yarn.model.rotary.inv_freq(torch.device("cpu"))
    assert torch.allclose(f_plain[0], f_yarn[0])  # high frequencies untouched
    assert torch.allclose(f_plain[-1] / 4, f_yarn[-1])  # lowest frequency interpolated by the factor


def test_bad_head_config_is_refused():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        MiniMindConfig(num_attention_heads=8, num_key_value_heads=3)


@pytest.mark.parametrize(
    "overrides",
    [{"attention_bias": True, "qk_norm": True}, {"use_moe": True, "n_shared_experts": 1}],
)
def test_fused_projections_give_the_same_logits_and_keep_the_checkpoint_names(overrides):
    model = tiny_model(**overrides)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    count = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 6400, (2, 12))
    with torch.no_grad():
        separate = model(ids).logits
        model.fuse()
        fused = model(ids).logits
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, FusedLinear) and not hasattr(attn, "q_proj")
    assert all(isinstance(p, torch.nn.Parameter) for p in attn.qkv_proj.parameters())  # real, moved by .to()
    assert sum(p.numel() for p in model.parameters()) == count  # one copy of the weights, not two
    assert torch.allclose(separate, fused, atol=1e-5)
    after = model.state_dict()  # saved under the separate names, as checkpoints and PEFT know them
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    # a checkpoint with the separate names loads into a fused model
    other = tiny_model(seed=1, **overrides).fuse()
    other.load_state_dict(before)
    with torch.no_grad():
        assert torch.allclose(other(ids).logits, separate, atol=1e-5)
    # unfused again for training: the separate parameters, same values, and they train
    model.unfuse()
    assert not hasattr(model.model.layers[0].self_attn, "qkv_proj")
    assert all(torch.equal(model.state_dict()[name], before[name]) for name in before)
    model.train()
    model(ids).logits.sum().backward()
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.abs().sum() > 0
