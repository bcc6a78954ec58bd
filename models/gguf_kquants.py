"""llama.cpp's Q4_K_M file type, written directly: the Q4_K and Q6_K block quantizers and llama-quantize's choice
of type per tensor.

The `gguf` package computes Q8_0, Q4_0, Q5_0 and the like but not the K-quants, so these two are ours: ports of
ggml's reference quantizers (`quantize_row_q4_K_ref`, `quantize_row_q6_K_ref` in ggml-quants.c, which is what
llama-quantize runs when it has no importance matrix), vectorised over blocks with numpy. Every operation is
float32 in ggml's order (sums are sequential: `np.add.accumulate`, not numpy's pairwise `sum`), so the bytes equal
ggml's; tests/test_gguf_llama_cpp.py compares them with ggml's own quantizer.

Blocks hold 256 values. Q4_K: 8 groups of 32, 4-bit codes, a 6-bit scale and a 6-bit minimum per group, two
float16 super-scales (144 bytes). Q6_K: 16 groups of 16, 6-bit signed codes, an int8 scale per group, one float16
super-scale (210 bytes).
"""

from __future__ import annotations

import re

import numpy as np

F32 = np.float32
QK_K = 256
GROUP_MAX_EPS = F32(1e-15)


def _nearest_int(values: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even, as adding 1.5 * 2**23 in float32 does."""
    return np.rint(values).astype(np.int32)


def _seq_sum(values: np.ndarray) -> np.ndarray:
    """Sum along the last axis one element after another in float32, as ggml's loops do."""
    return np.add.accumulate(values.astype(F32), axis=-1, dtype=F32)[..., -1]


def _fp16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16)


def _make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int = 15) -> tuple[np.ndarray, ...]:
    """ggml's make_qkx2_quants(n=32, nmax=15, rmin=-1, rdelta=0.1, nstep=20, use_mad=false) for each row of x:
    an affine grid (scale, min) searched over 21 candidate scales by weighted least squares. Returns
    (codes, scale, -min)."""
    lo = np.minimum(x.min(axis=-1), F32(0))
    hi = x.max(axis=-1)
    sum_w = _seq_sum(weights)
    sum_x = _seq_sum(weights * x)
    flat = hi == lo
    span = np.where(flat, F32(1), hi - lo).astype(F32)
    iscale = (F32(nmax) / span).astype(F32)
    scale = (F32(1) / iscale).astype(F32)
    codes = np.clip(_nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)
    diff = scale[:, None] * codes.astype(F32) + lo[:, None] - x
    best = _seq_sum(weights * (diff * diff))
    best_min = lo.copy()
    for step in range(21):
        # ggml moves `min` to each better fit's, and later candidates are measured from there
        span = np.where(flat, F32(1), hi - best_min).astype(F32)
        iscale = ((F32(-1) + F32(0.1) * F32(step) + F32(nmax)) / span).astype(F32)
        aux = np.clip(_nearest_int(iscale[:, None] * (x - best_min[:, None])), 0, nmax)
        levels = aux.astype(F32)
        sum_l = _seq_sum(weights * levels)
        sum_l2 = _seq_sum(weights * levels * levels)
        sum_xl = _seq_sum(weights * levels * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = np.where(ok, det, F32(1))
        this_scale = ((sum_w * sum_xl - sum_x * sum_l) / safe).astype(F32)
        this_min = ((sum_l2 * sum_x - sum_l * sum_xl) / safe).astype(F32)
        positive = this_min > 0
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 == 0, F32(1), sum_l2), this_scale).astype(F32)
        this_min = np.where(positive, F32(0), this_min).astype(F32)
        diff = this_scale[:, None] * levels + this_min[:, None] - x
        error = _seq_sum(weights * (diff * diff))
        better = ok & (error < best) & ~flat
        codes = np.where(better[:, None], aux, codes)
        best = np.where(better, error, best)
        scale = np.where(better, this_scale, scale)
        best_min = np.where(better, this_min, best_min)
    codes = np.where(flat[:, None], 0, codes)
    scale = np.where(flat, F32(0), scale).astype(F32)
    return codes, scale, (-best_min).astype(F32)


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """Rows of float32 (length a multiple of 256) as Q4_K blocks: uint8 array of shape (..., row_len // 256 * 144)."""
    shape = rows.shape
    x = np.ascontiguousarray(rows, dtype=F32).reshape(-1, 8, 32)
    blocks = x.shape[0]
    groups = x.reshape(-1, 32)
    av_x = np.sqrt(_seq_sum(groups * groups) / F32(32)).astype(F32)
    weights = (av_x[:, None] + np.abs(groups)).astype(F32)
    codes, scales, mins = _make_qkx2_quants(groups, weights)
    codes, scales, mins = codes.reshape(blocks, 8, 32), scales.reshape(blocks, 8), mins.reshape(blocks, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0)).astype(F32)
    inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0)).astype(F32)
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    packed = np.zeros((blocks, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    d = _fp16(max_scale / F32(63))
    dmin = _fp16(max_min / F32(63))
    step = (d.astype(F32)[:, None] * ls.astype(F32)).astype(F32)
    shift = (dmin.astype(F32)[:, None] * lm.astype(F32)).astype(F32)
    nonzero = step != 0
    safe = np.where(nonzero, step, F32(1))
    again = np.clip(_nearest_int((x + shift[:, :, None]) / safe[:, :, None]), 0, 15)
    codes = np.where(nonzero[:, :, None], again, codes).astype(np.uint8).reshape(blocks, 4, 2, 32)
    qs = (codes[:, :, 0, :] | (codes[:, :, 1, :] << 4)).reshape(blocks, 128)
    out = np.concatenate([d.view(np.uint8).reshape(blocks, 2), dmin.view(np.uint8).reshape(blocks, 2), packed, qs], 1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 144)


def _make_qx_quants(x: np.ndarray, nmax: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants(n=16, nmax=32, rmse_type=1, no weights) for each row: a symmetric grid from the value
    of largest magnitude, refined over 18 nearby scales by x^2-weighted least squares. Returns (codes + nmax, scale)."""
    first = np.abs(x).argmax(axis=-1)
    peak = np.take_along_axis(x, first[:, None], axis=-1)[:, 0]
    empty = np.abs(peak) < GROUP_MAX_EPS
    safe_peak = np.where(empty, F32(1), peak).astype(F32)
    weights = (x * x).astype(F32)

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        levels = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        as_float = levels.astype(F32)
        return levels, _seq_sum(weights * x * as_float), _seq_sum(weights * as_float * as_float)

    codes, sumlx, suml2 = fit((F32(-nmax) / safe_peak).astype(F32))
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F32(1)), F32(0)).astype(F32)
    best = (scale * sumlx).astype(F32)
    for step in [s for s in range(-9, 10) if s != 0]:
        levels, sumlx, suml2 = fit((-(F32(nmax) + F32(0.1) * F32(step)) / safe_peak).astype(F32))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        codes = np.where(better[:, None], levels, codes)
        scale = np.where(better, sumlx / np.where(suml2 > 0, suml2, F32(1)), scale).astype(F32)
        best = np.where(better, scale * sumlx, best).astype(F32)
    codes = np.where(empty[:, None], -nmax, codes)
    return codes + nmax, np.where(empty, F32(0), scale).astype(F32)


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    """Rows of float32 (length a multiple of 256) as Q6_K blocks: uint8 array of shape (..., row_len // 256 * 210)."""
    shape = rows.shape
    x = np.ascontiguousarray(rows, dtype=F32).reshape(-1, 16, 16)
    blocks = x.shape[0]
    codes, scales = _make_qx_quants(x.reshape(-1, 16))
    codes, scales = codes.reshape(blocks, 16, 16), scales.reshape(blocks, 16)
    first = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, first[:, None], axis=1)[:, 0]
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = (F32(-128) / np.where(empty, F32(1), max_scale)).astype(F32)
    d = _fp16(F32(1) / iscale)
    group_scales = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
    step = (d.astype(F32)[:, None] * group_scales.astype(F32)).astype(F32)
    nonzero = step != 0
    again = np.clip(_nearest_int(x / np.where(nonzero, step, F32(1))[:, :, None]), -32, 31) + 32
    codes = np.where(nonzero[:, :, None], again, codes).astype(np.uint8).reshape(blocks, 2, 4, 32)
    ql = np.concatenate(
        [codes[:, :, 0] & 0xF | ((codes[:, :, 2] & 0xF) << 4), codes[:, :, 1] & 0xF | ((codes[:, :, 3] & 0xF) << 4)],
        axis=2,
    ).reshape(blocks, 128)
    qh = (
        (codes[:, :, 0] >> 4)
        | ((codes[:, :, 1] >> 4) << 2)
        | ((codes[:, :, 2] >> 4) << 4)
        | ((codes[:, :, 3] >> 4) << 6)
    ).reshape(blocks, 64)
    out = np.concatenate([ql, qh, group_scales.view(np.uint8), d.view(np.uint8).reshape(blocks, 2)], axis=1)
    out[empty] = 0
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 210)


def _use_more_bits(layer: int, layers: int) -> bool:
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def q4_k_m_type(name: str, row_length: int, n_layers: int, tied_embeddings: bool) -> str:
    """The type llama-quantize gives a 2-D tensor in a Q4_K_M file (llama-quant.cpp, no importance matrix):
    Q4_K, with Q6_K for the output head (tied embeddings included) and for attn_v and ffn_down in the layers
    `use_more_bits` picks; a row length that is not a multiple of 256 falls back to Q5_0 (Q4_K) or Q8_0 (Q6_K),
    and one not a multiple of 32 to F16. (MoE routers never get here: the writer keeps them F32.)
    The extra bits llama-quantize gives 8-expert models' attention are not applied."""
    match = re.match(r"blk\.(\d+)\.", name)
    layer = int(match.group(1)) if match else -1
    if name == "output.weight" or (tied_embeddings and name == "token_embd.weight"):
        wanted = "Q8_0" if row_length % QK_K else "Q6_K"
    elif ".attn_v." in name and _use_more_bits(layer, n_layers):
        wanted = "Q6_K"
    elif ".ffn_down" in name and _use_more_bits(layer, n_layers):
        wanted = "Q6_K"
    else:
        wanted = "Q4_K"
    if wanted in ("Q4_K", "Q6_K") and row_length % QK_K:
        wanted = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}[wanted]
    return "F16" if row_length % 32 else wanted
