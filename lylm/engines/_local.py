"""The Engine implementation for vLLM, wrapping one ``AsyncLLM``.

vLLM is imported only when an engine starts, so ``import lylm`` stays light.
Every vLLM exception is translated here, at one boundary, into lylm's tree.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import anyio

from .._config import EngineSpec
from .._engine import Engine, EngineStep, RenderedPrompt
from .._exceptions import (
    ConfigError,
    ContextLengthError,
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    LylmError,
)
from .._render import is_pooling
from ._cores import EngineCores
from ._internals import argument_names_from_source, check_vllm, fail_held_requests, stop_output_handler, unfinished_requests
from ._launcher import LAUNCHER
from ._placement import spawn_environment
from ._links import CoreLink, OwnCore, SharedCore
from ._remote import RemoteLink
from ._parsing import OutputParsing, build_output_parsing, check_parser_names, split_serving_args
from ._stats import stat_logger_factory

# Defaults lylm applies unless the config sets them: vLLM's periodic stats log
# would print one "Engine 000" line per engine and mean nothing per instance.
_DEFAULT_ENGINE_ARGS: dict[str, Any] = {"disable_log_stats": True}


def _has_base(exc: BaseException, *names: str) -> bool:
    # Matched by name so that vLLM versions that moved these classes still map.
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def translate_error(exc: Exception) -> LylmError:
    """Map an exception raised by vLLM to lylm's exception tree."""
    if isinstance(exc, LylmError):
        return exc
    if _has_base(exc, "EngineDeadError"):
        return EngineDeadError(f"the engine died: {exc}")
    if _has_base(exc, "VLLMClientError", "ValueError", "TypeError"):
        return InvalidRequestError(str(exc))
    return EngineError(f"{type(exc).__name__}: {exc}")


def engine_args_of(spec: EngineSpec) -> dict[str, Any]:
    """The keyword arguments for vLLM's ``AsyncEngineArgs`` of an instance.

    Raises :class:`ConfigError` naming a key the installed vLLM does not know. The
    ``vllm serve`` front-end flags an instance may carry (``tool_call_parser``,
    ``enable_auto_tool_choice``) are not among them: see :meth:`VLLMEngine.output_parsing`.
    """
    check_vllm()  # every start comes here first: a vLLM lacking a name lylm needs fails now
    from vllm.engine.arg_utils import AsyncEngineArgs

    path = f"{spec.name}.engine_args"
    args, serving = split_serving_args({**_DEFAULT_ENGINE_ARGS, **spec.engine_args}, path)
    check_parser_names(serving, args.get("reasoning_parser"), path)
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    for key in args:
        if key not in known:
            raise ConfigError(f"{spec.name}.engine_args.{key}", "not an engine argument of the installed vLLM")
    return args


def precheck_spec(spec: EngineSpec) -> None:
    """What can be checked about an instance before vLLM is imported (a fraction of a
    second): engine argument names against the installed vLLM's source
    (:func:`~._internals.argument_names_from_source`) and a local model path that does not
    exist. Raises :class:`ConfigError` as :func:`validate_spec`, which checks the rest."""
    path = f"{spec.name}.engine_args"
    args, _ = split_serving_args({**_DEFAULT_ENGINE_ARGS, **spec.engine_args}, path)
    known = argument_names_from_source() or frozenset(args)  # unknown layout: the full check decides
    for key in args:
        if key not in known:
            raise ConfigError(f"{path}.{key}", "not an engine argument of the installed vLLM")
    if spec.remote is None:
        _check_model_path(spec, args)


def check_model_path(model: str, path: str) -> None:
    """Raise :class:`ConfigError` at ``path`` for a local model path (``/``, ``./``, ``../``,
    ``~``) that is not there; a Hugging Face id is vLLM's to resolve."""
    if model.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(model)):
        raise ConfigError(path, f"{model}: no such file or directory")


def _check_model_path(spec: EngineSpec, args: Mapping[str, Any]) -> None:
    check_model_path(str(args.get("model", "")), f"{spec.name}.engine_args.model")


def validate_spec(spec: EngineSpec) -> None:
    """Everything about an instance that can be checked without starting its engine: engine
    argument names and parser names (:func:`engine_args_of`), its GPU ids against this host's
    devices, and the engine's configuration as vLLM builds it before it spawns anything
    (``create_engine_config``: value types and ranges, the model's path and config,
    parallelism against the devices the instance will see). Raises :class:`ConfigError`
    naming the instance's path. A remote instance's configuration is its core's host's to
    check."""
    args = engine_args_of(spec)
    if spec.remote is not None:
        return
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    _check_model_path(spec, args)
    # A GPU this host lacks is named at its index (outside the try below, which would rename
    # it). Computed from the launcher's snapshot of the server's environment, not the live one.
    environment = LAUNCHER.device_environment(spec.gpu_ids, f"{spec.name}.devices.gpu_ids")
    try:
        # As the engine will see its devices: under the spawn lock, with its device variable set.
        with spawn_environment(environment):
            AsyncEngineArgs(**args).create_engine_config(UsageContext.OPENAI_API_SERVER)
    except (ValueError, TypeError, OSError) as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError(_argument_path(spec, args, exc), _first_lines(exc)) from exc


def _argument_path(spec: EngineSpec, args: Mapping[str, Any], exc: BaseException) -> str:
    """The config path of the engine argument a (pydantic) validation error names, if one."""
    errors = getattr(exc, "errors", None)
    try:
        found = [str(error["loc"][0]) for error in errors()] if callable(errors) else []
    except Exception:  # not pydantic's
        found = []
    named = [key for key in found if key in args]
    return f"{spec.name}.engine_args" + (f".{named[0]}" if named else "")


def _first_lines(exc: BaseException, limit: int = 3) -> str:
    """An exception's message on one line: its first ``limit`` non-empty lines."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = "; ".join(lines[:limit]) + ("; ..." if len(lines) > limit else "")
    return text or type(exc).__name__


class VLLMEngine(Engine):
    """One vLLM engine (an ``AsyncLLM`` front end and its engine core) built from an
    :class:`EngineSpec`.

    Where its core runs is a strategy (:mod:`lylm.engines._links`): by default the
    engine starts its own, through the process's launcher, pinned to the instance's
    ``gpu_ids`` (the platform's device-control variable, ``CUDA_VISIBLE_DEVICES`` on
    NVIDIA, set only while the core is spawned, as vLLM starts its own data-parallel
    ranks); :meth:`attached` shares a core launched for several front ends; a remote
    instance's core attaches from its own host.
    """

    def __init__(self, spec: EngineSpec, link: CoreLink | None = None) -> None:
        super().__init__()
        self.spec = spec
        if link is None:
            link = RemoteLink(spec) if spec.remote is not None else OwnCore(spec)
        #: How the front end reaches its engine core (see :mod:`lylm.engines._links`).
        self.link: CoreLink = link
        self._llm: Any = None
        self._closed = False
        self._longest: int | None = None  # characters of the tokenizer's longest token
        self._state_lock = threading.Lock()
        self._core_lost: str | None = None
        self._parsing: OutputParsing | None = None
        self._defaults: tuple[Any, dict[str, Any]] | None = None  # (the AsyncLLM read, its defaults)

    @classmethod
    def attached(cls, spec: EngineSpec, cores: EngineCores, client_index: int) -> VLLMEngine:
        """An engine that attaches to an engine core already running (:class:`EngineCores`)
        as its client ``client_index``, instead of launching one.

        Its :meth:`start` builds only the front end (``AsyncLLM`` with
        ``client_addresses``); its :meth:`shutdown` stops only that: the engine core
        belongs to whoever launched it. This is how several front-end processes share
        one engine (``lylm serve``'s workers). Restarting the core is its owner's job:
        give a pool of attached engines ``restart=None``.
        """
        return cls(spec, SharedCore(cores, client_index))

    def engine_args(self) -> dict[str, Any]:
        """The keyword arguments for vLLM's ``AsyncEngineArgs`` (:func:`engine_args_of`)."""
        return engine_args_of(self.spec)

    def precheck(self) -> None:
        """Engine argument names and the model path, before vLLM is imported (:func:`precheck_spec`)."""
        precheck_spec(self.spec)

    def validate(self) -> None:
        """Check the instance's configuration as vLLM will read it, without starting
        anything (:func:`validate_spec`). An attached engine's core was checked by the
        process that launched it: only the front end's arguments are checked here."""
        if isinstance(self.link, SharedCore):
            engine_args_of(self.spec)
        else:
            validate_spec(self.spec)

    def spawn_environment(self) -> dict[str, str]:
        """The variables the engine's processes are spawned with: its GPUs, and vLLM's
        spawn start method unless the server chose one (empty when not pinned). Raises
        :class:`ConfigError` for a GPU this machine does not have."""
        return LAUNCHER.device_environment(self.spec.gpu_ids, f"{self.spec.name}.devices.gpu_ids")

    async def start(self) -> None:
        """Start or reach the engine core and build the front end; returns once the engine
        is ready (a remote instance's core gets ``remote.timeout`` seconds to connect)."""
        if self._llm is not None:
            return
        # Off the event loop: the first start imports vLLM (seconds) and checks its names.
        args = await anyio.to_thread.run_sync(self.engine_args)
        factory = stat_logger_factory(self.signals)
        llm = await self.link.open(args, [factory] if factory is not None else None)
        with self._state_lock:
            closed = self._closed
            if not closed:
                self._llm = llm
        if closed:  # shut down while it started: it must not outlive the call
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(llm.shutdown)
                await self.link.release()
            raise EngineDeadError(f"{self.spec.name} was shut down while it started")
        self._parsing = self._build_parsing()  # names checked in engine_args(): cannot fail on them

    def _build_parsing(self) -> OutputParsing:
        path = f"{self.spec.name}.engine_args"
        _, serving = split_serving_args(self.spec.engine_args, path)
        return build_output_parsing(serving, llm=self._llm, path=path)

    def output_parsing(self) -> OutputParsing | None:
        """How this model's tool calls and reasoning are parsed (vLLM's parsers, as
        ``vllm serve`` composes them from the same flags); None before start."""
        return self._parsing

    def _require(self) -> Any:
        if self._llm is None:
            raise EngineDeadError(f"{self.spec.name} is not running")
        return self._llm

    @property
    def llm(self) -> Any:
        """The underlying ``vllm.v1.engine.async_llm.AsyncLLM`` (None before start)."""
        return self._llm

    @property
    def healthy(self) -> bool:
        """True while the engine runs and vLLM has not flagged it as errored."""
        return self._llm is not None and not self._closed and not self._llm.errored and self._core_lost is None

    def check(self) -> None:
        """Notice that the engine core is gone (vLLM's front end does not): the pool's
        health poll calls this."""
        if self._llm is None or self._core_lost is not None:
            return
        self._core_lost = self.link.lost()

    def failure_reason(self) -> str | None:
        """Why the engine failed: its core's end, or vLLM's flag."""
        if self._core_lost is not None:
            return self._core_lost
        llm = self._llm
        if llm is None or not llm.errored:
            return None
        return "vLLM flagged the engine as errored"

    @property
    def max_model_len(self) -> int:
        """The engine's context length."""
        return int(self._require().model_config.max_model_len)

    def default_sampling_params(self) -> Any:
        """vLLM's defaults, with the model's generation config applied (as ``vllm serve``)."""
        from vllm import SamplingParams

        defaults = self.sampling_defaults()
        return SamplingParams.from_optional(**defaults) if defaults else SamplingParams()

    def sampling_defaults(self) -> dict[str, Any]:
        """The model's generation config as sampling parameters (``temperature``, ``top_p``,
        ``top_k``, ``min_p``, ``repetition_penalty``, ``max_tokens``), read by vLLM
        (``ModelConfig.get_diff_sampling_param``) as ``vllm serve`` reads it; empty with the
        engine arg ``generation_config="vllm"``.

        Read once per engine: vLLM reads the model's generation_config.json from disk on
        every call (0.2 ms and more per request, on the event loop), and ``vllm serve``
        reads it once at start too."""
        llm = self._require()
        if self._defaults is None or self._defaults[0] is not llm:
            defaults = dict(llm.model_config.get_diff_sampling_param())
            if "max_new_tokens" in defaults:  # generation_config.json's name for it
                defaults["max_tokens"] = defaults.pop("max_new_tokens")
            self._defaults = (llm, defaults)
        return dict(self._defaults[1])

    async def render_text(self, text: str) -> RenderedPrompt:
        """Tokenize a completion prompt the way vLLM's completions endpoint does."""
        llm = self._require()
        self._check_characters(len(text) if isinstance(text, str) else 0)
        renderer = getattr(llm, "renderer", None)
        try:
            if renderer is not None and hasattr(renderer, "render_cmpl_async"):
                (engine_input,) = await renderer.render_cmpl_async([{"prompt": text}])
                return RenderedPrompt(engine_input["prompt_token_ids"], engine_input)
            tokenizer = llm.get_tokenizer()
            ids = await anyio.to_thread.run_sync(tokenizer.encode, text)
            return RenderedPrompt(ids)
        except Exception as exc:
            raise self._render_error(exc) from exc

    async def decode(self, token_ids: Sequence[int]) -> str:
        """Detokenize with the model's tokenizer, as vLLM's completions echo does."""
        tokenizer = self._require().get_tokenizer()
        ids = list(token_ids)
        try:
            return str(await anyio.to_thread.run_sync(tokenizer.decode, ids))
        except Exception as exc:
            raise translate_error(exc) from exc

    async def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> RenderedPrompt:
        """Apply the model's chat template the way vLLM's chat endpoint does, then tokenize."""
        llm = self._require()
        kwargs: dict[str, Any] = {"add_generation_prompt": True, "continue_final_message": False}
        kwargs.update(chat_template_kwargs or {})
        conversation = [dict(m) for m in messages]
        self._check_characters(_content_characters(conversation))
        renderer = getattr(llm, "renderer", None)
        try:
            if renderer is not None and hasattr(renderer, "render_chat_async"):
                from vllm.renderers.params import ChatParams

                _, (engine_input,) = await renderer.render_chat_async(
                    [conversation], ChatParams(chat_template_kwargs=kwargs)
                )
                return RenderedPrompt(engine_input["prompt_token_ids"], engine_input)
            tokenizer = llm.get_tokenizer()
            ids = await anyio.to_thread.run_sync(
                lambda: tokenizer.apply_chat_template(conversation, tokenize=True, **kwargs)
            )
            return RenderedPrompt(list(ids))
        except Exception as exc:
            raise self._render_error(exc) from exc

    def _check_characters(self, characters: int) -> None:
        """Refuse, before any tokenizing, a prompt of more characters than the context
        can hold. No token spans more characters than the tokenizer's longest, so a
        prompt has at least ``characters / longest`` tokens: past ``context * longest``
        it cannot fit. (vLLM bounds completion prompts so; chat messages it tokenizes
        whole: 4.4 s for 7 MB, on the tiny model's tokenizer.)"""
        longest = self._longest_token()
        context = self.max_model_len
        if longest and characters > context * longest:
            raise ContextLengthError(
                context=context,
                prompt_tokens=-(-characters // longest),
                max_tokens=None,
                message=(
                    f"This model's maximum context length is {context} tokens. However, your prompt "
                    f"contains {characters} characters, more than the {context * longest} that "
                    f"{context} tokens of this tokenizer can hold. Please reduce the length of the prompt."
                ),
            )

    def _longest_token(self) -> int | None:
        # vLLM's tokenizers know it (max_chars_per_token, 0.26 and 0.32), read once.
        if self._longest is None:
            try:
                tokenizer = self._require().get_tokenizer()
                self._longest = int(getattr(tokenizer, "max_chars_per_token", 0) or 0)
            except Exception:
                self._longest = 0
        return self._longest or None

    def _render_error(self, exc: Exception) -> LylmError:
        # vLLM's renderer counts the prompt against the context itself (0.32: a
        # VLLMValidationError on "input_tokens", or on "input_text" for a text longer
        # than the context's tokens can hold): the same condition as the pool's check.
        if getattr(exc, "parameter", None) in ("input_tokens", "input_text"):
            value = getattr(exc, "value", None)  # tokens, or characters for "input_text"
            tokens = self.max_model_len + 1
            if isinstance(value, int) and getattr(exc, "parameter", None) == "input_tokens":
                tokens = value
            return ContextLengthError(context=self.max_model_len, prompt_tokens=tokens, max_tokens=None, message=str(exc))
        return translate_error(exc)

    async def generate(
        self, request_id: str, prompt: RenderedPrompt, sampling_params: Any
    ) -> AsyncGenerator[EngineStep, None]:
        """Stream vLLM's RequestOutputs with the number of tokens each one added; with
        ``PoolingParams`` (an embedding model), vLLM's one PoolingRequestOutput."""
        llm = self._require()
        engine_prompt = prompt.payload
        if engine_prompt is None:
            engine_prompt = {"prompt_token_ids": list(prompt.token_ids)}
        delta = _is_delta(sampling_params)
        seen = 0
        pooling = is_pooling(sampling_params)
        if pooling:  # an embedding: vLLM's encode, one output, no tokens generated
            stream = llm.encode(engine_prompt, sampling_params, request_id)
        else:
            stream = llm.generate(engine_prompt, sampling_params, request_id)
        try:
            async for output in stream:
                total = 0 if pooling else sum(len(c.token_ids) for c in output.outputs)
                new = total if delta else total - seen
                seen = total
                yield EngineStep(output, new, output.finished)
        except Exception as exc:
            raise translate_error(exc) from exc
        finally:
            # Closing vLLM's generator early is what aborts the request there.
            await stream.aclose()

    async def abort(self, request_id: str) -> None:
        """Abort the request in vLLM; unknown or finished ids are ignored."""
        if self._llm is not None:
            await self._llm.abort(request_id)

    def num_unfinished_requests(self) -> int:
        """Requests vLLM's front end still tracks for this engine."""
        if self._llm is None:
            return 0
        return unfinished_requests(self._llm)

    async def shutdown(self) -> None:
        """Stop the front end and what its link started; idempotent. During :meth:`start`,
        the engine core being started is killed (the start then fails): a server stopped
        while an engine starts or restarts leaves no process behind."""
        with self._state_lock:
            llm, self._llm = self._llm, None
            self._closed = True
        await self.link.close()
        if llm is not None:
            await stop_output_handler(llm)
            fail_held_requests(llm)
            await anyio.to_thread.run_sync(llm.shutdown)
        await self.link.release()

    def process_ids(self) -> list[int]:
        """PIDs of the engine core's processes on this host (its workers are their
        children); empty for an attached or remote engine, whose core is not its own."""
        return self.link.process_ids()


def _content_characters(messages: Sequence[Mapping[str, Any]]) -> int:
    """The characters of the messages' text (string contents and text parts): a chat
    template adds to them, and only drops the reasoning of earlier turns, which a model
    wrote within its context."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                    total += len(part["text"])
    return total


def _is_delta(sampling_params: Any) -> bool:
    kind = getattr(sampling_params, "output_kind", None)
    return getattr(kind, "name", None) == "DELTA"
