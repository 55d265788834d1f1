"""Two lylm instances on one GPU against one: throughput, TTFT, and the weighted split in /metrics.

    python benchmarks/two_instances.py [--device cpu|gpu] [--model-dir DIR] [--shape qwen2.5-1.5b] \
        [--gpu-mem 0.4] [--grid 16x64,64x256,128x512,256x1024] [--rounds 3] [--min-rounds 2] \
        [--prompt-len 128] [--max-tokens 256] [--procs 4] [--budget-s 480] [--out PREFIX] [--log-dir DIR]

A CPU dry run (``--device cpu``, the tiny model) wants a small grid, e.g. ``--grid 4x8,16x32
--rounds 1 --min-rounds 1 --prompt-len 32 --max-tokens 16 --procs 1``.

One server (``switch_server.py``: lylm's OpenAI routes plus a route that swaps the
balancer between runs) over a pool of two instances of the same model on GPU 0
(``--device cpu``: two CPU engines), each with gpu_memory_utilization --gpu-mem and the
target's engine args (``harness.engine_args``), weights 1:2.
Two arms, alternating cell by cell and round by round, same prompts:

- ``one``: every request to instance 0 (balancer ``pin0``): one engine, alone on the
  GPU's compute (the other engine idles); its KV cache is the --gpu-mem share;
- ``two``: both instances, lylm's default ``weighted_random`` with weights 1:2.

Requests as in server_vs_vllm.py (streamed completions, token-id prompts, ignore_eos).
During each cell /metrics is sampled (seed_table.metrics_monitor): requests served
per engine (lylm_requests_total), peak running and waiting. The split the 1:2
weights give is read from those counters, summed over the ``two`` cells.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import anyio

import harness
import loadgen
import mpload
from seed_table import metrics_monitor

NAME = "m"
ARMS = {"one": ("pin0", [1.0, 2.0]), "two": ("weighted_random", [1.0, 2.0])}


async def measure(args: argparse.Namespace, url: str, vocab: int, deadline: harness.Deadline) -> tuple[list[dict[str, Any]], int]:
    grid = loadgen.parse_grid(args.grid)
    arms = list(ARMS)
    samples: dict[tuple[int, int], dict[str, list[dict[str, Any]]]] = {c: {a: [] for a in arms} for c in grid}
    monitor = metrics_monitor(url)
    rounds_done = 0
    progress = harness.Progress(args.rounds * len(grid) * len(arms), "two_instances")
    with mpload.MultiClient(args.procs) as mc:
        for arm in arms:  # warm both engines through both policies
            harness.set_policy(url, *ARMS[arm])
            warm = harness.token_prompts(64, args.prompt_len, 4242, vocab)
            await mc.run(url, "completions", [mpload.body(NAME, "completions", p, 32) for p in warm], 32)
        last_round = 0.0
        for r in range(args.rounds):
            if r >= args.min_rounds and deadline.left() < last_round * 1.1 + 20:
                print(f"stopping after {r} rounds ({deadline.left():.0f} s left)", flush=True)
                break
            t_round = time.monotonic()
            for ci, (conc, total) in enumerate(grid):
                prompts = harness.token_prompts(total, args.prompt_len, 2000 * conc + r, vocab)
                payloads = [mpload.body(NAME, "completions", p, args.max_tokens) for p in prompts]
                order = arms if (r + ci) % 2 == 0 else arms[::-1]
                for arm in order:
                    harness.set_policy(url, *ARMS[arm], seed=r)
                    async with monitor(conc, total) as extra:
                        cell = await mc.run(url, "completions", payloads, conc)
                    cell.extra.update(extra)
                    s = cell.summary()
                    s["round"] = r
                    samples[(conc, total)][arm].append(s)
                    print(f"r{r} c={conc:<3} {arm:3s} {s['system_tokens_per_s'] or 0:8.0f} tok/s "
                          f"TTFT p50 {s['ttft_p50_ms'] or 0:7.1f} p99 {s['ttft_p99_ms'] or 0:7.1f} ms "
                          f"served {s.get('requests_per_engine')} peak run {s.get('peak_running_per_engine')} "
                          f"wait {s.get('peak_waiting_per_engine')} client cpu {s['client_cpu_share_max']:.0%}", flush=True)
                    progress.step(f"round {r}, {conc}x{total}, {arm}")
            rounds_done = r + 1
            last_round = time.monotonic() - t_round
    rows = []
    for (conc, total), per in samples.items():
        row: dict[str, Any] = {"concurrency": conc, "total": total, "rounds": per}
        for arm in arms:
            ss = per[arm]
            for key in ("system_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "mean_e2e_s"):
                row[f"{arm}_{key}"] = harness.median([s[key] for s in ss])
            row[f"{arm}_success"] = min((s["success_rate"] for s in ss), default=None)
            served: dict[str, int] = {}
            for s in ss:
                for e, n in (s.get("requests_per_engine") or {}).items():
                    served[e] = served.get(e, 0) + n
            row[f"{arm}_served"] = served
        row["throughput_ratio"] = harness.ratio(row["two_system_tokens_per_s"], row["one_system_tokens_per_s"])
        row["ttft_p50_ratio"] = harness.ratio(row["two_ttft_p50_ms"], row["one_ttft_p50_ms"])
        row["ttft_p99_ratio"] = harness.ratio(row["two_ttft_p99_ms"], row["one_ttft_p99_ms"])
        rows.append(row)
    return rows, rounds_done


def table(rows: list[dict[str, Any]]) -> str:
    f = harness.fmt
    lines = [
        "| concurrency | requests | one engine tok/s | two engines tok/s | ratio two/one | one TTFT p50 ms | "
        "two TTFT p50 ms | one TTFT p99 ms | two TTFT p99 ms | two: served by engine 0 / 1 (all rounds) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        served = r["two_served"]
        lines.append(
            f"| {r['concurrency']} | {r['total']} | {f(r['one_system_tokens_per_s'])} | {f(r['two_system_tokens_per_s'])} | "
            f"{f(r['throughput_ratio'], '.3f')} | {f(r['one_ttft_p50_ms'], '.1f')} | {f(r['two_ttft_p50_ms'], '.1f')} | "
            f"{f(r['one_ttft_p99_ms'], '.1f')} | {f(r['two_ttft_p99_ms'], '.1f')} | "
            f"{served.get('0', 0)} / {served.get('1', 0)} |"
        )
    total0 = sum(r["two_served"].get("0", 0) for r in rows)
    total1 = sum(r["two_served"].get("1", 0) for r in rows)
    one0 = sum(r["one_served"].get("0", 0) for r in rows)
    one1 = sum(r["one_served"].get("1", 0) for r in rows)
    lines.append("")
    if total0 + total1:
        lines.append(f"weighted_random 1:2 split from /metrics: engine 0 {total0}, engine 1 {total1} requests "
                     f"= {total0 / (total0 + total1):.3f} : {total1 / (total0 + total1):.3f} "
                     f"(ratio {total1 / max(total0, 1):.2f}; expected 2.00). pin0 arm: engine 0 {one0}, engine 1 {one1}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_target_arguments(parser)
    harness.add_run_arguments(parser, gpu_mem=0.4, procs=4)
    harness.add_grid_arguments(parser, grid="16x64,64x256,128x512,256x1024", rounds=3, min_rounds=2)
    args = parser.parse_args()
    deadline, log_dir = harness.start_run(args, "two_instances")

    eargs = harness.engine_args(args.model_dir, json.loads(args.engine_args), gpu_memory_utilization=args.gpu_mem)
    instances = [{"devices": harness.devices(w), "engine_args": eargs} for w in (1, 2)]
    config = harness.write_lylm_config(log_dir / "lylm-two.json", NAME, instances)
    port = harness.free_port()
    command = harness.switch_server_command(config, port)
    result: dict[str, Any] = {"config": {**vars(args), "engine_args": eargs, "command": " ".join(command)},
                              "machine": harness.device_info()}
    t0 = time.monotonic()
    with harness.server("switch", command, log_dir, port, timeout_s=600) as url:
        result["start_s"] = time.monotonic() - t0
        result["gpu_processes"] = harness.gpu_processes()
        print("GPU processes:", result["gpu_processes"], flush=True)
        rows, rounds = anyio.run(measure, args, url, harness.vocab_size(args.model_dir), deadline)
        result["engines_at_end"] = harness.bench_engines(url)
    result["rows"] = rows
    result["rounds_done"] = rounds
    where = f"at gpu_memory_utilization {args.gpu_mem} each" if harness.DEVICE == "gpu" else "on the CPU"
    md = f"{args.shape}, two instances {where}, {rounds} rounds\n\n" + table(rows)
    print(md, flush=True)
    sampling = {"api": "completions", "prompt": f"{args.prompt_len} random token ids", "max_tokens": args.max_tokens,
                "ignore_eos": True, "stream": True, "other": "the model's generation config (lylm's default)"}
    client = {"kind": "mpload.MultiClient", "processes": args.procs, "grid": args.grid, "rounds": args.rounds,
              "arms": {arm: {"balancer": b, "weights": w} for arm, (b, w) in ARMS.items()},
              "metrics": "seed_table.metrics_monitor samples /metrics during each cell"}
    harness.save_results(args.out, result, md, log_dir, engine_args=[i["engine_args"] for i in instances],
                         sampling=sampling, client=client)


if __name__ == "__main__":
    main()
