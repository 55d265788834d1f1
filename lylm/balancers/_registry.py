"""Built-in balancers by name, imported lazily ("name": "module:Class")."""

from __future__ import annotations

BALANCERS: dict[str, str] = {
    "kv_aware": "lylm.balancers.kv_aware:KVAware",
    "least_outstanding": "lylm.balancers.least_outstanding:LeastOutstanding",
    "prefix_aware": "lylm.balancers.prefix_aware:PrefixAware",
    "token_aware": "lylm.balancers.token_aware:TokenAware",
    "weighted_random": "lylm.balancers.weighted_random:WeightedRandom",
}

DEFAULT_BALANCER = "weighted_random"
