"""Pool overhead: pool.generate vs the same AsyncLLM driven directly.

    python benchmarks/pool_overhead.py [--device cpu|gpu] [--model-dir DIR] [--engine-args JSON] \
        [--requests N] [--concurrency N] [--prompt-len N] [--max-tokens N] \
        [--rounds N] [--budget-s 300] [--out PREFIX]

One engine (on a GPU: devices.gpu_ids [0]; ``--device cpu``: the tiny model on the CPU
build, with smaller defaults) serves both paths: ``AsyncLLM.generate`` with
token-id prompts, and ``EnginePool.generate`` with the same token ids (the pool
adds its balancer, books and two async-generator layers). Rounds alternate
(direct, pool, pool, direct, ...); every round sends the same prompts with
ignore_eos, so both paths generate exactly the same tokens. Sampling params are
the model's generation config (as the HTTP servers use) plus max_tokens,
ignore_eos and DELTA outputs. Per round: output tokens/s and TTFT p50/p99 (from
the call until the first output with a token), and this process's full (gen-2)
garbage collections. ``--gc-modes none,freeze`` alternates rounds between Python's
default collector and a frozen start-up heap (``gc.freeze()``, as vLLM's server
does). Target: pool >= 0.97x direct.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio

import harness
import loadgen

TARGET = 0.97
MODEL = "m"


async def drive(stream: Callable[[list[int]], AsyncIterator[Any]], prompts: list[list[int]], concurrency: int) -> dict[str, Any]:
    """Run every prompt through ``stream``, at most ``concurrency`` at once."""
    limit = anyio.Semaphore(concurrency)
    tokens = 0
    ttfts: list[float] = []

    async def one(ids: list[int]) -> None:
        nonlocal tokens
        async with limit:
            t0 = time.perf_counter()
            first = None
            async for out in stream(ids):
                n = len(out.outputs[0].token_ids)
                if n and first is None:
                    first = time.perf_counter() - t0
                tokens += n
            if first is not None:
                ttfts.append(first)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for ids in prompts:
            tg.start_soon(one, ids)
    wall = time.perf_counter() - start
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "ttft_p50_ms": 1000 * (loadgen.percentile(ttfts, 50) or 0.0),
        "ttft_p99_ms": 1000 * (loadgen.percentile(ttfts, 99) or 0.0),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from lylm import EnginePool

    deadline = harness.Deadline(args.budget_s)
    eargs = harness.engine_args(args.model_dir, json.loads(args.engine_args))
    config = {"models": {MODEL: [{"devices": harness.devices(), "engine_args": eargs}]}}
    prompts = harness.token_prompts(args.requests, args.prompt_len, 7, harness.vocab_size(args.model_dir))
    t0 = time.monotonic()
    async with EnginePool.from_config(config) as pool:
        start_s = time.monotonic() - t0
        print(f"engine up in {start_s:.0f} s", flush=True)
        engine = pool.instances(MODEL)[0].engine
        llm = engine.llm  # type: ignore[attr-defined]
        defaults = dict(llm.model_config.get_diff_sampling_param())
        defaults.pop("max_new_tokens", None)
        params = SamplingParams.from_optional(
            **defaults, max_tokens=args.max_tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA
        )
        counter = iter(range(10**9))

        def direct(ids: list[int]) -> AsyncIterator[Any]:
            return llm.generate({"prompt_token_ids": ids}, params, f"direct-{next(counter)}")  # type: ignore[no-any-return]

        def pooled(ids: list[int]) -> AsyncIterator[Any]:
            return pool.generate(MODEL, ids, params)

        # Warm-up (CUDA graphs for every batch size, both paths), not counted.
        warm = harness.token_prompts(args.concurrency * 2, args.prompt_len, 99, harness.vocab_size(args.model_dir))
        await drive(direct, warm, args.concurrency)
        await drive(pooled, warm[: args.concurrency], args.concurrency)
        modes = args.gc_modes.split(",")
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {"direct": [], "pool": []} for m in modes}
        progress = harness.Progress(args.rounds, "pool_overhead")
        paths = {"direct": direct, "pool": pooled}
        watch = harness.GcWatch()
        last_round_s = 0.0
        for r in range(args.rounds):
            if r >= 2 * len(modes) and deadline.left() < last_round_s * 1.2 + 20:
                print(f"stopping after {r} rounds: {deadline.left():.0f} s left", flush=True)
                break
            t_round = time.monotonic()
            mode = modes[r % len(modes)]
            if mode == "freeze":
                watch.freeze()
            else:
                watch.unfreeze()
            # Alternate the order too: with two modes, every second round of a mode flips it.
            order = ["direct", "pool"] if (r // len(modes)) % 2 == 0 else ["pool", "direct"]
            for name in order:
                watch.reset()
                res = await drive(paths[name], prompts, args.concurrency)
                res["gc"] = watch.snapshot()
                runs[mode][name].append(res)
                g2 = res["gc"]["generations"]["2"]
                print(f"round {r} gc={mode:6s} {name:6s} {res['tok_s']:8.0f} tok/s  {res['wall_s']:.2f} s  "
                      f"TTFT p50 {res['ttft_p50_ms']:.0f} ms p99 {res['ttft_p99_ms']:.0f} ms  "
                      f"gen2 GCs {g2['count']:.0f} (longest {g2['max_ms']:.0f} ms)", flush=True)
            last_round_s = time.monotonic() - t_round
            progress.step(f"round {r} (gc={mode})")
        watch.unfreeze()
        signals = dict(running=engine.signals.running, kv_cache_usage=engine.signals.kv_cache_usage)
    med = {mode: {k: {m: statistics.median(x[m] for x in v) for m in ("tok_s", "wall_s", "ttft_p50_ms", "ttft_p99_ms")}
                  for k, v in per.items() if v} for mode, per in runs.items()}
    ratios = {mode: {"throughput": m["pool"]["tok_s"] / m["direct"]["tok_s"],
                     "ttft_p50": m["pool"]["ttft_p50_ms"] / m["direct"]["ttft_p50_ms"]}
              for mode, m in med.items() if "pool" in m and "direct" in m}
    return {
        "config": {**vars(args), "engine_args": eargs, "sampling_params": repr(params)},
        "machine": harness.device_info(),
        "engine_start_s": start_s,
        "runs": runs,
        "median": med,
        "ratios": ratios,
        "target": TARGET,
        "signals_at_end": signals,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| gc | path | median output tok/s | median wall s | TTFT p50 ms | TTFT p99 ms | rounds (tok/s) | gen-2 GCs per run (longest ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, med in result["median"].items():
        for name, label in (("direct", "AsyncLLM direct"), ("pool", "EnginePool.generate")):
            m = med[name]
            runs = result["runs"][mode][name]
            gcs = ", ".join(f"{x['gc']['generations']['2']['count']:.0f} ({x['gc']['generations']['2']['max_ms']:.0f})" for x in runs)
            lines.append(f"| {mode} | {label} | {m['tok_s']:.0f} | {m['wall_s']:.2f} | {m['ttft_p50_ms']:.0f} | "
                         f"{m['ttft_p99_ms']:.0f} | " + ", ".join(f"{x['tok_s']:.0f}" for x in runs) + f" | {gcs} |")
    lines.append("")
    for mode, r in result["ratios"].items():
        lines.append(f"gc={mode}: ratio pool/direct = {r['throughput']:.3f} (target >= {TARGET}: "
                     f"{'met' if r['throughput'] >= TARGET else 'missed'}); TTFT p50 ratio {r['ttft_p50']:.3f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_target_arguments(parser, shape=False)
    # Defaults by --device (None below): cpu 6 rounds of 256 requests, 64 at once, 32-token
    # prompts, 32 tokens out; gpu 4 rounds of 1,024, 128 at once, 128-token prompts, 256 out.
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop starting rounds after this (>= 2 rounds)")
    parser.add_argument("--gc-modes", default="none",
                        help="comma-separated, taken in turn per round: none (Python's default) or freeze (gc.freeze() first)")
    parser.add_argument("--out", default=None, help="result prefix (default: results/pool_overhead_<device>)")
    args = parser.parse_args()
    harness.resolve_target(args)
    harness.device_defaults(
        args,
        cpu={"rounds": 6, "requests": 256, "concurrency": 64, "prompt_len": 32, "max_tokens": 32},
        gpu={"rounds": 4, "requests": 1024, "concurrency": 128, "prompt_len": 128, "max_tokens": 256},
    )
    args.out = args.out or str(harness.BENCH / "results" / f"pool_overhead_{args.device}")
    result = anyio.run(main, args)
    md = table(result)
    print(md)
    client = {"in_process": True, "requests": args.requests, "concurrency": args.concurrency, "prompt_len": args.prompt_len}
    harness.save_results(args.out, result, md, engine_args=result["config"]["engine_args"],
                         sampling=result["config"]["sampling_params"], client=client)
