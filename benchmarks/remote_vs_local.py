"""A remote instance against the same engine local: what attaching over the network costs.

    python benchmarks/remote_vs_local.py [--device cpu|gpu] [--model-dir DIR] [--rounds 6] \
        [--requests 128] [--concurrency 16] [--prompt-len 32] [--max-tokens 64] [--out PREFIX]

Two pools in this process, each of one instance with the same engine args: one local
engine, and one remote instance whose engine core is ``vllm serve --headless`` in
another process, attached over TCP on 127.0.0.1 (what a second host would do, without
the network's latency). Rounds alternate (local, remote, remote, local, ...), each
sending the same token-id prompts with ignore_eos, so both generate the same tokens.
Reported: output tokens/s and TTFT p50 per side (medians over rounds), their ratio,
and one request's latency alone (1 token, 20 in a row): the per-request overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio

import harness
from pool_overhead import drive

MODEL = "m"

def headless_command(eargs: dict[str, Any], port: int) -> list[str]:
    """``vllm serve --headless`` with ``eargs`` as flags, attaching to 127.0.0.1:``port``."""
    from lylm.engines._core_host import headless_command, serve_flags

    return headless_command(eargs["model"], "127.0.0.1", port, serve_flags(eargs))


def own_cpu_s() -> float:
    """CPU seconds (user + system) of this process alone."""
    t = os.times()
    return t.user + t.system


async def alone(pool: Any, params: Any, times: int) -> float:
    """Median latency of one 1-token request with nothing else running, ms."""
    latencies = []
    for _ in range(times):
        began = time.perf_counter()
        async for _ in pool.generate(MODEL, [5, 6, 7, 8], params):
            pass
        latencies.append(1000 * (time.perf_counter() - began))
    return statistics.median(latencies)


async def run(args: argparse.Namespace, eargs: dict[str, Any], port: int) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from lylm import EnginePool

    local_config = {"models": {MODEL: [{"devices": harness.devices(), "engine_args": eargs}]}}
    remote_config = {"models": {MODEL: [{"engine_args": eargs,
                                         "remote": {"address": "127.0.0.1", "port": port, "timeout": 300}}]}}
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    one_token = SamplingParams(max_tokens=1, output_kind=RequestOutputKind.DELTA)
    prompts = harness.token_prompts(args.requests, args.prompt_len, 7, harness.vocab_size(args.model_dir))
    runs: dict[str, list[dict[str, Any]]] = {"local": [], "remote": []}
    # One after the other: engines sharing a GPU must not profile its memory at the same time.
    async with EnginePool.from_config(remote_config) as remote, EnginePool.from_config(local_config) as local:
        pools = {"local": local, "remote": remote}
        for name, pool in pools.items():  # warm both
            await drive(lambda ids: pool.generate(MODEL, ids, params), prompts[: args.concurrency], args.concurrency)
        latency = {name: await alone(pool, one_token, 20) for name, pool in pools.items()}
        progress = harness.Progress(args.rounds * 2, "remote_vs_local")
        for r in range(args.rounds):
            order = ["local", "remote"] if r % 2 == 0 else ["remote", "local"]
            for name in order:
                cpu = own_cpu_s()
                result = await drive(lambda ids: pools[name].generate(MODEL, ids, params), prompts, args.concurrency)
                # This process is the client and both front ends (not the engine cores, which are other
                # processes): near 100% of one core, it would be the ceiling, not the attachment.
                result["client_cpu_pct"] = 100 * (own_cpu_s() - cpu) / result["wall_s"]
                result["first"] = order[0] == name  # measured first in its round (see BENCHMARKS.md 17)
                runs[name].append(result)
                print(f"round {r} {name:6s} {result['tok_s']:8.0f} tok/s  TTFT p50 {result['ttft_p50_ms']:.1f} ms",
                      flush=True)
                progress.step(f"round {r}, {name}")
    median = {name: {k: statistics.median(x[k] for x in rs) for k in ("tok_s", "ttft_p50_ms")} for name, rs in runs.items()}
    return {
        "runs": runs,
        "median": median,
        "alone_1_token_ms": latency,
        "ratio": {"throughput": median["remote"]["tok_s"] / median["local"]["tok_s"],
                  "ttft_p50": median["remote"]["ttft_p50_ms"] / median["local"]["ttft_p50_ms"],
                  "alone": latency["remote"] / latency["local"]},
        "sampling": repr(params),
    }


def table(result: dict[str, Any]) -> str:
    m, a, ratio = result["median"], result["alone_1_token_ms"], result["ratio"]
    return "\n".join([
        "| instance | median output tok/s | TTFT p50 ms | one 1-token request alone, ms | rounds (tok/s) |",
        "|---|---|---|---|---|",
        *(f"| {name} | {m[name]['tok_s']:.0f} | {m[name]['ttft_p50_ms']:.1f} | {a[name]:.2f} | "
          + ", ".join(f"{x['tok_s']:.0f}" for x in result["runs"][name]) + " |" for name in ("local", "remote")),
        "",
        f"remote/local: throughput {ratio['throughput']:.3f}, TTFT p50 {ratio['ttft_p50']:.3f}, "
        f"one request alone {ratio['alone']:.3f}",
        "client process CPU (this process: load generator and both front ends), % of one core per round: "
        + "; ".join(f"{name} " + ", ".join(f"{x.get('client_cpu_pct', 0):.0f}" for x in result["runs"][name])
                    for name in ("local", "remote")),
    ]) + "\n"  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_target_arguments(parser, shape=True)
    parser.add_argument("--gpu-mem", type=float, default=0.4, help="gpu: gpu_memory_utilization of each engine")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default=None, help="result prefix (default: benchmarks/results/remote_vs_local_<shape>)")
    args = parser.parse_args()
    harness.resolve_target(args)
    args.out = args.out or str(harness.BENCH / "results" / f"remote_vs_local_{args.shape}")
    eargs = harness.engine_args(args.model_dir, json.loads(args.engine_args), gpu_memory_utilization=args.gpu_mem)
    port = harness.free_port()
    log = Path(args.out + "_core.log")
    with open(log, "wb") as out:  # the "other host": its own process group, killed at the end
        core = subprocess.Popen(headless_command(eargs, port), stdout=out, stderr=subprocess.STDOUT,
                                process_group=0, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
                                if harness.DEVICE == "gpu" else None)
    try:
        result = anyio.run(run, args, eargs, port)
    finally:
        os.killpg(core.pid, signal.SIGKILL)
        pass  # the core's log stays beside the results (its config, its thread binding)
    md = table(result)
    print(md)
    client = {"in_process": True, "requests": args.requests, "concurrency": args.concurrency,
              "prompt_len": args.prompt_len, "rounds": args.rounds}
    harness.save_results(args.out, result, md, engine_args=eargs, sampling=result["sampling"], client=client)


if __name__ == "__main__":  # vLLM spawns engine processes: the guard is required
    main()
