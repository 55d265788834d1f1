"""The event loop: arrivals dispatched by a real lylm balancer to simulated engines.

    from benchmarks.sim.sim import simulate
    result = simulate(engines, weights, "token_aware", requests, seed=0)

Every instance is a real :class:`lylm.Instance` around a :class:`SimEngine`; its books
are kept exactly as ``EnginePool._serve`` keeps them (requests and token budget up at
dispatch; prompt plus new tokens down at the first output, new tokens down at each
later one; the rest and the request down at the end), and the balancer is the real
class, resolved by name, called with the healthy instances and a real
:class:`lylm.RequestInfo`. Time is simulated: a run of thousands of requests takes
well under a second and is exactly repeatable for a seed.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lylm import Balancer
from lylm._books import Books, Tally
from lylm._config import EngineSpec
from lylm._instance import Instance
from lylm._request import RequestEnd, RequestInfo
from lylm.balancers import resolve_balancer

from .engine import EngineConfig, SimEngine, SimRequest
from .kvcache import block_hashes
from .model import StepModel

MODEL = "sim"


@dataclass(frozen=True)
class Arrival:
    """A request of a workload: when it arrives, its prompt and how much it generates."""

    time: float
    token_ids: tuple[int, ...]
    output_tokens: int
    max_tokens: int | None = None  # the budget the balancer sees; default output_tokens
    session_key: str | None = None


@dataclass
class RunResult:
    """Metrics of one run, and the per-request and per-engine detail behind them."""

    balancer: str
    throughput: float  # output tokens per simulated second, first arrival to last finish
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    e2e_p50: float
    e2e_p99: float
    request_spread: float  # max / mean of requests served per engine
    load_spread: float  # max / mean of time-averaged in-flight requests (per weight) per engine
    work_spread: float  # max / mean of batched tokens per unit of speed, per engine
    cache_hit_rate: float  # prompt tokens served from the prefix cache / prompt tokens
    makespan: float
    per_engine: list[dict[str, Any]] = field(default_factory=list)
    requests: list[SimRequest] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """The metrics as a JSON-ready dict."""
        out = {k: v for k, v in self.__dict__.items() if k != "requests"}
        return out


def build_instances(engines: Sequence[EngineConfig], weights: Sequence[float], model: StepModel) -> list[Instance]:
    """One real Instance per simulated engine, with its weight."""
    return [
        Instance(EngineSpec(model=MODEL, engine_args={"model": MODEL}, weight=w, index=i), SimEngine(cfg, model))
        for i, (cfg, w) in enumerate(zip(engines, weights, strict=True))
    ]


def simulate(
    engines: Sequence[EngineConfig],
    weights: Sequence[float],
    balancer: str | Balancer,
    arrivals: Sequence[Arrival],
    *,
    seed: int = 0,
    model: StepModel | None = None,
) -> RunResult:
    """Run ``arrivals`` through a pool of simulated engines chosen by ``balancer``."""
    model = model or StepModel.load()
    instances = build_instances(engines, weights, model)
    chooser = resolve_balancer(balancer, rng=random.Random(seed)) if isinstance(balancer, str) else balancer
    name = balancer if isinstance(balancer, str) else type(balancer).__name__
    order = sorted(range(len(arrivals)), key=lambda i: (arrivals[i].time, i))
    steps: list[tuple[float, int, int]] = []  # (end time, tie-break, engine index)
    counter = 0
    requests: list[SimRequest] = []
    pos = 0
    now = 0.0

    # The pool's books (lylm._books): the same counters, written by the same code.
    books = Books(clock=lambda: now, engine_died=lambda instance, reason: None)

    def dispatch(a: Arrival, i: int) -> None:
        max_tokens = a.max_tokens if a.max_tokens is not None else a.output_tokens
        info = RequestInfo(
            model=MODEL, request_id=f"r{i}", prompt_tokens=len(a.token_ids), max_tokens=max_tokens,
            prompt_token_ids=a.token_ids, session_key=a.session_key,
        )
        candidates = [inst for inst in instances if inst.healthy]
        chosen = chooser.choose(candidates, info)
        if not any(chosen is c for c in candidates):
            raise RuntimeError(f"{name}.choose() returned a non-candidate {chosen!r}")
        # The pool's books at dispatch, by the pool's own code.
        tally = Tally(chosen, info)
        books.begin(tally)
        req = SimRequest(info, a.time, a.output_tokens, block_hashes(a.token_ids), chosen, tally=tally)
        requests.append(req)
        _engine(chosen).add(req)

    def output(req: SimRequest, new_tokens: int) -> None:
        tally = req.tally
        assert tally is not None
        tally.step(new_tokens)
        if req.finished is not None:
            first = req.first_token if req.first_token is not None else req.finished
            end = RequestEnd("completed", tally.remaining, tally.generated, first - req.arrival, req.finished - req.arrival)
            books.end(tally, end, chooser)

    load_area = [0.0] * len(instances)  # integral of in-flight requests over time, per engine
    while pos < len(order) or steps:
        next_arrival = arrivals[order[pos]].time if pos < len(order) else float("inf")
        previous = now
        now = min(next_arrival, steps[0][0]) if steps else next_arrival
        for k, inst in enumerate(instances):
            load_area[k] += inst.in_flight_requests * (now - previous)
        # Steps ending now first: their freed slots and cache are visible to the scheduler.
        while steps and steps[0][0] <= now:
            _, _, idx = heapq.heappop(steps)
            for req, n in _engine(instances[idx]).finish_step(now):
                output(req, n)
        while pos < len(order) and arrivals[order[pos]].time <= now:
            dispatch(arrivals[order[pos]], order[pos])
            pos += 1
        # Idle engines start their next step only after every event of this instant, so
        # a burst is batched as vLLM batches it: everything queued before the step begins.
        for idx, inst in enumerate(instances):
            eng = _engine(inst)
            if not eng.busy:
                duration = eng.start_step()
                if duration is not None:
                    counter += 1
                    heapq.heappush(steps, (now + duration, counter, idx))
    return _metrics(name, instances, requests, [a / i.weight for a, i in zip(load_area, instances)])


def _engine(inst: Instance) -> SimEngine:
    eng = inst.engine
    assert isinstance(eng, SimEngine)
    return eng


def _spread(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else 1.0


def _metrics(
    name: str, instances: list[Instance], requests: list[SimRequest], load_area: list[float]
) -> RunResult:
    if not requests:
        raise ValueError("no requests")
    ttft = np.array([r.first_token - r.arrival for r in requests if r.first_token is not None])
    e2e = np.array([r.finished - r.arrival for r in requests if r.finished is not None])
    if len(e2e) != len(requests):
        raise RuntimeError("some requests never finished")
    start = min(r.arrival for r in requests)
    end = max(r.finished for r in requests if r.finished is not None)
    makespan = end - start
    out_tokens = sum(r.generated for r in requests)
    prompt_tokens = sum(r.prompt_len for r in requests)
    cached = sum(r.cached_tokens for r in requests)
    engines = [_engine(i) for i in instances]
    per_engine = [
        {
            "index": inst.index,
            "weight": inst.weight,
            "speed": eng.config.speed,
            "requests": eng.served,
            "output_tokens": eng.output_tokens,
            "busy_s": eng.busy_time,
            "busy_fraction": eng.busy_time / makespan if makespan > 0 else 0.0,
            "steps": eng.steps,
            "batched_tokens": eng.batched_tokens,
            "cache_evictions": eng.cache.evictions,
        }
        for inst, eng in zip(instances, engines)
    ]
    return RunResult(
        balancer=name,
        throughput=out_tokens / makespan if makespan > 0 else 0.0,
        ttft_p50=float(np.percentile(ttft, 50)),
        ttft_p90=float(np.percentile(ttft, 90)),
        ttft_p99=float(np.percentile(ttft, 99)),
        e2e_p50=float(np.percentile(e2e, 50)),
        e2e_p99=float(np.percentile(e2e, 99)),
        request_spread=_spread([e.served for e in engines]),
        load_spread=_spread(load_area),
        work_spread=_spread([e.batched_tokens / e.config.speed for e in engines]),
        cache_hit_rate=cached / prompt_tokens if prompt_tokens else 0.0,
        makespan=makespan,
        per_engine=per_engine,
        requests=requests,
    )
