"""`minimind convert --to gguf` and `--to pth`: our loader reads our own GGUF back with the source's logits
(llama, qwen3 and qwen2 layouts, f16/q8_0/q4_0), the file carries tokenizer, chat template and metadata, and
the upstream .pth round trip reproduces upstream's own logits. llama.cpp itself: tests/test_gguf_llama_cpp.py."""

from __future__ import annotations

import gguf
import pytest
import torch
from transformers import AutoTokenizer

from minimind.cli import main
from models.errors import CheckpointError
from models.loader import load_model
from tests.conftest import tiny_model
from tests.test_loader import IDS, logits, randomize

LAYOUTS = {
    "llama": dict(),
    "qwen3": dict(qk_norm=True, head_dim=32),
    "qwen2": dict(attention_bias=True),
}


def save_model_dir(path, model, upstream_fixtures, generation: str = "minimind2-dense"):
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(upstream_fixtures / generation)).save_pretrained(path)
    return path


def rounded(model, quant: str):
    """What a reader of the file must see: matrices through f16 (or the block quantiser), 1-D tensors exact."""
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}.get(quant)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.dim() != 2:
                continue
            if qtype is None:
                param.copy_(param.half().float())
            else:
                data = gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), qtype), qtype)
                param.copy_(torch.from_numpy(data.reshape(param.shape)))
    return model


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gguf_reads_back_with_the_source_logits(tmp_path, upstream_fixtures, layout, capsys):
    ours = randomize(tiny_model(intermediate_size=96, **LAYOUTS[layout]))
    src = save_model_dir(tmp_path / "src", ours, upstream_fixtures)
    out = tmp_path / "model.gguf"
    assert main(["convert", str(src), str(out), "--to", "gguf"]) == 0
    assert f"architecture {layout}" in capsys.readouterr().out
    model, _ = load_model(out)
    assert (model.config.qk_norm, model.config.attention_bias) == (ours.config.qk_norm, ours.config.attention_bias)
    exact = (logits(model, IDS) - logits(rounded(ours, "f16"), IDS)).abs().max().item()
    assert exact <= 1e-4


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_quantised_gguf_reads_back_dequantised(tmp_path, upstream_fixtures, quant):
    ours = randomize(tiny_model(intermediate_size=96))
    src = save_model_dir(tmp_path / "src", ours, upstream_fixtures)
    out = tmp_path / f"model-{quant}.gguf"
    assert main(["convert", str(src), str(out), "--to", "gguf", "--quant", quant]) == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == quant.upper() and types["blk.0.attn_norm.weight"] == "F32"
    model, _ = load_model(out)
    assert (logits(model, IDS) - logits(rounded(ours, quant), IDS)).abs().max().item() <= 1e-4


def test_gguf_metadata_carries_tokenizer_template_and_rope(tmp_path, upstream_fixtures):
    ours = tiny_model(rope_theta=10000.0, rms_norm_eps=1e-6)
    src = save_model_dir(tmp_path / "src", ours, upstream_fixtures, "minimind3-dense")
    out = tmp_path / "model.gguf"
    assert main(["convert", str(src), str(out), "--to", "gguf"]) == 0
    reader = gguf.GGUFReader(out)

    def field(name):
        return reader.fields[name].contents()

    tokenizer = AutoTokenizer.from_pretrained(src)
    assert field("general.architecture") == "llama"
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 6400 and tokens[tokenizer.convert_tokens_to_ids("<think>")] == "<think>"
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field("tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert field("tokenizer.ggml.add_bos_token") is False
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    assert len(field("tokenizer.ggml.merges")) > 1000
    assert field("llama.rope.freq_base") == pytest.approx(10000.0)
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert field("llama.context_length") == 512 and field("llama.attention.head_count_kv") == 2


def test_gguf_refuses_moe_and_unknown_quant(tmp_path, upstream_fixtures, capsys):
    moe = tiny_model(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    src = save_model_dir(tmp_path / "moe", moe, upstream_fixtures)
    assert main(["convert", str(src), str(tmp_path / "moe.gguf"), "--to", "gguf"]) == 1
    assert "GGUF export covers dense Llama/Qwen2/Qwen3 layouts only" in capsys.readouterr().err
    assert not (tmp_path / "moe.gguf").exists()
    from models.gguf_export import write_gguf

    with pytest.raises(CheckpointError, match="q4_k_m.*llama-quantize"):
        write_gguf(tmp_path / "x.gguf", moe.config, moe.state_dict(), None, quant="q4_k_m")


@pytest.mark.parametrize("generation", ["minimind2-dense", "minimind3-dense"])
def test_pth_round_trip_reproduces_upstream_logits(tmp_path, upstream_fixtures, generation):
    folder = upstream_fixtures / generation
    cases = torch.load(folder / "cases.pt")
    out = tmp_path / "full_sft_64.pth"
    argv = ["convert", str(folder / "model.pth"), str(out), "--to", "pth", "--dtype", "fp32"]
    assert main(argv) == 0
    theirs, ours = torch.load(folder / "model.pth"), torch.load(out)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    model, _ = load_model(out, config=folder / "config.json", tokenizer=folder)
    assert (logits(model, cases["input_ids"]) - cases["logits"]).abs().max().item() <= 1e-4


def test_pth_from_our_checkpoint_is_fp16_with_a_tied_head(tmp_path, upstream_fixtures):
    ours = randomize(tiny_model(qk_norm=True))
    src = save_model_dir(tmp_path / "src", ours, upstream_fixtures, "minimind3-dense")
    out = tmp_path / "out" / "full_sft.pth"
    assert main(["convert", str(src), str(out), "--to", "pth"]) == 0
    state = torch.load(out)
    assert all(t.dtype == torch.float16 for t in state.values())
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    model, _ = load_model(out, config=src / "config.json", tokenizer=src)
    expected = logits(rounded(ours, "f16"), IDS)  # norms are fp16 too here
    assert (logits(model, IDS) - expected).abs().max().item() <= 2e-2


def test_pth_refuses_attention_bias(tmp_path, upstream_fixtures, capsys):
    src = save_model_dir(tmp_path / "src", tiny_model(attention_bias=True), upstream_fixtures)
    assert main(["convert", str(src), str(tmp_path / "x.pth"), "--to", "pth"]) == 1
    assert "cannot write an upstream MiniMind .pth: q/k/v biases" in capsys.readouterr().err
