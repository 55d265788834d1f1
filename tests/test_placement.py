"""Placement: the device variable at spawn, per-GPU start locks, parallel starts, lifecycle moves."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Any

import anyio
import pytest

from lylm import ConfigError, EnginePool, EngineSpec, EngineStartError, Instance, PoolConfig, RestartPolicy
from lylm._startup import Starter
from lylm.engines._placement import StartLocks, spawn_environment, visible_devices
from lylm.testing import FakeEngine

pytestmark = pytest.mark.anyio

VAR = "LYLM_TEST_VISIBLE_DEVICES"


# -- the variable's value ---------------------------------------------------------


def test_visible_devices_names_the_instance_gpus() -> None:
    kw: dict[str, Any] = {"variable": VAR, "environ": {}, "device_count": 4, "path": "p"}
    assert visible_devices([1], **kw) == "1"
    assert visible_devices([2, 3], **kw) == "2,3"
    assert visible_devices([3, 0], **kw) == "3,0"  # the instance's order: its device 0 is GPU 3


def test_visible_devices_maps_through_the_servers_own_restriction() -> None:
    # A server started with the variable set sees those GPUs as 0..N-1, as vLLM's DP ranks do.
    environ = {VAR: "4,6, 7"}
    assert visible_devices([0], variable=VAR, environ=environ, device_count=8, path="p") == "4"
    assert visible_devices([1, 2], variable=VAR, environ=environ, device_count=8, path="p") == "6,7"


@pytest.mark.parametrize(
    ("gpu_ids", "environ", "count", "message"),
    [
        ([0, 4], {}, 4, 'models["m"][1].devices.gpu_ids[1]: GPU 4 does not exist: this machine shows 4 devices (0-3)'),
        ([1], {}, 1, 'models["m"][1].devices.gpu_ids[0]: GPU 1 does not exist: this machine shows 1 device'),
        ([2], {VAR: "5,6"}, 8, f'models["m"][1].devices.gpu_ids[0]: GPU 2 does not exist: {VAR}=5,6 shows 2 devices (0-1)'),
    ],
)
def test_a_gpu_that_does_not_exist_is_a_config_error(
    gpu_ids: list[int], environ: dict[str, str], count: int, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        visible_devices(gpu_ids, variable=VAR, environ=environ, device_count=count, path='models["m"][1].devices.gpu_ids')
    assert str(info.value) == message


def test_an_unknown_device_count_does_not_block_pinning() -> None:
    assert visible_devices([5], variable=VAR, environ={}, device_count=None, path="p") == "5"


# -- the variable around one spawn -------------------------------------------------


def test_spawn_environment_sets_then_restores() -> None:
    env = {"KEEP": "1", VAR: "0,1"}
    with spawn_environment({VAR: "3", "NEW": "x"}, environ=env):
        assert env == {"KEEP": "1", VAR: "3", "NEW": "x"}
    assert env == {"KEEP": "1", VAR: "0,1"}
    with pytest.raises(RuntimeError):
        with spawn_environment({VAR: "2"}, environ=env):
            raise RuntimeError("spawn failed")
    assert env == {"KEEP": "1", VAR: "0,1"}


def test_spawn_environment_leaves_the_real_environment_as_it_was() -> None:
    assert VAR not in os.environ
    with spawn_environment({VAR: "7"}):
        assert os.environ[VAR] == "7"
    assert VAR not in os.environ


def test_concurrent_spawns_never_interleave_on_the_variable() -> None:
    """Each thread sees its own value for its whole block, and blocks never overlap."""
    log: list[tuple[str, int, str | None]] = []
    log_lock = threading.Lock()
    go = threading.Barrier(8)

    def spawn(i: int) -> None:
        go.wait()
        with spawn_environment({VAR: str(i)}):
            with log_lock:
                log.append(("in", i, os.environ.get(VAR)))
            for _ in range(200):  # give the other threads every chance to barge in
                assert os.environ.get(VAR) == str(i)
                os.sched_yield()
            with log_lock:
                log.append(("out", i, os.environ.get(VAR)))

    threads = [threading.Thread(target=spawn, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert len(log) == 16
    for enter, leave in zip(log[::2], log[1::2]):  # strictly in/out pairs of one thread
        assert enter[0] == "in" and leave[0] == "out" and enter[1] == leave[1]
        assert enter[2] == leave[2] == str(enter[1])
    assert VAR not in os.environ


# -- per-GPU start locks -----------------------------------------------------------


async def test_disjoint_gpus_hold_their_locks_at_the_same_time() -> None:
    locks = StartLocks()
    inside: set[str] = set()
    both = anyio.Event()

    async def start(owner: str, gpus: list[int]) -> None:
        async with locks.hold(gpus, owner):
            inside.add(owner)
            if len(inside) == 2:
                both.set()
            await both.wait()  # deadlocks (and times out) unless both are inside together

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(start, "a", [0, 1])
            tg.start_soon(start, "b", [2])


async def test_a_shared_gpu_is_held_by_one_start_at_a_time() -> None:
    locks = StartLocks()
    order: list[str] = []
    release = anyio.Event()

    async def start(owner: str, gpus: list[int], gate: anyio.Event | None) -> None:
        async with locks.hold(gpus, owner):
            order.append(f"{owner} in")
            if gate is not None:
                await gate.wait()
            order.append(f"{owner} out")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(start, "a", [0, 1], release)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(start, "b", [1], None)
            tg.start_soon(start, "cpu", [], None)  # unpinned: conflicts with everything
            await anyio.wait_all_tasks_blocked()
            assert order == ["a in"]
            assert locks.blockers("b") == ["a"] and locks.blockers("cpu") == ["a"]
            assert locks.blockers("a") == []
            release.set()
    assert order == ["a in", "a out", "b in", "b out", "cpu in", "cpu out"]


async def test_no_start_jumps_ahead_of_an_earlier_one_on_its_gpu() -> None:
    locks = StartLocks()
    order: list[str] = []
    gates = {name: anyio.Event() for name in ("a", "b", "c")}

    async def start(owner: str, gpus: list[int]) -> None:
        async with locks.hold(gpus, owner):
            order.append(owner)
            await gates[owner].wait()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(start, "a", [0])
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(start, "b", [0, 1])  # waits for a
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(start, "c", [1])  # GPU 1 is free, but b asked first
            await anyio.wait_all_tasks_blocked()
            assert order == ["a"]
            gates["a"].set()
            await anyio.wait_all_tasks_blocked()
            assert order == ["a", "b"]
            gates["b"].set()
            gates["c"].set()
    assert order == ["a", "b", "c"]


async def test_a_cancelled_wait_gives_its_place_up() -> None:
    locks = StartLocks()
    release = anyio.Event()
    entered: list[str] = []

    async def holder() -> None:
        async with locks.hold([0], "a"):
            await release.wait()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await anyio.wait_all_tasks_blocked()
            with anyio.move_on_after(0.01):
                async with locks.hold([0], "b"):
                    entered.append("b")
            release.set()
        async with locks.hold([0], "c"):
            entered.append("c")
    assert entered == ["c"]


# -- the pool: parallel start, timestamps ----------------------------------------------


class GatedEngine(FakeEngine):
    """A FakeEngine whose start waits for the test to open its gate; records when."""

    def __init__(self, name: str, log: list[tuple[str, str, float]], *, fail: bool = False) -> None:
        super().__init__()
        self.name = name
        self.log = log
        self.gate = anyio.Event()
        self.fail = fail

    async def start(self) -> None:
        self.log.append(("begin", self.name, anyio.current_time()))
        await self.gate.wait()
        self.log.append(("ready", self.name, anyio.current_time()))
        if self.fail:
            raise RuntimeError("CUDA out of memory")
        self.started = True

    async def shutdown(self) -> None:
        await anyio.sleep(0.01)  # a real engine takes seconds to stop
        await super().shutdown()


def placed_config(*gpus: list[int]) -> dict[str, Any]:
    return {
        "models": {
            "m": [
                {"devices": {"gpu_ids": g}, "engine_args": {"model": "fake", "tensor_parallel_size": max(len(g), 1)}}
                for g in gpus
            ]
        }
    }


def gated_pool(log: list[tuple[str, str, float]], *gpus: list[int], fail: int | None = None, **kw: Any) -> tuple[EnginePool, dict[int, GatedEngine]]:
    engines: dict[int, GatedEngine] = {}

    def make(spec: EngineSpec) -> GatedEngine:
        engines[spec.index] = GatedEngine(str(spec.index), log, fail=spec.index == fail)
        return engines[spec.index]

    return EnginePool.from_config(placed_config(*gpus), engine_factory=make, rng=random.Random(0), **kw), engines


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.001)


async def test_pool_starts_disjoint_instances_together_and_shared_ones_in_turn() -> None:
    log: list[tuple[str, str, float]] = []
    pool, engines = gated_pool(log, [0], [1], [0, 2])
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.start)
        await wait_for(lambda: {"0", "1"} <= {name for kind, name, _ in log if kind == "begin"})
        await anyio.wait_all_tasks_blocked()
        began = [name for kind, name, _ in log if kind == "begin"]
        assert sorted(began) == ["0", "1"]  # [0, 2] waits: GPU 0 is being profiled
        progress = {p.instance: p for p in pool._starter.progress()}
        assert progress['models["m"][2]'].waiting_for == ('models["m"][0]',)
        assert progress['models["m"][0]'].waiting_for == ()
        engines[1].gate.set()  # the other GPU's engine ready first: nothing else moves
        await wait_for(lambda: ("ready", "1") in [(k, n) for k, n, _ in log])
        await anyio.wait_all_tasks_blocked()
        assert "2" not in [name for kind, name, _ in log if kind == "begin"]
        engines[0].gate.set()
        await wait_for(lambda: "2" in [name for kind, name, _ in log if kind == "begin"])
        engines[2].gate.set()
    times = {(kind, name): t for kind, name, t in log}
    assert times[("begin", "1")] < times[("ready", "0")]  # overlapped
    assert times[("begin", "2")] >= times[("ready", "0")]  # after the engine it shares GPU 0 with
    assert [i.state for i in pool.instances()] == ["healthy"] * 3
    await pool.aclose()


async def test_a_failed_parallel_start_stops_every_engine_and_names_the_first() -> None:
    log: list[tuple[str, str, float]] = []
    pool, engines = gated_pool(log, [0], [1], [2], fail=1)
    async with anyio.create_task_group() as tg:

        async def start() -> None:
            with pytest.raises(EngineStartError) as info:
                await pool.start()
            assert info.value.instance == 'models["m"][1]'
            assert "CUDA out of memory" in str(info.value)

        tg.start_soon(start)
        await wait_for(lambda: len([k for k, _, _ in log if k == "begin"]) == 3)
        engines[0].gate.set()
        await wait_for(lambda: ("ready", "0") in [(k, n) for k, n, _ in log])
        engines[1].gate.set()  # fails; 2 is still starting and is let finish, then stopped
        await anyio.wait_all_tasks_blocked()
        engines[2].gate.set()
    assert all(e.stopped for e in engines.values())
    assert pool.instances() == ()


async def test_a_failed_start_begins_none_of_the_starts_queued_behind_it() -> None:
    """Issue 28: the next engine on the failed one's GPU used to start anyway (its lock was
    handed on while the failed engine shut down, before the pool's start was cancelled)."""
    log: list[tuple[str, str, float]] = []
    pool, engines = gated_pool(log, [0], [0], fail=0)
    async with anyio.create_task_group() as tg:

        async def start() -> None:
            with pytest.raises(EngineStartError, match="CUDA out of memory"):
                await pool.start()

        tg.start_soon(start)
        await wait_for(lambda: ("begin", "0") in [(k, n) for k, n, _ in log])
        engines[0].gate.set()
        await wait_for(lambda: ("ready", "0") in [(k, n) for k, n, _ in log])
        await anyio.wait_all_tasks_blocked()
        for engine in engines.values():  # a start begun by mistake ends: the test fails, not hangs
            engine.gate.set()
    assert [name for kind, name, _ in log if kind == "begin"] == ["0"]
    assert all(e.stopped or not e.started for e in engines.values())


async def test_a_mistake_in_the_last_instance_is_found_before_any_engine_starts() -> None:
    log: list[tuple[str, str, float]] = []

    class Checked(GatedEngine):
        def validate(self) -> None:
            if self.name == "2":
                raise ConfigError('models["m"][2].engine_args.max_model_len', "not an integer")

    def make(spec: EngineSpec) -> GatedEngine:
        return Checked(str(spec.index), log)

    pool = EnginePool.from_config(placed_config([0], [1], [2]), engine_factory=make)
    with anyio.fail_after(5), pytest.raises(ConfigError, match=r'models\["m"\]\[2\]\.engine_args\.max_model_len: not an integer'):
        await pool.start()
    assert log == []  # no engine began to start


async def test_the_progress_line_counts_only_engines_that_are_ready(caplog: pytest.LogCaptureFixture) -> None:
    log: list[tuple[str, str, float]] = []
    engines: dict[int, GatedEngine] = {}

    def make(spec: EngineSpec) -> GatedEngine:
        engines[spec.index] = GatedEngine(str(spec.index), log, fail=spec.index == 1)
        return engines[spec.index]

    starter = Starter(make, progress_interval=0.01)
    specs = PoolConfig.load(placed_config([0], [1], [2])).models[0].instances
    with caplog.at_level(logging.INFO, logger="lylm"):
        async with anyio.create_task_group() as tg:

            async def start() -> None:
                with pytest.raises(EngineStartError):
                    await starter.start_all(specs)

            tg.start_soon(start)
            await wait_for(lambda: len(log) == 3)
            engines[0].gate.set()
            await wait_for(lambda: "1 of 3 ready" in caplog.text)
            engines[1].gate.set()  # fails: 2 is cancelled
            await anyio.sleep(0.05)
            engines[2].gate.set()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("starting engines")]
    assert lines and all("2 of 3" not in line and "3 of 3" not in line for line in lines), lines


async def test_restarts_and_add_instance_take_the_same_gpu_locks() -> None:
    log: list[tuple[str, str, float]] = []
    pool, engines = gated_pool(
        log, [0], restart=RestartPolicy(initial_backoff=0.001, max_backoff=0.001), health_interval=0.01
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.start)
        await wait_for(lambda: 0 in engines)
        first = engines[0]
        first.gate.set()
        await wait_for(lambda: pool.instances() and pool.instances()[0].state == "healthy")
        first.kill()
        await wait_for(lambda: engines[0] is not first and len(log) == 3)  # the restart's start began
        restarting = engines[0]
        assert pool.instances()[0].state == "restarting"

        added: list[Instance] = []

        async def add() -> None:
            added.append(await pool.add_instance("m", gpu_ids=[0], engine_args={"model": "fake"}))

        tg.start_soon(add)
        await anyio.wait_all_tasks_blocked()
        assert ("begin", "1") not in [(k, n) for k, n, _ in log]  # GPU 0 is held by the restart
        assert pool.instances()[1].state == "starting"
        assert pool._starter.progress()[-1].waiting_for == ('models["m"][0]',)
        restarting.gate.set()
        await wait_for(lambda: ("begin", "1") in [(k, n) for k, n, _ in log])
        engines[1].gate.set()
    assert [i.state for i in pool.instances()] == ["healthy", "healthy"]
    assert pool.instances()[0].restarts == 1
    assert added[0].name == 'models["m"][1]'
    await pool.aclose()


# -- the instance's lifecycle, one owner ------------------------------------------------


def test_instance_state_moves_only_along_its_lifecycle() -> None:
    spec = EngineSpec(model="m", engine_args={"model": "fake"})
    inst = Instance(spec, FakeEngine(), state="starting")
    assert not inst.mark_dead("boom")  # a starting instance is not serving: not dead
    assert not inst.mark_restarting()
    assert inst.mark_healthy() and inst.state == "healthy"
    assert not inst.mark_healthy()  # only a starting instance becomes healthy this way
    assert inst.mark_dead("boom") and inst.last_error == "boom"
    assert not inst.mark_dead("again") and inst.last_error == "boom"  # first report wins
    assert not inst.mark_draining()
    assert inst.mark_restarting() and inst.state == "restarting"
    assert inst.restart_failed("restart failed: oom") and inst.state == "dead"
    assert inst.mark_restarting()
    replacement = FakeEngine()
    assert inst.replace_engine(replacement)
    assert (inst.state, inst.engine, inst.restarts) == ("healthy", replacement, 1)
    assert inst.mark_draining() and inst.state == "draining"
    inst.mark_stopped()
    assert not inst.mark_restarting() and not inst.replace_engine(FakeEngine()) and inst.state == "stopped"
    # A start that did not happen (a remote core that did not connect): dead, then restarted.
    absent = Instance(spec, FakeEngine(), state="starting")
    assert absent.mark_not_started("no core") and (absent.state, absent.last_error) == ("dead", "no core")
    assert not absent.mark_not_started("again") and absent.mark_restarting()
    with pytest.raises(AttributeError):
        inst.state = "healthy"  # type: ignore[misc]


def test_restart_backoff_is_jittered_below_its_bound() -> None:
    policy = RestartPolicy(initial_backoff=1, max_backoff=30, multiplier=2, jitter=0.2)
    rng = random.Random(7)
    for attempt, bound in [(0, 1.0), (3, 8.0), (10, 30.0)]:
        delays = [policy.backoff(attempt, rng) for _ in range(200)]
        assert all(bound * 0.8 <= d <= bound for d in delays)
        assert len(set(delays)) == 200  # spread, not one value
    assert policy.backoff(3) == 8.0  # without an rng: the bound itself
    assert RestartPolicy(jitter=0).backoff(2, rng) == 4.0
    with pytest.raises(ValueError, match="jitter must be a number from 0 to 1"):
        RestartPolicy(jitter=1.5)
