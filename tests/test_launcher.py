"""The one launcher: device variables under parallel starts, the spawn window, the start guard.

A stand-in platform (its own device variable and device count) and a stand-in spawner
(a real child process, ``/bin/sh``, that reports the device variable it was spawned
with) drive the real launcher: its lock, its environment snapshot, its guard.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from collections.abc import Mapping
from typing import Any

import psutil
import pytest

from lylm import ConfigError, EngineDeadError, EngineStartError
from lylm.engines._launcher import DevicePlatform, Launcher, StartGuard

VAR = "LYLM_TEST_VISIBLE_DEVICES"


class ShellCore:
    """A spawned stand-in engine core: ``/bin/sh`` printing the device variable it inherited
    (the environment a child copies at spawn), then waiting until told to finish loading."""

    def __init__(self, loading: threading.Event | None = None) -> None:
        self._loading = loading
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", f'printf "%s" "${{{VAR}-unset}}"; read _'],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.pids = [self.proc.pid]
        self.stopped = False

    def wait(self) -> str:
        # The long part of a real start (weights, profiling, compiling), outside the lock.
        if self._loading is not None:
            self._loading.wait(60)
        else:
            time.sleep(random.uniform(0, 0.003))
        assert self.proc.stdin is not None and self.proc.stdout is not None
        out, _ = self.proc.communicate(b"\n", timeout=30)
        return out.decode()

    def stop(self) -> None:
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def launcher(environ: Mapping[str, str], count: int | None, **kw: Any) -> Launcher:
    return Launcher(environ=environ, platform=lambda: DevicePlatform(VAR, count), **kw)


def loading_launcher() -> tuple[Launcher, list[ShellCore], threading.Event]:
    """A launcher whose cores keep loading until the event is set; the cores it spawned."""
    loading = threading.Event()
    cores: list[ShellCore] = []

    def spawner(args: Mapping[str, Any], clients: int) -> ShellCore:
        cores.append(ShellCore(loading))
        return cores[-1]

    return launcher({}, 4, spawner=spawner), cores, loading


def wait_until(condition: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert condition()


def start_all(launch: Launcher, gpu_sets: list[tuple[int, ...]]) -> list[Any]:
    """Start one core per GPU set, all at once (a barrier lines the threads up)."""
    barrier = threading.Barrier(len(gpu_sets))
    results: list[Any] = [None] * len(gpu_sets)

    def start(i: int) -> None:
        barrier.wait()
        try:
            results[i] = launch.launch({}, gpu_ids=gpu_sets[i], path=f"m[{i}]", clients=1, guard=StartGuard(f"m[{i}]"))
        except BaseException as exc:  # the assertion below names it
            results[i] = exc

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(gpu_sets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize(
    ("server", "count", "gpu_sets", "expected"),
    [
        # 8 instances on 8 GPUs, the server unrestricted.
        ({}, 8, [(i,) for i in range(8)], [str(i) for i in range(8)]),
        # The server itself started with VAR=4,5,6,7 (of 8): its GPU 0 is physical device 4.
        ({VAR: "4,5,6,7"}, 8, [(0,), (1,), (2,), (3,)], ["4", "5", "6", "7"]),
        ({VAR: "4,5,6,7"}, 8, [(1, 0), (3, 2)], ["5,4", "7,6"]),
    ],
)
def test_parallel_pinned_starts_each_spawn_exactly_their_own_gpus(
    server: dict[str, str], count: int, gpu_sets: list[tuple[int, ...]], expected: list[str]
) -> None:
    """Issue 27's race: each start used to read the device variable outside the spawn lock,
    where another start's temporary value could stand. 100 rounds of parallel starts."""
    saved = os.environ.get(VAR)
    os.environ.update(server)  # the process's real environment, as the server would have it
    try:
        for _ in range(100):
            launch = launcher({**server}, count, spawner=lambda args, clients: ShellCore())
            seen = start_all(launch, gpu_sets)
            assert seen == expected
            assert os.environ.get(VAR) == server.get(VAR)  # restored after every spawn
    finally:
        os.environ.pop(VAR, None)
        if saved is not None:
            os.environ[VAR] = saved


def test_the_environment_is_read_once_under_the_lock_not_from_the_live_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(VAR, "2,3")
    # An engine started earlier in this process may have set vLLM's start method (vLLM does).
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    launch = Launcher(platform=lambda: DevicePlatform(VAR, 4), spawner=lambda args, clients: ShellCore())
    assert launch.launch({}, gpu_ids=(1,), path="p", clients=1, guard=StartGuard("p")) == "3"
    # What another start set for its spawn (or anything later) is not the server's restriction.
    monkeypatch.setenv(VAR, "9")
    assert launch.device_environment((0,), "p") == {VAR: "2", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    with pytest.raises(ConfigError, match=r"p\[0\]: GPU 2 does not exist: LYLM_TEST_VISIBLE_DEVICES=2,3 shows 2"):
        launch.device_environment((2,), "p")


def test_an_unpinned_start_spawns_with_the_servers_environment_untouched() -> None:
    launch = launcher({}, 4, spawner=lambda args, clients: ShellCore())
    assert launch.launch({}, gpu_ids=(), path="p", clients=1, guard=StartGuard("p")) == "unset"
    assert launch.device_environment((), "p") == {}


def test_the_spawn_lock_is_held_only_until_the_engine_process_exists() -> None:
    """Two pinned starts: the second spawns while the first is still loading."""
    launch, cores, loading = loading_launcher()
    guards = [StartGuard("a"), StartGuard("b")]
    results: list[Any] = []
    threads = [
        threading.Thread(
            target=lambda i=i: results.append(launch.launch({}, gpu_ids=(i,), path="p", clients=1, guard=guards[i]))
        )
        for i in range(2)
    ]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(cores) == 2)  # both spawned while both were loading
        assert VAR not in os.environ
    finally:
        loading.set()
        for t in threads:
            t.join(30)
    assert sorted(results) == ["0", "1"]


def test_a_shutdown_during_the_start_stops_the_spawned_process_and_fails_the_start() -> None:
    launch, cores, loading = loading_launcher()
    guard = StartGuard("m[0]")
    outcome: list[BaseException] = []

    def start() -> None:
        try:
            launch.launch({}, gpu_ids=(0,), path="p", clients=1, guard=guard)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=start)
    thread.start()
    wait_until(lambda: bool(cores) and bool(guard._starting))  # spawned, and reported to the guard
    (core,) = cores
    starting = guard.close()  # the shutdown: what it gets, it stops
    assert [p.pid for p in starting] == core.pids
    from lylm.engines._launcher import stop_processes

    stop_processes(starting)
    assert core.proc.wait(10) is not None
    loading.set()
    thread.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], EngineDeadError), outcome
    assert core.stopped
    assert not psutil.pid_exists(core.proc.pid) or psutil.Process(core.proc.pid).status() == psutil.STATUS_ZOMBIE


def test_a_shutdown_before_the_spawn_spawns_nothing() -> None:
    cores: list[ShellCore] = []
    launch = launcher({}, 4, spawner=lambda args, clients: cores.append(ShellCore()) or cores[-1])
    guard = StartGuard("m[0]")
    guard.close()
    with pytest.raises(EngineDeadError, match="shut down while it started"):
        launch.launch({}, gpu_ids=(0,), path="p", clients=1, guard=guard)
    assert cores == []


def test_a_shutdown_as_the_start_ends_stops_what_it_built() -> None:
    cores: list[ShellCore] = []
    guard = StartGuard("m[0]")

    class ClosingCore(ShellCore):
        def wait(self) -> str:
            out = super().wait()
            guard.close()  # the shutdown lands between "ready" and "kept"
            return out

    launch = launcher({}, 4, spawner=lambda args, clients: cores.append(ClosingCore()) or cores[-1])
    with pytest.raises(EngineDeadError, match="shut down while it started"):
        launch.launch({}, gpu_ids=(0,), path="p", clients=1, guard=guard)
    assert cores[0].stopped


def test_clients_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="clients must be at least 1"):
        launcher({}, 4).launch({}, gpu_ids=(), path="p", clients=0, guard=StartGuard("p"))


class FailingCore:
    """A stand-in engine core that fails to start as vLLM's does: its worker prints the real
    cause, the core a wrapper, and the front end learns only "see root cause above". A
    grandchild (like multiprocessing's resource tracker) keeps the output pipes open."""

    SCRIPT = r"""
import subprocess, sys
print("sleeper", subprocess.Popen(["sleep", "60"]).pid, flush=True)
print("(EngineCore pid=1) INFO 12-07 22:10:20 [core.py:1] starting", flush=True)
err = sys.stderr
err.write("(Worker pid=2) ERROR 12-07 22:10:29 [multiproc_executor.py:953] Traceback (most recent call last):\n")
err.write("(Worker pid=2) ERROR 12-07 22:10:29 [multiproc_executor.py:953]     raise RuntimeError(\n")
err.write("(Worker pid=2) ERROR 12-07 22:10:29 [multiproc_executor.py:953] RuntimeError: Cannot find any model weights with `/m`\n")
err.write("(EngineCore pid=1) ERROR 12-07 22:10:31 [core.py:1510] Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.\n")
err.write("Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.\n")
sys.exit(1)
"""

    def __init__(self) -> None:
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT])
        self.pids = [self.proc.pid]

    def wait(self) -> str:
        self.proc.wait(30)
        raise RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")

    def stop(self) -> None:
        return None


def test_a_failed_start_ends_with_the_cores_own_root_cause(capfd: pytest.CaptureFixture[str]) -> None:
    launch = launcher({}, 4, spawner=lambda args, clients: FailingCore())
    began = time.monotonic()
    with pytest.raises(EngineStartError) as info:
        launch.launch({}, gpu_ids=(0,), path="m[0].devices.gpu_ids", clients=1, guard=StartGuard('models["m"][0]'))
    took = time.monotonic() - began
    out, err = capfd.readouterr()
    sleeper = psutil.Process(int(out.split("sleeper ")[1].split()[0]))
    try:
        assert info.value.instance == 'models["m"][0]'
        assert info.value.root_cause == "RuntimeError: Cannot find any model weights with `/m`"
        assert str(info.value) == 'models["m"][0]: engine failed to start: RuntimeError: Cannot find any model weights with `/m`'
        assert isinstance(info.value.__cause__, RuntimeError)  # vLLM's own, kept
        # The output passed through, unchanged; the grandchild still holds the pipes, and the
        # cause was read without waiting for them to close (the drain waits up to 3 s).
        assert "(EngineCore pid=1) INFO 12-07 22:10:20 [core.py:1] starting\n" in out
        assert "RuntimeError: Cannot find any model weights with `/m`\n" in err
        assert "lylm-output-mark" not in out + err
        assert sleeper.is_running() and took < 3
    finally:
        sleeper.kill()


def test_a_successful_start_passes_its_output_through(capfd: pytest.CaptureFixture[str]) -> None:
    class Talking(ShellCore):
        def __init__(self) -> None:
            subprocess.run(["/bin/sh", "-c", "echo to-stdout; echo to-stderr >&2"], check=True)
            super().__init__()

    launch = launcher({}, 4, spawner=lambda args, clients: Talking())
    assert launch.launch({}, gpu_ids=(1,), path="p", clients=1, guard=StartGuard("m")) == "1"
    out, err = capfd.readouterr()
    assert out == "to-stdout\n" and err == "to-stderr\n"


def test_the_root_cause_is_the_first_exception_line_that_is_not_a_wrapper() -> None:
    from lylm.engines._output import CoreOutput

    output = CoreOutput()
    for line in [
        "INFO:     Started server process [1]",
        "(EngineCore pid=1) ERROR 12-07 22:10:31 [core.py:1510] Exception: failed. See stack trace for root cause.",
        "  File \"x.py\", line 1, in f",
        "    raise ValueError('indented lines are code, not the exception')",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        "RuntimeError: a later, secondary failure",
    ]:
        output._keep(line)
    assert output.root_cause(timeout=0) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert CoreOutput().root_cause(timeout=0) is None
