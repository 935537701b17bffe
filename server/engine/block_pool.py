"""The KV block pool, with automatic prefix caching. Plain Python, no torch.

Blocks are fixed-size pages of the KV cache (`block_size` token slots each). A sequence owns a block table; the
pool hands out blocks, counts how many sequences use each, and takes them back.

Prefix caching: a block whose `block_size` tokens are all computed is registered under a key made of its tokens
and the key of the block before it, so two sequences whose token ids agree up to the end of block *i* have the
same key for block *i*. The key is a SHA-256 digest of (the previous block's digest + this block's token ids as
8-byte integers), so nobody can craft two different prefixes with one key and read another request's KV (Python's
`hash()` of token tuples, used before, is not collision-resistant; vLLM made the same move).

A new sequence takes the registered blocks of its longest matching prefix instead of computing them again (shared,
read-only: a sequence only ever writes positions after its matched prefix, which live in its own blocks). When the
last user of a registered block leaves, the block keeps its contents and joins an LRU of cached blocks; fresh
allocations take never-registered free blocks first, then evict the least recently used cached ones.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

BlockKey = bytes  # SHA-256 digest of (previous block's key + this block's token ids)
ROOT_KEY: BlockKey = b""  # the "previous key" of a sequence's first block


def block_key(parent: BlockKey, token_ids: Sequence[int]) -> BlockKey:
    """The prefix-cache key of a block: SHA-256 of the parent block's key and the token ids (int64 bytes)."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


@dataclass(frozen=True)
class PrefixHit:
    """The registered blocks a sequence can start from, and the key of the last of them."""

    blocks: tuple[int, ...]
    last_key: BlockKey = ROOT_KEY

    def __len__(self) -> int:
        return len(self.blocks)


NO_HIT = PrefixHit(())


class BlockPool:
    """Fixed-size KV blocks with reference counts and an LRU of cached, reusable prefix blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._free: set[int] = set(range(num_blocks))  # nothing worth keeping
        self._cached: OrderedDict[int, None] = OrderedDict()  # unused but registered: oldest first
        self._refs: dict[int, int] = {}  # block -> sequences using it (absent: unused)
        self._holders = 0  # sum of self._refs.values()
        self._key_of: dict[int, BlockKey] = {}  # registered block -> its key
        self._block_of: dict[BlockKey, int] = {}  # key -> registered block
        self.hit_tokens_total = 0  # prompt tokens served from cached blocks
        self.query_tokens_total = 0  # prompt tokens looked up

    # ---- counts ------------------------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks a fresh allocation may take: never-registered free blocks plus cached (evictable) ones."""
        return len(self._free) + len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        """Blocks that at least one sequence holds."""
        return len(self._refs)

    @property
    def num_extra_holders(self) -> int:
        """Holds beyond the first on shared blocks: how many blocks a per-sequence count counts twice."""
        return self._holders - len(self._refs)

    @property
    def num_cached(self) -> int:
        """Unused blocks that still hold a registered prefix."""
        return len(self._cached)

    # ---- lookup ------------------------------------------------------------------------------------------------

    def match(self, token_ids: Sequence[int], max_blocks: int) -> PrefixHit:
        """The longest run of registered blocks equal to the first full blocks of `token_ids` (at most
        `max_blocks`). Takes nothing; `allocate` does."""
        if not self.enable_caching:
            return NO_HIT
        bs = self.block_size
        blocks: list[int] = []
        parent = ROOT_KEY
        for i in range(min(max_blocks, len(token_ids) // bs)):
            key = block_key(parent, token_ids[i * bs : (i + 1) * bs])
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
            parent = key
        return PrefixHit(tuple(blocks), parent)

    def can_allocate(self, hit: PrefixHit, num_new: int) -> bool:
        """Whether `allocate(hit, num_new)` would succeed now."""
        reused_from_lru = sum(1 for b in hit.blocks if b in self._cached)
        return num_new <= self.num_free - reused_from_lru

    # ---- taking and giving back ----------------------------------------------------------------------------------

    def allocate(self, hit: PrefixHit, num_new: int) -> list[int]:
        """A block table: the hit's shared blocks, then `num_new` fresh ones (a contiguous run when one exists).

        The caller checked `can_allocate` first.
        """
        if not self.can_allocate(hit, num_new):
            raise RuntimeError(f"asked for {num_new} KV blocks, {self.num_free} free")
        for block in hit.blocks:
            self._cached.pop(block, None)
            self._refs[block] = self._refs.get(block, 0) + 1
        self._holders += len(hit) + num_new
        while len(self._free) < num_new:  # evict the least recently used cached prefixes
            block, _ = self._cached.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
            self._free.add(block)
        fresh = _take_run(self._free, num_new)
        for block in fresh:
            self._refs[block] = 1
        return [*hit.blocks, *fresh]

    def free(self, blocks: Iterable[int]) -> None:
        """A sequence gives its blocks back. Registered ones stay cached (tail blocks are evicted first)."""
        for block in reversed(list(blocks)):
            if block not in self._refs:
                continue
            self._holders -= 1
            refs = self._refs[block] - 1
            if refs > 0:
                self._refs[block] = refs
                continue
            del self._refs[block]
            if block in self._key_of:
                self._cached[block] = None
            else:
                self._free.add(block)

    def register(
        self, block_table: Sequence[int], token_ids: Sequence[int], start: int, end: int, parent_key: BlockKey
    ) -> BlockKey:
        """Register blocks `start..end-1` of a sequence, now fully computed, under their keys.

        `parent_key` is the key of block `start-1` (`ROOT_KEY` for block 0); returns the key of block
        `end-1`. A key that another block already holds (two sequences computed the same prefix at the same
        time) keeps its first block; this sequence's copy stays private and is freed normally.
        """
        if not self.enable_caching:
            return parent_key
        bs = self.block_size
        for i in range(start, end):
            key = block_key(parent_key, token_ids[i * bs : (i + 1) * bs])
            parent_key = key
            if key in self._block_of:
                continue
            block = block_table[i]
            if block in self._key_of:  # already registered (a shared prefix block)
                continue
            self._key_of[block] = key
            self._block_of[key] = block
        return parent_key

    def record_lookup(self, query_tokens: int, hit_tokens: int) -> None:
        """Count one admission's prompt tokens and how many of them came from the cache."""
        self.query_tokens_total += query_tokens
        self.hit_tokens_total += hit_tokens


def _take_run(free: set[int], n: int) -> list[int]:
    """Remove and return `n` blocks from `free`, a run of consecutive ids when one exists (the attention then
    reads a sequence's context as a view instead of gathering it), else the lowest ids."""
    if n == 0:
        return []
    ordered = sorted(free)
    run_start = 0
    blocks = ordered[:n]
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or ordered[i] != ordered[i - 1] + 1:
            if i - run_start >= n:
                blocks = ordered[run_start : run_start + n]
                break
            run_start = i
    free.difference_update(blocks)
    return blocks
