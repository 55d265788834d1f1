"""vLLM engine cores launched apart from their front ends, for several clients at once.

An ``AsyncLLM`` normally launches its own engine-core process and is its only
client. vLLM's engine cores accept several front-end clients, though: ``vllm serve
--api-server-count N`` launches each core once and gives each of N API-server
processes its own ``AsyncLLM(..., client_addresses=, client_count=N,
client_index=i)``, each with its own input and output sockets, so output processing
(detokenization, ``RequestOutput``s) is spread over N processes. This module does
the launching half of that for one lylm instance: :meth:`EngineCores.launch`
spawns the engine core pinned to the instance's GPUs (the device variable set
only around the spawn, see :mod:`lylm.engines._placement`) and waits until it is ready;
:meth:`EngineCores.client_addresses` is what client ``i`` passes to ``AsyncLLM``.

The parts of vLLM used here (``launch_core_engines``, ``EngineZmqAddresses``,
``get_open_zmq_ipc_path``, ``AsyncLLM``'s ``client_*`` arguments) exist in vLLM
0.26 and 0.32; the launcher yields a tuple in 0.26 and an object in 0.32, both
read below. Every address is a local IPC path: nothing listens on a network port.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio

from .._config import EngineSpec
from .._engine import Engine, EngineStep, RenderedPrompt
from .._exceptions import EngineDeadError, LylmError
from ._internals import attached_client, launch_engine_core
from ._launcher import LAUNCHER, StartGuard, stop_processes
from ._watchdog import REAPER, process_tree


class EngineCores:
    """One instance's engine core (and its workers), serving ``clients`` front ends.

    Build with :meth:`launch` (blocking for as long as the engine takes to start:
    call it off the event loop). :meth:`shutdown` stops the processes. Pickled
    into another process (a front-end worker), it carries what :meth:`client`
    needs and not the processes: only the launching process owns those.
    """

    def __init__(self, *, vllm_config: Any, executor_class: Any, manager: Any, inputs: list[str], outputs: list[str]) -> None:
        self.vllm_config = vllm_config
        self.executor_class = executor_class
        self._manager = manager
        self._inputs = inputs
        self._outputs = outputs
        #: The engine-core pids, kept in copies too: any process on the host can look.
        self._pids = _core_pids(manager)
        self._watched: list[Any] = []
        #: The core's processes and theirs (vLLM's workers), by pid, kept in copies too.
        self._tree: list[tuple[int, float]] = []
        if manager is not None:
            # Should the launching process be killed outright, the watchdog stops the core.
            self._watched = process_tree(self._pids)
            REAPER.watch(self._watched)
            self._tree = _identities(self._watched)

    def __getstate__(self) -> dict[str, Any]:
        # What a front end in another process needs; the processes stay with their owner.
        state = dict(self.__dict__)
        state["_manager"] = None
        state["_watched"] = []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @classmethod
    def launch(cls, spec: EngineSpec, *, clients: int, guard: StartGuard | None = None) -> EngineCores:
        """Start ``spec``'s engine core for ``clients`` front ends, pinned to its GPUs, through
        the process's launcher; return once it is ready (blocks: call it off the event loop)."""
        from ._local import engine_args_of

        return LAUNCHER.launch(  # type: ignore[no-any-return]
            engine_args_of(spec),
            gpu_ids=spec.gpu_ids,
            path=f"{spec.name}.devices.gpu_ids",
            clients=clients,
            guard=guard or StartGuard(spec.name),
        )

    @property
    def clients(self) -> int:
        """How many front-end clients the core serves."""
        return len(self._inputs)

    def client_addresses(self, index: int) -> dict[str, Any]:
        """``AsyncLLM``'s ``client_addresses`` for client ``index`` (0-based)."""
        return {"input_address": self._inputs[index], "output_address": self._outputs[index]}

    def process_ids(self) -> list[int]:
        """PIDs of the engine-core processes (their workers are their children)."""
        return list(self._pids)

    def alive(self) -> bool:
        """True while every process of the engine core runs: the core and its workers (a
        worker killed alone ends the engine too: its core shuts down seconds later; this
        sees it at once). False once shut down by its owner.

        A few system calls per process: poll it, do not call it per request.
        """
        if self._manager is not None:
            processes = getattr(self._manager, "processes", ())
            if not processes or any(p.exitcode is not None for p in processes):
                return False
        elif not self._pids:
            return False
        return _all_running(self._tree or [(pid, 0.0) for pid in self._pids])

    def failure(self) -> str:
        """What is known of the core's end, e.g. ``engine core (pid 812) exited with code -9``
        (the exit code where this process launched it), or ``... is gone``."""
        for process in getattr(self._manager, "processes", ()):
            if process.exitcode is not None:
                return f"engine core (pid {process.pid}) exited with code {process.exitcode}"
        pids = ", ".join(str(pid) for pid in self._pids) or ", ".join(str(pid) for pid, _ in self._tree[:1])
        return f"engine core (pid {pids or '?'}) is gone"

    def client(self, index: int, *, stat_loggers: list[Any] | None = None) -> Any:
        """A new ``AsyncLLM`` front end attached to this core as client ``index``."""
        return attached_client(
            self.vllm_config, self.executor_class, self.client_addresses(index), self.clients, index, stat_loggers
        )

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the engine core and its workers; idempotent.

        ``timeout``: seconds the core gets to exit before it is killed; by default the
        engine's ``shutdown_timeout`` (vLLM's default 0), as ``vllm serve`` stops its core.
        By then lylm has drained its requests. (Without it vLLM's process manager waited
        5 s, and the core 3 more for its worker: 5.3 s per exit against 0.3 s.)"""
        manager, self._manager = self._manager, None
        self._pids = []
        if timeout is None:
            timeout = getattr(self.vllm_config, "shutdown_timeout", None)
        if manager is not None:
            _stop_manager(manager, timeout)
        watched, self._watched = self._watched, []
        REAPER.forget(watched)


def _stop_manager(manager: Any, timeout: float | None = None) -> None:
    """Shut vLLM's process manager down (``timeout``: its grace; None: vLLM's default), then
    wait for its processes, so that none stays a zombie (with no grace, vLLM kills them
    without waiting)."""
    manager.shutdown(timeout) if timeout is not None else manager.shutdown()
    for proc in getattr(manager, "processes", None) or []:
        with contextlib.suppress(Exception):
            proc.join(2)


class _Launched:
    """vLLM's ``launch_core_engines`` between the spawn and the ready engine (a
    :class:`~._launcher.Spawned`)."""

    def __init__(self, launcher: Any, manager: Any, build: Callable[[], EngineCores]) -> None:
        self._launcher = launcher
        self._manager = manager
        self._build = build
        self.pids = _core_pids(manager)
        self._cores: EngineCores | None = None

    def wait(self) -> EngineCores:
        # Leaving the launcher waits for the engine's handshake: model loaded, memory
        # profiled, KV cache allocated, compiled.
        self._launcher.__exit__(None, None, None)
        self._cores = self._build()
        return self._cores

    def stop(self) -> None:
        if self._cores is not None:
            self._cores.shutdown()
        elif self._manager is not None:
            _stop_manager(self._manager)


def spawn_core(engine_args: Mapping[str, Any], clients: int) -> _Launched:
    """Spawn an engine core for ``clients`` front ends (under the launcher's spawn lock, with
    the instance's device variable set: the config is built as the engine sees its devices)."""
    launcher, manager, vllm_config, executor_class, inputs, outputs = launch_engine_core(engine_args, clients)

    def build() -> EngineCores:
        return EngineCores(
            vllm_config=vllm_config, executor_class=executor_class, manager=manager, inputs=inputs, outputs=outputs
        )

    return _Launched(launcher, manager, build)


class CoreEngine(Engine):
    """An instance's engine core, launched for ``clients`` front-end workers and watched.

    The engine of the main process's pool when a server runs several front-end
    workers (:mod:`lylm.server._hub`): it starts the engine core (pinned like any
    :class:`VLLMEngine`), reports its health and stops it; the workers attach to
    it (:meth:`VLLMEngine.attached`) and serve the requests. ``on_started`` runs
    once the core is ready, with the instance name and the cores: the hub uses it
    to re-attach every worker to a restarted core before the instance serves again.
    """

    def __init__(
        self,
        spec: EngineSpec,
        *,
        clients: int,
        on_started: Callable[[str, EngineCores], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.clients = clients
        self._on_started = on_started
        self.cores: EngineCores | None = None
        self._lost: str | None = None
        self._guard: StartGuard | None = None

    @property
    def handle(self) -> EngineCores | None:
        """What a worker needs to attach (picklable); None before start."""
        return self.cores

    def precheck(self) -> None:
        from ._local import precheck_spec

        precheck_spec(self.spec)

    def validate(self) -> None:
        from ._local import validate_spec

        validate_spec(self.spec)

    async def start(self) -> None:
        guard = self._guard = StartGuard(self.spec.name)
        cores = await anyio.to_thread.run_sync(lambda: EngineCores.launch(self.spec, clients=self.clients, guard=guard))
        self.cores = cores
        if self._on_started is not None:
            await self._on_started(self.spec.name, self.cores)

    @property
    def healthy(self) -> bool:
        return self.cores is not None and self._lost is None

    def check(self) -> None:
        if self.cores is not None and self._lost is None and not self.cores.alive():
            self._lost = self.cores.failure()

    def failure_reason(self) -> str | None:
        return self._lost

    @property
    def max_model_len(self) -> int:
        if self.cores is None:
            raise EngineDeadError(f"{self.spec.name} is not running")
        return int(self.cores.vllm_config.model_config.max_model_len)

    def default_sampling_params(self) -> Any:
        raise LylmError("an engine core serves requests through its workers' engines")

    async def render_text(self, text: str) -> RenderedPrompt:
        raise LylmError("an engine core serves requests through its workers' engines")

    async def render_chat(
        self, messages: Sequence[Mapping[str, Any]], *, chat_template_kwargs: Mapping[str, Any] | None = None
    ) -> RenderedPrompt:
        raise LylmError("an engine core serves requests through its workers' engines")

    def generate(self, request_id: str, prompt: RenderedPrompt, sampling_params: Any) -> AsyncGenerator[EngineStep, None]:
        raise LylmError("an engine core serves requests through its workers' engines")

    async def abort(self, request_id: str) -> None:
        return None

    def num_unfinished_requests(self) -> int:
        return 0

    async def shutdown(self) -> None:
        """Stop the engine core; during :meth:`start`, kill the core being started."""
        starting = self._guard.close() if self._guard is not None else []
        cores, self.cores = self.cores, None
        await anyio.to_thread.run_sync(stop_processes, starting)
        if cores is not None:
            await anyio.to_thread.run_sync(cores.shutdown)


def _core_pids(manager: Any) -> list[int]:
    """The engine-core process ids of vLLM's process manager (none without one)."""
    return [p.pid for p in getattr(manager, "processes", ()) if p.pid is not None]


def _identities(processes: Sequence[Any]) -> list[tuple[int, float]]:
    """(pid, creation time) of each psutil process: a pid reused later is not taken for it."""
    import psutil

    found = []
    for process in processes:
        try:
            found.append((process.pid, process.create_time()))
        except psutil.Error:
            continue
    return found


def _all_running(processes: Sequence[tuple[int, float]]) -> bool:
    import psutil  # a dependency of vLLM

    try:
        for pid, created in processes:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE or (created and process.create_time() != created):
                return False
    except psutil.Error:
        return False
    return True
