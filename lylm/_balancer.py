"""The Balancer extension point: one method that picks an engine instance."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from ._instance import Instance, Outcome
    from ._request import RequestInfo


class Balancer(abc.ABC):
    """Chooses which engine instance of a model serves each request.

    Write a policy by overriding :meth:`choose`. It runs on the event loop for
    every request, so it must be quick and must not do I/O. ``candidates`` are
    the model's healthy instances (never empty); read their books
    (``in_flight_requests``, ``in_flight_tokens``, ``in_flight_prefill_tokens``,
    ``weight``, ``running``, ``waiting``, ``kv_cache_usage``, ``prefix_cache_queries``,
    ``prefix_cache_hits``) but do not write them: the pool keeps the books.

    Example, a policy that prefers the instance with the most free KV cache::

        from lylm import Balancer

        class MostFreeCache(Balancer):
            def choose(self, candidates, request):
                return min(candidates, key=lambda c: c.kv_cache_usage)

        pool = EnginePool.from_config("config.json", balancer=MostFreeCache())

    Randomness should come from an injected ``random.Random`` so tests can seed it.

    With front-end workers (``lylm serve --workers N``) ``choose`` runs in the hub, a
    process apart from where each request was rendered, and the request travels to it.
    Two optional class-level declarations keep that cheap: ``reads_token_ids = False``
    when ``choose`` never reads ``request.prompt_token_ids`` (then they stay behind:
    a 4,096-token prompt is 20 KB to send), and :meth:`preparer` to compute from them,
    where they are, what ``choose`` needs (``prefix_aware``'s block hashes).
    """

    #: Whether :meth:`choose` reads ``request.prompt_token_ids``. True unless a subclass
    #: says otherwise, so that a policy written before this existed keeps seeing them.
    reads_token_ids: ClassVar[bool] = True

    #: Whether the pool should subscribe to the engines' KV events and fill
    #: ``request.cached_tokens`` per candidate (the prompt's tokens each engine holds
    #: cached). It turns the engines' prefix caching and event publishing on. The pool
    #: names the prompt by ``request.prefix_hashes`` if a preparer made them (they must
    #: then be of 16-token blocks, as ``kv_aware``'s preparer makes them), else by its
    #: token ids.
    kv_events: ClassVar[bool] = False

    @abc.abstractmethod
    def choose(self, candidates: Sequence[Instance], request: RequestInfo) -> Instance:
        """Return one of ``candidates`` to serve ``request``."""

    def preparer(self) -> Callable[[RequestInfo], RequestInfo] | None:
        """A function the pool applies to each request where it was rendered, before
        :meth:`choose` sees it (in one process: just before; with front-end workers: in the
        worker, before the request travels to the hub). Return what ``choose`` needs from
        the prompt, e.g. ``attrs.evolve(request, prefix_hashes=...)``. It must be
        picklable (a module-level function or a ``functools.partial`` of one): front-end
        workers get it from the hub. Optional; None here (the request is unchanged)."""
        return None

    def on_finish(self, instance: Instance, request: RequestInfo, outcome: Outcome) -> None:
        """Called when a request ends (completed, failed, aborted or bounced). Optional; no-op here."""
