"""lylm's HTTP server against `vllm serve`: same package, same tiny model, same engine
args, one engine each, the same load generator, alternating runs.

    flock /tmp/lylm-bench.lock python benchmarks/server_vs_vllm.py \
        [--grid 1x16,16x64,64x128] [--rounds 3] [--max-tokens 64] [--out benchmarks/results/server_vs_vllm]

With the tiny model the engine is fast, so differences come from the front ends:
request parsing, tokenization, output processing, SSE encoding. Both servers run
at once (each idle while the other is measured); for every round and cell the
order alternates (lylm first, then vLLM first) and both get the same seeded
prompts. Reported: per cell, the median over rounds of system throughput and
TTFT p50/p99 for each server, and lylm/vLLM ratios. Targets (BENCHMARKS.md):
throughput >= 1.0x, TTFT p50 <= 1.0x.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio

import loadgen
from seed_table import free_port, stop, wait_healthy

from lylm.testing import TINY_MODEL_ENGINE_ARGS, build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny"


def vllm_command(model_dir: str, port: int) -> list[str]:
    """vLLM's own OpenAI server with exactly the engine args lylm's instance gets."""
    args = TINY_MODEL_ENGINE_ARGS
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_dir, "--served-model-name", MODEL,
        "--host", "127.0.0.1", "--port", str(port),
        "--load-format", args["load_format"], "--enforce-eager",
        "--max-model-len", str(args["max_model_len"]),
        "--kv-cache-memory-bytes", str(args["kv_cache_memory_bytes"]),
        "--max-num-seqs", str(args["max_num_seqs"]), "--seed", str(args["seed"]),
        "--structured-outputs-config", json.dumps(args["structured_outputs_config"]),
        # lylm's defaults: no periodic stats log, no per-request access log.
        "--disable-log-stats", "--disable-uvicorn-access-log",
    ]


def lylm_command(model_dir: str, port: int, workdir: str) -> list[str]:
    config = {"models": {MODEL: [{"engine_args": {"model": model_dir, **TINY_MODEL_ENGINE_ARGS}}]}}
    path = os.path.join(workdir, "lylm-one-engine.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return [
        sys.executable, "-m", "lylm", "serve", "--config", path,
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]


@contextlib.contextmanager
def server(name: str, command: list[str], port: int, log_dir: str) -> Iterator[str]:
    url = f"http://127.0.0.1:{port}"
    with open(os.path.join(log_dir, f"{name}.log"), "wb") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, proc, timeout_s=300)
            yield url
        finally:
            stop(proc)


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


async def measure(urls: dict[str, str], grid: list[tuple[int, int]], rounds: int, max_tokens: int) -> list[dict[str, Any]]:
    names = list(urls)
    for name in names:  # warm both (first requests pay one-off costs)
        await loadgen.run_grid(urls[name], MODEL, [(4, 16)], max_tokens=8, seed=999, progress=False)
    rows = []
    for conc, total in grid:
        samples: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                (cell,) = await loadgen.run_grid(
                    urls[name], MODEL, [(conc, total)], max_tokens=max_tokens, seed=1000 * conc + r, progress=False
                )
                s = cell.summary()
                samples[name].append(s)
                print(
                    f"c={conc:<3} round {r} {name:5s} {s['system_tokens_per_s']:8.0f} tok/s "
                    f"ttft p50 {s['ttft_p50_ms']:.1f} ms ok {s['success_rate']:.0%}",
                    flush=True,
                )
        row: dict[str, Any] = {"concurrency": conc, "total": total, "rounds": samples}
        for name in names:
            row[f"{name}_tok_s"] = median([s["system_tokens_per_s"] for s in samples[name]])
            row[f"{name}_ttft_p50_ms"] = median([s["ttft_p50_ms"] for s in samples[name]])
            row[f"{name}_ttft_p99_ms"] = median([s["ttft_p99_ms"] for s in samples[name]])
            row[f"{name}_success"] = min(s["success_rate"] for s in samples[name])
        row["throughput_ratio"] = ratio(row["lylm_tok_s"], row["vllm_tok_s"])
        row["ttft_p50_ratio"] = ratio(row["lylm_ttft_p50_ms"], row["vllm_ttft_p50_ms"])
        row["ttft_p99_ratio"] = ratio(row["lylm_ttft_p99_ms"], row["vllm_ttft_p99_ms"])
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| concurrency | requests | lylm tok/s | vllm serve tok/s | throughput ratio | lylm TTFT p50 ms | vllm TTFT p50 ms | TTFT p50 ratio | TTFT p99 ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['total']} | {r['lylm_tok_s']:.0f} | {r['vllm_tok_s']:.0f} | "
            f"{r['throughput_ratio']:.3f} | {r['lylm_ttft_p50_ms']:.1f} | {r['vllm_ttft_p50_ms']:.1f} | "
            f"{r['ttft_p50_ratio']:.3f} | {r['ttft_p99_ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="1x16,16x64,64x128")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/server_vs_vllm")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    model_dir = str(build_tiny_model(os.path.join(tempfile.gettempdir(), "lylm-tiny-model")))
    grid = loadgen.parse_grid(args.grid)
    with tempfile.TemporaryDirectory() as work:
        ports = {"lylm": free_port(), "vllm": free_port()}
        with server("lylm", lylm_command(model_dir, ports["lylm"], work), ports["lylm"], work) as lylm_url, \
             server("vllm", vllm_command(model_dir, ports["vllm"]), ports["vllm"], work) as vllm_url:
            rows = anyio.run(measure, {"lylm": lylm_url, "vllm": vllm_url}, grid, args.rounds, args.max_tokens)
    result = {"config": vars(args), "machine": loadgen.machine_info(), "rows": rows}
    md = table(rows)
    print(md)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(md)


if __name__ == "__main__":
    main()
