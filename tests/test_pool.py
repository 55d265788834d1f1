"""EnginePool against scripted FakeEngines: books, balancing, failures, lifecycle."""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import anyio
import pytest

from _helpers import fake_specs, until
from lylm import (
    Balancer,
    EnginePool,
    EngineDeadError,
    EngineError,
    EngineSpec,
    EngineStartError,
    Instance,
    InvalidRequestError,
    LylmError,
    NoHealthyEngineError,
    OverloadedError,
    PromptError,
    RequestInfo,
    UnknownModelError,
)
from lylm.testing import FakeEngine, FakeSamplingParams

pytestmark = pytest.mark.anyio


def fake_pool(
    weights: list[float],
    *,
    balancer: Any = "weighted_random",
    seed: int = 0,
    make: Callable[[EngineSpec], FakeEngine] | None = None,
    model: str = "m",
    **options: Any,
) -> EnginePool:
    return EnginePool.from_config(
        fake_specs(weights, model),
        balancer=balancer,
        rng=random.Random(seed),
        engine_factory=make or (lambda spec: FakeEngine()),
        **options,
    )


async def run(pool: EnginePool, prompt: Any = "hi", max_tokens: int = 4, **kw: Any) -> list[Any]:
    params = FakeSamplingParams(max_tokens=max_tokens)
    return [out async for out in pool.generate("m", prompt, params, **kw)]


def assert_books_idle(pool: EnginePool) -> None:
    for inst in pool.instances():
        assert inst.in_flight_requests == 0, inst
        assert inst.in_flight_tokens == 0, inst
        assert inst.in_flight_prefill_tokens == 0, inst


# -- balancing through the pool ---------------------------------------------------


async def test_weighted_random_splits_3000_requests_one_to_two() -> None:
    async with fake_pool([1.0, 2.0], seed=2024) as pool:
        for _ in range(3000):
            await run(pool, max_tokens=1)
        stats = pool.stats()["m"]
        served = [s.completed for s in stats]
    # Each snapshot says which instance it is and its weight: a report needs nothing else.
    assert [(s.index, s.weight) for s in stats] == [(0, 1.0), (1, 2.0)]
    assert sum(served) == 3000
    share = served[0] / 3000 * 100
    assert abs(share - 100 / 3) <= 3, served
    assert abs((100 - share) - 200 / 3) <= 3, served


async def _skewed_load(balancer: str, seed: int = 11) -> tuple[list[int], list[int]]:
    """Drive 3 equal instances with 90% short / 10% long requests at concurrency 24;
    return the in-flight request and token spreads (max - min) seen at each dispatch."""
    pool = fake_pool([1.0, 1.0, 1.0], balancer=balancer, seed=seed,
                     make=lambda spec: FakeEngine(token_delay=0.001))
    rng = random.Random(seed)
    request_spread: list[int] = []
    token_spread: list[int] = []
    limit = anyio.Semaphore(24)

    async def one(max_tokens: int) -> None:
        async with limit:
            async with aclosing(pool.generate("m", "x" * 10, FakeSamplingParams(max_tokens=max_tokens))) as outs:
                first = True
                async for _ in outs:
                    if first:
                        first = False
                        insts = pool.instances("m")
                        r = [i.in_flight_requests for i in insts]
                        t = [i.in_flight_tokens for i in insts]
                        request_spread.append(max(r) - min(r))
                        token_spread.append(max(t) - min(t))

    async with pool:
        async with anyio.create_task_group() as tg:
            for _ in range(300):
                tg.start_soon(one, 200 if rng.random() < 0.1 else 10)
        assert_books_idle(pool)
    return request_spread, token_spread


async def test_least_outstanding_keeps_requests_balanced_under_skew() -> None:
    lo_requests, _ = await _skewed_load("least_outstanding")
    wr_requests, _ = await _skewed_load("weighted_random")
    assert max(lo_requests) <= 3, max(lo_requests)
    assert sum(lo_requests) / len(lo_requests) < 1.5
    # The same load under weighted random drifts much further apart.
    assert sum(lo_requests) < sum(wr_requests) / 2


async def test_token_aware_keeps_tokens_balanced_under_skew() -> None:
    _, ta_tokens = await _skewed_load("token_aware")
    _, lo_tokens = await _skewed_load("least_outstanding")
    _, wr_tokens = await _skewed_load("weighted_random")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    # One long request costs 210 tokens; token-aware never lets the gap grow far past it.
    assert max(ta_tokens) <= 2 * 220, max(ta_tokens)
    assert mean(ta_tokens) < mean(lo_tokens)
    assert mean(ta_tokens) < mean(wr_tokens) / 2


# -- books -------------------------------------------------------------------------


async def test_books_follow_a_request_and_return_to_zero() -> None:
    async with fake_pool([1.0]) as pool:
        (inst,) = pool.instances("m")
        seen: list[tuple[int, int]] = []
        params = FakeSamplingParams(max_tokens=5, n=2)
        async for _ in pool.generate("m", [1, 2, 3], params):
            seen.append((inst.in_flight_requests, inst.in_flight_tokens))
        # Prompt (3 tokens) is prefilled with the first step; then 2 tokens per step.
        assert seen == [(1, 8), (1, 6), (1, 4), (1, 2), (1, 0)]
        stats = inst.stats()
        assert (stats.completed, stats.failed, stats.aborted) == (1, 0, 0)
        assert (stats.prompt_tokens, stats.generated_tokens) == (3, 10)
        assert_books_idle(pool)


async def test_failed_request_releases_its_books() -> None:
    async with fake_pool([1.0], make=lambda spec: FakeEngine(fail_after=2)) as pool:
        with pytest.raises(EngineError, match="scripted failure"):
            await run(pool, max_tokens=10)
        (stats,) = pool.stats()["m"]
        assert (stats.completed, stats.failed) == (0, 1)
        assert pool.instances("m")[0].healthy  # one failed request is not a dead engine
        assert_books_idle(pool)


def only_engine(pool: EnginePool) -> FakeEngine:
    (instance,) = pool.instances("m")
    assert isinstance(instance.engine, FakeEngine)
    return instance.engine


async def test_closing_the_stream_aborts_in_the_engine() -> None:
    async with fake_pool([1.0], make=lambda spec: FakeEngine(token_delay=0.01)) as pool:
        async with aclosing(pool.generate("m", "hi", FakeSamplingParams(max_tokens=100), request_id="r1")) as outs:
            async for _ in outs:
                break
        assert only_engine(pool).aborted == ["r1"]
        assert only_engine(pool).num_unfinished_requests() == 0
        assert pool.stats()["m"][0].aborted == 1
        assert_books_idle(pool)


async def test_cancelled_consumer_aborts_in_the_engine() -> None:
    async with fake_pool([1.0], make=lambda spec: FakeEngine(token_delay=0.05)) as pool:
        with anyio.move_on_after(0.1):
            await run(pool, max_tokens=1000, request_id="slow")
        assert only_engine(pool).aborted == ["slow"]
        assert pool.stats()["m"][0].aborted == 1
        assert_books_idle(pool)


async def test_balancer_hook_sees_every_outcome() -> None:
    outcomes: list[str] = []

    class Recording(Balancer):
        def choose(self, candidates: Any, request: RequestInfo) -> Instance:
            return candidates[0]

        def on_finish(self, instance: Instance, request: RequestInfo, outcome: Any) -> None:
            outcomes.append(outcome)

    async with fake_pool([1.0], balancer=Recording(), make=lambda s: FakeEngine(token_delay=0.01)) as pool:
        await run(pool)
        async with aclosing(pool.generate("m", "x", FakeSamplingParams(max_tokens=50))) as outs:
            async for _ in outs:
                break
        pool.instances("m")[0].engine.fail_after = 0  # type: ignore[attr-defined]
        with pytest.raises(EngineError):
            await run(pool)
    assert outcomes == ["completed", "aborted", "failed"]


# -- health ----------------------------------------------------------------------


async def test_dead_engines_get_no_requests_and_fail_theirs() -> None:
    make = lambda s: FakeEngine(token_delay=0.01)  # noqa: E731
    async with fake_pool([1.0, 1.0], make=make, restart=None) as pool:
        a, b = pool.instances("m")
        a.engine.kill()  # type: ignore[attr-defined]
        for _ in range(20):
            await run(pool)
        assert a.stats().dispatched == 0 and b.stats().completed == 20
        assert not a.healthy and a.stats().healthy is False

        errors: list[Exception] = []

        async def on_b() -> None:
            try:
                await run(pool, max_tokens=1000)
            except EngineDeadError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(on_b)
            await until(lambda: b.in_flight_requests == 1)
            b.engine.kill()  # type: ignore[attr-defined]
        assert len(errors) == 1
        assert b.stats().failed == 1
        with pytest.raises(NoHealthyEngineError, match="no healthy engine serves model 'm'"):
            await run(pool)
        assert_books_idle(pool)


async def test_unknown_model_lists_the_served_ones() -> None:
    specs = fake_specs([1.0], "alpha") + fake_specs([1.0], "beta")
    async with EnginePool.from_config(specs, engine_factory=lambda s: FakeEngine()) as pool:
        with pytest.raises(UnknownModelError) as info:
            async for _ in pool.generate("gamma", "hi"):
                pass
    assert str(info.value) == "model 'gamma' is not served here; served models: 'alpha', 'beta'"


# -- lifecycle -------------------------------------------------------------------


async def test_engines_start_one_after_another_in_config_order() -> None:
    active = 0
    peak = 0
    order: list[str] = []

    class Tracking(FakeEngine):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        async def start(self) -> None:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            await anyio.sleep(0.02)
            order.append(self.name)
            active -= 1
            await super().start()

    specs = fake_specs([1.0, 1.0], "a") + fake_specs([1.0], "b")
    async with EnginePool.from_config(specs, engine_factory=lambda s: Tracking(s.name)):
        pass
    assert peak == 1
    assert order == ['models["a"][0]', 'models["a"][1]', 'models["b"][0]']


async def test_failed_start_names_the_instance_and_stops_the_others() -> None:
    engines: list[FakeEngine] = []

    def make(spec: EngineSpec) -> FakeEngine:
        fail = RuntimeError("out of memory") if spec.index == 1 else None
        engines.append(FakeEngine(fail_start=fail))
        return engines[-1]

    pool = fake_pool([1.0, 1.0, 1.0], make=make)
    with pytest.raises(EngineStartError) as info:
        await pool.start()
    assert str(info.value) == 'models["m"][1]: engine failed to start: RuntimeError: out of memory'
    assert info.value.instance == 'models["m"][1]'
    # Every engine is built (its configuration checked) before any starts; the third never started.
    assert len(engines) == 3 and not engines[2].started
    assert all(e.stopped for e in engines[:2])
    with pytest.raises(LylmError, match="the pool is new"):
        await run(pool)


async def test_aclose_is_idempotent_and_final() -> None:
    pool = fake_pool([1.0, 1.0])
    async with pool:
        await run(pool)
    engines = [i.engine for i in pool.instances()]
    assert all(e.stopped for e in engines)  # type: ignore[attr-defined]
    await pool.aclose()
    with pytest.raises(LylmError, match="the pool is closed"):
        await run(pool)
    with pytest.raises(LylmError, match="the pool is closed; build a new one"):
        await pool.start()


async def test_a_balancer_returning_a_stranger_is_an_error() -> None:
    class Wrong(Balancer):
        def choose(self, candidates: Any, request: RequestInfo) -> Any:
            return object()

    async with fake_pool([1.0], balancer=Wrong()) as pool:
        with pytest.raises(LylmError, match=r"Wrong.choose\(\) returned .* not one of the candidates"):
            await run(pool)
        assert_books_idle(pool)


async def test_per_model_balancer_overrides() -> None:
    specs = fake_specs([1.0], "a") + fake_specs([1.0], "b")
    pool = EnginePool.from_config(
        specs, balancer="token_aware", balancers={"b": "least_outstanding"},
        engine_factory=lambda s: FakeEngine(),
    )
    assert type(pool.balancer("a")).__name__ == "TokenAware"
    assert type(pool.balancer("b")).__name__ == "LeastOutstanding"
    with pytest.raises(UnknownModelError):
        EnginePool.from_config(specs, balancers={"c": "token_aware"})


# -- prompts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hi", [104, 105]),
        ([5, 6, 7], [5, 6, 7]),
        ({"prompt": "hi"}, [104, 105]),
        ({"prompt_token_ids": [9]}, [9]),
        ([{"role": "user", "content": "hi"}], list(b"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")),
    ],
)
async def test_prompt_forms(prompt: Any, expected: list[int]) -> None:
    async with fake_pool([1.0]) as pool:
        outs = await run(pool, prompt, max_tokens=2)
        assert list(outs[0].prompt_token_ids) == expected


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "the prompt is empty"),
        ([1, "a"], "a prompt is a string, a list of token ids, or a list of chat messages"),
        ({"text": "hi"}, 'a dict prompt needs "prompt" or "prompt_token_ids"'),
        ([True, 2], "a prompt is a string, a list of token ids, or a list of chat messages"),
    ],
)
async def test_bad_prompts_are_rejected_before_dispatch(prompt: Any, message: str) -> None:
    async with fake_pool([1.0]) as pool:
        with pytest.raises(PromptError) as info:
            await run(pool, prompt)
        assert str(info.value).startswith(message)
        assert isinstance(info.value, InvalidRequestError) and isinstance(info.value, ValueError)
        assert pool.stats()["m"][0].dispatched == 0


async def test_observers_get_a_timed_record_of_every_request() -> None:
    now = [100.0]
    records: list[Any] = []

    class Ticking(FakeEngine):
        async def generate(self, request_id: str, prompt: Any, params: Any) -> Any:
            async for step in super().generate(request_id, prompt, params):
                now[0] += 0.5  # each step takes half a second on the fake clock
                yield step

    pool = EnginePool.from_config(
        fake_specs([1.0]), engine_factory=lambda s: Ticking(), clock=lambda: now[0]
    )

    def broken(record: Any) -> None:
        raise RuntimeError("observer bug")

    pool.add_observer(records.append)
    pool.add_observer(broken)  # logged, and it does not break the request
    async with pool:
        await run(pool, max_tokens=4)
        pool.remove_observer(records.append)
        await run(pool, max_tokens=4)
        (instance,) = pool.instances("m")
    (record,) = records
    assert record.outcome == "completed"
    assert record.instance is instance
    assert (record.time_to_first_token, record.latency, record.generated_tokens) == (0.5, 2.0, 4)


def in_flight(pool: EnginePool) -> int:
    return sum(i.in_flight_requests for i in pool.instances("m"))


async def test_admission_limits_refuse_at_once_and_admit_again() -> None:
    outcomes: list[str] = []

    async def one(pool: EnginePool, max_tokens: int) -> None:
        try:
            await run(pool, max_tokens=max_tokens)
            outcomes.append("done")
        except OverloadedError as exc:
            assert exc.retry_after > 0
            outcomes.append("refused")

    def limited(**limits: int) -> EnginePool:
        return EnginePool.from_config(
            fake_specs([1.0, 1.0]), engine_factory=lambda s: FakeEngine(token_delay=0.01), **limits
        )

    async with limited(max_in_flight_requests=2, max_in_flight_tokens=10_000) as pool:
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, pool, 30)
            tg.start_soon(one, pool, 30)
            await until(lambda: in_flight(pool) == 2)
            await one(pool, 5)  # refused, not queued: the pool never waits for a slot
        assert sorted(outcomes) == ["done", "done", "refused"]
        await run(pool, max_tokens=3)  # capacity is back
        assert_books_idle(pool)
    # The token limit: one request alone may exceed it, a second one may not.
    async with limited(max_in_flight_tokens=100) as pool:
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, pool, 200)
            await until(lambda: in_flight(pool) == 1)
            await one(pool, 50)
        assert outcomes[-2:] == ["refused", "done"]
        assert_books_idle(pool)


def test_admission_limits_are_validated() -> None:
    with pytest.raises(ValueError, match=r"max_in_flight_requests\['m'\] must be a positive integer"):
        EnginePool.from_config(fake_specs([1.0]), max_in_flight_requests=0)
    with pytest.raises(UnknownModelError):
        EnginePool.from_config(fake_specs([1.0]), max_in_flight_tokens={"other": 5})


def test_an_embedding_request_books_its_prompt_and_no_output() -> None:
    from types import SimpleNamespace

    from vllm import PoolingParams

    from lylm._engine import RenderedPrompt
    from lylm._render import describe_request

    embed = describe_request("m", RenderedPrompt([1, 2, 3]), PoolingParams(task="embed"), context=8)
    assert (embed.prompt_tokens, embed.max_tokens, embed.n) == (3, 0, 1)
    # A generation request without max_tokens books the rest of the context instead.
    unbounded = describe_request("m", RenderedPrompt([1, 2, 3]), SimpleNamespace(max_tokens=None, n=1), context=8)
    assert unbounded.max_tokens == 5
