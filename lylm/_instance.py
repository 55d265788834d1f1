"""An engine instance inside the pool, and the books the pool keeps for it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import attrs

if TYPE_CHECKING:
    from ._config import EngineSpec
    from ._engine import Engine

Outcome = Literal["completed", "failed", "aborted", "bounced"]
"""How a request ended: ran to its end, failed with an error, was cancelled, or was
bounced: chosen for this instance, it never ran there, because the front end that held
it could not use the instance (a front-end worker still attaching to a restarted
engine core) and asked for another one."""

State = Literal["starting", "healthy", "draining", "dead", "restarting", "stopped"]
"""Where an instance is in its life.

``starting``: its engine is being started (added at runtime, or a remote
instance whose core did not attach while the pool started: it goes ``dead``
and is waited for); ``healthy``: it
serves; ``draining``: it takes no new requests and stops once those in flight end;
``dead``: its engine failed (a restart may follow, after a backoff);
``restarting``: a new engine is being started in its place; ``stopped``: it was
removed from the pool, or the pool is closed. Only ``healthy`` instances are
offered to balancers.

Changes go through :class:`Instance` methods alone, which allow only these moves::

    starting   -> healthy | draining | dead | stopped
    healthy    -> draining | dead | stopped
    draining   -> dead | stopped
    dead       -> restarting | stopped
    restarting -> healthy | dead | stopped
"""

STATES: tuple[State, ...] = ("starting", "healthy", "draining", "dead", "restarting", "stopped")

_MOVES: dict[State, tuple[State, ...]] = {
    "starting": ("healthy", "draining", "dead", "stopped"),
    "healthy": ("draining", "dead", "stopped"),
    "draining": ("dead", "stopped"),
    "dead": ("restarting", "stopped"),
    "restarting": ("healthy", "dead", "stopped"),
    "stopped": (),
}


@attrs.frozen
class EngineStats:
    """A snapshot of one instance's books, for reports, health pages and tests."""

    name: str
    model: str
    #: The instance's position in its model's group (``models[model][index]`` in the config).
    index: int
    #: Its share of traffic, as the balancers read it.
    weight: float
    state: State
    healthy: bool
    restarts: int
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
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    #: Where a remote instance's engine core attaches (``address:port``); None: a local engine.
    remote: str | None = None
    #: Requests chosen for it that never ran there (see :data:`Outcome`).
    bounced: int = 0


class Instance:
    """One engine instance of a model, as balancers see it: its weight and its books.

    The books are plain attributes so that a balancer scanning 64 instances per
    request stays in microseconds; they are written by the pool alone. A
    balancer reads ``weight``, ``in_flight_requests``, ``in_flight_tokens``,
    ``in_flight_prefill_tokens`` and
    the engine's live signals (``running``, ``waiting``, ``kv_cache_usage``) and
    must never assign to them (the contract test suite checks the built-ins).
    """

    __slots__ = (
        "spec",
        "engine",
        "weight",
        "in_flight_requests",
        "in_flight_tokens",
        "in_flight_prefill_tokens",
        "dispatched",
        "completed",
        "failed",
        "aborted",
        "bounced",
        "prompt_tokens",
        "generated_tokens",
        "_state",
        "restarts",
        "last_error",
    )

    def __init__(self, spec: EngineSpec, engine: Engine, *, state: State = "healthy") -> None:
        self.spec = spec
        self.engine = engine
        #: Relative share of traffic; larger takes more.
        self.weight: float = spec.weight
        #: Requests dispatched to this instance and not yet ended.
        self.in_flight_requests = 0
        #: Prompt tokens not yet prefilled plus decode budget not yet used.
        self.in_flight_tokens = 0
        #: Prompt tokens of its requests not yet prefilled, less those predicted cached
        #: (``RequestInfo.cached_tokens``, where the pool routes by KV events): the prefill
        #: work queued there.
        self.in_flight_prefill_tokens = 0
        #: Totals since start: dispatched requests, how they ended, tokens served.
        self.dispatched = 0
        self.completed = 0
        self.failed = 0
        self.aborted = 0
        self.bounced = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self._state: State = state
        #: How many times the pool replaced a failed engine of this instance.
        self.restarts = 0
        #: Why the engine last failed, if it did.
        self.last_error: str | None = None

    def __repr__(self) -> str:
        return (
            f"<Instance {self.name} weight={self.weight:g} state={self.state} "
            f"in_flight={self.in_flight_requests}>"
        )

    @property
    def state(self) -> State:
        """Where the instance is in its life (see :data:`State`)."""
        return self._state

    def _move(self, to: State) -> bool:
        if to not in _MOVES[self._state]:
            return False
        self._state = to
        return True

    def mark_healthy(self) -> bool:
        """Its engine is up (after ``starting``): it joins balancing. False if it was removed meanwhile."""
        return self._state == "starting" and self._move("healthy")

    def mark_draining(self) -> bool:
        """Take it out of balancing while its requests finish. False if it was not serving or starting."""
        return self._move("draining")

    def mark_dead(self, reason: str) -> bool:
        """Its engine failed (``reason`` is kept as ``last_error``).

        False if it was not serving (starting, already dead, or stopped): only the
        first report of one failure acts.
        """
        if self._state == "starting" or not self._move("dead"):
            return False
        self.last_error = reason
        return True

    def mark_not_started(self, reason: str) -> bool:
        """Its engine did not start (a remote instance whose core did not connect while the
        pool started): dead, to be started again. False if it was not starting."""
        if self._state != "starting" or not self._move("dead"):
            return False
        self.last_error = reason
        return True

    def mark_restarting(self) -> bool:
        """A new engine is being started in place of a dead one. False if it is no longer dead."""
        return self._move("restarting")

    def restart_failed(self, reason: str) -> bool:
        """The replacement engine failed to start: dead again. False if it was removed meanwhile."""
        return self._state == "restarting" and self.mark_dead(reason)

    def replace_engine(self, engine: Engine) -> bool:
        """Serve with ``engine``, the restarted replacement of the dead one.

        False (and nothing changes) if the instance was removed while it started:
        the caller then shuts ``engine`` down.
        """
        if self._state != "restarting":
            return False
        self.engine = engine
        self.restarts += 1
        return self._move("healthy")

    def mark_stopped(self) -> None:
        """Removed from the pool, or the pool closed: final."""
        self._state = "stopped"

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
    def gpu_ids(self) -> tuple[int, ...]:
        """GPUs the instance is pinned to (empty: not pinned)."""
        return self.spec.gpu_ids

    @property
    def healthy(self) -> bool:
        """Whether the instance may receive new requests: it is ``healthy`` and so is its engine."""
        return self.state == "healthy" and self.engine.healthy

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

    @property
    def prefix_cache_queries(self) -> int:
        """Prompt tokens the engine looked up in its prefix cache, since start (live signal)."""
        return self.engine.signals.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        """Of those, tokens found cached: prefill it skipped, since start (live signal)."""
        return self.engine.signals.prefix_cache_hits

    def stats(self) -> EngineStats:
        """A snapshot of this instance's books and signals."""
        return EngineStats(
            name=self.name,
            model=self.model,
            index=self.index,
            weight=self.weight,
            state=self.state,
            healthy=self.healthy,
            restarts=self.restarts,
            in_flight_requests=self.in_flight_requests,
            in_flight_tokens=self.in_flight_tokens,
            dispatched=self.dispatched,
            completed=self.completed,
            failed=self.failed,
            aborted=self.aborted,
            prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated_tokens,
            running=self.running,
            waiting=self.waiting,
            kv_cache_usage=self.kv_cache_usage,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            remote=None if self.spec.remote is None else self.spec.remote.describe(),
            bounced=self.bounced,
        )
