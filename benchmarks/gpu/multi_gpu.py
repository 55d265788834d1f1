"""Several GPUs of one host (issue 8): pinning, the seed's 1:2 split, scaling over GPUs.

    python benchmarks/gpu/multi_gpu.py --model-dir DIR --shape qwen2.5-1.5b \
        [--gpus N] [--split-requests 600] [--grid 64x256,128x512,256x1024] [--rounds 2] \
        [--procs 4] [--budget-s 480] [--out PREFIX]

Needs a machine with 2 or more GPUs (``nvidia-h200-x2``/``-x4``: ``device.sh multi1``)
and NVLink multicast left off (the device image sets NCCL_NVLS_ENABLE=0; this script
refuses to run a tensor-parallel instance without it). One ``switch_server.py`` over:

- 2 or 3 GPUs: model ``m`` with one instance on GPU 0 (weight 1) and one on GPU 1
  (weight 2);
- 4 or more (the seed's shape scaled down): model ``tp``, one tensor-parallel
  instance on GPUs [0, 1], and ``m`` on GPU 2 (weight 1) and GPU 3 (weight 2).

Then, in order:

1. **Pinning**: every engine's processes (``/bench/engines`` lists their pids) are
   looked up in ``nvidia-smi``'s compute processes: the GPUs holding an instance's
   memory must be exactly its ``gpu_ids``. The TP instance answers a few requests.
2. **Split**: ``weighted_random`` with weights 1:2, --split-requests streamed
   requests at concurrency 64; the per-instance counts from ``/metrics`` must be
   within 3 points of 33.3% / 66.7%.
3. **Scaling**: the same model on one GPU (balancer ``pin0``: every request to
   the first instance) against two (``weighted_random``, weights 1:1), cell by
   cell over --grid, arms alternating. Target: two/one >= 1.9x throughput.

Without GPUs (``LYLM_BENCH_CPU=1``, a CPU build of vLLM and a tiny model) the same
code runs with unpinned instances and skips the nvidia-smi check: a dry run of the
script's logic, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

import gpucommon
import loadgen
import mpload
from seed_table import metrics_monitor

SPLIT_TOLERANCE = 3.0  # percentage points
SCALING_TARGET = 1.9


def gpu_count() -> int:
    if os.environ.get("LYLM_BENCH_CPU"):
        return 2
    out = gpucommon._run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"]) or ""
    return len(out.split())


def instance(eargs: dict[str, Any], gpus: list[int], weight: float) -> dict[str, Any]:
    devices: dict[str, Any] = {"weight": weight}
    if not os.environ.get("LYLM_BENCH_CPU"):
        devices["gpu_ids"] = gpus
    return {"devices": devices, "engine_args": eargs}


def build_config(args: argparse.Namespace, gpus: int) -> tuple[dict[str, Any], int]:
    """The config, and how many instances precede model ``m``'s in pool order (0)."""
    eargs = gpucommon.engine_args(args.model_dir, json.loads(args.engine_args),
                                  gpu_memory_utilization=args.gpu_mem)
    models: dict[str, Any] = {}
    first = 0
    if gpus >= 4:
        first = 2
        tp_args = {**eargs, "tensor_parallel_size": 2}
        models["m"] = [instance(eargs, [first], 1), instance(eargs, [first + 1], 2)]
        models["tp"] = [instance(tp_args, [0, 1], 1)]
    else:
        models["m"] = [instance(eargs, [0], 1), instance(eargs, [1], 2)]
    return {"models": models}, first


def check_pinning(engines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per instance: its gpu_ids and the GPUs where its processes hold memory (nvidia-smi)."""
    index_of = {}
    smi = gpucommon._run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"]) or ""
    for line in smi.splitlines():
        idx, uuid = (p.strip() for p in line.split(","))
        index_of[uuid] = int(idx)
    apps = gpucommon.gpu_processes()
    rows = []
    for e in engines:
        pids = {str(p) for p in e.get("pids", [])}
        held = sorted({index_of.get(a["gpu_uuid"], -1) for a in apps if a["pid"] in pids})
        memory = [f"{a['pid']}: {a['used_memory']} on GPU {index_of.get(a['gpu_uuid'])}" for a in apps if a["pid"] in pids]
        rows.append({"model": e["model"], "index": e["index"], "gpu_ids": e["gpu_ids"], "held_on": held,
                     "memory": memory, "ok": held == sorted(e["gpu_ids"])})
    return rows


def weights_for(n_instances: int, first: int, w0: float, w1: float) -> list[float]:
    weights = [1.0] * n_instances
    weights[first], weights[first + 1] = w0, w1
    return weights


async def measure(args: argparse.Namespace, url: str, vocab: int, first: int, n_instances: int,
                  has_tp: bool, deadline: gpucommon.Deadline) -> dict[str, Any]:
    out: dict[str, Any] = {}
    monitor = metrics_monitor(url)
    m0, m1 = str(first), str(first + 1)  # engine labels of model m's instances in /metrics
    with mpload.MultiClient(args.procs) as mc:
        if has_tp:
            prompts = gpucommon.token_prompts(8, args.prompt_len, 7, vocab)
            cell = await mc.run(url, "completions", [mpload.body("tp", "completions", p, 32) for p in prompts], 8)
            out["tp_smoke"] = cell.summary()
        # Warm both instances of m.
        gpucommon.set_policy(url, "weighted_random", weights_for(n_instances, first, 1, 1))
        warm = gpucommon.token_prompts(64, args.prompt_len, 4242, vocab)
        await mc.run(url, "completions", [mpload.body("m", "completions", p, 32) for p in warm], 32)

        # 2. The 1:2 split.
        gpucommon.set_policy(url, "weighted_random", weights_for(n_instances, first, 1, 2), seed=1)
        prompts = gpucommon.token_prompts(args.split_requests, args.prompt_len, 600, vocab)
        payloads = [mpload.body("m", "completions", p, args.split_tokens) for p in prompts]
        async with monitor(64, len(payloads)) as extra:
            cell = await mc.run(url, "completions", payloads, 64)
        served = extra["requests_per_engine"]
        a, b = served.get(m0, 0), served.get(m1, 0)
        share = 100 * a / max(a + b, 1)
        out["split"] = {"served": {m0: a, m1: b}, "share_first_pct": share, "success": cell.summary()["success_rate"],
                        "ok": abs(share - 100 / 3) <= SPLIT_TOLERANCE and a + b == len(payloads)}
        print(f"split: {a} / {b} = {share:.1f}% / {100 - share:.1f}% (target 33.3 +- {SPLIT_TOLERANCE})", flush=True)

        # 3. Scaling: one GPU (pin0 sends all to m's first instance) vs two.
        arms = {"one": ("pin0", weights_for(n_instances, first, 1, 1)),
                "two": ("weighted_random", weights_for(n_instances, first, 1, 1))}
        grid = loadgen.parse_grid(args.grid)
        samples: dict[int, dict[str, list[dict[str, Any]]]] = {c: {arm: [] for arm in arms} for c, _ in grid}
        for r in range(args.rounds):
            if r and deadline.left() < 90:
                print(f"stopping after {r} rounds ({deadline.left():.0f} s left)", flush=True)
                break
            for ci, (conc, total) in enumerate(grid):
                prompts = gpucommon.token_prompts(total, args.prompt_len, 3000 * conc + r, vocab)
                payloads = [mpload.body("m", "completions", p, args.max_tokens) for p in prompts]
                for arm in (list(arms) if (r + ci) % 2 == 0 else list(arms)[::-1]):
                    gpucommon.set_policy(url, *arms[arm], seed=r, reset_prefix_cache=True)
                    s = (await mc.run(url, "completions", payloads, conc)).summary()
                    samples[conc][arm].append(s)
                    print(f"r{r} c={conc:<3} {arm}: {s['system_tokens_per_s'] or 0:8.0f} tok/s "
                          f"TTFT p50 {s['ttft_p50_ms'] or 0:7.1f} ms", flush=True)
        rows = []
        for conc, per in samples.items():
            row: dict[str, Any] = {"concurrency": conc}
            for arm, ss in per.items():
                row[f"{arm}_tok_s"] = gpucommon.median([s["system_tokens_per_s"] for s in ss])
                row[f"{arm}_ttft_p50_ms"] = gpucommon.median([s["ttft_p50_ms"] for s in ss])
                row[f"{arm}_success"] = min((s["success_rate"] for s in ss), default=None)
            row["ratio"] = gpucommon.ratio(row["two_tok_s"], row["one_tok_s"])
            rows.append(row)
        out["scaling"] = rows
    return out


def table(result: dict[str, Any]) -> str:
    f = gpucommon.fmt
    lines = ["| instance | gpu_ids | GPUs holding its memory (nvidia-smi) | pinned |", "|---|---|---|---|"]
    for p in result.get("pinning", []):
        lines.append(f"| {p['model']}[{p['index']}] | {p['gpu_ids']} | {p['held_on']} | {'yes' if p['ok'] else 'NO'} |")
    split = result["measure"]["split"]
    lines += ["", f"1:2 split over {sum(split['served'].values())} requests: {split['served']} = "
                  f"{split['share_first_pct']:.1f}% / {100 - split['share_first_pct']:.1f}% "
                  f"(target 33.3 +- {SPLIT_TOLERANCE}: {'met' if split['ok'] else 'missed'})", "",
              "| concurrency | one GPU tok/s | two GPUs tok/s | two/one (target >= 1.9) | TTFT p50 one / two ms |",
              "|---|---|---|---|---|"]
    for r in result["measure"]["scaling"]:
        lines.append(f"| {r['concurrency']} | {f(r['one_tok_s'])} | {f(r['two_tok_s'])} | {f(r['ratio'], '.3f')} | "
                     f"{f(r['one_ttft_p50_ms'], '.1f')} / {f(r['two_ttft_p50_ms'], '.1f')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--shape", required=True)
    parser.add_argument("--engine-args", default="{}", help="JSON merged over the shared engine args")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all nvidia-smi lists)")
    parser.add_argument("--gpu-mem", type=float, default=0.85)
    parser.add_argument("--split-requests", type=int, default=600)
    parser.add_argument("--split-tokens", type=int, default=64)
    parser.add_argument("--grid", default="64x256,128x512,256x1024")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--out", default="multi_gpu")
    parser.add_argument("--log-dir", default=None)
    args = parser.parse_args()

    gpus = args.gpus or gpu_count()
    if gpus < 2:
        raise SystemExit(f"needs 2 or more GPUs; found {gpus}")
    if gpus >= 4 and os.environ.get("NCCL_NVLS_ENABLE") != "0":
        raise SystemExit("set NCCL_NVLS_ENABLE=0 (NVLink multicast must stay off) before a tensor-parallel run")
    deadline = gpucommon.Deadline(args.budget_s)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="multi-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    config, first = build_config(args, gpus)
    path = log_dir / "lylm-multi.json"
    path.write_text(json.dumps(config, indent=1) + "\n")
    n_instances = sum(len(v) for v in config["models"].values())
    port = gpucommon.free_port()
    command = gpucommon.switch_server_command(path, port)
    result: dict[str, Any] = {"config": {**vars(args), "gpus": gpus, "lylm_config": config, "command": " ".join(command)},
                              "machine": gpucommon.device_info()}
    t0 = time.monotonic()
    with gpucommon.server("switch", command, log_dir, port, timeout_s=600) as url:
        result["start_s"] = time.monotonic() - t0
        engines = gpucommon.bench_engines(url)
        if not os.environ.get("LYLM_BENCH_CPU"):
            result["pinning"] = check_pinning(engines)
            for p in result["pinning"]:
                print(f"pinning {p['model']}[{p['index']}]: gpu_ids {p['gpu_ids']} memory on {p['held_on']} "
                      f"{'ok' if p['ok'] else 'WRONG'} {p['memory']}", flush=True)
        result["measure"] = anyio.run(measure, args, url, gpucommon.vocab_size(args.model_dir), first, n_instances,
                                      "tp" in config["models"], deadline)
    md = f"{args.shape} on {gpus} GPUs\n\n" + table(result)
    print(md, flush=True)
    gpucommon.save_results(args.out, result, md, log_dir)


if __name__ == "__main__":  # vLLM spawns engine processes: the guard is required
    main()
