"""PrefixAware: prefix affinity, the load guard, bounded memory, sessions, restarts."""

from __future__ import annotations

import random
import tracemalloc
from collections import Counter

import pytest

from _helpers import make_instances
from lylm import RequestInfo
from lylm.balancers import LeastOutstanding, PrefixAware
from lylm.balancers._prefix_table import PrefixTable, block_hashes
from lylm.testing import FakeEngine


def prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(512) for _ in range(n)]


def req(ids: list[int] | tuple[int, ...], session: str | None = None, rid: str = "r") -> RequestInfo:
    return RequestInfo(
        model="m", request_id=rid, prompt_tokens=len(ids), max_tokens=8,
        prompt_token_ids=ids, session_key=session,
    )


# -- hashing and the table ---------------------------------------------------------


def test_block_hashes_are_chained_and_cover_full_blocks_only() -> None:
    a = list(range(40))
    b = list(range(32)) + [99] * 8
    ha, hb = block_hashes(a, 16, 100), block_hashes(b, 16, 100)
    assert len(ha) == 2  # 40 tokens: two full blocks, the partial third is not hashed
    assert ha == hb  # they differ only in the partial block
    c = [7] + list(range(1, 40))
    hc = block_hashes(c, 16, 100)
    # The first block differs, so every later name differs too, though block 2's tokens match.
    assert hc[0] != ha[0] and hc[1] != ha[1]
    assert block_hashes(a, 16, 1) == ha[:1]  # max_blocks caps the work
    assert block_hashes(tuple(a), 16, 100) == ha
    assert block_hashes(a[:15], 16, 100) == []


def _match_block_by_block(table: PrefixTable, hashes: list[int], candidates: int) -> list[tuple[int, int]]:
    # The definition: walk the blocks, noting where engines drop out.
    groups, alive, depth = [], candidates, 0
    for h in hashes:
        mask = table._lru.get(h, 0) & alive
        if not mask:
            break
        if mask != alive and depth:
            groups.append((depth, alive & ~mask))
        alive, depth = mask, depth + 1
    if depth:
        groups.append((depth, alive))
    return groups[::-1]


@pytest.mark.parametrize("seed", range(6))
def test_bisected_match_and_refresh_only_record_agree_with_the_block_by_block_ones(seed: int) -> None:
    # Chains that share heads, recorded on 4 engines, a table small enough to evict all
    # the time: match by bisection finds what a walk finds, and recording the held head
    # as a refresh leaves the table exactly as recording it whole does.
    rng = random.Random(seed)
    heads = [prompt(rng, 16 * rng.randrange(1, 6)) for _ in range(5)]
    fast, slow = PrefixTable(60), PrefixTable(60)
    for _ in range(400):
        chain = block_hashes(rng.choice(heads) + prompt(rng, 16 * rng.randrange(0, 6)), 16, 100)
        offered = rng.randrange(1, 16)
        expected = _match_block_by_block(slow, chain, offered)
        assert fast.match(chain, offered) == expected
        bit = 1 << rng.randrange(4)
        held = next((d for d, mask in expected if mask & bit), 0)
        fast.record(chain, bit, held)
        slow.record(chain, bit)
        assert list(fast._lru.items()) == list(slow._lru.items())
        assert fast.blocks == slow.blocks


def test_table_match_reports_each_engines_longest_prefix() -> None:
    t = PrefixTable(100)
    chain = block_hashes(list(range(80)), 16, 100)  # 5 blocks
    t.record(chain[:5], 0b001)
    t.record(chain[:3], 0b010)
    t.record(chain[:1], 0b100)
    assert t.match(chain, 0b111) == [(5, 0b001), (3, 0b010), (1, 0b100)]
    assert t.match(chain, 0b110) == [(3, 0b010), (1, 0b100)]  # engine 0 not offered
    assert t.match(chain[:2], 0b111) == [(2, 0b011), (1, 0b100)]
    assert t.match(block_hashes(list(range(1, 81)), 16, 100), 0b111) == []
    assert t.blocks == {0b001: 5, 0b010: 3, 0b100: 1}


def test_table_stays_within_max_blocks_and_evicts_tails_first() -> None:
    t = PrefixTable(10)
    rng = random.Random(0)
    old = block_hashes(prompt(rng, 16 * 6), 16, 100)
    t.record(old, 1)
    for _ in range(50):
        t.record(block_hashes(prompt(rng, 16 * 3), 16, 100), 2)
        assert len(t) <= 10
    assert t.evictions == 6 + 50 * 3 - 10
    assert t.match(old, 3) == []
    # A chain recorded tail first: when only room for part of it is left, the head survives.
    t2 = PrefixTable(8)
    t2.record(old, 1)
    t2.record(block_hashes(prompt(rng, 16 * 4), 16, 100), 1)
    assert t2.match(old, 1) == [(4, 1)]
    assert t2.blocks == {1: 8}


def test_table_memory_is_bounded_by_max_blocks() -> None:
    # The documented bound: 125-180 bytes per entry, depending on where the dict is in
    # its resize cycle (benchmarks/prefix_memory.py: 180 at 65,536 after churn).
    max_blocks = 20_000
    rng = random.Random(1)
    chains = [block_hashes(prompt(rng, 16 * 64), 16, 64) for _ in range(1000)]  # 64k names
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        t = PrefixTable(max_blocks)
        for chain in chains:  # 3x the bound: full, then evicting
            t.record(chain, 1 << (len(t) % 4))
            assert len(t) <= max_blocks
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(t) == max_blocks
    per_entry = (used - start) / max_blocks
    print(f"\nprefix table: {per_entry:.0f} bytes per entry at {max_blocks} entries")
    assert per_entry < 200


# -- routing -------------------------------------------------------------------------


def test_a_repeated_prefix_goes_back_to_the_engine_that_served_it() -> None:
    b = PrefixAware(rng=random.Random(0))
    insts = make_instances([1.0] * 4)
    rng = random.Random(2)
    groups = [prompt(rng, 512) for _ in range(8)]
    home: dict[int, int] = {}
    for i in range(200):
        g = i % 8
        chosen = b.choose(insts, req(groups[g] + prompt(rng, 40)))
        home.setdefault(g, chosen.index)
        assert chosen.index == home[g]
    # Idle ties went to the engine holding the least prefix: 8 groups, 2 per engine.
    assert sorted(Counter(home.values()).values()) == [2, 2, 2, 2]
    assert b.by_prefix == 192 and b.unmatched == 8


def test_the_longest_match_wins_over_a_shorter_one() -> None:
    b = PrefixAware(rng=random.Random(0))
    a, c = make_instances([1.0, 1.0])
    rng = random.Random(3)
    system = prompt(rng, 64)
    doc = prompt(rng, 256)
    assert b.choose([a], req(system + prompt(rng, 20))) is a  # only a was offered
    assert b.choose([c], req(system + doc + prompt(rng, 20))) is c
    # a holds 4 blocks of this prompt, c holds 20: c, even though a is less loaded.
    a.in_flight_requests, c.in_flight_requests = 0, 3
    assert b.choose([a, c], req(system + doc + prompt(rng, 30))) is c


def test_guard_sends_away_from_an_overloaded_match_to_the_least_loaded() -> None:
    b = PrefixAware(load_factor=1.25, load_slack=2.0, rng=random.Random(0))
    insts = make_instances([1.0] * 4)
    ids = prompt(random.Random(4), 256)
    home = b.choose(insts, req(ids))
    others = [i for i in insts if i is not home]
    for i, load in zip(others, (5, 3, 4)):
        i.in_flight_requests = load
    # Loads (n+1)/w: home h+1, others 6, 4, 5. Limit = 1.25 * mean + 2.
    home.in_flight_requests = 8  # 9 <= 1.25 * 6 + 2 = 9.5: still home
    assert b.choose(insts, req(ids)) is home
    home.in_flight_requests = 9  # 10 > 1.25 * 6.25 + 2 = 9.8: overloaded
    assert b.choose(insts, req(ids)) is others[1]  # the least loaded (3 in flight)
    assert b.overloaded == 1


def test_a_hot_prefix_does_not_pile_onto_one_engine() -> None:
    # Every request shares one long prefix and none finishes: affinity alone would put
    # all 400 on one engine. The guard keeps every engine within the documented bound.
    b = PrefixAware(rng=random.Random(5))
    insts = make_instances([1.0] * 4)
    rng = random.Random(6)
    hot = prompt(rng, 1024)
    for _ in range(400):
        chosen = b.choose(insts, req(hot + prompt(rng, 32)))
        loads = [(i.in_flight_requests + 1) / i.weight for i in insts]
        assert loads[chosen.index] <= b.load_factor * sum(loads) / 4 + b.load_slack
        chosen.in_flight_requests += 1  # the pool's books, kept by the test
    counts = [i.in_flight_requests for i in insts]
    assert max(counts) <= 1.25 * (sum(counts) / 4) + 4 + 1, counts
    assert min(counts) >= 80, counts


def test_weights_are_respected_under_a_hot_prefix() -> None:
    b = PrefixAware(rng=random.Random(7))
    insts = make_instances([1.0, 3.0])
    hot = prompt(random.Random(8), 512)
    for _ in range(400):
        b.choose(insts, req(hot)).in_flight_requests += 1
    light, heavy = (i.in_flight_requests for i in insts)
    assert 2.0 <= heavy / light <= 4.0, (light, heavy)


def test_distinct_prompts_are_routed_like_least_outstanding() -> None:
    b = PrefixAware(rng=random.Random(9))
    lo = LeastOutstanding(rng=random.Random(9))
    insts = make_instances([1.0, 2.0, 1.0])
    rng = random.Random(10)
    for _ in range(300):
        for i in insts:
            i.in_flight_requests = rng.randrange(0, 6)
        r = req(prompt(rng, 300))
        pick = b.choose(insts, r)
        scores = [(i.in_flight_requests + 1) / i.weight for i in insts]
        assert scores[pick.index] == min(scores)
        assert scores[lo.choose(insts, r).index] == min(scores)
    assert b.by_prefix == 0


def test_session_affinity_keeps_a_session_on_its_engine_under_the_same_guard() -> None:
    b = PrefixAware(load_slack=1.0, rng=random.Random(11))
    insts = make_instances([1.0] * 3)
    rng = random.Random(12)
    first = b.choose(insts, req(prompt(rng, 20), session="alice"))  # short: no full block
    for _ in range(5):
        assert b.choose(insts, req(prompt(rng, 20), session="alice")) is first
    assert b.by_session == 5
    first.in_flight_requests = 10  # far above 1.25 * mean + 1
    moved = b.choose(insts, req(prompt(rng, 20), session="alice"))
    assert moved is not first
    assert (b.overloaded, b.unmatched) == (1, 1)  # the first visit was unmatched
    first.in_flight_requests = 0
    assert b.choose(insts, req(prompt(rng, 20), session="alice")) is moved  # it follows the move
    off = PrefixAware(session_affinity=False, rng=random.Random(11))
    picks = {off.choose(insts, req(prompt(rng, 20), session="bob")).index for _ in range(60)}
    assert len(picks) > 1


def test_sessions_are_bounded_lru() -> None:
    b = PrefixAware(max_sessions=3, rng=random.Random(13))
    insts = make_instances([1.0] * 2)
    homes = {}
    for name in ["a", "b", "c", "a", "d"]:
        homes[name] = b.choose(insts, req([1, 2, 3], session=name))
        assert b.sessions <= 3
    assert b.sessions == 3
    # "b" was the least recently used: forgotten, so it no longer counts as affine.
    before = b.by_session
    b.choose(insts, req([1, 2, 3], session="b"))
    assert b.by_session == before
    b.choose(insts, req([1, 2, 3], session="a"))
    assert b.by_session == before + 1


def test_only_offered_candidates_are_chosen_even_if_others_hold_the_prefix() -> None:
    b = PrefixAware(rng=random.Random(14))
    insts = make_instances([1.0] * 3)
    ids = prompt(random.Random(15), 200)
    home = b.choose(insts, req(ids, session="s"))
    rest = [i for i in insts if i is not home]
    for _ in range(20):
        assert b.choose(rest, req(ids, session="s")) in rest


def test_a_restarted_engine_is_treated_as_cold() -> None:
    b = PrefixAware(rng=random.Random(16))
    insts = make_instances([1.0] * 2)
    ids = prompt(random.Random(17), 200)
    home = b.choose(insts, req(ids))
    assert all(b.choose(insts, req(ids)) is home for _ in range(5))
    assert b.matched_tokens(insts, ids) == [192 if i is home else 0 for i in insts]
    home.engine = FakeEngine()  # a supervisor replaced the engine: its cache is empty
    assert b.matched_tokens(insts, ids) == [0, 0]
    b.choose(insts, req(ids))
    assert sorted(b.matched_tokens(insts, ids)) == [0, 192]


def test_choose_never_writes_the_books_and_the_memory_stays_bounded() -> None:
    b = PrefixAware(max_blocks=500, rng=random.Random(18))
    insts = make_instances([1.0, 2.0, 1.0])
    before = [i.stats() for i in insts]
    rng = random.Random(19)
    for n in range(300):
        b.choose(insts, req(prompt(rng, 16 * 20), session=f"user{n}"))
    assert [i.stats() for i in insts] == before
    assert len(b.table) == 500


@pytest.mark.parametrize("kwargs", [{"block_size": 0}, {"load_factor": 0.9}, {"load_slack": -1},
                                    {"max_sessions": 0}, {"max_blocks": 0}])
def test_bad_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PrefixAware(**kwargs)  # type: ignore[arg-type]
