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
from ._placement import visible_devices
from .._render import is_pooling
from ._watchdog import REAPER, kill_tree, process_tree, reap
from ._cores import EngineCores
from ._internals import build_with_environment, build_with_heartbeats, fail_held_requests, manager_of, pids_of
from ._remote import RemoteLink, remote_engine_args
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


class VLLMEngine(Engine):
    """One vLLM ``AsyncLLM`` engine instance built from an :class:`EngineSpec`.

    An instance with ``gpu_ids`` has its engine process spawned with the
    platform's device-control variable (``CUDA_VISIBLE_DEVICES`` on NVIDIA) set to
    those GPUs, as vLLM starts its own data-parallel ranks; the server's own
    environment is changed only during the spawn, under a process-wide lock.
    """

    def __init__(self, spec: EngineSpec) -> None:
        super().__init__()
        self.spec = spec
        self._llm: Any = None
        self._closed = False
        self._processes: list[Any] = []
        #: The engine core's processes while it starts (see :meth:`shutdown`).
        self._starting: list[Any] = []
        self._longest: int | None = None  # characters of the tokenizer's longest token
        self._state_lock = threading.Lock()
        self._cores: EngineCores | None = None
        self._client_index = 0
        self._core_lost: str | None = None
        self._parsing: OutputParsing | None = None
        self._defaults: tuple[Any, dict[str, Any]] | None = None  # (the AsyncLLM read, its defaults)
        #: A remote instance's hold on its core: placement, attach, disconnect watch.
        self._remote = RemoteLink(spec) if spec.remote is not None else None

    @classmethod
    def attached(cls, spec: EngineSpec, cores: EngineCores, client_index: int) -> VLLMEngine:
        """An engine that attaches to an engine core already running (:class:`EngineCores`)
        as its client ``client_index``, instead of launching one.

        Its :meth:`start` builds only the front end (``AsyncLLM`` with
        ``client_addresses``); its :meth:`shutdown` stops only that: the engine
        core belongs to whoever launched it. This is how several front-end
        processes share one engine (issue 13's workers). vLLM does not notice
        when such a core dies (its client would wait forever): :meth:`check`, which
        the pool's health watch calls, looks at the core's process and fails the
        engine's requests when it is gone. Restarting the core is its owner's
        job: give a pool of attached engines ``restart=None``.
        """
        if not 0 <= client_index < cores.clients:
            raise ValueError(f"client_index must be in [0, {cores.clients}) (got {client_index})")
        engine = cls(spec)
        engine._cores = cores
        engine._client_index = client_index
        return engine

    def engine_args(self) -> dict[str, Any]:
        """The keyword arguments for vLLM's ``AsyncEngineArgs``.

        Raises :class:`ConfigError` naming a key the installed vLLM does not know. The
        ``vllm serve`` front-end flags an instance may carry (``tool_call_parser``,
        ``enable_auto_tool_choice``) are not among them: see :meth:`output_parsing`.
        """
        from vllm.engine.arg_utils import AsyncEngineArgs

        path = f"{self.spec.name}.engine_args"
        args, serving = split_serving_args({**_DEFAULT_ENGINE_ARGS, **self.spec.engine_args}, path)
        check_parser_names(serving, args.get("reasoning_parser"), path)
        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        for key in args:
            if key not in known:
                raise ConfigError(
                    f"{self.spec.name}.engine_args.{key}",
                    "not an engine argument of the installed vLLM",
                )
        if self.spec.remote is not None:
            args.update(remote_engine_args(self.spec.remote))
        return args

    def spawn_environment(self) -> dict[str, str]:
        """The variables the engine's processes are spawned with: its GPUs, and vLLM's
        spawn start method unless the server chose one (empty when not pinned).

        Raises :class:`ConfigError` for a GPU this machine does not have.
        """
        if not self.spec.gpu_ids:
            return {}
        from vllm.platforms import current_platform

        variable = current_platform.device_control_env_var
        count: int | None = None
        counter = getattr(current_platform, "device_count", None)
        if callable(counter):
            try:
                count = int(counter())
            except Exception:  # a platform that cannot count without initialising: unknown
                count = None
        environment = {
            variable: visible_devices(
                self.spec.gpu_ids,
                variable=variable,
                environ=os.environ,
                device_count=count,
                path=f"{self.spec.name}.devices.gpu_ids",
            )
        }
        # Spawned, not forked: a forked engine process inherits the server's
        # in-process state, and on a 2 x H200 host (vLLM 0.26) three engines forked
        # with CUDA_VISIBLE_DEVICES 0, 1 and 1 all ran on one GPU. A spawned one
        # starts a fresh interpreter from exactly this environment. A start method
        # the user set for the whole server is kept.
        if "VLLM_WORKER_MULTIPROC_METHOD" not in os.environ:
            environment["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        return environment

    async def start(self) -> None:
        """Build the AsyncLLM in a worker thread: it blocks until the engine is ready.
        A remote instance's engine waits for its core to connect, at most
        ``remote.timeout`` seconds."""
        if self._llm is not None:
            return
        if self._remote is None:
            await anyio.to_thread.run_sync(self._build)
        else:
            await self._remote.start(self._build, lambda: self._llm)

    def _build(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self.engine_args()
        factory = stat_logger_factory(self.signals)
        loggers = [factory] if factory is not None else None
        if self._cores is not None:
            self._llm = self._cores.client(self._client_index, stat_loggers=loggers)
            self._parsing = self._build_parsing()
            return
        if self.spec.remote is not None:  # no local process to spawn, pin or watch
            self._keep(build_with_heartbeats(lambda: AsyncLLM.from_engine_args(
                AsyncEngineArgs(**args), usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=loggers
            ), self.spec.remote.heartbeat), [])
            return

        def build() -> Any:
            # vLLM sizes its batches by usage context: as a plain engine it takes
            # max_num_seqs 128 / max_num_batched_tokens 2048 on an H100, as `vllm serve`
            # 1024 / 8192. A pool serves like `vllm serve`, so it gets the same defaults.
            return AsyncLLM.from_engine_args(
                AsyncEngineArgs(**args), usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=loggers
            )

        # Unpinned engines take the spawn lock too (with nothing to set), so that no
        # other engine process appears while a pinned one is being spawned.
        llm = build_with_environment(build, self.spawn_environment(), self._spawned)
        processes = process_tree(pids_of(llm))
        # Should this server die without stopping the engine (SIGKILL, OOM), a
        # watchdog stops it instead of leaving it holding its GPU memory.
        REAPER.watch(processes)
        self._keep(llm, processes)

    def _keep(self, llm: Any, processes: list[Any]) -> None:
        # The start is done: keep what it built, unless a shutdown came meanwhile.
        with self._state_lock:
            closed = self._closed
            if not closed:
                self._llm, self._processes, self._starting = llm, processes, []
        if closed:  # shut down while it started: it must not outlive the call
            llm.shutdown()
            reap(processes)
            REAPER.forget(processes)
            raise EngineDeadError(f"{self.spec.name} was shut down while it started")
        self._parsing = self._build_parsing()  # names checked in engine_args(): cannot fail on them

    def _spawned(self, pids: list[int]) -> None:
        # Called from the start's thread as soon as the engine-core process exists, long
        # before it is ready (weights, profiling, compiling): from now on a shutdown, or
        # the watchdog, can stop it.
        processes = process_tree(pids)
        REAPER.watch(processes)
        with self._state_lock:
            closed = self._closed
            if not closed:
                self._starting = processes
        if closed:
            kill_tree(processes)
            REAPER.forget(processes)

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
        """For an attached or remote engine: notice that its engine core is gone (vLLM does not)."""
        if self._llm is None or self._core_lost is not None:
            return
        if self._cores is not None and not self._cores.alive():
            self._core_lost = f"engine core (pid {', '.join(map(str, self._cores.process_ids()))}) is gone"
        elif self._remote is not None:
            self._core_lost = self._remote.lost()

    def failure_reason(self) -> str | None:
        """Which engine process exited and how, once vLLM has flagged the engine as errored."""
        if self._core_lost is not None:
            return self._core_lost
        llm = self._llm
        if llm is None or not llm.errored:
            return None
        exited = [
            f"{p.name} (pid {p.pid}) exited with code {p.exitcode}"
            for p in getattr(manager_of(llm), "processes", ())
            if p.exitcode is not None
        ]
        if exited:
            return "engine process exited (" + ", ".join(exited) + ")"
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
        count = getattr(self._llm, "get_num_unfinished_requests", None)
        if count is None:  # vLLM 0.26's AsyncLLM lacks it; its output processor has it
            count = self._llm.output_processor.get_num_unfinished_requests
        return int(count())

    async def shutdown(self) -> None:
        """Stop the engine core process; idempotent. During :meth:`start`, the engine core
        being started is killed (the start then fails): a server stopped while an
        engine starts or restarts leaves no process behind."""
        with self._state_lock:
            llm, self._llm = self._llm, None
            starting, self._starting = self._starting, []
            self._closed = True
        if self._remote is not None:
            await self._remote.close()
        if starting:
            await anyio.to_thread.run_sync(kill_tree, starting)
            REAPER.forget(starting)
        if llm is not None:
            fail_held_requests(llm)
            await anyio.to_thread.run_sync(llm.shutdown)
        processes, self._processes = self._processes, []
        if processes:
            await anyio.to_thread.run_sync(reap, processes)
            REAPER.forget(processes)
        if self._remote is not None:
            await self._remote.release()

    def process_ids(self) -> list[int]:
        """PIDs of the engine's own processes (vLLM's engine core; its workers are their children)."""
        return pids_of(self._llm)


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
