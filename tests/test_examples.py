"""The README's custom-balancer example is real code, and it works."""

from __future__ import annotations

import importlib.util
import inspect
import random
import sys
from pathlib import Path

import pytest

from _helpers import fake_specs
from lylm import EnginePool
from lylm.testing import FakeEngine, FakeSamplingParams

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.anyio


def load_example(name: str) -> object:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # inspect.getsource looks the module up there
    spec.loader.exec_module(module)
    return module


def test_readme_shows_the_example_verbatim() -> None:
    example = load_example("custom_balancer")
    source = inspect.getsource(example.StickyByUser)  # type: ignore[attr-defined]
    assert source in (ROOT / "README.md").read_text()


async def test_sticky_balancer_keeps_users_on_one_instance() -> None:
    example = load_example("custom_balancer")
    pool = EnginePool.from_config(
        fake_specs([1.0, 1.0, 1.0]),
        balancer=example.StickyByUser(rng=random.Random(5)),  # type: ignore[attr-defined]
        engine_factory=lambda spec: FakeEngine(),
        rng=random.Random(0),
    )
    params = FakeSamplingParams(max_tokens=2)

    async def serve(n: int, user: str | None) -> list[int]:
        before = [s.dispatched for s in pool.stats()["m"]]
        for _ in range(n):
            async for _out in pool.generate("m", "hi", params, session_key=user):
                pass
        return [s.dispatched - b for s, b in zip(pool.stats()["m"], before)]

    async with pool:
        # Each user's requests all land on one instance...
        homes = set()
        for user in [f"user{i}" for i in range(12)]:
            counts = await serve(5, user)
            assert sorted(counts) == [0, 0, 5], (user, counts)
            homes.add(counts.index(5))
        assert len(homes) > 1  # ...users do not all share one instance...
        # ...and anonymous requests go to the least loaded, ties spread over all.
        assert all(count > 0 for count in await serve(30, None))
