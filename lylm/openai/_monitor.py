"""What ``/health`` and ``/metrics`` report, and where HTTP responses are counted.

The routes ask a :class:`Monitor`. By default it is this process's pool
(:class:`LocalMonitor`); a server whose pool is spread over several processes
(:mod:`lylm.server`'s front-end workers) passes one that asks the process that
sees the whole pool. The routes stay the same whichever process runs them.
"""

from __future__ import annotations

from typing import Any, Protocol

from .._pool import EnginePool
from ._metrics import PoolMetrics


class Monitor(Protocol):
    """The source of ``/health``, ``/metrics`` and the HTTP response counts."""

    async def health(self) -> tuple[int, dict[str, Any]]:
        """``/health``'s status code and body."""

    async def metrics(self) -> bytes:
        """``/metrics``' body, in Prometheus' text format."""

    def count_response(self, route: str, status: int) -> None:
        """Count one HTTP response (``lylm_http_responses``)."""


def health_report(pool: EnginePool) -> tuple[int, dict[str, Any]]:
    """``/health``'s status code and body for ``pool``: every engine's state and load."""
    models: dict[str, Any] = {}
    for model in pool.models:
        engines = [
            {
                "engine": instance.index,
                "name": instance.name,
                "state": instance.state,
                "healthy": instance.healthy,
                "restarts": instance.restarts,
                "last_error": instance.last_error,
                "weight": instance.weight,
                # A remote instance: where its engine core attaches (null: a local engine).
                "remote": None if instance.spec.remote is None else instance.spec.remote.describe(),
                "in_flight_requests": instance.in_flight_requests,
                "in_flight_tokens": instance.in_flight_tokens,
            }
            for instance in pool.instances()
            if instance.model == model
        ]
        models[model] = {"healthy": any(e["healthy"] for e in engines), "engines": engines}
    # Ready while every model has a healthy engine; a draining server is not ready, so
    # that load balancers stop sending it requests, and nor is one whose pool is closing
    # (pool.draining says both): its engines may still look healthy while they stop.
    ok = bool(models) and all(m["healthy"] for m in models.values()) and not pool.draining
    status = "draining" if pool.draining else "ok" if ok else "unavailable"
    return (200 if ok else 503), {"status": status, "models": models}


class LocalMonitor:
    """The pool of this process, seen whole: its books and its :class:`PoolMetrics`."""

    def __init__(self, pool: EnginePool, metrics: PoolMetrics | None = None) -> None:
        self.pool = pool
        self.pool_metrics = metrics if metrics is not None else PoolMetrics(pool)

    async def health(self) -> tuple[int, dict[str, Any]]:
        return health_report(self.pool)

    async def metrics(self) -> bytes:
        return self.pool_metrics.render()

    def count_response(self, route: str, status: int) -> None:
        self.pool_metrics.http_responses.labels(route, str(status)).inc()
