"""Hostile clients against the demo server: what each costs the server (issue 15).

    python benchmarks/hostile.py [--device cpu|gpu] [--model-dir DIR] [--shape NAME] [--engine-args JSON] \
        [--gpu-mem 0.4] [--root DIR] [--label NAME] [--slow 300] [--window 30] [--out PREFIX]

Starts ``lylm serve`` from ``--root`` (default: this checkout; pass a ``git worktree``
of an older commit to measure it the same way) with the embedded demo's pool on the
target: two instances of the target's model (``--device cpu``, the default without a
GPU: the tiny model on the CPU build, context 1,024, exactly the demo; ``--device gpu
--model-dir DIR``: both on GPU 0, ``gpu_memory_utilization`` = ``--gpu-mem`` each). A
checkout from before the ``lylm`` command served the demo with ``examples/serve.py``,
which takes no config: that is started as it is, CPU only. Then, one after another:

- ``token_ids``: a completions request of 3.5M token ids (7 MB);
- ``chat``: a chat request of 1,024 messages (7.2 MB, ~1.4M tokens);
- ``header``: one connection sending a 64 MB header block (bytes the server read
  before it closed the connection, and its answer);
- ``slow_heads``: ``--slow`` connections sending a request head at a byte a second
  for ``--window`` seconds (how many the server still holds at the end, and when it
  had closed them all).

For each: the answer and how long it took, the worst ``/health`` latency meanwhile
(a stalled event loop shows there), and the server's RSS after. Results go through
``harness.save_results`` to OUT.json (provenance block first; ``served_commit`` is the
commit of ``--root``, which the server ran), OUT.md and OUT_logs.tar.gz (the server's log);
default OUT: ``results/hostile_<label>`` on cpu, ``results/gpu/hostile_<label>_<shape>`` on gpu.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil

import harness

HERE = Path(__file__).resolve().parent
DEMO_MODEL = "lylm-tiny-demo"
DEMO_WEIGHTS = (1, 2)


@contextmanager
def demo_server(root: Path, config: Path | None, log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``lylm serve --config CONFIG`` from ``root`` (``config`` None: an old checkout's examples/serve.py)."""
    port = harness.free_port()
    env = {**os.environ, "PYTHONPATH": str(root)}
    if config is None:
        command = [str(root / "examples" / "serve.py"), "--port", str(port)]
    else:
        command = ["-m", "lylm", "serve", "--config", str(config), "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *command],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start; see {log}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            yield url, proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def health_probe(url: str) -> Iterator[list[float]]:
    """Latencies of /health, asked every 20 ms while the block runs."""
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                began = time.monotonic()
                client.get(f"{url}/health")
                latencies.append(time.monotonic() - began)
                stop.wait(0.02)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    time.sleep(0.3)
    try:
        yield latencies
    finally:
        time.sleep(0.3)
        stop.set()
        thread.join(130)


def rss_mib(proc: subprocess.Popen[bytes]) -> float:
    return round(psutil.Process(proc.pid).memory_info().rss / 2**20, 1)


def post(url: str, path: str, body: bytes) -> dict[str, Any]:
    began = time.monotonic()
    r = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=300)
    took = time.monotonic() - began
    code = r.json().get("error", {}).get("code") if r.status_code >= 400 else None
    return {"status": r.status_code, "code": code, "seconds": round(took, 3), "body_mb": round(len(body) / 1e6, 2)}


def token_ids(url: str, model: str) -> dict[str, Any]:
    ids = ",".join(["7"] * 3_500_000)
    return post(url, "/v1/completions", f'{{"model": "{model}", "prompt": [{ids}], "max_tokens": 1}}'.encode())


def chat(url: str, model: str) -> dict[str, Any]:
    roles = ("user", "assistant")
    messages = [{"role": roles[i % 2], "content": "word " * 1400} for i in range(1024)]
    return post(url, "/v1/chat/completions", json.dumps({"model": model, "messages": messages, "max_tokens": 1}).encode())


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def header(url: str) -> dict[str, Any]:
    began = time.monotonic()
    sock = socket.create_connection(_address(url), timeout=30)
    sent = 0
    block = (b"x-filler: " + b"a" * 1000 + b"\r\n") * 64
    answer = b""
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        while sent < 64 * 1024 * 1024:
            sock.sendall(block)
            sent += len(block)
        sock.sendall(b"\r\n")
    except OSError:  # the server closed the connection: it stopped reading
        pass
    try:
        while chunk := sock.recv(65536):  # until the server closes (keep-alive: 5 s idle)
            answer += chunk
    except OSError:
        pass
    finally:
        sock.close()
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    return {"status": status, "sent_mb": round(sent / 2**20, 1), "seconds": round(time.monotonic() - began, 3)}


def slow_heads(url: str, model: str, count: int, window: float) -> dict[str, Any]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(_address(url), timeout=5)
        sock.setblocking(False)
        socks.append(sock)
    head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n" + b"x-slow: " + b"a" * 1000
    began = time.monotonic()
    position = 0
    open_ = set(range(count))
    all_closed: float | None = None
    normal: list[float] = []
    while time.monotonic() - began < window:
        for i in list(open_):
            try:
                socks[i].recv(65536)  # an answer (a 408) or the end: the server let go of it
                open_.discard(i)
                continue
            except BlockingIOError:
                pass  # still held
            except OSError:
                open_.discard(i)
                continue
            try:
                socks[i].send(head[position % len(head) : position % len(head) + 1])
            except OSError:
                open_.discard(i)
        if not open_ and all_closed is None:
            all_closed = time.monotonic() - began
        position += 1
        t = time.monotonic()
        httpx.post(url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 4}, timeout=60)
        normal.append(time.monotonic() - t)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))
    for sock in socks:
        sock.close()
    normal.sort()
    return {
        "connections": count,
        "window_s": window,
        "still_open_at_end": len(open_),
        "all_closed_after_s": None if all_closed is None else round(all_closed, 1),
        "normal_request_p50_s": round(normal[len(normal) // 2], 3),
        "normal_request_max_s": round(normal[-1], 3),
    }


def measure(name: str, run: Callable[[], dict[str, Any]], url: str, proc: subprocess.Popen[bytes],
            progress: harness.Progress) -> dict[str, Any]:
    with health_probe(url) as latencies:
        result = run()
    result["health_worst_s"] = round(max(latencies), 3)
    result["server_rss_mib"] = rss_mib(proc)
    print(f"{name}: {result}", flush=True)
    progress.step(name)
    return result


def table(results: dict[str, Any]) -> str:
    lines = ["| client | answer | seconds | worst /health s | server RSS MiB after | more |",
             "|---|---|---|---|---|---|"]
    for name in ("token_ids", "chat", "header", "slow_heads"):
        r = dict(results[name])
        answer = f"{r.pop('status', '-')} {r.pop('code', '') or ''}".strip()
        seconds = r.pop("seconds", "-")
        health, rss = r.pop("health_worst_s"), r.pop("server_rss_mib")
        more = ", ".join(f"{k} {v}" for k, v in r.items())
        lines.append(f"| {name} | {answer} | {seconds} | {health} | {rss} | {more} |")
    return f"Served commit {results['served_commit'][:10]}; idle RSS {results['idle_rss_mib']} MiB.\n\n" + \
        "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_target_arguments(parser)
    parser.add_argument("--gpu-mem", type=float, default=0.4, help="gpu: gpu_memory_utilization of each instance")
    parser.add_argument("--root", type=Path, default=HERE.parent, help="the lylm checkout to serve from")
    parser.add_argument("--label", default="now")
    parser.add_argument("--slow", type=int, default=300, help="slow connections")
    parser.add_argument("--window", type=float, default=30.0, help="seconds the slow connections dribble")
    parser.add_argument("--out", default=None, help="result prefix (default: results/hostile_<label>; "
                                                    "gpu: results/gpu/hostile_<label>_<shape>)")
    args = parser.parse_args()
    harness.resolve_target(args)
    root = args.root.resolve()
    if args.out is None:
        gpu = harness.BENCH / "results" / "gpu" / f"hostile_{args.label}_{args.shape}"
        args.out = str(harness.BENCH / "results" / f"hostile_{args.label}" if args.device == "cpu" else gpu)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    served_commit = git.stdout.strip()
    log_dir = Path(tempfile.mkdtemp(prefix=f"lylm-hostile-{args.label}-"))
    eargs: dict[str, Any] | None = harness.engine_args(
        args.model_dir, json.loads(args.engine_args), gpu_memory_utilization=args.gpu_mem
    )
    model = DEMO_MODEL if args.device == "cpu" else args.shape
    config: Path | None = None
    if (root / "lylm" / "cli.py").exists():
        instances = [{"devices": harness.devices(weight=w), "engine_args": eargs} for w in DEMO_WEIGHTS]
        config = harness.write_lylm_config(log_dir / "lylm.json", model, instances)
        server = "lylm serve --config (the demo's pool: two instances, weights 1:2)"
    else:
        if args.device != "cpu":
            raise SystemExit(f"{root} predates `lylm serve`: its examples/serve.py serves the CPU demo only "
                             "(run it with --device cpu)")
        model, eargs = DEMO_MODEL, None  # its own demo; its engine args are that checkout's
        server = "examples/serve.py (the embedded demo: 2 CPU engines, tiny model)"
    results: dict[str, Any] = {
        "served_commit": served_commit,
        "label": args.label,
        "root": "this checkout" if root == HERE.parent.resolve() else root.name,
        "server": server + ", 1 process",
        "settings": {"slow": args.slow, "window_s": args.window, "shape": args.shape, "model_dir": args.model_dir},
    }
    progress = harness.Progress(4, "hostile")
    log = log_dir / "server.log"
    with demo_server(root, config, log) as (url, proc):
        results["idle_rss_mib"] = rss_mib(proc)
        results["token_ids"] = measure("token_ids", lambda: token_ids(url, model), url, proc, progress)
        results["chat"] = measure("chat", lambda: chat(url, model), url, proc, progress)
        results["header"] = measure("header", lambda: header(url), url, proc, progress)
        results["slow_heads"] = measure("slow_heads", lambda: slow_heads(url, model, args.slow, args.window),
                                        url, proc, progress)
    md = table(results)
    print(md)
    sampling = {"max_tokens": 1, "slow_heads_requests": {"prompt": "hi", "max_tokens": 4}}
    client = {"kind": "hostile clients one after another (httpx and raw sockets), /health probed every 20 ms",
              "token_ids": 3_500_000, "chat_messages": 1024, "header_mib": 64,
              "slow_connections": args.slow, "slow_window_s": args.window}
    harness.save_results(args.out, results, md, log_dir, engine_args=eargs, sampling=sampling, client=client)
    print(f"wrote {args.out}.json")


if __name__ == "__main__":
    main()
