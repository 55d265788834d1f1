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

from _helpers import until
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
            got = index.cached_tokens(name, block_hashes(prompt, index.granule, 512), len(prompt))
            assert got is not None  # the stream has seen the engine's blocks (128 tokens each)
            return got

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


async def test_a_pool_routed_by_kv_events_predicts_what_its_engines_report_and_forgets_a_restarted_engine(
    tmp_path: Path,
) -> None:
    import os
    import signal

    from lylm import RequestRecord, RestartPolicy

    model = build_tiny_model(tmp_path / "tiny")
    args = {**TINY_MODEL_ENGINE_ARGS, "model": str(model), "kv_cache_memory_bytes": 2 << 20}
    config = {"models": {"m": [{"engine_args": args}, {"engine_args": args}]}}
    records: list[RequestRecord] = []
    async with EnginePool.from_config(config, balancer="kv_aware", health_interval=0.1,
                                      restart=RestartPolicy(initial_backoff=0.1, jitter=0)) as pool:
        pool.add_observer(records.append)
        kv = pool._router.kv
        assert kv is not None
        x, y = pool.instances("m")

        async def settle() -> None:
            for instance in (x, y):
                await settled(kv.index, kv._subscriptions[instance.name].key)

        async def run(prompt: list[int]) -> tuple[str, Mapping[str, int], int]:
            async for out in pool.generate("m", prompt, SamplingParams(max_tokens=1, ignore_eos=True)):
                last = out
            await settle()
            record = records[-1]
            assert record.request.cached_tokens is not None
            return record.instance.name, dict(record.request.cached_tokens), int(last.num_cached_tokens or 0)

        rng = random.Random(1)
        a, b = ([rng.randrange(10, 500) for _ in range(300)] for _ in range(2))
        first, predicted, reported = await run(a)
        assert predicted == {x.name: 0, y.name: 0} and reported == 0
        # Again: where its two full blocks are cached, as the engine then reports.
        where, predicted, reported = await run(a)
        assert where == first and predicted[first] == 256 == reported
        where, predicted, reported = await run(b)  # nothing of it anywhere: the emptier engine
        assert where != first and predicted == {x.name: 0, y.name: 0} and reported == 0
        report = {a.instance: a for a in pool.kv_agreement()}
        assert report[first].blocks == report[where].blocks == 2  # 300 tokens: two full blocks each
        assert sum(a.exact for a in report.values()) == 3 and not any(a.over or a.under for a in report.values())

        # The engine that holds a is killed and restarted: its blocks are forgotten with it.
        holder = x if x.name == first else y
        old_key = kv._subscriptions[holder.name].key
        os.kill(holder.engine.process_ids()[0], signal.SIGKILL)  # type: ignore[attr-defined]
        await until(lambda: holder.restarts == 1 and holder.healthy, timeout=120)
        assert kv._subscriptions[holder.name].engine is holder.engine
        await until(lambda: old_key not in kv.index.instances(), timeout=5)
        where, predicted, reported = await run(a)
        assert predicted[holder.name] == 0 and predicted[where] == reported == 0



def test_with_two_workers_the_main_process_index_predicts_for_every_worker(tmp_path: Path) -> None:
    import json

    import httpx

    from _server import ServerProcess, metric

    model = build_tiny_model(tmp_path / "tiny")
    args = {**TINY_MODEL_ENGINE_ARGS, "model": str(model), "kv_cache_memory_bytes": 2 << 20}
    config = {"common": {"balancer": "kv_aware"}, "models": {"m": [{"engine_args": args}, {"engine_args": args}]}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    server = ServerProcess("--config", str(path), log=tmp_path / "serve.log", workers=2)
    try:
        server.wait_ready(timeout=240)
        rng = random.Random(2)
        prompts = [[rng.randrange(10, 500) for _ in range(300)] for _ in range(2)]
        requests = 12
        for i in range(requests):  # a new connection each: whichever worker takes it
            body = {"model": "m", "prompt": prompts[i % 2], "max_tokens": 1}
            r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
        # Every request was predicted from the engines' events (none from the table), and
        # exactly: the first of each prompt 0, the others its two full blocks.
        deadline = time.monotonic() + 10  # the last request's end reaches the hub after its response
        while True:
            predictions = metric(server.url, "lylm_kv_predictions_total")
            if sum(predictions.values()) == requests or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        by_result = {result: sum(v for k, v in predictions.items() if f'result="{result}"' in k)
                     for result in ("exact", "over", "under", "none")}  # fmt: skip
        assert by_result == {"exact": requests, "over": 0, "under": 0, "none": 0}, predictions
        reported = sum(metric(server.url, "lylm_kv_reported_tokens_total").values())
        assert sum(metric(server.url, "lylm_kv_predicted_tokens_total").values()) == reported == (requests - 2) * 256
        workers = metric(server.url, "lylm_worker_requests_total")
        print(f"\nrequests by worker: {workers}")
    finally:
        server.stop()
