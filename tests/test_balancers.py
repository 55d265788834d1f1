"""Contract suite run against every built-in balancer, plus policy-specific checks."""

from __future__ import annotations

import random

import pytest

from _helpers import make_instances
from lylm import Balancer, ConfigError, RequestInfo
from lylm.balancers import (
    BALANCERS,
    LeastOutstanding,
    TokenAware,
    WeightedRandom,
    resolve_balancer,
)


def request(
    prompt_tokens: int = 10, max_tokens: int = 20, token_ids: list[int] | None = None,
    session_key: str | None = None,
) -> RequestInfo:
    return RequestInfo(
        model="m", request_id="r", prompt_tokens=prompt_tokens, max_tokens=max_tokens,
        prompt_token_ids=token_ids or (), session_key=session_key,
    )


# A few shared prefixes, so cache-aware balancers take their affinity paths too.
_PREFIXES = [[random.Random(p).randrange(512) for _ in range(64 * (p + 1))] for p in range(4)]


def mixed_request(rng: random.Random) -> RequestInfo:
    ids = list(rng.choice(_PREFIXES)) + [rng.randrange(512) for _ in range(rng.randrange(1, 100))]
    session = rng.choice([None, "a", "b"])
    return request(len(ids), rng.randrange(1, 200), ids, session)


@pytest.fixture(params=sorted(BALANCERS))
def balancer(request: pytest.FixtureRequest) -> Balancer:
    # Each registered name resolves to its own class (what the contract tests below run).
    resolved = resolve_balancer(request.param, rng=random.Random(1234))
    module, _, name = BALANCERS[request.param].partition(":")
    assert (type(resolved).__module__, type(resolved).__name__) == (module, name)
    return resolved


# -- contract: every balancer ------------------------------------------------


@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0], [0.5, 3.0, 1.0, 1.0], [1.0] * 64])
def test_choice_is_always_one_of_the_candidates(balancer: Balancer, weights: list[float]) -> None:
    instances = make_instances(weights)
    rng = random.Random(7)
    for _ in range(300):
        for inst in instances:  # arbitrary, changing loads
            inst.in_flight_requests = rng.randrange(0, 20)
            inst.in_flight_tokens = rng.randrange(0, 5000)
            inst.in_flight_prefill_tokens = rng.randrange(0, 3000)
        chosen = balancer.choose(instances, request(rng.randrange(1, 500), rng.randrange(1, 200)))
        assert any(chosen is c for c in instances)
        chosen = balancer.choose(instances, mixed_request(rng))
        assert any(chosen is c for c in instances)


def test_only_the_given_candidates_are_chosen(balancer: Balancer) -> None:
    # The pool passes only healthy instances; a balancer must never reach past them.
    instances = make_instances([5.0, 1.0, 1.0, 5.0])
    offered = instances[1:3]
    rng = random.Random(8)
    for _ in range(50):  # the full set first: cache and session affinity point outside ``offered``
        balancer.choose(instances, mixed_request(rng))
    chosen = {id(balancer.choose(offered, request())) for _ in range(200)}
    chosen |= {id(balancer.choose(offered, mixed_request(rng))) for _ in range(200)}
    assert chosen <= {id(c) for c in offered}


def test_balancer_does_not_write_the_books(balancer: Balancer) -> None:
    instances = make_instances([1.0, 2.0])
    before = [i.stats() for i in instances]
    rng = random.Random(9)
    for _ in range(50):
        balancer.choose(instances, request())
        balancer.choose(instances, mixed_request(rng))
    assert [i.stats() for i in instances] == before


def test_seeded_balancers_repeat_their_choices() -> None:
    for name in BALANCERS:
        runs = []
        for _ in range(2):
            b = resolve_balancer(name, rng=random.Random(99))
            instances = make_instances([1.0, 1.0, 1.0])
            rng = random.Random(10)
            requests = [request()] * 50 + [mixed_request(rng) for _ in range(50)]
            runs.append([b.choose(instances, r).index for r in requests])
        assert runs[0] == runs[1], name


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_idle_ties_are_spread_over_all_candidates(name: str) -> None:
    # With equal weights and no load nobody is preferred: every instance gets picked.
    b = resolve_balancer(name, rng=random.Random(3))
    instances = make_instances([1.0] * 4)
    picked = {b.choose(instances, request()).index for _ in range(200)}
    assert picked == {0, 1, 2, 3}


# -- policies ------------------------------------------------------------------


def test_weighted_random_follows_weights() -> None:
    b = WeightedRandom(rng=random.Random(5))
    instances = make_instances([1.0, 3.0])
    counts = [0, 0]
    for _ in range(4000):
        counts[b.choose(instances, request()).index] += 1
    assert abs(counts[1] / 4000 - 0.75) < 0.03


def test_least_outstanding_picks_fewest_requests_per_weight() -> None:
    b = LeastOutstanding(rng=random.Random(0))
    a, c = make_instances([1.0, 2.0])
    a.in_flight_requests = 2  # score (2+1)/1 = 3
    c.in_flight_requests = 4  # score (4+1)/2 = 2.5
    assert b.choose([a, c], request()) is c
    c.in_flight_requests = 6  # score 3.5
    assert b.choose([a, c], request()) is a


def test_least_outstanding_prefers_heavier_instance_at_idle() -> None:
    b = LeastOutstanding(rng=random.Random(0))
    a, c = make_instances([1.0, 2.0])
    assert all(b.choose([a, c], request()) is c for _ in range(20))


def test_token_aware_counts_tokens_not_requests() -> None:
    b = TokenAware(rng=random.Random(0))
    a, c = make_instances([1.0, 1.0])
    a.in_flight_requests, a.in_flight_tokens = 1, 4000  # one long prompt
    c.in_flight_requests, c.in_flight_tokens = 5, 500  # five short ones
    assert b.choose([a, c], request()) is c
    assert LeastOutstanding(rng=random.Random(0)).choose([a, c], request()) is a


def test_token_aware_respects_weights() -> None:
    b = TokenAware(rng=random.Random(0))
    a, c = make_instances([1.0, 3.0])
    a.in_flight_tokens = 1000  # (1000 + 30) / 1
    c.in_flight_tokens = 2500  # (2500 + 30) / 3
    assert b.choose([a, c], request()) is c


# -- registry --------------------------------------------------------------------


def test_resolve_accepts_class_instance_and_import_string() -> None:
    inst = LeastOutstanding()
    assert resolve_balancer(inst) is inst
    assert isinstance(resolve_balancer(TokenAware), TokenAware)
    assert isinstance(
        resolve_balancer("lylm.balancers.weighted_random:WeightedRandom"), WeightedRandom
    )


def test_resolve_rejects_unknown_names_with_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_balancer("fastest", path='models["m"].balancer')
    assert str(info.value) == (
        "models[\"m\"].balancer: unknown balancer 'fastest' "
        "(known: kv_aware, least_outstanding, prefix_aware, token_aware, weighted_random)"
    )


def test_resolve_rejects_imports_that_are_not_balancers() -> None:
    with pytest.raises(ConfigError, match="is not a Balancer subclass"):
        resolve_balancer("random:Random")
    with pytest.raises(ConfigError, match="cannot import balancer module"):
        resolve_balancer("no_such_module_xyz:Thing")
