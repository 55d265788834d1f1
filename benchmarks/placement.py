"""Placement on a real GPU host (issue 12): pinning at spawn, start times, the 1:2 split.

    python benchmarks/placement.py [--device cpu|gpu] [--model-dir DIR] [--shape qwen2.5-1.5b] \
        [--gpus N] [--gpu-mem 0.85] [--split-requests 600] [--split-tokens 32] [--prompt-len 128] \
        [--procs 4] [--quick] [--out PREFIX] [--log-dir DIR]

A CPU dry run (``--device cpu``) wants a short split, e.g. ``--split-requests 60
--split-tokens 8 --prompt-len 32 --procs 1``.

Runs on any number of GPUs (``device.sh place``), with vLLM's compile cache warm
for every timed start:

1. **Warm-up**: ``switch_server.py`` with one instance on GPU 0; this first start
   fills vLLM's torch.compile cache (cold).
2. **The placement config**, started with the cache warm; its start time against
   one instance's, started once more at the end. By GPU count:
   - 1 GPU: model ``m`` with two instances on GPU 0 (weights 1:2, 0.4 of its
     memory each): they share a GPU, so they must start one after another;
   - 2-3 GPUs: ``m`` on GPU 0 (weight 1) and GPU 1 (weight 2), and model ``s`` on
     GPU 1 beside it (0.4 each on GPU 1);
   - 4 or more (the seed's shape): ``m`` as a TP=2 instance on [0, 1] (weight 1)
     and one on [2] (weight 2); models ``a`` and ``b`` sharing GPU 3 at 0.4 each.
     Needs NCCL_NVLS_ENABLE=0.
3. **Pinning**: for every instance, the GPUs where nvidia-smi shows its processes'
   memory must be exactly its ``gpu_ids``; each of its processes (engine core and
   workers) must carry the device variable naming those GPUs, and the server's own
   environment must not.
4. **Split**: ``weighted_random`` over ``m``'s two instances, weights 1:2,
   --split-requests streamed requests at concurrency 64; counts from ``/metrics``.
5. **A GPU that does not exist**: a pool naming GPU N on an N-GPU machine must
   fail with a ConfigError naming the key, and leave no engine process.

With ``--device cpu`` (vLLM's CPU build, the tiny model) the device is the CPU build's
one "device", memory node 0 (--gpus is 1: vLLM's CPU platform counts one): the 1-GPU
config runs with ``gpu_ids [0]``, which lylm turns into ``CPU_VISIBLE_MEMORY_NODES=0``
for each engine; the nvidia-smi check is skipped (its column reads "-"), the device
variable in each engine process is checked as on a GPU where /proc shows it (where vLLM
renamed its processes it reads "unreadable", as on the GPU image), and "GPU 1" is the
one that does not exist. A dry run of the script's logic: the start times are not a GPU's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

import harness
import mpload
from multi_gpu import SPLIT_TOLERANCE, check_pinning, gpu_count
from seed_table import metrics_monitor

START_TARGET = 1.3  # N instances on N disjoint GPUs vs one, warm cache


OVERRIDES: dict[str, Any] = {}  # --engine-args, over everything (a CPU dry run sizes its KV cache here)


#: The device-control variable lylm sets per engine: vLLM's platform's ``device_control_env_var``.
DEVICE_VARIABLE = {"gpu": "CUDA_VISIBLE_DEVICES", "cpu": "CPU_VISIBLE_MEMORY_NODES"}


def inst(eargs: dict[str, Any], gpus: list[int], weight: float = 1.0, **more: Any) -> dict[str, Any]:
    if harness.DEVICE == "cpu":  # the CPU build sizes its KV cache by kv_cache_memory_bytes
        more.pop("gpu_memory_utilization", None)
    return {"devices": {"gpu_ids": gpus, "weight": weight}, "engine_args": {**eargs, **more, **OVERRIDES}}


def placement_gpus(args: argparse.Namespace) -> int:
    """--gpus, else the GPUs nvidia-smi lists; on the CPU build its one device (memory node 0)."""
    if args.gpus:
        return int(args.gpus)
    return 1 if harness.DEVICE == "cpu" else gpu_count()


def engine_args_of(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every instance's engine args by its name (``m[0]``, ``m[1]``, ...)."""
    return {f"{model}[{i}]": spec["engine_args"] for model, group in config["models"].items()
            for i, spec in enumerate(group)}


def unchecked_pinning(engines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """check_pinning's rows without nvidia-smi (the CPU build): nothing to read, nothing judged."""
    return [{"model": e["model"], "index": e["index"], "gpu_ids": e["gpu_ids"], "held_on": None, "memory": [],
             "ok": None} for e in engines]


def placement_config(eargs: dict[str, Any], gpus: int) -> tuple[dict[str, Any], list[float]]:
    """The config, and the weights of every instance in pool order (m's first two are 1:2)."""
    if gpus >= 4:
        models = {
            "m": [inst(eargs, [0, 1], 1, tensor_parallel_size=2), inst(eargs, [2], 2)],
            "a": [inst(eargs, [3], 1, gpu_memory_utilization=0.4)],
            "b": [inst(eargs, [3], 1, gpu_memory_utilization=0.4)],
        }
    elif gpus >= 2:
        models = {
            "m": [inst(eargs, [0], 1), inst(eargs, [1], 2, gpu_memory_utilization=0.4)],
            "s": [inst(eargs, [1], 1, gpu_memory_utilization=0.4)],
        }
    else:
        models = {"m": [inst(eargs, [0], 1, gpu_memory_utilization=0.4), inst(eargs, [0], 2, gpu_memory_utilization=0.4)]}
    weights = [i["devices"]["weight"] for group in models.values() for i in group]
    return {"models": models}, weights


def start_server(name: str, config: dict[str, Any], log_dir: Path) -> tuple[Any, float, str]:
    path = log_dir / f"{name}.json"
    path.write_text(json.dumps(config, indent=1) + "\n")
    port = harness.free_port()
    command = harness.switch_server_command(path, port)
    t0 = time.monotonic()
    ctx = harness.server(name, command, log_dir, port, timeout_s=600)
    url = ctx.__enter__()
    return ctx, time.monotonic() - t0, url


def ready_lines(log_dir: Path, name: str) -> list[str]:
    """The pool's own start log ("engine ready in ...", "N engines ready in ...")."""
    text = (log_dir / f"{name}.log").read_text(errors="replace")
    return [line.strip()[:300] for line in text.splitlines() if "lylm INFO" in line][-20:]


def check_environment(engines: list[dict[str, Any]], server_env: dict[str, str | None]) -> list[dict[str, Any]]:
    """Each instance's processes carry the device variable for its GPUs; the server's is as launched."""
    launched = os.environ.get(DEVICE_VARIABLE[harness.DEVICE])  # inherited by the server from this process
    visible = launched.split(",") if launched else None
    rows = []
    for e in engines:
        want = ",".join(visible[g] if visible else str(g) for g in e["gpu_ids"])
        seen = e.get("device_env", {})
        unreadable = any(v == "unreadable" for v in seen.values())  # see switch_server._device_env
        rows.append({"instance": f"{e['model']}[{e['index']}]", "want": want, "seen": seen,
                     "ok": None if unreadable else bool(seen) and all(v == want for v in seen.values())})
    rows.append({"instance": "server", "want": launched, "seen": server_env,
                 "ok": all(v == launched for v in server_env.values())})
    return rows


async def split(url: str, args: argparse.Namespace, weights: list[float], vocab: int) -> dict[str, Any]:
    monitor = metrics_monitor(url)
    with mpload.MultiClient(args.procs) as mc:
        harness.set_policy(url, "weighted_random", weights, seed=1)
        warm = harness.token_prompts(64, args.prompt_len, 4242, vocab)
        await mc.run(url, "completions", [mpload.body("m", "completions", p, 16) for p in warm], 32)
        prompts = harness.token_prompts(args.split_requests, args.prompt_len, 600, vocab)
        payloads = [mpload.body("m", "completions", p, args.split_tokens) for p in prompts]
        async with monitor(64, len(payloads)) as extra:
            cell = await mc.run(url, "completions", payloads, 64)
        served = extra["requests_per_engine"]  # during the cell, by engine label; only m had traffic
    a, b = served.get("0", 0), served.get("1", 0)
    share = 100 * a / max(a + b, 1)
    ok = abs(share - 100 / 3) <= SPLIT_TOLERANCE and a + b == len(payloads)
    print(f"split: {a} / {b} = {share:.1f}% / {100 - share:.1f}% (target 33.3 +- {SPLIT_TOLERANCE})", flush=True)
    return {"served": [a, b], "share_first_pct": share, "ok": ok, "client": cell.summary()}


def missing_gpu(args: argparse.Namespace, gpus: int, log_dir: Path) -> dict[str, Any]:
    """A pool naming GPU ``gpus`` (one past the last): the error, its time, leftovers."""
    config = {"models": {"x": [inst(harness.engine_args(args.model_dir), [gpus])]}}
    code = (
        "import json, sys, time, anyio, multiprocessing\n"
        "from lylm import EnginePool, LylmError\n"
        "async def main():\n"
        "    t = time.monotonic()\n"
        "    try:\n"
        f"        async with EnginePool.from_config(json.loads({json.dumps(json.dumps(config))})):\n"
        "            print(json.dumps({'error': None}))\n"
        "    except LylmError as e:\n"
        "        print(json.dumps({'error': f'{type(e).__name__}: {e}', 'seconds': time.monotonic() - t,\n"
        "                          'children_left': len(multiprocessing.active_children())}))\n"
        "if __name__ == '__main__':\n"
        "    anyio.run(main)\n"
    )
    script = log_dir / "missing_gpu.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=harness.ROOT)
    (log_dir / "missing_gpu.log").write_text(out.stdout + out.stderr)
    last = [line for line in out.stdout.splitlines() if line.startswith("{")]
    result = json.loads(last[-1]) if last else {"error": None, "stderr_tail": out.stderr[-2000:]}
    print(f"missing GPU: {result}", flush=True)
    return result


def table(r: dict[str, Any]) -> str:
    f = harness.fmt
    lines = [
        f"Start times (server launch to healthy, vLLM compile cache warm; cold first start {r['start']['cold_s']:.1f} s):",
        "",
        "| config | instances | start s | vs one instance |",
        "|---|---|---|---|",
        f"| one instance on GPU 0 | 1 | {r['start']['one_s']:.1f} | 1.00x |",
        f"| placement ({r['gpus']} GPU{'s' if r['gpus'] > 1 else ''}) | {r['start']['instances']} | "
        f"{r['start']['placement_s']:.1f} | {r['start']['ratio']:.2f}x |",
        "",
        "| instance | gpu_ids | GPUs holding its memory (nvidia-smi) | device variable in its processes | pinned |",
        "|---|---|---|---|---|",
    ]
    env = {row["instance"]: row for row in r["environment"]}
    for p in r["pinning"]:
        name = f"{p['model']}[{p['index']}]"
        seen = sorted(set(env.get(name, {}).get("seen", {}).values()))
        env_ok = env.get(name, {}).get("ok")
        ok = p["ok"] is not False and env_ok is not False
        held = "-" if p["held_on"] is None else p["held_on"]
        lines.append(f"| {name} | {p['gpu_ids']} | {held} | {seen} | {'yes' if ok else 'NO'} |")
    server = env["server"]
    lines.append(f"| (server process) | - | - | {server['seen']} | {'unchanged' if server['ok'] else 'CHANGED'} |")
    s = r["split"]
    lines += ["", f"1:2 split over {sum(s['served'])} requests: {s['served'][0]} / {s['served'][1]} = "
              f"{s['share_first_pct']:.1f}% / {100 - s['share_first_pct']:.1f}% "
              f"(target 33.3 +- {SPLIT_TOLERANCE}: {'met' if s['ok'] else 'missed'}); client "
              f"{f(s['client'].get('system_tokens_per_s'))} tok/s",
              "", f"GPU {r['gpus']} (does not exist): {r['missing_gpu'].get('error')} "
              f"after {f(r['missing_gpu'].get('seconds'), '.1f')} s, "
              f"{r['missing_gpu'].get('children_left')} child processes left"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_target_arguments(parser)
    harness.add_run_arguments(parser, gpu_mem=0.85, procs=4)
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs to use (default: all nvidia-smi lists; cpu: 1, the CPU build's one device)")
    parser.add_argument("--split-requests", type=int, default=600)
    parser.add_argument("--split-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--quick", action="store_true",
                        help="only the cold start, the placement config, pinning and the split (short device time)")
    args = parser.parse_args()
    _, log_dir = harness.start_run(args, "placement")

    gpus = placement_gpus(args)
    if gpus >= 4 and os.environ.get("NCCL_NVLS_ENABLE") != "0":
        raise SystemExit("set NCCL_NVLS_ENABLE=0 (NVLink multicast must stay off) before a tensor-parallel run")
    eargs = harness.engine_args(args.model_dir, gpu_memory_utilization=args.gpu_mem)
    OVERRIDES.update(json.loads(args.engine_args))
    one = {"models": {"m": [inst(eargs, [0])]}}
    config, weights = placement_config(eargs, gpus)
    result: dict[str, Any] = {"gpus": gpus, "config": {**vars(args), "placement": config, "one": one},
                              "machine": harness.device_info()}
    eargs_used = {"one": engine_args_of(one), "placement": engine_args_of(config)}
    sampling = {"api": "completions", "prompt": f"{args.prompt_len} random token ids",
                "max_tokens": args.split_tokens, "ignore_eos": True, "stream": True,
                "other": "the model's generation config (lylm's default)",
                "warm_up": f"64 requests of {args.prompt_len} token ids, max_tokens 16, not counted"}
    client = {"kind": "mpload.MultiClient", "processes": args.procs, "split_requests": args.split_requests,
              "concurrency": 64, "balancer": "weighted_random", "weights": weights}
    progress = harness.Progress(3 if args.quick else 5, "placement")
    starts: dict[str, float] = {}
    ctx, starts["cold"], _ = start_server("cold", one, log_dir)
    ctx.__exit__(None, None, None)
    print(f"cold start: {starts['cold']:.1f} s", flush=True)
    progress.step("cold start of one instance")
    ctx, starts["placement"], url = start_server("placement", config, log_dir)
    try:
        print(f"placement start: {starts['placement']:.1f} s", flush=True)
        progress.step("placement config start")
        engines = harness.bench_engines(url)
        result["engines"] = engines
        result["pinning"] = check_pinning(engines) if harness.DEVICE == "gpu" else unchecked_pinning(engines)
        server_env = harness.bench_server_env(url)
        result["environment"] = check_environment(engines, server_env)
        for row in result["environment"]:
            verdict = "unreadable" if row["ok"] is None else "ok" if row["ok"] else "WRONG"
            print(f"environment {row['instance']}: want {row['want']} seen {row['seen']} {verdict}", flush=True)
        for p in result["pinning"]:
            verdict = "not checked" if p["ok"] is None else "ok" if p["ok"] else "WRONG"
            print(f"pinning {p['model']}[{p['index']}]: gpu_ids {p['gpu_ids']} memory on {p['held_on']} "
                  f"{verdict} {p['memory']}", flush=True)
        result["nvidia_smi"] = harness._run(["nvidia-smi"])
        result["split"] = anyio.run(split, url, args, weights, harness.vocab_size(args.model_dir))
        progress.step("1:2 split")
    finally:
        ctx.__exit__(None, None, None)
    if args.quick:
        result["start"] = {"cold_s": starts["cold"], "placement_s": starts["placement"],
                           "pool_log": {name: ready_lines(log_dir, name) for name in ("cold", "placement")}}
        print(json.dumps(result["start"], indent=1), flush=True)
        s = result["split"]
        md = (f"{args.shape} on {gpus} {'GPU' if harness.DEVICE == 'gpu' else 'CPU device'}, quick run: cold start "
              f"{starts['cold']:.1f} s, placement start {starts['placement']:.1f} s; 1:2 split {s['served'][0]} / "
              f"{s['served'][1]} ({'met' if s['ok'] else 'missed'}); pinning and environment in the JSON\n")
        harness.save_results(args.out, result, md, log_dir, engine_args=eargs_used, sampling=sampling, client=client)
        return
    # One instance last, when the compile cache is as warm as it gets (it kept warming over the
    # first starts: 94, 60, then 44 and 21 s for the engines of one 1.5B model on an H200).
    ctx, starts["one"], _ = start_server("one", one, log_dir)
    ctx.__exit__(None, None, None)
    progress.step("warm start of one instance")
    n = sum(len(g) for g in config["models"].values())
    result["start"] = {"cold_s": starts["cold"], "one_s": starts["one"], "placement_s": starts["placement"],
                       "instances": n, "ratio": starts["placement"] / starts["one"],
                       "pool_log": {name: ready_lines(log_dir, name) for name in ("cold", "placement", "one")}}
    print(f"one start: {starts['one']:.1f} s; placement ({n} instances) = {result['start']['ratio']:.2f}x one", flush=True)
    result["missing_gpu"] = missing_gpu(args, gpus, log_dir)
    progress.step(f"GPU {gpus} (missing)")
    where = f"{gpus} GPU{'s' if gpus > 1 else ''}" if harness.DEVICE == "gpu" else "the CPU build (dry run)"
    md = f"{args.shape} on {where}\n\n" + table(result)
    print(md, flush=True)
    harness.save_results(args.out, result, md, log_dir, engine_args=eargs_used, sampling=sampling, client=client)


if __name__ == "__main__":  # vLLM spawns engine processes: the guard is required
    main()
