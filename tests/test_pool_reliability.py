"""Failures with FakeEngines: retry before the first token, supervised restarts,
engine states, runtime membership (add, drain, remove) and draining the pool."""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import anyio
import pytest

from _helpers import fake_specs
from lylm import (
    ContextLengthError,
    Balancer,
    ConfigError,
    EngineDeadError,
    EngineError,
    EnginePool,
    EngineSpec,
    EngineStartError,
    Instance,
    InvalidRequestError,
    NoHealthyEngineError,
    OverloadedError,
    RequestInfo,
    RequestRecord,
    RestartPolicy,
    ShuttingDownError,
)
from lylm.testing import FakeEngine, FakeSamplingParams

pytestmark = pytest.mark.anyio

FAST = RestartPolicy(initial_backoff=0.01, max_backoff=0.05, max_attempts=3)


class First(Balancer):
    """Always the first candidate in config order: makes 'which engine' deterministic."""

    def choose(self, candidates: Sequence[Instance], request: RequestInfo) -> Instance:
        return candidates[0]


def pool_of(
    n: int,
    make: Callable[[EngineSpec], FakeEngine] | None = None,
    **options: Any,
) -> EnginePool:
    options.setdefault("health_interval", 0.01)
    options.setdefault("restart", FAST)
    return EnginePool.from_config(
        fake_specs([1.0] * n),
        balancer=First(),
        rng=random.Random(0),
        engine_factory=make or (lambda spec: FakeEngine()),
        **options,
    )


async def collect(pool: EnginePool, max_tokens: int = 4, prompt: str = "hi") -> list[Any]:
    return [o async for o in pool.generate("m", prompt, FakeSamplingParams(max_tokens=max_tokens))]


async def wait_for(condition: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    """Poll until ``condition`` holds; a bound against hangs, not a timing assertion."""
    with anyio.move_on_after(limit):
        while not condition():
            await anyio.sleep(0.005)
    assert condition(), f"still waiting for: {what}"


def engine(instance: Instance) -> FakeEngine:
    assert isinstance(instance.engine, FakeEngine)
    return instance.engine


def records_of(pool: EnginePool) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    pool.add_observer(records.append)
    return records


# -- retry before the first token --------------------------------------------------


async def test_a_request_whose_engine_dies_before_output_is_retried_elsewhere() -> None:
    async with pool_of(2, lambda s: FakeEngine(prefill_delay=0.2), restart=None) as pool:
        a, b = pool.instances("m")
        records = records_of(pool)
        async with anyio.create_task_group() as tg:
            result: list[list[Any]] = []

            async def client() -> None:
                result.append(await collect(pool))

            tg.start_soon(client)
            await wait_for(lambda: a.in_flight_requests == 1, "the request on a")
            engine(a).kill()
        assert len(result[0]) == 4 and result[0][-1].finished
        assert [(r.instance.name, r.outcome) for r in records] == [(a.name, "failed"), (b.name, "completed")]
        assert records[0].time_to_first_token is None
        assert a.state == "dead" and (a.failed, b.completed) == (1, 1)
        assert a.in_flight_requests == b.in_flight_requests == 0


async def test_no_retry_once_output_reached_the_caller() -> None:
    async with pool_of(2, lambda s: FakeEngine(token_delay=0.05), restart=None) as pool:
        a, b = pool.instances("m")
        outputs = pool.generate("m", "hi", FakeSamplingParams(max_tokens=50))
        first = await outputs.__anext__()
        assert first.outputs[0].token_ids
        engine(a).kill()
        with pytest.raises(EngineDeadError):
            async for _ in outputs:
                pass
        assert b.dispatched == 0 and a.failed == 1


async def test_retries_are_bounded_and_the_last_error_surfaces() -> None:
    attempts: list[str] = []

    class Failing(FakeEngine):
        def __init__(self, name: str) -> None:
            super().__init__(fail_after=0)
            self.name = name

        def generate(self, request_id: str, prompt: Any, sampling_params: Any) -> Any:
            attempts.append(self.name)
            return super().generate(request_id, prompt, sampling_params)

    async with pool_of(4, lambda s: Failing(s.name), retries=2) as pool:
        with pytest.raises(EngineError, match="scripted failure"):
            await collect(pool)
        # The first choice plus two retries, each on an engine not tried before.
        assert attempts == [i.name for i in pool.instances("m")[:3]]
        assert [i.failed for i in pool.instances("m")] == [1, 1, 1, 0]

    attempts.clear()
    async with pool_of(3, lambda s: Failing(s.name), retries=0) as pool:
        with pytest.raises(EngineError):
            await collect(pool)
        assert len(attempts) == 1


async def test_a_request_that_kills_its_engines_is_retried_once_not_spread() -> None:
    # A prompt that crashes the model (issue 15, item 8): it killed engine 0 during
    # prefill, was retried on engine 1 and killed it too; a third engine must not get it.
    served: list[str] = []

    class Poisoned(FakeEngine):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        async def generate(self, request_id: str, prompt: Any, sampling_params: Any) -> Any:
            served.append(self.name)
            if prompt.token_ids[:6] == list(b"poison"):
                self.kill()  # the engine dies of this request
            async for step in super().generate(request_id, prompt, sampling_params):
                yield step

    async with pool_of(3, lambda s: Poisoned(s.name), retries=2, restart=None) as pool:
        with pytest.raises(EngineDeadError):
            await collect(pool, prompt="poison pill")
        first, second, third = pool.instances("m")
        assert served == [first.name, second.name] and third.healthy
        # An ordinary engine error is still retried as often as configured.
        assert len(await collect(pool, prompt="fine")) == 4 and served[-1] == third.name


async def test_retry_needs_another_healthy_engine_and_skips_bad_requests() -> None:
    async with pool_of(1, lambda s: FakeEngine(fail_after=0)) as pool:
        with pytest.raises(EngineError, match="scripted failure"):
            await collect(pool)
        assert pool.instances("m")[0].dispatched == 1
    async with pool_of(2, lambda s: FakeEngine(max_model_len=8)) as pool:
        # Too long for the context: refused before any engine sees it.
        with pytest.raises(ContextLengthError, match="maximum context length is 8 tokens; the prompt has 2"):
            await collect(pool, max_tokens=50)
        assert [i.dispatched for i in pool.instances("m")] == [0, 0]

    class Rejecting(FakeEngine):
        async def generate(self, request_id: str, prompt: Any, params: Any) -> AsyncGenerator[Any, None]:
            raise InvalidRequestError("the engine refuses these parameters")
            yield  # an async generator

    async with pool_of(2, lambda s: Rejecting()) as pool:
        # The request itself is at fault: another engine would reject it too.
        with pytest.raises(InvalidRequestError, match="refuses"):
            await collect(pool)
        assert sorted(i.dispatched for i in pool.instances("m")) == [0, 1]


def test_retries_and_health_interval_are_validated() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="retries"):
            pool_of(1, retries=bad)
    with pytest.raises(ValueError, match="health_interval"):
        pool_of(1, health_interval=0)


# -- supervised restart -------------------------------------------------------------


async def test_a_dead_engine_is_noticed_without_traffic_and_restarted() -> None:
    made: list[FakeEngine] = []

    def make(spec: EngineSpec) -> FakeEngine:
        made.append(FakeEngine())
        return made[-1]

    async with pool_of(2, make) as pool:
        a, b = pool.instances("m")
        old = engine(a)
        old.kill()
        await wait_for(lambda: a.state != "healthy", "a leaves 'healthy'")
        assert not a.healthy
        await wait_for(lambda: old.stopped, "the dead engine is shut down")
        await wait_for(lambda: a.state == "healthy", "a restarted")
        assert a.engine is made[-1] and a.engine is not old and len(made) == 3
        assert a.restarts == 1 and a.last_error == "fake engine was killed"
        await collect(pool)
        assert engine(a).requests and a.completed == 1
        assert b.restarts == 0 and b.state == "healthy"


async def test_restart_states_and_bounded_attempts() -> None:
    gate = anyio.Event()
    starts = 0

    class Slow(FakeEngine):
        async def start(self) -> None:
            nonlocal starts
            starts += 1
            if starts > 1:  # a restart: hold it until the test has seen 'restarting'
                await gate.wait()
                raise RuntimeError(f"no GPU memory (attempt {starts - 1})")
            await super().start()

    policy = RestartPolicy(initial_backoff=0.01, max_backoff=0.02, max_attempts=2)
    async with pool_of(1, lambda s: Slow(), restart=policy) as pool:
        (a,) = pool.instances("m")
        engine(a).kill()
        await wait_for(lambda: a.state == "restarting", "a restarting")
        with pytest.raises(NoHealthyEngineError):
            await collect(pool)
        assert a.stats().state == "restarting"
        gate.set()
        await wait_for(lambda: starts == 3, "two restart attempts")
        await anyio.sleep(0.1)  # a third attempt would start within 0.02 s
        assert starts == 3 and a.state == "dead" and a.restarts == 0
        assert "restart failed" in (a.last_error or "") and "attempt 2" in (a.last_error or "")


def test_backoff_is_exponential_and_capped() -> None:
    policy = RestartPolicy(initial_backoff=0.5, max_backoff=4, multiplier=2)
    assert [policy.backoff(n) for n in range(6)] == [0.5, 1, 2, 4, 4, 4]
    assert RestartPolicy().max_attempts == 10
    for bad in ({"initial_backoff": 0}, {"max_backoff": -1}, {"max_attempts": 0}, {"multiplier": "2"}):
        with pytest.raises(ValueError):
            RestartPolicy(**bad)


async def test_closing_the_pool_during_a_restart_stops_the_new_engine() -> None:
    made: list[FakeEngine] = []

    def make(spec: EngineSpec) -> FakeEngine:
        made.append(FakeEngine(start_delay=0.3 if made else 0))
        return made[-1]

    pool = pool_of(1, make)
    async with pool:
        (a,) = pool.instances("m")
        engine(a).kill()
        await wait_for(lambda: a.state == "restarting", "a restarting")
    assert len(made) == 2 and all(e.stopped for e in made)


# -- runtime membership -------------------------------------------------------------


async def test_add_instance_starts_then_joins_balancing() -> None:
    gate = anyio.Event()

    class Gated(FakeEngine):
        async def start(self) -> None:
            await gate.wait()
            await super().start()

    made = iter([FakeEngine(), Gated()])
    async with pool_of(1, lambda s: next(made)) as pool:
        added: list[Instance] = []

        async def add() -> None:
            added.append(await pool.add_instance("m", weight=3))

        async with anyio.create_task_group() as tg:
            tg.start_soon(add)
            await wait_for(lambda: len(pool.instances("m")) == 2, "the new instance is listed")
            new = pool.instances("m")[1]
            assert new.state == "starting" and not new.healthy
            await collect(pool)  # served by the old one meanwhile
            gate.set()
        assert added == [new] and new.state == "healthy"
        assert new.name == 'models["m"][1]' and new.weight == 3 and new.spec.engine_args == {"model": "fake"}
        await pool.remove_instance(pool.instances("m")[0])
        await collect(pool)
        assert new.completed == 1


async def test_add_instance_validates_like_the_config_and_cleans_up_failures() -> None:
    made = iter([FakeEngine(), FakeEngine(fail_start=RuntimeError("boom"))])
    async with pool_of(1, lambda s: next(made)) as pool:
        with pytest.raises(ConfigError) as info:
            await pool.add_instance("m", weight=0)
        assert info.value.path == 'models["m"][1].devices.weight'
        with pytest.raises(EngineStartError, match=r'models\["m"\]\[1\]: engine failed to start: RuntimeError: boom'):
            await pool.add_instance("m")
        assert [i.name for i in pool.instances()] == ['models["m"][0]']


async def test_drain_instance_lets_requests_finish_and_takes_no_new_ones() -> None:
    async with pool_of(2, lambda s: FakeEngine(token_delay=0.01)) as pool:
        a, b = pool.instances("m")
        async with anyio.create_task_group() as tg:
            done: list[list[Any]] = []

            async def client() -> None:
                done.append(await collect(pool, max_tokens=30))

            tg.start_soon(client)
            await wait_for(lambda: a.in_flight_requests == 1, "a request on a")
            clean: list[bool] = []

            async def drain() -> None:
                clean.append(await pool.drain_instance(a))

            tg.start_soon(drain)
            await wait_for(lambda: a.state == "draining", "a draining")
            await collect(pool)  # goes to b: a is out of balancing
            assert a.in_flight_requests == 1 and b.completed == 1
        assert clean == [True] and len(done[0]) == 30
        assert a.state == "stopped" and engine(a).stopped and pool.instances("m") == (b,)


async def test_drain_timeout_and_remove_fail_what_is_left_retrying_before_output() -> None:
    async with pool_of(2, lambda s: FakeEngine(prefill_delay=0.05, token_delay=0.05)) as pool:
        a, b = pool.instances("m")
        errors: list[Exception] = []
        results: list[int] = []

        async def client(tokens: int) -> None:
            try:
                results.append(len(await collect(pool, max_tokens=tokens)))
            except EngineDeadError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(client, 100)  # has output when the drain times out: fails
            await wait_for(lambda: a.generated_tokens > 0, "output from a")
            assert await pool.drain_instance(a, timeout=0.05) is False
        assert len(errors) == 1 and a.state == "stopped"

        c = await pool.add_instance("m")
        async with anyio.create_task_group() as tg:
            tg.start_soon(client, 3)  # still in prefill on b when b is removed: retried on c
            await wait_for(lambda: b.in_flight_requests == 1, "a request on b")
            await pool.remove_instance(b.name)
        assert results == [3] and c.completed == 1 and b.failed == 1
        with pytest.raises(LookupError):
            await pool.remove_instance(b)


async def test_a_draining_instance_that_dies_is_not_restarted() -> None:
    async with pool_of(2, lambda s: FakeEngine(token_delay=0.05)) as pool:
        a, _ = pool.instances("m")
        errors: list[Exception] = []

        async def client() -> None:
            try:
                await collect(pool, max_tokens=100)
            except EngineDeadError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(client)
            await wait_for(lambda: a.generated_tokens > 0, "output from a")
            tg.start_soon(pool.drain_instance, a)
            await wait_for(lambda: a.state == "draining", "a draining")
            engine(a).kill()
        assert len(errors) == 1
        await anyio.sleep(0.1)  # a restart would begin within 0.01 s
        assert a.restarts == 0 and a.state == "stopped" and pool.instances("m") == (pool.instances("m")[0],)


# -- draining the pool --------------------------------------------------------------


async def test_pool_drain_refuses_new_requests_and_waits_for_the_rest() -> None:
    async with pool_of(1, lambda s: FakeEngine(token_delay=0.01)) as pool:
        async with anyio.create_task_group() as tg:
            done: list[int] = []

            async def client() -> None:
                done.append(len(await collect(pool, max_tokens=20)))

            tg.start_soon(client)
            await wait_for(lambda: pool.instances()[0].in_flight_requests == 1, "one in flight")
            drained: list[bool] = []

            async def drain() -> None:
                drained.append(await pool.drain(timeout=10))

            tg.start_soon(drain)
            await wait_for(lambda: pool.draining, "draining")
            with pytest.raises(ShuttingDownError, match="shutting down"):
                await collect(pool)
            assert len(pool.instances("m")) == 1  # introspection still works
        assert done == [20] and drained == [True]
    async with pool_of(1, lambda s: FakeEngine(token_delay=0.05)) as pool:
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, pool, 100)
            await wait_for(lambda: pool.instances()[0].in_flight_requests == 1, "one in flight")
            assert await pool.drain(timeout=0.05) is False
            tg.cancel_scope.cancel()


# -- admission limits from the config file ------------------------------------------


async def test_config_limits_apply_and_options_override_them() -> None:
    config = {
        "common": {"limits": {"max_in_flight_requests": 1}},
        "models": {
            "m": {"instances": [{"engine_args": {"model": "x"}}]},
            "n": {"instances": [{"engine_args": {"model": "x"}}], "limits": {"max_in_flight_requests": 2}},
        },
    }
    make = lambda s: FakeEngine(token_delay=0.05)  # noqa: E731
    for options, expected in (({}, {"m": 1, "n": 2}), ({"max_in_flight_requests": {"n": 3}}, {"m": 1, "n": 3})):
        async with EnginePool.from_config(config, engine_factory=make, **options) as pool:
            for model, limit in expected.items():
                streams = [pool.generate(model, "hi", FakeSamplingParams(max_tokens=50)) for _ in range(limit)]
                for s in streams:
                    await s.__anext__()
                with pytest.raises(OverloadedError, match=f"limit {limit}"):
                    await pool.generate(model, "hi", FakeSamplingParams()).__anext__()
                for s in streams:
                    await s.aclose()
