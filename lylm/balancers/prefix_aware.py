"""Prefix-cache affinity with a load guard: reuse an engine's cached prompt prefix, unless it is busy."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial, reduce
from operator import or_

import attrs

from .._balancer import Balancer
from .._engine import Engine
from .._instance import Instance
from .._request import RequestInfo
from ._prefix_table import PrefixTable, block_hashes


class PrefixAware(Balancer):
    """Sends a request where its prompt's longest prefix is likely cached, unless that engine is overloaded.

    vLLM skips the prefill of prompt blocks already in an engine's prefix cache, so
    requests that share a long prefix (a system prompt, a document, a conversation's
    earlier turns) are much cheaper on an engine that served that prefix recently.
    The balancer cannot see the engines' caches; it remembers where it sent each
    prefix: the prompt's token ids are cut into blocks of ``block_size`` tokens (the
    engine's KV-cache block size) and named by chained hashes, and a bounded LRU
    table (``max_blocks`` names, 125-180 bytes each) maps each name to the engines
    it was sent to. Only the first ``max_prefix_tokens`` of a prompt are hashed,
    which bounds the cost of a choice for long prompts.

    **Load guard.** An engine's load is ``(in_flight_requests + 1) / weight`` (what
    :class:`LeastOutstanding` minimizes). An engine is *overloaded* when its load
    exceeds ``load_factor`` times the mean load of the candidates plus
    ``load_slack``. Candidates are tried from the longest cached prefix down, the
    least loaded first among equal matches, and the first one that is not overloaded
    wins; when every engine with a match is overloaded, or none has one, the least
    loaded engine wins. So affinity never pushes an engine past ~``load_factor`` x
    the mean plus ``load_slack`` requests, a hot prefix spreads to more engines as
    its traffic grows, and prompts that share nothing are routed exactly as
    ``least_outstanding`` routes them.

    **Sessions.** With ``session_affinity`` a request with a ``session_key`` (the
    OpenAI ``user`` field) goes to the engine its session last used, under the
    same guard; at most ``max_sessions`` sessions are remembered (LRU).

    Example::

        from lylm import EnginePool
        from lylm.balancers import PrefixAware

        pool = EnginePool.from_config("config.json", balancer=PrefixAware(load_factor=1.5))
        # or in the config: "balancer": "prefix_aware"

    Counters for reports: choices made ``by_prefix``, ``by_session``, sent to the
    least loaded because the guard skipped every affine engine (``overloaded``) or
    because there was none (``unmatched``); ``len(table)`` names and ``sessions``
    remembered.
    """

    def __init__(
        self,
        *,
        block_size: int = 16,
        max_blocks: int = 65536,
        max_prefix_tokens: int = 4096,
        load_factor: float = 1.25,
        load_slack: float = 4.0,
        session_affinity: bool = True,
        max_sessions: int = 65536,
        rng: random.Random | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 (got {block_size})")
        if load_factor < 1.0 or load_slack < 0.0:
            raise ValueError("load_factor must be >= 1 and load_slack >= 0")
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1 (got {max_sessions})")
        self.block_size = block_size
        self.max_prefix_blocks = max(max_prefix_tokens // block_size, 0)
        self.load_factor = load_factor
        self.load_slack = load_slack
        self.session_affinity = session_affinity
        self.max_sessions = max_sessions
        self.table = PrefixTable(max_blocks)
        self._sessions: OrderedDict[str, int] = OrderedDict()
        # id(engine) -> the engine's bit in table masks. Keyed by the engine, not the
        # instance: a restarted engine is a new object with an empty cache. The
        # engines are held so that their ids cannot be reused; bits never are.
        self._bit_of: dict[int, int] = {}
        self._engines: dict[int, Engine] = {}
        self._next_bit = 0
        self._rng = rng if rng is not None else random.Random()
        self.by_prefix = 0
        self.by_session = 0
        self.overloaded = 0
        self.unmatched = 0

    # The prompt's block hashes are computed where it was rendered (preparer) and
    # travel instead of its tokens: 256 hashes for a 4,096-token prompt.
    reads_token_ids = False

    def preparer(self) -> Callable[[RequestInfo], RequestInfo]:
        """Hashes the prompt's first blocks into ``request.prefix_hashes``, where it was rendered."""
        return partial(with_prefix_hashes, block_size=self.block_size, max_blocks=self.max_prefix_blocks)

    def choose(self, candidates: Sequence[Instance], request: RequestInfo) -> Instance:
        """Pick the candidate with the longest cached prefix that is not overloaded."""
        loads = [(c.in_flight_requests + 1) / c.weight for c in candidates]
        limit = self.load_factor * sum(loads) / len(loads) + self.load_slack
        key = request.session_key if self.session_affinity else None
        hashes = self._prompt_hashes(request)
        if not hashes and key is None:  # nothing to be affine to: least loaded, no books to keep
            self.unmatched += 1
            return candidates[self._least(candidates, loads, None)]

        cbits = self._bits(candidates)
        offered = reduce(or_, cbits)
        chosen = -1
        groups: list[tuple[int, int]] = []
        guarded = False  # an affine engine was skipped by the guard
        if key is not None:
            bit = self._sessions.get(key, 0) & offered
            if bit:
                i = cbits.index(bit)
                if loads[i] <= limit:
                    chosen = i
                    self.by_session += 1
                else:
                    guarded = True
        if chosen < 0 and hashes:
            groups = self.table.match(hashes, offered)
            index = {b: i for i, b in enumerate(cbits)} if groups else {}
            for _, mask in groups:
                members = []
                while mask:  # one step per engine in the group, not per candidate
                    low = mask & -mask
                    members.append(index[low])
                    mask ^= low
                i = self._least(candidates, loads, members)
                if loads[i] <= limit:
                    chosen = i
                    self.by_prefix += 1
                    break
            else:
                guarded = guarded or bool(groups)
        if chosen < 0:
            if guarded:
                self.overloaded += 1
            else:
                self.unmatched += 1
            chosen = self._least(candidates, loads, None)

        bit = cbits[chosen]
        if hashes:
            held = next((depth for depth, mask in groups if mask & bit), 0) if groups else 0
            self.table.record(hashes, bit, held)
        if key is not None:
            self._remember_session(key, bit)
        return candidates[chosen]

    def _prompt_hashes(self, request: RequestInfo) -> Sequence[int]:
        """The request's block hashes: its preparer's, or (a request built by hand) hashed here."""
        if request.prefix_hashes:
            return request.prefix_hashes
        ids = request.prompt_token_ids
        return block_hashes(ids, self.block_size, self.max_prefix_blocks) if ids else []

    @property
    def sessions(self) -> int:
        """How many sessions are remembered (at most ``max_sessions``)."""
        return len(self._sessions)

    def matched_tokens(self, candidates: Sequence[Instance], token_ids: Sequence[int]) -> list[int]:
        """For each candidate, how many leading tokens of ``token_ids`` it is believed to hold.

        For reports and tests; it changes nothing (no use is recorded).
        """
        cbits = [self._bit_of.get(id(c.engine), 0) for c in candidates]
        hashes = block_hashes(token_ids, self.block_size, self.max_prefix_blocks)
        depth_of: dict[int, int] = {}
        for depth, mask in self.table.match(hashes, reduce(or_, cbits, 0)):
            for bit in cbits:
                if bit & mask:
                    depth_of[bit] = depth
        return [depth_of.get(bit, 0) * self.block_size for bit in cbits]

    def _least(self, candidates: Sequence[Instance], loads: list[float], among: list[int] | None) -> int:
        """Index of the least loaded candidate ``among`` those indices (None: all); ties below."""
        if among is None:  # list methods, in C: this path must cost what least_outstanding's does
            low = min(loads)
            ties = loads.count(low)
            best = [loads.index(low)]
            if ties == 1:
                return best[0]
            while len(best) < ties:
                best.append(loads.index(low, best[-1] + 1))
        else:
            low = min([loads[i] for i in among])
            best = [i for i in among if loads[i] == low]
        if len(best) == 1:
            return best[0]
        # Equal loads (idle engines, mostly): the one believed to hold the least
        # prefix, so new prefixes spread over the engines' caches; then at random.
        held = self.table.blocks
        if held:
            bit_of = self._bit_of
            sizes = [held.get(bit_of.get(id(candidates[i].engine), 0), 0) for i in best]
            fewest = min(sizes)
            best = [i for i, size in zip(best, sizes) if size == fewest]
            if len(best) == 1:
                return best[0]
        return best[int(self._rng.random() * len(best))]

    def _bits(self, candidates: Sequence[Instance]) -> list[int]:
        """Each candidate's engine bit, assigning bits to engines not seen before."""
        get = self._bit_of.get
        cbits = [get(id(c.engine), 0) for c in candidates]
        if 0 not in cbits:
            return cbits
        # A new instance or a restarted engine (a new engine object: its cache is
        # empty). Engines no longer offered are forgotten (their bits stay in the
        # table, matching nothing, until evicted), so the maps hold only the engines
        # seen since the last change.
        offered = {id(c.engine) for c in candidates}
        for gone in [k for k in self._bit_of if k not in offered]:
            del self._bit_of[gone]
            del self._engines[gone]
        for i, c in enumerate(candidates):
            if not cbits[i]:
                cbits[i] = self._bit_of[id(c.engine)] = 1 << self._next_bit
                self._engines[id(c.engine)] = c.engine
                self._next_bit += 1
        return cbits

    def _remember_session(self, key: str, bit: int) -> None:
        sessions = self._sessions
        if key in sessions:
            sessions.move_to_end(key)
        sessions[key] = bit
        if len(sessions) > self.max_sessions:
            sessions.popitem(last=False)


def with_prefix_hashes(request: RequestInfo, *, block_size: int, max_blocks: int) -> RequestInfo:
    """``request`` with the chained hashes of its prompt's first ``max_blocks`` full blocks
    (:class:`PrefixAware`'s preparer; module-level, so that it pickles)."""
    if request.prefix_hashes or not request.prompt_token_ids:
        return request
    hashes = block_hashes(request.prompt_token_ids, block_size, max_blocks)
    return attrs.evolve(request, prefix_hashes=tuple(hashes)) if hashes else request
