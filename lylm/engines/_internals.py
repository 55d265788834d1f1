"""Every private part of vLLM lylm relies on, in one place: its engine-core process
manager (to know, watch and reap the processes), the name it gives engine-core
processes (to see one appear while an engine starts), its front end's waiting
requests and core calls (to fail them when an engine dies), and the function its
engine-core client makes its sockets with (to set heartbeats on a remote core's).

Each is reached defensively (``getattr``): a vLLM that moved one degrades what depends
on it (a process not reaped early, a wait not ended) instead of failing to import.
Checked against vLLM 0.26 and 0.32.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("lylm")


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


_heartbeats = threading.local()
_hook_lock = threading.Lock()


def build_with_heartbeats(build: Callable[[], Any], heartbeat: float) -> Any:
    """Run ``build`` (an ``AsyncLLM`` built in this thread) with ZeroMQ heartbeats on
    the TCP sockets its engine-core client binds: a ping every ``heartbeat / 3``
    seconds, and a connection that carries nothing for ``heartbeat`` seconds is
    closed (the disconnect a remote core's watch, :class:`~lylm.engines._remote.Disconnects`,
    sees). The core's ZeroMQ answers pings from its own I/O thread, between engine
    steps or not, so a long step is not taken for a lost host.

    ZeroMQ applies them only to connections made after they are set, which here is
    inside vLLM's client, before it binds: they go on as defaults of the client's
    ZeroMQ context, set by a wrapper of ``vllm.v1.engine.core_client.make_zmq_socket``
    for builds inside this call. On a vLLM without that function it builds without
    heartbeats (and says so in the log): a lost host is then noticed only by a closed
    connection.
    """
    if not _install_heartbeat_hook():
        logger.warning("this vLLM makes its sockets elsewhere: no heartbeats on remote engine cores")
    _heartbeats.seconds = heartbeat
    try:
        return build()
    finally:
        _heartbeats.seconds = None


def _install_heartbeat_hook() -> bool:
    try:
        from vllm.v1.engine import core_client
    except ImportError:
        return False
    with _hook_lock:
        original = getattr(core_client, "make_zmq_socket", None)
        if original is None:
            return False
        if getattr(original, "_lylm_heartbeats", False):
            return True

        def make_zmq_socket(ctx: Any, path: str, *args: Any, **kwargs: Any) -> Any:
            seconds = getattr(_heartbeats, "seconds", None)
            if seconds and isinstance(path, str) and path.startswith("tcp://"):
                import zmq

                ctx.setsockopt(zmq.HEARTBEAT_IVL, max(1, round(seconds * 1000 / 3)))
                ctx.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, round(seconds * 1000)))
            return original(ctx, path, *args, **kwargs)

        make_zmq_socket._lylm_heartbeats = True  # type: ignore[attr-defined]
        core_client.make_zmq_socket = make_zmq_socket
        return True

