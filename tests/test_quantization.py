"""models/quantization.py: int8 / int4 layers compute what the float layer does within the scheme's rounding, the
stored codes and scales come back exactly, a Q4_0 GGUF's blocks are kept as they are, and shapes or devices the
kernels cannot take are refused by name."""

from __future__ import annotations

import gguf
import pytest
import torch
from torch import nn

from models.errors import ModelError
from models.fusion import FusedLinear
from models.quantization import (
    QuantizedLinear,
    dequantize,
    quantize,
    quantize_int4,
    quantize_int8,
    unsupported,
)
from tests.conftest import tiny_model

# Relative error of x @ W^T (Frobenius norm) for Gaussian weights and inputs: int8 per row rounds to 1/254 of the
# row's largest value (and the kernel computes in bfloat16, 2^-8), int4 to 1/16 of its group's.
TOLERANCE = {8: 0.02, 4: 0.10}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def linear(in_features: int, out_features: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_quantized_matmul_is_close_to_the_float_one(bits, rows):
    layer = linear(128, 96)
    x = torch.randn(rows, 128)
    error = relative_error(QuantizedLinear(layer, bits)(x), layer(x))
    assert error < TOLERANCE[bits]
    assert error > 1e-4  # the layer really is quantized, not a float copy


@pytest.mark.parametrize("bits", [8, 4])
def test_output_keeps_the_input_dtype_and_leading_shape(bits):
    quantized = QuantizedLinear(linear(64, 32), bits)
    for dtype in (torch.float32, torch.bfloat16):
        out = quantized(torch.randn(2, 5, 64, dtype=dtype))
        assert (out.shape, out.dtype) == ((2, 5, 32), dtype)


def test_a_fused_layer_returns_its_parts_split():
    parts = [linear(64, 64, seed=1), linear(64, 32, seed=2), linear(64, 32, seed=3)]
    fused = QuantizedLinear(FusedLinear(parts), 8)
    x = torch.randn(4, 64)
    outputs = fused(x)
    assert [o.shape[-1] for o in outputs] == [64, 32, 32]
    for out, part in zip(outputs, parts):
        assert relative_error(out, part(x)) < TOLERANCE[8]


def test_int8_codes_and_scales_come_back_exactly():
    weight = linear(64, 48).weight.detach()
    codes, scales = quantize_int8(weight)
    assert codes.abs().max().item() == 127  # each row's largest value uses the full range
    want = (codes.float() * scales.float()[:, None]).bfloat16().float()  # the kernel's bfloat16 output
    assert torch.equal(dequantize(QuantizedLinear(linear(64, 48), 8)), want)


def test_int4_packing_round_trip_gives_codes_times_scales():
    layer = linear(96, 32, bias=False)
    codes, scales = quantize_int4(layer.weight.detach().float())
    assert codes.min().item() >= 0 and codes.max().item() <= 15
    assert scales.shape == (32, 3)
    want = ((codes.float() - 8).reshape(32, 3, 32) * scales.float()[..., None]).reshape(32, 96)
    assert torch.equal(dequantize(QuantizedLinear(layer, 4)), want.bfloat16().float())


def test_a_q4_0_gguf_tensor_keeps_its_blocks():
    """Requantizing llama.cpp's dequantized Q4_0 weights finds the file's codes and scales again, so loading a Q4_0
    GGUF with int4 loses nothing beyond the scales' float16 -> bfloat16 rounding."""
    weight = torch.randn(32, 128).numpy()
    blocks = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q4_0).reshape(32 * 4, 18)
    file_scales = torch.from_numpy(blocks[:, :2].copy().view("float16")).float().reshape(32, 4)
    packed = torch.from_numpy(blocks[:, 2:].copy()).reshape(32, 4, 16)
    file_codes = torch.cat([packed & 0x0F, packed >> 4], dim=-1).reshape(32, 128).int()  # low nibbles first
    dequantized = torch.from_numpy(gguf.quants.dequantize(blocks.reshape(32, -1), gguf.GGMLQuantizationType.Q4_0))
    codes, scales = quantize_int4(dequantized.reshape(32, 128))
    assert torch.equal(codes, file_codes)
    assert torch.equal(scales, file_scales.bfloat16())


@pytest.mark.parametrize(
    ("shape", "bits", "problem"),
    [
        ((64, 40), 8, "input size 40 is not a multiple of 16"),
        ((64, 48), 4, "input size 48 is not a multiple of 32"),
        ((24, 64), 4, "output size 24 is not a multiple of 16"),
        ((64, 64), 3, "bits must be 8 or 4"),
    ],
)
def test_shapes_the_kernels_cannot_take_are_refused_by_name(shape, bits, problem):
    with pytest.raises(ModelError, match=problem):
        QuantizedLinear(linear(shape[1], shape[0]), bits)


def test_a_layer_off_the_cpu_is_refused():
    layer = nn.Linear(64, 64, device="meta")
    assert "CPU only" in unsupported(layer, 8)
    with pytest.raises(ModelError, match="--device cpu"):
        QuantizedLinear(layer, 8)
    model = tiny_model().to("meta")
    with pytest.raises(ModelError, match="runs on the CPU only"):
        quantize(model, "int8")


def test_unknown_method_is_refused():
    with pytest.raises(ModelError, match="choose one of none, int8, int4"):
        quantize(tiny_model(), "int3")


@pytest.mark.parametrize(("method", "tolerance"), [("int8", 0.03), ("int4", 0.2)])
def test_a_quantized_model_keeps_its_logits(method, tolerance):
    model = tiny_model()
    ids = torch.randint(0, 6400, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
        quantize(model, method)
        got = model(ids).logits
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert not [m for m in model.modules() if isinstance(m, (nn.Linear, FusedLinear))]
    assert {m.bits for m in layers} == {8 if method == "int8" else 4}
    assert relative_error(got, want) < tolerance


def test_int4_falls_back_to_int8_then_float_for_odd_shapes():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 24), nn.Linear(24, 64))
    quantize(model, "int4")
    assert isinstance(model[0], QuantizedLinear) and model[0].bits == 4
    assert isinstance(model[1], QuantizedLinear) and model[1].bits == 8  # 24 outputs: no int4 packing
    assert isinstance(model[2], nn.Linear)  # 24 inputs: neither kernel


def test_none_leaves_the_model_as_it_is():
    model = tiny_model()
    assert quantize(model, "none") is model
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
