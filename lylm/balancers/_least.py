"""Shared helper: the candidate with the lowest score, ties broken at random."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from .._instance import Instance


def pick_lowest(
    candidates: Sequence[Instance],
    score: Callable[[Instance], float],
    rng: random.Random,
) -> Instance:
    """Return the candidate with the lowest score; ties go to a random one of them.

    A random tie-break matters: at idle every score is equal, and always taking
    the first would load the first instance of every model before the others.
    """
    best: list[Instance] = []
    best_score = float("inf")
    for c in candidates:
        s = score(c)
        if s < best_score:
            best_score = s
            best = [c]
        elif s == best_score:
            best.append(c)
    if len(best) == 1:
        return best[0]
    return best[int(rng.random() * len(best))]
