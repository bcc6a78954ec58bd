"""The paged KV cache's block pool: reference-counted blocks, a least-recently-freed queue, and prefix caching.

A block holds the keys/values of `block_size` consecutive positions of one sequence. Once a block is full and its
tokens are final, it is registered under a hash of (the previous block's hash, its token ids), so the hash names the
whole prefix up to the block's end. A later prompt with the same prefix finds the same hashes and shares those
blocks instead of computing them again (vLLM's v1 KVCacheManager / BlockPool work the same way).

A freed block keeps its keys and its hash: it goes to the end of the free queue and stays findable until it is taken
for new tokens (least recently freed first), so chat history that clients re-send every turn is usually still there.
Block 0 is never handed out: block tables point unused entries at it, and padded rows write their junk into it.
"""

from __future__ import annotations

from collections import OrderedDict

NULL_BLOCK = 0


def block_hashes(token_ids: list[int], block_size: int, parent: int | None = None, start: int = 0) -> list[int]:
    """Hashes of the full blocks of `token_ids[start:]` (start is a block boundary), chained from `parent`.

    Python's hash of a tuple of ints is deterministic across runs (only str/bytes hashing is salted), so equal
    prefixes always get equal hashes; a collision needs two different 64-bit chains to meet."""
    hashes = []
    for begin in range(start, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[begin : begin + block_size])))
        hashes.append(parent)
    return hashes


class BlockPool:
    """`num_blocks` blocks (block 0 reserved as the null block); counts prefix-cache queries and hits in tokens."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks, self.block_size, self.enable_caching = num_blocks, block_size, enable_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block holding it
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))  # oldest first
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of those, tokens found cached

    @property
    def num_free(self) -> int:
        """Blocks that can be taken now (free blocks still holding a cached prefix included)."""
        return len(self.free)

    @property
    def capacity(self) -> int:
        return self.num_blocks - 1

    def lookup(self, hashes: list[int]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (no reference taken)."""
        blocks = []
        if self.enable_caching:
            for h in hashes:
                block = self.cached.get(h)
                if block is None:
                    break
                blocks.append(block)
        return blocks

    def share(self, block: int) -> None:
        """Take a reference to a cached block (out of the free queue if nobody held it)."""
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def take(self) -> int:
        """A fresh block for new tokens: the least recently freed one, its cached prefix (if any) forgotten."""
        if not self.free:
            raise RuntimeError("the KV block pool is empty (admission reserves blocks, so this is a bug)")
        block, _ = self.free.popitem(last=False)
        old = self.hash_of[block]
        if old is not None:
            self.hash_of[block] = None
            if self.cached.get(old) == block:
                del self.cached[old]
        self.ref_count[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        """Drop one reference from each block; a block nobody holds goes to the free queue. Given a sequence's
        blocks in order, the tail is queued first so that it is evicted before the prefix other prompts share."""
        for block in reversed(blocks):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None

    def register(self, block: int, block_hash: int) -> None:
        """Make a full block findable under its hash (a block whose prefix is already cached elsewhere is not)."""
        if self.enable_caching and self.hash_of[block] is None and block_hash not in self.cached:
            self.cached[block_hash] = block
            self.hash_of[block] = block_hash
