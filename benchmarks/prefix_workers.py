"""Does prefix affinity survive several front-end workers? Prefix-cache hit rate with 1 vs 2 workers.

    flock /tmp/lylm-bench.lock python benchmarks/prefix_workers.py [--requests 160] [--concurrency 8]
        [--groups 4] [--rounds 2] [--out benchmarks/results/prefix_workers]

Serves the tiny demo model (CPU build) on two engines of equal weight with
``lylm serve --workers W``, for W in 1, 2 and for the balancers
``prefix_aware`` and ``weighted_random`` (the baseline that ignores prefixes).
Requests: the ``shared-prefix`` prompt set (``--groups`` long prefixes, each
followed by its own short question), streamed completions of 8 tokens. The hit
rate is the share of prompt tokens the engines found in their prefix caches
(``usage.prompt_tokens_details.cached_tokens``, vLLM's own count). With workers,
the hub's one ``prefix_aware`` table decides for every worker, so its hit rate
should not drop. Rounds alternate the order of the arms; each arm restarts its
server (empty caches).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))
import gpucommon  # noqa: E402
import loadgen  # noqa: E402
import mpload  # noqa: E402

from lylm.testing import TINY_MODEL_ENGINE_ARGS, build_tiny_model  # noqa: E402


def config(cache: Path, balancer: str) -> dict[str, Any]:
    model = build_tiny_model(cache / "tiny-model")
    instance = {"devices": {"weight": 1}, "engine_args": {"model": str(model), **TINY_MODEL_ENGINE_ARGS}}
    return {"models": {"tiny": {"balancer": balancer, "instances": [instance, instance]}}}


async def one_arm(args: argparse.Namespace, mc: mpload.MultiClient, url: str, seed: int) -> dict[str, Any]:
    prompts = loadgen.build_prompts("shared-prefix", args.requests, seed, long_words=args.long_words, groups=args.groups)
    payloads = [mpload.body("tiny", "completions", p, 8) for p in prompts]
    return (await mc.run(url, "completions", payloads, args.concurrency)).summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--long-words", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(gpucommon.BENCH / "results" / "prefix_workers"))
    args = parser.parse_args()
    cache = Path(os.environ.get("LYLM_CACHE_DIR") or Path.home() / ".cache" / "lylm")
    work = Path(tempfile.mkdtemp(prefix="lylm-prefix-workers-"))
    arms = [(b, w) for b in ("prefix_aware", "weighted_random") for w in (1, 2)]
    samples: dict[str, list[dict[str, Any]]] = {f"{b} x{w}": [] for b, w in arms}
    with mpload.MultiClient(1) as mc:
        for r in range(args.rounds):
            for balancer, workers in (arms if r % 2 == 0 else arms[::-1]):
                name = f"{balancer} x{workers}"
                path = work / f"{balancer}.json"
                path.write_text(json.dumps(config(cache, balancer)))
                port = gpucommon.free_port()
                command = [*gpucommon.lylm_serve_command(path, port), "--workers", str(workers)]
                with gpucommon.server(f"{balancer}_w{workers}_r{r}", command, work, port) as url:
                    s = anyio.run(one_arm, args, mc, url, r)
                samples[name].append(s)
                print(f"r{r} {name:20s} hit rate {s['cache_hit_rate'] or 0:.3f}, {s['system_tokens_per_s'] or 0:.0f} tok/s, "
                      f"TTFT p50 {s['ttft_p50_ms'] or 0:.1f} ms, ok {s['success_rate']:.0%}", flush=True)
    rows = []
    for name, ss in samples.items():
        rows.append({
            "arm": name,
            "rounds": len(ss),
            "hit_rate": gpucommon.median([s["cache_hit_rate"] for s in ss]),
            "hit_rate_all": [s["cache_hit_rate"] for s in ss],
            "tok_s": gpucommon.median([s["system_tokens_per_s"] for s in ss]),
            "ttft_p50_ms": gpucommon.median([s["ttft_p50_ms"] for s in ss]),
            "success": min(s["success_rate"] for s in ss),
        })
    f = gpucommon.fmt
    md = ("| balancer, workers | prefix-cache hit rate (median) | per round | tok/s | TTFT p50 ms | ok |\n"
          "|---|---|---|---|---|---|\n")
    for row in rows:
        md += (f"| {row['arm']} | {f(row['hit_rate'], '.3f')} | {', '.join(f(h, '.3f') for h in row['hit_rate_all'])} | "
               f"{f(row['tok_s'])} | {f(row['ttft_p50_ms'], '.1f')} | {row['success']:.0%} |\n")
    print(md)
    result = {"machine": loadgen.machine_info(), "settings": vars(args), "rows": rows, "started": time.time()}
    gpucommon.save_results(args.out, result, md, work)


if __name__ == "__main__":
    main()
