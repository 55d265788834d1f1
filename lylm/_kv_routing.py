"""Precise prefix routing, the pool's side: KV events on for the models whose balancer asks.

A balancer that declares ``kv_events = True`` (``kv_aware``) gets, in each request's
``RequestInfo.cached_tokens``, how many of the prompt's tokens every candidate's engine
holds in its prefix cache, as the engines themselves published it (vLLM's KV events),
not as the balancer guessed it. :class:`KVRouting` makes that so:

- each engine of such a model is started with ``enable_prefix_caching`` and a
  ``kv_events_config`` publishing on IPC sockets in a private folder of the pool's (no
  network address is opened);
- a :class:`~lylm.engines._kv_events.KVEventStream` per engine, started with the engine,
  applies its events to one :class:`~lylm._kv_index.KVIndex` under a key of its own (a
  restarted engine starts empty; the old engine's stream ends and its entries go);
- a remote instance's core publishes over TCP to ``remote.address:remote.kv_events_port``,
  where the pool listens (as it listens for the core to attach): ``lylm core
  --kv-events-port`` turns that on, a core placed through Ray gets it in its flags;
- :meth:`overlaps` answers per candidate, for candidates whose current engine has a
  stream. Others (a remote instance without ``kv_events_port``, a stream that failed) are
  left out of the map, and the balancer falls back to its own table for them.

With front-end workers (``lylm serve --workers N``) the main process's pool starts the
engine cores and its hub chooses: one index for the whole server.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

import attrs

from ._config import EngineSpec, PoolConfig
from ._exceptions import ConfigError
from ._kv_index import DEFAULT_GRANULE, DEFAULT_MAX_BLOCKS, DEFAULT_MAX_PREFIX_TOKENS, KVIndex
from .balancers._prefix_table import block_hashes

if TYPE_CHECKING:
    from ._engine import Engine
    from ._instance import Instance
    from ._request import RequestInfo, RequestRecord
    from .engines._kv_events import KVEventStream

logger = logging.getLogger("lylm")


@attrs.define
class KVAgreement:
    """What the index holds for one instance, and how the cached tokens predicted for it
    (what the balancer was told) compared with what its engine then reported, over the
    requests routed by KV events that it served.

    ``blocks``: the engine blocks the index holds for the instance's current engine (None:
    no event stream); ``replays``: gaps its stream asked the engine's buffer to fill.

    ``exact``, ``over`` (predicted more than reported) and ``under`` count requests;
    ``unpredicted`` those routed while the instance had no event stream (the table's guess);
    ``predicted_tokens`` and ``reported_tokens`` sum the two sides over the predicted ones.
    A prediction is made at routing time: a block evicted or cached before the engine
    schedules the request makes the two differ, and that is what this shows.
    """

    model: str
    instance: str
    index: int
    exact: int = 0
    over: int = 0
    under: int = 0
    unpredicted: int = 0
    predicted_tokens: int = 0
    reported_tokens: int = 0
    blocks: int | None = None
    replays: int = 0


@attrs.define
class _Subscription:
    engine: Engine
    key: str
    stream: KVEventStream
    model: str
    index: int


class KVRouting:
    """The KV index of the models in ``models`` and the event stream of each of their engines."""

    def __init__(
        self,
        config: PoolConfig,
        models: Collection[str],
        *,
        granule: int = DEFAULT_GRANULE,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
    ) -> None:
        self.models = frozenset(models)
        for model in config.models:
            if model.name not in self.models:
                continue
            for spec in model.instances:
                _check_args(spec)
                if spec.remote is not None and spec.remote.kv_events_port is None:
                    logger.warning(
                        "%s: no remote.kv_events_port: the pool has no KV events from this remote "
                        "core, and the model's balancer judges it by the prefixes it sent there", spec.name,
                    )  # fmt: skip
        self.index = KVIndex(granule=granule, max_blocks=max_blocks)
        self._agreements: dict[str, KVAgreement] = {}
        self._subscriptions: dict[str, _Subscription] = {}
        self._serial = itertools.count()
        self._folder: str | None = None

    def wrap(self, factory: Callable[[EngineSpec], Engine]) -> Callable[[EngineSpec], Engine]:
        """``factory``, making the engines of :attr:`models` publish their KV events, and
        subscribing to them."""

        def make(spec: EngineSpec) -> Engine:
            remote = spec.remote
            if spec.model not in self.models or (remote is not None and remote.kv_events_port is None):
                return factory(spec)
            _check_args(spec)
            from .engines._kv_events import kv_events_config, kv_events_endpoints, remote_endpoint

            serial = next(self._serial)
            replay: str | None
            if remote is not None and remote.kv_events_port is not None:
                # The core, on its host, connects its publisher to the pool's address (as it
                # attaches there); no replay buffer across the network: after a gap the
                # index cannot tell, and the balancer falls back.
                endpoint, replay = remote_endpoint(remote.address, remote.kv_events_port), None
            else:
                if self._folder is None:
                    self._folder = tempfile.mkdtemp(prefix="lylm-kv-")
                endpoint, replay = kv_events_endpoints(self._folder, str(serial))
            args = {**spec.engine_args, "enable_prefix_caching": True,
                    "kv_events_config": kv_events_config(endpoint, replay)}  # fmt: skip
            engine = factory(attrs.evolve(spec, engine_args=args))
            self._subscribe(spec, engine, f"{spec.name}#{serial}", endpoint, replay, bind=remote is not None)
            return engine

        return make

    def overlaps(self, candidates: Sequence[Instance], request: RequestInfo) -> dict[str, int]:
        """Per candidate (by name), the prompt tokens its engine holds cached, for those the
        index can answer for."""
        found: dict[str, int] = {}
        hashes: Sequence[int] = request.prefix_hashes
        if not hashes and request.prompt_token_ids:  # a balancer without a preparer
            granule = self.index.granule
            hashes = block_hashes(request.prompt_token_ids, granule, DEFAULT_MAX_PREFIX_TOKENS // granule)
        if not hashes:
            return found
        for candidate in candidates:
            sub = self._subscriptions.get(candidate.name)
            if sub is None or sub.engine is not candidate.engine:
                continue
            tokens = self.index.cached_tokens(sub.key, hashes, request.prompt_tokens)
            if tokens is not None:
                found[candidate.name] = tokens
        return found

    def observe(self, record: RequestRecord) -> None:
        """A request ended (a pool observer): count its prediction against what its engine reported."""
        request, reported = record.request, record.cached_tokens
        if request.cached_tokens is None or reported is None or request.model not in self.models:
            return
        name = record.instance.name
        agreement = self._agreements.get(name)
        if agreement is None:
            agreement = self._agreements[name] = KVAgreement(request.model, name, record.instance.index)
        predicted = request.cached_tokens.get(name)
        if predicted is None:
            agreement.unpredicted += 1
            return
        agreement.predicted_tokens += predicted
        agreement.reported_tokens += reported
        if predicted == reported:
            agreement.exact += 1
        elif predicted > reported:
            agreement.over += 1
        else:
            agreement.under += 1

    def agreements(self) -> list[KVAgreement]:
        """Per instance subscribed to or that served such requests, its :class:`KVAgreement`
        (copies)."""
        found: list[KVAgreement] = []
        for name, sub in self._subscriptions.items():
            if name not in self._agreements:
                self._agreements[name] = KVAgreement(sub.model, name, sub.index)
        for name, agreement in self._agreements.items():
            current = self._subscriptions.get(name)
            blocks = self.index.blocks(current.key) if current is not None else None
            replays = current.stream.replays if current is not None else 0
            found.append(attrs.evolve(agreement, blocks=blocks, replays=replays))
        return found

    def forget(self, name: str) -> None:
        """The instance ``name`` left the pool: its stream ends (on its own, within 0.1 s) and
        its entries go."""
        sub = self._subscriptions.pop(name, None)
        if sub is not None:
            sub.stream.stop(wait=False)

    def close(self) -> None:
        """Stop every stream (blocks up to a fraction of a second per stream: call from a
        worker thread) and remove the sockets' folder."""
        subscriptions, self._subscriptions = self._subscriptions, {}
        for sub in subscriptions.values():
            sub.stream.stop(wait=False)
        for sub in subscriptions.values():
            sub.stream.stop(wait=True)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _subscribe(
        self, spec: EngineSpec, engine: Engine, key: str, endpoint: str, replay: str | None, *, bind: bool
    ) -> None:
        from .engines._kv_events import KVEventStream

        name = spec.name
        old = self._subscriptions.pop(name, None)
        if old is not None:  # the engine it followed was replaced: it ends on its own
            old.stream.stop(wait=False)
        self.index.open(key)
        stream = KVEventStream(self.index, key, endpoint, replay, bind=bind)
        stream.start()
        self._subscriptions[name] = _Subscription(engine, key, stream, spec.model, spec.index)


def _check_args(spec: EngineSpec) -> None:
    """An instance of a model routed by KV events must let lylm set them up."""
    if spec.engine_args.get("enable_prefix_caching") is False:
        raise ConfigError(
            f"{spec.name}.engine_args.enable_prefix_caching",
            "the model's balancer routes by the engines' prefix caches (KV events); it must not be false",
        )
    if spec.engine_args.get("kv_events_config") is not None:
        raise ConfigError(
            f"{spec.name}.engine_args.kv_events_config",
            "the model's balancer subscribes to the engines' KV events itself; leave it out",
        )
