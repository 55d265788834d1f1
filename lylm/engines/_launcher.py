"""One launcher for every engine core lylm starts on this host.

Every local engine core starts here: an instance's own core, a core shared by the
front-end workers of ``lylm serve``, a restart of either, and the headless core of
``lylm core``. The launcher does four things for each, the same way:

* **The device variable, computed under the spawn lock from the server's own
  environment.** The variable that pins an engine to its GPUs
  (``CUDA_VISIBLE_DEVICES`` on NVIDIA) belongs to the whole process, so a start sets
  it only while its engine process is spawned, under a process-wide lock (see
  :mod:`._placement`). What the server itself was started with is read once, under
  that lock, before any start has set anything, and kept (:meth:`Launcher.environment`):
  a start never reads the live ``os.environ``, where another start's temporary value
  may stand. (Before, each start read it outside the lock: one start could take
  another's ``CUDA_VISIBLE_DEVICES=2`` for the server's restriction.) Like CUDA, which
  reads the variable once per process, lylm reads it when the first engine starts.
* **The processes reported as soon as they exist**, long before the engine is ready
  (weights, profiling, compiling): to the watchdog, which stops them should the server
  be killed outright, and to the start's :class:`StartGuard`, through which a shutdown
  that comes meanwhile stops them.
* **One start guard** (:class:`StartGuard`): a shutdown may come at any point of a
  start; the start then ends with :class:`~lylm.EngineDeadError` and leaves no process.
* **Its console output passed through, the last lines kept** (:mod:`._output`): a start
  that fails ends with :class:`~lylm.EngineStartError` naming the core's own root cause
  (vLLM's front end says only "see root cause above").

The spawn lock is held only until the engine process exists; the long rest of a start
runs side by side with other starts (which GPUs may start together is
:class:`~._placement.StartLocks`'s decision, made before).
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs

from .._exceptions import EngineDeadError, EngineStartError
from ._output import CoreOutput
from ._placement import spawn_environment, visible_devices
from ._watchdog import REAPER, kill_tree, process_tree


@attrs.frozen
class DevicePlatform:
    """What the launcher needs of the accelerator platform: the variable that picks a
    process's devices, and how many devices this host has (None: unknown)."""

    variable: str
    count: int | None


def vllm_platform() -> DevicePlatform:
    """vLLM's current platform (``CUDA_VISIBLE_DEVICES`` and the GPU count on NVIDIA)."""
    from vllm.platforms import current_platform

    count: int | None = None
    counter = getattr(current_platform, "device_count", None)
    if callable(counter):
        try:
            count = int(counter())
        except Exception:  # a platform that cannot count without initialising: unknown
            count = None
    return DevicePlatform(current_platform.device_control_env_var, count)


class StartGuard:
    """One engine start that a shutdown may end at any point.

    The start reports its processes as soon as they exist (:meth:`spawned`) and checks
    in when it is done (:meth:`keep`); :meth:`close`, from any thread, marks it shut
    down and stops the processes of a start still under way. Whichever comes second
    cleans up: a start never leaves a process behind, nor a shut-down engine running.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._closed = False
        self._starting: list[Any] = []

    def spawned(self, pids: Sequence[int]) -> None:
        """The start's engine processes exist: watch them; stop them if shut down meanwhile."""
        processes = process_tree(pids)
        REAPER.watch(processes)
        with self._lock:
            closed = self._closed
            if not closed:
                self._starting = processes
        if closed:
            stop_processes(processes)

    def keep(self, stop: Callable[[], None]) -> None:
        """The start is done. If a shutdown came meanwhile, ``stop`` what it built and raise
        :class:`~lylm.EngineDeadError`; otherwise the caller owns it from here."""
        with self._lock:
            closed = self._closed
            starting, self._starting = self._starting, []
        if closed:
            stop()
            REAPER.forget(starting)
            raise EngineDeadError(f"{self.name} was shut down while it started")

    def check(self) -> None:
        """Raise :class:`~lylm.EngineDeadError` if a shutdown came (between steps of a start)."""
        if self._closed:
            raise EngineDeadError(f"{self.name} was shut down while it started")

    @property
    def closed(self) -> bool:
        """Whether a shutdown came."""
        return self._closed

    def close(self) -> list[Any]:
        """Mark the start shut down; return the processes of a start still under way, for
        the caller to stop (:func:`stop_processes`, off the event loop)."""
        with self._lock:
            self._closed = True
            starting, self._starting = self._starting, []
        return starting


def stop_processes(processes: list[Any]) -> None:
    """Kill a half-started engine's processes (with their children) and stop watching them."""
    if processes:
        kill_tree(processes)
        REAPER.forget(processes)


class Spawned(Protocol):
    """What a spawner started: the engine core's processes, not yet ready."""

    @property
    def pids(self) -> list[int]: ...

    def wait(self) -> Any:
        """Block until the core is ready; return its handle. Raises if it failed to start."""
        ...

    def stop(self) -> None:
        """Stop what was spawned (after a failed or abandoned start)."""
        ...


class Spawner(Protocol):
    """Spawns one engine core (called under the spawn lock, its environment set)."""

    def __call__(self, engine_args: Mapping[str, Any], clients: int) -> Spawned: ...


class Launcher:
    """Starts engine cores pinned to their GPUs (see the module's notes).

    ``environ``: the server's environment (default: ``os.environ`` as it is when the
    first engine starts). ``platform``: the device platform (default: vLLM's).
    ``spawner``: what spawns a core (default: vLLM's ``launch_core_engines``). The
    last two are seams for tests, which stand in a platform of their own.
    """

    def __init__(
        self,
        *,
        environ: Mapping[str, str] | None = None,
        platform: Callable[[], DevicePlatform] | None = None,
        spawner: Spawner | None = None,
    ) -> None:
        self._environ = dict(environ) if environ is not None else None
        self._platform = platform or vllm_platform
        self._spawner = spawner
        self._lock = threading.Lock()

    def environment(self) -> Mapping[str, str]:
        """The server's own environment, read once. Every start reads it under the spawn lock
        before it sets anything, so the first read never sees a start's temporary values."""
        with self._lock:
            if self._environ is None:
                self._environ = dict(os.environ)
            return self._environ

    def device_environment(self, gpu_ids: Sequence[int], path: str) -> dict[str, str]:
        """The variables an engine on ``gpu_ids`` is spawned with (empty when not pinned):
        its GPUs, as the server's own restriction maps them, and vLLM's spawn start
        method unless the server chose one. Raises :class:`~lylm.ConfigError` at ``path``
        for a GPU this host does not have."""
        if not gpu_ids:
            return {}
        platform = self._platform()
        base = self.environment()
        environment = {
            platform.variable: visible_devices(
                gpu_ids, variable=platform.variable, environ=base, device_count=platform.count, path=path
            )
        }
        # Spawned, not forked: a forked engine process inherits the server's in-process
        # state, and on a 2 x H200 host (vLLM 0.26) three engines forked with
        # CUDA_VISIBLE_DEVICES 0, 1 and 1 all ran on one GPU. A spawned one starts a fresh
        # interpreter from exactly this environment. A start method the server set is kept.
        if "VLLM_WORKER_MULTIPROC_METHOD" not in base:
            environment["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        return environment

    def launch(
        self,
        engine_args: Mapping[str, Any],
        *,
        gpu_ids: Sequence[int],
        path: str,
        clients: int,
        guard: StartGuard,
    ) -> Any:
        """Start an engine core for ``clients`` front ends on ``gpu_ids``; return the
        spawner's handle (:class:`~._cores.EngineCores` by default) once it is ready.
        Blocks for the whole start: call it off the event loop."""
        if clients < 1:
            raise ValueError(f"clients must be at least 1 (got {clients})")
        guard.check()
        spawner = self._spawner or spawn_vllm_core
        # Unpinned engines take the spawn lock too (with nothing to set), so that no other
        # engine process appears while a pinned one is being spawned.
        # The device variable is computed under the lock, from the server's own environment.
        output = CoreOutput()
        with spawn_environment(lambda: self.device_environment(gpu_ids, path)), output.capturing():
            spawned = spawner(engine_args, clients)
        try:
            guard.spawned(spawned.pids)
            handle = spawned.wait()
        except BaseException as exc:
            spawned.stop()
            # vLLM says only "see root cause above"; the core's own output names it.
            cause = output.root_cause() if isinstance(exc, Exception) and not guard.closed else None
            output.release()
            if cause is not None:
                raise EngineStartError(guard.name, cause, root_cause=cause) from exc
            raise
        output.release()
        guard.keep(spawned.stop)
        return handle

    def popen(self, command: Sequence[str], environment: Mapping[str, str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a command (``lylm core``'s headless engine core) with ``environment`` on top
        of the server's own, under the spawn lock, and have the watchdog stop it should this
        process be killed outright. Forget it (:meth:`ended`) once it is stopped."""
        with spawn_environment({}):
            proc = subprocess.Popen(list(command), env={**self.environment(), **environment}, **kwargs)
        REAPER.watch(process_tree([proc.pid]))
        return proc

    def ended(self, proc: subprocess.Popen[bytes]) -> None:
        """A process started by :meth:`popen` has been stopped: stop watching it."""
        REAPER.forget([proc])


def spawn_vllm_core(engine_args: Mapping[str, Any], clients: int) -> Spawned:
    """vLLM's ``launch_core_engines`` for ``clients`` front ends (see :mod:`._cores`)."""
    from ._cores import spawn_core

    return spawn_core(engine_args, clients)


#: The process's launcher: the environment and the lock it guards are one per process.
LAUNCHER = Launcher()
