"""Small builders shared by the fake-engine tests."""

from __future__ import annotations

from collections.abc import Sequence

from lylm import EngineSpec, Instance
from lylm.testing import FakeEngine


def make_instances(weights: Sequence[float], model: str = "m") -> list[Instance]:
    """Started instances on FakeEngines with the given weights (no pool involved)."""
    instances = []
    for index, weight in enumerate(weights):
        engine = FakeEngine()
        engine.started = True
        spec = EngineSpec(model=model, engine_args={"model": "fake"}, weight=weight, index=index)
        instances.append(Instance(spec, engine))
    return instances


def fake_specs(weights: Sequence[float], model: str = "m") -> list[EngineSpec]:
    """EngineSpecs for one model with the given weights."""
    return [
        EngineSpec(model=model, engine_args={"model": "fake"}, weight=w) for w in weights
    ]
