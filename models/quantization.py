"""Weight-only int8 / int4 linear layers for CPU inference, on torch's packed CPU kernels.

Decoding a small model on a CPU reads every weight once per token, so it is bound by memory bandwidth: weights
stored in 8 or 4 bits are read 4x or 8x faster than float32. torch ships the matmul kernels for that
(`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`), so only the quantization of the weights is
ours. The two schemes:

- int8: symmetric, one scale per output channel (row): `w ~= q * scale`, q in [-127, 127].
- int4: groups of 32 inputs with a scale and a zero each: `w ~= (q - 8) * scale + zero`, q in [0, 15], each group
  on the better of llama.cpp's Q4_0 grid (symmetric: zero 0, scale = the group's value of largest magnitude / -8)
  and its Q4_1 grid (the group's minimum to its maximum in 15 steps). Being those schemes, a Q4_0 or Q4_1 GGUF
  file's blocks are found again from its dequantised weights (codes exactly; scales rounded to bfloat16), so
  loading one with int4 does not round twice (the bundled SmolLM2-135M is a Q4_1 GGUF).

Activations go through the kernels in bfloat16: on the 2-core AMD EPYC here their float32 paths are 5-10x slower
than their bfloat16 ones (the bfloat16 ones are vectorised), so scales are stored in bfloat16 and each layer
casts its input to bfloat16 and its output back to the input's dtype.

`quantize(model, "int8" | "int4")` fuses the projections that share an input (models/fusion.py) and then replaces
every Linear layer (and fused layer) with a `QuantizedLinear`, in place. A quantized model is for inference only.
"""

from __future__ import annotations

import torch
from torch import nn

from models.errors import ModelError
from models.fusion import FusedLinear, fuse

QUANTIZATION_CHOICES = ("none", "int8", "int4")
INT4_GROUP_SIZE = 32  # llama.cpp's Q4_0 block size
# Shapes the kernels compute correctly (torch 2.13, CPU): the int8 kernel reads inputs 16 at a time and returns
# wrong values or crashes for other sizes; the int4 packing wants outputs in multiples of 16.
INT8_IN_MULTIPLE = 16
INT4_OUT_MULTIPLE = 16
COMPUTE_DTYPE = torch.bfloat16  # the dtype the packed kernels compute in (module docstring: why)


class QuantizedLinear(nn.Module):
    """A Linear layer whose weight is stored packed in int8 or int4. `sizes`: the output is split into parts of
    these sizes (a quantized `FusedLinear`), or returned whole when None."""

    def __init__(self, layer: nn.Linear | FusedLinear, bits: int) -> None:
        super().__init__()
        problem = unsupported(layer, bits)
        if problem:
            raise ModelError(f"cannot quantize this layer to int{bits}: {problem}")
        weight = layer.weight.detach().float()
        self.in_features, self.out_features, self.bits = weight.shape[1], weight.shape[0], bits
        self.sizes = layer.sizes if isinstance(layer, FusedLinear) else None
        bias = layer.bias.detach().to(COMPUTE_DTYPE) if layer.bias is not None else None
        self.register_buffer("bias", bias)
        if bits == 8:
            packed, scales = quantize_int8(weight)
        else:
            packed, scales = pack_int4(*quantize_int4(weight))
        self.register_buffer("packed_weight", packed)
        self.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.matmul(x.reshape(-1, self.in_features).to(COMPUTE_DTYPE))
        if self.bias is not None:
            out = out + self.bias
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out.split(self.sizes, dim=-1) if self.sizes is not None else out

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [n, in] (bfloat16) @ W^T, without the bias: one call of the packed kernel."""
        if self.bits == 8:
            return torch.ops.aten._weight_int8pack_mm(rows, self.packed_weight, self.scales)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed_weight, INT4_GROUP_SIZE, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def unsupported(layer: nn.Linear | FusedLinear, bits: int) -> str | None:
    """Why `layer` cannot be quantized to `bits` (a sentence naming the fix), or None when it can."""
    if bits not in (8, 4):
        return f"bits must be 8 or 4, got {bits}"
    if layer.weight.device.type != "cpu":
        return (
            f"the layer is on {layer.weight.device}, and the packed int8/int4 kernels run on the CPU only; "
            "load the model with --device cpu (on a GPU use --dtype bf16 instead)"
        )
    out_features, in_features = layer.weight.shape
    if bits == 8 and in_features % INT8_IN_MULTIPLE:
        return f"its input size {in_features} is not a multiple of {INT8_IN_MULTIPLE}"
    if bits == 4 and in_features % INT4_GROUP_SIZE:
        return f"its input size {in_features} is not a multiple of {INT4_GROUP_SIZE} (the int4 group size)"
    if bits == 4 and out_features % INT4_OUT_MULTIPLE:
        return f"its output size {out_features} is not a multiple of {INT4_OUT_MULTIPLE}"
    return None


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [out, in], bfloat16 scale per row [out]): w ~= codes * scale."""
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(COMPUTE_DTYPE)
    codes = torch.round(weight / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes 0..15 [out, in] as int32, bfloat16 scales and zeros per group of 32 inputs [out, in / 32]):
    w ~= (codes - 8) * scale + zero. Each group takes whichever of llama.cpp's two 4-bit grids reconstructs it
    better (ties: Q4_0): Q4_0, symmetric (zero 0, scale = the value of largest magnitude / -8), or Q4_1, from the
    group's minimum to its maximum. So a Q4_0 or Q4_1 GGUF's blocks are found again from its dequantised weights."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
    extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True))[..., 0]
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    grids = [(extreme / -8, torch.zeros_like(extreme)), ((high - low) / 15, low + 8 * (high - low) / 15)]
    best = None
    for scale, zero in grids:
        scale, zero = scale.to(COMPUTE_DTYPE), zero.to(COMPUTE_DTYPE)
        s, z = scale.float()[..., None], zero.float()[..., None]
        codes = (torch.round((groups - z) / torch.where(s == 0, 1, s)) + 8).clamp(0, 15)
        error = ((codes - 8) * s + z - groups).abs().amax(dim=-1)
        if best is None:
            best = [codes, scale, zero, error]
            continue
        better = error < best[3]
        best = [torch.where(better[..., None], codes, best[0])] + [
            torch.where(better, new, old) for new, old in ((scale, best[1]), (zero, best[2]), (error, best[3]))
        ]
    codes, scales, zeros, _ = best
    return codes.to(torch.int32).reshape(out_features, in_features), scales, zeros


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 kernel's layout: codes packed two per byte, and [in / 32, out, 2] (scale, zero) pairs (the kernel
    computes (q - 8) * scale + zero)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
    return packed, scales_and_zeros


def dequantize(layer: QuantizedLinear) -> torch.Tensor:
    """The weight the layer computes with, as float32 (for tests and quality checks): one identity matmul, whose
    bfloat16 output rounds each code * scale to bfloat16."""
    return layer.matmul(torch.eye(layer.in_features, dtype=COMPUTE_DTYPE)).float().t().contiguous()


def quantize(model: nn.Module, method: str) -> nn.Module:
    """Fuse, then replace every Linear / fused layer of `model` with a QuantizedLinear, in place. `method`: int8 or
    int4 ("none" returns the model as it is). A MoE router stays float (its top-k choice is sensitive to rounding);
    a layer of a shape the int4 kernel cannot take falls back to int8, and one neither takes stays float (these are
    tiny test shapes: every real model's sizes are multiples of 32). Returns the model."""
    if method not in QUANTIZATION_CHOICES:
        raise ModelError(f"quantization {method!r} is not supported; choose one of {', '.join(QUANTIZATION_CHOICES)}")
    if method == "none":
        return model
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ModelError(
            f"--quantization {method} runs on the CPU only (torch's packed int8/int4 kernels), but the model is on "
            f"{device}; use --device cpu, or on a GPU --dtype bf16 without --quantization"
        )
    fuse(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, (nn.Linear, FusedLinear)) or _is_router(parent, name):
                continue
            bits = next((b for b in ((8,) if method == "int8" else (4, 8)) if unsupported(child, b) is None), None)
            if bits is not None:
                setattr(parent, name, QuantizedLinear(child, bits))
    return model


def _is_router(parent: nn.Module, name: str) -> bool:
    return name == "gate" and hasattr(parent, "experts")
