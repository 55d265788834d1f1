"""Turn a balancer name, import string, class or instance into a Balancer."""

from __future__ import annotations

import importlib
import inspect
import random
from typing import Union

from .._balancer import Balancer
from .._exceptions import ConfigError
from ._registry import BALANCERS

BalancerLike = Union[str, Balancer, type[Balancer]]
"""A registered name, a ``"module:Class"`` string, a Balancer subclass or an instance."""


def _import(target: str, *, path: str) -> object:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(path, f"cannot import balancer module {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(path, f"module {module_name!r} has no attribute {attr!r}") from None


def resolve_balancer(
    spec: BalancerLike, *, rng: random.Random | None = None, path: str = "balancer"
) -> Balancer:
    """Build a Balancer from a name such as ``"least_outstanding"``, a class or an instance.

    A class (registered or imported) is instantiated with ``rng=rng`` when its
    constructor accepts ``rng``, so seeded pools give seeded balancers. An
    instance is returned as it is. ``path`` names the config value in errors.
    """
    if isinstance(spec, Balancer):
        return spec
    if isinstance(spec, str):
        if spec in BALANCERS:
            target = BALANCERS[spec]
        elif ":" in spec:
            target = spec
        else:
            known = ", ".join(sorted(BALANCERS))
            raise ConfigError(path, f"unknown balancer {spec!r} (known: {known})")
        obj = _import(target, path=path)
    else:
        obj = spec
    if not (isinstance(obj, type) and issubclass(obj, Balancer)):
        raise ConfigError(path, f"{obj!r} is not a Balancer subclass")
    if "rng" in inspect.signature(obj).parameters:
        return obj(rng=rng)  # type: ignore[call-arg]
    return obj()
