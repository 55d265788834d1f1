"""Admission control: per-model bounds on what may be in flight, refused at once beyond them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ._config import PoolConfig
from ._exceptions import OverloadedError, UnknownModelError
from ._instance import Instance
from ._request import RequestInfo


class Admission:
    """The pool's admission limits: requests and tokens in flight per model.

    Limits come from the config's ``limits``, overridden by the pool's options
    (one number for every model, or a dict by model name). A request beyond them
    raises :class:`OverloadedError` instead of queueing without bound.
    """

    def __init__(
        self,
        config: PoolConfig,
        *,
        max_requests: int | Mapping[str, int] | None,
        max_tokens: int | Mapping[str, int] | None,
    ) -> None:
        self.max_requests = {
            **{m.name: m.max_in_flight_requests for m in config.models if m.max_in_flight_requests},
            **_per_model(max_requests, config, "max_in_flight_requests"),
        }
        self.max_tokens = {
            **{m.name: m.max_in_flight_tokens for m in config.models if m.max_in_flight_tokens},
            **_per_model(max_tokens, config, "max_in_flight_tokens"),
        }

    def admit(self, group: Sequence[Instance], request: RequestInfo) -> None:
        """Raise :class:`OverloadedError` if ``request`` would take its model past a limit."""
        limit = self.max_requests.get(request.model)
        if limit is not None:
            in_flight = sum(i.in_flight_requests for i in group)
            if in_flight >= limit:
                raise OverloadedError(request.model, f"{in_flight} requests in flight (limit {limit})")
        limit = self.max_tokens.get(request.model)
        if limit is not None:
            tokens = sum(i.in_flight_tokens for i in group)
            # One request alone may exceed the limit; it is admitted when nothing else runs.
            if tokens and tokens + request.token_budget > limit:
                raise OverloadedError(
                    request.model, f"{tokens} tokens in flight + {request.token_budget} > limit {limit}"
                )


def _per_model(value: int | Mapping[str, int] | None, config: PoolConfig, name: str) -> dict[str, int]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        for model in value:
            if model not in config.model_names:
                raise UnknownModelError(model, config.model_names)
        limits = dict(value)
    else:
        limits = {model: value for model in config.model_names}
    for model, limit in limits.items():
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"{name}[{model!r}] must be a positive integer (got {limit!r})")
    return limits
