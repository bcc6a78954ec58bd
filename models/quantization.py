"""Weight-only int8 / int4 linear layers for CPU inference, on torch's packed CPU kernels.

Decoding a small model on a CPU reads every weight once per token, so it is bound by memory bandwidth: weights
stored in 8 or 4 bits are read 4x or 8x faster than float32. torch ships the matmul kernels for that
(`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`), so only the quantization of the weights is
ours. The two schemes:

- int8: symmetric, one scale per output channel (row): `w ~= q * scale`, q in [-127, 127].
- int4: llama.cpp's Q4_0 scheme, groups of 32 inputs with one scale each: `w ~= (q - 8) * scale`, q in [0, 15],
  scale = (the group's value of largest magnitude) / -8. Being the Q4_0 scheme, a Q4_0 GGUF file's blocks are
  found again exactly from its dequantised weights (codes and scales; see docs/convert.md).

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
COMPUTE_DTYPE = torch.bfloat16  # the dtype the packed kernels compute in (module docstring: why)


class QuantizedLinear(nn.Module):
    """A Linear layer whose weight is stored packed in int8 or int4. `sizes`: the output is split into parts of
    these sizes (a quantized `FusedLinear`), or returned whole when None."""

    def __init__(self, layer: nn.Linear | FusedLinear, bits: int) -> None:
        super().__init__()
        weight = layer.weight.detach().float()
        self.in_features, self.out_features, self.bits = weight.shape[1], weight.shape[0], bits
        self.sizes = layer.sizes if isinstance(layer, FusedLinear) else None
        bias = layer.bias.detach().to(COMPUTE_DTYPE) if layer.bias is not None else None
        self.register_buffer("bias", bias)
        if bits == 8:
            packed, scales = quantize_int8(weight)
        elif bits == 4:
            packed, scales = pack_int4(*quantize_int4(weight))
        else:
            raise ModelError(f"QuantizedLinear: bits must be 8 or 4, got {bits}")
        self.register_buffer("packed_weight", packed)
        self.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        rows = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)
        if self.bits == 8:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.packed_weight, self.scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed_weight, INT4_GROUP_SIZE, self.scales)
        if self.bias is not None:
            out = out + self.bias
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out.split(self.sizes, dim=-1) if self.sizes is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [out, in], bfloat16 scale per row [out]): w ~= codes * scale."""
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(COMPUTE_DTYPE)
    codes = torch.round(weight / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes 0..15 [out, in] as int32, bfloat16 scale per group of 32 inputs [out, in / 32]), the Q4_0 scheme:
    w ~= (codes - 8) * scale with scale = the group's value of largest magnitude / -8."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
    extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True))[..., 0]
    scales = (extreme / -8).to(COMPUTE_DTYPE)
    divisor = torch.where(scales == 0, torch.ones_like(scales), scales).float()[..., None]
    codes = (torch.round(groups / divisor) + 8).clamp(0, 15).to(torch.int32)
    return codes.reshape(out_features, in_features), scales


def pack_int4(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 kernel's layout: codes packed two per byte, and [in / 32, out, 2] (scale, zero) pairs, zero 0
    (the kernel computes (q - 8) * scale + zero)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_and_zeros = torch.stack([scales, torch.zeros_like(scales)], dim=-1).transpose(0, 1).contiguous()
    return packed, scales_and_zeros


def dequantize(layer: QuantizedLinear) -> torch.Tensor:
    """The float32 weight the layer computes with (for tests and quality checks): one identity matmul."""
    eye = torch.eye(layer.in_features)
    out = layer(eye)
    out = torch.cat(out, dim=-1) if isinstance(out, tuple) else out
    bias = layer.bias.float() if layer.bias is not None else 0
    return (out.float() - bias).t().contiguous()


def quantize(model: nn.Module, method: str) -> nn.Module:
    """Fuse, then replace every Linear / fused layer of `model` with a QuantizedLinear, in place. `method`: int8 or
    int4 ("none" returns the model as it is). A MoE router stays float (its top-k choice is sensitive to rounding);
    an int4 layer whose input size is not a multiple of 32 falls back to int8."""
    if method not in QUANTIZATION_CHOICES:
        raise ModelError(f"quantization {method!r} is not supported; choose one of {', '.join(QUANTIZATION_CHOICES)}")
    if method == "none":
        return model
    fuse(model)
    bits = 8 if method == "int8" else 4
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, (nn.Linear, FusedLinear)) or _is_router(parent, name):
                continue
            layer_bits = bits if bits == 8 or child.weight.shape[1] % INT4_GROUP_SIZE == 0 else 8
            setattr(parent, name, QuantizedLinear(child, layer_bits))
    return model


def _is_router(parent: nn.Module, name: str) -> bool:
    return name == "gate" and hasattr(parent, "experts")
