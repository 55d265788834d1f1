"""Shadow mode: a candidate balancer beside the active one, counted, never routing."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import pytest

from _helpers import fake_specs
from lylm import Balancer, EnginePool, Instance, RequestInfo, UnknownModelError
from lylm.testing import FakeEngine, FakeSamplingParams

pytestmark = pytest.mark.anyio


class Fixed(Balancer):
    """Always the candidate at one position (for exact expectations)."""

    def __init__(self, position: int) -> None:
        self.position = position
        self.calls = 0

    def choose(self, candidates: Sequence[Instance], request: RequestInfo) -> Instance:
        self.calls += 1
        return candidates[self.position]


class Alternating(Balancer):
    """First, second, first, ...: agrees with Fixed(0) every other time."""

    def __init__(self) -> None:
        self.n = 0

    def choose(self, candidates: Sequence[Instance], request: RequestInfo) -> Instance:
        self.n += 1
        return candidates[(self.n - 1) % 2]


class Broken(Balancer):
    def choose(self, candidates: Sequence[Instance], request: RequestInfo) -> Instance:
        raise RuntimeError("candidate bug")


class Stranger(Balancer):
    """Returns an instance that is not among the candidates."""

    def __init__(self, other: Instance | None = None) -> None:
        self.other = other

    def choose(self, candidates: Sequence[Instance], request: RequestInfo) -> Instance:
        assert self.other is not None
        return self.other


def pool(active: Balancer | str, weights: Sequence[float] = (1.0, 1.0)) -> EnginePool:
    return EnginePool.from_config(
        fake_specs(list(weights)), balancer=active, rng=random.Random(0),
        engine_factory=lambda spec: FakeEngine(),
    )


async def serve(p: EnginePool, n: int, prompt: str = "hello there") -> None:
    for _ in range(n):
        async for _ in p.generate("m", prompt, FakeSamplingParams(max_tokens=2)):
            pass


async def test_agreements_choices_and_disagreements_are_counted() -> None:
    async with pool(Fixed(0)) as p:
        p.add_shadow("m", Fixed(0), name="same")
        p.add_shadow("m", Alternating(), name="alt")
        p.add_shadow("m", Fixed(1), name="other")
        await serve(p, 10)
        reports = {r.name: r for r in p.shadow_report("m")}
        served = [s.completed for s in p.stats()["m"]]
    assert served == [10, 0]  # routing followed the active balancer only
    same, alt, other = reports["same"], reports["alt"], reports["other"]
    assert (same.decisions, same.agreements, same.errors, same.agreement_rate) == (10, 10, 0, 1.0)
    assert same.chosen == {0: 10} and same.disagreements == {}
    assert (alt.agreements, alt.chosen, alt.disagreements) == (5, {0: 5, 1: 5}, {(0, 1): 5})
    assert alt.agreement_rate == 0.5
    assert (other.agreements, other.chosen, other.disagreements) == (0, {1: 10}, {(0, 1): 10})


async def test_a_raising_shadow_never_breaks_routing_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with pool("least_outstanding") as p:
        p.add_shadow("m", Broken(), name="broken")
        with caplog.at_level(logging.WARNING, logger="lylm"):
            await serve(p, 6)
        [report] = p.shadow_report()
        completed = sum(s.completed for s in p.stats()["m"])
    assert completed == 6
    assert (report.decisions, report.errors, report.agreements) == (6, 6, 0)
    assert report.last_error == "RuntimeError: candidate bug"
    assert report.agreement_rate == 0.0
    logged = [r for r in caplog.records if "shadow balancer 'broken'" in r.getMessage()]
    assert len(logged) == 1


async def test_a_shadow_returning_a_non_candidate_counts_as_an_error() -> None:
    stranger = Stranger()
    async with pool(Fixed(0)) as p, pool(Fixed(0)) as elsewhere:
        stranger.other = elsewhere.instances("m")[0]
        p.add_shadow("m", stranger, name="stranger")
        await serve(p, 3)
        [report] = p.shadow_report("m")
    assert (report.decisions, report.errors) == (3, 3)
    assert report.last_error is not None and "not one of the candidates" in report.last_error


async def test_prefix_aware_in_shadow_beside_weighted_random() -> None:
    # The use case: would prefix_aware have routed repeated prompts differently?
    async with pool("weighted_random", weights=(1.0, 1.0, 1.0)) as p:
        p.add_shadow("m", "prefix_aware", rng=random.Random(1))
        await serve(p, 30, prompt="a long shared system prompt, " * 4)
        [report] = p.shadow_report("m")
    assert report.name == "prefix_aware"
    assert report.decisions == 30 and report.errors == 0
    # One prefix, idle engines: the shadow keeps it on one engine; the active one does not.
    assert len(report.chosen) == 1
    assert 0 < report.agreements < 30


async def test_shadow_names_models_and_removal() -> None:
    async with pool(Fixed(0)) as p:
        with pytest.raises(UnknownModelError):
            p.add_shadow("nope", Fixed(0))
        p.add_shadow("m", Fixed(1))
        with pytest.raises(ValueError, match="already has a shadow named 'Fixed'"):
            p.add_shadow("m", Fixed(0))
        await serve(p, 2)
        p.remove_shadow("m", "Fixed")
        assert p.shadow_report() == []
        with pytest.raises(KeyError):
            p.remove_shadow("m", "Fixed")
        await serve(p, 2)  # routing without shadows still works
