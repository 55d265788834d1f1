"""A server with front-end workers under load: one worker SIGKILLed, then the hub SIGSTOPped.

    python benchmarks/worker_faults.py [--device cpu|gpu] [--model-dir DIR] [--shape qwen2.5-1.5b] \
        [--workers 4] [--streams 64] [--max-tokens 256] [--prompt-len 128] [--stop-s 5] [--out PREFIX]

``lylm serve --workers N`` over one engine (GPU 0; ``--device cpu``: the tiny model on the
CPU build), a closed loop of ``--streams`` streamed completions (each ends, the next
starts), and two faults, each in its own phase of ``--phase-s`` seconds:

1. **a worker SIGKILLed** ``--fault-at`` seconds into the phase: the requests that failed
   (the dead worker's streams, cut), those served meanwhile, and the time from the kill
   until the server's ``lylm_workers_serving`` is back to N (its replacement serves);
2. **the hub SIGSTOPped** (the main process) for ``--stop-s`` seconds: how new requests
   are answered meanwhile (503 ``hub_unavailable`` with Retry-After, from about a second
   in), whether the streams already running go on (their tokens never pass the hub),
   and how soon requests are served again after SIGCONT.

After each phase the load stops and the server's books must come back to zero requests in
flight. Every request is timed from its start (status, time to first token, end, error);
the result file keeps them all. The client is one asyncio process with httpx (its CPU
share is recorded): a fault-behaviour run, not a throughput comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import time
from typing import Any

import httpx
import psutil

import harness

NAME = "m"


def gauge(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def total(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def workers_of(server_pid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(server_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            line = " ".join(p.cmdline())
            if "spawn_main" in line and "resource_tracker" not in line:
                out.append(p)
    return out


async def closed_loop(url: str, streams: int, body: dict[str, Any], until: float, t0: float,
                      records: list[dict[str, Any]]) -> None:
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits) as client:

        async def one_stream() -> None:
            while time.monotonic() < until:
                rec: dict[str, Any] = {"start": time.monotonic() - t0, "status": None, "ttft": None,
                                       "end": None, "error": None, "done": False}
                records.append(rec)
                try:
                    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                        rec["status"] = r.status_code
                        if r.status_code != 200:
                            rec["error"] = (await r.aread()).decode(errors="replace")[:200]
                            rec["retry_after"] = r.headers.get("retry-after")
                        else:
                            async for line in r.aiter_lines():
                                if line.startswith("data: ") and rec["ttft"] is None:
                                    rec["ttft"] = time.monotonic() - t0 - rec["start"]
                                if line == "data: [DONE]":
                                    rec["done"] = True
                except httpx.HTTPError as exc:
                    rec["error"] = type(exc).__name__
                rec["end"] = time.monotonic() - t0
                if rec["status"] != 200:
                    await asyncio.sleep(0.05)  # a refused request is retried after a pause, not in a spin

        await asyncio.gather(*(one_stream() for _ in range(streams)))


async def watch(url: str, t0: float, until: float, samples: list[dict[str, Any]]) -> None:
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < until:
            sample: dict[str, Any] = {"t": time.monotonic() - t0}
            try:
                r = await client.get(f"{url}/metrics")
                sample["status"] = r.status_code
                if r.status_code == 200:
                    sample["serving"] = gauge(r.text, "lylm_workers_serving")
                    sample["replaced"] = gauge(r.text, "lylm_worker_replacements_total")
                    sample["in_flight"] = total(r.text, "lylm_in_flight_requests")
            except httpx.HTTPError as exc:
                sample["status"] = type(exc).__name__
            samples.append(sample)
            await asyncio.sleep(0.1)


async def phase(url: str, args: argparse.Namespace, server_pid: int, fault: str) -> dict[str, Any]:
    body = {"model": NAME, "prompt": list(range(1, args.prompt_len + 1)), "max_tokens": args.max_tokens,
            "ignore_eos": True, "stream": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    records: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    until = t0 + args.phase_s
    cpu0 = time.process_time()

    async def inject() -> dict[str, Any]:
        await asyncio.sleep(args.fault_at)
        event: dict[str, Any] = {"at": time.monotonic() - t0}
        if fault == "kill":
            victim = workers_of(server_pid)[0]
            event["pid"] = victim.pid
            victim.kill()
        else:
            os.kill(server_pid, signal.SIGSTOP)
            await asyncio.sleep(args.stop_s)
            os.kill(server_pid, signal.SIGCONT)
            event["resumed"] = time.monotonic() - t0
        return event

    loop_task = asyncio.ensure_future(closed_loop(url, args.streams, body, until, t0, records))
    watch_task = asyncio.ensure_future(watch(url, t0, until + 15, samples))
    event = await inject()
    await loop_task
    # Idle: the books come back to zero.
    settle = time.monotonic()
    in_flight = None
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() - settle < 15:
            r = await client.get(f"{url}/metrics")
            if r.status_code == 200:
                in_flight = total(r.text, "lylm_in_flight_requests")
                reconciled = gauge(r.text, "lylm_hub_reconciled_bookings_total")
                if in_flight == 0:
                    break
            await asyncio.sleep(0.1)
    watch_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watch_task
    return {"fault": fault, "event": event, "records": records, "samples": samples,
            "in_flight_after": in_flight, "reconciled_after": reconciled,
            "client_cpu_share": (time.process_time() - cpu0) / max(time.monotonic() - t0, 1e-9)}


def summarize(result: dict[str, Any], workers: int) -> dict[str, Any]:
    event, records, samples = result["event"], result["records"], result["samples"]
    at = event["at"]
    ok = [r for r in records if r["status"] == 200 and r["done"]]
    failed = [r for r in records if not (r["status"] == 200 and r["done"])]
    out: dict[str, Any] = {
        "requests": len(records), "completed": len(ok), "not_completed": len(failed),
        "errors": {}, "in_flight_after": result["in_flight_after"], "reconciled": result["reconciled_after"],
        "client_cpu_share": round(result["client_cpu_share"], 2),
    }
    for r in failed:
        key = f"{r['status']} {r['error'][:60] if r['error'] else ''}".strip()
        out["errors"][key] = out["errors"].get(key, 0) + 1
    if result["fault"] == "kill":
        back = next((s["t"] for s in samples if s["t"] > at and s.get("serving") == workers
                     and (s.get("replaced") or 0) >= 1), None)
        out["replacement_serving_after_s"] = None if back is None else round(back - at, 2)
        out["cut_streams"] = sum(1 for r in failed if r["start"] < at and r["status"] == 200)
        out["completed_while_replacing"] = sum(1 for r in ok if at < r["end"] < (back or at))
    else:
        resumed = event["resumed"]
        stopped = [r for r in records if at <= r["start"] < resumed]
        refusals = [r for r in stopped if r["status"] == 503]
        out["started_while_stopped"] = len(stopped)
        out["refused_503"] = len(refusals)
        out["first_503_after_s"] = round(min((r["end"] for r in refusals), default=float("nan")) - at, 2)
        out["retry_after"] = sorted({r.get("retry_after") for r in refusals if r.get("retry_after")})
        running = [r for r in records if r["start"] < at and r["status"] == 200]
        out["streams_running_at_stop"] = len(running)
        out["of_those_completed"] = sum(1 for r in running if r["done"])
        served_again = [r["end"] for r in ok if r["start"] >= resumed]
        first_ok = min((r["start"] + (r["ttft"] or 0) for r in ok if r["start"] >= resumed), default=None)
        out["first_token_after_resume_s"] = None if first_ok is None else round(first_ok - resumed, 2)
        out["served_after_resume"] = len(served_again)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_target_arguments(parser)
    harness.add_run_arguments(parser, gpu_mem=0.5, procs=1)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--phase-s", type=float, default=25.0)
    parser.add_argument("--fault-at", type=float, default=5.0)
    parser.add_argument("--stop-s", type=float, default=5.0)
    args = parser.parse_args()
    _, log_dir = harness.start_run(args, "worker_faults")
    eargs = harness.engine_args(args.model_dir, json.loads(args.engine_args), gpu_memory_utilization=args.gpu_mem)
    config = harness.write_lylm_config(log_dir / "lylm.json", NAME, [{"devices": harness.devices(), "engine_args": eargs}])
    port = harness.free_port()
    command = [*harness.lylm_serve_command(config, port), "--workers", str(args.workers)]
    phases = {}
    with harness.server("lylm", command, log_dir, port) as url:
        server_pid = next(p.pid for p in psutil.Process().children() if str(port) in " ".join(p.cmdline()))
        deadline = time.monotonic() + 180
        while gauge(httpx.get(f"{url}/metrics").text, "lylm_workers_serving") != args.workers:
            if time.monotonic() > deadline:
                raise SystemExit("not every worker serves")
            time.sleep(0.5)
        for fault in ("kill", "stop"):
            result = asyncio.run(phase(url, args, server_pid, fault))
            phases[fault] = {"summary": summarize(result, args.workers), **result}
            print(f"[{fault}] {json.dumps(phases[fault]['summary'])}", flush=True)
    md = "\n".join(f"- {fault}: {json.dumps(p['summary'])}" for fault, p in phases.items()) + "\n"
    sampling = {"prompt": f"{args.prompt_len} token ids", "max_tokens": args.max_tokens, "ignore_eos": True,
                "stream": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    client = {"kind": "one asyncio process, httpx, closed loop", "streams": args.streams,
              "phase_s": args.phase_s, "fault_at_s": args.fault_at, "stop_s": args.stop_s}
    harness.save_results(args.out, {"settings": vars(args), "phases": phases}, md, log_dir,
                         engine_args=eargs, sampling=sampling, client=client)


if __name__ == "__main__":
    main()
