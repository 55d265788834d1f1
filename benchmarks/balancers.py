"""lylm's balancers on two real engines: the shared-prefix and the skewed-length scenarios.

    python benchmarks/balancers.py [--device cpu|gpu] [--model-dir DIR] [--shape qwen2.5-1.5b] \
        [--gpu-mem 0.4] [--kv-bytes 1610612736] [--seeds 2] [--procs 4] [--budget-s 480] \
        [--separate-gpus] [--out PREFIX] [--log-dir DIR]

A CPU dry run (``--device cpu``, the tiny model, max_model_len 1024) wants small
scenarios, e.g. ``--groups 4 --prefix-len 128 --question-len 16 --prefix-out 8
--prefix-requests 16 --prefix-concurrency 4 --skewed-requests 16 --skewed-concurrency 8
--short-min 10 --short-max 20 --long-factor 5 --seeds 1 --procs 1``.

One ``switch_server.py`` over two equal instances of the model on GPU 0 (weights
1:1; ``--device cpu``: two unpinned CPU engines), the balancer swapped between runs; before every run each engine's prefix
cache is emptied (``AsyncLLM.reset_prefix_cache``), so every balancer starts cold
on the same requests. The two scenarios are the simulator's
(``benchmarks/sim/scenarios.py``) sized for two engines and a closed loop (a fixed
number of requests in flight, as in every other GPU table):

- shared prefix: --groups prefixes of --prefix-len random tokens; each request is
  one group's prefix (group drawn at random) plus --question-len unique tokens,
  --prefix-out output tokens, ``user`` = the group (lylm's session key). Each
  engine's KV cache is capped at --kv-bytes (vLLM's kv_cache_memory_bytes; default
  1.5 GiB on a GPU, the tiny model's own 64 MiB on the CPU), less
  than all prefixes need but more than half of them, so where requests land decides
  what stays cached. The README's session-sticky example
  (``examples.custom_balancer:StickyByUser``) runs as a reference.
- skewed lengths: 90% prompts of 50..150 tokens, 10% twenty times longer
  (--short-min, --short-max, --long-factor), 32..96 output tokens.

Prefix-cache hit rate = cached prompt tokens / prompt tokens, from the usage that
lylm returns (``prompt_tokens_details.cached_tokens`` = vLLM's ``num_cached_tokens``,
full 16-token blocks only), cross-checked against the engines' own prefix-cache
stats (vLLM's scheduler stats through lylm's stat logger, /bench/engines).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

import anyio

import harness
import mpload

NAME = "m"
BALANCERS = ["weighted_random", "least_outstanding", "token_aware", "prefix_aware"]
STICKY = "examples.custom_balancer:StickyByUser"


def shared_prefix(args: argparse.Namespace, seed: int, vocab: int) -> tuple[list[dict[str, Any]], list[str]]:
    rng = random.Random(f"prefix:{seed}")
    top = min(vocab, harness.FIRST_SPECIAL_ID)
    prefixes = [[rng.randrange(16, top) for _ in range(args.prefix_len)] for _ in range(args.groups)]
    payloads, tags = [], []
    for _ in range(args.prefix_requests):
        g = rng.randrange(args.groups)
        prompt = prefixes[g] + [rng.randrange(16, top) for _ in range(args.question_len)]
        payloads.append(mpload.body(NAME, "completions", prompt, args.prefix_out, user=f"group-{g}"))
        tags.append(f"group-{g}")
    return payloads, tags


def skewed(args: argparse.Namespace, seed: int, vocab: int) -> tuple[list[dict[str, Any]], list[str]]:
    rng = random.Random(f"skewed:{seed}")
    top = min(vocab, harness.FIRST_SPECIAL_ID)
    payloads, tags = [], []
    for _ in range(args.skewed_requests):
        n = rng.randint(args.short_min, args.short_max)
        long = rng.random() < 0.1
        if long:
            n *= args.long_factor
        out = rng.randint(32, 96)
        payloads.append(mpload.body(NAME, "completions", [rng.randrange(16, top) for _ in range(n)], out))
        tags.append("long" if long else "short")
    return payloads, tags


SCENARIOS = {"shared_prefix": shared_prefix, "skewed_lengths": skewed}


def engine_delta(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-engine requests served and the engines' own prefix-cache queries and hits in a run."""
    served = [a["completed"] - b["completed"] for a, b in zip(after, before)]
    q = [a["signals"]["prefix_cache_queries"] - b["signals"]["prefix_cache_queries"] for a, b in zip(after, before)]
    h = [a["signals"]["prefix_cache_hits"] - b["signals"]["prefix_cache_hits"] for a, b in zip(after, before)]
    return {"served": served, "engine_prefix_queries": q, "engine_prefix_hits": h,
            "engine_hit_rate": (sum(h) / sum(q)) if sum(q) else None}


def runs_per_seed() -> int:
    """Measured runs of one seed: every balancer on each scenario, the sticky one on shared prefix."""
    return sum(len(BALANCERS) + (scenario == "shared_prefix") for scenario in SCENARIOS)


async def run_all(args: argparse.Namespace, url: str, vocab: int, deadline: harness.Deadline) -> dict[str, Any]:
    results: dict[str, Any] = {}
    progress = harness.Progress(args.seeds * runs_per_seed(), "balancers")
    with mpload.MultiClient(args.procs) as mc:
        warm = harness.token_prompts(64, 128, 777, vocab)
        await mc.run(url, "completions", [mpload.body(NAME, "completions", p, 16) for p in warm], 32)
        for seed in range(args.seeds):
            for scenario, build in SCENARIOS.items():
                if seed >= 1 and deadline.left() < args.seed_reserve_s:
                    print(f"skipping {scenario} seed {seed}: {deadline.left():.0f} s left", flush=True)
                    progress.total -= len(BALANCERS) + (scenario == "shared_prefix")
                    continue
                payloads, tags = build(args, seed, vocab)
                conc = args.prefix_concurrency if scenario == "shared_prefix" else args.skewed_concurrency
                names = BALANCERS + ([STICKY] if scenario == "shared_prefix" else [])
                if seed % 2:
                    names = names[::-1]
                for b in names:
                    harness.set_policy(url, b, [1.0, 1.0], seed=seed, reset_prefix_cache=True)
                    before = harness.bench_engines(url)
                    cell = await mc.run(url, "completions", payloads, conc, tags=tags)
                    after = harness.bench_engines(url)
                    s = cell.summary()
                    s.update(engine_delta(before, after))
                    long = [r for r in cell.requests if isinstance(r, mpload.Request) and r.ok and r.tag == "long"]
                    if long:
                        s["long_ttft_p50_ms"] = 1000 * statistics.median(r.ttft_s for r in long if r.ttft_s is not None)
                    e2e = sorted(r.e2e_s for r in cell.requests if r is not None and r.ok)
                    s["e2e_p99_s"] = e2e[min(len(e2e) - 1, int(0.99 * len(e2e)))] if e2e else None
                    s["seed"] = seed
                    s["concurrency_setting"] = conc
                    results.setdefault(scenario, {}).setdefault(b, []).append(s)
                    print(f"{scenario} seed {seed} {b:40s} {s['system_tokens_per_s'] or 0:7.0f} tok/s TTFT p50 "
                          f"{s['ttft_p50_ms'] or 0:7.1f} p99 {s['ttft_p99_ms'] or 0:7.1f} ms e2e p99 {s['e2e_p99_s'] or 0:.2f} s "
                          f"hit {100 * (s['cache_hit_rate'] or 0):5.1f}% (engines {100 * (s['engine_hit_rate'] or 0):5.1f}%) "
                          f"served {s['served']} ok {s['success_rate']:.0%} {cell.wall_s:.1f} s", flush=True)
                    progress.step(f"{scenario} seed {seed} {b}")
    return results


KEYS = ("system_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "e2e_p99_s", "cache_hit_rate", "engine_hit_rate")


def table(results: dict[str, Any]) -> str:
    lines = []
    for scenario, per in results.items():
        lines += [f"### {scenario}", "",
                  "| balancer | seeds | tok/s | TTFT p50 ms | TTFT p99 ms | e2e p99 s | prefix-cache hit % (usage) | "
                  "hit % (engine stats) | requests per engine |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for b, runs in per.items():
            m = {k: statistics.fmean(r[k] for r in runs if r.get(k) is not None) if any(r.get(k) is not None for r in runs) else None
                 for k in KEYS}
            served = [sum(x) for x in zip(*(r["served"] for r in runs))]
            label = "sticky (README example)" if b == STICKY else b
            lines.append(
                f"| {label} | {len(runs)} | {harness.fmt(m['system_tokens_per_s'])} | {harness.fmt(m['ttft_p50_ms'], '.1f')} | "
                f"{harness.fmt(m['ttft_p99_ms'], '.1f')} | {harness.fmt(m['e2e_p99_s'], '.2f')} | "
                f"{harness.fmt(None if m['cache_hit_rate'] is None else 100 * m['cache_hit_rate'], '.1f')} | "
                f"{harness.fmt(None if m['engine_hit_rate'] is None else 100 * m['engine_hit_rate'], '.1f')} | "
                f"{' / '.join(str(x) for x in served)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_target_arguments(parser)
    harness.add_run_arguments(parser, gpu_mem=0.4, procs=4)
    parser.add_argument("--kv-bytes", type=int, default=None,
                        help="kv_cache_memory_bytes per engine (0: not set; default: 1.5 GiB on gpu, the tiny model's on cpu)")
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--prefix-len", type=int, default=2048)
    parser.add_argument("--question-len", type=int, default=200)
    parser.add_argument("--prefix-out", type=int, default=32)
    parser.add_argument("--prefix-requests", type=int, default=512)
    parser.add_argument("--prefix-concurrency", type=int, default=32)
    parser.add_argument("--short-min", type=int, default=50)
    parser.add_argument("--short-max", type=int, default=150)
    parser.add_argument("--long-factor", type=int, default=20, help="long prompts (10%%) are this many times longer")
    parser.add_argument("--skewed-requests", type=int, default=1024)
    parser.add_argument("--skewed-concurrency", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--seed-reserve-s", type=float, default=150.0, help="start a seed > 0 only with this much left")
    parser.add_argument("--separate-gpus", action="store_true", help="instance i on GPU i (default: both on GPU 0)")
    args = parser.parse_args()
    deadline, log_dir = harness.start_run(args, "balancers")
    if args.kv_bytes is None:
        args.kv_bytes = 0 if harness.DEVICE == "cpu" else 3 * 2**29

    extra: dict[str, Any] = {"gpu_memory_utilization": args.gpu_mem}
    if args.kv_bytes:
        extra["kv_cache_memory_bytes"] = args.kv_bytes
    eargs = harness.engine_args(args.model_dir, json.loads(args.engine_args), **extra)
    instances = [{"devices": harness.devices(1, gpu=i if args.separate_gpus else 0), "engine_args": eargs}
                 for i in range(2)]
    config = harness.write_lylm_config(log_dir / "lylm-balancers.json", NAME, instances)
    port = harness.free_port()
    command = harness.switch_server_command(config, port)
    result: dict[str, Any] = {"config": {**vars(args), "engine_args": eargs, "command": " ".join(command)},
                              "machine": harness.device_info()}
    t0 = time.monotonic()
    with harness.server("switch", command, log_dir, port, timeout_s=600) as url:
        result["start_s"] = time.monotonic() - t0
        result["gpu_processes"] = harness.gpu_processes()
        results = anyio.run(run_all, args, url, harness.vocab_size(args.model_dir), deadline)
    result["scenarios"] = results
    kv = f"kv_cache_memory_bytes {eargs.get('kv_cache_memory_bytes')} each"
    md = f"{args.shape}, two equal instances (weights 1:1), {kv}; mean over seeds\n\n" + table(results)
    print(md, flush=True)
    sampling = {
        "api": "completions", "stream": True, "ignore_eos": True,
        "other": "the model's generation config (lylm's default sampling)",
        "shared_prefix": {"prompt": f"one of {args.groups} prefixes of {args.prefix_len} random token ids, then "
                                    f"{args.question_len} unique ones", "max_tokens": args.prefix_out,
                          "user": "the prefix's group"},
        "skewed_lengths": {"prompt": f"random token ids, 90% {args.short_min}..{args.short_max} long, "
                                     f"10% {args.long_factor}x longer", "max_tokens": "32..96 (random per request)"},
    }
    client = {"kind": "mpload.MultiClient", "processes": args.procs, "seeds": args.seeds,
              "balancers": BALANCERS + [STICKY + " (shared_prefix only)"],
              "shared_prefix": {"requests": args.prefix_requests, "concurrency": args.prefix_concurrency},
              "skewed_lengths": {"requests": args.skewed_requests, "concurrency": args.skewed_concurrency},
              "between_runs": "prefix caches reset, balancer swapped (switch_server /bench/policy)"}
    harness.save_results(args.out, result, md, log_dir, engine_args=[i["engine_args"] for i in instances],
                         sampling=sampling, client=client)


if __name__ == "__main__":
    main()
