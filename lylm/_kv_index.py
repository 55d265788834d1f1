"""What every engine's prefix cache holds, from vLLM's KV events (issue 29, first part).

vLLM's engine core can publish an event for each KV-cache block it stores, removes, or
(all at once) clears. :class:`KVIndex` keeps, per instance, the blocks its engine holds,
so a balancer can know (not guess) how many of a prompt's tokens an engine would not have
to prefill.

**Keyed by content.** vLLM names a block by a hash of its tokens and its parent's hash,
and that hash differs between processes and versions. The index names content by the
chain lylm computes itself from the tokens, :func:`~lylm.balancers._prefix_table.block_hashes`,
in *granules* of ``granule`` tokens (16): the names a balancer's preparer puts in
``RequestInfo.prefix_hashes`` where the prompt was rendered, without knowing the engines'
block size (16 on GPUs, 128 on CPUs). An engine block of 128 tokens is 8 granules; the
engine's block size must be a multiple of the granule, else the instance is not indexed
(:meth:`KVIndex.cached_tokens` answers None and a balancer falls back). The index keeps a
map from the engine's hash to its block's granule names, to follow parents and removals.
A block stored after a parent the index never saw (events missed before a resync) cannot
be named: it is skipped, as a prompt cannot reach it either without its parent.

**What is left out.** Blocks stored with a LoRA adapter, multimodal or salted extra keys,
or in another medium than the GPU's (CPU offload) are not indexed: a plain prompt does not
hit them. Only the first KV-cache group (``group_idx`` 0 or absent) is indexed.

**Bounded.** An instance holds at most as many entries as its engine's cache has blocks,
when the events are complete; ``max_blocks`` (default 262,144 engine blocks per instance)
caps it should they not be: past it the instance is reset and counted in ``resets``. A
block costs one dict slot and a tuple of its granule names, and each granule one dict slot:
measured 716 bytes per 128-token block and 178 per 16-token one (integer engine hashes;
``tests/test_kv_index.py``), so at most about 190 MB, or 47 MB, per instance at the cap.

Thread-safety: every method takes the index's lock (event streams apply batches from their
threads while a balancer reads).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

#: Per-instance cap on indexed blocks (see the module's notes).
DEFAULT_MAX_BLOCKS = 1 << 18
#: Tokens per name (see the module's notes): vLLM's default block size on GPUs.
DEFAULT_GRANULE = 16
#: Leading prompt tokens named for a lookup (a longer prompt's hit is counted up to there).
DEFAULT_MAX_PREFIX_TOKENS = 32768


@attrs.define
class _Held:
    """One instance's blocks: the engine's hash -> its granules' names, and names -> how
    many engine blocks carry it (vLLM may hold two blocks of the same content).
    ``usable`` is False once a block size that is no multiple of the granule was seen."""

    block_size: int | None = None
    names: dict[Any, tuple[int, ...]] = attrs.field(factory=dict)
    counts: dict[int, int] = attrs.field(factory=dict)
    last_seq: int | None = None
    usable: bool = True
    #: False once events were lost (a resync, the cap): blocks the engine stored before are
    #: not announced again, so the index cannot tell what it holds until its cache is cleared.
    complete: bool = True


class KVIndex:
    """Per instance, the KV-cache blocks its engine holds, named by content."""

    def __init__(self, *, granule: int = DEFAULT_GRANULE, max_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1 (got {max_blocks})")
        if granule < 1:
            raise ValueError(f"granule must be >= 1 (got {granule})")
        self.granule = granule
        self.max_blocks = max_blocks
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}
        #: Counters for reports: events applied, blocks skipped (unknown parent or not
        #: indexable), sequence gaps seen, resets (cap or drop).
        self.events = 0
        self.skipped = 0
        self.gaps = 0
        self.resets = 0

    def instances(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def block_size(self, instance: str) -> int | None:
        """The instance's block size, once its first stored block has been seen."""
        with self._lock:
            held = self._held.get(instance)
            return held.block_size if held is not None else None

    def blocks(self, instance: str) -> int:
        """How many blocks the instance holds, as the index knows."""
        with self._lock:
            held = self._held.get(instance)
            return len(held.names) if held is not None else 0

    def open(self, instance: str) -> None:
        """Begin an instance with an empty cache (its engine is starting, its stream subscribed):
        from now on :meth:`cached_tokens` answers for it."""
        with self._lock:
            self._held.setdefault(instance, _Held())

    def drop(self, instance: str) -> None:
        """Forget an instance (its engine stopped or restarted: a new engine, a new stream)."""
        with self._lock:
            if self._held.pop(instance, None) is not None:
                self.resets += 1

    def resync(self, instance: str, last_seq: int) -> None:
        """Forget the instance's blocks and go on after batch ``last_seq`` (a gap that could
        not be replayed). Blocks stored before stay unknown, and their children with them:
        :meth:`cached_tokens` answers None for the instance (a balancer falls back) until
        its engine clears its cache (``AllBlocksCleared``) or it is dropped."""
        with self._lock:
            held = self._held.get(instance)
            self._held[instance] = _Held(
                block_size=held.block_size if held else None,
                last_seq=last_seq,
                usable=held.usable if held else True,
                complete=False,
            )
            self.resets += 1

    def apply(self, instance: str, seq: int, events: Iterable[Mapping[str, Any]]) -> bool:
        """Apply one published batch (``seq``: its sequence number; ``events``: its events,
        decoded as maps with a ``type`` key). Returns False, applying nothing, when ``seq``
        is not the next one expected (a gap: replay from :meth:`expected`, or
        :meth:`resync`); a batch already applied is ignored (True)."""
        with self._lock:
            held = self._held.setdefault(instance, _Held())
            expected = 0 if held.last_seq is None else held.last_seq + 1
            if seq < expected:
                return True  # a replayed batch already seen
            if seq != expected:
                self.gaps += 1
                return False
            held.last_seq = seq
            for event in events:
                self.events += 1
                kind = event.get("type")
                if kind == "BlockStored":
                    self._stored(held, event)
                elif kind == "BlockRemoved":
                    self._removed(held, event)
                elif kind == "AllBlocksCleared":
                    held.names.clear()
                    held.counts.clear()
                    held.complete = True  # an empty cache: known again
            if len(held.names) > self.max_blocks:
                self._held[instance] = _Held(
                    block_size=held.block_size, last_seq=held.last_seq, usable=held.usable, complete=False
                )
                self.resets += 1
            return True

    def expected(self, instance: str) -> int:
        """The sequence number the instance's next batch should have."""
        with self._lock:
            held = self._held.get(instance)
            return 0 if held is None or held.last_seq is None else held.last_seq + 1

    def cached_tokens(self, instance: str, prefix_hashes: Sequence[int], prompt_tokens: int) -> int | None:
        """The prompt tokens the instance's engine would find cached: the prompt's leading
        granules (``prefix_hashes``: named as :func:`~lylm.balancers._prefix_table.block_hashes`
        names them, ``granule`` tokens each) that the engine holds, in whole engine blocks,
        at most all but the prompt's last token (vLLM always computes one). None when the
        index cannot tell: the instance is unknown, or its block size is no multiple of
        the granule, or events were lost (:meth:`resync`)."""
        with self._lock:
            held = self._held.get(instance)
            if held is None or not held.usable or not held.complete:
                return None
            if not held.block_size or prompt_tokens < 1:
                return 0  # nothing stored yet: an empty cache
            counts = held.counts
            # A block is stored whole: its last granule's name stands for it (one lookup per
            # engine block, not per granule).
            step = held.block_size // self.granule
            most = min(len(prefix_hashes) // step, (prompt_tokens - 1) // held.block_size)
            blocks = 0
            while blocks < most and prefix_hashes[(blocks + 1) * step - 1] in counts:
                blocks += 1
            return blocks * held.block_size

    # -- events ------------------------------------------------------------------

    def _stored(self, held: _Held, event: Mapping[str, Any]) -> None:
        hashes = event.get("block_hashes") or []
        size = event.get("block_size")
        tokens = event.get("token_ids") or []
        if (
            not isinstance(size, int)
            or size < 1
            or len(tokens) != size * len(hashes)
            or event.get("lora_name") is not None
            or event.get("lora_id") is not None
            or any(event.get("extra_keys") or [])
            or event.get("medium") not in (None, "GPU")
            or event.get("group_idx") not in (None, 0)
        ):
            self.skipped += len(hashes)
            return
        if held.block_size is None:
            held.block_size = size
            if size % self.granule:
                held.usable = False
        if held.block_size != size or not held.usable:
            self.skipped += len(hashes)
            return
        parent_hash = event.get("parent_block_hash")
        if parent_hash is None:
            parent = 0
        elif parent_hash in held.names:
            parent = held.names[parent_hash][-1]
        else:  # stored after a parent never seen: unreachable by name
            self.skipped += len(hashes)
            return
        g = self.granule
        for i, engine_hash in enumerate(hashes):
            names = []
            for start in range(i * size, (i + 1) * size, g):
                parent = hash((parent, tuple(tokens[start : start + g])))
                names.append(parent)
            if engine_hash in held.names:
                continue  # stored again (re-published): counted once
            held.names[engine_hash] = tuple(names)
            for name in names:
                held.counts[name] = held.counts.get(name, 0) + 1

    def _removed(self, held: _Held, event: Mapping[str, Any]) -> None:
        if event.get("medium") not in (None, "GPU") or event.get("group_idx") not in (None, 0):
            return
        for engine_hash in event.get("block_hashes") or []:
            names = held.names.pop(engine_hash, None)
            for name in names or ():
                left = held.counts[name] - 1
                if left:
                    held.counts[name] = left
                else:
                    del held.counts[name]
