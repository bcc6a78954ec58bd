"""The paged KV cache: keys/values in fixed-size blocks from a shared pool, found through per-sequence block tables.

Layout: per layer one key and one value tensor [num_blocks, block_size, num_kv_heads, head_dim]. Each running
sequence has a row (its "slot") in `tables` [num_slots, max_blocks + 1]: entry j is the block holding positions
j*block_size .. (j+1)*block_size - 1; unused entries, and the extra last column, point at the null block 0.

Why it is worth the gather: memory follows the tokens a sequence actually has, not max_model_len, so many more
sequences fit; and full blocks are shared between prompts with the same prefix (engine/block_pool.py).

Shapes stay static for CUDA graphs and torch.compile: the table is one persistent tensor updated in place, a decode
step reads rows 0..B-1 of it, and attention gathers the first ceil(kv_len / block_size) blocks of each row into a
contiguous [B, Hkv, kv_len, D] history (index_select, which compiles to one gather kernel) and masks by position.

Admission reserves a sequence's worst case (prompt + max_tokens, in blocks) so a running sequence never runs out and
nothing has to be preempted; blocks are still only taken from the pool as positions are reached, and reserved but
untaken blocks keep their cached prefixes until taken.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

import torch

from engine.block_pool import NULL_BLOCK, BlockPool, block_hashes
from engine.kv_cache import CacheView

if TYPE_CHECKING:
    from engine.sequence import Sequence

BLOCK_SIZE = 16  # positions per block, as vLLM's default on GPU


class BlockTables:
    """Which blocks each slot's sequence holds, in the pool and on the device; shared by a target model's cache
    and its draft model's (both store the same positions of the same sequences)."""

    def __init__(
        self,
        num_slots: int,
        max_len: int,
        num_blocks: int,
        device: torch.device | str,
        block_size: int = BLOCK_SIZE,
        enable_prefix_caching: bool = True,
        lookahead: int = 0,
    ) -> None:
        self.block_size = block_size
        self.max_blocks = -(-max_len // block_size)
        self.lookahead = lookahead  # positions past the last token a step may write (speculative verification)
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.tables = torch.zeros(num_slots, self.max_blocks + 1, dtype=torch.long, device=device)
        self.blocks: list[list[int]] = [[] for _ in range(num_slots)]
        self.hashes: list[list[int]] = [[] for _ in range(num_slots)]  # hashes of the slot's registered blocks
        self.reserved = [0] * num_slots  # blocks each slot may still take
        self.outstanding = 0  # sum of reserved: pool blocks promised to running sequences
        self._free_slots = list(range(num_slots))

    def _worst_case(self, seq: Sequence) -> int:
        wanted = seq.max_total_len if seq.params.max_tokens is None else seq.num_prompt_tokens + seq.params.max_tokens
        return -(-(min(wanted, seq.max_total_len) + self.lookahead) // self.block_size)

    def _prompt_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks of the prompt's prefix. The last prompt token is always computed (its logits start the
        output), so only blocks wholly before it count; prompts whose keys depend on more than their token ids
        (images) or that want logprobs of every prompt position share nothing."""
        if seq.images is not None or seq.params.prompt_logprobs is not None or not self.pool.enable_caching:
            return []
        if seq.block_hashes is None:
            seq.block_hashes = block_hashes(seq.prompt_token_ids[:-1], self.block_size)
        return self.pool.lookup(seq.block_hashes)

    def can_admit(self, seq: Sequence) -> bool:
        if not self._free_slots:
            return False
        hits = self._prompt_hits(seq)
        taken_from_free = sum(1 for b in hits if self.pool.ref_count[b] == 0)
        return self._worst_case(seq) - len(hits) + taken_from_free <= self.pool.num_free - self.outstanding

    def admit(self, seq: Sequence) -> int:
        seq.slot = slot = heapq.heappop(self._free_slots)
        hits = self._prompt_hits(seq)
        for block in hits:
            self.pool.share(block)
        self.blocks[slot] = list(hits)
        self.hashes[slot] = list(seq.block_hashes[: len(hits)]) if hits else []
        self.reserved[slot] = self._worst_case(seq) - len(hits)
        self.outstanding += self.reserved[slot]
        if self.pool.enable_caching and seq.images is None and seq.params.prompt_logprobs is None:  # a lookup
            self.pool.queries += seq.num_prompt_tokens
            self.pool.hits += len(hits) * self.block_size
        if hits:
            self._write_row(slot, 0, hits)
        return len(hits) * self.block_size

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Take blocks so that positions < num_tokens (+ the lookahead a step may write) are backed."""
        slot, have = seq.slot, self.blocks[seq.slot]
        need = min(-(-(num_tokens + self.lookahead) // self.block_size), self.max_blocks)
        if need <= len(have):
            return
        new = [self.pool.take() for _ in range(need - len(have))]
        taken = min(len(new), self.reserved[slot])
        self.reserved[slot] -= taken
        self.outstanding -= taken
        self._write_row(slot, len(have), new)
        have.extend(new)

    def _write_row(self, slot: int, first: int, blocks: list[int]) -> None:
        # Queued like the runner's input buffers (non_blocking): a blocking copy would make the host wait for the
        # device at every new block and stall the pipelined decode loop.
        self.tables[slot, first : first + len(blocks)].copy_(torch.tensor(blocks), non_blocking=True)

    def computed(self, seq: Sequence, token_ids: list[int] | None = None, num_computed: int | None = None) -> None:
        """Register the blocks whose every position now holds final keys (of `token_ids`, default the prompt),
        so later prompts can share them."""
        if seq.images is not None or not self.pool.enable_caching:
            return
        tokens = seq.prompt_token_ids if token_ids is None else token_ids
        done = seq.num_computed_tokens if num_computed is None else num_computed
        slot, hashes = seq.slot, self.hashes[seq.slot]
        full = min(done, len(tokens)) // self.block_size
        if full <= len(hashes):
            return
        parent = hashes[-1] if hashes else None
        new = block_hashes(tokens[: full * self.block_size], self.block_size, parent, len(hashes) * self.block_size)
        for i, h in enumerate(new, start=len(hashes)):
            self.pool.register(self.blocks[slot][i], h)
        hashes.extend(new)

    def free(self, seq: Sequence) -> None:
        """Return the sequence's blocks; those of its final tokens (prompt and output, all but the last token,
        whose keys were never written) stay cached for a follow-up turn that re-sends them."""
        slot = seq.slot
        final = seq.num_tokens - 1 if seq.is_prefilled else seq.num_computed_tokens
        self.computed(seq, seq.prompt_token_ids + seq.output_token_ids, final)
        self.pool.release(self.blocks[slot])
        self.outstanding -= self.reserved[slot]
        self.reserved[slot] = 0
        self.blocks[slot], self.hashes[slot] = [], []
        self.tables[slot].fill_(NULL_BLOCK)  # a freed row is written by padded graph steps: point it at the null block
        heapq.heappush(self._free_slots, slot)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)


class PagedKVCache:
    """One model's key/value blocks, addressed through shared `BlockTables` (the target's; a draft model's cache
    is built with the target's tables so a slot and a block id mean the same in both)."""

    paged = True

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        tables: BlockTables,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.tables = tables
        self.block_size = tables.block_size
        shape = (tables.pool.num_blocks, tables.block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = tables.tables.shape[0]
        self.max_len = tables.max_blocks * tables.block_size

    @classmethod
    def for_model(cls, model: torch.nn.Module, tables: BlockTables, device: torch.device) -> PagedKVCache:
        cfg = model.config
        dtype = next(model.parameters()).dtype
        return cls(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, tables, dtype, device)

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Memory one block takes (keys and values of all layers), used to size the pool to a memory budget."""
        return 2 * num_layers * num_kv_heads * head_dim * BLOCK_SIZE * torch.empty((), dtype=dtype).element_size()

    # ---- the scheduler's bookkeeping (the same calls as KVCache's) --------------------------------------------------

    @property
    def num_free(self) -> int:
        """Free slots (sequences that could still be admitted if their blocks fit)."""
        return self.tables.num_free_slots

    @property
    def usage(self) -> float:
        pool = self.tables.pool
        return 1.0 - pool.num_free / pool.capacity

    @property
    def prefix_cache_queries(self) -> int:
        return self.tables.pool.queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.tables.pool.hits

    def can_admit(self, seq: Sequence) -> bool:
        return self.tables.can_admit(seq)

    def admit(self, seq: Sequence) -> int:
        return self.tables.admit(seq)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        self.tables.grow(seq, num_tokens)

    def computed(self, seq: Sequence) -> None:
        self.tables.computed(seq)

    def free(self, seq: Sequence) -> None:
        self.tables.free(seq)

    def view(self, slots, start, kv_len, fresh=False, masked=True, lengths=None) -> PagedCacheView:
        return PagedCacheView(self, slots, start, kv_len, fresh, masked, lengths)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the blocks of positions < length from one slot's sequence to another's (n > 1 completions)."""
        count = -(-length // self.block_size)
        src_blocks = self.tables.tables[src, :count]
        dst_blocks = self.tables.tables[dst, :count]
        for k, v in zip(self.k, self.v):
            k[dst_blocks] = k[src_blocks]
            v[dst_blocks] = v[src_blocks]


class PagedCacheView(CacheView):
    """`CacheView` over blocks: new keys go to (block, offset) of their position; history is gathered per row."""

    def _write_index(self, pos: torch.Tensor, padding: torch.Tensor | None) -> None:
        tables = self.cache.tables
        size = tables.block_size
        rows = self._rows[:, 0]
        table = tables.tables[: rows.shape[0]] if self.slots is None else tables.tables.index_select(0, rows)
        self._table = table
        # Positions past the table (padding) land in the last column, which is always the null block.
        blocks = table.gather(1, (pos // size).clamp(max=tables.max_blocks))
        if padding is not None:
            blocks = blocks.masked_fill(padding, NULL_BLOCK)
        self._blocks, self._offsets = blocks, pos % size

    def _store(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.k[layer_idx][self._blocks, self._offsets] = k.transpose(1, 2)
        self.cache.v[layer_idx][self._blocks, self._offsets] = v.transpose(1, 2)

    def _history(self, layer_idx: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.cache.block_size
        count = (self.kv_len + size - 1) // size
        ids = self._table[:, :count].reshape(-1)
        shape = (batch, count * size, *self.cache.k[layer_idx].shape[2:])
        keys = self.cache.k[layer_idx].index_select(0, ids).view(shape)[:, : self.kv_len].transpose(1, 2)
        values = self.cache.v[layer_idx].index_select(0, ids).view(shape)[:, : self.kv_len].transpose(1, 2)
        return keys, values
