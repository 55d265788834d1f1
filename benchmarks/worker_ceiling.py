"""The front end's ceiling with 1, 2, 4, 8 workers: streamed tok/s over engines that cost nothing.

    python benchmarks/worker_ceiling.py [--workers 1,2,4,8] [--engines 8] [--streams 256] \
        [--requests-per-stream 4] [--max-tokens 256] [--rounds 3] [--procs 4] [--budget 540] \
        [--out benchmarks/results/worker_ceiling]

No ``--device``: there is no model and no engine to place. It runs on any machine's CPUs,
and its result files say "no GPU used" whatever the machine has; on a 2-core machine a
short run is e.g. ``--workers 1,2 --engines 2 --streams 16 --requests-per-stream 2
--max-tokens 32 --rounds 1 --procs 1``.

Runs on any machine (no GPU needed): ``python -m lylm.testing.fake_server --workers W`` serves
zero-latency FakeEngines, so every token is ready at once and the measured rate is
lylm's own per-token work (validation, books, the hub, SSE, uvicorn) spread over W
workers. With workers, each worker's engines generate their own tokens and only the
per-request hub messages cross processes, exactly as with real engine cores; what is
not measured is vLLM's output processing (detokenization), which workers spread too.

The client is ``mpload.MultiClient`` (``--procs`` processes, each reporting its CPU
share, so a saturated client shows). Rounds alternate the order of the arms. Each
cell records the server's CPU (main process plus workers) in cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

import harness
import mpload



def start_server(workers: int, engines: int, port: int, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "lylm.testing.fake_server", "--port", str(port), "--engines", str(engines), "--workers", str(workers)]
    return subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=harness.ROOT)


async def measure(args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    arms = [int(w) for w in args.workers.split(",")]
    samples: dict[int, list[dict[str, Any]]] = {w: [] for w in arms}
    deadline = harness.Deadline(args.budget)
    progress = harness.Progress(args.rounds * len(arms), "worker_ceiling")
    with mpload.MultiClient(args.procs) as mc:
        for r in range(args.rounds):
            for w in (arms if r % 2 == 0 else arms[::-1]):
                if deadline.left() < 30:
                    print(f"stopping: {deadline.left():.0f} s left", flush=True)
                    break
                port = harness.free_port()
                proc = start_server(w, args.engines, port, log_dir / f"fake_server_w{w}_r{r}.log")
                url = f"http://127.0.0.1:{port}"
                try:
                    harness.wait_healthy(url, proc, 120)
                    warm = [mpload.body("fake", "completions", "warm", 16) for _ in range(4 * w)]
                    await mc.run(url, "completions", warm, 4 * w)
                    payloads = [
                        mpload.body("fake", "completions", f"ceiling {i}", args.max_tokens)
                        for i in range(args.streams * args.requests_per_stream)
                    ]
                    cpu0, t0 = harness.tree_cpu(proc.pid), time.monotonic()
                    s = (await mc.run(url, "completions", payloads, args.streams)).summary()
                    cpu1, t1 = harness.tree_cpu(proc.pid), time.monotonic()
                finally:
                    harness.stop(proc)
                s["server_cores"] = (cpu1 - cpu0) / max(t1 - t0, 1e-9)
                samples[w].append(s)
                print(
                    f"r{r} workers={w}: {s['system_tokens_per_s'] or 0:9.0f} tok/s, TTFT p50 "
                    f"{s['ttft_p50_ms'] or 0:7.1f} ms, server {s['server_cores']:.2f} cores, client max "
                    f"{s.get('client_cpu_share_max') or 0:.2f}, success {s['success_rate']:.3f}",
                    flush=True,
                )
                progress.step(f"round {r}, {w} worker{'s' if w > 1 else ''}")
    med = harness.median
    rows = []
    for w, ss in samples.items():
        if not ss:
            continue
        rows.append({
            "workers": w,
            "rounds": len(ss),
            "tok_s": med([x["system_tokens_per_s"] for x in ss]),
            "tok_s_all": [x["system_tokens_per_s"] for x in ss],
            **{k: med([x[k] for x in ss]) for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "server_cores",
                                                     "client_cpu_share_max")},
            "success": min(x["success_rate"] for x in ss),
        })
    base = next((row["tok_s"] for row in rows if row["workers"] == 1), None)
    for row in rows:
        row["vs_one_worker"] = harness.ratio(row["tok_s"], base)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    f = harness.fmt
    lines = [
        "| workers | streamed tok/s (median) | vs 1 worker | TTFT p50 ms | ITL p50 ms | server cores | client max CPU | rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {f(r['tok_s'])} | {f(r['vs_one_worker'], '.2f')}x | {f(r['ttft_p50_ms'], '.1f')} | "
            f"{f(r['itl_p50_ms'], '.2f')} | {f(r['server_cores'], '.2f')} | {f(r['client_cpu_share_max'], '.2f')} | {r['rounds']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--engines", type=int, default=8)
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--requests-per-stream", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run")
    parser.add_argument("--out", default=str(harness.BENCH / "results" / "worker_ceiling"))
    args = parser.parse_args()
    # Fake engines: no model and no GPU whatever the machine has; the provenance says so.
    harness.DEVICE = "cpu"
    out = Path(args.out)
    log_dir = Path(tempfile.mkdtemp(prefix="lylm-ceiling-"))
    rows = anyio.run(measure, args, log_dir)
    result = {
        "machine": loadgen_machine(),
        "cpus": os.cpu_count(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }
    md = f"# Front-end ceiling over zero-latency FakeEngines ({os.cpu_count()} CPUs)\n\n{table(rows)}\n"
    print(md)
    engines = {"kind": "lylm.testing.FakeEngine (python -m lylm.testing.fake_server), zero latency",
               "engines": args.engines, "workers": args.workers}
    sampling = {"api": "completions", "prompt": "short text (\"ceiling <i>\")", "max_tokens": args.max_tokens,
                "ignore_eos": True, "stream": True}
    client = {"kind": "mpload.MultiClient", "processes": args.procs, "streams": args.streams,
              "requests": args.streams * args.requests_per_stream, "rounds": args.rounds,
              "warm_up": "4 x W requests of 16 tokens per server, not counted"}
    harness.save_results(str(out), result, md, log_dir, engine_args=engines, sampling=sampling, client=client)


def loadgen_machine() -> dict[str, Any]:
    import loadgen

    return loadgen.machine_info()


if __name__ == "__main__":
    main()
