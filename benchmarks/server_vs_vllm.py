"""lylm's server against `vllm serve`, one engine each, and (optionally) the seed's table through lylm.

    python benchmarks/server_vs_vllm.py [--device cpu|gpu] [--model-dir DIR] [--shape qwen2.5-1.5b] \
        [--gpu-mem 0.4] [--grid 1x4,16x64,64x256,128x512,256x1024] [--rounds 3] \
        [--prompt-len 128] [--max-tokens 256] [--procs 4] [--workers 1] [--budget-s 480] \
        [--seed-table] [--out PREFIX] [--log-dir DIR]

Both servers run at once on the same device, each with the same engine args
(the target's, ``harness.engine_args``: on a GPU ``BASE_ENGINE_ARGS`` plus
``gpu_memory_utilization`` = --gpu-mem, so both fit; ``--device cpu``: the tiny model,
and a smaller default grid and lengths): ``lylm serve`` with a one-instance config (devices.gpu_ids [0])
and vLLM's own ``python -m vllm.entrypoints.openai.api_server``. They start one
after the other (engines on one GPU must not profile memory at the same time) and
each is idle while the other is measured. Requests: streamed ``/v1/completions``
with token-id prompts of exactly --prompt-len tokens (random ids, unique per
request, so the prefix cache does not help), --max-tokens output tokens with
ignore_eos. Rounds go over the whole grid; within a round the order of the two
servers alternates from cell to cell and from round to round, and both get the
same prompts. The load comes from ``mpload.MultiClient`` (several client processes).

Reported per cell: medians over rounds of output tokens/s and TTFT p50/p99 per
server, and lylm/vLLM ratios. Targets: throughput >= 1.0x, TTFT p50 <= 1.0x.

``--seed-table``: afterwards, the seed's grid (1x4, 4x16, 16x64, 64x256, 128x512,
256x512) through lylm's chat endpoint, short text questions, --max-tokens with
ignore_eos, with per-engine /metrics sampled during each cell: the seed's columns.
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
SEED_GRID = "1x4,4x16,16x64,64x256,128x512,256x512"


async def warm(mc: mpload.MultiClient, url: str, vocab: int) -> None:
    prompts = harness.token_prompts(64, 128, 12345, vocab)
    await mc.run(url, "completions", [mpload.body(NAME, "completions", p, 32) for p in prompts], 32)


async def measure(args: argparse.Namespace, urls: dict[str, str], vocab: int, deadline: harness.Deadline,
                  reserve_s: float) -> tuple[list[dict[str, Any]], int]:
    grid = loadgen.parse_grid(args.grid)
    names = list(urls)
    samples: dict[tuple[int, int], dict[str, list[dict[str, Any]]]] = {cell: {n: [] for n in names} for cell in grid}
    rounds_done = 0
    progress = harness.Progress(args.rounds * len(grid) * len(names), "server_vs_vllm")
    with mpload.MultiClient(args.procs) as mc:
        for name in names:
            await warm(mc, urls[name], vocab)
        last_round = 0.0
        for r in range(args.rounds):
            if r >= args.min_rounds and deadline.left() < last_round * 1.1 + reserve_s:
                print(f"stopping after {r} rounds ({deadline.left():.0f} s left, a round takes {last_round:.0f} s)", flush=True)
                break
            t_round = time.monotonic()
            for ci, (conc, total) in enumerate(grid):
                prompts = harness.token_prompts(total, args.prompt_len, 1000 * conc + r, vocab)
                payloads = [mpload.body(NAME, "completions", p, args.max_tokens) for p in prompts]
                order = names if (r + ci) % 2 == 0 else names[::-1]
                for name in order:
                    cell = await mc.run(urls[name], "completions", payloads, conc)
                    s = cell.summary()
                    s["round"] = r
                    s["first"] = order[0]
                    samples[(conc, total)][name].append(s)
                    print(f"r{r} c={conc:<3} n={total:<5} {name:5s} {s['system_tokens_per_s'] or 0:8.0f} tok/s "
                          f"TTFT p50 {s['ttft_p50_ms'] or 0:7.1f} p99 {s['ttft_p99_ms'] or 0:7.1f} ms "
                          f"ok {s['success_rate']:.0%} client cpu {s['client_cpu_share_max']:.0%}", flush=True)
                    progress.step(f"round {r}, {conc}x{total}, {name}")
            rounds_done = r + 1
            last_round = time.monotonic() - t_round
    rows = []
    for (conc, total), per in samples.items():
        row: dict[str, Any] = {"concurrency": conc, "total": total, "rounds": per}
        for name in names:
            ss = per[name]
            row[f"{name}_tok_s"] = harness.median([s["system_tokens_per_s"] for s in ss])
            row[f"{name}_ttft_p50_ms"] = harness.median([s["ttft_p50_ms"] for s in ss])
            row[f"{name}_ttft_p99_ms"] = harness.median([s["ttft_p99_ms"] for s in ss])
            row[f"{name}_itl_p50_ms"] = harness.median([s["itl_p50_ms"] for s in ss])
            row[f"{name}_success"] = min((s["success_rate"] for s in ss), default=None)
            row[f"{name}_client_cpu_max"] = max((s["client_cpu_share_max"] for s in ss), default=None)
        row["throughput_ratio"] = harness.ratio(row["lylm_tok_s"], row["vllm_tok_s"])
        row["ttft_p50_ratio"] = harness.ratio(row["lylm_ttft_p50_ms"], row["vllm_ttft_p50_ms"])
        row["ttft_p99_ratio"] = harness.ratio(row["lylm_ttft_p99_ms"], row["vllm_ttft_p99_ms"])
        rows.append(row)
    return rows, rounds_done


async def seed_table(args: argparse.Namespace, url: str) -> list[dict[str, Any]]:
    grid = loadgen.parse_grid(args.seed_grid)
    prompts = loadgen.build_prompts("short", sum(t for _, t in grid), seed=0)
    monitor = metrics_monitor(url)
    out = []
    offset = 0
    with mpload.MultiClient(args.procs) as mc:
        await mc.run(url, "chat", [mpload.body(NAME, "chat", p, 16) for p in prompts[:16]], 16)  # warm the chat path
        for conc, total in grid:
            payloads = [mpload.body(NAME, "chat", p, args.max_tokens) for p in prompts[offset:offset + total]]
            offset += total
            async with monitor(conc, total) as extra:
                cell = await mc.run(url, "chat", payloads, conc)
            cell.extra.update(extra)
            s = cell.summary()
            out.append(s)
            print(f"seed {conc}x{total}: {s['system_tokens_per_s'] or 0:.0f} tok/s, TTFT p50 {s['ttft_p50_ms'] or 0:.0f} ms, "
                  f"ok {s['success_rate']:.0%}, peak running {s.get('peak_running_per_engine')}", flush=True)
    return out


def ab_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| concurrency | requests | lylm tok/s | vllm serve tok/s | throughput ratio | lylm TTFT p50 ms | "
        "vllm TTFT p50 ms | TTFT p50 ratio | lylm TTFT p99 ms | vllm TTFT p99 ms | TTFT p99 ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    f = harness.fmt
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['total']} | {f(r['lylm_tok_s'])} | {f(r['vllm_tok_s'])} | "
            f"{f(r['throughput_ratio'], '.3f')} | {f(r['lylm_ttft_p50_ms'], '.1f')} | {f(r['vllm_ttft_p50_ms'], '.1f')} | "
            f"{f(r['ttft_p50_ratio'], '.3f')} | {f(r['lylm_ttft_p99_ms'], '.1f')} | {f(r['vllm_ttft_p99_ms'], '.1f')} | "
            f"{f(r['ttft_p99_ratio'], '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_target_arguments(parser)
    harness.add_run_arguments(parser, gpu_mem=0.4, procs=None)
    # Defaults by --device (None below): gpu grid 1x4,16x64,64x256,128x512,256x1024, 128-token
    # prompts, 256 tokens out, 4 client processes; cpu 1x16,16x64,64x128, 32-token prompts,
    # 64 out, 1 client process (2 cores: the rest run the servers).
    harness.add_grid_arguments(parser, grid=None, rounds=3, prompt_len=None, max_tokens=None)
    parser.add_argument("--workers", type=int, default=1,
                        help="lylm's front-end workers (vllm serve runs one API server: 1 compares like with like)")
    parser.add_argument("--seed-table", action="store_true")
    parser.add_argument("--seed-grid", default=SEED_GRID)
    args = parser.parse_args()
    deadline, log_dir = harness.start_run(args, "server_vs_vllm")
    harness.device_defaults(
        args,
        cpu={"grid": "1x16,16x64,64x128", "prompt_len": 32, "max_tokens": 64, "procs": 1},
        gpu={"grid": "1x4,16x64,64x256,128x512,256x1024", "prompt_len": 128, "max_tokens": 256, "procs": 4},
    )

    eargs = harness.engine_args(args.model_dir, json.loads(args.engine_args), gpu_memory_utilization=args.gpu_mem)
    config = harness.write_lylm_config(log_dir / "lylm.json", NAME, [{"devices": harness.devices(), "engine_args": eargs}])
    vocab = harness.vocab_size(args.model_dir)
    ports = {"lylm": harness.free_port(), "vllm": harness.free_port()}
    commands = {
        "lylm": [*harness.lylm_serve_command(config, ports["lylm"]), "--workers", str(args.workers)],
        "vllm": harness.vllm_serve_command(eargs, NAME, ports["vllm"]),
    }
    result: dict[str, Any] = {
        "config": {**vars(args), "engine_args": eargs, "commands": {k: " ".join(v) for k, v in commands.items()}},
        "machine": harness.device_info(),
    }
    t0 = time.monotonic()
    with harness.server("lylm", commands["lylm"], log_dir, ports["lylm"]) as lylm_url:
        result["lylm_start_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        with harness.server("vllm", commands["vllm"], log_dir, ports["vllm"]) as vllm_url:
            result["vllm_start_s"] = time.monotonic() - t1
            result["gpu_processes"] = harness.gpu_processes()
            reserve = 90.0 if args.seed_table else 20.0
            rows, rounds = anyio.run(measure, args, {"lylm": lylm_url, "vllm": vllm_url}, vocab, deadline, reserve)
            result["rows"] = rows
            result["rounds_done"] = rounds
        md = f"{args.shape}, {rounds} rounds\n\n" + ab_table(rows)
        print(md, flush=True)
        if args.seed_table:
            summaries = anyio.run(seed_table, args, lylm_url)
            result["seed_table"] = summaries
            seed_md = loadgen.markdown_table(summaries)
            seed_md += "\n| conc | requests served per engine | peak running | peak waiting |\n|---|---|---|---|\n"
            for s in summaries:
                seed_md += (f"| {s['concurrency']} | {s.get('requests_per_engine')} | {s.get('peak_running_per_engine')} | "
                            f"{s.get('peak_waiting_per_engine')} |\n")
            print(seed_md, flush=True)
            md += "\n## Seed table through lylm (chat)\n\n" + seed_md
    sampling = {"api": "completions", "prompt": f"{args.prompt_len} random token ids", "max_tokens": args.max_tokens,
                "ignore_eos": True, "stream": True, "other": "the model's generation config (both servers' default)"}
    if args.seed_table:
        sampling["seed_table"] = {"api": "chat", "prompt": "short text questions", "max_tokens": args.max_tokens,
                                  "ignore_eos": True}
    client = {"kind": "mpload.MultiClient", "processes": args.procs, "grid": args.grid, "rounds": args.rounds}
    harness.save_results(args.out, result, md, log_dir, engine_args=eargs, sampling=sampling, client=client)


if __name__ == "__main__":
    main()
