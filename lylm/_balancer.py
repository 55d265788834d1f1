"""The Balancer extension point: one method that picks an engine instance."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._instance import Instance, Outcome
    from ._request import RequestInfo


class Balancer(abc.ABC):
    """Chooses which engine instance of a model serves each request.

    Write a policy by overriding :meth:`choose`. It runs on the event loop for
    every request, so it must be quick and must not do I/O. ``candidates`` are
    the model's healthy instances (never empty); read their books
    (``in_flight_requests``, ``in_flight_tokens``, ``weight``, ``running``,
    ``waiting``, ``kv_cache_usage``, ``prefix_cache_queries``, ``prefix_cache_hits``)
    but do not write them: the pool keeps the books.

    Example, a policy that prefers the instance with the most free KV cache::

        from lylm import Balancer

        class MostFreeCache(Balancer):
            def choose(self, candidates, request):
                return min(candidates, key=lambda c: c.kv_cache_usage)

        pool = EnginePool.from_config("config.json", balancer=MostFreeCache())

    Randomness should come from an injected ``random.Random`` so tests can seed it.
    """

    @abc.abstractmethod
    def choose(self, candidates: Sequence[Instance], request: RequestInfo) -> Instance:
        """Return one of ``candidates`` to serve ``request``."""

    def on_finish(self, instance: Instance, request: RequestInfo, outcome: Outcome) -> None:
        """Called when a request ends (completed, failed or aborted). Optional; no-op here."""
