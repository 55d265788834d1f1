"""Pool configuration: parse and validate the JSON config into engine specs.

There is exactly one validator (:func:`_build`); every other entry point
(:meth:`PoolConfig.from_json`, :meth:`PoolConfig.from_file`,
:meth:`PoolConfig.from_specs`) converts its input to the dict form first, so a
mistake gets the same message however the pool was configured.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, NoReturn

import attrs

from ._exceptions import ConfigError
from .balancers._registry import BALANCERS, DEFAULT_BALANCER

__all__ = ["EngineSpec", "ModelSpec", "PoolConfig", "RemoteCore"]

_TOP_KEYS = ("common", "models")
_COMMON_KEYS = ("balancer", "engine_args", "limits", "workers")
_MODEL_KEYS = ("instances", "balancer", "limits")
_LIMIT_KEYS = ("max_in_flight_requests", "max_in_flight_tokens")
_INSTANCE_KEYS = ("devices", "engine_args", "remote")
_REMOTE_KEYS = ("address", "port", "timeout", "heartbeat", "ray", "kv_events_port")
_RAY_KEYS = ("gpus", "cpus", "address")
#: Addresses that bind every interface: an engine core's sockets carry no authentication.
_WILDCARDS = ("0.0.0.0", "::", "[::]", "*", "")
_DEVICE_KEYS = ("gpu_ids", "weight")
_MODELS_SHAPE = 'must be a list of instances or {"instances": [...], "balancer": ...}'


def _copy_args(value: Mapping[str, Any]) -> dict[str, Any]:
    """Copy engine args so a spec never aliases the caller's (mutable) mapping."""
    return dict(value)


@attrs.frozen
class RayPlacement:
    """A remote core the pool starts itself, on a Ray node with these resources free: a
    placement group of one bundle (``gpus`` GPUs, ``cpus`` CPUs). ``address``: the Ray
    cluster's (``ray.init``'s; None: ``RAY_ADDRESS``, or a Ray already started in this
    process)."""

    gpus: int = 1
    cpus: float = 1.0
    address: str | None = None


@attrs.frozen
class RemoteCore:
    """Where a remote instance's engine core attaches: vLLM's headless mode, addressed as
    vLLM addresses it. The pool listens on ``address:port`` (an address of this host that
    the core's host reaches: vLLM's ``--data-parallel-address`` and
    ``--data-parallel-rpc-port``) and the core, started on its own host with ``lylm core
    --pool ADDRESS:PORT MODEL ...`` (vLLM's headless core, kept attachable), connects to it.

    ``timeout``: seconds to wait, per attempt, for the core to connect; once connected,
    its start (weights, profiling, compiling) takes as long as it takes. ``heartbeat``:
    seconds the core may leave a ping unanswered before it counts as lost (pings go every
    third of it, answered by the core's ZeroMQ I/O thread even during a long engine
    step); a lost core is noticed within about 4/3 of it plus the pool's health
    interval (1.8 s by default)."""

    timeout_default: ClassVar[float] = 60.0
    heartbeat_default: ClassVar[float] = 1.2

    address: str
    port: int
    timeout: float = timeout_default
    heartbeat: float = heartbeat_default
    #: Where Ray places the core, when the pool starts it through Ray (None: started on its host).
    ray: RayPlacement | None = None
    #: For a balancer that routes by KV events (``kv_aware``): the port at ``address`` where
    #: the pool listens for the core's KV events (``lylm core --kv-events-port``; a core
    #: placed through Ray is told). None: the instance is judged by the balancer's table.
    kv_events_port: int | None = None

    def describe(self) -> str:
        """``address:port`` as a URL host part (IPv6 in brackets)."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@attrs.frozen
class EngineSpec:
    """One engine instance: the model it serves, its vLLM engine args, GPUs and weight; for
    an instance whose engine core runs on another host, where it attaches (``remote``)."""

    model: str
    # Excluded from the hash (a dict is unhashable) but still compared by ==.
    engine_args: Mapping[str, Any] = attrs.field(converter=_copy_args, hash=False)
    gpu_ids: tuple[int, ...] = ()
    weight: float = 1.0
    index: int = 0
    remote: RemoteCore | None = None

    @property
    def name(self) -> str:
        """The instance's config path, e.g. ``models["tiny"][1]``."""
        return f"{_model_path(self.model)}[{self.index}]"


@attrs.frozen
class ModelSpec:
    """A served model: its instances, balancer name and admission limits (None: unlimited)."""

    name: str
    instances: tuple[EngineSpec, ...]
    balancer: str
    max_in_flight_requests: int | None = None
    max_in_flight_tokens: int | None = None


@attrs.frozen
class PoolConfig:
    """A validated pool configuration."""

    models: tuple[ModelSpec, ...]
    #: Front-end worker processes for a server (``common.workers``); None: the server decides.
    workers: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PoolConfig:
        """Validate a config in dict form (as parsed from JSON)."""
        models = _build(data)
        workers = data.get("common", {}).get("workers")
        if workers is not None and (not _is_int(workers) or workers < 1):
            _fail("common.workers", f"must be a positive integer (got {_show(workers)})")
        return cls(models=models, workers=workers)

    @property
    def gpus(self) -> tuple[int, ...]:
        """Every GPU some instance is pinned to, in order."""
        return tuple(sorted({g for m in self.models for spec in m.instances for g in spec.gpu_ids}))

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "<config>") -> PoolConfig:
        """Parse and validate a JSON config; ``source`` names it in error messages."""

        def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            # json silently keeps the last duplicate; a dropped model is a foot-gun.
            out: dict[str, Any] = {}
            for key, value in pairs:
                if key in out:
                    raise ConfigError("", f"{source}: duplicate key {json.dumps(key)} in a JSON object")
                out[key] = value
            return out

        try:
            data = json.loads(text, object_pairs_hook=no_duplicates)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                "", f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from None
        except UnicodeDecodeError as exc:
            raise ConfigError("", f"{source}: not valid UTF-8 text: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PoolConfig:
        """Read, parse and validate a JSON config file."""
        path_str = os.fspath(path)
        try:
            # Bytes, so json detects the encoding and decode errors get our message.
            with open(path_str, "rb") as handle:
                raw = handle.read()
        except OSError as exc:
            raise ConfigError(
                "", f"cannot read config file '{path_str}': {exc.strerror or exc}"
            ) from None
        return cls.from_json(raw, source=path_str)

    @classmethod
    def from_specs(
        cls,
        specs: Iterable[EngineSpec],
        *,
        balancer: str | None = None,
        balancers: Mapping[str, str] | None = None,
    ) -> PoolConfig:
        """Build a config from engine specs (grouped by model in order of appearance)."""
        models: dict[Any, Any] = {}
        for spec in specs:
            if not isinstance(spec, EngineSpec):
                raise TypeError(f"from_specs() expects EngineSpec items, got {type(spec).__name__}")
            entry = models.setdefault(spec.model, {"instances": []})
            gpu_ids: Any = spec.gpu_ids
            if isinstance(gpu_ids, tuple):
                gpu_ids = list(gpu_ids)
            instance: dict[str, Any] = {
                "devices": {"gpu_ids": gpu_ids, "weight": spec.weight},
                "engine_args": spec.engine_args,
            }
            if spec.remote is not None:
                instance["remote"] = {k: v for k, v in attrs.asdict(spec.remote).items() if v is not None}
            entry["instances"].append(instance)
        # A balancer for a model without specs shows up as "has no instances".
        for name, model_balancer in (balancers or {}).items():
            models.setdefault(name, {"instances": []})["balancer"] = model_balancer
        data: dict[str, Any] = {"models": models}
        if balancer is not None:
            data["common"] = {"balancer": balancer}
        return cls.from_dict(data)

    @classmethod
    def load(
        cls,
        source: PoolConfig | Mapping[str, Any] | str | os.PathLike[str] | Iterable[EngineSpec],
    ) -> PoolConfig:
        """Accept any supported config form: a PoolConfig, dict, file path or specs."""
        if isinstance(source, PoolConfig):
            return source
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        if isinstance(source, (str, os.PathLike)):
            return cls.from_file(source)
        if isinstance(source, (bytes, bytearray)):
            # Iterable, but never a list of specs; likely meant from_json().
            raise TypeError("load() does not take bytes; use PoolConfig.from_json()")
        return cls.from_specs(source)

    def model(self, name: str) -> ModelSpec:
        """The spec of the served model ``name``; KeyError if it is not configured."""
        for spec in self.models:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def model_names(self) -> tuple[str, ...]:
        """The served model names, in config order."""
        return tuple(spec.name for spec in self.models)


# --- validation -------------------------------------------------------------


def _show(value: Any) -> str:
    """Render an offending value as JSON when possible, shortened for messages."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _model_path(name: str) -> str:
    return f"models[{json.dumps(name)}]"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _fail(path: str, message: str) -> NoReturn:
    raise ConfigError(path, message)


def _check_keys(obj: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
    for key in obj:
        if key not in allowed:
            _fail(_join(path, key), f"unknown key (allowed: {', '.join(allowed)})")


def _object(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        _fail(path, f"must be an object (got {_show(value)})")
    return value


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `true` is never a sensible count or index.
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: Any, path: str, unit: str) -> float:
    """A finite number above 0 (of ``unit``, for the message), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        _fail(path, f"must be a positive number of {unit} (got {_show(value)})")
    return float(value)


def _balancer(value: Any, path: str) -> str:
    if not isinstance(value, str):
        _fail(path, f"must be a string (got {_show(value)})")
    module, sep, attr = value.partition(":")
    if value in BALANCERS or (sep and module and attr):
        return value
    known = ", ".join(sorted(BALANCERS))
    _fail(path, f'unknown balancer {json.dumps(value)} (known: {known}; or a "module:Class" import string)')


def _check_pinning_args(args: Mapping[str, Any], path: str) -> None:
    """Reject engine args that conflict with how lylm places and replicates engines."""
    if "device_ids" in args:
        _fail(_join(path, "device_ids"), "set devices.gpu_ids instead; lylm pins each instance through it")
    dp = args.get("data_parallel_size", 1)
    if not _is_int(dp) or dp < 1:
        _fail(_join(path, "data_parallel_size"), f"must be a positive integer (got {_show(dp)})")
    if dp > 1:
        _fail(
            _join(path, "data_parallel_size"),
            "lylm runs replicas as separate instances; list one instance per replica instead",
        )


def _gpu_ids(value: Any, path: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        _fail(path, f"must be a list of GPU indices (got {_show(value)})")
    seen: set[int] = set()
    for i, gpu in enumerate(value):
        if not _is_int(gpu) or gpu < 0:
            _fail(f"{path}[{i}]", f"must be a non-negative integer (got {_show(gpu)})")
        if gpu in seen:
            _fail(path, f"duplicate GPU index {gpu}")
        seen.add(gpu)
    return tuple(value)


def _weight(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(path, f"must be a finite number (got {_show(value)})")
    if value <= 0:
        _fail(path, f"must be > 0 (got {_show(value)})")
    return float(value)


def _instance(
    raw: Any, path: str, *, model: str, index: int, common_args: Mapping[str, Any]
) -> EngineSpec:
    if not isinstance(raw, Mapping):
        _fail(path, f"must be an object (got {_show(raw)})")
    _check_keys(raw, _INSTANCE_KEYS, path)

    devices = _object(raw.get("devices", {}), f"{path}.devices")
    _check_keys(devices, _DEVICE_KEYS, f"{path}.devices")
    gpu_ids = _gpu_ids(devices.get("gpu_ids", []), f"{path}.devices.gpu_ids")
    weight = _weight(devices.get("weight", 1), f"{path}.devices.weight")

    args_path = f"{path}.engine_args"
    if "engine_args" not in raw:
        _fail(args_path, "required")
    own_args = _object(raw["engine_args"], args_path)
    _check_pinning_args(own_args, args_path)
    args = {**common_args, **own_args}

    def arg_path(key: str) -> str:
        # Blame the value where it was written: the instance, or common.engine_args.
        return _join(args_path if key in own_args else "common.engine_args", key)

    if "model" not in args:
        _fail(_join(args_path, "model"), "required (the model's weights: a local path or a hub name)")
    if not isinstance(args["model"], str) or not args["model"]:
        _fail(arg_path("model"), f"must be a non-empty string (got {_show(args['model'])})")

    sizes = []
    for key in ("tensor_parallel_size", "pipeline_parallel_size"):
        size = args.get(key, 1)
        if not _is_int(size) or size < 1:
            _fail(arg_path(key), f"must be a positive integer (got {_show(size)})")
        sizes.append(size)
    tp, pp = sizes
    if gpu_ids and tp * pp != len(gpu_ids):
        n = len(gpu_ids)
        _fail(
            f"{path}.devices.gpu_ids",
            f"lists {n} GPU{'' if n == 1 else 's'} but tensor_parallel_size x "
            f"pipeline_parallel_size = {tp} x {pp} = {tp * pp}",
        )
    remote = None
    if "remote" in raw:
        remote = _remote(raw["remote"], f"{path}.remote")
        if gpu_ids:
            _fail(f"{path}.devices.gpu_ids", "a remote instance's GPUs are chosen on its own host (leave gpu_ids out)")
        for key in ("data_parallel_address", "data_parallel_rpc_port", "data_parallel_size_local"):
            if key in args:
                _fail(arg_path(key), "set by lylm for a remote instance (from remote.address and remote.port)")
    return EngineSpec(model=model, engine_args=args, gpu_ids=gpu_ids, weight=weight, index=index, remote=remote)


def _remote(value: Any, path: str) -> RemoteCore:
    remote = _object(value, path)
    _check_keys(remote, _REMOTE_KEYS, path)
    for key in ("address", "port"):
        if key not in remote:
            _fail(f"{path}.{key}", "required")
    address, port = remote["address"], remote["port"]
    if not isinstance(address, str):
        _fail(f"{path}.address", f"must be a string (got {_show(address)})")
    if address.strip() in _WILDCARDS:
        _fail(
            f"{path}.address",
            f"{_show(address)} would listen on every interface, and an engine core's sockets carry no "
            "authentication: name this host's address on the private network the remote host reaches",
        )
    if not _is_int(port) or not 1 <= port <= 65535:
        _fail(f"{path}.port", f"must be a port number, 1 to 65535 (got {_show(port)})")
    seconds = {
        key: _positive(remote.get(key, default), f"{path}.{key}", "seconds")
        for key, default in (("timeout", RemoteCore.timeout_default), ("heartbeat", RemoteCore.heartbeat_default))
    }
    if seconds["heartbeat"] < 0.1:
        _fail(f"{path}.heartbeat", f"must be at least 0.1 s (got {_show(remote['heartbeat'])})")
    ray = _ray(remote["ray"], f"{path}.ray") if "ray" in remote else None
    kv_port = remote.get("kv_events_port")
    if kv_port is not None:
        if not _is_int(kv_port) or not 1 <= kv_port <= 65535:
            _fail(f"{path}.kv_events_port", f"must be a port number, 1 to 65535 (got {_show(kv_port)})")
        if kv_port == port:
            _fail(f"{path}.kv_events_port", f"must differ from port ({port}): the core attaches there")
    return RemoteCore(address=address.strip(), port=port, ray=ray, kv_events_port=kv_port, **seconds)


def _ray(value: Any, path: str) -> RayPlacement:
    ray = _object(value, path)
    _check_keys(ray, _RAY_KEYS, path)
    gpus, cpus, address = ray.get("gpus", 1), ray.get("cpus", 1.0), ray.get("address")
    if not _is_int(gpus) or gpus < 0:
        _fail(f"{path}.gpus", f"must be a whole number of GPUs, 0 or more (got {_show(gpus)})")
    cpus = _positive(cpus, f"{path}.cpus", "CPUs")
    if address is not None and (not isinstance(address, str) or not address.strip()):
        _fail(f"{path}.address", f"must be a Ray cluster address such as 'auto' or 'ray://head:10001' (got {_show(address)})")
    return RayPlacement(gpus=gpus, cpus=cpus, address=address.strip() if address else None)


def _limits(value: Any, path: str) -> dict[str, int]:
    limits = _object(value, path)
    _check_keys(limits, _LIMIT_KEYS, path)
    for key, limit in limits.items():
        if not _is_int(limit) or limit < 1:
            _fail(_join(path, key), f"must be a positive integer (got {_show(limit)})")
    return dict(limits)


def _model(
    name: Any,
    raw: Any,
    *,
    common_args: Mapping[str, Any],
    default_balancer: str,
    common_limits: Mapping[str, int],
) -> ModelSpec:
    if not isinstance(name, str) or not name:
        _fail("models", f"model names must be non-empty strings (got {_show(name)})")
    path = _model_path(name)
    balancer = default_balancer
    limits = dict(common_limits)
    if isinstance(raw, Mapping):
        _check_keys(raw, _MODEL_KEYS, path)
        if "balancer" in raw:
            balancer = _balancer(raw["balancer"], f"{path}.balancer")
        limits.update(_limits(raw.get("limits", {}), f"{path}.limits"))
        raw_instances = raw.get("instances", [])
        if not isinstance(raw_instances, list):
            _fail(f"{path}.instances", f"must be a list of instances (got {_show(raw_instances)})")
    elif isinstance(raw, list):
        raw_instances = raw
    else:
        _fail(path, f"{_MODELS_SHAPE} (got {_show(raw)})")
    if not raw_instances:
        _fail(path, "has no instances")
    # Instances are named models["m"][i] in both forms, matching EngineSpec.name, so
    # an error and a later engine failure point at the instance the same way.
    instances = tuple(
        _instance(item, f"{path}[{i}]", model=name, index=i, common_args=common_args)
        for i, item in enumerate(raw_instances)
    )
    return ModelSpec(
        name=name,
        instances=instances,
        balancer=balancer,
        max_in_flight_requests=limits.get("max_in_flight_requests"),
        max_in_flight_tokens=limits.get("max_in_flight_tokens"),
    )


def instance_spec(model: str, raw: Mapping[str, Any], *, index: int) -> EngineSpec:
    """Validate one instance entry in the config file's form, for an instance added at runtime."""
    return _instance(raw, f"{_model_path(model)}[{index}]", model=model, index=index, common_args={})


def _build(data: Any) -> tuple[ModelSpec, ...]:
    """The one validator: turn a config in dict form into model specs or raise ConfigError."""
    if not isinstance(data, Mapping):
        _fail("", f"config must be a JSON object (got {type(data).__name__})")
    _check_keys(data, _TOP_KEYS, "")

    common = _object(data.get("common", {}), "common")
    _check_keys(common, _COMMON_KEYS, "common")
    default_balancer = DEFAULT_BALANCER
    if "balancer" in common:
        default_balancer = _balancer(common["balancer"], "common.balancer")
    common_args = _object(common.get("engine_args", {}), "common.engine_args")
    _check_pinning_args(common_args, "common.engine_args")
    common_limits = _limits(common.get("limits", {}), "common.limits")

    if "models" not in data:
        _fail("models", "required")
    models = data["models"]
    if not isinstance(models, Mapping) or not models:
        _fail("models", f"must be a non-empty object of model name -> instances (got {_show(models)})")
    built = tuple(
        _model(
            name, raw, common_args=common_args, default_balancer=default_balancer, common_limits=common_limits
        )
        for name, raw in models.items()
    )
    listening: dict[tuple[str, int], str] = {}
    for model in built:
        for spec in model.instances:
            if spec.remote is None:
                continue
            where = (spec.remote.address, spec.remote.port)
            if where in listening:
                _fail(f"{spec.name}.remote", f"{spec.remote.describe()} is already {listening[where]}'s")
            listening[where] = spec.name
    return built
