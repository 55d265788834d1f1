"""Check the simulator's rankings against a real pool: 2 CPU vLLM engines of the tiny model.

    flock /tmp/lylm-bench.lock .venv/bin/python -m benchmarks.sim.real --out benchmarks/results/sim \
        [--device cpu] [--model-dir DIR] [--engine-args JSON] [--requests 300 --seeds 2] \
        [--load-scale 1.0 --tag real]
    .venv/bin/python -m benchmarks.sim.real --tag real --resim-speed 0.7   # sim side only, slower engines

CPU only: the simulator it is checked against is calibrated on vLLM's CPU build
(``--device gpu`` is refused, and so is a vLLM built for another device). Engine args:
the target's (``harness.engine_args``: the tests' tiny-model args) with each setup's
``max_num_seqs`` and a 2,048-token budget.

Small versions of scenarios 1 and 2, each run both through a real ``lylm.EnginePool``
and through the simulator with the same arrivals, engines and balancers:

1. heterogeneous: CPU instances cannot differ in speed, so engine 0 gets
   ``max_num_seqs=8`` and engine 1 ``max_num_seqs=32`` (less batching, less capacity
   under load); weights 1:2 ("right") and 1:1 ("wrong");
2. skewed prompts: two equal engines; 90% prompts of 30..45 tokens, 10% 20x longer
   (the tiny model's context is 1024 tokens), Poisson arrivals.

Each engine process is pinned to its own core (``VLLM_CPU_OMP_THREADS_BIND`` set
before each start), else vLLM binds both to the same one. One pool per engine set-up;
the balancer is swapped between runs through a small delegating Balancer and weights
are set on the idle instances, which saves restarting engines. Writes TAG.json (the
harness's provenance block first, then the setups) and TAG.md; ``--resim-speed`` writes
TAG_sim_speedS.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

import anyio
import numpy as np

from lylm import Balancer, EnginePool, Instance, RequestInfo
from lylm.balancers import BALANCERS, resolve_balancer

from . import results as results_io
from .engine import EngineConfig
from .model import StepModel
from .sim import Arrival, simulate
from .workloads import capacity, poisson_times, unique_prompt

class Switch(Balancer):
    """Delegates to whichever balancer the harness set last."""

    def __init__(self) -> None:
        self.inner: Balancer = resolve_balancer("weighted_random")

    def choose(self, candidates: Sequence[Instance], request: RequestInfo) -> Instance:
        return self.inner.choose(candidates, request)

    def on_finish(self, instance: Instance, request: RequestInfo, outcome: Any) -> None:
        self.inner.on_finish(instance, request, outcome)


def _pinned_factory(spec: Any) -> Any:
    from lylm import VLLMEngine

    class Pinned(VLLMEngine):
        async def start(self) -> None:
            # Read by the engine process at spawn: one core per engine.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(self.spec.index % (os.cpu_count() or 1))
            await super().start()

    return Pinned(spec)


def workload(kind: str, seed: int, n: int, rate: float) -> list[Arrival]:
    """The arrivals of one run (same for the real pool and the simulator)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in poisson_times(rng, n, rate):
        if kind == "heterogeneous":
            p, o = int(rng.integers(50, 151)), int(rng.integers(32, 97))
        else:
            p, o = int(rng.integers(30, 46)), int(rng.integers(16, 49))
            if rng.random() < 0.1:
                p *= 20
        out.append(Arrival(float(t), unique_prompt(rng, p), o))
    return out


async def run_real(pool: EnginePool, arrivals: list[Arrival]) -> dict[str, Any]:
    """Send every arrival at its time; return the same metrics as the simulator."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    instances = pool.instances("tiny")
    before = [i.completed for i in instances]
    ttft: list[float] = []
    e2e: list[float] = []
    tokens = 0
    start = time.perf_counter()
    end = start

    async def one(a: Arrival) -> None:
        nonlocal tokens, end
        await anyio.sleep(max(0.0, start + a.time - time.perf_counter()))
        t0 = time.perf_counter()
        first = None
        params = SamplingParams(max_tokens=a.output_tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        async for out in pool.generate("tiny", list(a.token_ids), params):
            n = len(out.outputs[0].token_ids)
            if n and first is None:
                first = time.perf_counter() - t0
            tokens += n
        now = time.perf_counter()
        ttft.append(first if first is not None else now - t0)
        e2e.append(now - t0)
        end = max(end, now)

    async with anyio.create_task_group() as tg:
        for a in arrivals:
            tg.start_soon(one, a)
    served = [i.completed - b for i, b in zip(instances, before)]
    return {
        "throughput": tokens / (end - start),
        "ttft_p50": float(np.percentile(ttft, 50)),
        "ttft_p99": float(np.percentile(ttft, 99)),
        "e2e_p99": float(np.percentile(e2e, 99)),
        "request_spread": max(served) / statistics.fmean(served),
        "served": served,
    }


SETUPS = {
    # name: (max_num_seqs per engine, weight variants, workload kind, load factor)
    "heterogeneous": ((8, 32), {"weights 1:2 (right)": (1, 2), "weights 1:1 (wrong)": (1, 1)}, "heterogeneous", 0.8),
    "skewed_prompts": ((32, 32), {"weights 1:1": (1, 1)}, "skewed", 0.85),
}


def setup_engine_args(harness: Any, model_dir: str, overrides: dict[str, Any], max_num_seqs: int) -> dict[str, Any]:
    """One engine of a setup: the target's engine args with its slot count and a 2,048-token budget."""
    return harness.engine_args(model_dir, overrides, max_num_seqs=max_num_seqs, max_num_batched_tokens=2048)


async def main_async(args: argparse.Namespace, harness: Any) -> dict[str, Any]:
    step = StepModel.load(pathlib.Path(args.out) / "calibration.json")
    overrides = json.loads(args.engine_args)
    results: dict[str, Any] = {}
    runs = sum(len(variants) for _, variants, _, _ in SETUPS.values()) * args.seeds * len(BALANCERS)
    progress = harness.Progress(runs, "sim.real")
    for name, (seqs, variants, kind, load) in SETUPS.items():
        engines = [EngineConfig(max_num_seqs=s) for s in seqs]
        mean_prompt, mean_out = (100, 64) if kind == "heterogeneous" else (0.9 * 37.5 + 0.1 * 750, 32)
        rate = load * args.load_scale * capacity(step, engines, mean_prompt, mean_out)
        switch = Switch()
        engine_args = [setup_engine_args(harness, args.model_dir, overrides, s) for s in seqs]
        config = {"models": {"tiny": [{"devices": harness.devices(), "engine_args": e} for e in engine_args]}}
        t0 = time.time()
        async with EnginePool.from_config(config, balancer=switch, engine_factory=_pinned_factory) as pool:
            print(f"{name}: engines up in {time.time() - t0:.0f} s; rate {rate:.1f} req/s", flush=True)
            # Warm-up, not counted.
            await run_real(pool, workload(kind, 99, 16, rate))
            for vname, weights in variants.items():
                for inst, w in zip(pool.instances("tiny"), weights):
                    inst.weight = w  # between runs, with nothing in flight
                cell: dict[str, Any] = {"rate": rate, "engine_args": engine_args, "real": {}, "sim": {}}
                for seed in range(args.seeds):
                    arrivals = workload(kind, seed, args.requests, rate)
                    for b in BALANCERS:
                        switch.inner = resolve_balancer(b, rng=random.Random(seed))
                        real = await run_real(pool, arrivals)
                        sim = simulate(engines, list(weights), b, arrivals, seed=seed, model=step).summary()
                        cell["real"].setdefault(b, []).append(real)
                        cell["sim"].setdefault(b, []).append(sim)
                        print(f"  {vname} seed {seed} {b}: real {real['throughput']:.0f} tok/s "
                              f"e2e p99 {real['e2e_p99']:.2f} s | sim {sim['throughput']:.0f} tok/s "
                              f"e2e p99 {sim['e2e_p99']:.2f} s", flush=True)
                        progress.step(f"{name}: {vname}, seed {seed}, {b}")
                results[f"{name}: {vname}"] = cell
    return results


def resimulate(results: dict[str, Any], speed: float, requests: int) -> dict[str, Any]:
    """Replace each cell's simulated side by a run with engines of ``speed`` (same arrivals):
    does a simulator as slow as the real, core-sharing engines rank like them?"""
    step = StepModel.load()
    out: dict[str, Any] = {}
    for key, cell in results.items():
        name, vname = key.split(": ", 1)
        seqs, variants, kind, _ = SETUPS[name]
        engines = [EngineConfig(max_num_seqs=s, speed=speed) for s in seqs]
        sim: dict[str, list[dict[str, Any]]] = {}
        for b in cell["real"]:
            for seed in range(len(cell["real"][b])):
                arrivals = workload(kind, seed, requests, cell["rate"])
                sim.setdefault(b, []).append(
                    simulate(engines, list(variants[vname]), b, arrivals, seed=seed, model=step).summary())
        out[key] = {**cell, "sim": sim, "sim_speed": speed}
    return out


def markdown(results: dict[str, Any]) -> str:
    """Real vs simulated, mean over seeds, with each side's ranking by e2e p99."""
    keys = ("throughput", "ttft_p50", "ttft_p99", "e2e_p99", "request_spread")
    lines = []
    for name, cell in results.items():
        lines += [f"### {name} (rate {cell['rate']:.1f} req/s)", "",
                  "| balancer | side | tok/s | TTFT p50 ms | TTFT p99 ms | e2e p99 s | req spread |",
                  "|---|---|---|---|---|---|---|"]
        ranks = {}
        for side in ("real", "sim"):
            means = {b: {k: statistics.fmean(r[k] for r in rs) for k in keys} for b, rs in cell[side].items()}
            ranks[side] = sorted(means, key=lambda b: means[b]["e2e_p99"])
            for b, m in means.items():
                lines.append(f"| {b} | {side} | {m['throughput']:.0f} | {m['ttft_p50']*1e3:.3g} | "
                             f"{m['ttft_p99']*1e3:.3g} | {m['e2e_p99']:.3g} | {m['request_spread']:.2f} |")
        lines += ["", f"Ranking by e2e p99, real: {' < '.join(ranks['real'])}; "
                      f"sim: {' < '.join(ranks['sim'])}; "
                      f"{'same' if ranks['real'] == ranks['sim'] else 'different'}.", ""]
    return "\n".join(lines)


def saved_setups(doc: dict[str, Any]) -> dict[str, Any]:
    """A TAG.json's setups: under ``setups`` (written through the harness) or, in files
    written before, at the top level."""
    return dict(doc["setups"]) if "setups" in doc else {k: v for k, v in doc.items() if ": " in k}


SAMPLING = {"max_tokens": "each arrival's output tokens (16..96)", "ignore_eos": True, "output_kind": "DELTA",
            "other": "vLLM's SamplingParams defaults; the simulator generates exactly the same counts"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/sim")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--load-scale", type=float, default=1.0,
                        help="multiply the arrival rates (the real pool shares 2 cores with its client)")
    parser.add_argument("--tag", default="real", help="output name: TAG.json, TAG.md")
    parser.add_argument("--resim-speed", type=float, default=None,
                        help="no engines: re-simulate TAG.json's arrivals with engines of this speed")
    results_io.harness().add_target_arguments(parser, shape=False)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    client = {"kind": "in-process pool.generate at Poisson arrival times (open loop)", "requests": args.requests,
              "seeds": args.seeds, "load_scale": args.load_scale, "balancers": list(BALANCERS)}
    if args.resim_speed is not None:
        harness = results_io.engine_free()
        saved = json.loads((out / f"{args.tag}.json").read_text())
        setups = resimulate(saved_setups(saved), args.resim_speed, args.requests)
        table = markdown(setups)
        head = saved.get("provenance") or {}
        harness.save_results(str(out / f"{args.tag}_sim_speed{args.resim_speed:g}"),
                             {"resim_speed": args.resim_speed, "from": f"{args.tag}.json", "setups": setups},
                             table + "\n", engine_args=head.get("engine_args"),
                             sampling=head.get("sampling", SAMPLING), client=head.get("client", client))
        print(table)
        return
    harness = results_io.cpu_only(args, "sim.real")
    setups = anyio.run(main_async, args, harness)
    table = markdown(setups)
    engine_args = {name: cell["engine_args"] for name, cell in setups.items()}
    harness.save_results(str(out / args.tag), {"settings": {k: v for k, v in vars(args).items()}, "setups": setups},
                         table + "\n", engine_args=engine_args, sampling=SAMPLING, client=client)
    print(table)


if __name__ == "__main__":
    main()
