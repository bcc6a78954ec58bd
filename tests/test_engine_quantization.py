"""`--quantization int8|int4` through the engine: the int8 engine's greedy output is the float32 engine's for
nearly every token and its logits are close; the flag reaches the engine from each front end; a GPU device, a
model object and an unknown method are refused by name; a Q4_0 GGUF loaded with int4 keeps the file's blocks."""

from __future__ import annotations

import gguf
import pytest
import torch
from transformers import AutoTokenizer

from engine.build import build_engine
from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from minimind.cli import main
from models.quantization import QuantizedLinear, dequantize
from tests.conftest import tiny_model
from tests.test_engine import WIDE, prompts

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, upstream_fixtures):
    """A tiny model directory with logits far apart (WIDE), so greedy rarely hinges on a near-tie."""
    path = tmp_path_factory.mktemp("quant") / "model"
    tiny_model(seed=1, **WIDE).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(upstream_fixtures / "minimind2-dense")).save_pretrained(path)
    return path


def greedy_tokens(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [out.outputs[0].token_ids for out in llm.generate(prompts(), params)]


def logits_of(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Every position's logits from one full forward of the engine's model (no KV cache)."""
    with torch.inference_mode():
        return llm.engine.model(torch.tensor([ids])).logits[0].float()


def test_int8_engine_follows_the_float_engine(checkpoint):
    """On the float engine's own greedy text, the int8 model picks the same next token at >= 90% of positions and
    its logits are within 10% (relative norm; measured 2-7%); free-running greedy output agrees for the first
    tokens of every prompt (measured: 5 to 16 of 16; a tiny random model has near-ties that then diverge)."""
    reference = LLM(str(checkpoint), device="cpu", max_model_len=128)
    quantized = LLM(str(checkpoint), device="cpu", max_model_len=128, quantization="int8")
    assert any(isinstance(m, QuantizedLinear) for m in quantized.engine.model.modules())
    same = total = 0
    for prompt, want, got in zip(prompts(), greedy_tokens(reference), greedy_tokens(quantized)):
        assert got[:4] == want[:4]
        a, b = logits_of(reference, prompt + want), logits_of(quantized, prompt + want)
        assert ((a - b).norm(dim=-1) / a.norm(dim=-1)).max().item() < 0.1
        same += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += a.shape[0]
    assert same / total >= 0.9, f"int8 picks the float model's token at {same / total:.0%} of positions only"


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_engine_decodes_what_its_model_computes(checkpoint, method):
    """The engine's cached, step-by-step greedy decode equals the argmax of a full forward of the same quantized
    model: the packed layers behave the same for a prompt's many rows and a decode step's one row."""
    llm = LLM(str(checkpoint), device="cpu", max_model_len=128, quantization=method)
    for prompt, tokens in zip(prompts(), greedy_tokens(llm)):
        full = logits_of(llm, prompt + tokens).argmax(-1)[len(prompt) - 1 : -1]
        assert full.tolist() == tokens


def test_quantization_is_refused_on_a_gpu_and_for_a_model_object(checkpoint):
    with pytest.raises(InvalidRequestError, match="CPU only.*--device cpu"):
        build_engine(EngineConfig(model=str(checkpoint), device="meta", quantization="int8"))
    with pytest.raises(InvalidRequestError, match="quantize a model object yourself"):
        LLM(tiny_model(), tokenizer=checkpoint, device="cpu", quantization="int8")
    with pytest.raises(InvalidRequestError, match="quantization must be one of none, int8, int4, got 'int2'"):
        EngineConfig(quantization="int2").validate()


def test_the_flag_reaches_the_engine_from_each_front_end(checkpoint, capsys):
    import argparse
    import dataclasses

    from engine.cli.args import add_model_arguments, engine_config_from_args
    from server import settings as server_settings

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    assert engine_config_from_args(parser.parse_args(["--quantization", "int4"])).quantization == "int4"
    settings = server_settings.from_args(argparse.Namespace(quantization=None), env={"MINIMIND_QUANTIZATION": "int8"})
    assert EngineConfig.from_fields(dataclasses.asdict(settings)).quantization == "int8"
    with pytest.raises(server_settings.SettingsError, match="native backend"):
        server_settings.validate(server_settings.Settings(backend="vllm", quantization="int8"))
    args = ["generate", "--model", str(checkpoint), "--quantization", "int8", "--temperature", "0", "--max-tokens", "4"]
    assert main([*args, "--prompt", "hello"]) == 0
    assert capsys.readouterr().out.strip()


def test_a_q4_0_gguf_loaded_as_int4_keeps_the_files_blocks(tmp_path, checkpoint):
    out = tmp_path / "model-q4_0.gguf"
    assert main(["convert", str(checkpoint), str(out), "--to", "gguf", "--quant", "q4_0"]) == 0
    llm = LLM(str(out), device="cpu", max_model_len=64, quantization="int4")
    layer = llm.engine.model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantizedLinear) and layer.bits == 4
    tensor = next(t for t in gguf.GGUFReader(out).tensors if t.name == "blk.0.ffn_down.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_0
    from_file = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(layer.out_features, -1)
    # the file's (code - 8) * scale, each scale rounded from float16 to bfloat16 (the kernel's scale type)
    blocks = tensor.data.reshape(-1, 18)
    file_scales = torch.from_numpy(blocks[:, :2].copy().view("float16")).float().reshape(-1)
    exact = torch.from_numpy(from_file).reshape(-1, 32) / file_scales[:, None]
    rounded = (exact * file_scales.bfloat16().float()[:, None]).reshape(layer.out_features, -1)
    assert torch.equal(dequantize(layer), rounded.bfloat16().float())
