"""Heartbeat false alarms: how often a healthy remote core is ejected after it attaches under load.

    python benchmarks/heartbeat_alarms.py [--device cpu|gpu] [--heartbeat 1.2] [--attaches 12]
        [--streams 8] [--watch 8] [--perf] [--own-session] [--out PREFIX]

One pool in this process with a local instance and a remote one whose engine core runs
under ``lylm core`` in another process (127.0.0.1). ``--streams`` streams of generations
run the whole time. Each round waits for the remote to attach, watches it for
``--watch`` seconds (a healthy core must stay in: an ejection here is a false alarm, and
its reason says which socket went quiet and when), then SIGKILLs the engine core so that
``lylm core`` starts a new one and the next round watches a fresh attach ("attached after":
seconds from the previous round's end, or from the pool's start). Rounds stop at
``--attaches`` or ``--budget-s``.

``--perf`` records the scheduler (``perf sched record``, root) during each watch and keeps
the recording of a round that had a false alarm, with the worst scheduling delays of the
ZeroMQ I/O threads (``ZMQbg/IO/*``) of every round: whether the threads that send and
answer the pings were kept off a CPU for as long as the heartbeat allows (by the role of
their process: the pool, the local engine, the remote core).

``lylm core`` runs in this process's session (its own process group), as ``lylm core``
runs the engine core; ``--own-session`` gives it a session of its own, as a start from
another login or a service manager would. With Linux's autogroup scheduling on (most
distributions' default) CPU time is shared between sessions first: BENCHMARKS.md 18 has
what that did to a core on a 2-core host whose other session kept both cores busy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import psutil

import harness
from remote_lifecycle import core_command, engine_cores, run_and_save, stop_core_host

MODEL = "m"


def zmq_delays(data: Path, roles: dict[int, str]) -> dict[str, float]:
    """Worst scheduling delay (ms) of the ZeroMQ I/O threads in a ``perf sched``
    recording, by the role of their process (``roles``: pid -> role; worst of each role)."""
    out = subprocess.run(["perf", "sched", "latency", "-p", "-i", str(data)], capture_output=True, text=True).stdout
    delays: dict[str, float] = {}
    for line in out.splitlines():
        match = re.match(r"\s*ZMQbg/IO/\d+:(\d+)\s*\|.*max:\s*([\d.]+) ms", line)
        if match:
            role = roles.get(int(match[1]), "other")
            delays[role] = max(delays.get(role, 0.0), float(match[2]))
    return delays


def thread_roles(host: subprocess.Popen[bytes]) -> dict[int, str]:
    """Thread id -> which side it works for: the pool (this process), the local engine
    (this process's children) or the remote core (``lylm core``'s descendants)."""
    roles: dict[int, str] = {}
    me = psutil.Process()
    remote = {host.pid, *(p.pid for p in psutil.Process(host.pid).children(recursive=True))}
    for process in [me, *me.children(recursive=True)]:
        role = "pool" if process.pid == me.pid else "remote core" if process.pid in remote else "local engine"
        try:
            roles.update({t.id: role for t in process.threads()})
        except psutil.Error:
            continue
    return roles


async def run(args: argparse.Namespace, eargs: dict[str, Any], port: int, log: Path) -> dict[str, Any]:
    from vllm import SamplingParams

    from lylm import EnginePool, RestartPolicy

    config = {"models": {MODEL: [
        {"engine_args": eargs, "devices": harness.devices()},
        {"engine_args": eargs, "remote": {"address": "127.0.0.1", "port": port, "timeout": 60,
                                          "heartbeat": args.heartbeat}},
    ]}}
    restart = RestartPolicy(initial_backoff=0.1, jitter=0)
    rounds: list[dict[str, Any]] = []
    probes = 0
    not_attached: list[dict[str, Any]] = []
    outcomes: dict[str, int] = {}
    with open(log, "ab") as out:
        host = subprocess.Popen(core_command(eargs, port), stdout=out, stderr=subprocess.STDOUT,
                                # Its own process group, in this session; --own-session: a session of
                                # its own, as a core started from another login would be.
                                start_new_session=args.own_session, process_group=None if args.own_session else 0,
                                env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"} if harness.DEVICE == "gpu" else None)
    began = time.monotonic()
    try:
        async with EnginePool.from_config(config, restart=restart, health_interval=0.1) as pool:
            _, remote = pool.instances(MODEL)
            params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
            stop = anyio.Event()

            async def one() -> None:
                while not stop.is_set():
                    try:
                        last = None
                        async for last in pool.generate(MODEL, [9, 10, 11, 12], params):
                            pass
                        # A stream that ends without its final output would be a silent truncation.
                        ended = "completed" if last is not None and last.finished else "ended unfinished"
                        outcomes[ended] = outcomes.get(ended, 0) + 1
                    except Exception as exc:
                        outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1

            async with anyio.create_task_group() as tg:
                for _ in range(args.streams):
                    tg.start_soon(one)
                waiting = time.monotonic()
                while len(rounds) < args.attaches and time.monotonic() - began < args.budget_s:
                    # Up to the budget's end (and two minutes more) for the next attach.
                    with anyio.move_on_after(max(60.0, args.budget_s - (time.monotonic() - began) + 120)):
                        while remote.state != "healthy":
                            await anyio.sleep(0.01)
                    attached = time.monotonic()
                    if remote.state != "healthy":
                        unattached = {"round": len(rounds), "attached": False,
                                      "waited_s": round(attached - waiting, 1)}
                        print(json.dumps(unattached), flush=True)
                        not_attached.append(unattached)
                        break
                    to_attach = attached - waiting
                    recorder = None
                    data = Path(f"{args.out}_perf_{len(rounds)}.data")
                    if args.perf:
                        recorder = subprocess.Popen(["perf", "sched", "record", "-o", str(data), "--", "sleep",
                                                     str(args.watch)], stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL)
                    roles = thread_roles(host)
                    if not rounds:  # connections that are not ZeroMQ must not eject it
                        probes = await anyio.to_thread.run_sync(probe_strays, remote)
                    ejected = None
                    while time.monotonic() - attached < args.watch:
                        if remote.state != "healthy":
                            ejected = time.monotonic() - attached
                            break
                        await anyio.sleep(0.01)
                    watch = remote.engine.link._disconnects
                    entry: dict[str, Any] = {"round": len(rounds), "false_alarm": ejected is not None,
                                             "strays": getattr(watch, "strays", None),
                                             "attach_s": round(to_attach, 1)}
                    if ejected is not None:
                        entry.update(ejected_after_s=round(ejected, 3), reason=remote.last_error)
                    if recorder is not None:
                        await anyio.to_thread.run_sync(recorder.wait)
                        entry["zmq_io_max_delay_ms"] = await anyio.to_thread.run_sync(zmq_delays, data, roles)
                        if ejected is None:
                            data.unlink(missing_ok=True)
                    rounds.append(entry)
                    print(json.dumps(entry), flush=True)
                    if ejected is None:  # a new attach for the next round
                        for core in engine_cores(host):
                            core.kill()
                        with anyio.fail_after(30):
                            while remote.state == "healthy":
                                await anyio.sleep(0.01)
                    waiting = time.monotonic()
                stop.set()
    finally:
        stop_core_host(host)
    alarms = [r for r in rounds if r["false_alarm"]]
    stray = {"made": probes, "counted": rounds[0]["strays"] if rounds else None,
             "ejected": bool(rounds and rounds[0]["false_alarm"])}
    return {"heartbeat_s": args.heartbeat, "streams": args.streams, "watch_s": args.watch,
            "core_session": "its own" if args.own_session else "the pool's", "autogroup": autogroup(),
            "attaches": len(rounds), "false_alarms": len(alarms), "rounds": rounds, "not_attached": not_attached,
            "outcomes": outcomes, "stray_connections_round_0": stray,
            "host_cpus": os.cpu_count()}


def probe_strays(remote: Any) -> int:
    """Connect to the front end's engine-core ports of ``remote`` and close at once (as a port
    scanner does); returns how many connections were made."""
    import socket

    import zmq

    resources = remote.engine._llm.engine_core.resources
    made = 0
    for sock in (resources.input_socket, resources.output_socket):
        host, port = sock.getsockopt(zmq.LAST_ENDPOINT).decode().removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5):
            made += 1
    return made


def autogroup() -> bool | None:
    """Whether Linux's autogroup scheduling is on (None: not Linux, or not known)."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return None


def table(result: dict[str, Any]) -> str:
    grouping = {True: "on", False: "off"}.get(result["autogroup"], "unknown")
    lines = [f"heartbeat {result['heartbeat_s']:g} s, {result['streams']} streams, each attach watched "
             f"{result['watch_s']:g} s, the core in {result['core_session']} session, autogroup {grouping}: "
             f"**{result['false_alarms']} false alarms in {result['attaches']} attaches**",
             "", "| round | attached after | ejected after | reason | worst scheduling delay of a ZeroMQ I/O thread (ms) |",
             "|---:|---:|---:|---|---|"]
    for r in result["rounds"]:
        delays = r.get("zmq_io_max_delay_ms") or {}
        worst = ", ".join(f"{role} {ms:.0f}" for role, ms in sorted(delays.items()))
        after = f"{r['ejected_after_s']:.2f} s" if r["false_alarm"] else "-"
        lines.append(f"| {r['round']} | {r['attach_s']:.1f} s | {after} | {r.get('reason') or ''} | {worst} |")
    for r in result["not_attached"]:
        lines.append(f"| {r['round']} | not within {r['waited_s']:.0f} s | | | |")
    lines.append(f"\nrequests: {result['outcomes']}")
    lines.append(f"stray (non-ZeroMQ) connections to the engine-core ports in round 0: "
                 f"{result['stray_connections_round_0']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_target_arguments(parser, shape=True)
    parser.add_argument("--gpu-mem", type=float, default=0.4, help="gpu: gpu_memory_utilization of each engine")
    parser.add_argument("--heartbeat", type=float, default=1.2, help="the remote's remote.heartbeat")
    parser.add_argument("--attaches", type=int, default=12, help="rounds (attaches watched)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--watch", type=float, default=8.0, help="seconds each attach is watched")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no round after this")
    parser.add_argument("--perf", action="store_true", help="record the scheduler during each watch (perf, root)")
    parser.add_argument("--own-session", action="store_true",
                        help="start lylm core in a session of its own (Linux's autogroup then schedules it apart)")
    parser.add_argument("--out", default=None, help="result prefix (default: benchmarks/results/heartbeat_alarms_<shape>)")
    run_and_save(parser, run, table, "heartbeat_alarms")


if __name__ == "__main__":  # vLLM spawns engine processes: the guard is required
    main()
