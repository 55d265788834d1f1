"""Scaling over the GPUs of one host (issues 8 and 12): one model, 1 / 2 / 4 / 8 instances.

    python benchmarks/multi_gpu.py [--device cpu|gpu] [--model-dir DIR] [--shape qwen2.5-1.5b] \
        [--gpus N] [--gpu-mem 0.85] [--per-gpu 64,256] [--requests-per-stream 4] [--rounds 2] \
        [--prompt-len 128] [--max-tokens 256] [--procs 8] [--budget-s 480] [--out PREFIX] [--log-dir DIR]

A CPU dry run (``--device cpu``: two unpinned CPU engines of the tiny model) wants small
cells, e.g. ``--per-gpu 4 --requests-per-stream 2 --rounds 1 --prompt-len 32
--max-tokens 16 --procs 1``.

Needs 2 or more GPUs (``nvidia-h200-x2``/``-x4``: ``device.sh multi1``). One
``switch_server.py`` over model ``m`` with one instance on each GPU (weights 1),
all started at once (disjoint GPUs start side by side). Then:

1. **Pinning**: each instance's processes hold memory on its own GPU only
   (``nvidia-smi``'s compute processes against ``/bench/engines``' pids).
2. **Scaling**: arms ``first1``, ``first2``, ``first4``, ... (as many as there are
   GPUs): requests go to the first k instances (least outstanding among them), so
   k GPUs serve. Per arm and per-GPU concurrency c (--per-gpu), the load is c x k
   streams, --requests-per-stream x c x k requests of --prompt-len token ids and
   --max-tokens output tokens (``ignore_eos``), arms alternating within each round.
   Reported: tok/s, TTFT and ITL p50/p99, the client's busiest process's CPU share
   (the client must not be the ceiling) and the server process's CPU (cores), which
   is where one front-end process shows as the ceiling. Target: k GPUs >= 0.95 x k
   times one GPU's tok/s.

The 1:2 split and the seed's shape are ``placement.py``'s (``device.sh place``).
With ``--device cpu`` (vLLM's CPU build, the tiny model) the same code runs with
--gpus (default 2) unpinned instances and skips the nvidia-smi check: a dry run of the
script's logic, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import anyio

import harness
import mpload

SPLIT_TOLERANCE = 3.0  # percentage points (placement.py's split)
SCALING_TARGET = 0.95  # k GPUs' tok/s over k x one GPU's


def gpu_count() -> int:
    """The GPUs nvidia-smi lists (``--device cpu``: 2, for a dry run with two unpinned engines)."""
    if harness.DEVICE == "cpu":
        return 2
    out = harness._run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"]) or ""
    return len(out.split())


def build_config(args: argparse.Namespace, gpus: int) -> dict[str, Any]:
    """Model ``m``, one instance per GPU (unpinned in a CPU dry run)."""
    eargs = harness.engine_args(args.model_dir, json.loads(args.engine_args),
                                  gpu_memory_utilization=args.gpu_mem)
    instances = [{"devices": harness.devices(1, gpu=gpu), "engine_args": eargs} for gpu in range(gpus)]
    return {"models": {"m": instances}}


def check_pinning(engines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per instance: its gpu_ids and the GPUs where its processes hold memory (nvidia-smi)."""
    index_of = {}
    smi = harness._run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"]) or ""
    for line in smi.splitlines():
        idx, uuid = (p.strip() for p in line.split(","))
        index_of[uuid] = int(idx)
    apps = harness.gpu_processes()
    rows = []
    for e in engines:
        pids = {str(p) for p in e.get("pids", [])}
        held = sorted({index_of.get(a["gpu_uuid"], -1) for a in apps if a["pid"] in pids})
        memory = [f"{a['pid']}: {a['used_memory']} on GPU {index_of.get(a['gpu_uuid'])}" for a in apps if a["pid"] in pids]
        rows.append({"model": e["model"], "index": e["index"], "gpu_ids": e["gpu_ids"], "held_on": held,
                     "memory": memory, "ok": held == sorted(e["gpu_ids"])})
    return rows


def arms_for(gpus: int) -> list[int]:
    return [k for k in (1, 2, 4, 8) if k <= gpus]


async def measure(args: argparse.Namespace, url: str, vocab: int, gpus: int, server_pid: int,
                  deadline: harness.Deadline) -> list[dict[str, Any]]:
    import psutil

    server = psutil.Process(server_pid)
    arms = arms_for(gpus)
    per_gpu = [int(c) for c in args.per_gpu.split(",")]
    samples: dict[tuple[int, int], list[dict[str, Any]]] = {(c, k): [] for c in per_gpu for k in arms}
    progress = harness.Progress(args.rounds * len(per_gpu) * len(arms), "multi_gpu")
    with mpload.MultiClient(args.procs) as mc:
        harness.set_policy(url, f"first{gpus}")
        warm = harness.token_prompts(64 * gpus, args.prompt_len, 4242, vocab)
        await mc.run(url, "completions", [mpload.body("m", "completions", p, 32) for p in warm], 32 * gpus)
        for r in range(args.rounds):
            if r and deadline.left() < 90:
                print(f"stopping after {r} rounds ({deadline.left():.0f} s left)", flush=True)
                break
            for ci, c in enumerate(per_gpu):
                for k in (arms if (r + ci) % 2 == 0 else arms[::-1]):
                    total = args.requests_per_stream * c * k
                    prompts = harness.token_prompts(total, args.prompt_len, 1000 * c + 10 * k + r, vocab)
                    payloads = [mpload.body("m", "completions", p, args.max_tokens) for p in prompts]
                    harness.set_policy(url, f"first{k}", seed=r, reset_prefix_cache=True)
                    cpu0, t0 = server.cpu_times(), time.monotonic()
                    s = (await mc.run(url, "completions", payloads, c * k)).summary()
                    cpu1, t1 = server.cpu_times(), time.monotonic()
                    s["server_cores"] = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / max(t1 - t0, 1e-9)
                    samples[(c, k)].append(s)
                    print(f"r{r} c={c}/GPU k={k}: {s['system_tokens_per_s'] or 0:9.0f} tok/s TTFT p50 "
                          f"{s['ttft_p50_ms'] or 0:7.1f} ms, server {s['server_cores']:.2f} cores, client max "
                          f"{s.get('client_cpu_share_max') or 0:.2f}", flush=True)
                    progress.step(f"round {r}, {c} per GPU, {k} GPU{'s' if k > 1 else ''}")
    med = harness.median
    rows = []
    for (c, k), ss in samples.items():
        if not ss:
            continue
        rows.append({
            "per_gpu": c, "gpus": k, "streams": c * k, "rounds": len(ss),
            "tok_s": med([x["system_tokens_per_s"] for x in ss]),
            **{key: med([x[key] for x in ss]) for key in
               ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "server_cores", "client_cpu_share_max")},
            "success": min(x["success_rate"] for x in ss),
        })
    for row in rows:
        base = next((b["tok_s"] for b in rows if b["per_gpu"] == row["per_gpu"] and b["gpus"] == 1), None)
        row["vs_one_gpu"] = harness.ratio(row["tok_s"], base)
        row["efficiency"] = harness.ratio(row["vs_one_gpu"], row["gpus"])
    return rows


def table(result: dict[str, Any]) -> str:
    f = harness.fmt
    lines = []
    if result.get("pinning"):  # not on the CPU build: no nvidia-smi
        lines += ["| instance | gpu_ids | GPUs holding its memory (nvidia-smi) | pinned |", "|---|---|---|---|"]
        for p in result["pinning"]:
            lines.append(f"| {p['model']}[{p['index']}] | {p['gpu_ids']} | {p['held_on']} | {'yes' if p['ok'] else 'NO'} |")
        lines.append("")
    lines += [f"Start of {result['gpus']} instances on {result['gpus']} GPUs: {result['start_s']:.1f} s", "",
              f"| c per GPU | GPUs | tok/s | vs one GPU | per GPU (target >= {SCALING_TARGET}) | TTFT p50 / p99 ms | "
              "ITL p50 / p99 ms | server cores | client max CPU share |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["scaling"]:
        lines.append(
            f"| {r['per_gpu']} | {r['gpus']} | {f(r['tok_s'])} | {f(r['vs_one_gpu'], '.2f')}x | {f(r['efficiency'], '.2f')} | "
            f"{f(r['ttft_p50_ms'], '.0f')} / {f(r['ttft_p99_ms'], '.0f')} | {f(r['itl_p50_ms'], '.1f')} / "
            f"{f(r['itl_p99_ms'], '.1f')} | {f(r['server_cores'], '.2f')} | {f(r['client_cpu_share_max'], '.2f')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_target_arguments(parser)
    harness.add_run_arguments(parser, gpu_mem=0.85, procs=8)
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs to use (default: all nvidia-smi lists; cpu: 2 unpinned engines)")
    parser.add_argument("--per-gpu", default="64,256", help="concurrent streams per serving GPU, comma-separated")
    parser.add_argument("--requests-per-stream", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    deadline, log_dir = harness.start_run(args, "multi_gpu")

    gpus = args.gpus or gpu_count()
    if gpus < 2:
        raise SystemExit(f"needs 2 or more GPUs; found {gpus}")
    config = build_config(args, gpus)
    path = log_dir / "lylm-multi.json"
    path.write_text(json.dumps(config, indent=1) + "\n")
    port = harness.free_port()
    command = harness.switch_server_command(path, port)
    result: dict[str, Any] = {"gpus": gpus, "config": {**vars(args), "lylm_config": config, "command": " ".join(command)},
                              "machine": harness.device_info()}
    t0 = time.monotonic()
    with harness.server("switch", command, log_dir, port, timeout_s=600) as url:
        result["start_s"] = time.monotonic() - t0
        engines = harness.bench_engines(url)
        if harness.DEVICE == "gpu":
            result["pinning"] = check_pinning(engines)
            for p in result["pinning"]:
                print(f"pinning {p['model']}[{p['index']}]: gpu_ids {p['gpu_ids']} memory on {p['held_on']} "
                      f"{'ok' if p['ok'] else 'WRONG'} {p['memory']}", flush=True)
        pid = harness.bench_server_pid(url)
        result["scaling"] = anyio.run(measure, args, url, harness.vocab_size(args.model_dir), gpus, pid, deadline)
    where = f"{gpus} GPUs" if harness.DEVICE == "gpu" else f"{gpus} unpinned CPU engines (dry run)"
    md = f"{args.shape}, one instance per GPU, {where}\n\n" + table(result)
    print(md, flush=True)
    sampling = {"api": "completions", "prompt": f"{args.prompt_len} random token ids", "max_tokens": args.max_tokens,
                "ignore_eos": True, "stream": True, "other": "the model's generation config (lylm's default)"}
    client = {"kind": "mpload.MultiClient", "processes": args.procs, "per_gpu_concurrency": args.per_gpu,
              "requests_per_stream": args.requests_per_stream, "rounds": args.rounds,
              "arms": [f"first{k}" for k in arms_for(gpus)],
              "between_runs": "prefix caches reset, balancer firstK (switch_server /bench/policy)"}
    harness.save_results(args.out, result, md, log_dir,
                         engine_args=[i["engine_args"] for i in config["models"]["m"]], sampling=sampling, client=client)


if __name__ == "__main__":  # vLLM spawns engine processes: the guard is required
    main()
