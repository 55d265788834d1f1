"""A front-end worker's ``/health`` and ``/metrics``: the hub's, which sees every worker."""

from __future__ import annotations

from typing import Any

from .._exceptions import LylmError
from ..openai._dispatch import to_openai_error
from ..openai._monitor import health_report
from ._worker_pool import WorkerPool


class HubMonitor:
    """:class:`lylm.openai.Monitor` for a front-end worker: the whole pool, as the hub sees it."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    async def health(self) -> tuple[int, dict[str, Any]]:
        if self.pool.draining:
            # This worker is on its way out, whatever the others do: a load balancer
            # should stop sending it requests.
            return health_report(self.pool)
        try:
            status, body = await self.pool.hub.call("health")
        except LylmError as exc:  # the hub is stalled or gone: this server cannot serve now
            return 503, {"status": "unavailable", "error": str(exc)}
        return int(status), dict(body)

    async def metrics(self) -> bytes:
        try:
            return bytes(await self.pool.hub.call("metrics"))
        except LylmError as exc:
            raise to_openai_error(exc) from exc

    def count_response(self, route: str, status: int) -> None:
        self.pool.hub.count_response(route, status)
