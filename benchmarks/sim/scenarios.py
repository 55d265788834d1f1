"""Run every scenario x balancer x seed in the simulator; write JSON, tables, plots.

    .venv/bin/python -m benchmarks.sim.scenarios --out benchmarks/results/sim [--seeds 5] [--scale 1.0]

Balancers are every name in ``lylm.balancers.BALANCERS`` (new built-ins join by
themselves) plus ``--extra`` import strings; the default extras are the README's
session-sticky example (``examples.custom_balancer:StickyByUser``), shown as a
reference, and ``prefix_aware`` with session affinity off (prefix hashing alone),
both only where session keys exist: the shared-prefix scenario sets one per group.
All balancers of a seed see the same arrivals. Writes ``scenarios.json`` (the harness's
provenance block first), ``scenarios.md`` and ``<scenario>.png`` under ``--out``.
No engine runs (the step-time model comes from ``--out``'s calibration.json), so there is
no ``--device``.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lylm.balancers import BALANCERS

from . import results as results_io
from .engine import EngineConfig
from .model import StepModel
from .sim import Arrival, simulate
from .workloads import capacity, poisson_times, unique_prompt

STICKY = "examples.custom_balancer:StickyByUser"
PREFIX_ONLY = "benchmarks.sim.variants:PrefixOnly"
METRICS = (
    ("throughput", "tok/s", 1.0),
    ("ttft_p50", "TTFT p50 ms", 1e3),
    ("ttft_p90", "TTFT p90 ms", 1e3),
    ("ttft_p99", "TTFT p99 ms", 1e3),
    ("e2e_p99", "e2e p99 s", 1.0),
    ("request_spread", "req spread", 1.0),
    ("load_spread", "load spread", 1.0),
    ("work_spread", "work spread", 1.0),
    ("cache_hit_rate", "cache hit %", 100.0),
)


@dataclass(frozen=True)
class Variant:
    """One pool set-up of a scenario: its engines, weights and workload."""

    name: str
    engines: list[EngineConfig]
    weights: list[float]
    workload: Callable[[int], list[Arrival]]


def _chat(rng: np.random.Generator) -> tuple[int, int]:
    """A short chat turn: 50..150 prompt tokens, 32..96 output tokens."""
    return int(rng.integers(50, 151)), int(rng.integers(32, 97))


def heterogeneous(model: StepModel, n: int) -> list[Variant]:
    """Two instances of speeds 1 and 2; weights 1:2 (right) or 1:1 (wrong); Poisson at 85%."""
    engines = [EngineConfig(speed=1.0), EngineConfig(speed=2.0)]
    rate = 0.85 * capacity(model, engines, 100, 64)

    def workload(seed: int) -> list[Arrival]:
        rng = np.random.default_rng(seed)
        out = []
        for t in poisson_times(rng, n, rate):
            p, o = _chat(rng)
            out.append(Arrival(t, unique_prompt(rng, p), o))
        return out

    return [Variant("weights 1:2 (right)", engines, [1, 2], workload),
            Variant("weights 1:1 (wrong)", engines, [1, 1], workload)]


def skewed(model: StepModel, n: int) -> list[Variant]:
    """Four equal instances; 90% chats, 10% prompts 20x longer; Poisson at 90% of capacity."""
    engines = [EngineConfig() for _ in range(4)]
    mean_prompt = 0.9 * 100 + 0.1 * 2000
    rate = 0.9 * capacity(model, engines, mean_prompt, 64)

    def workload(seed: int) -> list[Arrival]:
        rng = np.random.default_rng(seed)
        out = []
        for t in poisson_times(rng, n, rate):
            p, o = _chat(rng)
            if rng.random() < 0.1:
                p *= 20
            out.append(Arrival(t, unique_prompt(rng, p), o))
        return out

    return [Variant("4 equal engines", engines, [1] * 4, workload)]


def shared_prefix(model: StepModel, n: int) -> list[Variant]:
    """32 groups x 2048-token prefix + 200-token question; per-engine KV 24k tokens
    (< the 64k of all prefixes), pool 96k (> 64k). Poisson at 80% of cache-less capacity,
    and at 3x it (overload: throughput then shows each policy's capacity)."""
    engines = [EngineConfig(kv_cache_tokens=24576) for _ in range(4)]
    groups, prefix_len, question, output = 32, 2048, 200, 32
    cacheless = capacity(model, engines, prefix_len + question, output)

    def at(load: float) -> Callable[[int], list[Arrival]]:
        def workload(seed: int) -> list[Arrival]:
            rng = np.random.default_rng(seed)
            prefixes = [unique_prompt(rng, prefix_len) for _ in range(groups)]
            out = []
            for t in poisson_times(rng, n, load * cacheless):
                g = int(rng.integers(groups))
                out.append(Arrival(t, prefixes[g] + unique_prompt(rng, question), output, session_key=f"group-{g}"))
            return out

        return workload

    return [Variant("32 groups, 4 engines", engines, [1] * 4, at(0.8)),
            Variant("32 groups, 4 engines, 3x overload", engines, [1] * 4, at(3.0))]


def burst(model: StepModel, n: int) -> list[Variant]:
    """Every request at t=0 on four equal instances: skewed prompts, 16..256 output tokens."""
    engines = [EngineConfig() for _ in range(4)]

    def workload(seed: int) -> list[Arrival]:
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            p = int(rng.integers(50, 151)) * (20 if rng.random() < 0.1 else 1)
            out.append(Arrival(0.0, unique_prompt(rng, p), int(rng.integers(16, 257))))
        return out

    return [Variant(f"{n} requests at once", engines, [1] * 4, workload)]


SCENARIOS: dict[str, tuple[Callable[[StepModel, int], list[Variant]], int]] = {
    "heterogeneous": (heterogeneous, 2000),
    "skewed_prompts": (skewed, 3000),
    "shared_prefix": (shared_prefix, 2000),
    "burst": (burst, 1000),
}


def run_all(seeds: int, balancers: list[str], model: StepModel, scale: float = 1.0,
            progress: Any = None) -> dict[str, Any]:
    """Every scenario, variant, balancer and seed; per-seed metrics and their means.
    ``progress`` (a ``harness.Progress``, optional) steps once per variant."""
    results: dict[str, Any] = {}
    for scenario, (build, n) in SCENARIOS.items():
        variants = build(model, max(int(n * scale), 10))
        results[scenario] = {"doc": (build.__doc__ or "").split("\n")[0], "variants": {}}
        for v in variants:
            runs: dict[str, list[dict[str, Any]]] = {b: [] for b in balancers}
            for seed in range(seeds):
                arrivals = v.workload(seed)
                for b in balancers:
                    if b in (STICKY, PREFIX_ONLY) and all(a.session_key is None for a in arrivals):
                        # Without session keys it is its fallback, least_outstanding: skip.
                        runs.pop(b, None)
                        continue
                    res = simulate(v.engines, v.weights, b, arrivals, seed=seed, model=model)
                    runs[b].append(res.summary())
            results[scenario]["variants"][v.name] = {
                "engines": [e.__dict__ for e in v.engines],
                "weights": v.weights,
                "requests": len(arrivals),
                "runs": runs,
                "mean": {b: {k: statistics.fmean(r[k] for r in rs) for k, _, _ in METRICS} for b, rs in runs.items()},
                "std": {b: {k: statistics.pstdev([r[k] for r in rs]) for k, _, _ in METRICS} for b, rs in runs.items()},
            }
            if progress is not None:
                progress.step(f"{scenario}: {v.name}")
    return results


def _label(b: str) -> str:
    return {STICKY: "sticky (example)", PREFIX_ONLY: "prefix_aware, sessions off"}.get(b, b)


def markdown(results: dict[str, Any], seeds: int) -> str:
    """One table per scenario variant: mean over seeds, throughput +- std."""
    lines = [f"Simulated; mean over {seeds} seeds (throughput: mean +- std). "
             "Spreads are max/mean over engines: requests served, and batched tokens per unit of speed.", ""]
    for scenario, data in results.items():
        for vname, v in data["variants"].items():
            lines += [f"### {scenario}: {vname}", "", f"{data['doc']} ({v['requests']} requests)", ""]
            lines.append("| balancer | " + " | ".join(h for _, h, _ in METRICS) + " |")
            lines.append("|---" * (len(METRICS) + 1) + "|")
            for b, m in v["mean"].items():
                cells = []
                for k, _, f in METRICS:
                    val = m[k] * f
                    cell = f"{val:.0f}" if k == "throughput" else f"{val:.3g}" if k != "cache_hit_rate" else f"{val:.1f}"
                    if k == "throughput":
                        cell += f" +- {v['std'][b][k]:.0f}"
                    cells.append(cell)
                lines.append(f"| {_label(b)} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
    """A bar chart per scenario: one panel per metric, bars per balancer, groups per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    shown = [m for m in METRICS if m[0] != "ttft_p50"]
    for scenario, data in results.items():
        variants = list(data["variants"].items())
        balancers = list(variants[0][1]["mean"])
        fig, axes = plt.subplots(1, len(shown), figsize=(3.1 * len(shown), 3.6))
        width = 0.8 / len(balancers)
        for ax, (key, title, f) in zip(axes, shown):
            for j, b in enumerate(balancers):
                xs = [i + (j - (len(balancers) - 1) / 2) * width for i in range(len(variants))]
                ys = [v["mean"][b][key] * f for _, v in variants]
                es = [v["std"][b][key] * f for _, v in variants]
                ax.bar(xs, ys, width, yerr=es, label=_label(b), capsize=2)
            ax.set_title(title, fontsize=9)
            ax.set_xticks(range(len(variants)))
            ax.set_xticklabels([name for name, _ in variants], fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{scenario}: {data['doc']}", fontsize=9)
        fig.tight_layout()
        path = out / f"{scenario}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/sim")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every scenario's request count")
    parser.add_argument("--extra", nargs="*", default=[STICKY, PREFIX_ONLY],
                        help="more balancers, as import strings")
    args = parser.parse_args()
    harness = results_io.engine_free()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = StepModel.load(out / "calibration.json")
    balancers = list(BALANCERS) + list(args.extra)
    t0 = time.time()
    variants = sum(len(build(model, 10)) for build, _ in SCENARIOS.values())  # builds no workload yet
    results = run_all(args.seeds, balancers, model, args.scale, harness.Progress(variants, "scenarios"))
    payload = {"step_model": model.__dict__, "seeds": args.seeds, "scale": args.scale, "balancers": balancers,
               "scenarios": results}
    table = markdown(results, args.seeds)
    sampling = {"simulated": "every request generates exactly its workload's output tokens (as with ignore_eos)"}
    client = {"kind": "simulated arrivals (benchmarks/sim/workloads.py), per scenario", "seeds": args.seeds,
              "scale": args.scale, "balancers": balancers}
    harness.save_results(str(out / "scenarios"), payload, table + "\n", engine_args=None, sampling=sampling,
                         client=client)
    plot(results, out)
    print(table)
    print(f"simulated in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
