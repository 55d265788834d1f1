"""The exceptions lylm raises.

Every error lylm raises on purpose derives from :class:`LylmError`::

    LylmError
    ├── ConfigError              a configuration value is wrong (also a ValueError)
    ├── UnknownModelError        a request names a model the pool does not serve (also a LookupError)
    ├── EngineStartError         an engine instance failed to start
    ├── NoHealthyEngineError     every instance of the requested model is unhealthy
    ├── OverloadedError          the model is at its admission limit; retry later
    ├── ShuttingDownError        the pool is draining before shutdown (or closed) and takes no new requests
    ├── HubUnavailableError      a front-end worker's hub did not answer in time; retry shortly
    ├── InvalidRequestError      the request cannot be served as asked (also a ValueError)
    │   ├── PromptError          ... its prompt could not be rendered (tokenizer, chat template)
    │   └── ContextLengthError   ... its prompt plus max_tokens exceed the context
    └── EngineError              an engine failed while serving a request
        └── EngineDeadError      ... and will not serve again

Foreign errors (vLLM's ``EngineDeadError``, ``EngineGenerateError``) are translated
into this tree at one boundary, the vLLM engine adapter; the original stays
available as ``__cause__``.
"""

from __future__ import annotations

from collections.abc import Iterable


class LylmError(Exception):
    """Base class of every error lylm raises on purpose."""


class ConfigError(LylmError, ValueError):
    """A configuration value is wrong; the message starts with the path of the value.

    ``path`` is the location of the offending value, such as
    ``models["Qwen/Qwen2.5-7B-Instruct"][1].devices.weight``, or ``""`` when the
    whole document is at fault (invalid JSON, wrong top-level type).
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.reason = message
        super().__init__(f"{path}: {message}" if path else message)


class UnknownModelError(LylmError, LookupError):
    """A request named a model that the pool does not serve."""

    def __init__(self, model: str, served: Iterable[str]) -> None:
        self.model = model
        self.served = tuple(served)
        listing = ", ".join(repr(name) for name in self.served) or "none"
        super().__init__(f"model {model!r} is not served here; served models: {listing}")

    def __str__(self) -> str:
        # LookupError (like KeyError) would otherwise repr() the message.
        return str(self.args[0])


class EngineStartError(LylmError):
    """An engine instance failed to start; ``instance`` names it (``models["m"][0]``).

    ``root_cause``: the line of the engine core's own output that names why, when lylm
    found one ("RuntimeError: Cannot find any model weights with ..."); the message then
    ends with it."""

    def __init__(self, instance: str, message: str, *, root_cause: str | None = None) -> None:
        self.instance = instance
        self.root_cause = root_cause
        super().__init__(f"{instance}: engine failed to start: {message}")


class UnsupportedVLLMError(LylmError):
    """The installed vLLM lacks something lylm relies on (a version outside the range lylm
    supports): the message names the version, the range and what is missing."""


class NoHealthyEngineError(LylmError):
    """Every instance of the requested model is unhealthy (or none is running)."""

    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__(f"no healthy engine serves model {model!r}")


class OverloadedError(LylmError):
    """The model already has as many requests (or tokens) in flight as its limit allows."""

    def __init__(self, model: str, message: str, *, retry_after: float = 1.0) -> None:
        self.model = model
        self.retry_after = retry_after
        super().__init__(f"model {model!r} is at capacity: {message}")


class ShuttingDownError(LylmError):
    """The pool is draining before shutdown, or closed: new requests are refused."""

    def __init__(self, message: str = "the server is shutting down and takes no new requests") -> None:
        super().__init__(message)


class HubUnavailableError(LylmError):
    """A front-end worker could not reach the server's hub (which chooses every request's
    instance) in time: the request was not served; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class InvalidRequestError(LylmError, ValueError):
    """The request cannot be served as asked: a prompt too long, a bad parameter, a
    prompt the tokenizer or chat template rejects."""


class PromptError(InvalidRequestError):
    """The prompt could not be rendered: not a prompt, or refused by the tokenizer or chat template."""


class ContextLengthError(InvalidRequestError):
    """The prompt plus the requested output exceed the model's context length."""

    def __init__(
        self, *, context: int, prompt_tokens: int, max_tokens: int | None, message: str | None = None
    ) -> None:
        self.context = context
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        more = f"{max_tokens} more were requested" if max_tokens else "no room is left for output"
        super().__init__(
            message
            or f"This model's maximum context length is {context} tokens; the prompt has "
            f"{prompt_tokens} tokens and {more}"
        )


class EngineError(LylmError):
    """An engine failed while serving a request."""


class EngineDeadError(EngineError):
    """The engine has died and will not serve again until it is restarted."""
