"""A server killed outright (SIGKILL), or stopped while an engine restarts, leaves no
process behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from _server import ServerProcess, metric
from lylm.testing import TINY_MODEL_ENGINE_ARGS, build_tiny_model

MODEL = "tiny"

# A stand-in server: starts two sleepers, has the reaper watch both, forgets one
# (as after a proper shutdown), reports the pids and waits to be killed.
FAKE_SERVER = textwrap.dedent(
    """
    import json, subprocess, sys, time
    import psutil
    from lylm.engines._watchdog import REAPER

    sleepers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in range(2)]
    handles = [psutil.Process(p.pid) for p in sleepers]
    REAPER.watch(handles)
    REAPER.forget(handles[1:])
    print(json.dumps([p.pid for p in sleepers]), flush=True)
    time.sleep(120)
    """
)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(condition: object, timeout: float) -> float:
    start = time.monotonic()
    while not condition():  # type: ignore[operator]
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def test_the_watched_processes_of_a_killed_server_are_reaped_and_only_those() -> None:
    server = subprocess.Popen([sys.executable, "-c", FAKE_SERVER], stdout=subprocess.PIPE, text=True)
    watched = forgotten = -1
    try:
        watched, forgotten = json.loads(server.stdout.readline())  # type: ignore[union-attr]
        assert not gone(watched) and not gone(forgotten)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        took = wait_until(lambda: gone(watched), timeout=10)
        print(f"\nwatched process reaped {took:.2f} s after its server was killed")
        assert not gone(forgotten)  # stopped watching: left alone
    finally:
        server.kill()
        server.wait(timeout=10)
        server.stdout.close()  # type: ignore[union-attr]
        for pid in (watched, forgotten):
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


POOL_SERVER = textwrap.dedent(
    """
    import json, sys, anyio
    import psutil
    from lylm import EnginePool

    async def main():
        config = json.loads(sys.argv[1])
        async with EnginePool.from_config(config) as pool:
            (inst,) = pool.instances("tiny")
            core = psutil.Process(inst.engine.process_ids()[0])
            print(json.dumps([core.pid] + [c.pid for c in core.children(recursive=True)]), flush=True)
            await anyio.sleep(300)

    if __name__ == "__main__":
        anyio.run(main)
    """
)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
@pytest.mark.engines
def test_sigkill_of_a_pool_process_leaves_no_engine_behind(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    model = build_tiny_model(tmp_path / "tiny")
    config = {"models": {"tiny": [{"engine_args": {"model": str(model), **TINY_MODEL_ENGINE_ARGS}}]}}
    script = tmp_path / "pool_server.py"
    script.write_text(POOL_SERVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    server = subprocess.Popen(
        [sys.executable, str(script), json.dumps(config)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    engine_pids: list[int] = []
    try:
        # vLLM logs to stdout too: the pids are the line that is a JSON list.
        for line in server.stdout:  # type: ignore[union-attr]
            if line.startswith("["):
                engine_pids = json.loads(line)
                break
        assert engine_pids, "the pool process exited before its engine was up"
        assert len(engine_pids) >= 2  # the engine core and its worker
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        took = wait_until(lambda: all(gone(pid) for pid in engine_pids), timeout=15)
        print(f"\nengine core and worker gone {took:.2f} s after SIGKILL of the pool's process")
    finally:
        server.kill()
        server.wait(timeout=10)
        server.stdout.close()  # type: ignore[union-attr]
        for pid in engine_pids:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


# -- the real server (lylm serve), killed or stopped at the worst moments ---------


def survivors(mark: str) -> list[str]:
    """Live processes (other than this one) started with LYLM_TEST_MARK=mark: the
    server and everything it spawned, wherever they were re-parented."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid != os.getpid() and process.status() != psutil.STATUS_ZOMBIE:
                if process.environ().get("LYLM_TEST_MARK") == mark:
                    found.append(f"{process.pid} {process.name()}")
    return found


def engine_cores(server: ServerProcess) -> list[psutil.Process]:
    return [p for p in psutil.Process(server.proc.pid).children(recursive=True) if "EngineCore" in p.name()]


def one_engine_server(tmp_path: Path, *args: str, workers: int = 1) -> tuple[ServerProcess, str]:
    model = build_tiny_model(tmp_path / "tiny")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"models": {MODEL: [{"engine_args": {"model": str(model), **TINY_MODEL_ENGINE_ARGS}}]}}))
    mark = uuid.uuid4().hex
    env = {"LYLM_TEST_MARK": mark, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    server = ServerProcess("--config", str(config), *args, env=env, log=tmp_path / "serve.log", workers=workers)
    return server, mark


def stream_forever(url: str, stop: threading.Event) -> None:
    body = {"model": MODEL, "prompt": "load", "max_tokens": 200, "stream": True}
    while not stop.is_set():
        with contextlib.suppress(httpx.HTTPError):
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
                for _ in response.iter_bytes():
                    if stop.is_set():
                        break


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
@pytest.mark.engines
def test_sigkill_of_the_server_under_load_leaves_no_process(tmp_path: Path) -> None:
    # Issue 15, item 1: the OOM killer's (and orchestrators') signal, with streams running.
    pytest.importorskip("vllm")
    server, mark = one_engine_server(tmp_path)
    stop = threading.Event()
    clients = [threading.Thread(target=stream_forever, args=(server.url, stop), daemon=True) for _ in range(4)]
    try:
        server.wait_ready(timeout=240)
        for client in clients:
            client.start()
        wait_until(lambda: sum(metric(server.url, "lylm_in_flight_requests").values()) >= 2, timeout=60)
        assert len(survivors(mark)) >= 3  # the server, the engine core, its worker (and helpers)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        took = wait_until(lambda: not survivors(mark), timeout=20)
        print(f"\nnothing left {took:.2f} s after SIGKILL of the server under load")
    finally:
        stop.set()
        server.stop()
        for client in clients:
            client.join(30)
        kill_marked(mark)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("workers", [1, 2], ids=["1 worker", "2 workers"])
@pytest.mark.engines
def test_sigterm_while_an_engine_restarts_leaves_no_process(tmp_path: Path, workers: int) -> None:
    # Issue 15, item 2: the engine being started again must stop with the server.
    pytest.importorskip("vllm")
    server, mark = one_engine_server(tmp_path, "--restart-backoff", "0.1", workers=workers)
    try:
        server.wait_ready(timeout=240)
        (first,) = engine_cores(server)
        first.kill()
        # The restart has spawned the new engine core, which is far from ready.
        wait_until(lambda: [p for p in engine_cores(server) if p.pid != first.pid], timeout=60)
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503  # not serving yet
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) != 0
        took = wait_until(lambda: not survivors(mark), timeout=20)
        print(f"\nnothing left {took:.2f} s after the server exited")
    finally:
        server.stop()
        kill_marked(mark)


def kill_marked(mark: str) -> None:
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid != os.getpid() and process.environ().get("LYLM_TEST_MARK") == mark:
                process.kill()
