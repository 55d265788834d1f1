"""Shadow mode: candidate balancers see live traffic and are scored, but never route it.

For every request the pool routes, each shadow of the model is asked the same
question the active balancer answered (the same candidates, the same books, the
same request) right after it; its answer is counted and thrown away. A shadow that
raises or answers with a non-candidate is counted as an error and routing goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import attrs

from ._balancer import Balancer

if TYPE_CHECKING:
    from ._instance import Instance
    from ._request import RequestInfo

logger = logging.getLogger("lylm")


@attrs.frozen
class ShadowReport:
    """How one shadow balancer's choices compared with the active balancer's, for one model.

    ``decisions`` counts the requests it was asked about; ``agreements`` those where
    it chose the instance the active balancer chose; ``errors`` those where it raised
    or returned something that was not a candidate. ``chosen`` is how often it picked
    each instance (by index in the model's list); ``disagreements`` counts
    ``(active's index, shadow's index)`` pairs where they differed.
    """

    model: str
    name: str
    decisions: int
    agreements: int
    errors: int
    chosen: Mapping[int, int]
    disagreements: Mapping[tuple[int, int], int]
    last_error: str | None

    @property
    def agreement_rate(self) -> float:
        """Agreements over the decisions it answered (errors excluded); 0 before any."""
        answered = self.decisions - self.errors
        return self.agreements / answered if answered else 0.0


class Shadow:
    """One candidate balancer beside one model's active balancer, and its counts."""

    def __init__(self, model: str, name: str, balancer: Balancer) -> None:
        self.model = model
        self.name = name
        self.balancer = balancer
        self.decisions = 0
        self.agreements = 0
        self.errors = 0
        self.chosen: dict[int, int] = {}
        self.disagreements: dict[tuple[int, int], int] = {}
        self.last_error: str | None = None

    def observe(self, candidates: Sequence[Instance], request: RequestInfo, active: Instance) -> None:
        """Ask the shadow what it would choose for ``request``; count; never raise."""
        self.decisions += 1
        try:
            pick = self.balancer.choose(candidates, request)
        except Exception as exc:
            self._error(f"{type(exc).__name__}: {exc}", exc)
            return
        if not any(pick is c for c in candidates):
            self._error(f"choose() returned {pick!r}, which is not one of the candidates", None)
            return
        self.chosen[pick.index] = self.chosen.get(pick.index, 0) + 1
        if pick is active:
            self.agreements += 1
        else:
            key = (active.index, pick.index)
            self.disagreements[key] = self.disagreements.get(key, 0) + 1

    def _error(self, message: str, exc: Exception | None) -> None:
        self.errors += 1
        self.last_error = message
        if self.errors == 1:  # once per shadow: a broken candidate must not flood the log
            logger.warning(
                "shadow balancer %r of model %r failed (routing is unaffected): %s",
                self.name, self.model, message, exc_info=exc,
            )

    def report(self) -> ShadowReport:
        """A snapshot of the counts."""
        return ShadowReport(
            model=self.model,
            name=self.name,
            decisions=self.decisions,
            agreements=self.agreements,
            errors=self.errors,
            chosen=dict(self.chosen),
            disagreements=dict(self.disagreements),
            last_error=self.last_error,
        )


class Shadows:
    """The shadows of every model of a pool."""

    def __init__(self) -> None:
        self._by_model: dict[str, list[Shadow]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_model)

    def add(self, model: str, name: str, balancer: Balancer) -> None:
        """Add a shadow; names are unique per model."""
        group = self._by_model.setdefault(model, [])
        if any(s.name == name for s in group):
            raise ValueError(f"model {model!r} already has a shadow named {name!r}")
        group.append(Shadow(model, name, balancer))

    def remove(self, model: str, name: str) -> None:
        """Remove a shadow by name (KeyError if there is none)."""
        group = self._by_model.get(model, [])
        for i, shadow in enumerate(group):
            if shadow.name == name:
                del group[i]
                if not group:
                    del self._by_model[model]
                return
        raise KeyError(f"model {model!r} has no shadow named {name!r}")

    def observe(self, candidates: Sequence[Instance], request: RequestInfo, active: Instance) -> None:
        """Let every shadow of ``request.model`` choose too."""
        for shadow in self._by_model.get(request.model, ()):
            shadow.observe(candidates, request, active)

    def reports(self, model: str | None = None) -> list[ShadowReport]:
        """Reports of ``model``'s shadows, or of every model's."""
        if model is not None:
            return [s.report() for s in self._by_model.get(model, ())]
        return [s.report() for group in self._by_model.values() for s in group]
