"""``lylm core``: the core's host's side of a remote instance, without vLLM.

The "engine core" here is a small Python process that connects to a TCP listener
standing in for the pool's front end; :class:`CoreHost` must start it again when it
exits, when its connections to the pool are gone, and when the pool listens on the
instance's port (it waits for a new core) while this one is attached. The real thing
(vLLM's headless core, a real pool, a network namespace) is in test_remote.py.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lylm.engines._core_host import CoreHost, connections_to, headless_command, headless_environment, pool_waits
from lylm.cli import main

from _helpers import wait_until

# Connects to the "front end" at argv[1] and holds the connection until it is closed.
_CORE = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
while s.recv(1):
    pass
time.sleep(60)
"""


class FrontEnd:
    """A TCP listener that accepts the "core" and can drop its connections."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def drop(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.accepted.clear()

    def close(self) -> None:
        self.drop()
        self.listener.close()


@pytest.fixture
def front_end() -> Iterator[FrontEnd]:
    made = FrontEnd()
    yield made
    made.close()


def _host(front_end: FrontEnd, handshake_port: int, **options: float) -> tuple[CoreHost, threading.Thread]:
    host = CoreHost([sys.executable, "-c", _CORE, str(front_end.port)], {}, "127.0.0.1", handshake_port,
                    poll=0.05, restart_delay=0.05, **options)  # fmt: skip
    thread = threading.Thread(target=host.run, daemon=True)
    thread.start()
    return host, thread


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_core_whose_pool_closed_the_connections_is_started_again(front_end: FrontEnd) -> None:
    host, thread = _host(front_end, _unused_port(), grace=0.2, probe=60)
    try:
        wait_until(lambda: len(front_end.accepted) == 1 and host.attached, timeout=30)
        first = host._proc
        assert first is not None and connections_to(first.pid, "127.0.0.1") == [("127.0.0.1", front_end.port)]
        front_end.drop()  # the pool went away
        wait_until(lambda: host.starts >= 2 and len(front_end.accepted) >= 1, timeout=30)
        assert first.poll() is not None  # the orphan was ended, not left running
    finally:
        host.stop()
        thread.join(10)
    assert not thread.is_alive() and host._proc is None


def test_a_core_attached_while_the_pool_waits_for_a_new_one_is_started_again(front_end: FrontEnd) -> None:
    port = _unused_port()
    host, thread = _host(front_end, port, grace=60, probe=0.1)
    try:
        wait_until(lambda: len(front_end.accepted) == 1 and host.attached, timeout=30)
        assert not pool_waits("127.0.0.1", port)
        # The pool gave this core up (a partition) and listens for a new one.
        waiting = socket.create_server(("127.0.0.1", port))
        try:
            wait_until(lambda: host.starts == 2, timeout=30)
        finally:
            waiting.close()
    finally:
        host.stop()
        thread.join(10)


def test_a_probe_that_connects_to_itself_is_no_waiting_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    # TCP's simultaneous open: a connection to a free local port can be given that port as its
    # own and connect to itself. Made on purpose here (bound to the port it connects to); the
    # probe's own connection gets it by chance, and the core host then killed a healthy core.
    port = _unused_port()
    made: list[socket.socket] = []

    def to_itself(where: tuple[str, int], timeout: float) -> socket.socket:
        probe = socket.socket()
        probe.bind(where)
        probe.connect(where)  # connected: to itself
        made.append(probe)
        return probe

    monkeypatch.setattr(socket, "create_connection", to_itself)
    assert not pool_waits("127.0.0.1", port)
    assert made
    with socket.create_server(("127.0.0.1", 0)) as listening:  # a real listener still counts
        monkeypatch.undo()
        assert pool_waits("127.0.0.1", listening.getsockname()[1])


def test_a_core_that_exits_is_started_again_and_stop_ends_it(front_end: FrontEnd) -> None:
    host = CoreHost([sys.executable, "-c", "raise SystemExit(3)"], {}, "127.0.0.1", 1, poll=0.05, restart_delay=0.05)
    thread = threading.Thread(target=host.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: host.starts >= 3, timeout=30)
    finally:
        host.stop()
        thread.join(10)
    assert not thread.is_alive()


# Starts a "worker" (as vLLM's core does), writes the pids to argv[1], then dies.
_CORE_WITH_WORKER = """
import os, subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {worker.pid}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
os._exit(9)
"""


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_core_runs_in_its_own_process_group_of_this_session_and_its_leftovers_end_with_it(tmp_path: Path) -> None:
    """Its own process group: ended as one. This session: Linux's autogroup shares the CPUs
    between sessions, and a core in a session of its own was starved on a busy host. A core
    that dies leaves its workers behind (they hold memory): they are ended before the next start."""
    import os

    pids = tmp_path / "pids"
    host = CoreHost([sys.executable, "-c", _CORE_WITH_WORKER, str(pids)], dict(os.environ), "127.0.0.1", 1,
                    poll=0.05, restart_delay=60)  # fmt: skip
    thread = threading.Thread(target=host.run, daemon=True)
    thread.start()
    try:
        wait_until(pids.exists, timeout=30)
        core, worker = map(int, pids.read_text().split())
        assert os.getpgid(worker) == core and os.getsid(worker) == os.getsid(0)
        wait_until(lambda: not _running(worker), timeout=30)  # ended though the core had exited
        assert host.starts == 1  # ... before the next start (60 s away)
    finally:
        host.stop()
        thread.join(10)
    assert not thread.is_alive()


def test_ending_a_core_that_is_slow_to_die_does_not_end_lylm_core() -> None:
    """On a starved host a core took more than 30 s to exit even after SIGKILL, and lylm
    core died of the wait's timeout (then nothing restarted the core)."""
    import subprocess

    class SlowToDie(subprocess.Popen[bytes]):
        def wait(self, timeout: float | None = None) -> int:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)

    proc = SlowToDie([sys.executable, "-c", "import time; time.sleep(60)"], process_group=0)
    host = CoreHost(["unused"], {}, "127.0.0.1", 1)
    host._proc = proc
    host._end_core(timeout=0.1)  # must not raise
    assert host._proc is None
    wait_until(lambda: proc.poll() is not None, timeout=30)  # it was killed all the same


def test_the_headless_command_and_environment_address_the_pool() -> None:
    command = headless_command("/models/m", "10.0.0.2", 13345, ["--max-model-len", "4096"])
    assert command[command.index("serve") + 1 :] == [
        "/models/m", "--headless", "--data-parallel-size", "1", "--data-parallel-size-local", "1",
        "--data-parallel-start-rank", "0", "--data-parallel-address", "10.0.0.2", "--data-parallel-rpc-port",
        "13345", "--max-model-len", "4096",
    ]  # fmt: skip
    # vLLM's core takes the pool's address from here when it runs one rank.
    assert headless_environment("10.0.0.2", {"PATH": "/bin"}) == {"PATH": "/bin", "VLLM_DP_MASTER_IP": "10.0.0.2"}


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--pool", "10.0.0.2", "m"], "expected ADDRESS:PORT"),
        (["--pool", "host.example:13345", "m"], "expected ADDRESS:PORT"),
        (["--pool", "10.0.0.2:0", "m"], "1 to 65535"),
        (["--pool", "0.0.0.0:13345", "m"], "no address to connect to"),
        (["--pool", "10.0.0.2:13345", "--grace", "0", "m"], "--grace must be a positive"),
        (["--pool", "10.0.0.2:13345", "m", "--data-parallel-rpc-port", "1"], "--data-parallel-rpc-port: set by lylm core"),
        (["--pool", "10.0.0.2:13345", "m", "--headless"], "--headless: set by lylm core"),
        (["--pool", "10.0.0.2:13345", "m", "-dpp", "1"], "-dpp: set by lylm core"),
        (["--pool", "10.0.0.2:13345", "m", "-dpn", "0"], "-dpn: set by lylm core"),
        (["--pool", "10.0.0.2:13345", "--kv-events-port", "13345", "m"], "--kv-events-port: a port 1 to 65535 other"),
        (["--pool", "10.0.0.2:13345", "--kv-events-port", "13346", "m", "--kv-events-config", "{}"],
         "--kv-events-config: set by lylm core (from --kv-events-port)"),
    ],
)
def test_lylm_core_refuses_wrong_arguments_naming_them(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["core", *argv])
    assert exited.value.code == 2
    assert says in capsys.readouterr().err


def test_lylm_core_hands_its_model_and_vllm_flags_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """lylm serve's MODEL form once overwrote lylm core's MODEL with None (a TypeError at spawn)."""
    import lylm.engines._core_host as core_host

    seen: list[Any] = []
    monkeypatch.setattr(core_host, "run_core_host", seen.append)
    main(["core", "--pool", "10.0.0.2:13345", "/models/m", "--max-model-len", "4096"])
    (args,) = seen
    assert (args.model, args.vllm_args, args.pool_address, args.pool_port) == (
        "/models/m", ["--max-model-len", "4096"], "10.0.0.2", 13345,
    )


def test_lylm_core_with_a_kv_events_port_has_its_core_publish_to_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import signal

    hosts: list[CoreHost] = []
    monkeypatch.setattr(CoreHost, "run", lambda self: hosts.append(self))
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the test process keeps its handlers
    main(["core", "--pool", "[fd00::2]:13345", "--kv-events-port", "13346", "/models/m", "--max-model-len", "64"])
    (host,) = hosts
    command = host.command
    events = json.loads(command[command.index("--kv-events-config") + 1])
    # Connected (no wildcard) to the pool's own address: the pool listens there.
    assert events == {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://[fd00::2]:13346"}
    assert "--enable-prefix-caching" in command and command[command.index("/models/m") + 1] == "--headless"
