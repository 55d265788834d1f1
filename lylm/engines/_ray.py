"""Remote cores placed through Ray: the pool starts an instance's engine core on a Ray node.

For a team that runs Ray, a remote instance may name ``"ray": {"gpus": 1}`` instead of
having its core started on its host by hand: the pool asks Ray for a placement group of
one bundle (the GPUs and CPUs), starts an actor in it, and the actor runs the core as
``lylm core`` does (vLLM's headless core, :class:`~lylm.engines._core_host.CoreHost`) on
whichever node Ray chose. The core then attaches to the pool's address over ZeroMQ like
any remote core: tokens go over the engine-core sockets, never through Ray's actor calls
(Ray only places and supervises the process).

When the engine fails, the pool's supervisor shuts it down (the actor killed, its
placement group removed) and starts a new one: a new placement, possibly on another node.
The actor's core gets SIGKILL if the actor process dies, and the actor is owned by the
pool's process, so a pool that dies takes its cores with it.

Ray's API is used here alone and imported only when such an instance starts.
"""

from __future__ import annotations

import logging
from typing import Any

from .._config import EngineSpec, RemoteCore

logger = logging.getLogger("lylm")

_actor_class: Any = None


def _core_actor() -> Any:
    """The actor class (defined once Ray is imported). Threaded: ``run`` blocks while the
    core runs, ``stop`` ends it."""
    global _actor_class
    if _actor_class is None:
        import ray

        from ._core_host import CoreHost

        class CoreActor:
            def __init__(self, command: list[str], environment: dict[str, str], address: str, port: int) -> None:
                import os

                # Ray set the GPUs this actor may use: the core inherits them.
                self.host = CoreHost(command, {**os.environ, **environment}, address, port, die_with_parent=True)

            def node(self) -> str:
                return str(ray.get_runtime_context().get_node_id())

            def run(self) -> int:
                self.host.run()
                return self.host.starts

            def stop(self) -> None:
                self.host.stop()

        _actor_class = ray.remote(CoreActor)
    return _actor_class


class RayCore:
    """One placement of a remote instance's core (:meth:`start`, then :meth:`stop`; both block:
    call them from a worker thread)."""

    def __init__(self, spec: EngineSpec) -> None:
        assert spec.remote is not None and spec.remote.ray is not None
        self.spec = spec
        self.remote: RemoteCore = spec.remote
        self._group: Any = None
        self._actor: Any = None
        self._run: Any = None
        #: The Ray node the core was placed on (its id), once placed.
        self.node: str | None = None

    def start(self, timeout: float) -> None:
        """Place the core: a placement group, ready within ``timeout`` s, and the actor running it."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from ._core_host import headless_command, headless_environment, serve_flags

        placement = self.remote.ray
        assert placement is not None
        if not ray.is_initialized():
            ray.init(address=placement.address, include_dashboard=False, log_to_driver=False)
        bundle: dict[str, float] = {"CPU": placement.cpus}
        if placement.gpus:
            bundle["GPU"] = placement.gpus
        self._group = placement_group([bundle], strategy="STRICT_PACK", name=f"lylm {self.spec.name}")
        ready, _ = ray.wait([self._group.ready()], timeout=timeout)
        if not ready:
            remove_placement_group(self._group)
            self._group = None
            raise TimeoutError(
                f"Ray found no node with {bundle} free for {self.spec.name} within {timeout:g} s "
                f"(ray status lists the cluster's resources)"
            )
        args = dict(self.spec.engine_args)
        command = headless_command(str(args["model"]), self.remote.address, self.remote.port, serve_flags(args))
        actor = _core_actor().options(
            num_cpus=placement.cpus,
            num_gpus=placement.gpus,
            max_concurrency=4,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=self._group),
        )
        self._actor = actor.remote(command, headless_environment(self.remote.address, {}), self.remote.address,
                                   self.remote.port)
        self._run = self._actor.run.remote()
        self.node = ray.get(self._actor.node.remote(), timeout=timeout)
        logger.info("%s: engine core placed through Ray on node %s", self.spec.name, self.node)

    def stop(self) -> None:
        """Stop the core (gracefully, then the actor is killed) and free its placement."""
        import ray
        from ray.util.placement_group import remove_placement_group

        actor, self._actor = self._actor, None
        group, self._group = self._group, None
        if actor is not None:
            try:
                actor.stop.remote()
                ray.wait([self._run], timeout=30)
            except Exception:
                logger.exception("%s: stopping the Ray-placed core raised", self.spec.name)
            ray.kill(actor)
        if group is not None:
            remove_placement_group(group)
