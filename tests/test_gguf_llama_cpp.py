"""llama.cpp itself (through llama-cpp-python) runs our exported GGUF: its greedy continuation equals our
engine's for 32 tokens, for a tiny random model, a tiny model trained here, upstream MiniMind fixtures and a
MiniMind2-Small-shaped model converted from .pth, and MoE models in each llama.cpp architecture the exporter picks
(for the last two its logits over the prompt match ours as well).
`--quant q4_k_m` files equal, byte for byte, what llama.cpp's own quantizer makes of our f16 file.

llama-cpp-python is a source build (no wheel for this platform on PyPI): `make gguf-test` builds it into .venv and
runs this file (CI does). Without it these tests are skipped, saying so.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from models.convert import convert
from models.gguf_kquants import quantize_q4_k, quantize_q6_k
from models.loader import load_model
from tests.conftest import tiny_model
from tests.test_gguf_export import MOE_CASES, rounded, save_model_dir, tiny_moe
from tests.test_loader import randomize

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (`make gguf-test` builds llama.cpp and runs these tests)"
)

STEPS = 32


def llama_cpp_greedy(path, prompt: list[int]) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False, seed=0)
    out = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == STEPS:
            break
    return out


def our_greedy(path, prompt: list[int]) -> list[int]:
    llm = LLM(str(path), device="cpu", max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    return llm.generate(prompt, params)[0].outputs[0].token_ids


def test_llama_cpp_continues_a_tiny_random_model_as_we_do(tmp_path, upstream_fixtures):
    src = tmp_path / "src"
    randomize(tiny_model(intermediate_size=96), seed=4).save_pretrained(src)
    AutoTokenizer.from_pretrained(str(upstream_fixtures / "minimind2-dense")).save_pretrained(src)
    out, arch = convert(src, tmp_path / "tiny.gguf", "gguf", quant="f16")
    assert arch == "llama"
    prompt = torch.randint(3, 6400, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    assert llama_cpp_greedy(out, prompt) == our_greedy(out, prompt)


@pytest.mark.parametrize(("generation", "arch"), [("minimind2-dense", "llama"), ("minimind3-dense", "qwen3")])
def test_llama_cpp_continues_converted_upstream_checkpoints_as_we_do(tmp_path, upstream_fixtures, generation, arch):
    folder = upstream_fixtures / generation
    out, used = convert(folder / "model.pth", tmp_path / f"{generation}.gguf", "gguf", quant="f16")
    assert used == arch
    cases = torch.load(folder / "cases.pt")
    prompt = cases["input_ids"][0, : cases["greedy_prompt_len"]].tolist()
    assert llama_cpp_greedy(out, prompt) == our_greedy(out, prompt)


def test_llama_cpp_tokenizes_like_transformers(tmp_path, upstream_fixtures):
    folder = upstream_fixtures / "minimind3-dense"
    out, _ = convert(folder / "model.pth", tmp_path / "m3.gguf", "gguf")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, vocab_only=True, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    for text in ["Hello, world! 123", "你好，世界。今天天气很好", "<|im_start|>user\nhi<|im_end|>\n<think>"]:
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours


def llama_cpp_prompt_logits(path, prompt: list[int]) -> torch.Tensor:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False, logits_all=True, seed=0)
    llm.eval(prompt)
    return torch.tensor(llm.scores[: len(prompt)])


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_llama_cpp_runs_our_moe_gguf_as_we_do(tmp_path, upstream_fixtures, case):
    """Our model on the source weights (already float16-exact) against llama.cpp on the f16 file. As a check that
    the comparison can fail: renormalising the routing weights the other way moves our logits far more than the
    tolerance (top-2 and top-3 cases)."""
    model = tiny_moe(case)
    src = save_model_dir(tmp_path / "src", model, upstream_fixtures)
    out, arch = convert(src, tmp_path / "moe.gguf", "gguf", quant="f16")
    assert arch == case.removesuffix("-without-shared")
    prompt = torch.randint(3, 6400, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([prompt])).logits[0]
    theirs = llama_cpp_prompt_logits(out, prompt)
    assert (theirs - ours).abs().max().item() < 0.02
    assert llama_cpp_greedy(out, prompt) == our_greedy(src, prompt)
    if model.config.num_experts_per_tok > 1:
        for layer in model.model.layers:
            layer.mlp.norm_topk_prob = not layer.mlp.norm_topk_prob
        with torch.no_grad():
            other = model(torch.tensor([prompt])).logits[0]
        assert (theirs - other).abs().max().item() > 0.1


@functools.cache
def ggml_base() -> ctypes.CDLL:
    """The libggml-base that llama-cpp-python ships, with ggml_quantize_chunk's signature declared (once)."""
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = (
        [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    )
    return lib


def ggml_quantize(rows: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """ggml's own quantizer (ggml_quantize_chunk)."""
    lib = ggml_base()
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows.shape[0], rows.shape[1] // block * size), dtype=np.uint8)
    lib.ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None)
    return out


def test_k_quant_blocks_equal_ggmls_own():
    rng = np.random.default_rng(0)
    cases = {
        "normal": rng.standard_normal((64, 512)) * 0.05,
        "heavy tails": rng.standard_t(3, (64, 512)) * 0.02,
        "all zero": np.zeros((4, 256)),
        "zero groups": np.concatenate([np.zeros((4, 128)), rng.standard_normal((4, 128))], axis=1),
        "all positive": np.abs(rng.standard_normal((8, 256))),
        "one spike": np.where(np.arange(256) == 7, 50.0, rng.standard_normal((4, 256)) * 1e-3),
    }
    for name, rows in cases.items():
        rows = rows.astype(np.float32)
        for ours, qtype in (
            (quantize_q4_k, gguf.GGMLQuantizationType.Q4_K),
            (quantize_q6_k, gguf.GGMLQuantizationType.Q6_K),
        ):
            assert np.array_equal(ours(rows), ggml_quantize(rows, qtype)), (name, qtype.name)


Q4_K_M_SHAPES = {
    "dense, K-quant rows": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_key_value_heads=2),
    "dense, untied, rows too short for K-quants": dict(tie_word_embeddings=False, intermediate_size=96),
    "MoE with a shared expert": dict(
        hidden_size=256, num_hidden_layers=4, use_moe=True, n_shared_experts=1, moe_intermediate_size=256
    ),
}


# The types each file holds: the comparison covers each of them.
Q4_K_M_TYPES = {
    "dense, K-quant rows": {"F32", "Q4_K", "Q6_K"},
    "dense, untied, rows too short for K-quants": {"F32", "Q5_0", "Q8_0"},
    "MoE with a shared expert": {"F32", "Q4_K", "Q6_K"},
}


@pytest.mark.parametrize("shape", sorted(Q4_K_M_SHAPES))
def test_q4_k_m_file_equals_what_llama_quantize_makes_of_our_f16(tmp_path, upstream_fixtures, shape):
    """Matrices exactly float16, so that both quantize the same values: our one step from the checkpoint against
    llama.cpp's llama_model_quantize (the library behind llama-quantize) on our f16 file. Same tensor types
    (Q4_K, Q6_K in the layers it picks, Q5_0/Q8_0/F16 where rows do not fit, routers F32), same bytes."""
    model = rounded(tiny_model(**Q4_K_M_SHAPES[shape]), "f16")
    src = save_model_dir(tmp_path / "src", model, upstream_fixtures)
    f16, _ = convert(src, tmp_path / "f16.gguf", "gguf", quant="f16")
    ours, _ = convert(src, tmp_path / "ours.gguf", "gguf", quant="q4_k_m")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, 1
    theirs = tmp_path / "theirs.gguf"
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    ours_tensors = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    their_tensors = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert sorted(ours_tensors) == sorted(their_tensors)
    assert {t.tensor_type.name for t in ours_tensors.values()} == Q4_K_M_TYPES[shape]
    for name, tensor in their_tensors.items():
        assert ours_tensors[name].tensor_type == tensor.tensor_type, name
        assert np.array_equal(np.asarray(ours_tensors[name].data), np.asarray(tensor.data)), name


def test_llama_cpp_runs_a_q4_k_m_file_as_our_loader_reads_it(tmp_path, upstream_fixtures):
    """llama.cpp multiplies K-quant blocks with activations it rounds to 8 bits, so its logits are near ours on
    the same dequantised weights, not equal: within 0.1 here (a Q4_0 file of the same model: about 0.02)."""
    model = tiny_model(**Q4_K_M_SHAPES["dense, K-quant rows"])
    src = save_model_dir(tmp_path / "src", model, upstream_fixtures)
    out, _ = convert(src, tmp_path / "model.gguf", "gguf", quant="q4_k_m")
    back, _ = load_model(out)
    prompt = torch.randint(3, 6400, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ours = back(torch.tensor([prompt])).logits[0]
    theirs = llama_cpp_prompt_logits(out, prompt)
    assert (theirs - ours).abs().max().item() < 0.1
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


def test_llama_cpp_continues_a_model_trained_here_as_we_do(tmp_path, upstream_fixtures):
    """A tiny model trained to memorise three sentences: llama.cpp on its f16 GGUF and our engine both continue a
    sentence's start with the 32 tokens it learnt."""
    from tests.test_eval import train_to_memorise

    tokenizer = AutoTokenizer.from_pretrained(str(upstream_fixtures / "minimind2-dense"))
    texts = [
        "The river flows past the old stone mill, where the miller grinds wheat into flour every autumn morning "
        "before the market opens in the square.",
        "A copper lamp hangs above the harbor door and the sailors light it when the fog rolls in from the sea.",
        "Maple trees turn red in October and the children collect the leaves to press them between heavy books.",
    ]
    model = train_to_memorise(texts, tokenizer, steps=200)
    src = tmp_path / "trained"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    out, _ = convert(src, tmp_path / "trained.gguf", "gguf", quant="f16")
    ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    prompt, learnt = ids[:6], ids[6 : 6 + STEPS]
    theirs = llama_cpp_greedy(out, prompt)
    assert theirs == our_greedy(out, prompt)
    assert sum(a == b for a, b in zip(theirs, learnt)) >= STEPS * 3 // 4


def test_llama_cpp_continues_an_upstream_minimind2_small_pth_as_we_do(tmp_path, upstream_fixtures):
    """Upstream's MiniMind2-Small shape (512 wide, 8 layers, 8/2 heads, 25.8M): a .pth in upstream's key layout
    (written by our --to pth, random weights: upstream's released weights are not fetched here), converted with
    --preset minimind2-small to an f16 GGUF."""
    from models.config import MiniMindConfig
    from models.model import MiniMindForCausalLM
    from models.presets import PRESETS

    config = MiniMindConfig(**PRESETS["minimind2-small"])
    torch.manual_seed(0)
    src = tmp_path / "src"
    MiniMindForCausalLM(config).save_pretrained(src)
    AutoTokenizer.from_pretrained(str(upstream_fixtures / "minimind2-dense")).save_pretrained(src)
    pth, _ = convert(src, tmp_path / "full_sft_512.pth", "pth")
    out, arch = convert(pth, tmp_path / "m2s.gguf", "gguf", quant="f16", preset="minimind2-small", tokenizer=src)
    assert arch == "llama" and config.hidden_size == 512 and config.num_hidden_layers == 8
    prompt = torch.randint(3, 6400, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    assert llama_cpp_greedy(out, prompt) == our_greedy(out, prompt)
    back, _ = load_model(out)
    with torch.no_grad():
        ours = back(torch.tensor([prompt])).logits[0]
    theirs = llama_cpp_prompt_logits(out, prompt)
    assert (theirs - ours).abs().max().item() < 0.01 * ours.abs().max().item()
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
