"""PrefixAware's load guard swept in the simulator's shared-prefix scenario.

    .venv/bin/python -m benchmarks.sim.guard_sweep --out benchmarks/results/sim [--seeds 5]

Both shared-prefix variants (80% of cache-less capacity, and 3x it) for each
(load_factor, load_slack) pair, with session affinity off so that only prefix
matching and the guard decide. Means over seeds; writes guard_sweep.json (the harness's
provenance block first) and guard_sweep.md under ``--out``. No engine runs, so there is
no ``--device``.
"""

from __future__ import annotations

import argparse
import pathlib
import random
import statistics

from lylm.balancers import PrefixAware

from . import results as results_io
from .model import StepModel
from .scenarios import shared_prefix
from .sim import simulate

GUARDS = ((1.1, 1.0), (1.25, 1.0), (1.25, 2.0), (1.25, 4.0), (1.5, 2.0), (2.0, 4.0))
KEYS = ("throughput", "ttft_p90", "cache_hit_rate", "request_spread", "load_spread", "work_spread")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/sim")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000, help="requests per variant and seed")
    args = parser.parse_args()
    harness = results_io.engine_free()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = StepModel.load(out / "calibration.json")
    results: dict[str, dict[str, dict[str, float]]] = {}
    lines = ["| variant | load_factor | load_slack | tok/s | TTFT p90 ms | cache hits | max spread |",
             "|---|---|---|---|---|---|---|"]
    variants = shared_prefix(model, args.requests)
    progress = harness.Progress(len(variants) * len(GUARDS), "guard_sweep")
    for v in variants:
        arrivals = [v.workload(seed) for seed in range(args.seeds)]
        for factor, slack in GUARDS:
            runs = [
                simulate(v.engines, v.weights,
                         PrefixAware(load_factor=factor, load_slack=slack, session_affinity=False,
                                     rng=random.Random(seed)),
                         arrivals[seed], seed=seed, model=model).summary()
                for seed in range(args.seeds)
            ]
            mean = {k: statistics.fmean(r[k] for r in runs) for k in KEYS}
            results.setdefault(v.name, {})[f"{factor}/{slack}"] = mean
            spread = max(mean["request_spread"], mean["load_spread"], mean["work_spread"])
            lines.append(f"| {v.name} | {factor} | {slack} | {mean['throughput']:.0f} | "
                         f"{mean['ttft_p90'] * 1e3:.1f} | {mean['cache_hit_rate']:.1%} | {spread:.2f} |")
            progress.step(f"{v.name}, load_factor {factor}, load_slack {slack}")
    table = "\n".join(lines)
    payload = {"step_model": model.__dict__, "seeds": args.seeds, "requests": args.requests,
               "guards": [list(g) for g in GUARDS], "means": results}
    sampling = {"simulated": "every request generates exactly its workload's output tokens (as with ignore_eos)"}
    client = {"kind": "simulated arrivals of the shared-prefix scenario (benchmarks/sim/scenarios.py)",
              "seeds": args.seeds, "requests": args.requests,
              "balancer": "PrefixAware(load_factor, load_slack, session_affinity=False)"}
    harness.save_results(str(out / "guard_sweep"), payload, table + "\n", engine_args=None, sampling=sampling,
                         client=client)
    print(table)


if __name__ == "__main__":
    main()
