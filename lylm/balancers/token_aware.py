"""Fewest tokens in flight, relative to weight."""

from __future__ import annotations

import random
from collections.abc import Sequence

from .._balancer import Balancer
from .._instance import Instance
from .._request import RequestInfo
from ._least import pick_lowest


class TokenAware(Balancer):
    """Sends each request to the instance with the fewest in-flight tokens per weight.

    In-flight tokens are prompt tokens not yet prefilled plus decode budget not
    yet used, so one long prompt counts for what it costs, not as one request.
    The score is ``(in_flight_tokens + request.token_budget) / weight``. Ties are
    broken at random.
    """

    reads_token_ids = False

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def choose(self, candidates: Sequence[Instance], request: RequestInfo) -> Instance:
        """Pick the least loaded candidate by token count."""
        budget = request.token_budget
        return pick_lowest(
            candidates, lambda c: (c.in_flight_tokens + budget) / c.weight, self._rng
        )
