"""Every private part of vLLM lylm relies on, in one place: its engine-core process
manager (to know, watch and reap the processes), the name it gives engine-core
processes (to see one appear while an engine starts), and its front end's waiting
requests and core calls (to fail them when an engine dies).

Each is reached defensively (``getattr``): a vLLM that moved one degrades what depends
on it (a process not reaped early, a wait not ended) instead of failing to import.
Checked against vLLM 0.26 and 0.32.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ._placement import spawn_environment


def manager_of(llm: Any) -> Any:
    """vLLM's engine-core process manager of an ``AsyncLLM`` (None where it has none)."""
    return getattr(getattr(getattr(llm, "engine_core", None), "resources", None), "engine_manager", None)


def pids_of(llm: Any) -> list[int]:
    """The engine-core process ids of an ``AsyncLLM`` (its manager's processes)."""
    return [p.pid for p in getattr(manager_of(llm), "processes", ()) if p.pid is not None]


def _engine_core_children(known: set[int]) -> list[Any]:
    # vLLM names its engine-core processes "EngineCore" (or "EngineCore_DP<n>").
    return [
        p for p in multiprocessing.active_children()
        if p.name.startswith("EngineCore") and p.pid is not None and p.pid not in known
    ]


def build_with_environment(
    build: Callable[[], Any], environment: Mapping[str, str], spawned: Callable[[list[int]], None]
) -> Any:
    """Run ``build`` (which spawns the engine process and waits for it) with
    ``environment`` set only until the engine process exists.

    The build runs in a helper thread; this one holds the process environment
    (see :func:`spawn_environment`) until an engine-core process appears among
    this process's children (its environment is then copied) or the build ends,
    then restores it. Other engines' starts then proceed side by side with the
    rest of this one (loading weights, profiling, compiling: the long part).
    ``spawned`` gets the engine-core pids as soon as the process exists.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["llm"] = build()
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="lylm-engine-start", daemon=True)
    with spawn_environment(environment):
        # Taken under the lock: engine processes that other starts spawned while this
        # one waited for it are not this start's.
        known = {p.pid for p in multiprocessing.active_children() if p.pid is not None}
        worker.start()
        cores: list[Any] = []
        while worker.is_alive() and not cores:
            worker.join(0.01)
            cores = _engine_core_children(known)
    if cores:
        spawned([p.pid for p in cores if p.pid is not None])
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["llm"]


def fail_held_requests(llm: Any) -> None:
    """End, with vLLM's own ``EngineDeadError``, everything still waiting on an engine
    about to be shut down (call on the event loop, before ``AsyncLLM.shutdown()``).

    ``AsyncLLM.shutdown()`` cancels its output task, but requests waiting on their
    queues would wait forever (when the engine process died, vLLM has usually failed
    them already). Calls waiting on an engine-core reply (a "utility" call) are ended
    too: vLLM never fails those, and every engine's first requests wait on one
    (``AsyncLLM.add_request`` asks the core for its supported tasks once): a core killed
    then left them waiting forever, in flight on the books.
    """
    try:
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError
    except ImportError:  # a vLLM without these internals: shutdown still proceeds
        return
    processor = getattr(llm, "output_processor", None)
    if processor is not None and getattr(processor, "request_states", None):
        try:
            processor.propagate_error(VLLMEngineDeadError())
        except Exception:
            pass
    replies = getattr(getattr(llm, "engine_core", None), "utility_results", None)
    if isinstance(replies, dict):
        for reply in list(replies.values()):
            if isinstance(reply, asyncio.Future) and not reply.done():
                reply.set_exception(VLLMEngineDeadError())
        replies.clear()
