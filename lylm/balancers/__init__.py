"""Built-in balancers and the name registry configs use (``"balancer": "token_aware"``)."""

from __future__ import annotations

from ._registry import BALANCERS as BALANCERS
from ._resolve import resolve_balancer as resolve_balancer
from .kv_aware import KVAware as KVAware
from .least_outstanding import LeastOutstanding as LeastOutstanding
from .prefix_aware import PrefixAware as PrefixAware
from .token_aware import TokenAware as TokenAware
from .weighted_random import WeightedRandom as WeightedRandom

__all__ = [
    "BALANCERS",
    "KVAware",
    "LeastOutstanding",
    "PrefixAware",
    "TokenAware",
    "WeightedRandom",
    "resolve_balancer",
]
