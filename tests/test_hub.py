"""The hub and front-end workers' pools, in one process over the real ZeroMQ transport,
with FakeEngines: one pool seen whole from every worker (admission, balancers, books,
restarts), books that return to zero whatever is cancelled or lost, a silent hub, and
engine cores replaced under running workers. The same parts run across processes in
`tests/test_workers_server.py` and `tests/test_hangups.py`."""

from __future__ import annotations

import random
import tempfile
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from _helpers import fake_specs, until
from lylm import (
    EnginePool,
    EngineSpec,
    HubUnavailableError,
    LylmError,
    NoHealthyEngineError,
    OverloadedError,
    PoolConfig,
    RestartPolicy,
    ShuttingDownError,
)
from lylm.server import _hub_client, _wire
from lylm.server._hub import Hub
from lylm.server._hub_client import HubClient
from lylm.server._worker_pool import WorkerPool
from lylm.testing import FakeEngine, FakeSamplingParams

pytestmark = pytest.mark.anyio


class Core(FakeEngine):
    """The main process's engine of an instance: a stand-in for its engine core, which
    announces each start to the hub (as CoreEngine does)."""

    def __init__(self, spec: EngineSpec, cluster: Cluster) -> None:
        super().__init__()
        self.spec = spec
        self.cluster = cluster
        self.handle = (spec.name, len(cluster.cores.setdefault(spec.name, [])))
        cluster.cores[spec.name].append(self)

    async def start(self) -> None:
        await super().start()
        self.cluster.hub.core_started(self.spec.name, self.handle)

    def kill(self) -> None:
        # vLLM tells every front end attached to a core that dies.
        super().kill()
        for engine in self.cluster.front_ends(self.handle):
            engine.kill()


class Cluster:
    """A hub over Core engines and worker pools over attached FakeEngines."""

    def __init__(self, config: PoolConfig, token_delay: float) -> None:
        self.config = config
        self.token_delay = token_delay
        self.hub: Hub = None  # type: ignore[assignment]
        self.main: EnginePool = None  # type: ignore[assignment]
        self.workers: list[WorkerPool] = []
        #: Core engines by instance name, in start order (restarts append).
        self.cores: dict[str, list[Core]] = {}
        #: Attached engines by (worker slot, instance name), in attach order, with their handle.
        self.attached: dict[tuple[int, str], list[tuple[Any, FakeEngine]]] = {}
        #: Per worker slot: a hook the attach of that worker awaits (tests hold attaches with it).
        self.attach_gate: dict[int, anyio.Event] = {}

    def front_ends(self, handle: Any) -> list[FakeEngine]:
        return [e for engines in self.attached.values() for h, e in engines if h == handle]

    def hub_instance(self, index: int) -> Any:
        return self.main.instances()[index]

    def in_flight(self) -> list[tuple[int, int]]:
        return [(i.in_flight_requests, i.in_flight_tokens + i.in_flight_prefill_tokens) for i in self.main.instances()]

    def idle(self) -> bool:
        hub_idle = all(r == 0 and t == 0 for r, t in self.in_flight())
        workers_idle = all(i.in_flight_requests == 0 and i.in_flight_tokens == 0 and i.in_flight_prefill_tokens == 0
                           for w in self.workers for i in w.instances())
        return hub_idle and workers_idle and not any(w.bookings for w in self.hub.workers.values())

    async def add_worker(self, slot: int) -> WorkerPool:
        client = HubClient(self.hub.address, slot=slot, identity=f"w{slot}.{len(self.workers)}".encode())
        cluster = self

        class Attached(FakeEngine):
            def __init__(self, spec: EngineSpec, handle: Any) -> None:
                super().__init__(token_delay=cluster.token_delay)
                cluster.attached.setdefault((slot, spec.name), []).append((handle, self))

            async def start(self) -> None:
                gate = cluster.attach_gate.get(slot)
                if gate is not None:
                    await gate.wait()
                await super().start()

        await client.connect(timeout=5)
        pool = WorkerPool(self.config, hub=client, attach=Attached, health_interval=0.02)
        await pool.start()
        client.ready()
        self.workers.append(pool)
        return pool


@asynccontextmanager
async def cluster(
    weights: list[float],
    *,
    workers: int = 2,
    token_delay: float = 0.0,
    seed: int = 0,
    **options: Any,
) -> AsyncIterator[Cluster]:
    balancer = options.pop("balancer", "weighted_random")
    if not isinstance(balancer, str):  # an instance: the main pool's alone, as lylm.server passes it
        options["balancer"] = balancer
        balancer = "weighted_random"
    config = PoolConfig.from_specs(fake_specs(weights), balancer=balancer)
    c = Cluster(config, token_delay)
    directory = tempfile.mkdtemp(prefix="lylm-test-hub-")
    c.main = EnginePool(
        config,
        engine_factory=lambda spec: Core(spec, c),
        rng=random.Random(seed),
        restart=RestartPolicy(initial_backoff=0.01, jitter=0),
        **{"health_interval": 0.02, **options},
    )
    c.hub = Hub(c.main, address=f"ipc://{directory}/hub")
    c.hub.bind()
    c.hub.start()
    await c.main.start()
    try:
        for slot in range(workers):
            await c.add_worker(slot)
        await until(lambda: c.hub.ready_count() == workers, timeout=5)
        yield c
    finally:
        for pool in c.workers:
            await pool.aclose()
            await pool.hub.close()
        await c.main.aclose()
        c.hub.close()


async def run(pool: WorkerPool, prompt: str = "hello", max_tokens: int = 4, **kwargs: Any) -> list[Any]:
    return [o async for o in pool.generate("m", prompt, FakeSamplingParams(max_tokens=max_tokens), **kwargs)]


# -- one pool, seen whole from every worker ---------------------------------------


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
        await until(lambda: c.idle() and sum(i.completed for i in c.main.instances()) == 2)
        # Refused at the hub: nothing was booked, so nothing had to be ended.
        assert c.hub.reconciled == 0


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


async def test_prefix_aware_gets_block_hashes_not_the_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[Any, ...]] = []
    fields = _wire.request_fields

    def spy(request: Any, token_ids: bool) -> tuple[Any, ...]:
        sent.append(fields(request, token_ids))
        return sent[-1]

    monkeypatch.setattr(_wire, "request_fields", spy)
    async with cluster([1, 1], balancer="prefix_aware") as c:
        prompt = "x" * 100  # 100 byte-tokens: 6 full blocks of 16
        await run(c.workers[0], prompt)
        ids, hashes = sent[0][5], sent[0][6]
        assert ids == () and isinstance(hashes, bytes) and len(hashes) == 6 * 8
        assert len(c.main.balancer("m").table) == 6  # type: ignore[attr-defined]
    async with cluster([1, 1], balancer="least_outstanding") as c:
        sent.clear()
        await run(c.workers[0], "y" * 100)
        assert sent[0][5] == () and sent[0][6] == ()  # it reads neither


async def test_the_weighted_split_holds_over_workers() -> None:
    async with cluster([1, 2], seed=7) as c:
        async with anyio.create_task_group() as tg:
            for k in range(600):
                tg.start_soon(run, c.workers[k % 2], f"r{k}", 2)
        await until(lambda: sum(i.completed for i in c.main.instances()) == 600)
        completed = [i.completed for i in c.main.instances()]
        assert 0.28 < completed[0] / 600 < 0.39, completed
        # Each worker reported its own share; the hub's books are their sum.
        for index, instance in enumerate(c.main.instances()):
            assert instance.completed == sum(w.instances()[index].completed for w in c.workers)
        assert c.hub.requests_by_slot == {0: 300, 1: 300}


async def test_the_hubs_books_add_up_and_return_to_zero() -> None:
    async with cluster([1, 1], token_delay=0.01) as c:
        a, b = c.workers
        await run(a, "complete me", 5)
        async with aclosing(b.generate("m", "abandon me", FakeSamplingParams(max_tokens=50))) as stream:
            async for _ in stream:
                break  # the caller leaves after one output: aborted
        hub = c.main.instances()
        await until(lambda: c.idle() and sum(i.aborted for i in hub) == 1)
        assert sum(i.completed for i in hub) == 1
        assert sum(i.prompt_tokens for i in hub) == len("complete me") + len("abandon me")
        assert sum(i.generated_tokens for i in hub) == sum(i.generated_tokens for w in c.workers for i in w.instances())
        assert c.hub.reconciled == 0


async def test_progress_of_streaming_requests_reaches_the_hub() -> None:
    async with cluster([1], token_delay=0.05) as c:
        async with aclosing(c.workers[0].generate("m", "x" * 10, FakeSamplingParams(max_tokens=40))) as stream:
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 10:
                    at = c.hub_instance(0)
                    # Within a report interval the hub sees the prompt and the tokens done.
                    await until(lambda: at.generated_tokens >= 10, timeout=1.0)
                    assert at.prompt_tokens == 10
                    assert at.in_flight_tokens <= 10 + 40 - 10 - 10
                    break


# -- books that cannot leak ----------------------------------------------------------


@pytest.mark.parametrize("workers", [2, 4])
async def test_a_request_cancelled_at_any_await_leaves_nothing_booked(workers: int) -> None:
    # The request's task is cancelled after 0, 1, 2, ... turns of the event loop, which
    # runs the worker and the hub alike: before the choice is sent, while it is awaited,
    # as its answer lands, as the stream starts, while it streams, at its end.
    async with cluster([1, 1], workers=workers, token_delay=0.0) as c:
        turns = 0
        whole = 0
        while whole < 3:  # until it runs whole three times in a row: every await was hit
            pool = c.workers[turns % workers]
            finished = False
            request_scope = anyio.CancelScope()

            async def request(pool: WorkerPool = pool, n: int = turns) -> None:
                nonlocal finished
                with request_scope:
                    await run(pool, f"r{n}", 6)
                    finished = True
                tg.cancel_scope.cancel()  # done (or cancelled): the canceller stops

            async def cancel_after(n: int = turns) -> None:
                for _ in range(n):
                    await anyio.lowlevel.checkpoint()
                request_scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(request)
                tg.start_soon(cancel_after)
            whole = whole + 1 if finished else 0
            await until(c.idle, timeout=2)
            turns += 1
        assert turns > 10  # the whole request path was walked
        hub = c.main.instances()
        ended = sum(i.completed + i.aborted + i.failed + i.bounced for i in hub)
        assert ended == sum(i.dispatched for i in hub) > 0
        # Every booking was ended by its worker, none by the hub's reconciliation.
        assert c.hub.reconciled == 0


async def test_cancelled_while_awaiting_the_choice_under_load() -> None:
    # The leak of issue 26: clients that hang up while the worker awaits the hub's answer.
    async with cluster([1, 1], workers=2, token_delay=0.001) as c:
        for round_ in range(20):
            async with anyio.create_task_group() as tg:
                for k in range(20):
                    tg.start_soon(run, c.workers[k % 2], f"r{round_}.{k}", 20)
                await anyio.lowlevel.checkpoint()
                await anyio.lowlevel.checkpoint()
                tg.cancel_scope.cancel()
        await until(c.idle, timeout=3)
        assert c.hub.reconciled == 0


async def test_a_lost_end_is_reconciled_by_the_next_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    async with cluster([1, 1]) as c:
        client = c.workers[0].hub
        original = client.end
        lost: list[int] = []

        def lossy(booking: int, end: Any) -> None:
            if not lost:  # the first end never reaches the hub
                lost.append(booking)
                client._open.pop(booking, None)
                return
            original(booking, end)

        monkeypatch.setattr(client, "end", lossy)
        await run(c.workers[0], "lost", 3)
        await run(c.workers[0], "kept", 3)
        # One heartbeat later (0.25 s) the hub ends what the worker no longer holds.
        await until(c.idle, timeout=2)
        assert lost and c.hub.reconciled == 1
        assert sum(i.failed for i in c.main.instances()) == 1
        assert sum(i.completed for i in c.main.instances()) == 1


async def test_a_worker_gone_ends_every_request_it_held() -> None:
    async with cluster([1, 1], token_delay=0.05) as c:
        worker = c.workers[1]
        async with anyio.create_task_group() as tg:
            for k in range(4):
                tg.start_soon(run, worker, f"r{k}", 100)
            await until(lambda: sum(r for r, _ in c.in_flight()) == 4)
            identity = worker.hub.identity
            assert c.hub.worker_gone(identity) == 4
            assert c.in_flight() == [(0, 0), (0, 0)]
            assert sum(i.failed for i in c.main.instances()) == 4 and c.hub.reconciled == 4
            tg.cancel_scope.cancel()
        # What the gone worker still says is ignored: nothing is booked twice or taken back.
        await anyio.sleep(0.1)
        assert c.in_flight() == [(0, 0), (0, 0)]


# -- a silent hub ----------------------------------------------------------------------


async def test_a_silent_hub_fails_requests_within_about_a_second_and_recovers() -> None:
    async with cluster([1, 1], token_delay=0.02) as c:
        worker = c.workers[0]
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, worker, "streams on", 60)  # already running: unaffected
            await until(lambda: sum(r for r, _ in c.in_flight()) == 1)
            c.hub.stop()  # stalled: it reads nothing, answers nothing
            started = anyio.current_time()
            with pytest.raises(HubUnavailableError):
                await run(worker, "waits for a silent hub")
            waited = anyio.current_time() - started
            assert waited < _hub_client.HUB_TIMEOUT + 0.6, waited
            # While it stays silent, new requests fail at once.
            started = anyio.current_time()
            with pytest.raises(HubUnavailableError) as caught:
                await run(worker, "fails fast")
            assert anyio.current_time() - started < 0.1 and caught.value.retry_after >= 1
            c.hub.start()  # back: what was queued is handled, heartbeats answered
            await until(lambda: worker.hub.available, timeout=2)
        assert (await run(worker, "served again"))[-1].finished
        await until(c.idle, timeout=2)
        assert c.hub.reconciled == 0
        assert c.hub_instance(0).completed + c.hub_instance(1).completed == 2


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
    from lylm.server._wire import decode_error, encode_error

    error = decode_error(encode_error(OverloadedError("m", "full", retry_after=2.5)))
    assert isinstance(error, OverloadedError) and error.retry_after == 2.5 and "full" in str(error)
    assert type(decode_error(encode_error(KeyError("x")))).__name__ == "EngineError"


# -- engine cores replaced -------------------------------------------------------------


async def test_a_restarted_core_is_offered_to_each_worker_once_it_attached() -> None:
    async with cluster([1, 1]) as c:
        name = c.hub_instance(0).name
        c.cores[name][0].kill()
        await until(lambda: c.hub_instance(0).restarts == 1 and c.hub_instance(0).healthy)
        await until(lambda: all(not w.unattached for w in c.hub.workers.values()), timeout=5)
        for slot, pool in enumerate(c.workers):
            engines = c.attached[(slot, name)]
            assert len(engines) == 2 and engines[0][1].stopped and pool.instances()[0].engine is engines[1][1]
            assert engines[1][0] == c.cores[name][1].handle  # the new core's handle
        for k in range(20):
            await run(c.workers[k % 2], f"after {k}")
        assert all(e.requests for slot in (0, 1) for _, e in c.attached[(slot, name)][1:])
        assert sum(i.bounced for i in c.main.instances()) == 0


async def test_the_hub_does_not_wait_for_a_worker_that_is_slow_to_attach() -> None:
    async with cluster([1, 1]) as c:
        name = c.hub_instance(0).name
        gate = c.attach_gate[1] = anyio.Event()  # worker 1's attaches wait
        c.cores[name][0].kill()
        # The hub restarts the core and serves it again at once (no wait under a start lock).
        await until(lambda: c.hub_instance(0).restarts == 1 and c.hub_instance(0).healthy, timeout=2)
        slow = next(w for w in c.hub.workers.values() if w.slot == 1)
        fast = next(w for w in c.hub.workers.values() if w.slot == 0)
        await until(lambda: name not in fast.unattached)
        assert name in slow.unattached
        # Worker 1 gets only the other instance meanwhile; worker 0 gets both.
        for k in range(10):
            await run(c.workers[1], f"slow {k}")
        assert c.workers[1].instances()[1].completed == 10 and c.workers[1].instances()[0].completed == 0
        gate.set()
        await until(lambda: name not in slow.unattached)
        assert sum(i.bounced for i in c.main.instances()) == 0


async def test_two_quick_restarts_leave_every_worker_on_the_newest_core() -> None:
    async with cluster([1, 1]) as c:
        name = c.hub_instance(0).name
        gate = c.attach_gate[0] = anyio.Event()
        c.cores[name][0].kill()
        await until(lambda: c.hub_instance(0).restarts == 1 and c.hub_instance(0).healthy)
        c.cores[name][1].kill()  # worker 0 is still attaching to the second core
        await until(lambda: c.hub_instance(0).restarts == 2 and c.hub_instance(0).healthy)
        gate.set()
        newest = c.cores[name][2].handle
        await until(lambda: all(not w.unattached for w in c.hub.workers.values()), timeout=5)
        for slot in (0, 1):
            assert c.workers[slot].instances()[0].engine is c.attached[(slot, name)][-1][1]
            assert c.attached[(slot, name)][-1][0] == newest
        assert all(w.attached[name] == 3 for w in c.hub.workers.values())


async def test_a_worker_that_starts_during_a_restart_attaches_to_the_current_core() -> None:
    async with cluster([1, 1], workers=1) as c:
        name = c.hub_instance(0).name
        c.cores[name][0].kill()
        await until(lambda: c.hub_instance(0).restarts == 1)
        pool = await c.add_worker(1)  # started after: welcomed with the new core's handle
        assert c.attached[(1, name)][-1][0] == c.cores[name][1].handle
        await until(lambda: name not in next(w for w in c.hub.workers.values() if w.slot == 1).unattached)
        assert (await run(pool, "new worker"))[-1].finished


async def test_a_worker_that_sees_its_engine_die_tells_the_hub_at_once() -> None:
    async with cluster([1, 1], health_interval=30.0) as c:  # the hub's own watch would take 30 s
        name = c.hub_instance(0).name
        for _, engine in c.attached[(0, name)]:
            engine.kill()  # worker 0's front end hears of the core's death
        await until(lambda: c.hub_instance(0).state != "healthy" or c.hub_instance(0).restarts, timeout=2)


async def test_a_choice_the_worker_cannot_use_is_bounced_not_failed() -> None:
    async with cluster([1, 1], seed=1) as c:
        worker = c.workers[0]
        local = worker.instances()[0]
        # The worker does not tell the hub (as if its word were lost): the hub still
        # offers instance 0, and the worker bounces it and asks again without it.
        worker._supervisor.on_failed = None
        local.engine.kill()  # type: ignore[attr-defined]
        outcomes = [await run(worker, f"r{k}") for k in range(10)]
        assert all(o[-1].finished for o in outcomes)
        await until(c.idle)
        hub = c.main.instances()
        assert hub[1].completed == 10 and hub[0].failed == 0
        assert hub[0].bounced == hub[0].dispatched


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


async def test_a_worker_whose_engine_died_serves_elsewhere_until_the_core_is_back() -> None:
    async with cluster([1, 1], token_delay=0.02) as c:
        worker = c.workers[0]
        local = worker.instances()[0]
        local.engine.kill()  # type: ignore[attr-defined]
        await until(lambda: not local.healthy)
        for k in range(10):
            assert (await run(worker, f"r{k}"))[-1].finished
        # The worker's word restarted the core (the hub saw nothing wrong itself), and
        # every request was served whole, by whichever instance was up.
        await until(lambda: c.idle() and c.hub_instance(0).restarts == 1)
        hub = c.main.instances()
        assert sum(i.completed for i in hub) == 10 and sum(i.failed for i in hub) == 0


async def test_a_workers_health_and_metrics_say_503_while_its_hub_is_silent() -> None:
    from lylm.openai import OpenAIError
    from lylm.server._monitor import HubMonitor

    from lylm.openai._monitor import health_report

    async with cluster([1, 1]) as c:
        c.hub.handlers["health"] = lambda: health_report(c.main)
        c.hub.handlers["metrics"] = lambda: b"lylm_up 1\n"
        monitor = HubMonitor(c.workers[0])
        assert (await monitor.health())[0] == 200 and await monitor.metrics() == b"lylm_up 1\n"
        c.hub.stop()
        await until(lambda: not c.workers[0].hub.available, timeout=3)
        status, body = await monitor.health()
        assert status == 503 and body["status"] == "unavailable" and "hub" in body["error"]
        with pytest.raises(OpenAIError) as caught:
            await monitor.metrics()
        assert caught.value.status == 503 and caught.value.headers == {"Retry-After": "1"}
        c.hub.start()
        await until(lambda: c.workers[0].hub.available, timeout=3)
        assert (await monitor.health())[0] == 200


async def test_a_preparer_that_does_not_pickle_makes_workers_send_token_ids() -> None:
    from lylm.balancers import PrefixAware

    class Local(PrefixAware):
        def preparer(self) -> Any:
            return lambda request: request  # a closure: no pickle

    async with cluster([1, 1], balancer=Local()) as c:
        assert c.workers[0].hub.needs["m"] == (True, None)
        shared = "the same long system prompt for every question " * 2
        for k in range(6):
            await run(c.workers[k % 2], shared + str(k))
        # Still affine: the hub hashed the token ids itself.
        assert sorted(i.dispatched for i in c.main.instances()) == [0, 6]
