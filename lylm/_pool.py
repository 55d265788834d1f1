"""EnginePool: several engine instances of several models, driven as one.

The pool composes small parts, each the one owner of its state: :class:`Membership`
(which instances each model has), :class:`Starter` (engine starts under per-GPU
locks), :class:`Router` (balancers and shadows), :class:`Books` (what each instance
has in flight and has served), :class:`Admission` (limits) and :class:`Supervisor`
(health, restarts). The pool itself owns its lifecycle and one request's path:
render once, check once, admit, choose, serve, retry.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypedDict, Union

import anyio

from ._admission import Admission
from ._balancer import Balancer
from ._books import Books, Tally
from ._config import EngineSpec, PoolConfig
from ._engine import Engine, RenderedPrompt
from ._exceptions import (
    EngineDeadError,
    EngineError,
    LylmError,
    NoHealthyEngineError,
    ShuttingDownError,
)
from ._instance import EngineStats, Instance
from ._kv_routing import KVAgreement, KVRouting
from ._membership import Membership
from ._render import Prompt as Prompt
from ._render import describe_request, first_healthy, on_healthy_engine, render_prompt
from ._request import RequestEnd, RequestInfo, RequestRecord
from ._routing import Router
from ._shadow import ShadowReport
from ._startup import Starter
from ._supervisor import RestartPolicy, Supervisor

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .balancers._resolve import BalancerLike

logger = logging.getLogger("lylm")

EngineFactory = Callable[[EngineSpec], Engine]


class PoolOptions(TypedDict, total=False):
    """:class:`EnginePool`'s keyword options, typed: for :meth:`EnginePool.from_config`
    and ``lylm.openai.serve(pool_options=...)``. Each is documented on the pool."""

    balancer: BalancerLike | None
    balancers: Mapping[str, BalancerLike] | None
    engine_factory: EngineFactory | None
    rng: random.Random | None
    clock: Callable[[], float]
    max_in_flight_requests: int | Mapping[str, int] | None
    max_in_flight_tokens: int | Mapping[str, int] | None
    retries: int
    restart: RestartPolicy | None
    health_interval: float
"""Builds an (unstarted) engine for one instance spec."""

ConfigSource = Union[PoolConfig, Mapping[str, Any], str, "os.PathLike[str]", Iterable[EngineSpec]]

def _vllm_engine_factory(spec: EngineSpec) -> Engine:
    from .engines._local import VLLMEngine

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
    on another healthy instance of the model, at most ``retries`` times, and not
    after a second engine died serving it (it may be what kills them). A prompt whose
    rendering engine dies meanwhile is rendered by another instance (no retry: no
    engine had the request yet).
    """

    #: Whether this pool's engines publish KV events to it, for balancers that route by them
    #: (a front-end worker's pool leaves that to the hub's).
    _subscribes_to_kv_events = True

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
        self._router = Router(config, balancer=balancer, balancers=balancers, rng=rng)
        factory = engine_factory or _vllm_engine_factory
        kv_models = self._router.kv_models() if self._subscribes_to_kv_events else []
        if kv_models:  # a balancer routes by the engines' KV events: they publish, the pool listens
            self._router.kv = KVRouting(config, kv_models)
            factory = self._router.kv.wrap(factory)
        # One starter for every engine start (pool start, add_instance, restarts):
        # it owns the per-GPU start locks.
        self._starter = Starter(factory)
        self._members = Membership(config, starter=self._starter, factory=factory)
        self._supervisor = Supervisor(
            instances=self._members.all,
            start_engine=self._starter.start_engine,
            policy=restart,
            interval=health_interval,
            rng=random.Random(rng.getrandbits(64)),
        )
        self._books = Books(clock=clock, engine_died=self._supervisor.engine_failed)
        if self._router.kv is not None:
            self._books.observers.append(self._router.kv.observe)
        self._state = "new"
        self._lock = anyio.Lock()

    @classmethod
    def from_config(cls, source: ConfigSource, **options: Unpack[PoolOptions]) -> EnginePool:
        """Build a pool from a config file path, a dict, a PoolConfig or a list of
        EngineSpecs; ``options`` are the constructor's (:class:`PoolOptions`)."""
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

        A remote instance whose engine core does not connect within its
        ``remote.timeout`` does not fail the start: the pool starts without it
        (the instance is listed ``dead``, with the reason) and, under a restart
        policy, keeps waiting for the core; it joins balancing once it connects.
        """
        async with self._lock:
            if self._state == "running":
                return
            if self._state == "closed":
                raise LylmError("the pool is closed; build a new one")
            specs = [spec for model in self._config.models for spec in model.instances]
            absent = self._members.adopt(specs, await self._starter.start_all(specs))
            self._state = "running"
            self._supervisor.start()
            for instance, reason in absent:
                self._supervisor.wait_for_core(instance, reason)

    async def aclose(self) -> None:
        """Shut every engine down; requests still in flight fail. Safe to call more than once.

        From the call on, new requests raise :class:`ShuttingDownError` (see
        :attr:`draining`). To let requests finish first, ``await pool.drain(timeout)``
        before closing.
        """
        async with self._lock:
            if self._state == "closed":
                return
            self._state = "closed"
            with anyio.CancelScope(shield=True):
                await self._supervisor.aclose()
                await self._members.stop_all()
                if self._router.kv is not None:
                    await anyio.to_thread.run_sync(self._router.kv.close)

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
        """True once the pool is shutting down: from :meth:`drain` or :meth:`aclose` on, closed
        included. It takes no new requests: they raise :class:`ShuttingDownError`.

        A closed pool counts: after a drain deadline its engines take seconds to stop,
        and what a server answers meanwhile must not change (503, ``/health`` draining).
        """
        return self._state in ("draining", "closed")

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
        ``starting`` until its engine is up (which waits for its GPUs' start
        locks); a failed start raises :class:`EngineStartError` and leaves
        nothing behind.
        """
        self._group(model)  # a served model, in a running pool
        return await self._members.add(model, engine_args=engine_args, gpu_ids=gpu_ids, weight=weight)

    async def drain_instance(self, instance: Instance | str, *, timeout: float | None = None) -> bool:
        """Take an instance out of balancing, let its requests finish, then stop and remove it.

        Waits at most ``timeout`` seconds (None: as long as it takes); requests
        still running then fail with :class:`EngineDeadError` (those without
        output yet are retried elsewhere). Returns True if none had to fail.
        """
        name = self._members.find(instance).name
        try:
            return await self._members.drain(instance, timeout=timeout)
        finally:
            if self._router.kv is not None:
                self._router.kv.forget(name)

    async def remove_instance(self, instance: Instance | str) -> None:
        """Stop an instance now and remove it; its requests fail (or retry elsewhere before output)."""
        await self.drain_instance(instance, timeout=0)

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
            return self._members.all()
        self._router.balancer(model)  # UnknownModelError for a model not served
        return tuple(self._members.group(model))

    def limits(self, model: str) -> dict[str, int]:
        """``model``'s admission limits that are set: ``max_in_flight_requests``,
        ``max_in_flight_tokens`` (see the config's ``limits``)."""
        self._router.balancer(model)  # UnknownModelError for a model not served
        limits = {
            "max_in_flight_requests": self._admission.max_requests.get(model),
            "max_in_flight_tokens": self._admission.max_tokens.get(model),
        }
        return {name: value for name, value in limits.items() if value is not None}

    def max_model_len(self, model: str) -> int:
        """The context length of ``model``'s engines (prompt plus output, in tokens)."""
        return first_healthy(model, self._group(model)).engine.max_model_len

    def output_parsing(self, model: str) -> Any:
        """How ``model``'s output is parsed into tool calls and reasoning (see
        :meth:`Engine.output_parsing`); the same for every instance of a model."""
        return first_healthy(model, self._group(model)).engine.output_parsing()

    def sampling_defaults(self, model: str) -> Mapping[str, Any]:
        """``model``'s own sampling defaults (its generation config: ``temperature``,
        ``top_p``, ``top_k``...), for what a request leaves out; the OpenAI adapter applies
        them as ``vllm serve`` does."""
        return first_healthy(model, self._group(model)).engine.sampling_defaults()

    def balancer(self, model: str) -> Balancer:
        """The balancer that chooses among ``model``'s instances."""
        return self._router.balancer(model)

    def add_observer(self, observer: Callable[[RequestRecord], None]) -> None:
        """Call ``observer`` with a :class:`RequestRecord` whenever a dispatched request ends.

        Observers run on the event loop, synchronously: keep them cheap (count,
        observe a histogram). An observer that raises is logged and ignored.
        """
        self._books.observers.append(observer)

    def remove_observer(self, observer: Callable[[RequestRecord], None]) -> None:
        """Stop calling ``observer``."""
        self._books.observers.remove(observer)

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
        self._router.add_shadow(model, balancer, name=name, rng=rng)

    def remove_shadow(self, model: str, name: str) -> None:
        """Stop the shadow ``name`` of ``model``."""
        self._router.remove_shadow(model, name)

    def shadow_report(self, model: str | None = None) -> list[ShadowReport]:
        """Agreement and choice counts of ``model``'s shadows (or of every model's)."""
        return self._router.shadow_report(model)

    def kv_agreement(self) -> list[KVAgreement]:
        """For a balancer that routes by the engines' KV events (``kv_aware``): per instance,
        the blocks the index holds for it and how the cached tokens predicted for it compared
        with what its engine reported (:class:`KVAgreement`); empty otherwise."""
        return self._router.kv.agreements() if self._router.kv is not None else []

    def stats(self) -> dict[str, list[EngineStats]]:
        """A snapshot of every instance's books, by model."""
        return {m: [i.stats() for i in self._members.group(m)] for m in self.models if self._members.group(m)}

    def _group(self, model: str) -> list[Instance]:
        self._router.balancer(model)  # UnknownModelError for a model not served
        if self._state == "draining":
            raise ShuttingDownError()
        if self._state == "closed":
            # Refused like a draining pool's requests (a server answers 503 while its
            # engines stop), and said as such to a library caller.
            raise ShuttingDownError("the pool is closed and takes no new requests")
        if self._state != "running":
            raise LylmError(f"the pool is {self._state}; use 'async with pool' or 'await pool.start()'")
        return self._members.group(model)

    # -- requests --------------------------------------------------------------

    async def render(
        self,
        model: str,
        prompt: Prompt | RenderedPrompt,
        *,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> RenderedPrompt:
        """Tokenize ``prompt`` (applying the chat template to messages) with ``model``'s tokenizer."""
        return await on_healthy_engine(
            model,
            self._group(model),
            lambda engine: render_prompt(engine, prompt, chat_template_kwargs=chat_template_kwargs),
            engine_failed=self._supervisor.engine_failed,
        )

    async def decode(self, model: str, token_ids: Sequence[int]) -> str:
        """Detokenize ``token_ids`` with ``model``'s tokenizer."""
        return await on_healthy_engine(
            model, self._group(model), lambda engine: engine.decode(token_ids), engine_failed=self._supervisor.engine_failed
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
        model's chat template), rendered once. A prompt plus ``max_tokens`` longer
        than the model's context raises :class:`ContextLengthError` (without
        ``max_tokens`` the request may use the rest of the context). Outputs are
        the engine's own (vLLM's ``RequestOutput``). Closing the iterator early
        aborts the request in the engine; use ``contextlib.aclosing`` to make
        that immediate.
        """
        group = self._group(model)
        try:
            # Instances of one model share tokenizer, defaults and context length. Read the
            # last two now, from an engine that is up: by the time the render returns, the
            # engine it ran on may have died and been shut down.
            reference = first_healthy(model, group).engine
            context = reference.max_model_len
            if sampling_params is None:
                sampling_params = reference.default_sampling_params()
            # Rendered where an engine is up: should it die meanwhile, on another instance.
            rendered = await on_healthy_engine(
                model,
                group,
                lambda engine: render_prompt(engine, prompt, chat_template_kwargs=chat_template_kwargs),
                engine_failed=self._supervisor.engine_failed,
            )
            request = describe_request(
                model,
                rendered,
                sampling_params,
                context=context,
                request_id=request_id,
                session_key=session_key,
            )
            request = self._prepare(request)
            tally = await self._choose(group, request, ())
        except (EngineError, NoHealthyEngineError) as exc:
            self._closed_under(exc)  # its engines stopped as the pool closed, before it was dispatched
            raise
        tried: list[Instance] = []
        deaths = 0
        while True:
            started = False
            try:
                # aclosing: when our caller closes us early, the inner stream (and the
                # engine's request) must close now, not whenever the GC gets to it.
                async with aclosing(self._serve(tally, rendered, sampling_params)) as outputs:
                    async for output in outputs:
                        started = True
                        yield output
                return
            except EngineError as exc:
                self._closed_under(exc)  # never retried
                # Nothing reached the caller yet, so another engine may serve it whole.
                if started or len(tried) >= self._retries:
                    raise
                # An engine that died serving it may have died of it (a prompt that crashes
                # the model): one more engine may try, never a third one.
                deaths += isinstance(exc, EngineDeadError)
                if deaths > 1:
                    raise
                tried.append(tally.instance)
                try:
                    tally = await self._choose(group, request, tried)
                except NoHealthyEngineError:
                    raise exc from None
                logger.info("request %s: retrying on %s after: %s", request.request_id, tally.instance.name, exc)

    def _closed_under(self, exc: Exception) -> None:
        """A request failed: if the pool was closed under it (a drain that timed out), that
        is not a failure of its engines: raise :class:`ShuttingDownError` saying so."""
        if self._state == "closed":
            raise ShuttingDownError("the server shut down before this request finished") from exc

    # -- one request's dispatch: admission and choice, then the books ----------------
    # (A front-end worker's pool overrides these to ask the pool-wide hub.)

    def _prepare(self, request: RequestInfo) -> RequestInfo:
        """``request`` as its balancer wants it (:meth:`Balancer.preparer`), where it was rendered."""
        return self._router.prepare(request)

    async def _choose(self, group: list[Instance], request: RequestInfo, tried: Sequence[Instance]) -> Tally:
        """Admit ``request`` (on its first try) and choose its instance, excluding ``tried``:
        the request's account there, booked once it is served."""
        if not tried:
            self._admission.admit(group, request)
        return Tally(*self._router.choose(group, request, exclude=tried))

    def _serve(self, tally: Tally, rendered: RenderedPrompt, sampling_params: Any) -> AsyncGenerator[Any, None]:
        balancer = self._router.balancer(tally.request.model)
        return self._books.serve(tally, rendered, sampling_params, balancer)

    # -- the books of requests served elsewhere (by front-end workers; see lylm.server._hub) ----

    def _dispatch_elsewhere(self, request: RequestInfo, exclude: Sequence[str], first: bool) -> Tally:
        """Admit and choose as :meth:`generate` does, and book the request as in flight
        there, for a request that another process serves: its account, kept in step with
        that process's reports (:meth:`Tally.sync`) and closed by :meth:`_ended_elsewhere`."""
        group = self._group(request.model)
        tried = [i for i in group if i.name in exclude] if exclude else []
        if first:
            self._admission.admit(group, request)
        tally = Tally(*self._router.choose(group, request, exclude=tried))
        self._books.begin(tally)
        return tally

    def _ended_elsewhere(self, tally: Tally, end: RequestEnd) -> None:
        """Book the end of a request :meth:`_dispatch_elsewhere` booked (once)."""
        self._books.end(tally, end, self._router.balancer(tally.request.model))
