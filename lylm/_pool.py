"""EnginePool: several engine instances of several models, driven as one."""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from contextlib import aclosing
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Union

import anyio

from ._admission import Admission
from ._balancer import Balancer
from ._config import EngineSpec, PoolConfig, instance_spec
from ._engine import Engine, RenderedPrompt
from ._exceptions import (
    EngineDeadError,
    EngineError,
    LylmError,
    NoHealthyEngineError,
    ShuttingDownError,
    UnknownModelError,
)
from ._instance import EngineStats, Instance, Outcome
from ._request import RequestInfo, RequestRecord
from ._shadow import ShadowReport, Shadows
from ._startup import Starter
from ._supervisor import RestartPolicy, Supervisor
from .balancers import resolve_balancer

if TYPE_CHECKING:
    from .balancers._resolve import BalancerLike

logger = logging.getLogger("lylm")

EngineFactory = Callable[[EngineSpec], Engine]
"""Builds an (unstarted) engine for one instance spec."""

Prompt = Union[str, Sequence[int], Sequence[Mapping[str, Any]], Mapping[str, Any]]
"""A plain prompt, token ids, chat messages, or ``{"prompt": ...}`` / ``{"prompt_token_ids": ...}``."""

ConfigSource = Union[PoolConfig, Mapping[str, Any], str, "os.PathLike[str]", Iterable[EngineSpec]]


def _vllm_engine_factory(spec: EngineSpec) -> Engine:
    from ._vllm_engine import VLLMEngine

    return VLLMEngine(spec)


class EnginePool:
    """Runs several engine instances of one or more models as one, with a Balancer per model.

    Build it with :meth:`from_config`, then use it as an async context manager::

        async with EnginePool.from_config("config.json") as pool:
            async for out in pool.generate("tiny", "Hello", SamplingParams(max_tokens=8)):
                print(out.outputs[0].text)

    ``balancer`` (for every model) or ``balancers`` (by model name) override the
    config's choice; each is a registered name, a ``"module:Class"`` string, a
    Balancer subclass or instance. ``rng`` seeds the built-in balancers.
    ``engine_factory`` builds engines from specs (default: vLLM engines).
    ``clock`` (seconds, monotonic) times requests for observers.

    Admission control: ``max_in_flight_requests`` and ``max_in_flight_tokens``
    (one number for every model, or a dict by model name) bound what a model may
    have in flight across its instances; a request beyond them raises
    :class:`OverloadedError` at once instead of queueing without bound. They
    override the config's ``limits``.

    Failures: an engine that dies is taken out of balancing at once (the pool
    polls engine health every ``health_interval`` seconds and hears of deaths
    from requests too), its requests fail with :class:`EngineDeadError`, and it
    is restarted under ``restart`` (a :class:`RestartPolicy`; ``None`` leaves it
    dead). A request whose engine fails before it yielded any output is retried
    on another healthy instance of the model, at most ``retries`` times.
    """

    def __init__(
        self,
        config: PoolConfig,
        *,
        balancer: BalancerLike | None = None,
        balancers: Mapping[str, BalancerLike] | None = None,
        engine_factory: EngineFactory | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_in_flight_requests: int | Mapping[str, int] | None = None,
        max_in_flight_tokens: int | Mapping[str, int] | None = None,
        retries: int = 2,
        restart: RestartPolicy | None = RestartPolicy(),
        health_interval: float = 0.2,
    ) -> None:
        self._config = config
        self._admission = Admission(config, max_requests=max_in_flight_requests, max_tokens=max_in_flight_tokens)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative integer (got {retries!r})")
        if not isinstance(health_interval, (int, float)) or not 0 < health_interval <= 60:
            raise ValueError(f"health_interval must be a number of seconds in (0, 60] (got {health_interval!r})")
        self._retries = retries
        rng = rng if rng is not None else random.Random()
        self._engine_factory = engine_factory or _vllm_engine_factory
        # One starter for every engine start (pool start, add_instance, restarts):
        # it owns the per-GPU start locks.
        self._starter = Starter(self._engine_factory)
        self._supervisor = Supervisor(
            instances=self.instances,
            start_engine=self._starter.start_engine,
            policy=restart,
            interval=health_interval,
            rng=random.Random(rng.getrandbits(64)),
        )
        self._next_index: dict[str, int] = {m.name: len(m.instances) for m in config.models}
        self._clock = clock
        self._observers: list[Callable[[RequestRecord], None]] = []
        overrides = dict(balancers or {})
        for name in overrides:
            if name not in config.model_names:
                raise UnknownModelError(name, config.model_names)
        # Resolved here, before any engine starts, so a bad name costs nothing.
        self._balancers: dict[str, Balancer] = {}
        for model in config.models:
            choice = overrides.get(model.name, balancer)
            quoted = json.dumps(model.name)
            path = f"balancers[{quoted}]" if model.name in overrides else "balancer"
            if choice is None:
                choice, path = model.balancer, f"models[{quoted}].balancer"
            child_rng = random.Random(rng.getrandbits(64))
            self._balancers[model.name] = resolve_balancer(choice, rng=child_rng, path=path)
        self._instances: dict[str, list[Instance]] = {}
        self._shadows = Shadows()
        self._state = "new"
        self._lock = anyio.Lock()

    @classmethod
    def from_config(cls, source: ConfigSource, **options: Any) -> EnginePool:
        """Build a pool from a config file path, a dict, a PoolConfig or a list of EngineSpecs."""
        return cls(PoolConfig.load(source), **options)

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> EnginePool:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start every engine; on any failure stop those already started.

        Instances on disjoint GPUs start side by side; instances that share a GPU
        start one after another, in config order (each engine measures the GPU's
        free memory as it starts); unpinned instances start alone. Progress
        (which instance, how long) goes to the ``lylm`` logger. Raises
        :class:`EngineStartError` naming the instance that failed; a failed start
        leaves no engine process behind.
        """
        async with self._lock:
            if self._state == "running":
                return
            if self._state == "closed":
                raise LylmError("the pool is closed; build a new one")
            specs = [spec for model in self._config.models for spec in model.instances]
            engines = await self._starter.start_all(specs)
            for spec, engine in zip(specs, engines):
                self._instances.setdefault(spec.model, []).append(Instance(spec, engine))
            self._state = "running"
            self._supervisor.start()

    async def aclose(self) -> None:
        """Shut every engine down; requests still in flight fail. Safe to call more than once.

        To let requests finish first, ``await pool.drain(timeout)`` before closing.
        """
        async with self._lock:
            if self._state == "closed":
                return
            self._state = "closed"
            instances = [i for group in self._instances.values() for i in group]
            with anyio.CancelScope(shield=True):
                await self._supervisor.aclose()
                for instance in reversed(instances):
                    instance.mark_stopped()
                    await instance.engine.shutdown()

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop admitting requests and wait for those in flight to end (at most ``timeout`` s).

        New requests then raise :class:`ShuttingDownError` (the OpenAI adapter
        answers 503, and its ``/health`` says ``draining``). Returns True if
        nothing is left in flight. Follow with :meth:`aclose`.
        """
        if self._state == "running":
            self._state = "draining"
        with anyio.move_on_after(timeout):
            while any(i.in_flight_requests for i in self.instances()):
                await anyio.sleep(0.05)
        return not any(i.in_flight_requests for i in self.instances())

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` was called: the pool takes no new requests."""
        return self._state == "draining"

    # -- runtime membership ----------------------------------------------------

    async def add_instance(
        self,
        model: str,
        *,
        engine_args: Mapping[str, Any] | None = None,
        gpu_ids: Sequence[int] = (),
        weight: float = 1.0,
    ) -> Instance:
        """Start one more instance of a served ``model`` and add it to balancing.

        ``engine_args`` default to those of the model's first configured
        instance (another replica). Values are validated like the config file's
        (a :class:`ConfigError` names the bad one). The instance is listed as
        ``starting`` until its engine is up; a failed start raises
        :class:`EngineStartError` and leaves nothing behind.
        """
        group = self._group(model)
        if engine_args is None:
            engine_args = self._config.model(model).instances[0].engine_args
        index = self._next_index[model]
        spec = instance_spec(
            model,
            {"devices": {"gpu_ids": list(gpu_ids), "weight": weight}, "engine_args": dict(engine_args)},
            index=index,
        )
        self._next_index[model] = index + 1
        # Listed (as 'starting') while its engine starts, so /health shows it.
        instance = Instance(spec, self._engine_factory(spec), state="starting")
        group.append(instance)
        try:
            await self._starter.start_engine(spec, instance.engine)
        except BaseException:
            if instance in group:
                group.remove(instance)
            instance.mark_stopped()
            raise
        instance.mark_healthy()  # unless drained or removed while it started
        return instance

    async def drain_instance(self, instance: Instance | str, *, timeout: float | None = None) -> bool:
        """Take an instance out of balancing, let its requests finish, then stop and remove it.

        Waits at most ``timeout`` seconds (None: as long as it takes); requests
        still running then fail with :class:`EngineDeadError` (those without
        output yet are retried elsewhere). Returns True if none had to fail.
        """
        target = self._find(instance)
        target.mark_draining()
        with anyio.move_on_after(timeout):
            while target.in_flight_requests and target.state == "draining":
                await anyio.sleep(0.05)
        clean = target.in_flight_requests == 0
        group = self._instances.get(target.model, [])
        if target in group:
            group.remove(target)
        target.mark_stopped()
        with anyio.CancelScope(shield=True):
            await target.engine.shutdown()
        return clean

    async def remove_instance(self, instance: Instance | str) -> None:
        """Stop an instance now and remove it; its requests fail (or retry elsewhere before output)."""
        await self.drain_instance(instance, timeout=0)

    def _find(self, instance: Instance | str) -> Instance:
        for candidate in self.instances():
            if candidate is instance or candidate.name == instance:
                return candidate
        raise LookupError(f"no instance {instance!r} in the pool")

    # -- introspection ---------------------------------------------------------

    @property
    def config(self) -> PoolConfig:
        """The validated configuration the pool was built from."""
        return self._config

    @property
    def models(self) -> tuple[str, ...]:
        """The served model names, in config order."""
        return self._config.model_names

    def instances(self, model: str | None = None) -> tuple[Instance, ...]:
        """The running instances of ``model``, or of every model."""
        if model is None:
            return tuple(i for group in self._instances.values() for i in group)
        if model not in self._balancers:
            raise UnknownModelError(model, self.models)
        return tuple(self._instances.get(model, ()))

    def max_model_len(self, model: str) -> int:
        """The context length of ``model``'s engines (prompt plus output, in tokens)."""
        return _first_healthy(model, self._group(model)).engine.max_model_len

    def balancer(self, model: str) -> Balancer:
        """The balancer that chooses among ``model``'s instances."""
        if model not in self._balancers:
            raise UnknownModelError(model, self.models)
        return self._balancers[model]

    def add_observer(self, observer: Callable[[RequestRecord], None]) -> None:
        """Call ``observer`` with a :class:`RequestRecord` whenever a dispatched request ends.

        Observers run on the event loop, synchronously: keep them cheap (count,
        observe a histogram). An observer that raises is logged and ignored.
        """
        self._observers.append(observer)

    def remove_observer(self, observer: Callable[[RequestRecord], None]) -> None:
        """Stop calling ``observer``."""
        self._observers.remove(observer)

    # -- shadow mode: a candidate balancer beside the active one, never routing --------

    def add_shadow(
        self,
        model: str,
        balancer: BalancerLike,
        *,
        name: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """Ask ``balancer`` too for every request of ``model``, count how often it agrees
        with the active balancer and what it picks, and route by the active one only.

        ``balancer`` is anything ``balancer=`` accepts; ``name`` (default: the name or
        class name) labels it in :meth:`shadow_report` and the metrics. It runs after
        the active balancer on the same candidates and books, so its cost adds to each
        request's; if it raises, the error is counted and logged once, and ignored.
        """
        if model not in self._balancers:
            raise UnknownModelError(model, self.models)
        shadow = resolve_balancer(balancer, rng=rng, path="shadow")
        if name is None:
            name = balancer if isinstance(balancer, str) else type(shadow).__name__
        self._shadows.add(model, name, shadow)

    def remove_shadow(self, model: str, name: str) -> None:
        """Stop the shadow ``name`` of ``model``."""
        self._shadows.remove(model, name)

    def shadow_report(self, model: str | None = None) -> list[ShadowReport]:
        """Agreement and choice counts of ``model``'s shadows (or of every model's)."""
        return self._shadows.reports(model)

    def stats(self) -> dict[str, list[EngineStats]]:
        """A snapshot of every instance's books, by model."""
        return {m: [i.stats() for i in group] for m, group in self._instances.items()}

    def _group(self, model: str) -> list[Instance]:
        if model not in self._balancers:
            raise UnknownModelError(model, self.models)
        if self._state != "running":
            if self._state == "draining":
                raise ShuttingDownError()
            raise LylmError(f"the pool is {self._state}; use 'async with pool' or 'await pool.start()'")
        return self._instances[model]

    # -- requests --------------------------------------------------------------

    async def render(
        self,
        model: str,
        prompt: Prompt | RenderedPrompt,
        *,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> RenderedPrompt:
        """Tokenize ``prompt`` (applying the chat template to messages) with ``model``'s tokenizer."""
        engine = _first_healthy(model, self._group(model)).engine
        if isinstance(prompt, str):
            return await engine.render_text(prompt)
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                return RenderedPrompt(list(prompt["prompt_token_ids"]))
            if "prompt" in prompt:
                return await engine.render_text(prompt["prompt"])
            raise TypeError('a dict prompt needs "prompt" or "prompt_token_ids"')
        if isinstance(prompt, RenderedPrompt):
            return prompt
        items: list[Any] = list(prompt)
        if not items:
            raise ValueError("the prompt is empty")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
            return RenderedPrompt(items)
        if all(isinstance(m, Mapping) for m in items):
            return await engine.render_chat(items, chat_template_kwargs=chat_template_kwargs)
        raise TypeError(
            "a prompt is a string, a list of token ids, or a list of chat messages (dicts)"
        )

    async def generate(
        self,
        model: str,
        prompt: Prompt | RenderedPrompt,
        sampling_params: Any = None,
        *,
        request_id: str | None = None,
        session_key: str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> AsyncGenerator[Any, None]:
        """Serve one request on an instance of ``model`` chosen by its balancer; stream the outputs.

        ``prompt`` is a string, token ids, or chat messages (rendered with the
        model's chat template). Outputs are the engine's own (vLLM's
        ``RequestOutput``). Closing the iterator early aborts the request in the
        engine; use ``contextlib.aclosing`` to make that immediate.
        """
        group = self._group(model)
        rendered = await self.render(model, prompt, chat_template_kwargs=chat_template_kwargs)
        # Instances of one model share tokenizer, defaults and context length.
        reference = _first_healthy(model, group).engine
        if sampling_params is None:
            sampling_params = reference.default_sampling_params()
        prompt_tokens = len(rendered.token_ids)
        n = getattr(sampling_params, "n", 1) or 1
        max_tokens = getattr(sampling_params, "max_tokens", None)
        if max_tokens is None:
            max_tokens = max(reference.max_model_len - prompt_tokens, 0)
        request = RequestInfo(
            model=model,
            request_id=request_id or uuid.uuid4().hex,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            n=n,
            prompt_token_ids=rendered.token_ids,
            session_key=session_key,
        )
        self._admission.admit(group, request)
        instance = self._choose(group, request)
        tried: list[Instance] = []
        while True:
            started = False
            try:
                # aclosing: when our caller closes us early, the inner stream (and the
                # engine's request) must close now, not whenever the GC gets to it.
                async with aclosing(self._serve(instance, request, rendered, sampling_params)) as outputs:
                    async for output in outputs:
                        started = True
                        yield output
                return
            except EngineError as exc:
                # Nothing reached the caller yet, so another engine may serve it whole.
                if started or len(tried) >= self._retries:
                    raise
                tried.append(instance)
                try:
                    instance = self._choose(group, request, exclude=tried)
                except NoHealthyEngineError:
                    raise exc from None
                logger.info("request %s: retrying on %s after: %s", request.request_id, instance.name, exc)

    def _choose(
        self, group: list[Instance], request: RequestInfo, exclude: Sequence[Instance] = ()
    ) -> Instance:
        candidates = [i for i in group if i.healthy and not any(i is x for x in exclude)]
        if not candidates:
            raise NoHealthyEngineError(request.model)
        balancer = self._balancers[request.model]
        chosen = balancer.choose(candidates, request)
        if not any(chosen is c for c in candidates):
            raise LylmError(
                f"{type(balancer).__name__}.choose() returned {chosen!r}, "
                "which is not one of the candidates it was given"
            )
        # -- shadow mode: candidates choose too, after the fact; never raises ---------
        if self._shadows:
            self._shadows.observe(candidates, request, chosen)
        return chosen

    async def _serve(
        self,
        instance: Instance,
        request: RequestInfo,
        rendered: RenderedPrompt,
        sampling_params: Any,
    ) -> AsyncGenerator[Any, None]:
        remaining = request.token_budget
        instance.in_flight_requests += 1
        instance.in_flight_tokens += remaining
        instance.dispatched += 1
        outcome: Outcome = "failed"
        prefilled = False
        started = self._clock()
        first_token: float | None = None
        generated = 0
        steps = instance.engine.generate(request.request_id, rendered, sampling_params)
        try:
            async for step in steps:
                done = step.new_tokens
                generated += step.new_tokens
                if first_token is None and step.new_tokens:
                    first_token = self._clock() - started
                if not prefilled:
                    prefilled = True
                    done += request.prompt_tokens
                    instance.prompt_tokens += request.prompt_tokens
                instance.generated_tokens += step.new_tokens
                done = min(done, remaining)
                remaining -= done
                instance.in_flight_tokens -= done
                yield step.output
            outcome = "completed"
        except (GeneratorExit, anyio.get_cancelled_exc_class()):
            outcome = "aborted"
            raise
        except EngineDeadError as exc:
            self._supervisor.engine_failed(instance, str(exc))
            raise
        finally:
            if outcome != "completed":
                # Closing the engine's stream aborts the request there; shielded so a
                # cancelled caller still frees the engine's slot.
                with anyio.CancelScope(shield=True):
                    await steps.aclose()
            instance.in_flight_requests -= 1
            instance.in_flight_tokens -= remaining
            if outcome == "completed":
                instance.completed += 1
            elif outcome == "aborted":
                instance.aborted += 1
            else:
                instance.failed += 1
            self._balancers[request.model].on_finish(instance, request, outcome)
            if self._observers:
                record = RequestRecord(
                    request, instance, outcome, first_token, self._clock() - started, generated
                )
                for observer in self._observers:
                    try:
                        observer(record)
                    except Exception:
                        logger.exception("request observer %r failed", observer)


def _first_healthy(model: str, group: Iterable[Instance]) -> Instance:
    for instance in group:
        if instance.healthy:
            return instance
    raise NoHealthyEngineError(model)
