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


def test_int4_packing_round_trip_gives_codes_times_scales_plus_zeros():
    layer = linear(96, 32, bias=False)
    codes, scales, zeros = quantize_int4(layer.weight.detach().float())
    assert codes.min().item() >= 0 and codes.max().item() <= 15
    assert scales.shape == zeros.shape == (32, 3)
    assert (zeros == 0).any() and (zeros != 0).any()  # Gaussian rows: some groups on each grid
    grouped = (codes.float() - 8).reshape(32, 3, 32) * scales.float()[..., None] + zeros.float()[..., None]
    assert torch.equal(dequantize(QuantizedLinear(layer, 4)), grouped.reshape(32, 96).bfloat16().float())


def gguf_blocks(weight: torch.Tensor, qtype: gguf.GGMLQuantizationType):
    """(file codes [rows, cols], dequantized weight, float16 scale per block) of `weight` quantized by the gguf
    package (llama.cpp's reference quantizer)."""
    rows, cols = weight.shape
    data = gguf.quants.quantize(weight.numpy(), qtype)
    dequantized = torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(rows, cols)
    blocks = data.reshape(rows * cols // 32, -1)
    header = 2 if qtype == gguf.GGMLQuantizationType.Q4_0 else 4  # d (and m for Q4_1), float16
    scales = torch.from_numpy(blocks[:, :2].copy().view("float16")).float().reshape(rows, -1)
    packed = torch.from_numpy(blocks[:, header:].copy()).reshape(rows, -1, 16)
    codes = torch.cat([packed & 0x0F, packed >> 4], dim=-1).reshape(rows, cols).int()  # low nibbles first
    return codes, dequantized, scales


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1])
def test_a_q4_gguf_tensor_keeps_its_blocks(qtype):
    """Requantizing llama.cpp's dequantized Q4_0 / Q4_1 weights finds the file's codes again, and its scales up to
    float16 -> bfloat16 rounding: loading such a GGUF with int4 does not round the weights a second time."""
    codes_in_file, dequantized, file_scales = gguf_blocks(torch.randn(32, 128), qtype)
    codes, scales, zeros = quantize_int4(dequantized)
    assert torch.equal(codes, codes_in_file)
    assert torch.equal(scales, file_scales.bfloat16())
    if qtype == gguf.GGMLQuantizationType.Q4_0:
        assert (zeros == 0).all()
    relative = (dequantize_codes(codes, scales, zeros) - dequantized).norm() / dequantized.norm()
    assert relative.item() < 0.005  # bfloat16 scales and zeros only


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    rows, cols = codes.shape
    grouped = (codes.float() - 8).reshape(rows, -1, 32) * scales.float()[..., None] + zeros.float()[..., None]
    return grouped.reshape(rows, cols)


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
