"""Least outstanding requests, relative to weight."""

from __future__ import annotations

import random
from collections.abc import Sequence

from .._balancer import Balancer
from .._instance import Instance
from .._request import RequestInfo
from ._least import pick_lowest


class LeastOutstanding(Balancer):
    """Sends each request to the instance with the fewest in-flight requests per weight.

    The score is ``(in_flight_requests + 1) / weight``: the load the instance
    would carry after taking the request, so at idle the heavier instance is
    preferred and under load the split follows the weights. Ties are broken at
    random.
    """

    reads_token_ids = False

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def choose(self, candidates: Sequence[Instance], request: RequestInfo) -> Instance:
        """Pick the least loaded candidate by request count."""
        return pick_lowest(
            candidates, lambda c: (c.in_flight_requests + 1) / c.weight, self._rng
        )
