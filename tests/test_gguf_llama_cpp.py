"""llama.cpp itself (through llama-cpp-python) runs our exported GGUF: its greedy continuation equals our
engine's for 32 tokens, for a tiny random model, for upstream MiniMind fixtures converted from .pth, and for MoE
models in each llama.cpp architecture the exporter picks (there its logits over the prompt match ours as well).

llama-cpp-python is a source build (no wheel for this platform on PyPI): `make gguf-test` builds it into .venv and
runs this file (CI does). Without it these tests are skipped, saying so.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from models.convert import convert
from tests.conftest import tiny_model
from tests.test_gguf_export import MOE_CASES, save_model_dir, tiny_moe
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
