"""Small builders shared by the tests."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

from lylm import EngineSpec, Instance
from lylm.testing import FakeEngine, build_tiny_model

#: A strict function tool whose arguments the tiny model can finish quickly (a short enum).
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        # strict: vLLM 0.32 then puts the schema in the structural tag that forces a call
        # (without it only the call's envelope is forced).
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def greedy_tiny_model(directory: Path, cache: Path) -> Path:
    """A copy of the tiny model (built under ``cache``) whose generation config asks for
    greedy decoding, so that identical requests get identical answers."""
    model = directory / "tiny-greedy"
    shutil.copytree(build_tiny_model(cache / "tiny-model"), model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0}))
    return model


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


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds (fails the test after ``timeout`` s): synchronise
    on state, not on sleeps."""
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """:func:`until` for code off the event loop (threads, processes)."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still waiting after {timeout} s"
        time.sleep(0.01)
