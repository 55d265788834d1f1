"""Does prefix affinity survive several front-end workers? Prefix-cache hit rate with 1 vs 2 workers.

    flock /tmp/lylm-bench.lock python benchmarks/prefix_workers.py [--device cpu|gpu] [--model-dir DIR] \
        [--engine-args JSON] [--gpu-mem 0.4] [--requests 160] [--concurrency 8] [--groups 4] \
        [--long-words 150] [--rounds 2] [--out PREFIX]

A CPU dry run (``--device cpu``, the tiny model; each arm restarts its server, up to a
minute each on 2 cores) wants e.g. ``--requests 32 --rounds 1`` (about 4 minutes).

Serves the model (``--device cpu``: the tiny demo model on the CPU build; on a GPU two
instances on GPU 0 at --gpu-mem each) on two engines of equal weight with
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
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

import harness
import loadgen
import mpload

NAME = "m"
MAX_TOKENS = 8


def config(eargs: dict[str, Any], balancer: str) -> dict[str, Any]:
    instance = {"devices": harness.devices(1), "engine_args": eargs}
    return {"models": {NAME: {"balancer": balancer, "instances": [instance, instance]}}}


async def one_arm(args: argparse.Namespace, mc: mpload.MultiClient, url: str, seed: int) -> dict[str, Any]:
    prompts = loadgen.build_prompts("shared-prefix", args.requests, seed, long_words=args.long_words, groups=args.groups)
    payloads = [mpload.body(NAME, "completions", p, MAX_TOKENS) for p in prompts]
    return (await mc.run(url, "completions", payloads, args.concurrency)).summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_target_arguments(parser, shape=False)
    parser.add_argument("--gpu-mem", type=float, default=0.4, help="gpu_memory_utilization of each of the two engines")
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--long-words", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None, help="result prefix (default: results/prefix_workers_<device>)")
    args = parser.parse_args()
    harness.resolve_target(args)
    args.out = args.out or str(harness.BENCH / "results" / f"prefix_workers_{args.device}")
    eargs = harness.engine_args(args.model_dir, json.loads(args.engine_args), gpu_memory_utilization=args.gpu_mem)
    work = Path(tempfile.mkdtemp(prefix="lylm-prefix-workers-"))
    arms = [(b, w) for b in ("prefix_aware", "weighted_random") for w in (1, 2)]
    samples: dict[str, list[dict[str, Any]]] = {f"{b} x{w}": [] for b, w in arms}
    progress = harness.Progress(args.rounds * len(arms), "prefix_workers")
    with mpload.MultiClient(1) as mc:
        for r in range(args.rounds):
            for balancer, workers in (arms if r % 2 == 0 else arms[::-1]):
                name = f"{balancer} x{workers}"
                path = work / f"{balancer}.json"
                path.write_text(json.dumps(config(eargs, balancer)))
                port = harness.free_port()
                command = [*harness.lylm_serve_command(path, port), "--workers", str(workers)]
                with harness.server(f"{balancer}_w{workers}_r{r}", command, work, port) as url:
                    s = anyio.run(one_arm, args, mc, url, r)
                samples[name].append(s)
                print(f"r{r} {name:20s} hit rate {s['cache_hit_rate'] or 0:.3f}, {s['system_tokens_per_s'] or 0:.0f} tok/s, "
                      f"TTFT p50 {s['ttft_p50_ms'] or 0:.1f} ms, ok {s['success_rate']:.0%}", flush=True)
                progress.step(f"round {r}, {name}")
    rows = []
    for name, ss in samples.items():
        rows.append({
            "arm": name,
            "rounds": len(ss),
            "hit_rate": harness.median([s["cache_hit_rate"] for s in ss]),
            "hit_rate_all": [s["cache_hit_rate"] for s in ss],
            "tok_s": harness.median([s["system_tokens_per_s"] for s in ss]),
            "ttft_p50_ms": harness.median([s["ttft_p50_ms"] for s in ss]),
            "success": min(s["success_rate"] for s in ss),
        })
    f = harness.fmt
    md = ("| balancer, workers | prefix-cache hit rate (median) | per round | tok/s | TTFT p50 ms | ok |\n"
          "|---|---|---|---|---|---|\n")
    for row in rows:
        md += (f"| {row['arm']} | {f(row['hit_rate'], '.3f')} | {', '.join(f(h, '.3f') for h in row['hit_rate_all'])} | "
               f"{f(row['tok_s'])} | {f(row['ttft_p50_ms'], '.1f')} | {row['success']:.0%} |\n")
    print(md)
    result = {"machine": harness.device_info(), "settings": vars(args), "rows": rows, "started": time.time()}
    sampling = {"api": "completions", "prompt": f"loadgen's shared-prefix set: {args.groups} prefixes of "
                                                f"{args.long_words} words, each with its own short question",
                "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True,
                "other": "the model's generation config (lylm's default)"}
    client = {"kind": "mpload.MultiClient", "processes": 1, "requests": args.requests, "concurrency": args.concurrency,
              "rounds": args.rounds, "arms": [f"{b} x{w}" for b, w in arms],
              "between_arms": "the server restarts (empty prefix caches)"}
    harness.save_results(args.out, result, md, work, engine_args=[eargs, eargs], sampling=sampling, client=client)


if __name__ == "__main__":
    main()
