"""The engine's KV cache: preallocated static slots, one per running sequence, plus the `attend` hook the model calls.

Layout: per layer one key and one value tensor of shape [num_slots, num_kv_heads, max_len, head_dim]. A sequence
owns one slot for its whole life and writes its token at position p into column p. Static slots (rather than paged
blocks) keep every tensor shape fixed, which is what lets a decode step be captured once as a CUDA graph and replayed:
a decode batch is simply the first `bs` slots, so the graph reads a view of the cache and gathers nothing.

`CacheView` is the object passed to the model as `kv_cache=`: it binds the cache to one forward pass (which slots,
from which position, how much history to read) and implements `attend(layer_idx, q, k, v)`.
"""

from __future__ import annotations

import heapq

import torch
import torch.nn.functional as F


class KVCache:
    """Preallocated keys/values for `num_slots` sequences of up to `max_len` tokens, with a free-slot pool.

    Free slots are handed out lowest first, so the running batch stays packed at the front of the cache and the
    decode step (which runs over slots 0..bs-1) wastes as little work as possible on free slots.
    """

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
        # One spare position is allocated and never used: every history slice [:, :, :n] is then a strided view,
        # the whole cache included, so a compiled step does not specialise (and compile again) on n == max_len.
        shape = (num_slots, num_kv_heads, max_len + 1, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device)[:, :, :max_len] for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device)[:, :, :max_len] for _ in range(num_layers)]
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
    """

    def __init__(
        self,
        cache: KVCache,
        slots: torch.Tensor | None,
        start: torch.Tensor,
        kv_len: int,
        fresh: bool = False,
        masked: bool = True,
    ) -> None:
        self.cache, self.slots, self.start, self.kv_len, self.fresh = cache, slots, start, kv_len, fresh
        self.masked = masked
        self._rows: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    def _prepare(self, batch: int, new_tokens: int, groups: int, device: torch.device) -> None:
        """Write indices and the attention mask, built once per forward and shared by all layers."""
        steps = torch.arange(new_tokens, device=device)
        self._pos = self.start[:, None] + steps  # [B, T] absolute positions of the new tokens
        rows = self.slots if self.slots is not None else torch.arange(batch, device=device)
        self._rows = rows[:, None].expand(batch, new_tokens)
        if self.masked and not self.fresh:
            key_pos = torch.arange(self.kv_len, device=device)
            visible = key_pos <= self._pos[:, :, None]  # [B, T, L]
            # Query rows are laid out (group, token) per kv head, see attend(); the mask repeats per group.
            self._mask = (
                visible[:, None]
                .expand(batch, groups, new_tokens, self.kv_len)
                .reshape(batch, 1, groups * new_tokens, self.kv_len)
            )

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k/v [B, Hkv, T, D] at their positions, then attend q [B, Hq, T, D] to everything visible."""
        batch, kv_heads, new_tokens, head_dim = k.shape
        groups = q.shape[1] // kv_heads
        if self._rows is None:
            self._prepare(batch, new_tokens, groups, q.device)
        k_cache, v_cache = self.cache.k[layer_idx], self.cache.v[layer_idx]
        k_cache[self._rows, :, self._pos] = k.transpose(1, 2)
        v_cache[self._rows, :, self._pos] = v.transpose(1, 2)
        if self.fresh:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if self.slots is None:
            keys, values = k_cache[:batch, :, : self.kv_len], v_cache[:batch, :, : self.kv_len]
        else:  # narrow first, then gather rows: advanced indexing k[slots, :, :n] is several times slower on CPU
            keys = k_cache[:, :, : self.kv_len].index_select(0, self.slots)
            values = v_cache[:, :, : self.kv_len].index_select(0, self.slots)
        # Grouped-query attention without repeating keys: the `groups` query heads sharing one kv head become
        # extra query rows, so SDPA sees plain multi-head attention with a mask (its efficient kernel on GPU).
        q_rows = q.reshape(batch, kv_heads, groups * new_tokens, head_dim)
        out = F.scaled_dot_product_attention(q_rows, keys, values, attn_mask=self._mask)
        return out.reshape(batch, kv_heads * groups, new_tokens, head_dim)
