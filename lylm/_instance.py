"""An engine instance inside the pool, and the books the pool keeps for it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import attrs

if TYPE_CHECKING:
    from ._config import EngineSpec
    from ._engine import Engine

Outcome = Literal["completed", "failed", "aborted"]
"""How a request ended: ran to its end, failed with an error, or was cancelled."""


@attrs.frozen
class EngineStats:
    """A snapshot of one instance's books, for reports, health pages and tests."""

    name: str
    model: str
    healthy: bool
    in_flight_requests: int
    in_flight_tokens: int
    dispatched: int
    completed: int
    failed: int
    aborted: int
    prompt_tokens: int
    generated_tokens: int
    running: int
    waiting: int
    kv_cache_usage: float


@attrs.define
class _Books:
    # Written only by the pool (counters) and the engine's stat logger (signals).
    in_flight_requests: int = 0
    in_flight_tokens: int = 0
    dispatched: int = 0
    completed: int = 0
    failed: int = 0
    aborted: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0


class Instance:
    """One engine instance of a model, as balancers see it: read-only books and weight.

    Balancers read ``in_flight_requests``, ``in_flight_tokens``, ``weight`` and the
    engine's live signals; only the pool writes the books.
    """

    __slots__ = ("spec", "engine", "_books", "_dead")

    def __init__(self, spec: EngineSpec, engine: Engine) -> None:
        self.spec = spec
        self.engine = engine
        self._books = _Books()
        self._dead = False

    def __repr__(self) -> str:
        return (
            f"<Instance {self.name} weight={self.weight:g} healthy={self.healthy} "
            f"in_flight={self._books.in_flight_requests}>"
        )

    @property
    def name(self) -> str:
        """The instance's config path, such as ``models["m"][1]``."""
        return self.spec.name

    @property
    def model(self) -> str:
        """The served model name."""
        return self.spec.model

    @property
    def index(self) -> int:
        """Position in the model's instance list."""
        return self.spec.index

    @property
    def weight(self) -> float:
        """Relative share of traffic; larger takes more."""
        return self.spec.weight

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        """GPUs the instance is pinned to (empty: not pinned)."""
        return self.spec.gpu_ids

    @property
    def healthy(self) -> bool:
        """Whether the instance may receive new requests."""
        return not self._dead and self.engine.healthy

    @property
    def in_flight_requests(self) -> int:
        """Requests dispatched to this instance and not yet ended."""
        return self._books.in_flight_requests

    @property
    def in_flight_tokens(self) -> int:
        """Prompt tokens not yet prefilled plus decode budget not yet used."""
        return self._books.in_flight_tokens

    @property
    def running(self) -> int:
        """Requests the engine's scheduler runs now (live signal; 0 if unknown)."""
        return self.engine.signals.running

    @property
    def waiting(self) -> int:
        """Requests queued in the engine's scheduler (live signal; 0 if unknown)."""
        return self.engine.signals.waiting

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the engine's KV cache in use, 0..1 (live signal; 0 if unknown)."""
        return self.engine.signals.kv_cache_usage

    def stats(self) -> EngineStats:
        """A snapshot of this instance's books and signals."""
        b = self._books
        return EngineStats(
            name=self.name,
            model=self.model,
            healthy=self.healthy,
            in_flight_requests=b.in_flight_requests,
            in_flight_tokens=b.in_flight_tokens,
            dispatched=b.dispatched,
            completed=b.completed,
            failed=b.failed,
            aborted=b.aborted,
            prompt_tokens=b.prompt_tokens,
            generated_tokens=b.generated_tokens,
            running=self.running,
            waiting=self.waiting,
            kv_cache_usage=self.kv_cache_usage,
        )
