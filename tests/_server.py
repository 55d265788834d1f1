"""Run ``lylm serve`` (or another server) as a subprocess on 127.0.0.1 for HTTP tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def uvicorn_thread(app: Any, limits: Any = None) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on 127.0.0.1 in a background thread; yield its URL.

    ``limits`` (an ``HttpLimits``): uvicorn's protocol bounded as :func:`lylm.openai.serve` bounds it.
    """
    port = free_port()
    options: dict[str, Any] = {}
    if limits is not None:
        from lylm.server._http import bounded_protocol

        options["http"] = bounded_protocol(limits)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    # Generous: on a loaded 2-core CI machine a thread can wait seconds to run.
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise TimeoutError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def metric(url: str, name: str) -> dict[str, float]:
    """Values of one metric by label set, from the server's /metrics."""
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name):].rsplit(" ", 1)
            values[labels] = float(value)
    return values


def _command(script: str | None, module: str | None) -> list[str]:
    if module:
        return ["-m", module]
    if script:
        return [str(ROOT / script)]
    return ["-m", "lylm", "serve"]  # the command users run


class ServerProcess:
    """``python -m lylm serve`` (or another server ``script`` or ``module``) in a subprocess;
    ``url`` is its base URL once ready."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        log: Path,
        script: str | None = None,
        module: str | None = None,
        workers: int | None = None,
    ) -> None:
        #: Front-end worker processes (--workers); None: the script's default.
        self.workers = workers
        if workers is not None:
            args = ("--workers", str(workers), *args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            # module: `python -m module` (vLLM's own server); script: a server script.
            [sys.executable, *_command(script, module), "--port", str(self.port), *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        if not self._log.closed:
            self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 60, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
