"""vLLM's KV events from a real engine (the CPU build) into the KV index: predictions equal the
engine's own cached-token counts, evictions are seen, a late subscriber and a lost batch are
replayed from the core's buffer.

One engine with a KV cache of a few blocks (the CPU build's blocks are 128 tokens) and prefix
caching on; its events go to IPC sockets in the test's folder.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest

from lylm import EnginePool
from lylm._kv_index import KVIndex
from lylm.balancers._prefix_table import block_hashes
from lylm.engines._kv_events import KVEventStream, kv_events_config, kv_events_endpoints
from lylm.testing import TINY_MODEL_ENGINE_ARGS, build_tiny_model

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.engines]


class LossyIndex(KVIndex):
    """Loses batch ``lose`` on its way once, as a congested subscriber would."""

    def __init__(self) -> None:
        super().__init__()
        self.lose: int | None = None
        self.lost: list[int] = []

    def apply(self, instance: str, seq: int, events: Iterable[Mapping[str, Any]]) -> bool:
        if seq == self.lose:
            self.lose = None
            self.lost.append(seq)
            return True
        return super().apply(instance, seq, events)


async def settled(index: KVIndex, instance: str, quiet: float = 0.3, timeout: float = 30) -> None:
    """Wait until no batch has arrived for ``quiet`` seconds (the engine's events are in)."""
    deadline = time.monotonic() + timeout
    last, since = index.expected(instance), time.monotonic()
    while time.monotonic() < deadline:
        await anyio.sleep(0.02)
        now = index.expected(instance)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    raise AssertionError("KV events kept coming")


async def test_the_index_predicts_the_engines_cached_tokens(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny")
    folder = tmp_path / "kv"
    folder.mkdir()
    endpoint, replay = kv_events_endpoints(str(folder))
    args = {
        **TINY_MODEL_ENGINE_ARGS, "model": str(model), "enable_prefix_caching": True,
        "kv_cache_memory_bytes": 2 << 20,  # about 14 blocks of 128 tokens
        "kv_events_config": kv_events_config(endpoint, replay),
    }  # fmt: skip
    index = LossyIndex()
    async with EnginePool.from_config({"models": {"m": [{"engine_args": args}]}}) as pool:
        name = pool.instances("m")[0].name
        size = 128

        async def cached(prompt: list[int]) -> int:
            params = SamplingParams(max_tokens=1, ignore_eos=True)
            async for out in pool.generate("m", prompt, params):
                last = out
            return int(last.num_cached_tokens or 0)

        def predicted(prompt: list[int]) -> int:
            return index.cached_tokens(name, block_hashes(prompt, size, 64), len(prompt))

        rng = random.Random(0)

        def prompt(n: int = 300) -> list[int]:  # the tiny model's vocabulary: 512 ids
            return [rng.randrange(10, 500) for _ in range(n)]

        a, b = prompt(), prompt()  # 300 tokens: 2 full blocks
        assert await cached(a) == 0  # published before anyone subscribed: replayed below
        stream = KVEventStream(index, name, endpoint, replay)
        stream.start()
        try:
            assert await cached(b) == 0
            await settled(index, name)
            assert stream.replays == 1 and index.block_size(name) == size
            # Repeated and shared prefixes: the index says what the engine then reports.
            shared = a[:128] + prompt(172)
            guesses = []
            for one in (a, b, shared, a):
                guesses.append(predicted(one))
                assert guesses[-1] == await cached(one), guesses
                await settled(index, name)
            assert guesses == [256, 256, 128, 256]
            # A lost batch: replayed from the core's buffer when the next one shows the gap.
            index.lose = index.expected(name)
            c, d = prompt(), prompt()
            for one in (c, d):
                await cached(one)
            await settled(index, name)
            assert index.lost and stream.replays == 2
            assert predicted(c) == 256
            # Evictions: long distinct prompts push the first ones out of the small cache.
            for _ in range(3):
                await cached(prompt(900))
            await settled(index, name)
            assert predicted(a) < 256 and predicted(b) < 256
            for again in (a, b):
                assert predicted(again) == await cached(again)
                await settled(index, name)
        finally:
            stream.stop()
        assert index.instances() == []  # stopped: the instance's blocks are forgotten
