"""Exit time with nothing in flight: ``lylm serve MODEL`` against ``vllm serve MODEL``, same flags.

Each round starts one server, sends one completion (the engine has served), then a signal
(SIGINT, as Ctrl-C, or SIGTERM, as a service manager), and times two things: until the
command returns, and until the last process it started (engine core, workers) is gone. It
also records the exit status and whether the log has a traceback. Rounds alternate the
servers and the signals, so both see the same machine state.

    python benchmarks/exit_time.py --device cpu --rounds 2
    python benchmarks/exit_time.py --device gpu --model-dir DIR --shape qwen2.5-1.5b

Results: ``benchmarks/results/exit_time_<shape>.{json,md}`` (issue 28: "SIGINT or SIGTERM
exits in <= 2 s plus vLLM's own shutdown time").
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

import harness
from harness import fmt, median


def lylm_command(args: dict[str, Any], port: int) -> list[str]:
    """``lylm serve MODEL [vLLM's flags]``, the form that mirrors ``vllm serve``."""
    from lylm.engines._core_host import serve_flags

    flags = serve_flags({k: v for k, v in args.items() if k != "model"})
    return [sys.executable, "-m", "lylm", "serve", str(args["model"]), *flags, "--served-model-name", "m",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]


def vllm_command(args: dict[str, Any], port: int) -> list[str]:
    return harness.vllm_serve_command(args, "m", port)


def one_round(name: str, command: list[str], sig: signal.Signals, log_dir: Path, index: int) -> dict[str, Any]:
    port = int(command[command.index("--port") + 1])
    url = f"http://127.0.0.1:{port}"
    log_path = log_dir / f"{name}_{sig.name}_{index}.log"
    with open(log_path, "wb") as log:
        log.write((" ".join(shlex.quote(c) for c in command) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(command, cwd=harness.ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            harness.wait_healthy(url, proc, timeout_s=400)
            answer = httpx.post(f"{url}/v1/completions", timeout=120, trust_env=False,
                                json={"model": "m", "prompt": "hello", "max_tokens": 4, "ignore_eos": True})
            answer.raise_for_status()
            tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
            began = time.monotonic()
            proc.send_signal(sig)
            status = proc.wait(120)
            returned = time.monotonic() - began
            gone_at = _all_gone(tree, deadline=began + 120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    text = log_path.read_text(errors="replace")
    return {
        "server": name, "signal": sig.name, "round": index, "status": status,
        "returned_s": round(returned, 2),
        "all_gone_s": None if gone_at is None else round(gone_at - began, 2),
        "processes": len(tree), "traceback": "Traceback" in text,
    }  # fmt: skip


def _all_gone(pids: list[int], deadline: float) -> float | None:
    """When the last of ``pids`` exited (polled every 20 ms), or None at the deadline."""
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return time.monotonic()
        time.sleep(0.02)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_target_arguments(parser)
    harness.add_run_arguments(parser, gpu_mem=0.4, procs=None, budget_s=900)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each server and signal")
    args = parser.parse_args()
    deadline, log_dir = harness.start_run(args, "exit_time")
    engine_args = harness.engine_args(args.model_dir, harness.json.loads(args.engine_args),
                                      gpu_memory_utilization=args.gpu_mem)
    builders = {"lylm": lylm_command, "vllm": vllm_command}
    rows: list[dict[str, Any]] = []
    plan = [(r, sig, name) for r in range(args.rounds) for sig in (signal.SIGINT, signal.SIGTERM)
            for name in (("lylm", "vllm") if (r + sig) % 2 == 0 else ("vllm", "lylm"))]
    progress = harness.Progress(len(plan), "exit_time")
    for r, sig, name in plan:
        if deadline.left() < 90:
            print(f"budget spent: {len(rows)} of {len(plan)} rounds run", flush=True)
            break
        row = one_round(name, builders[name](engine_args, harness.free_port()), sig, log_dir, r)
        rows.append(row)
        progress.step(f"{name} {sig.name}: returned {row['returned_s']} s, all gone {row['all_gone_s']} s")

    lines = ["| signal | server | rounds | returned (median s) | all processes gone (median s) | exit status | traceback |",
             "|---|---|---|---|---|---|---|"]
    summary: dict[str, Any] = {}
    for sig in ("SIGINT", "SIGTERM"):
        for name in ("lylm", "vllm"):
            mine = [x for x in rows if x["server"] == name and x["signal"] == sig]
            if not mine:
                continue
            returned = median([x["returned_s"] for x in mine])
            gone = median([x["all_gone_s"] for x in mine])
            summary[f"{name}_{sig}"] = {"returned_s": returned, "all_gone_s": gone}
            lines.append(f"| {sig} | {name} | {len(mine)} | {fmt(returned, '.1f')} | {fmt(gone, '.1f')} | "
                         f"{sorted({x['status'] for x in mine})} | {any(x['traceback'] for x in mine)} |")
    md = "\n".join(lines) + "\n"
    print(md, flush=True)
    harness.save_results(args.out, {"rows": rows, "summary": summary,
                                    "commands": {k: b(engine_args, 0) for k, b in builders.items()}}, md, log_dir,
                         engine_args=engine_args, sampling={"max_tokens": 4, "ignore_eos": True},
                         client={"requests": 1, "client": "httpx, one request before the signal"})


if __name__ == "__main__":
    main()
