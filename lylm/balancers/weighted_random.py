"""Weighted random: the seed's policy, traffic split in proportion to weights."""

from __future__ import annotations

import random
from collections.abc import Sequence

from .._balancer import Balancer
from .._instance import Instance
from .._request import RequestInfo


class WeightedRandom(Balancer):
    """Picks an instance at random with probability proportional to its weight.

    It ignores load, so it suits identical requests on instances whose weights
    match their capacity; over many requests the split converges to the weights.
    """

    reads_token_ids = False

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def choose(self, candidates: Sequence[Instance], request: RequestInfo) -> Instance:
        """Draw one candidate, weighted by ``weight``."""
        if len(candidates) == 1:
            return candidates[0]
        total = 0.0
        for c in candidates:
            total += c.weight
        point = self._rng.random() * total
        for c in candidates:
            point -= c.weight
            if point < 0.0:
                return c
        # Float rounding can leave the point a hair above zero after the last one.
        return candidates[-1]
