"""The hub and front-end workers' pools, in one process over the real ZeroMQ transport,
with FakeEngines: one pool seen whole from every worker (admission, balancers, books,
restarts). The same parts run across processes in `tests/test_openai_server.py`'s
two-worker server."""

from __future__ import annotations

import random
import tempfile
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import anyio
import pytest

from _helpers import fake_specs
from lylm import (
    EnginePool,
    EngineSpec,
    LylmError,
    NoHealthyEngineError,
    OverloadedError,
    PoolConfig,
    RestartPolicy,
    ShuttingDownError,
)
from lylm.server._hub import Hub, HubClient, decode_error, encode_error
from lylm.server._worker_pool import WorkerPool
from lylm.testing import FakeEngine, FakeSamplingParams

pytestmark = pytest.mark.anyio


class Cluster:
    """A hub over launcher FakeEngines and ``workers`` WorkerPools over attached FakeEngines."""

    def __init__(self, main: EnginePool, hub: Hub, workers: list[WorkerPool]) -> None:
        self.main = main
        self.hub = hub
        self.workers = workers
        #: Launcher engines by instance name, in start order (restarts append).
        self.launched: dict[str, list[FakeEngine]] = {}
        #: Attached engines by (worker, instance name), in attach order.
        self.attached: dict[tuple[int, str], list[FakeEngine]] = {}

    def hub_instance(self, index: int) -> Any:
        return self.main.instances()[index]

    def in_flight(self) -> list[tuple[int, int]]:
        return [(i.in_flight_requests, i.in_flight_tokens) for i in self.main.instances()]


@asynccontextmanager
async def cluster(
    weights: list[float],
    *,
    workers: int = 2,
    token_delay: float = 0.0,
    seed: int = 0,
    **options: Any,
) -> AsyncIterator[Cluster]:
    config = PoolConfig.from_specs(fake_specs(weights), balancer=options.pop("balancer", "weighted_random"))
    directory = tempfile.mkdtemp(prefix="lylm-test-hub-")
    holder: dict[str, Any] = {}
    generations: dict[str, int] = {}

    class Launched(FakeEngine):
        # A launcher whose restart re-attaches the workers, as CoreEngine's does.
        def __init__(self, spec: EngineSpec) -> None:
            super().__init__()
            self.spec = spec
            launched = holder["cluster"].launched.setdefault(spec.name, []) if "cluster" in holder else None
            self.handle = (spec.name, len(launched) if launched is not None else 0)
            if launched is not None:
                launched.append(self)

        async def start(self) -> None:
            await super().start()
            generations[self.spec.name] = generations.get(self.spec.name, 0) + 1
            if "hub" in holder:
                await holder["hub"].attach(self.spec.name, generations[self.spec.name], self.handle)

    main = EnginePool(
        config,
        engine_factory=Launched,
        rng=random.Random(seed),
        health_interval=0.02,
        restart=RestartPolicy(initial_backoff=0.01, jitter=0),
        **options,
    )
    await main.start()
    hub = Hub(main, workers=workers, address=f"ipc://{directory}/hub")
    hub.bind()
    result = Cluster(main, hub, [])
    result.launched = {i.name: [i.engine] for i in main.instances()}  # type: ignore[misc]
    holder["cluster"], holder["hub"] = result, hub
    async with anyio.create_task_group() as tg:
        tg.start_soon(hub.serve)
        for w in range(workers):
            client = HubClient(hub.address, w)

            def attach(spec: EngineSpec, handle: Any, w: int = w) -> FakeEngine:
                engine = FakeEngine(token_delay=token_delay)
                result.attached.setdefault((w, spec.name), []).append(engine)
                return engine

            pool = WorkerPool(
                config,
                hub=client,
                attach=attach,
                handles={i.name: i.engine.handle for i in main.instances()},  # type: ignore[attr-defined]
                health_interval=0.02,
            )
            await client.connect()
            await pool.start()
            await client.ready()
            result.workers.append(pool)
        with anyio.fail_after(5):
            await hub.wait_ready()
        try:
            yield result
        finally:
            for pool in result.workers:
                await pool.aclose()
                await pool.hub.close()
            await main.aclose()
            hub.close()
            tg.cancel_scope.cancel()


async def run(pool: WorkerPool, prompt: str = "hello", max_tokens: int = 4, **kwargs: Any) -> list[Any]:
    return [o async for o in pool.generate("m", prompt, FakeSamplingParams(max_tokens=max_tokens), **kwargs)]


async def until(condition: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)


async def test_admission_counts_every_workers_requests() -> None:
    async with cluster([1, 1], token_delay=0.02, max_in_flight_requests=2) as c:
        a, b = c.workers
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, a, "one", 50)
            tg.start_soon(run, b, "two", 50)
            await until(lambda: sum(r for r, _ in c.in_flight()) == 2)
            # One request in flight per worker: the third is refused whichever worker takes it.
            for pool in (a, b):
                with pytest.raises(OverloadedError) as caught:
                    await run(pool)
                assert caught.value.model == "m" and caught.value.retry_after > 0
        await until(lambda: c.in_flight() == [(0, 0), (0, 0)] and sum(i.completed for i in c.main.instances()) == 2)


async def test_least_outstanding_sees_the_load_other_workers_put_on_engines() -> None:
    async with cluster([1, 1], token_delay=0.02, balancer="least_outstanding") as c:
        async with anyio.create_task_group() as tg:
            for k in range(6):
                tg.start_soon(run, c.workers[k % 2], f"r{k}", 40)
                await until(lambda k=k: sum(r for r, _ in c.in_flight()) == k + 1)
            # Alternating workers, yet the engines took turns: each saw the other's load.
            assert [r for r, _ in c.in_flight()] == [3, 3]
        assert [i.dispatched for i in c.main.instances()] == [3, 3]


async def test_prefix_aware_keeps_a_prefix_on_one_engine_whichever_worker_took_it() -> None:
    async with cluster([1, 1, 1, 1], balancer="prefix_aware", seed=3) as c:
        shared = "a system prompt that every request of this conversation starts with " * 2
        for k in range(12):
            await run(c.workers[k % 2], shared + f"question {k}")
        served = [i.dispatched for i in c.main.instances()]
        assert sorted(served) == [0, 0, 0, 12], served
        assert c.main.balancer("m").by_prefix == 11  # type: ignore[attr-defined]


async def test_the_weighted_split_holds_over_workers() -> None:
    async with cluster([1, 2], seed=7) as c:
        async with anyio.create_task_group() as tg:
            for k in range(600):
                tg.start_soon(run, c.workers[k % 2], f"r{k}", 2)
        # Ends reach the hub a loop turn after the caller saw them.
        await until(lambda: sum(i.completed for i in c.main.instances()) == 600)
        completed = [i.completed for i in c.main.instances()]
        assert 0.28 < completed[0] / 600 < 0.39, completed
        # Each worker reported its own share; the hub's books are their sum.
        for index, instance in enumerate(c.main.instances()):
            assert instance.completed == sum(w.instances()[index].completed for w in c.workers)
        assert c.hub.requests_by_worker == [300, 300]


async def test_the_hubs_books_add_up_and_return_to_zero() -> None:
    async with cluster([1, 1], token_delay=0.01) as c:
        a, b = c.workers
        await run(a, "complete me", 5)
        async with aclosing(b.generate("m", "abandon me", FakeSamplingParams(max_tokens=50))) as stream:
            async for _ in stream:
                break  # the caller leaves after one output: aborted
        hub = c.main.instances()
        await until(lambda: c.in_flight() == [(0, 0), (0, 0)] and sum(i.aborted for i in hub) == 1)
        assert sum(i.completed for i in hub) == 1
        assert sum(i.prompt_tokens for i in hub) == len("complete me") + len("abandon me")
        assert sum(i.generated_tokens for i in hub) == sum(i.generated_tokens for w in c.workers for i in w.instances())


async def test_progress_of_streaming_requests_reaches_the_hub() -> None:
    async with cluster([1], token_delay=0.05) as c:
        async with aclosing(c.workers[0].generate("m", "x" * 10, FakeSamplingParams(max_tokens=40))) as stream:
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 10:
                    break_at = c.hub_instance(0)
                    # Within a flush interval the hub sees prompt and tokens done.
                    await until(lambda: break_at.generated_tokens >= 10, timeout=1.0)
                    assert break_at.prompt_tokens == 10
                    assert break_at.in_flight_tokens <= 10 + 40 - 10 - 10
                    break


async def test_hub_errors_reach_workers_as_themselves() -> None:
    async with cluster([1, 1]) as c:
        for instance in c.main.instances():
            instance.engine.kill()  # type: ignore[attr-defined]
            c.main._supervisor.engine_failed(instance, "test")
        with pytest.raises(NoHealthyEngineError):
            await run(c.workers[0])
    async with cluster([1]) as c:
        await c.main.drain(0)
        with pytest.raises(ShuttingDownError):
            await run(c.workers[1])
    error = decode_error(encode_error(OverloadedError("m", "full", retry_after=2.5)))
    assert isinstance(error, OverloadedError) and error.retry_after == 2.5 and "full" in str(error)
    assert type(decode_error(encode_error(KeyError("x")))).__name__ == "EngineError"


async def test_a_restarted_engine_is_reattached_in_every_worker_before_it_serves() -> None:
    async with cluster([1, 1]) as c:
        name = c.hub_instance(0).name
        c.launched[name][0].kill()
        await until(lambda: c.hub_instance(0).restarts == 1 and c.hub_instance(0).healthy)
        # The hub marked it healthy only once both workers had attached to the new core.
        for w, pool in enumerate(c.workers):
            engines = c.attached[(w, name)]
            assert len(engines) == 2 and engines[0].stopped and pool.instances()[0].engine is engines[1]
            assert pool.instances()[0].restarts == 1
        for k in range(20):
            await run(c.workers[k % 2], f"after {k}")
        assert all(e.requests for w in (0, 1) for e in c.attached[(w, name)][1:])


async def test_a_worker_whose_engine_is_not_attached_serves_elsewhere() -> None:
    async with cluster([1, 1]) as c:
        worker = c.workers[0]
        worker.instances()[0].engine.kill()  # type: ignore[attr-defined]
        await until(lambda: not worker.instances()[0].healthy)
        for k in range(10):
            outputs = await run(worker, f"r{k}")
            assert outputs[-1].finished
        await until(lambda: c.in_flight() == [(0, 0), (0, 0)] and c.hub_instance(1).completed == 10)


async def test_runtime_membership_and_shadows_need_a_single_process() -> None:
    async with cluster([1]) as c:
        pool = c.workers[0]
        for call in (
            lambda: pool.add_instance("m"),
            lambda: pool.drain_instance(pool.instances()[0]),
            lambda: pool.remove_instance(pool.instances()[0]),
        ):
            with pytest.raises(LylmError, match="--workers 1"):
                await call()
        with pytest.raises(LylmError, match="--workers 1"):
            pool.add_shadow("m", "least_outstanding")
