"""Precise prefix-cache routing: what every engine holds, from vLLM's KV events, against its load."""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import reduce
from operator import or_

from .._instance import Instance
from .._kv_index import DEFAULT_GRANULE, DEFAULT_MAX_PREFIX_TOKENS
from .._request import RequestInfo
from .prefix_aware import PrefixAware


class KVAware(PrefixAware):
    """Sends each request to the engine that holds the most of its prompt, by the engines' own
    KV-cache events; never to an overloaded engine.

    The pool subscribes to every engine's KV-cache events (vLLM's ``kv_events_config``, on
    private IPC sockets it sets up) and keeps an index of the blocks each engine holds, by
    content (see :mod:`lylm._kv_routing`). Before each choice it fills
    ``request.cached_tokens``: per candidate, how many of the prompt's tokens its engine
    would find cached, evictions and restarts included. Turning this balancer on turns
    ``enable_prefix_caching`` on for the model's engines.

    **Choice.** Within the load guard (below), the candidate whose engine holds the most of
    the prompt wins; among equals, the fewest requests in flight per weight, then the
    shortest prefill queue per weight (``in_flight_prefill_tokens``: lylm's own book of the
    prompt tokens the requests it sent there have yet to prefill, their predicted cached
    tokens left out; it cannot leak, each request's account closing as it ends), then the
    engine believed to hold the least, then at random. ``load_weight`` > 0 trades hits for
    a shorter prefill queue: candidates are then compared by::

        cost = (prompt_tokens - cached_tokens[c]) + load_weight * c.in_flight_prefill_tokens / c.weight

    (1.0 measured on 2 CPU engines: hot prefixes copied to a second engine whenever the first
    had one cold prefill more queued, and under eviction the caches held fewer prefixes:
    hit rate 27.2% against 34.8% with 40 prefixes for room for 19; BENCHMARKS.md 21).

    When no candidate within the guard holds any of the prompt, the request goes to its
    **home**, the engine the table remembers sending its prefix to (it has evicted it since):
    each prefix keeps one home, and the caches together hold more prefixes than if every
    miss went wherever the load was lowest. A prompt with no home goes where
    ``least_outstanding`` sends it (the prefill queue breaking ties), keeping the engines'
    decode batches even (choosing by the prefill queue alone served 0.82x
    least_outstanding's tokens/s with nothing shared).

    **Load guard, per candidate.** A candidate whose ``(in_flight_requests + 1) / weight``
    exceeds ``load_factor`` x the mean over the candidates plus ``load_slack`` is skipped,
    whatever it holds (as in ``prefix_aware``); the others keep their affinity. When every
    candidate is over the line, all are considered.

    **Fallback.** A candidate the pool has no events for (its engine's stream not yet
    subscribed or failed; a remote core; front-end workers do have them, through the hub)
    is judged by the table ``prefix_aware`` keeps of where it sent each prefix.

    Counters: choices where the chosen engine held part of the prompt, known ``by_events`` or
    ``by_table``; sent ``by_home`` (nobody held it; its home did once); where it held none of
    it because an engine that did was over the guard's line (``overloaded``) or cost more
    with its load (``by_load``); ``unmatched``: nobody held any of it, nor had.
    """

    kv_events = True
    reads_token_ids = False

    def __init__(
        self,
        *,
        load_weight: float = 0.0,
        max_prefix_tokens: int = DEFAULT_MAX_PREFIX_TOKENS,
        max_blocks: int = 65536,
        load_factor: float = 1.25,
        load_slack: float = 4.0,
        rng: random.Random | None = None,
    ) -> None:
        if not load_weight >= 0.0:
            raise ValueError(f"load_weight must be >= 0 (got {load_weight})")
        super().__init__(
            block_size=DEFAULT_GRANULE,
            max_blocks=max_blocks,
            max_prefix_tokens=max_prefix_tokens,
            load_factor=load_factor,
            load_slack=load_slack,
            session_affinity=False,
            rng=rng,
        )
        self.load_weight = load_weight
        self.by_events = 0
        self.by_table = 0
        self.by_load = 0
        self.by_home = 0

    def choose(self, candidates: Sequence[Instance], request: RequestInfo) -> Instance:
        """Pick the cheapest candidate that is not overloaded (see the class's notes)."""
        n = len(candidates)
        loads = [(c.in_flight_requests + 1) / c.weight for c in candidates]
        limit = self.load_factor * sum(loads) / n + self.load_slack
        hashes = self._prompt_hashes(request)
        exact = request.cached_tokens or {}
        cbits = self._bits(candidates)
        # What the table believes, for every candidate: the fallback, and what to refresh.
        depth = [0] * n
        if hashes:
            for blocks, mask in self.table.match(hashes, reduce(or_, cbits)):
                for i, bit in enumerate(cbits):
                    if bit & mask:
                        depth[i] = blocks
        most = max(request.prompt_tokens - 1, 0)
        cached = [
            exact[c.name] if c.name in exact else min(depth[i] * self.block_size, most) for i, c in enumerate(candidates)
        ]
        prefill = [c.in_flight_prefill_tokens / c.weight for c in candidates]
        costs = [request.prompt_tokens - cached[i] + self.load_weight * prefill[i] for i in range(n)]
        eligible = [i for i in range(n) if loads[i] <= limit] or list(range(n))
        if any(cached[i] for i in eligible):
            best = min(costs[i] for i in eligible)
            chosen = self._pick(candidates, loads, prefill, [i for i in eligible if costs[i] == best])
        else:
            # Nothing to reuse. Where the table remembers sending this prefix (an engine that
            # has since evicted it), send it there again, within the guard: each prefix keeps
            # one home, and the engines' caches together hold more of them than if every
            # miss went wherever the load was lowest. Else balance requests as
            # least_outstanding does, the prefill queue breaking ties.
            home = max(depth[i] for i in eligible)
            among = [i for i in eligible if depth[i] == home] if home else list(range(n))
            chosen = self._pick(candidates, loads, prefill, among)

        if cached[chosen]:
            if candidates[chosen].name in exact:
                self.by_events += 1
            else:
                self.by_table += 1
        elif depth[chosen]:
            self.by_home += 1
        elif any(cached[i] for i in set(range(n)).difference(eligible)):
            self.overloaded += 1
        elif any(cached):
            self.by_load += 1
        else:
            self.unmatched += 1
        if hashes:
            self.table.record(hashes, cbits[chosen], depth[chosen])
        return candidates[chosen]

    def _pick(self, candidates: Sequence[Instance], loads: list[float], prefill: list[float], among: list[int]) -> int:
        """Of the candidates ``among`` (indices), the fewest requests in flight per weight,
        then the shortest prefill queue, then :meth:`_least`'s ties (the least believed held,
        at random)."""
        if len(among) > 1:
            low = min(loads[i] for i in among)
            among = [i for i in among if loads[i] == low]
        if len(among) > 1:
            short = min(prefill[i] for i in among)
            among = [i for i in among if prefill[i] == short]
        return among[0] if len(among) == 1 else self._least(candidates, loads, among)
