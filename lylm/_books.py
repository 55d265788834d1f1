"""The pool's books: what each instance has in flight and has served.

:class:`Books` is the only writer of an instance's counters. A request's account
on its instance is one :class:`Tally`: booked at dispatch (:meth:`Books.begin`),
advanced as the engine works, closed once (:meth:`Books.end`) with one
:class:`RequestEnd`, whatever happened (completion, error, cancellation). In one
process :meth:`Books.serve` does all three around the engine's stream, the end in
one ``finally``. The hub of a server with front-end workers keeps tallies for the
requests the workers serve and brings them to the state the workers report
(:meth:`Tally.sync`), so that a lost message delays the books but cannot corrupt
them. Request observers and the balancer's ``on_finish`` hook hear of each end from
here too.
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
from ._request import RequestEnd, RequestInfo, RequestRecord

logger = logging.getLogger("lylm")


class Tally:
    """One request's running account on its instance: the prompt counted once, with the
    first step; the token budget booked at dispatch coming down as tokens are done (never
    below zero: a request may stop short of its budget). Written through :class:`Books`
    alone (the simulator replays the pool's books with it too).

    ``ticket`` is the dispatcher's name for this dispatch: 0 in one process; for a
    front-end worker, the hub's booking.
    """

    __slots__ = ("instance", "request", "remaining", "prefill", "prefilled", "generated", "booked", "closed", "ticket")

    def __init__(self, instance: Instance, request: RequestInfo, ticket: int = 0) -> None:
        self.instance = instance
        self.request = request
        self.ticket = ticket
        #: Tokens of the request's budget still booked in ``instance.in_flight_tokens``.
        self.remaining = request.token_budget
        #: Prompt tokens the engine is expected to prefill (the predicted cached ones left out).
        cached = request.cached_tokens.get(instance.name, 0) if request.cached_tokens else 0
        self.prefill = max(0, request.prompt_tokens - cached)
        self.prefilled = False
        self.generated = 0
        self.booked = False
        self.closed = False

    def step(self, new_tokens: int) -> None:
        """Book one engine step that produced ``new_tokens`` (over all sequences)."""
        instance = self.instance
        done = new_tokens
        self.generated += new_tokens
        if not self.prefilled:
            self._prefilled()
            done += self.request.prompt_tokens
        instance.generated_tokens += new_tokens
        done = min(done, self.remaining)
        self.remaining -= done
        instance.in_flight_tokens -= done

    def _prefilled(self) -> None:
        """The engine has prefilled the prompt: counted as served, out of the prefill queue."""
        self.prefilled = True
        self.instance.prompt_tokens += self.request.prompt_tokens
        if self.booked:
            self.instance.in_flight_prefill_tokens -= self.prefill

    def sync(self, remaining: int, generated: int) -> None:
        """Bring the account to the state another process reports for the same request:
        ``remaining`` budget, ``generated`` tokens. Idempotent, and never moves backwards.

        The prompt counts as prefilled once any of the budget is done: the first step
        always does the prompt (and vLLM's first output carries a token).
        """
        if self.closed:
            return
        instance = self.instance
        remaining = max(0, min(remaining, self.remaining))
        if not self.prefilled and remaining < self.request.token_budget:
            self._prefilled()
        if generated > self.generated:
            instance.generated_tokens += generated - self.generated
            self.generated = generated
        instance.in_flight_tokens -= self.remaining - remaining
        self.remaining = remaining


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
        tally: Tally,
        rendered: RenderedPrompt,
        sampling_params: Any,
        balancer: Balancer,
    ) -> AsyncGenerator[Any, None]:
        """Run ``tally``'s request on its instance's engine, keeping its books; yield the engine's outputs."""
        instance, request = tally.instance, tally.request
        outcome: Outcome = "failed"
        started = self._clock()
        first_token: float | None = None
        cached: int | None = None
        self.begin(tally)
        try:
            steps = instance.engine.generate(request.request_id, rendered, sampling_params)
            try:
                async for step in steps:
                    if first_token is None and step.new_tokens:
                        first_token = self._clock() - started
                    if cached is None:  # vLLM's RequestOutput says, from its first output on
                        cached = getattr(step.output, "num_cached_tokens", None)
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
        finally:
            end = RequestEnd(outcome, tally.remaining, tally.generated, first_token, self._clock() - started, cached)
            self.end(tally, end, balancer)

    def begin(self, tally: Tally) -> None:
        """Book ``tally``'s request as dispatched to its instance: in flight, with its whole token budget."""
        if tally.booked:
            return
        tally.booked = True
        instance = tally.instance
        instance.in_flight_requests += 1
        instance.in_flight_tokens += tally.remaining
        if not tally.prefilled:
            instance.in_flight_prefill_tokens += tally.prefill
        instance.dispatched += 1

    def end(self, tally: Tally, end: RequestEnd, balancer: Balancer) -> None:
        """Book the end of ``tally``'s request, once (a second end is ignored), and tell the
        balancer and the observers."""
        if tally.closed or not tally.booked:
            return
        if end.remaining != tally.remaining or end.generated_tokens != tally.generated:
            tally.sync(end.remaining, end.generated_tokens)  # an end told by another process
        tally.closed = True
        instance, request = tally.instance, tally.request
        instance.in_flight_requests -= 1
        instance.in_flight_tokens -= tally.remaining
        if not tally.prefilled:
            instance.in_flight_prefill_tokens -= tally.prefill
            tally.prefilled = True
        tally.remaining = 0
        outcome = end.outcome
        if outcome == "completed":
            instance.completed += 1
        elif outcome == "aborted":
            instance.aborted += 1
        elif outcome == "bounced":
            instance.bounced += 1
        else:
            instance.failed += 1
        balancer.on_finish(instance, request, outcome)
        if self.observers:
            self._tell(
                RequestRecord(
                    request, instance, outcome, end.time_to_first_token, end.latency, end.generated_tokens,
                    end.cached_tokens,
                )  # fmt: skip
            )

    def _tell(self, record: RequestRecord) -> None:
        for observer in self.observers:
            try:
                observer(record)
            except Exception:
                logger.exception("request observer %r failed", observer)
