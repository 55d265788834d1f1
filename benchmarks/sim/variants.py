"""Balancer variants the scenarios show beside the built-ins (import strings for ``--extra``)."""

from __future__ import annotations

import random

from lylm.balancers import PrefixAware


class PrefixOnly(PrefixAware):
    """``prefix_aware`` with session affinity off: what prefix hashing alone achieves."""

    def __init__(self, *, rng: random.Random | None = None) -> None:
        super().__init__(session_affinity=False, rng=rng)
