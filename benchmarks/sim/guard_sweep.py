"""PrefixAware's load guard swept in the simulator's shared-prefix scenario.

    .venv/bin/python -m benchmarks.sim.guard_sweep --out benchmarks/results/sim [--seeds 5]

Both shared-prefix variants (80% of cache-less capacity, and 3x it) for each
(load_factor, load_slack) pair, with session affinity off so that only prefix
matching and the guard decide. Means over seeds; writes guard_sweep.json and
guard_sweep.md under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics

from lylm.balancers import PrefixAware

from .model import StepModel
from .scenarios import shared_prefix
from .sim import simulate

GUARDS = ((1.1, 1.0), (1.25, 1.0), (1.25, 2.0), (1.25, 4.0), (1.5, 2.0), (2.0, 4.0))
KEYS = ("throughput", "ttft_p90", "cache_hit_rate", "request_spread", "load_spread", "work_spread")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/sim")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    model = StepModel.load(out / "calibration.json")
    results: dict[str, dict[str, dict[str, float]]] = {}
    lines = ["| variant | load_factor | load_slack | tok/s | TTFT p90 ms | cache hits | max spread |",
             "|---|---|---|---|---|---|---|"]
    for v in shared_prefix(model, 2000):
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
    table = "\n".join(lines)
    (out / "guard_sweep.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "guard_sweep.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
