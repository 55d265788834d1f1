"""Resident memory of a pool of engines, per process, idle and after load.

    python benchmarks/engine_memory.py [--device cpu|gpu] [--model-dir DIR] [--shape NAME] \
        [--engine-args JSON] [--gpu-mem 0.4] [--engines 2] [--requests 200] [--concurrency 32] \
        [--max-tokens 32] [--out benchmarks/results/engine_memory_cpu]

A pool of ``--engines`` instances of the target's model in this process: ``--device cpu``
(the default without a GPU) the tiny model on the CPU build with the tests' engine args
(random weights: this measures what an engine costs by itself, torch, vLLM and its KV
cache, not a real model's weights); ``--device gpu --model-dir DIR`` the model on GPU 0,
every engine sharing it with ``gpu_memory_utilization`` = ``--gpu-mem`` / ``--engines``.

Measured twice, idle and after ``--requests`` streamed requests (``--concurrency`` at once,
``--max-tokens`` each, ignore_eos): the RSS of each process (the pool's own, each engine
core and its worker) and their total, and on a GPU each process's GPU memory as
``nvidia-smi`` lists it. Prints the tables and writes OUT.json (the harness's provenance
block first) and OUT.md. Default OUT: ``results/engine_memory_<device>[_<shape>]``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import anyio
import psutil

import harness
from lylm import EnginePool

MODEL = "m"


def rss_snapshot(label: str) -> dict[str, Any]:
    """Every process of this tree (multiprocessing's resource tracker left out): pid, name, RSS."""
    me = psutil.Process()
    processes = []
    for p in [me, *me.children(recursive=True)]:
        try:
            rss = p.memory_info().rss
            cmdline = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "resource_tracker" in cmdline:  # multiprocessing's helper, not an engine's
            continue
        name = "pool process" if p.pid == me.pid else cmdline.strip()[:40]
        processes.append({"pid": p.pid, "name": name, "rss_mib": round(rss / 2**20, 1)})
    snap = {
        "label": label,
        "processes": processes,
        "total_rss_mib": round(sum(p["rss_mib"] for p in processes), 1),
        "gpu_processes": harness.gpu_processes() if harness.DEVICE == "gpu" else [],
    }
    print(f"-- {label}")
    for p in processes:
        print(f"{p['rss_mib']:8.0f} MiB  pid {p['pid']:<7} {p['name']}")
    print(f"{snap['total_rss_mib']:8.0f} MiB  total", flush=True)
    for g in snap["gpu_processes"]:
        print(f"GPU: pid {g['pid']:<7} {g['used_memory']}  {g['name']}", flush=True)
    return snap


def table(snapshots: list[dict[str, Any]]) -> str:
    lines = []
    for snap in snapshots:
        lines += [f"### {snap['label']}", "", "| process | pid | RSS MiB |", "|---|---|---|"]
        lines += [f"| {p['name']} | {p['pid']} | {p['rss_mib']:.0f} |" for p in snap["processes"]]
        lines.append(f"| total | | {snap['total_rss_mib']:.0f} |")
        if snap["gpu_processes"]:
            lines += ["", "| GPU process | pid | GPU memory |", "|---|---|---|"]
            lines += [f"| {g['name']} | {g['pid']} | {g['used_memory']} |" for g in snap["gpu_processes"]]
        lines.append("")
    return "\n".join(lines)


async def measure(args: argparse.Namespace, eargs: dict[str, Any]) -> list[dict[str, Any]]:
    from vllm import SamplingParams

    instance = {"devices": harness.devices(), "engine_args": eargs}
    progress = harness.Progress(2, "engine_memory")
    snapshots = []
    async with EnginePool.from_config({"models": {MODEL: [instance] * args.engines}}) as pool:
        snapshots.append(rss_snapshot(f"{args.engines} engines, idle"))
        progress.step("idle")
        limit = anyio.Semaphore(args.concurrency)
        params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)

        async def one(i: int) -> None:
            async with limit:
                async for _ in pool.generate(MODEL, f"request {i}", params):
                    pass

        async with anyio.create_task_group() as tg:
            for i in range(args.requests):
                tg.start_soon(one, i)
        snapshots.append(rss_snapshot(f"{args.engines} engines, after {args.requests} requests"))
        progress.step("after load")
    return snapshots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_target_arguments(parser)
    parser.add_argument("--gpu-mem", type=float, default=0.4,
                        help="gpu: the GPU memory share of all engines together (each gets --gpu-mem / --engines)")
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default=None, help="result prefix (default: results/engine_memory_<device>[_<shape>])")
    args = parser.parse_args()
    harness.resolve_target(args)
    name = "engine_memory_cpu" if args.device == "cpu" else f"engine_memory_gpu_{args.shape}"
    args.out = args.out or str(harness.BENCH / "results" / name)
    eargs = harness.engine_args(args.model_dir, json.loads(args.engine_args),
                                gpu_memory_utilization=round(args.gpu_mem / args.engines, 3))
    snapshots = anyio.run(measure, args, eargs)
    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": harness.device_info(),
        "snapshots": snapshots,
    }
    sampling = {"prompt": "request {i}", "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True}
    client = {"kind": "in-process pool.generate", "requests": args.requests, "concurrency": args.concurrency}
    harness.save_results(args.out, result, table(snapshots), engine_args=eargs, sampling=sampling, client=client)


if __name__ == "__main__":  # vLLM spawns engine processes: the guard is required
    main()
