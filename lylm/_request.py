"""What a balancer knows about one request."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from ._instance import Instance, Outcome


@attrs.frozen
class RequestInfo:
    """One request as the pool sees it after rendering, before an engine is chosen.

    ``prompt_tokens`` is exact: the prompt was tokenized by an engine of the model,
    with its own tokenizer and chat template. ``max_tokens`` is the decode budget of
    each of the ``n`` sequences. ``prefix_hashes`` and ``session_key`` are room for
    cache- and session-aware balancers; the pool fills ``session_key`` from the
    caller and leaves ``prefix_hashes`` empty unless a balancer asks for them.

    ``cached_tokens``: for a balancer that declares ``kv_events = True``, how many of the
    prompt's tokens each candidate's engine holds in its prefix cache (by instance name),
    from the engines' own KV events; a candidate the pool cannot tell for (no event
    stream yet, a remote core) is absent. None for other balancers.
    """

    model: str
    request_id: str
    prompt_tokens: int
    max_tokens: int
    n: int = 1
    prompt_token_ids: Sequence[int] = attrs.field(default=(), repr=False, eq=False)
    prefix_hashes: tuple[int, ...] = attrs.field(default=(), repr=False)
    session_key: str | None = None
    cached_tokens: Mapping[str, int] | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def token_budget(self) -> int:
        """Tokens this request may occupy at most: prompt plus every sequence's budget."""
        return self.prompt_tokens + self.max_tokens * self.n


@attrs.frozen
class RequestEnd:
    """How one dispatched request ended, as its front end tells the books: the one record
    that carries an end, in one process or from a front-end worker to the hub.

    ``remaining`` is the token budget still booked when it ended (prompt not yet
    prefilled plus decode budget not used); ``generated_tokens`` the tokens it
    generated over all sequences. Times are seconds from dispatch;
    ``time_to_first_token`` is None when it ended before its first output.
    """

    outcome: Outcome
    remaining: int
    generated_tokens: int = 0
    time_to_first_token: float | None = None
    latency: float = 0.0
    cached_tokens: int | None = None


@attrs.frozen
class RequestRecord:
    """How one dispatched request went: handed to the pool's request observers.

    Times are seconds from dispatch; ``time_to_first_token`` is None when the
    request ended before its first output. ``cached_tokens``: the prompt tokens its engine
    found in its prefix cache, as the engine reported them (None if it did not).
    """

    request: RequestInfo
    instance: Instance
    outcome: Outcome
    time_to_first_token: float | None
    latency: float
    generated_tokens: int
    cached_tokens: int | None = None
