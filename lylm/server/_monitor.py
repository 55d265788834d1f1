"""A front-end worker's ``/health`` and ``/metrics``: the hub's, which sees every worker."""

from __future__ import annotations

from typing import Any

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
        status, body = await self.pool.hub.call("health")
        return int(status), dict(body)

    async def metrics(self) -> bytes:
        return bytes(await self.pool.hub.call("metrics"))

    def count_response(self, route: str, status: int) -> None:
        self.pool.hub.count_response(route, status)
