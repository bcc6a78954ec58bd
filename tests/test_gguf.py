"""GGUF import: a tiny llama GGUF written by models/gguf_export.py (as llama.cpp lays it out) loads through
load_model with the source model's logits; the shipped SmolLM2 GGUF is covered by a slow test."""

from __future__ import annotations

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.convert import convert
from models.errors import CheckpointError
from models.gguf_export import write_gguf
from models.loader import load_model
from tests.conftest import tiny_model
from tests.test_loader import IDS, logits, randomize


def write_llama_gguf(path, model, tokenizer, quant: str = "f32") -> None:
    """`model` (MiniMind2 layout == Llama) through the product's GGUF writer."""
    write_gguf(path, model.config, model.state_dict(), tokenizer, quant=quant)


def quantized_copy(model, quant):
    """The model with each matrix replaced (in place) by its dequantised value: what a reader must see."""
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.dim() == 2:
                q = gguf.quants.quantize(param.numpy(), quant)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(q, quant).reshape(param.shape)))
    return model


@pytest.fixture
def tokenizer(upstream_fixtures):
    return AutoTokenizer.from_pretrained(str(upstream_fixtures / "minimind2-dense"))


@pytest.mark.parametrize("tied", [True, False])
def test_f32_gguf_imports_with_same_logits(tmp_path, tokenizer, tied):
    ours = randomize(tiny_model(tie_word_embeddings=tied, intermediate_size=96))
    write_llama_gguf(tmp_path / "tiny.gguf", ours, tokenizer)
    model, read_tokenizer = load_model(tmp_path / "tiny.gguf")
    assert model.config.tie_word_embeddings == tied
    assert (logits(model, IDS) - logits(ours, IDS)).abs().max().item() <= 1e-4
    text = "Hello, 世界"
    assert read_tokenizer.decode(read_tokenizer.encode(text, add_special_tokens=False)) == text


def test_q8_gguf_is_dequantised(tmp_path, tokenizer):
    ours = randomize(tiny_model(intermediate_size=96))
    write_llama_gguf(tmp_path / "tiny-q8.gguf", ours, tokenizer, quant="q8_0")
    expected = quantized_copy(ours, gguf.GGMLQuantizationType.Q8_0)
    model, _ = load_model(tmp_path / "tiny-q8.gguf")
    assert model.dtype == torch.float32
    assert (logits(model, IDS) - logits(expected, IDS)).abs().max().item() <= 1e-4


def test_gguf_converts_to_plain_llama(tmp_path, tokenizer):
    ours = randomize(tiny_model(intermediate_size=96))
    write_llama_gguf(tmp_path / "tiny.gguf", ours, tokenizer)
    out, used = convert(tmp_path / "tiny.gguf", tmp_path / "out", "auto")
    assert used == "llama"
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert (logits(reloaded, IDS) - logits(ours, IDS)).abs().max().item() <= 1e-4
    assert (out / "tokenizer.json").exists()


def test_truncated_gguf_is_a_clear_error(tmp_path, tokenizer):
    write_llama_gguf(tmp_path / "tiny.gguf", randomize(tiny_model(intermediate_size=96)), tokenizer)
    data = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="cut.gguf: cannot read this GGUF file"):
        load_model(tmp_path / "cut.gguf")


def test_gguf_magic_detected_without_suffix(tmp_path, tokenizer):
    ours = randomize(tiny_model(intermediate_size=96))
    write_llama_gguf(tmp_path / "model.bin", ours, tokenizer)
    model, _ = load_model(tmp_path / "model.bin")
    assert (logits(model, IDS) - logits(ours, IDS)).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_shipped_smollm2_gguf_matches_transformers_and_answers(tmp_path, monkeypatch):
    """The default model: our import equals transformers' own GGUF reading, and it answers a simple question."""
    from models.default_model import default_gguf_path, default_model_path

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
