"""Routing: each model's balancer chooses an instance; its shadows choose too, unheeded."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import attrs

from ._balancer import Balancer
from ._config import PoolConfig
from ._exceptions import LylmError, NoHealthyEngineError, UnknownModelError
from ._instance import Instance
from ._kv_routing import KVRouting
from ._request import RequestInfo
from ._shadow import ShadowReport, Shadows
from .balancers import resolve_balancer

if TYPE_CHECKING:
    from .balancers._resolve import BalancerLike


class Router:
    """The balancer of every model, and the shadow balancers beside them."""

    def __init__(
        self,
        config: PoolConfig,
        *,
        balancer: BalancerLike | None,
        balancers: Mapping[str, BalancerLike] | None,
        rng: random.Random,
    ) -> None:
        self._models = config.model_names
        overrides = dict(balancers or {})
        for name in overrides:
            if name not in config.model_names:
                raise UnknownModelError(name, config.model_names)
        # Resolved here, before any engine starts, so a bad name costs nothing.
        self._balancers: dict[str, Balancer] = {}
        for model in config.models:
            choice = overrides.get(model.name, balancer)
            quoted = json.dumps(model.name)
            path = f"balancers[{quoted}]" if model.name in overrides else "balancer"
            if choice is None:
                choice, path = model.balancer, f"models[{quoted}].balancer"
            child_rng = random.Random(rng.getrandbits(64))
            self._balancers[model.name] = resolve_balancer(choice, rng=child_rng, path=path)
        # What each balancer computes from a request where it was rendered (Balancer.preparer).
        self._preparers = {name: b.preparer() for name, b in self._balancers.items()}
        self._shadows = Shadows()
        #: The engines' KV events, for the models whose balancer routes by them (set by the pool).
        self.kv: KVRouting | None = None

    def balancer(self, model: str) -> Balancer:
        """The balancer that chooses among ``model``'s instances."""
        if model not in self._balancers:
            raise UnknownModelError(model, self._models)
        return self._balancers[model]

    def prepare(self, request: RequestInfo) -> RequestInfo:
        """``request`` as its model's balancer wants it (see :meth:`Balancer.preparer`)."""
        preparer = self._preparers.get(request.model)
        return request if preparer is None else preparer(request)

    def kv_models(self) -> list[str]:
        """The models whose balancer routes by the engines' KV events (:attr:`Balancer.kv_events`)."""
        return [name for name, b in self._balancers.items() if b.kv_events]

    def choose(
        self, group: Sequence[Instance], request: RequestInfo, exclude: Sequence[Instance] = ()
    ) -> tuple[Instance, RequestInfo]:
        """The instance that serves ``request``: the balancer's pick among the healthy ones;
        and the request as the balancer saw it (``cached_tokens`` filled in, for a balancer
        that routes by KV events)."""
        if exclude:
            candidates = [i for i in group if i.healthy and not any(i is x for x in exclude)]
        else:
            candidates = [i for i in group if i.healthy]
        if not candidates:
            raise NoHealthyEngineError(request.model)
        balancer = self._balancers[request.model]
        if balancer.kv_events:
            cached = self.kv.overlaps(candidates, request) if self.kv is not None else {}
            request = attrs.evolve(request, cached_tokens=cached)
        chosen = balancer.choose(candidates, request)
        if not any(chosen is c for c in candidates):
            raise LylmError(
                f"{type(balancer).__name__}.choose() returned {chosen!r}, "
                "which is not one of the candidates it was given"
            )
        # Shadow mode: candidates choose too, after the fact; never raises.
        if self._shadows:
            self._shadows.observe(candidates, request, chosen)
        return chosen, request

    def add_shadow(self, model: str, balancer: BalancerLike, *, name: str | None, rng: random.Random | None) -> None:
        """See :meth:`EnginePool.add_shadow`."""
        if model not in self._balancers:
            raise UnknownModelError(model, self._models)
        shadow = resolve_balancer(balancer, rng=rng, path="shadow")
        if name is None:
            name = balancer if isinstance(balancer, str) else type(shadow).__name__
        self._shadows.add(model, name, shadow)

    def remove_shadow(self, model: str, name: str) -> None:
        """Stop the shadow ``name`` of ``model``."""
        self._shadows.remove(model, name)

    def shadow_report(self, model: str | None = None) -> list[ShadowReport]:
        """Agreement and choice counts of ``model``'s shadows (or of every model's)."""
        return self._shadows.reports(model)
