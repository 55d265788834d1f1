"""The remote host's side of a remote instance: ``lylm core``.

A remote instance's engine core is vLLM's headless core (``vllm serve MODEL
--headless``), started on its own host. Two things make running one by hand fragile,
both seen on vLLM 0.26 and 0.32:

* with one data-parallel rank, the core takes the pool's address from the environment
  (``VLLM_DP_MASTER_IP``, default 127.0.0.1), not from ``--data-parallel-address``: on a
  real second host it would knock on its own loopback;
* it serves one front end and never notices it leaving: when the pool closes,
  restarts, or gives the core up (a partition, a missed heartbeat), the core stays up,
  connected to nothing, and no new front end can attach to it (vLLM's handshake happens
  once, at the core's start).

:class:`CoreHost` runs the core with the right environment and starts it again when it
exits, or when it is orphaned. A core is orphaned when it has had a connection to the
pool and has none left for ``grace`` seconds (the pool closed or restarted: its host
closed the connections), or when the pool listens on the instance's port while the
core is attached (the pool gave the core up, after a partition or a missed heartbeat,
and waits for a new one: vLLM's front end listens there only while it waits for a core
to attach). Either way the next core attaches to whichever front end listens then.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ._cli import vllm_cli
from ._launcher import LAUNCHER

logger = logging.getLogger("lylm.core")


def headless_command(model: str, address: str, port: int, vllm_args: Sequence[str] = ()) -> list[str]:
    """``vllm serve MODEL --headless`` attaching to a pool at ``address:port``, one rank."""
    return [
        *vllm_cli(), "serve", model, "--headless",
        "--data-parallel-size", "1", "--data-parallel-size-local", "1", "--data-parallel-start-rank", "0",
        "--data-parallel-address", address, "--data-parallel-rpc-port", str(port), *vllm_args,
    ]  # fmt: skip


def serve_flags(engine_args: dict[str, Any]) -> list[str]:
    """An instance's engine args (all but ``model``) as ``vllm serve`` flags: ``max_model_len:
    4096`` -> ``--max-model-len 4096``, ``True`` -> the bare flag, mappings and lists as JSON.
    False and None are left out (vLLM's defaults)."""
    import json

    flags: list[str] = []
    for key, value in engine_args.items():
        if key == "model" or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif isinstance(value, (dict, list, tuple)):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def headless_environment(address: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the core needs to find the pool (see the module's notes)."""
    return {**(os.environ if base is None else base), "VLLM_DP_MASTER_IP": address}


def connections_to(pid: int, address: str) -> list[tuple[str, int]]:
    """Established TCP connections of process ``pid`` and its descendants to ``address``:
    a core's links to its front end (the handshake's, from the core's hello until it is
    ready, then its request and output sockets')."""
    import psutil  # a dependency of vLLM

    wanted = ipaddress.ip_address(address)
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    found: list[tuple[str, int]] = []
    for process in processes:
        try:
            connections = process.net_connections(kind="tcp")
        except psutil.Error:
            continue
        for c in connections:
            if c.status != psutil.CONN_ESTABLISHED or not c.raddr:
                continue
            try:
                if ipaddress.ip_address(c.raddr.ip.split("%")[0]) == wanted:
                    found.append((c.raddr.ip, c.raddr.port))
            except ValueError:
                continue
    return found


def pool_waits(address: str, port: int, timeout: float = 1.0) -> bool:
    """Whether the pool listens at ``address:port``: it waits for a core to attach there.
    A bare TCP connection, closed at once (vLLM's handshake reads ZeroMQ messages only)."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as probe:
            # A connection to a local port in the ephemeral range where nothing listens can
            # be given that very port as its own and connect to itself (TCP's simultaneous
            # open): that is no pool.
            return bool(probe.getsockname() != probe.getpeername())
    except OSError:  # refused (not waiting), or unreachable (a partition: nothing to learn)
        return False


class CoreHost:
    """Runs a headless engine core and restarts it when it exits or its front end is gone.

    ``command``/``environment``: the core's (see :func:`headless_command`). ``address``
    and ``port``: the pool's, where the core attaches. ``grace``: seconds without any
    connection to the pool, after having had one (its handshake's counts: a pool that
    attaches and goes between two polls is still seen), before the core counts as
    orphaned.
    ``restart_delay``: seconds between a core's end and the next start. ``probe``:
    seconds between looks at whether the pool waits for a new core while this one is
    attached. ``die_with_parent``: the core gets SIGKILL if this process dies (in a Ray
    actor). :meth:`run` returns when :meth:`stop` is called (SIGTERM/SIGINT in ``lylm core``).
    """

    def __init__(
        self,
        command: Sequence[str],
        environment: dict[str, str],
        address: str,
        port: int,
        *,
        grace: float = 3.0,
        restart_delay: float = 2.0,
        poll: float = 0.5,
        probe: float = 2.0,
        die_with_parent: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.command = list(command)
        self.environment = environment
        self.address, self.port = address, port
        self.grace, self.restart_delay, self.poll, self.probe = grace, restart_delay, poll, probe
        self._clock = clock
        self._die_with_parent = die_with_parent
        self._stop = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        #: How many times the core was started (the first start included).
        self.starts = 0
        #: Whether the running core has connected to the pool (seen on a poll).
        self.attached = False

    def stop(self) -> None:
        """End :meth:`run`: the core is stopped and not started again."""
        self._stop.set()

    def run(self) -> None:
        """Start the core; keep it running and attachable until :meth:`stop`."""
        try:
            while not self._stop.is_set():
                why = self._run_once()
                if self._stop.is_set():
                    break
                logger.warning("%s; starting it again in %g s", why, self.restart_delay)
                self._stop.wait(self.restart_delay)
        finally:
            self._end_core()

    def _run_once(self) -> str:
        """Start the core and watch it; returns why it must be started again."""
        # Through the process's launcher: under the spawn lock, and watched, so that the core
        # does not outlive this process should it be killed outright (SIGKILL, OOM).
        self._proc = LAUNCHER.popen(
            self.command,
            self.environment,
            # Its own process group (stopped as one, and a terminal's Ctrl-C reaches only this
            # process, which stops it), in this session: Linux's autogroup scheduler shares CPU
            # between sessions, and on a host where other sessions keep the CPUs busy a core in
            # a session of its own was starved (BENCHMARKS.md 18).
            process_group=0,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if self._die_with_parent else None,
        )
        self.starts += 1
        logger.info("engine core started (pid %d), attaching to %s:%d", self._proc.pid, self.address, self.port)
        self.attached = False
        alone_since: float | None = None
        probed = self._clock()
        while not self._stop.wait(self.poll):
            code = self._proc.poll()
            if code is not None:
                self._end_core()  # what it left behind (its workers) goes too
                return f"the engine core exited with code {code}"
            now = self._clock()
            ports = {port for _, port in connections_to(self._proc.pid, self.address)}
            if ports:
                if not self.attached:
                    logger.info("engine core connected to the pool at %s", self.address)
                    probed = now
                self.attached, alone_since = True, None
                # Once its start is over (no handshake connection left), the pool listening on
                # the port means it waits for another core.
                if self.port not in ports and now - probed >= self.probe:
                    probed = now
                    if pool_waits(self.address, self.port):
                        self._end_core()
                        return f"the pool at {self.address}:{self.port} waits for a new engine core: this one was given up"
                continue
            if not self.attached:
                continue  # not connected yet (vLLM's start, or no pool listening): its handshake bounds that
            alone_since = now if alone_since is None else alone_since
            if now - alone_since >= self.grace:
                self._end_core()
                return f"the pool at {self.address} is gone (no connection for {self.grace:g} s)"
        return "stopped"

    def _end_core(self, timeout: float = 30.0) -> None:
        """Stop the core's process group: SIGTERM, then SIGKILL after ``timeout``; and
        SIGKILL for what is left of the group once its leader has exited (a worker of a
        core that was killed outlives it, holding memory, GPU memory on a GPU host)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            self._stop_group(proc, timeout)
        finally:
            LAUNCHER.ended(proc)

    def _stop_group(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # nothing left
            return
        try:
            proc.wait(30.0)
        except subprocess.TimeoutExpired:
            # A process gets to act on SIGKILL only once it is scheduled: seen on a starved
            # host. It is on its way out; the next start need not wait for it.
            logger.warning("the engine core (pid %d) has not exited 30 s after SIGKILL; going on", proc.pid)


def _die_with_parent() -> None:
    # In the child, before exec: SIGKILL when the process that started it dies (Linux), so a
    # core does not outlive a Ray actor killed without a word.
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_core_host(args: Any) -> None:
    """``lylm core``: parse-free entry for :mod:`lylm.cli` (``args`` from its parser)."""
    address, port = args.pool_address, args.pool_port
    vllm_args = list(args.vllm_args)
    if args.kv_events_port is not None:  # published to the pool, which listens there
        import json

        from ._kv_events import kv_events_config, remote_endpoint

        events = kv_events_config(remote_endpoint(address, args.kv_events_port), None)
        vllm_args += ["--enable-prefix-caching", "--kv-events-config", json.dumps(events)]
    host = CoreHost(
        headless_command(args.model, address, port, vllm_args),
        headless_environment(address),
        address,
        port,
        grace=args.grace,
        restart_delay=args.restart_delay,
    )

    def on_signal(signum: int, frame: object) -> None:
        host.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host.run()
