"""The balancer simulator (benchmarks/sim): conservation, prefix cache, real balancers, determinism.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_sim.py
"""

from __future__ import annotations

import pathlib
import random
import sys
from collections.abc import Sequence

import numpy as np
import pytest

from lylm import Balancer, Instance, RequestInfo
from lylm.balancers import BALANCERS, resolve_balancer

# benchmarks/ is not an installed package: make it importable from any working directory.
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.sim.engine import EngineConfig, SimEngine
from benchmarks.sim.kvcache import BLOCK_SIZE, KVCache, block_hashes
from benchmarks.sim.model import StepModel
from benchmarks.sim.sim import Arrival, simulate
from benchmarks.sim.workloads import poisson_times, unique_prompt

MODEL = StepModel(a=2e-3, b=1e-4, c=5e-5, d=1e-8)


def _workload(seed: int, n: int = 60, rate: float = 60.0) -> list[Arrival]:
    rng = np.random.default_rng(seed)
    out = []
    for t in poisson_times(rng, n, rate):
        # Some prompts longer than the token budget below: chunked prefill is exercised.
        length = int(rng.integers(5, 120)) * (8 if rng.random() < 0.2 else 1)
        out.append(Arrival(t, unique_prompt(rng, length), int(rng.integers(1, 40))))
    return out


# Small budget, few slots and a small cache: chunking, slot limits and cache waits all happen.
TIGHT = EngineConfig(max_num_seqs=8, max_num_batched_tokens=256, kv_cache_tokens=2048)


@pytest.mark.parametrize("balancer", sorted(BALANCERS))
def test_every_request_gets_exactly_its_tokens_and_books_balance(balancer: str) -> None:
    arrivals = _workload(1)
    result = simulate([TIGHT, EngineConfig(speed=2.0, max_num_seqs=4, max_num_batched_tokens=128,
                                           kv_cache_tokens=2048)],
                      [1, 2], balancer, arrivals, seed=3, model=MODEL)
    assert len(result.requests) == len(arrivals)
    by_id = {r.info.request_id: r for r in result.requests}
    for i, a in enumerate(arrivals):
        r = by_id[f"r{i}"]
        assert r.generated == a.output_tokens
        assert r.computed == len(a.token_ids)
        assert r.arrival <= r.first_token <= r.finished  # type: ignore[operator]
    instances = {id(r.instance): r.instance for r in result.requests}
    assert sum(e["requests"] for e in result.per_engine) == len(arrivals)
    for inst in instances.values():
        assert inst is not None
        # The pool's books (lylm._books, the pool's own code) are back to zero.
        assert inst.in_flight_requests == 0
        assert inst.in_flight_tokens == 0
        assert inst.completed == inst.dispatched
        mine = [r for r in result.requests if r.instance is inst]
        assert inst.generated_tokens == sum(r.output_tokens for r in mine)
        assert inst.prompt_tokens == sum(r.prompt_len for r in mine)
        # Every block is back: free or cached-evictable.
        cache = inst.engine.cache  # type: ignore[attr-defined]
        assert cache.usage == 0.0


def test_prefix_cache_hits_on_a_repeated_prefix() -> None:
    rng = np.random.default_rng(0)
    prefix = unique_prompt(rng, 4 * BLOCK_SIZE)
    first = Arrival(0.0, prefix + unique_prompt(rng, 10), 2)
    second = Arrival(1.0, prefix + unique_prompt(rng, 10), 2)  # long after the first finished
    stranger = Arrival(2.0, unique_prompt(rng, 74), 2)
    result = simulate([EngineConfig()], [1], "least_outstanding", [first, second, stranger], model=MODEL)
    cached = [r.cached_tokens for r in result.requests]
    assert cached == [0, 4 * BLOCK_SIZE, 0]
    assert result.cache_hit_rate == pytest.approx(64 / (74 * 3))
    # A hit skips prefill compute: the second request's first step batches only 10 tokens.
    assert result.per_engine[0]["batched_tokens"] == 74 + 10 + 74 + 3 * 1
    # The engine's live signals count as vLLM's PrefixCacheStats do: tokens looked up, found.
    inst = result.requests[0].instance
    assert inst is not None
    assert (inst.prefix_cache_queries, inst.prefix_cache_hits) == (3 * 74, 64)


def test_a_whole_prompt_hit_still_recomputes_the_last_token() -> None:
    prompt = tuple(range(3, 3 + 2 * BLOCK_SIZE))
    result = simulate([EngineConfig()], [1], "token_aware",
                      [Arrival(0.0, prompt, 1), Arrival(1.0, prompt, 1)], model=MODEL)
    assert [r.cached_tokens for r in result.requests] == [0, BLOCK_SIZE]


def test_kv_cache_evicts_least_recently_used_tail_first() -> None:
    a = block_hashes(list(range(100, 132)))
    b = block_hashes(list(range(200, 232)))
    cache = KVCache(4)
    for h in (a, b):
        cache.allocate((), 2)
        for x in h:
            assert cache.register(x)
        cache.release(h, 0)
    assert cache.lookup(a) == 2 and cache.lookup(b) == 2
    # Reusing a makes it the most recent; two fresh blocks then evict b's.
    cache.allocate(a, 0)
    cache.release(a, 0)
    cache.allocate((), 2)
    assert cache.lookup(a) == 2 and cache.lookup(b) == 0
    cache.release((), 2)
    # One fresh block more evicts a's tail first, so a's first block survives.
    cache.allocate((), 3)
    assert cache.lookup(a) == 1
    assert cache.evictions == 3


def test_a_block_computed_twice_is_cached_once() -> None:
    cache = KVCache(4)
    (h,) = block_hashes(list(range(16)))
    cache.allocate((), 1)
    cache.allocate((), 1)
    assert cache.register(h)
    assert not cache.register(h)
    cache.release((h,), 0)
    cache.release((), 1)
    assert cache.usage == 0.0 and cache.lookup((h,)) == 1


class Spy(Balancer):
    """Records what the simulator passes; delegates to a real built-in balancer."""

    def __init__(self, inner: Balancer) -> None:
        self.inner = inner
        self.calls: list[tuple[Sequence[Instance], RequestInfo]] = []
        self.finished: list[str] = []
        self.seen_tokens: list[int] = []  # in-flight tokens of the candidates, at call time

    def choose(self, candidates: Sequence[Instance], request: RequestInfo) -> Instance:
        self.calls.append((list(candidates), request))
        self.seen_tokens.extend(c.in_flight_tokens for c in candidates)
        for c in candidates:
            assert c.in_flight_requests >= 0 and c.in_flight_tokens >= 0
        return self.inner.choose(candidates, request)

    def on_finish(self, instance: Instance, request: RequestInfo, outcome: str) -> None:
        assert outcome == "completed"
        self.finished.append(request.request_id)


def test_balancers_are_called_with_real_instances_and_requests() -> None:
    spy = Spy(resolve_balancer("token_aware", rng=random.Random(0)))
    arrivals = _workload(2, n=30)
    simulate([EngineConfig(), EngineConfig()], [1, 3], spy, arrivals, model=MODEL)
    assert len(spy.calls) == 30 and len(spy.finished) == 30
    for candidates, request in spy.calls:
        assert type(request) is RequestInfo
        assert [type(c) for c in candidates] == [Instance, Instance]
        assert all(isinstance(c.engine, SimEngine) for c in candidates)
        assert [c.weight for c in candidates] == [1, 3]
    # Under load the books the balancer reads are live: some request saw work in flight.
    assert any(t > 0 for t in spy.seen_tokens)
    assert spy.calls[3][1].prompt_tokens == len(arrivals[3].token_ids)


def test_the_same_seed_gives_the_same_results() -> None:
    engines = [EngineConfig(speed=1.0), EngineConfig(speed=2.0)]
    runs = [simulate(engines, [1, 1], "weighted_random", _workload(5), seed=s, model=MODEL).summary()
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_a_faster_instance_runs_its_steps_faster() -> None:
    arrivals = [Arrival(0.0, tuple(range(3, 67)), 8)]
    slow = simulate([EngineConfig()], [1], "weighted_random", arrivals, model=MODEL)
    fast = simulate([EngineConfig(speed=2.0)], [1], "weighted_random", arrivals, model=MODEL)
    assert fast.makespan == pytest.approx(slow.makespan / 2)


def test_prefix_aware_keeps_shared_prefixes_warm_without_piling_up() -> None:
    # 8 groups x 512-token prefix on 4 engines whose caches hold 2-3 prefixes each.
    rng = np.random.default_rng(4)
    prefixes = [unique_prompt(rng, 512) for _ in range(8)]
    arrivals = [
        Arrival(t, prefixes[int(rng.integers(8))] + unique_prompt(rng, 40), 8)
        for t in poisson_times(rng, 400, 40.0)
    ]
    engines = [EngineConfig(kv_cache_tokens=1536) for _ in range(4)]
    results = {b: simulate(engines, [1] * 4, b, arrivals, seed=1, model=MODEL)
               for b in ("least_outstanding", "prefix_aware")}
    assert results["prefix_aware"].cache_hit_rate > 0.75
    assert results["least_outstanding"].cache_hit_rate < 0.5
    assert results["prefix_aware"].load_spread < 1.5
    assert results["prefix_aware"].request_spread < 1.5

