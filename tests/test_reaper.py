"""A server killed outright (SIGKILL) leaves no engine process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from lylm.testing import TINY_MODEL_ENGINE_ARGS, build_tiny_model

# A stand-in server: starts two sleepers, has the reaper watch both, forgets one
# (as after a proper shutdown), reports the pids and waits to be killed.
FAKE_SERVER = textwrap.dedent(
    """
    import json, subprocess, sys, time
    import psutil
    from lylm._reaper import REAPER

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
