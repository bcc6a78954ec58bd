"""The engine's contiguous KV cache: preallocated static slots, one per running sequence, plus the `attend` hook the
model calls. (engine/paged_cache.py is the paged alternative; `--kv-cache` picks one.)

Layout: per layer one key and one value tensor of shape [num_slots, num_kv_heads, max_len, head_dim]. A sequence
owns one slot for its whole life and writes its token at position p into column p. Static slots (rather than paged
blocks) keep every tensor shape fixed, which is what lets a decode step be captured once as a CUDA graph and replayed:
a decode batch is simply the first `bs` slots, so the graph reads a view of the cache and gathers nothing.

`CacheView` is the object passed to the model as `kv_cache=`: it binds the cache to one forward pass (which slots,
from which position, how much history to read) and implements `attend(layer_idx, q, k, v)`.

Both caches offer the scheduler the same bookkeeping: `can_admit(seq)`, `admit(seq)` (returns how many prompt tokens
are already cached), `grow(seq, num_tokens)` (back the first num_tokens positions), `free(seq)`.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from engine.sequence import Sequence


class KVCache:
    """Preallocated keys/values for `num_slots` sequences of up to `max_len` tokens, with a free-slot pool.

    Free slots are handed out lowest first, so the running batch stays packed at the front of the cache and the
    decode step (which runs over slots 0..bs-1) wastes as little work as possible on free slots.
    """

    paged = False
    prefix_cache_queries = prefix_cache_hits = 0  # no prefix caching in this layout

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        # One spare position is allocated: every history slice [:, :, :n] is then a strided view, the whole cache
        # included, so a compiled step does not specialise (and compile again) on n == max_len; and padded prefill
        # rows write their padding there.
        shape = (num_slots, num_kv_heads, max_len + 1, head_dim)
        self.k_full = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_full = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.k = [k[:, :, :max_len] for k in self.k_full]
        self.v = [v[:, :, :max_len] for v in self.v_full]
        self.num_slots = num_slots
        self.max_len = max_len
        self._free = list(range(num_slots))
        heapq.heapify(self._free)

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_slots: int, max_len: int, device: torch.device) -> KVCache:
        """A cache shaped for `model` (its config's layers, kv heads and head size; its parameters' dtype)."""
        cfg = model.config
        dtype = next(model.parameters()).dtype
        return cls(cfg.num_hidden_layers, num_slots, cfg.num_key_value_heads, cfg.head_dim, max_len, dtype, device)

    @staticmethod
    def bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype) -> int:
        """Memory one slot takes (keys and values of all layers), used to size the cache to a memory budget."""
        return 2 * num_layers * num_kv_heads * head_dim * max_len * torch.empty((), dtype=dtype).element_size()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_slots

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV-cache slot (the scheduler admits only while slots are free)")
        return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    # ---- the scheduler's bookkeeping (shared with PagedKVCache) -----------------------------------------------------

    def can_admit(self, seq: Sequence) -> bool:
        return bool(self._free)

    def admit(self, seq: Sequence) -> int:
        """Give the sequence a slot; returns the prompt tokens already cached (none: this layout shares nothing)."""
        seq.slot = self.allocate()
        return 0

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """A slot backs every position from the start."""

    def computed(self, seq: Sequence) -> None:
        """Nothing to cache for later prompts."""

    def free(self, seq: Sequence) -> None:
        self.release(seq.slot)

    def view(self, slots, start, kv_len, fresh=False, masked=True, lengths=None) -> CacheView:
        return CacheView(self, slots, start, kv_len, fresh, masked, lengths)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of one slot to another (n > 1 completions share one prefill)."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length].copy_(k[src, :, :length])
            v[dst, :, :length].copy_(v[src, :, :length])


class CacheView:
    """One forward pass's binding to the cache; passed to the model as `kv_cache`.

    - `slots`: [B] slot of each batch row, or None when row i is slot i (the decode step; no gather needed).
    - `start`: [B] position of each row's first new token.
    - `kv_len`: how many cached positions to read (a bucket >= every row's last position + 1).
    - `fresh`: all rows start at 0 and have no history, so attention runs over the new keys alone (prefill).
    - `masked`: False when every row may see all `kv_len` positions (one new token per row, all rows at the same
      position: batch-1 decode), so attention runs without a mask (a faster kernel, and no mask to build).
    - `lengths`: [B] new tokens of each row that are real (a padded prefill batch); the padding's keys are written
      where no row reads them, so rows starting at different positions can share one batch.

    Subclasses change where keys live through `_write_index`, `_store` and `_history`; the attention is shared.
    """

    def __init__(
        self,
        cache,
        slots: torch.Tensor | None,
        start: torch.Tensor,
        kv_len: int,
        fresh: bool = False,
        masked: bool = True,
        lengths: torch.Tensor | None = None,
    ) -> None:
        self.cache, self.slots, self.start, self.kv_len, self.fresh = cache, slots, start, kv_len, fresh
        self.masked, self.lengths = masked, lengths
        self._rows: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    def _prepare(self, batch: int, new_tokens: int, groups: int, device: torch.device) -> None:
        """Write indices and the attention mask, built once per forward and shared by all layers."""
        steps = torch.arange(new_tokens, device=device)
        pos = self.start[:, None] + steps  # [B, T] absolute positions of the new tokens
        rows = self.slots if self.slots is not None else torch.arange(batch, device=device)
        self._rows = rows[:, None].expand(batch, new_tokens)
        padding = None if self.lengths is None else steps[None, :] >= self.lengths[:, None]
        self._write_index(pos, padding)
        if self.masked and not self.fresh:
            key_pos = torch.arange(self.kv_len, device=device)
            visible = key_pos <= pos[:, :, None]  # [B, T, L]
            # Query rows are laid out (group, token) per kv head, see attend(); the mask repeats per group.
            self._mask = (
                visible[:, None]
                .expand(batch, groups, new_tokens, self.kv_len)
                .reshape(batch, 1, groups * new_tokens, self.kv_len)
            )

    def _write_index(self, pos: torch.Tensor, padding: torch.Tensor | None) -> None:
        # Padding goes to the spare column past max_len, which no history slice includes.
        self._pos = pos if padding is None else pos.masked_fill(padding, self.cache.max_len)
        self._padded = padding is not None

    def _store(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # Only a padded prefill (eager) writes through the full tensors; the compiled step keeps writing the views
        # it always wrote (inductor's freezing pass failed on the other form).
        keys, values = (self.cache.k_full, self.cache.v_full) if self._padded else (self.cache.k, self.cache.v)
        keys[layer_idx][self._rows, :, self._pos] = k.transpose(1, 2)
        values[layer_idx][self._rows, :, self._pos] = v.transpose(1, 2)

    def _history(self, layer_idx: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, Hkv, kv_len, D] of the rows' first kv_len positions."""
        k_cache, v_cache = self.cache.k[layer_idx], self.cache.v[layer_idx]
        if self.slots is None:
            return k_cache[:batch, :, : self.kv_len], v_cache[:batch, :, : self.kv_len]
        # narrow first, then gather rows: advanced indexing k[slots, :, :n] is several times slower on CPU
        keys = k_cache[:, :, : self.kv_len].index_select(0, self.slots)
        return keys, v_cache[:, :, : self.kv_len].index_select(0, self.slots)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k/v [B, Hkv, T, D] at their positions, then attend q [B, Hq, T, D] to everything visible."""
        batch, kv_heads, new_tokens, head_dim = k.shape
        groups = q.shape[1] // kv_heads
        if self._rows is None:
            self._prepare(batch, new_tokens, groups, q.device)
        self._store(layer_idx, k, v)
        if self.fresh:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        keys, values = self._history(layer_idx, batch)
        # Grouped-query attention without repeating keys: the `groups` query heads sharing one kv head become
        # extra query rows, so SDPA sees plain multi-head attention with a mask (its efficient kernel on GPU).
        q_rows = q.reshape(batch, kv_heads, groups * new_tokens, head_dim)
        if (
            torch.compiler.is_compiling()
            and q.device.type == "cpu"
            and groups * new_tokens <= 16
            and self._mask is not None
        ):
            out = _few_query_attention(q_rows, keys, values, self._mask)
        else:
            out = F.scaled_dot_product_attention(q_rows, keys, values, attn_mask=self._mask)
        return out.reshape(batch, kv_heads * groups, new_tokens, head_dim)


def _few_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), masked) v as two matmuls, for the CPU's compiled decode steps: with a handful of query
    rows the flash kernel's tiling is pure overhead (44 us a call on SmolLM2-135M's shapes, 2 cores), and inductor
    fuses the scale, mask and softmax between the matmuls (eager, the one SDPA call stays cheaper)."""
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    scores = scores.float().masked_fill(~visible, float("-inf")).softmax(dim=-1).to(v.dtype)
    return scores @ v
