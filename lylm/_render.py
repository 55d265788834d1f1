"""From what a caller sends to what a balancer sees: one pass per request.

A prompt is tokenized once, by a healthy engine of its model (its tokenizer and chat
template; another instance's if that engine dies meanwhile), checked against the
model's context length once, and described once as a :class:`RequestInfo`; the
chosen engine then receives the token ids. Callers of
:meth:`EnginePool.generate` (the OpenAI adapter and embedding users alike) get the
same rendering, the same context check and the same errors.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, Union

from ._engine import Engine, RenderedPrompt
from ._exceptions import (
    ContextLengthError,
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    NoHealthyEngineError,
    PromptError,
)
from ._instance import Instance
from ._request import RequestInfo

Prompt = Union[str, Sequence[int], Sequence[Mapping[str, Any]], Mapping[str, Any]]
"""A plain prompt, token ids, chat messages, or ``{"prompt": ...}`` / ``{"prompt_token_ids": ...}``."""

T = TypeVar("T")


def first_healthy(model: str, group: Iterable[Instance]) -> Instance:
    """The first healthy instance of ``model`` in ``group``; :class:`NoHealthyEngineError` if none."""
    for instance in group:
        if instance.healthy:
            return instance
    raise NoHealthyEngineError(model)


async def on_healthy_engine(
    model: str,
    group: Sequence[Instance],
    work: Callable[[Engine], Awaitable[T]],
    *,
    engine_failed: Callable[[Instance, str], None],
) -> T:
    """Run ``work`` (a render, a decode) on the engine of ``model``'s first healthy
    instance, or, should that engine fail meanwhile, on the next one's.

    Instances of a model share tokenizer and chat template: any of them gives the same
    result. This is no retry of the request: no engine has been sent it, and one that
    died while this process rendered it did not die of it, so ``retries`` and the
    two-deaths rule do not apply; each instance is tried once. The death is reported
    (``engine_failed``) at once, so that the requests behind this one are not rendered
    on that engine too. A failure of the work on an engine still up (its tokenizer
    refused the prompt) is the request's: raised as it is.
    """
    tried: list[Instance] = []
    instance = first_healthy(model, group)
    while True:
        engine = instance.engine  # the one that fails, even if a restart replaces it meanwhile
        try:
            return await work(engine)
        except EngineError as exc:
            if not isinstance(exc, EngineDeadError) and engine.healthy:
                raise
            if instance.engine is engine:
                engine_failed(instance, engine.failure_reason() or str(exc))
            tried.append(instance)
            try:
                instance = first_healthy(model, (i for i in group if i not in tried))
            except NoHealthyEngineError:
                raise exc from None  # as the serving engine's failure would be: it says why


async def render_prompt(
    engine: Engine,
    prompt: Prompt | RenderedPrompt,
    *,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> RenderedPrompt:
    """Tokenize ``prompt`` with ``engine``'s tokenizer (applying its chat template to messages).

    Raises :class:`PromptError` for anything that is not a prompt or that the
    tokenizer or chat template refuses, :class:`ContextLengthError` for a prompt that
    the engine's tokenizer already finds longer than the context.
    """
    try:
        return await _render(engine, prompt, chat_template_kwargs)
    except (PromptError, ContextLengthError):  # the tokenizer found it too long: said as such
        raise
    except (InvalidRequestError, ValueError, TypeError) as exc:
        raise PromptError(str(exc)) from exc


async def _render(
    engine: Engine, prompt: Prompt | RenderedPrompt, chat_template_kwargs: Mapping[str, Any] | None
) -> RenderedPrompt:
    if isinstance(prompt, RenderedPrompt):
        return prompt
    if isinstance(prompt, str):
        return await engine.render_text(prompt)
    if isinstance(prompt, Mapping):
        if "prompt_token_ids" in prompt:
            return RenderedPrompt(list(prompt["prompt_token_ids"]))
        if "prompt" in prompt:
            return await engine.render_text(prompt["prompt"])
        raise TypeError('a dict prompt needs "prompt" or "prompt_token_ids"')
    items: list[Any] = list(prompt)
    if not items:
        raise ValueError("the prompt is empty")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        return RenderedPrompt(items)
    if all(isinstance(m, Mapping) for m in items):
        return await engine.render_chat(items, chat_template_kwargs=chat_template_kwargs)
    raise TypeError("a prompt is a string, a list of token ids, or a list of chat messages (dicts)")


def is_pooling(params: Any) -> bool:
    """Whether ``params`` ask for pooling (vLLM's ``PoolingParams``: embeddings) rather than
    generation; matched by name so that lylm need not import vLLM."""
    return type(params).__name__ == "PoolingParams"


def describe_request(
    model: str,
    rendered: RenderedPrompt,
    sampling_params: Any,
    *,
    context: int,
    request_id: str | None = None,
    session_key: str | None = None,
) -> RequestInfo:
    """The balancer's view of one request; :class:`ContextLengthError` if it cannot fit.

    A request without ``max_tokens`` may use the rest of the context (as vLLM
    sizes it), and that is its decode budget in the books.
    """
    prompt_tokens = len(rendered.token_ids)
    n = getattr(sampling_params, "n", 1) or 1
    asked = getattr(sampling_params, "max_tokens", None)
    if is_pooling(sampling_params):
        asked = 0  # an embedding: the prompt is all the work, no output tokens
    if prompt_tokens + max(asked or 0, 1) > context:
        raise ContextLengthError(context=context, prompt_tokens=prompt_tokens, max_tokens=asked)
    return RequestInfo(
        model=model,
        request_id=request_id or uuid.uuid4().hex,
        prompt_tokens=prompt_tokens,
        max_tokens=asked if asked is not None else context - prompt_tokens,
        n=n,
        prompt_token_ids=rendered.token_ids,
        session_key=session_key,
    )
