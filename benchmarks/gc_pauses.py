"""Are lylm's TTFT tails garbage-collector pauses? lylm with and without gc.freeze() against vllm serve.

    python benchmarks/gc_pauses.py [--device cpu|gpu] [--model-dir DIR] [--shape qwen2.5-1.5b] \
        [--gpu-mem 0.28] [--grid 64x256,128x512,256x1024] [--rounds 3] [--min-rounds 1] \
        [--prompt-len 128] [--max-tokens 256] [--procs 4] [--budget-s 480] [--out PREFIX] [--log-dir DIR]

A CPU dry run (``--device cpu``, the tiny model) wants a small grid, e.g. ``--grid 4x8,16x32
--rounds 1 --prompt-len 32 --max-tokens 16 --procs 1``.

Three servers on one GPU (``--device cpu``: three CPU engines), one engine each, the
target's engine args (``harness.engine_args``) and gpu_memory_utilization --gpu-mem each,
started one after another:

- ``lylm``: ``switch_server.py`` (lylm's OpenAI routes over a one-instance pool),
  the garbage collector as Python leaves it;
- ``lylm_frozen``: the same with ``--gc-freeze`` (collect, then ``gc.freeze()`` once
  the engine is up, as vLLM's own server does);
- ``vllm``: ``vllm serve`` (which freezes its heap at start-up).

Same requests as server_vs_vllm.py (streamed completions, --prompt-len random token
ids, --max-tokens output tokens with ignore_eos); per round every cell visits the three
servers in a rotating order. For the two lylm servers, each cell also records the
server process's collections per generation (count, total and longest pause),
from switch_server's /bench/gc.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import anyio
import httpx

import harness
import loadgen
import mpload

NAME = "m"


def gc_get(url: str, reset: bool) -> dict[str, Any] | None:
    try:
        r = httpx.get(url + "/bench/gc" + ("?reset=1" if reset else ""), timeout=30.0, trust_env=False)
        return dict(r.json()) if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


async def measure(args: argparse.Namespace, urls: dict[str, str], vocab: int, deadline: harness.Deadline) -> tuple[list[dict[str, Any]], int]:
    grid = loadgen.parse_grid(args.grid)
    names = list(urls)
    samples: dict[tuple[int, int], dict[str, list[dict[str, Any]]]] = {c: {n: [] for n in names} for c in grid}
    rounds_done = 0
    progress = harness.Progress(args.rounds * len(grid) * len(names), "gc_pauses")
    with mpload.MultiClient(args.procs) as mc:
        for name in names:
            warm = harness.token_prompts(64, 128, 12345, vocab)
            await mc.run(urls[name], "completions", [mpload.body(NAME, "completions", p, 32) for p in warm], 32)
        last_round = 0.0
        for r in range(args.rounds):
            if r >= args.min_rounds and deadline.left() < last_round * 1.1 + 20:
                print(f"stopping after {r} rounds ({deadline.left():.0f} s left)", flush=True)
                break
            t_round = time.monotonic()
            for ci, (conc, total) in enumerate(grid):
                prompts = harness.token_prompts(total, args.prompt_len, 3000 * conc + r, vocab)
                payloads = [mpload.body(NAME, "completions", p, args.max_tokens) for p in prompts]
                k = (r + ci) % len(names)
                order = names[k:] + names[:k]
                for name in order:
                    gc_get(urls[name], reset=True)
                    cell = await mc.run(urls[name], "completions", payloads, conc)
                    s = cell.summary()
                    s["round"] = r
                    s["gc"] = gc_get(urls[name], reset=False)
                    samples[(conc, total)][name].append(s)
                    g2 = (s["gc"] or {}).get("generations", {}).get("2")
                    gc_text = f"gen2 {g2['count']:.0f}x max {g2['max_ms']:.0f} ms" if g2 else "gen2 -"
                    print(f"r{r} c={conc:<3} {name:12s} {s['system_tokens_per_s'] or 0:8.0f} tok/s TTFT p50 "
                          f"{s['ttft_p50_ms'] or 0:7.1f} p99 {s['ttft_p99_ms'] or 0:7.1f} ms {gc_text} "
                          f"client cpu {s['client_cpu_share_max']:.0%}", flush=True)
                    progress.step(f"round {r}, {conc}x{total}, {name}")
            rounds_done = r + 1
            last_round = time.monotonic() - t_round
    rows = []
    for (conc, total), per in samples.items():
        row: dict[str, Any] = {"concurrency": conc, "total": total, "rounds": per}
        for name in names:
            ss = per[name]
            for key in ("system_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p99_ms"):
                row[f"{name}_{key}"] = harness.median([s[key] for s in ss])
            gens = [((s.get("gc") or {}).get("generations") or {}).get("2") for s in ss]
            gens = [g for g in gens if g]
            row[f"{name}_gen2_count"] = sum(g["count"] for g in gens) if gens else None
            row[f"{name}_gen2_max_ms"] = max(g["max_ms"] for g in gens) if gens else None
            row[f"{name}_gen2_total_ms"] = sum(g["total_ms"] for g in gens) if gens else None
        rows.append(row)
    return rows, rounds_done


def table(rows: list[dict[str, Any]], names: list[str]) -> str:
    f = harness.fmt
    head = "| concurrency | requests | " + " | ".join(
        f"{n} tok/s | {n} TTFT p50 ms | {n} TTFT p99 ms" for n in names) + " | lylm gen-2 GCs (all rounds), longest | lylm_frozen gen-2 GCs, longest |"
    lines = [head, "|" + "---|" * (2 + 3 * len(names) + 2)]
    for r in rows:
        cells = [str(r["concurrency"]), str(r["total"])]
        for n in names:
            cells += [f(r[f"{n}_system_tokens_per_s"]), f(r[f"{n}_ttft_p50_ms"], ".1f"), f(r[f"{n}_ttft_p99_ms"], ".1f")]
        for n in ("lylm", "lylm_frozen"):
            cells.append(f"{f(r.get(f'{n}_gen2_count'))}, {f(r.get(f'{n}_gen2_max_ms'))} ms")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_target_arguments(parser)
    harness.add_run_arguments(parser, gpu_mem=0.28, procs=4)
    harness.add_grid_arguments(parser, grid="64x256,128x512,256x1024", rounds=3, min_rounds=1)
    args = parser.parse_args()
    deadline, log_dir = harness.start_run(args, "gc_pauses")

    eargs = harness.engine_args(args.model_dir, json.loads(args.engine_args), gpu_memory_utilization=args.gpu_mem)
    config = harness.write_lylm_config(log_dir / "lylm.json", NAME, [{"devices": harness.devices(), "engine_args": eargs}])
    ports = {n: harness.free_port() for n in ("lylm", "lylm_frozen", "vllm")}
    commands = {
        "lylm": harness.switch_server_command(config, ports["lylm"]),
        "lylm_frozen": harness.switch_server_command(config, ports["lylm_frozen"]) + ["--gc-freeze"],
        "vllm": harness.vllm_serve_command(eargs, NAME, ports["vllm"]),
    }
    result: dict[str, Any] = {"config": {**vars(args), "engine_args": eargs, "commands": {k: " ".join(v) for k, v in commands.items()}},
                              "machine": harness.device_info()}
    with harness.server("lylm", commands["lylm"], log_dir, ports["lylm"], timeout_s=600) as u1, \
         harness.server("lylm_frozen", commands["lylm_frozen"], log_dir, ports["lylm_frozen"], timeout_s=600) as u2, \
         harness.server("vllm", commands["vllm"], log_dir, ports["vllm"], timeout_s=600) as u3:
        result["gpu_processes"] = harness.gpu_processes()
        urls = {"lylm": u1, "lylm_frozen": u2, "vllm": u3}
        result["gc_at_start"] = {n: gc_get(u, reset=False) for n, u in urls.items()}
        rows, rounds = anyio.run(measure, args, urls, harness.vocab_size(args.model_dir), deadline)
    result["rows"] = rows
    result["rounds_done"] = rounds
    where = f"gpu_memory_utilization {args.gpu_mem} each" if harness.DEVICE == "gpu" else "three CPU engines"
    md = f"{args.shape}, {where}, {rounds} rounds (medians)\n\n" + table(rows, list(commands))
    print(md, flush=True)
    sampling = {"api": "completions", "prompt": f"{args.prompt_len} random token ids", "max_tokens": args.max_tokens,
                "ignore_eos": True, "stream": True, "other": "the model's generation config (every server's default)"}
    client = {"kind": "mpload.MultiClient", "processes": args.procs, "grid": args.grid, "rounds": args.rounds,
              "order": "the three servers rotate cell by cell and round by round"}
    harness.save_results(args.out, result, md, log_dir, engine_args=eargs, sampling=sampling, client=client)


if __name__ == "__main__":
    main()
