"""The engine interface: what the pool needs from one inference engine.

lylm ships one implementation for vLLM (:class:`lylm.VLLMEngine`) and a test double
(:class:`lylm.testing.FakeEngine`). Implement :class:`Engine` to pool anything
else that can stream tokens.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import attrs


@attrs.frozen
class RenderedPrompt:
    """A prompt tokenized once by one engine of a model, ready for any engine of it.

    ``token_ids`` is what the balancer counts; ``payload`` is the engine's own
    ready-to-run form of the same prompt (vLLM's rendered engine input), or
    ``None`` when the token ids alone are the prompt.
    """

    token_ids: Sequence[int] = attrs.field(repr=lambda ids: f"<{len(ids)} tokens>")
    payload: Any = attrs.field(default=None, repr=False)


@attrs.frozen
class EngineStep:
    """One item of an engine's output stream.

    ``output`` goes to the caller unchanged (vLLM's ``RequestOutput``);
    ``new_tokens`` is how many tokens this step generated over all sequences,
    which is what the pool's books need.
    """

    output: Any
    new_tokens: int
    finished: bool


@attrs.define
class EngineSignals:
    """Live load signals an engine reports about itself (zero when it reports none)."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class Engine(abc.ABC):
    """One inference engine instance, as the pool drives it.

    Lifecycle: ``await start()`` once (may block for a long time, but must not
    block the event loop), then ``generate``/``abort`` any number of times, then
    ``await shutdown()`` (idempotent; must leave no process behind).
    """

    signals: EngineSignals

    def __init__(self) -> None:
        self.signals = EngineSignals()

    def precheck(self) -> None:
        """Cheap checks of the engine's configuration (no heavy import, well under a
        second); raise :class:`~lylm.ConfigError` naming the path (optional; a no-op by
        default). A pool calls it for every instance before any :meth:`validate`, so that
        a typo in the last instance is named before the first one's slow checks."""

    def validate(self) -> None:
        """Check everything about the engine's configuration that can be checked without
        starting it; raise :class:`~lylm.ConfigError` naming the path (optional; a no-op by
        default). A pool calls it for every instance before it starts any engine, in a
        worker thread (it may import vLLM: seconds, the first time)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the engine; return when it is ready to serve."""

    @property
    @abc.abstractmethod
    def healthy(self) -> bool:
        """False once the engine has failed and cannot serve."""

    def failure_reason(self) -> str | None:
        """Why the engine is unhealthy, if it knows (shown in logs and ``/health``)."""
        return None

    def check(self) -> None:
        """Look for failures that no flag reports by itself (optional; a no-op by default).

        The pool's health watch calls it every ``health_interval`` seconds, just
        before reading :attr:`healthy`; an engine whose process it does not own
        (attached to a core another process launched) looks at that process here,
        so that :attr:`healthy` itself stays a cheap read on every request.
        """

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """The longest prompt plus output the engine accepts, in tokens."""

    @abc.abstractmethod
    def default_sampling_params(self) -> Any:
        """Sampling parameters to use when the caller gives none."""

    def sampling_defaults(self) -> Mapping[str, Any]:
        """The model's own sampling defaults (its generation config), by sampling-parameter
        name, for a request that leaves them out (optional; none by default)."""
        return {}

    def output_parsing(self) -> Any:
        """How tool calls and reasoning are found in this engine's output, for the OpenAI
        adapter (optional; None: output is plain content). :class:`lylm.VLLMEngine`
        returns vLLM's own parsers, composed as ``vllm serve`` composes them."""
        return None

    @abc.abstractmethod
    async def render_text(self, text: str) -> RenderedPrompt:
        """Tokenize a plain prompt with the engine's tokenizer."""

    async def decode(self, token_ids: Sequence[int]) -> str:
        """Detokenize ``token_ids`` with the engine's tokenizer (optional; echoing a
        prompt given as token ids needs it)."""
        raise NotImplementedError(f"{type(self).__name__} cannot detokenize")

    @abc.abstractmethod
    async def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> RenderedPrompt:
        """Apply the engine's chat template to ``messages`` and tokenize the result."""

    @abc.abstractmethod
    def generate(
        self, request_id: str, prompt: RenderedPrompt, sampling_params: Any
    ) -> AsyncGenerator[EngineStep, None]:
        """Stream the request's outputs; closing the iterator early aborts the request."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Abort a request; a no-op if it has already ended."""

    @abc.abstractmethod
    def num_unfinished_requests(self) -> int:
        """Requests the engine itself still holds (its own count, not the pool's)."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop the engine and every process it started; safe to call twice."""
