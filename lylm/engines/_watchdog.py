"""A watchdog that stops a server's engine processes when the server dies without
stopping them (SIGKILL, the OOM killer), so they do not keep their GPU memory.

An engine's processes are children of the server; killed outright, the server
cannot shut them down, and they live on, re-parented to init. The watchdog is a
small separate process, started on the first engine start, that the server tells
which processes to watch (``pid`` and creation time, so a reused pid is never
mistaken for an engine) and to forget when it stops them itself. It reaps them,
with their children, as soon as the server is gone: its standard input (the
server holds the only write end) reaches end-of-file, or its parent process
changes (a forked engine process may hold a copy of that write end too).

One per server process, like the environment it protects: a module-level instance.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
from collections.abc import Iterable
from typing import IO, Any

POLL_S = 0.5
"""How often the watchdog looks at its parent between messages."""


class Reaper:
    """The server's side: starts the watchdog once and tells it what to watch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        atexit.register(self._close)  # a no-op unless a watchdog was started

    def watch(self, processes: Iterable[Any]) -> None:
        """Reap these psutil processes (and their children) if this process dies first."""
        import psutil  # a dependency of vLLM

        lines = []
        for process in processes:
            try:
                lines.append(f"+ {process.pid} {process.create_time()!r}\n")
            except psutil.Error:  # already gone: nothing to watch
                continue
        self._send(lines)

    def forget(self, processes: Iterable[Any]) -> None:
        """They were stopped properly: stop watching them."""
        self._send([f"- {p.pid}\n" for p in processes])

    def _send(self, lines: list[str]) -> None:
        if not lines:
            return
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = subprocess.Popen(
                    [sys.executable, "-c", "from lylm.engines._watchdog import main; main()"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    # Its own session: a signal to the server's process group spares it.
                    start_new_session=True,
                )
            stdin: IO[bytes] | None = self._proc.stdin
            if stdin is None:
                return
            try:
                stdin.write("".join(lines).encode())
                stdin.flush()
            except OSError:  # the watchdog is gone: nothing to protect with
                pass

    def _close(self) -> None:
        # At a normal exit: end-of-file tells the watchdog to stop whatever is still
        # registered (engines a user never closed) and leave; wait for it briefly.
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


REAPER = Reaper()


def process_tree(pids: Iterable[int]) -> list[Any]:
    """These processes and their children (an engine core's workers), as psutil handles."""
    import psutil  # a dependency of vLLM

    found: list[Any] = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            found += [root, *root.children(recursive=True)]
        except psutil.Error:
            pass
    return found


def kill_tree(processes: Iterable[Any], timeout: float = 5.0) -> None:
    """Kill these psutil processes and their children now, and wait (at most ``timeout``
    s) until they are gone. Blocking: call it off the event loop."""
    import psutil

    victims = []
    for process in processes:
        try:
            victims += [*process.children(recursive=True), process]
        except psutil.Error:
            continue
    _kill(victims)
    psutil.wait_procs(victims, timeout=timeout)


def reap(processes: list[Any], grace: float = 5.0) -> None:
    """Wait for an engine's processes to exit; kill what is left after ``grace`` seconds.

    A killed engine core leaves its workers behind; they notice and exit by
    themselves, which this waits for, but none may outlive the engine. Blocking.
    """
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=grace)
    _kill(alive)
    psutil.wait_procs(alive, timeout=grace)


def _kill(processes: Iterable[Any]) -> None:
    import psutil

    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass


def main() -> None:
    """The watchdog process."""
    import select
    import signal

    import psutil

    parent = os.getppid()
    watched: dict[int, float] = {}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the server
    buffer = b""
    while True:
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], POLL_S)
        if ready:
            chunk = os.read(sys.stdin.fileno(), 65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                parts = line.decode().split()
                if len(parts) == 3 and parts[0] == "+":
                    watched[int(parts[1])] = float(parts[2])
                elif len(parts) == 2 and parts[0] == "-":
                    watched.pop(int(parts[1]), None)
        if os.getppid() != parent:
            break
    found = []
    for pid, created in watched.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == created:  # else the pid now names another process
                found.append(process)
        except psutil.Error:
            continue
    kill_tree(found)
