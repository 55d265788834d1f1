"""Which engine recently served which prompt prefix: chained block hashes in a bounded LRU.

A prompt is cut into full blocks of ``block_size`` tokens (vLLM's KV-cache block
size; a partial last block is never cached by vLLM, so it is not hashed here). Block
``k`` is named by a hash of its tokens chained with block ``k-1``'s name, so equal
names mean equal prefixes, as in vLLM's own prefix cache. The table maps each name to
a bit mask of the engines believed to hold it; it is an approximation of the
engines' caches (it sees routing, not evictions), bounded by ``max_blocks`` entries
and evicted least recently used first.

Memory: one entry per block name, 125-180 bytes in CPython 3.11 depending on where
the dict is in its resize cycle (an ``OrderedDict`` node, a 64-bit int key, a small
int mask); a full table of the default 65,536 names (a million tokens of prefixes at
16 tokens a block) held 11.2 MiB (``benchmarks/prefix_memory.py``; the bound is also
checked by ``tests/test_prefix_aware.py``).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from itertools import islice


def block_hashes(token_ids: Sequence[int], block_size: int, max_blocks: int) -> list[int]:
    """Chained hashes of the first ``max_blocks`` full blocks of ``token_ids``.

    Python's ``hash`` of a tuple of ints is not salted per process, so the names
    are stable across runs (tests rely on that); collisions only cost a wrong
    guess about a cache, never a wrong answer.
    """
    out: list[int] = []
    append = out.append
    parent = 0
    # zip over one iterator, block_size times: full blocks as tuples, built in C;
    # a partial last block is dropped.
    blocks = zip(*[iter(token_ids)] * block_size)
    for block in islice(blocks, max_blocks):
        parent = hash((parent, block))
        append(parent)
    return out


class PrefixTable:
    """Block name -> bit mask of engines, least recently used first, at most ``max_blocks``."""

    __slots__ = ("max_blocks", "_lru", "evictions", "blocks")

    def __init__(self, max_blocks: int) -> None:
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1 (got {max_blocks})")
        self.max_blocks = max_blocks
        self._lru: OrderedDict[int, int] = OrderedDict()
        #: Entries dropped to stay within ``max_blocks``, since creation.
        self.evictions = 0
        #: Engine bit -> how many entries name it: how much prefix it is believed to hold.
        self.blocks: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, hashes: Sequence[int], candidates: int) -> list[tuple[int, int]]:
        """Longest cached prefix per engine, as ``(depth, engines)`` groups, deepest first.

        ``candidates`` is the mask of engines to consider. A group's engines hold the
        first ``depth`` blocks of ``hashes`` (and not the next one); engines that hold
        no block of it are in no group. Looking does not count as a use.

        An engine that holds block ``k`` of a chain holds the blocks before it too: a
        chain is recorded whole, head most recent, so its tail is evicted first. So the
        depth where engines drop out is found by bisection: a few lookups per group, not
        one per block (a 4,096-token prompt is 256 blocks).
        """
        groups: list[tuple[int, int]] = []
        get = self._lru.get
        n = len(hashes)
        alive = candidates
        depth = 0  # every engine in ``alive`` holds the first ``depth`` blocks
        while alive:
            low, high = depth, n  # the deepest d such that all of ``alive`` hold d blocks
            while low < high:
                middle = (low + high + 1) // 2
                if get(hashes[middle - 1], 0) & alive == alive:
                    low = middle
                else:
                    high = middle - 1
            if low == n:
                groups.append((n, alive))
                break
            staying = get(hashes[low], 0) & alive
            if low:  # the engines that drop out here matched ``low`` blocks
                groups.append((low, alive & ~staying))
            alive = staying
            depth = low + 1
        groups.reverse()
        return groups

    def record(self, hashes: Sequence[int], bit: int, held: int = 0) -> None:
        """Note that the engine ``bit`` now holds every block of ``hashes`` (a use of each).

        ``held``: how many leading blocks it is known to hold already (from :meth:`match`);
        those are only refreshed, which costs a tenth of recording them.
        """
        lru = self._lru
        move = lru.move_to_end
        added = 0
        # Tail first, so the chain's head ends up most recent and is evicted last:
        # a shorter prefix outlives its longer tails, as in the engine's own cache.
        tail = hashes[held:] if held else hashes
        get = lru.get
        for h in reversed(tail):
            mask = get(h)
            if mask is None:
                lru[h] = bit
                added += 1
            else:
                if not mask & bit:
                    lru[h] = mask | bit
                    added += 1
                move(h)
        if held:
            try:
                deque(map(move, reversed(hashes[:held])), maxlen=0)  # the refresh, in C
            except KeyError:  # not held after all (a hash collision): recorded as new
                self.record(hashes[:held], bit)
        blocks = self.blocks
        blocks[bit] = blocks.get(bit, 0) + added
        excess = len(lru) - self.max_blocks
        if excess > 0:
            pop = lru.popitem
            for _ in range(excess):
                _, mask = pop(last=False)
                if not mask & (mask - 1):  # one engine held it: most blocks
                    blocks[mask] -= 1
                    continue
                while mask:
                    low = mask & -mask
                    blocks[low] -= 1
                    mask ^= low
            self.evictions += excess
