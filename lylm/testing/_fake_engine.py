"""FakeEngine: an Engine with scripted timing and failures, no model and no process."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import attrs

from .._engine import Engine, EngineStep, RenderedPrompt
from .._exceptions import EngineDeadError, EngineError, InvalidRequestError


@attrs.frozen
class FakeSamplingParams:
    """The sampling parameters a FakeEngine understands (a subset of vLLM's)."""

    max_tokens: int = 16
    n: int = 1


@attrs.frozen
class FakeCompletion:
    """One generated sequence in a FakeOutput, shaped like vLLM's CompletionOutput."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: None = None


@attrs.frozen
class FakeOutput:
    """One streamed step, shaped like vLLM's RequestOutput."""

    request_id: str
    prompt_token_ids: Sequence[int]
    outputs: list[FakeCompletion]
    finished: bool
    num_cached_tokens: int = 0
    prompt: str | None = None
    prompt_logprobs: None = None


class FakeEngine(Engine):
    """An Engine test double whose latency and failures are scripted.

    Tokens are bytes: text renders to its UTF-8 bytes, chat messages to a small
    ChatML-like text first. Each request waits ``prefill_delay`` seconds, then
    yields one token per sequence every ``token_delay`` seconds. ``fail_start``
    makes :meth:`start` raise; ``fail_after`` makes every request raise
    :class:`EngineError` after that many steps; :meth:`kill` makes the engine dead
    and fails the requests it holds with :class:`EngineDeadError`.

    It records what happened for assertions: ``requests`` (request ids in
    dispatch order), ``aborted`` (ids cancelled before they finished) and
    ``started``/``stopped``.
    """

    def __init__(
        self,
        *,
        prefill_delay: float = 0.0,
        token_delay: float = 0.0,
        start_delay: float = 0.0,
        fail_start: BaseException | None = None,
        fail_after: int | None = None,
        max_model_len: int = 4096,
    ) -> None:
        super().__init__()
        self.prefill_delay = prefill_delay
        self.token_delay = token_delay
        self.start_delay = start_delay
        self.fail_start = fail_start
        self.fail_after = fail_after
        self._max_model_len = max_model_len
        self.requests: list[str] = []
        self.aborted: list[str] = []
        self.started = False
        self.stopped = False
        self._dead = False
        self._active: dict[str, anyio.Event] = {}
        self._abort_requested: set[str] = set()

    async def start(self) -> None:
        """Wait ``start_delay``, then start or raise ``fail_start``."""
        await anyio.sleep(self.start_delay)
        if self.fail_start is not None:
            raise self.fail_start
        self.started = True

    @property
    def healthy(self) -> bool:
        """True once started, until killed or shut down."""
        return self.started and not self.stopped and not self._dead

    @property
    def max_model_len(self) -> int:
        """The context length it pretends to have."""
        return self._max_model_len

    def default_sampling_params(self) -> FakeSamplingParams:
        """16 tokens, one sequence."""
        return FakeSamplingParams()

    async def render_text(self, text: str) -> RenderedPrompt:
        """One token per UTF-8 byte."""
        return RenderedPrompt(list(text.encode()))

    async def decode(self, token_ids: Sequence[int]) -> str:
        """Bytes back to text (ids above 255 are not bytes: shown as U+FFFD)."""
        return bytes(t if t < 256 else 0xFF for t in token_ids).decode(errors="replace")

    async def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> RenderedPrompt:
        """A ChatML-like rendering, one token per byte."""
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return await self.render_text(text + "<|im_start|>assistant\n")

    def failure_reason(self) -> str | None:
        """'killed' after :meth:`kill`."""
        return "fake engine was killed" if self._dead else None

    def kill(self) -> None:
        """Make the engine dead: no new requests, held requests fail."""
        self._dead = True
        for event in self._active.values():
            event.set()

    async def generate(
        self, request_id: str, prompt: RenderedPrompt, sampling_params: Any
    ) -> AsyncGenerator[EngineStep, None]:
        """Yield ``max_tokens`` steps of one token per sequence, as scripted."""
        if not self.healthy:
            raise EngineDeadError("fake engine is not running")
        max_tokens = getattr(sampling_params, "max_tokens", None) or 16
        n = getattr(sampling_params, "n", 1) or 1
        if len(prompt.token_ids) + max_tokens > self._max_model_len:
            raise InvalidRequestError(
                f"prompt of {len(prompt.token_ids)} tokens plus {max_tokens} exceeds "
                f"the context of {self._max_model_len}"
            )
        # vLLM's output kinds: DELTA (new tokens only; the default here), CUMULATIVE,
        # FINAL_ONLY (one output at the end).
        kind = getattr(getattr(sampling_params, "output_kind", None), "name", "DELTA")
        generated: list[int] = []
        reported = 0
        self.requests.append(request_id)
        wake = self._active[request_id] = anyio.Event()
        try:
            for step in range(max_tokens):
                delay = self.prefill_delay if step == 0 else self.token_delay
                if delay > 0:
                    with anyio.move_on_after(delay):
                        await wake.wait()
                else:
                    # Zero latency: yield to the loop once, without a timer and a cancel
                    # scope per token (they cost more than the pool's own work).
                    await anyio.lowlevel.checkpoint()
                if self._dead:
                    raise EngineDeadError("fake engine was killed")
                if self.stopped:
                    raise EngineDeadError("fake engine was shut down")
                if request_id in self._abort_requested:
                    # Like vLLM: an aborted request's stream ends with reason "abort".
                    outputs = [FakeCompletion(i, "", [], "abort") for i in range(n)]
                    yield EngineStep(FakeOutput(request_id, prompt.token_ids, outputs, True), 0, True)
                    return
                if self.fail_after is not None and step >= self.fail_after:
                    raise EngineError(f"scripted failure after {step} steps")
                last = step == max_tokens - 1
                generated.append(32 + step % 90)
                if kind == "FINAL_ONLY" and not last:
                    continue
                tokens = generated if kind != "DELTA" else generated[-1:]
                reason = "length" if last else None
                outputs = [
                    FakeCompletion(i, "".join(map(chr, tokens)), list(tokens), reason) for i in range(n)
                ]
                new = n * (len(generated) - reported)
                reported = len(generated)
                yield EngineStep(FakeOutput(request_id, prompt.token_ids, outputs, last), new, last)
        except (GeneratorExit, anyio.get_cancelled_exc_class()):
            self.aborted.append(request_id)
            raise
        finally:
            del self._active[request_id]
            self._abort_requested.discard(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a running request (it ends at its next step)."""
        event = self._active.get(request_id)
        if event is not None:
            self._abort_requested.add(request_id)
            self.aborted.append(request_id)
            event.set()

    def num_unfinished_requests(self) -> int:
        """Requests being generated now."""
        return len(self._active)

    async def shutdown(self) -> None:
        """Stop (requests it still holds fail with EngineDeadError); idempotent."""
        self.stopped = True
        for event in self._active.values():
            event.set()
