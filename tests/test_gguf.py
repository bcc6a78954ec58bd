"""GGUF import: a tiny llama GGUF written here with the `gguf` package (as llama.cpp lays it out) loads through
load_model with the source model's logits; the shipped SmolLM2 GGUF is covered by a slow test."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.convert import convert
from engine.errors import CheckpointError
from engine.loader import load_model
from tests.conftest import tiny_model
from tests.test_loader import IDS, logits, randomize


def llama_cpp_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved per head (convert_hf_to_gguf.py's permute); transformers undoes it."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_llama_gguf(path, model, tokenizer_json, quant: gguf.GGMLQuantizationType | None = None) -> None:
    """Write `model` (our MiniMind2 layout == Llama) as a llama-architecture GGUF with a BPE vocabulary."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    vocab = tokenizer_json["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i < 3 else 1 for i in range(len(tokens))])
    merges = tokenizer_json["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)

    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for key, tensor in model.state_dict().items():
        tensor = tensor.float()
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            name = "output.weight"
        else:
            layer, rest = key.removeprefix("model.layers.").split(".", 1)
            name = f"blk.{layer}.{names[rest.removesuffix('.weight')]}.weight"
            if rest.startswith("self_attn.q_proj"):
                tensor = llama_cpp_permute(tensor, cfg.num_attention_heads)
            if rest.startswith("self_attn.k_proj"):
                tensor = llama_cpp_permute(tensor, cfg.num_key_value_heads)
        array = tensor.numpy()
        if quant is not None and tensor.dim() == 2 and name != "token_embd.weight":
            writer.add_tensor(name, gguf.quants.quantize(array, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantized_copy(model, quant):
    """The model with each quantised weight replaced (in place) by its dequantised value: what a reader must see."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and name != "model.embed_tokens.weight" and name != "lm_head.weight":
                q = gguf.quants.quantize(param.numpy(), quant)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(q, quant).reshape(param.shape)))
    return model


@pytest.fixture
def tokenizer_json(upstream_fixtures):
    return json.loads((upstream_fixtures / "minimind2-dense" / "tokenizer.json").read_text())


@pytest.mark.parametrize("tied", [True, False])
def test_f32_gguf_imports_with_same_logits(tmp_path, tokenizer_json, tied):
    ours = randomize(tiny_model(tie_word_embeddings=tied, intermediate_size=96))
    write_llama_gguf(tmp_path / "tiny.gguf", ours, tokenizer_json)
    model, tokenizer = load_model(tmp_path / "tiny.gguf")
    assert model.config.tie_word_embeddings == tied
    assert (logits(model, IDS) - logits(ours, IDS)).abs().max().item() <= 1e-4
    text = "Hello, 世界"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_q8_gguf_is_dequantised(tmp_path, tokenizer_json):
    quant = gguf.GGMLQuantizationType.Q8_0
    ours = randomize(tiny_model(intermediate_size=96))
    write_llama_gguf(tmp_path / "tiny-q8.gguf", ours, tokenizer_json, quant=quant)
    expected = quantized_copy(ours, quant)
    model, _ = load_model(tmp_path / "tiny-q8.gguf")
    assert model.dtype == torch.float32
    assert (logits(model, IDS) - logits(expected, IDS)).abs().max().item() <= 1e-4


def test_gguf_converts_to_plain_llama(tmp_path, tokenizer_json):
    ours = randomize(tiny_model(intermediate_size=96))
    write_llama_gguf(tmp_path / "tiny.gguf", ours, tokenizer_json)
    out, used = convert(tmp_path / "tiny.gguf", tmp_path / "out", "auto")
    assert used == "llama"
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert (logits(reloaded, IDS) - logits(ours, IDS)).abs().max().item() <= 1e-4
    assert (out / "tokenizer.json").exists()


def test_truncated_gguf_is_a_clear_error(tmp_path, tokenizer_json):
    write_llama_gguf(tmp_path / "tiny.gguf", randomize(tiny_model(intermediate_size=96)), tokenizer_json)
    data = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="cut.gguf: cannot read this GGUF file"):
        load_model(tmp_path / "cut.gguf")


def test_gguf_magic_detected_without_suffix(tmp_path, tokenizer_json):
    ours = randomize(tiny_model(intermediate_size=96))
    write_llama_gguf(tmp_path / "model.bin", ours, tokenizer_json)
    model, _ = load_model(tmp_path / "model.bin")
    assert (logits(model, IDS) - logits(ours, IDS)).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_shipped_smollm2_gguf_matches_transformers_and_answers(tmp_path, monkeypatch):
    """The default model: our import equals transformers' own GGUF reading, and it answers a simple question."""
    from engine.default_model import default_gguf_path, default_model_path

    gguf_path = default_gguf_path()
    ours, tokenizer = load_model(gguf_path)
    theirs = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max().item() <= 1e-3

    monkeypatch.setenv("MINIMIND_HOME", str(tmp_path))
    folder = default_model_path()
    assert folder == tmp_path / "models" / "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert out[0, -1].item() in model.generation_config.eos_token_id or len(out[0]) - prompt["input_ids"].shape[1] == 20
    assert default_model_path() == folder  # converted once, found again
