"""A paged KV cache with a prefix cache: blocks of 16 tokens, hash chains, LRU eviction.

Like vLLM's: a full prompt block is named by a hash of its tokens chained with the
previous block's hash, so equal hashes mean equal prefixes. A block is either free
(uncached), in use (reference count > 0), or cached and free (count 0, evictable).
New allocations take uncached free blocks first, then evict the least recently freed
cached block. Requests free their blocks tail first, so a prefix outlives its tails.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

BLOCK_SIZE = 16


def block_hashes(token_ids: Sequence[int], block_size: int = BLOCK_SIZE) -> tuple[int, ...]:
    """Hash chain over the full blocks of ``token_ids`` (a partial last block has no hash)."""
    out: list[int] = []
    parent = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start : start + block_size])))
        out.append(parent)
    return tuple(out)


class KVCache:
    """Block accounting for one engine; counts blocks, never stores tensors."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free_uncached = num_blocks
        #: Cached blocks with no user, least recently freed first.
        self.evictable: OrderedDict[int, None] = OrderedDict()
        #: Reference count of every cached block (0 while evictable).
        self.refs: dict[int, int] = {}
        self.evictions = 0

    def lookup(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` are cached."""
        n = 0
        for h in hashes:
            if h not in self.refs:
                break
            n += 1
        return n

    def available(self, hits: Sequence[int]) -> int:
        """Blocks a request that reuses ``hits`` could still get."""
        reused_evictable = sum(1 for h in hits if self.refs[h] == 0)
        return self.free_uncached + len(self.evictable) - reused_evictable

    def allocate(self, hits: Sequence[int], new_blocks: int) -> None:
        """Take a reference on the ``hits`` blocks and ``new_blocks`` fresh ones."""
        for h in hits:
            if self.refs[h] == 0:
                del self.evictable[h]
            self.refs[h] += 1
        for _ in range(new_blocks):
            if self.free_uncached:
                self.free_uncached -= 1
            else:
                victim, _ = self.evictable.popitem(last=False)
                del self.refs[victim]
                self.evictions += 1

    def register(self, h: int) -> bool:
        """Name one of a request's fresh blocks ``h`` (now computed); False if already cached."""
        if h in self.refs:
            # Another request computed the same block first: this copy stays private.
            return False
        self.refs[h] = 1
        return True

    def release(self, hashed: Sequence[int], private: int) -> None:
        """Free a request's blocks: private ones become uncached, named ones evictable."""
        self.free_uncached += private
        for h in reversed(hashed):
            self.refs[h] -= 1
            if self.refs[h] == 0:
                self.evictable[h] = None

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by requests (evictable cached blocks count as free)."""
        return 1.0 - (self.free_uncached + len(self.evictable)) / self.num_blocks
