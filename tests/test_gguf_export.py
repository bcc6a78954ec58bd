"""`minimind convert --to gguf` and `--to pth`: our loader reads our own GGUF back with the source's logits
(llama, qwen3 and qwen2 layouts, f16/q8_0/q4_0), the file carries tokenizer, chat template and metadata, and
the upstream .pth round trip reproduces upstream's own logits. llama.cpp itself: tests/test_gguf_llama_cpp.py."""

from __future__ import annotations

import gguf
import pytest
import torch
from transformers import AutoTokenizer

from minimind.cli import main
from models.convert import convert
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


# MoE shapes and the llama.cpp architecture that computes each exactly (models/gguf_layout.py's table).
MOE_CASES = {
    "qwen3moe": dict(qk_norm=True, head_dim=32, num_experts_per_tok=2),
    "llama": dict(num_experts_per_tok=3),
    "ernie4_5-moe": dict(num_experts_per_tok=2, n_shared_experts=1),
    "deepseek": dict(num_experts_per_tok=1, n_shared_experts=1),
    "deepseek-without-shared": dict(num_experts_per_tok=2, norm_topk_prob=False),
}


def tiny_moe(case: str, seed: int = 4):
    """A random tiny MoE model of MOE_CASES[case] whose matrices are exactly float16 (what an f16 GGUF holds)."""
    model = tiny_model(
        use_moe=True, n_routed_experts=4, moe_intermediate_size=64, intermediate_size=96, **MOE_CASES[case]
    )
    return rounded(randomize(model, seed=seed), "f16")


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_moe_gguf_takes_the_llama_cpp_architecture_that_computes_it(tmp_path, upstream_fixtures, case):
    model = tiny_moe(case)
    out, arch = convert(save_model_dir(tmp_path / "src", model, upstream_fixtures), tmp_path / "m.gguf", "gguf")
    assert arch == case.removesuffix("-without-shared")
    reader = gguf.GGUFReader(out)
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    assert shapes["blk.1.ffn_gate_exps.weight"] == (4, 64, 64)  # (experts, out, in), stacked
    assert shapes["blk.1.ffn_down_exps.weight"] == (4, 64, 64) and shapes["blk.1.ffn_gate_inp.weight"] == (4, 64)
    assert reader.fields[f"{arch}.expert_count"].contents() == 4
    assert reader.fields[f"{arch}.expert_used_count"].contents() == model.config.num_experts_per_tok
    shared = {name: shape for name, shape in shapes.items() if "shexp" in name}
    if arch == "deepseek":  # it always has a shared expert: ours, or one of zeros that adds exactly 0
        assert shapes["blk.0.ffn_up_shexp.weight"] == (64, 64)
        zeros = [t for t in reader.tensors if t.name == "blk.0.ffn_up_shexp.weight"][0]
        assert (zeros.data == 0).all() == (not model.config.n_shared_experts)
    else:
        assert bool(shared) == bool(model.config.n_shared_experts)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (dict(qk_norm=True, head_dim=32, num_experts_per_tok=1), "renormalises the top-k routing weights"),
        (dict(qk_norm=True, head_dim=32, num_experts_per_tok=2, n_shared_experts=1), "no shared experts"),
        (dict(num_experts_per_tok=2, norm_topk_prob=True, attention_bias=True), "q/k/v biases"),
    ],
)
def test_moe_gguf_refuses_what_llama_cpp_would_compute_differently(tmp_path, upstream_fixtures, capsys, fields, reason):
    """minimind-3-MoE's own shape (q/k norm, top-1 without renormalising) is the first case."""
    model = tiny_model(use_moe=True, n_routed_experts=4, moe_intermediate_size=32, **fields)
    src = save_model_dir(tmp_path / "moe", model, upstream_fixtures)
    assert main(["convert", str(src), str(tmp_path / "moe.gguf"), "--to", "gguf"]) == 1
    err = capsys.readouterr().err
    assert "no llama.cpp architecture computes this MoE layer exactly" in err and reason in err
    assert "minimind convert SRC OUT" in err
    assert not (tmp_path / "moe.gguf").exists()


def test_qwen3moe_gguf_reads_back_and_a_mixtral_layout_one_is_refused(tmp_path, upstream_fixtures):
    for case in ("qwen3moe", "llama"):
        model = tiny_moe(case)
        out, _ = convert(save_model_dir(tmp_path / case, model, upstream_fixtures), tmp_path / f"{case}.gguf", "gguf")
        if case == "llama":
            with pytest.raises(CheckpointError, match=r"llama \(Mixtral\) layout, which this loader does not read"):
                load_model(out)
            continue
        back, _ = load_model(out)
        assert back.config.moe_intermediate_size == 64 and back.config.head_dim == 32
        assert (logits(back, IDS) - logits(model, IDS)).abs().max().item() <= 1e-4


def test_gguf_refuses_an_unknown_quant(tmp_path):
    from models.gguf_export import write_gguf

    model = tiny_model()
    with pytest.raises(CheckpointError, match="q5_k_m: not one of .*q4_k_m.*llama-quantize"):
        write_gguf(tmp_path / "x.gguf", model.config, model.state_dict(), None, quant="q5_k_m")


def test_q4_k_m_reads_back_closer_to_the_source_than_q4_0(tmp_path, upstream_fixtures):
    """Q4_K blocks (a scale and a minimum per 32 values, fitted by least squares) and Q6_K for the layers
    llama-quantize favours. Byte equality with llama.cpp's own quantizer: tests/test_gguf_llama_cpp.py."""
    model = tiny_model(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_key_value_heads=2)
    src = save_model_dir(tmp_path / "src", model, upstream_fixtures)
    error = {}
    for quant in ("q4_0", "q4_k_m"):
        out = tmp_path / f"{quant}.gguf"
        assert main(["convert", str(src), str(out), "--to", "gguf", "--quant", quant]) == 0
        back, _ = load_model(out)
        error[quant] = (logits(back, IDS) - logits(model, IDS)).abs().max().item()
    reader = gguf.GGUFReader(tmp_path / "q4_k_m.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert types["token_embd.weight"] == "Q6_K" and types["blk.1.attn_q.weight"] == "Q4_K"
    more_bits = ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]  # llama-quantize's use_more_bits
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(8)] == more_bits
    assert 0 < error["q4_k_m"] < error["q4_0"]


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
