"""Live engine signals and shadow counts as balancers and /metrics see them (fake engines)."""

from __future__ import annotations

import random

import pytest

from _helpers import fake_specs
from lylm import EnginePool
from lylm.openai._metrics import PoolMetrics
from lylm.testing import FakeEngine, FakeSamplingParams

pytestmark = pytest.mark.anyio


def samples(metrics: PoolMetrics, name: str) -> dict[str, float]:
    out = {}
    for line in metrics.render().decode().splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name):].rsplit(" ", 1)
            out[labels] = float(value)
    return out


async def test_engine_signals_are_instance_properties_stats_and_metrics() -> None:
    pool = EnginePool.from_config(
        fake_specs([1.0, 2.0]), rng=random.Random(0), engine_factory=lambda spec: FakeEngine()
    )
    async with pool:
        metrics = PoolMetrics(pool)
        a, b = pool.instances("m")
        # What an engine's stat logger does each step (VLLMEngine's, or the simulator's).
        a.engine.signals.prefix_cache_queries, a.engine.signals.prefix_cache_hits = 640, 512
        b.engine.signals.running, b.engine.signals.waiting = 3, 1
        assert (a.prefix_cache_queries, a.prefix_cache_hits) == (640, 512)
        assert (b.prefix_cache_queries, b.prefix_cache_hits, b.running, b.waiting) == (0, 0, 3, 1)
        stats = pool.stats()["m"]
        assert (stats[0].prefix_cache_queries, stats[0].prefix_cache_hits) == (640, 512)
        assert samples(metrics, "lylm_engine_prefix_cache_queries_total") == {
            '{engine="0",model="m"}': 640.0, '{engine="1",model="m"}': 0.0,
        }
        assert samples(metrics, "lylm_engine_prefix_cache_hits_total") == {
            '{engine="0",model="m"}': 512.0, '{engine="1",model="m"}': 0.0,
        }
        assert samples(metrics, "lylm_engine_waiting") == {
            '{engine="0",model="m"}': 0.0, '{engine="1",model="m"}': 1.0,
        }


async def test_shadow_counts_are_metrics() -> None:
    pool = EnginePool.from_config(
        fake_specs([1.0, 1.0]), balancer="least_outstanding", rng=random.Random(0),
        engine_factory=lambda spec: FakeEngine(),
    )
    async with pool:
        metrics = PoolMetrics(pool)
        assert samples(metrics, "lylm_shadow_decisions_total") == {}
        pool.add_shadow("m", "prefix_aware", rng=random.Random(0))
        for _ in range(8):
            async for _ in pool.generate("m", "same prompt " * 8, FakeSamplingParams(max_tokens=1)):
                pass
        [report] = pool.shadow_report("m")
        key = '{model="m",shadow="prefix_aware"}'
        assert samples(metrics, "lylm_shadow_decisions_total") == {key: 8.0}
        assert samples(metrics, "lylm_shadow_agreements_total") == {key: float(report.agreements)}
        assert samples(metrics, "lylm_shadow_errors_total") == {key: 0.0}
        choices = samples(metrics, "lylm_shadow_choices_total")
        assert sum(choices.values()) == 8.0
        assert choices == {
            f'{{engine="{e}",model="m",shadow="prefix_aware"}}': float(n) for e, n in report.chosen.items()
        }
