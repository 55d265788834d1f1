"""The pool's books: what each instance has in flight and has served.

Every request runs through :meth:`Books.serve`, which is the only writer of an
instance's counters: they go up at dispatch and come down in one ``finally``,
whatever happens (completion, error, cancellation). Request observers and the
balancer's ``on_finish`` hook hear of each request's end from here too.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

import anyio

from ._balancer import Balancer
from ._engine import RenderedPrompt
from ._exceptions import EngineDeadError
from ._instance import Instance, Outcome
from ._request import RequestInfo, RequestRecord

logger = logging.getLogger("lylm")


class Tally:
    """One request's running account on its instance, step by step: the prompt counted
    once, with the first step; the token budget booked at dispatch coming down as tokens
    are done (never below zero: a request may stop short of its budget). Used by
    :meth:`Books.serve` and by anything that replays the pool's books (the simulator)."""

    __slots__ = ("instance", "request", "remaining", "prefilled", "generated")

    def __init__(self, instance: Instance, request: RequestInfo) -> None:
        self.instance = instance
        self.request = request
        #: Tokens of the request's budget still booked in ``instance.in_flight_tokens``.
        self.remaining = request.token_budget
        self.prefilled = False
        self.generated = 0

    def step(self, new_tokens: int) -> None:
        """Book one engine step that produced ``new_tokens`` (over all sequences)."""
        instance = self.instance
        done = new_tokens
        self.generated += new_tokens
        if not self.prefilled:
            self.prefilled = True
            done += self.request.prompt_tokens
            instance.prompt_tokens += self.request.prompt_tokens
        instance.generated_tokens += new_tokens
        done = min(done, self.remaining)
        self.remaining -= done
        instance.in_flight_tokens -= done


class Books:
    """Keeps every instance's request books and tells observers how each request went."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        engine_died: Callable[[Instance, str], None],
    ) -> None:
        self._clock = clock
        self._engine_died = engine_died
        self.observers: list[Callable[[RequestRecord], None]] = []

    async def serve(
        self,
        instance: Instance,
        request: RequestInfo,
        rendered: RenderedPrompt,
        sampling_params: Any,
        balancer: Balancer,
    ) -> AsyncGenerator[Any, None]:
        """Run ``request`` on ``instance``'s engine, keeping its books; yield the engine's outputs."""
        self.begin(instance, request)
        tally = Tally(instance, request)
        outcome: Outcome = "failed"
        started = self._clock()
        first_token: float | None = None
        steps = instance.engine.generate(request.request_id, rendered, sampling_params)
        try:
            async for step in steps:
                if first_token is None and step.new_tokens:
                    first_token = self._clock() - started
                tally.step(step.new_tokens)
                yield step.output
            outcome = "completed"
        except (GeneratorExit, anyio.get_cancelled_exc_class()):
            outcome = "aborted"
            raise
        except EngineDeadError as exc:
            self._engine_died(instance, str(exc))
            raise
        finally:
            if outcome != "completed":
                # Closing the engine's stream aborts the request there; shielded so a
                # cancelled caller still frees the engine's slot.
                with anyio.CancelScope(shield=True):
                    await steps.aclose()
            self.end(
                instance,
                request,
                outcome,
                remaining=tally.remaining,
                first_token=first_token,
                latency=self._clock() - started,
                generated=tally.generated,
                balancer=balancer,
            )

    def begin(self, instance: Instance, request: RequestInfo) -> None:
        """Book ``request`` as dispatched to ``instance``: in flight, with its whole token budget."""
        instance.in_flight_requests += 1
        instance.in_flight_tokens += request.token_budget
        instance.dispatched += 1

    def end(
        self,
        instance: Instance,
        request: RequestInfo,
        outcome: Outcome,
        *,
        remaining: int,
        first_token: float | None,
        latency: float,
        generated: int,
        balancer: Balancer,
    ) -> None:
        """Book the end of ``request`` (``remaining``: its token budget still booked in flight)
        and tell the balancer and the observers."""
        instance.in_flight_requests -= 1
        instance.in_flight_tokens -= remaining
        if outcome == "completed":
            instance.completed += 1
        elif outcome == "aborted":
            instance.aborted += 1
        else:
            instance.failed += 1
        balancer.on_finish(instance, request, outcome)
        if self.observers:
            self._tell(RequestRecord(request, instance, outcome, first_token, latency, generated))

    def _tell(self, record: RequestRecord) -> None:
        for observer in self.observers:
            try:
                observer(record)
            except Exception:
                logger.exception("request observer %r failed", observer)
