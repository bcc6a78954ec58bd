"""load_model: upstream .pth of both generations, HF directories written by plain transformers, and bad input."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from models.errors import CheckpointError
from models.loader import load_model, load_tokenizer
from tests.conftest import tiny_model

GENERATIONS = ["minimind2-dense", "minimind3-dense"]
TINY_HF = dict(
    vocab_size=6400,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=256,
)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that a wrong mapping (swapped q/k norm, halved expert) shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.1
            param.copy_(1 + noise if "norm" in name else noise)
    return model.eval()


def hf_model(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random tiny model of a plain transformers class (LlamaForCausalLM, Qwen2MoeForCausalLM, ...)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**TINY_HF, **overrides})
    model = randomize(AutoModelForCausalLM.from_config(config), seed)
    if model_type == "qwen2_moe":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.shared_expert_gate.weight.zero_()
    return model


def save_with_tokenizer(model: torch.nn.Module, folder, upstream_fixtures) -> None:
    model.save_pretrained(folder)
    load_tokenizer(upstream_fixtures / "minimind2-dense").save_pretrained(folder)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 6400, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("generation", GENERATIONS)
def test_upstream_pth_reproduces_logits_and_greedy(upstream_fixtures, generation):
    folder = upstream_fixtures / generation
    model, tokenizer = load_model(folder / "model.pth")
    cases = torch.load(folder / "cases.pt")
    assert (logits(model, cases["input_ids"]) - cases["logits"]).abs().max().item() <= 1e-4
    prompt = cases["input_ids"][:, : cases["greedy_prompt_len"]]
    out = model.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out[:, prompt.shape[1] :].tolist() == cases["greedy_continuations"]
    assert model.config.qk_norm == (generation == "minimind3-dense")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.eos_token == "<|im_end|>"


def test_pth_with_explicit_config_and_tokenizer(upstream_fixtures, tmp_path):
    folder = upstream_fixtures / "minimind3-dense"
    shutil.copy(folder / "model.pth", tmp_path / "weights.pth")
    model, tokenizer = load_model(
        tmp_path / "weights.pth", config=folder / "config.json", tokenizer=folder, dtype="bf16"
    )
    assert model.dtype == torch.bfloat16
    assert model.config.rms_norm_eps == 1e-6 and model.config.head_dim == 16
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 1


@pytest.mark.parametrize(
    "model_type, overrides",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True, "head_dim": 32}),
        (
            "llama",
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 5e5,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
        ),
        ("qwen2", {}),
        ("qwen3", {"head_dim": 8}),
        (
            "qwen3",
            {
                "rope_parameters": {
                    "rope_type": "yarn",
                    "rope_theta": 1e6,
                    "factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
        ),
        ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
        (
            "qwen3_moe",
            {"num_experts": 4, "num_experts_per_tok": 1, "moe_intermediate_size": 32, "norm_topk_prob": False},
        ),
        (
            "qwen2_moe",
            {
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 64,
            },
        ),
    ],
)
def test_hf_directories_of_plain_transformers_models(upstream_fixtures, tmp_path, model_type, overrides):
    reference = hf_model(model_type, **overrides)
    save_with_tokenizer(reference, tmp_path, upstream_fixtures)
    model, tokenizer = load_model(tmp_path)
    assert type(model).__name__ == "MiniMindForCausalLM"
    assert (logits(model, IDS) - logits(reference, IDS)).abs().max().item() <= 1e-4
    assert len(tokenizer) == 6400


def test_our_own_checkpoint_directory(upstream_fixtures, tmp_path):
    model = tiny_model(use_moe=True, n_shared_experts=1, tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no tokenizer here"):
        load_model(tmp_path)
    loaded, _ = load_model(tmp_path, tokenizer=upstream_fixtures / "minimind3-dense")
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_non_zero_qwen2_moe_shared_gate_is_refused(upstream_fixtures, tmp_path):
    reference = hf_model("qwen2_moe", num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    with torch.no_grad():
        reference.model.layers[0].mlp.shared_expert_gate.weight.fill_(0.1)
    save_with_tokenizer(reference, tmp_path, upstream_fixtures)
    with pytest.raises(CheckpointError, match="shared_expert_gate"):
        load_model(tmp_path)


def test_renormalised_single_expert_is_refused(upstream_fixtures, tmp_path):
    reference = hf_model(
        "qwen3_moe", num_experts=4, num_experts_per_tok=1, moe_intermediate_size=32, norm_topk_prob=True
    )
    save_with_tokenizer(reference, tmp_path, upstream_fixtures)
    with pytest.raises(CheckpointError, match="norm_topk_prob"):
        load_model(tmp_path)


# ---- bad input: one clear CheckpointError naming the file and the problem ----


def test_missing_source(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nope.pth")


def test_pth_without_shape_information(upstream_fixtures, tmp_path):
    shutil.copy(upstream_fixtures / "minimind2-dense" / "model.pth", tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="--preset NAME or --config FILE"):
        load_model(tmp_path / "model.pth")


def test_preset_that_does_not_match_the_weights(upstream_fixtures):
    with pytest.raises(CheckpointError, match=r"model.pth: weights do not match the config: .*shape \(6400, 64\)"):
        load_model(upstream_fixtures / "minimind2-dense" / "model.pth", preset="minimind2-small")


def test_unknown_preset(upstream_fixtures):
    with pytest.raises(CheckpointError, match="known presets"):
        load_model(upstream_fixtures / "minimind2-dense" / "model.pth", preset="minimind9")


def test_config_that_does_not_match_the_weights(upstream_fixtures, tmp_path):
    config = json.loads((upstream_fixtures / "minimind2-dense" / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.2\."):
        load_model(upstream_fixtures / "minimind2-dense" / "model.pth", config=tmp_path / "config.json")


def test_unknown_key_layout(upstream_fixtures, tmp_path):
    state = torch.load(upstream_fixtures / "minimind2-dense" / "model.pth")
    state = {k.replace("self_attn.", "attention."): v for k, v in state.items()}
    torch.save(state, tmp_path / "model.pth")
    shutil.copy(upstream_fixtures / "minimind2-dense" / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*model\.layers\.0\.attention\.k_proj\.weight"):
        load_model(tmp_path / "model.pth")


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint", b"PK\x03\x04 truncated zip"])
def test_non_checkpoint_pth(tmp_path, content):
    (tmp_path / "model.pth").write_bytes(content)
    with pytest.raises(CheckpointError, match="model.pth: not a readable PyTorch checkpoint"):
        load_model(tmp_path / "model.pth", preset="minimind2-small")


def test_truncated_pth(upstream_fixtures, tmp_path):
    data = (upstream_fixtures / "minimind2-dense" / "model.pth").read_bytes()
    (tmp_path / "model.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model(tmp_path / "model.pth", config=upstream_fixtures / "minimind2-dense" / "config.json")


def test_truncated_safetensors(upstream_fixtures, tmp_path):
    save_with_tokenizer(hf_model("llama"), tmp_path, upstream_fixtures)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors file"):
        load_model(tmp_path)


def test_broken_config_json_names_line(upstream_fixtures, tmp_path):
    save_with_tokenizer(hf_model("llama"), tmp_path, upstream_fixtures)
    (tmp_path / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": ,\n}')
    with pytest.raises(CheckpointError, match=r"config.json:3:\d+: not valid JSON"):
        load_model(tmp_path)


def test_unsupported_model_type(upstream_fixtures, tmp_path):
    save_with_tokenizer(hf_model("llama"), tmp_path, upstream_fixtures)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'model_type'"):
        load_model(tmp_path)


def test_directory_without_weights(upstream_fixtures, tmp_path):
    save_with_tokenizer(hf_model("llama"), tmp_path, upstream_fixtures)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(tmp_path)


def our_dir(folder, upstream_fixtures):
    tiny_model().save_pretrained(folder)
    load_tokenizer(upstream_fixtures / "minimind2-dense").save_pretrained(folder)


def edit_config(folder, **changes) -> None:
    """Set (or with None as the value, remove) config.json fields."""
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        config.pop(key) if value is None else config.__setitem__(key, value)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("kind", ["minimind", "llama"])
@pytest.mark.parametrize(
    "value, problem",
    [
        (None, "field 'hidden_size' is missing"),
        (-64, "field 'hidden_size' must be a positive integer, got -64"),
        ("64", "field 'hidden_size' must be a positive integer, got '64'"),
        (64.5, "field 'hidden_size' must be a positive integer, got 64.5"),
    ],
)
def test_config_fields_are_checked_by_name(upstream_fixtures, tmp_path, kind, value, problem):
    if kind == "minimind":
        our_dir(tmp_path, upstream_fixtures)
    else:
        save_with_tokenizer(hf_model("llama"), tmp_path, upstream_fixtures)
    edit_config(tmp_path, hidden_size=value)
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    assert str(err.value) == f"{tmp_path / 'config.json'}: {problem}; set it to the model's value"


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"num_attention_heads": 3, "head_dim": None},
            "field 'hidden_size' (64) must be a multiple of num_attention_heads (3)",
        ),
        ({"num_key_value_heads": 0}, "field 'num_key_value_heads' must be a positive integer, got 0"),
        ({"rms_norm_eps": "tiny"}, "field 'rms_norm_eps' must be a positive number, got 'tiny'"),
        ({"tie_word_embeddings": "yes"}, "field 'tie_word_embeddings' must be true or false, got 'yes'"),
        ({"num_attention_heads": 8}, "num_attention_heads x head_dim is 8 x 16 = 128 but the weights need 64"),
    ],
)
def test_config_values_and_divisibility(upstream_fixtures, tmp_path, changes, message):
    our_dir(tmp_path, upstream_fixtures)
    edit_config(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_model(tmp_path)


def test_more_layers_than_the_weights_fail_before_the_model_is_built(upstream_fixtures, tmp_path, monkeypatch):
    """num_hidden_layers: 1000000 with two layers of weights: refused from the weights' keys; no layer is built."""
    import models.model

    our_dir(tmp_path, upstream_fixtures)
    edit_config(tmp_path, num_hidden_layers=1000000)
    built = []
    original = models.model.DecoderLayer.__init__

    def counting(self, config, layer_idx):
        built.append(layer_idx)
        assert len(built) <= 100, "the model is being built layer by layer"
        original(self, config, layer_idx)

    monkeypatch.setattr(models.model.DecoderLayer, "__init__", counting)
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    assert str(err.value) == (
        f"{tmp_path}: weights do not match the config: num_hidden_layers is 1000000 but the weights need 2 "
        "(missing tensors: model.layers.2.*); correct the config"
    )
    assert built == []


class WritesMarker:
    """Pickles as a call of open(path, "w"): loading it with plain pickle creates the marker file."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pth_that_would_run_code_is_refused(upstream_fixtures, tmp_path):
    state = torch.load(upstream_fixtures / "minimind2-dense" / "model.pth")
    state["model.norm.weight"] = WritesMarker(tmp_path / "payload-ran")
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "model.pth", config=upstream_fixtures / "minimind2-dense" / "config.json")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'model.pth'}: not a plain state dict: it holds Python objects (")
    assert "refused for safety" in message and "weights_only" not in message and "\n" not in message
    assert not (tmp_path / "payload-ran").exists()


def test_a_directory_without_config_json_is_not_a_model_directory(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    assert str(err.value) == (
        f"{tmp_path} is not a model directory: no config.json (expected a Hugging Face directory, a .pth or a "
        ".gguf file)"
    )


@pytest.mark.parametrize(
    "upstream_config, overrides, target",
    [
        # minimind-3 MoE names (num_experts, router_aux_loss_coef), no shared experts, top-1
        ({"num_experts": 4, "num_experts_per_tok": 1, "router_aux_loss_coef": 0.0005}, {"qk_norm": True}, "qwen3_moe"),
        # MiniMind2-MoE names, one shared expert, top-2
        ({"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1}, {}, "qwen2_moe"),
    ],
)
def test_upstream_moe_pth(upstream_fixtures, tmp_path, upstream_config, overrides, target):
    from models.convert import convert

    moe = {k: v for k, v in upstream_config.items() if k in ("num_experts_per_tok", "n_shared_experts")}
    moe["n_routed_experts"] = 4
    ours = randomize(tiny_model(use_moe=True, **moe, **overrides))
    torch.save(ours.state_dict(), tmp_path / "moe.pth")
    config = {**TINY_HF, "intermediate_size": 128, "use_moe": True, "flash_attn": False, **upstream_config}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, _ = load_model(tmp_path / "moe.pth", tokenizer=upstream_fixtures / "minimind2-dense")
    assert model.config.n_shared_experts == upstream_config.get("n_shared_experts", 0)
    assert torch.equal(logits(model, IDS), logits(ours, IDS))
    _, used = convert(tmp_path / "moe.pth", tmp_path / "out", "auto", tokenizer=upstream_fixtures / "minimind2-dense")
    assert used == target
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (logits(plain, IDS) - logits(ours, IDS)).abs().max().item() <= 1e-4
