"""The ``lylm`` command.

    lylm serve --config config.json [--host 127.0.0.1] [--port 8000] [--workers N] ...
    lylm serve                      # the embedded demo: no download, no GPU needed
    lylm core --pool ADDRESS:PORT MODEL [vllm serve flags]   # a remote instance's engine core
    lylm --version

``lylm serve`` runs OpenAI's API over a pool (:func:`lylm.server.serve`), configured
by a JSON file in the seed's format (README, "Configuration"); ``CONFIG_PATH`` works
in place of ``--config``. Without either it serves the embedded demo: a tiny model
generated offline on first run, with RANDOM WEIGHTS, on two engines weighted 1:2. It
shows the machinery (balancing, streaming, metrics); the words it writes are noise.

SIGINT/SIGTERM drain first: new requests get 503 (``/health`` says ``draining``, so a
load balancer moves on) while those in flight finish, for at most
``--drain-timeout`` seconds; then every engine shuts down and the process exits. A
second signal skips the wait.

Needs the ``server`` extra (``pip install "lylm[gpu,server]"``). Importing this module
imports neither vLLM nor the HTTP stack; running a command does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from ._exceptions import LylmError

DEMO_MODEL = "lylm-tiny-demo"

logger = logging.getLogger("lylm.serve")


def demo_config() -> dict[str, Any]:
    """The embedded demo: two engines (weights 1:2) of an offline tiny model with random
    weights, on GPU 0 if vLLM finds one (both share it), else on the CPU.

    The model is written under ``$LYLM_CACHE_DIR`` (default ``~/.cache/lylm``) once.
    """
    from vllm.platforms import current_platform

    from .testing import TINY_MODEL_ENGINE_ARGS, build_tiny_model

    cache = Path(os.environ.get("LYLM_CACHE_DIR") or Path.home() / ".cache" / "lylm")
    model_dir = build_tiny_model(cache / "tiny-model")
    engine_args = {"model": str(model_dir), **TINY_MODEL_ENGINE_ARGS}
    devices: dict[str, Any] = {}
    if current_platform.is_cuda_alike():
        # Both share GPU 0; a small memory share each leaves room for the other.
        devices["gpu_ids"] = [0]
        engine_args["gpu_memory_utilization"] = 0.2
    return {
        "models": {
            DEMO_MODEL: [
                {"devices": {**devices, "weight": 1}, "engine_args": engine_args},
                {"devices": {**devices, "weight": 2}, "engine_args": engine_args},
            ]
        }
    }


def _vllm_version() -> str:
    from .engines._internals import SUPPORTED_TEXT, installed_version

    return f"vLLM {installed_version()} installed; lylm supports vLLM {SUPPORTED_TEXT}"


def _api_keys_from_environment() -> list[str]:
    value = os.environ.get("LYLM_API_KEYS")
    return [] if value is None else [key.strip() for key in value.split(",")]


def build_parser() -> argparse.ArgumentParser:
    """The command line (``lylm --help``, ``lylm serve --help``)."""
    parser = argparse.ArgumentParser(
        prog="lylm", description="Run many vLLM engines as one: a pool with pluggable balancing."
    )
    parser.add_argument(
        "--version", action="version", version=f"lylm {__version__} ({_vllm_version()})"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve OpenAI's API over a pool of vLLM engines",
        usage="lylm serve [MODEL [vLLM's engine flags]] [--config FILE] [options]",
        description="Serve OpenAI's API over a pool of vLLM engines: one MODEL given as vllm serve takes "
        "it (MODEL first, then vLLM's engine flags such as --tensor-parallel-size, read by vLLM's own "
        "parser, for every instance), a --config file, or with neither the embedded demo.",
    )
    add_serve_arguments(serve)
    serve.set_defaults(parser=serve)  # for its own error messages
    core = commands.add_parser(
        "core",
        help="run a remote instance's engine core on this host, attached to a pool elsewhere",
        description=(
            "Run vLLM's headless engine core for a pool's remote instance (README, 'Remote instances'), "
            "and start it again when it exits or when the pool it served is gone (vLLM's core does not "
            "notice, and cannot attach to another). Arguments after MODEL are vllm serve's, as for the "
            "instance's engine args."
        ),
    )
    add_core_arguments(core)
    core.set_defaults(parser=core)
    return parser


#: vllm serve's flags that `lylm core` sets itself, long and short (vLLM 0.26-0.33:
#: -dpp is --data-parallel-rpc-port, -dpn --data-parallel-rank, -dpr the start rank).
_CORE_OWN_FLAGS = (
    "--headless", "--data-parallel-size", "--data-parallel-size-local", "--data-parallel-start-rank",
    "--data-parallel-address", "--data-parallel-rpc-port", "--data-parallel-rank", "-dp", "-dpl", "-dpa", "-dpr",
    "-dpp", "-dpn",
)  # fmt: skip


def add_core_arguments(parser: argparse.ArgumentParser) -> None:
    """``lylm core``'s options."""
    parser.add_argument(
        "--pool", required=True, metavar="ADDRESS:PORT",
        help="the instance's remote.address and remote.port in the pool's config ([v6]:port for IPv6)",
    )  # fmt: skip
    parser.add_argument(
        "--grace", type=float, default=3.0, metavar="S",
        help="seconds without a connection to the pool, once connected, before the core is started again (3)",
    )  # fmt: skip
    parser.add_argument(
        "--restart-delay", type=float, default=2.0, metavar="S", help="seconds between a core's end and its restart (2)"
    )
    parser.add_argument(
        "--kv-events-port", type=int, metavar="PORT",
        help="publish the core's KV-cache events to the pool at this port of its --pool address "
        "(the instance's remote.kv_events_port, for balancer kv_aware)",
    )  # fmt: skip
    parser.add_argument("model", help="the model, as vllm serve takes it (the instance's engine_args.model)")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="vllm serve's flags (the instance's engine args)")


def parse_core_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Check ``lylm core``'s arguments; sets ``pool_address`` and ``pool_port``."""
    import ipaddress

    host, _, port = args.pool.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        args.pool_port = int(port)
        ipaddress.ip_address(host)
    except ValueError:
        parser.error(f"--pool: expected ADDRESS:PORT with an IP address, e.g. 10.0.0.2:13345 (got {args.pool!r})")
    if not 1 <= args.pool_port <= 65535:
        parser.error(f"--pool: the port must be 1 to 65535 (got {args.pool_port})")
    if ipaddress.ip_address(host).is_unspecified:
        parser.error(f"--pool: {host} is no address to connect to: name the pool host's address")
    args.pool_address = host
    for name in ("grace", "restart_delay"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if args.kv_events_port is not None and not (
        1 <= args.kv_events_port <= 65535 and args.kv_events_port != args.pool_port
    ):
        parser.error(f"--kv-events-port: a port 1 to 65535 other than --pool's (got {args.kv_events_port})")
    for flag in args.vllm_args:
        if flag.split("=", 1)[0] in _CORE_OWN_FLAGS:
            parser.error(f"{flag}: set by lylm core (from --pool); leave it out")
        if args.kv_events_port is not None and flag.split("=", 1)[0] == "--kv-events-config":
            parser.error(f"{flag}: set by lylm core (from --kv-events-port); leave it out")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """``lylm serve``'s flags, on any parser.

    The HTTP bounds default to None here: :class:`lylm.server.HttpLimits` holds the
    defaults (this module imports no HTTP stack until a command runs)."""
    what = parser.add_argument_group("what: MODEL and vLLM's engine flags, or a config file")
    what.add_argument("--gpus", metavar="0,1,2,3", help="with MODEL: one instance per GPU (per TP group of GPUs)")
    what.add_argument("--instances", type=int, metavar="N", help="with MODEL: N instances (on GPUs 0, 1, ...)")
    what.add_argument("--balancer", metavar="NAME", help="with MODEL: the balancer (default: the pool's default)")
    what.add_argument("--config", default=os.environ.get("CONFIG_PATH"), help="config JSON (or CONFIG_PATH)")
    what.add_argument(
        "--print-config", action="store_true", help="print the config this command line serves (JSON) and exit"
    )
    where = parser.add_argument_group("where")
    where.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    where.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    where.add_argument(
        "--workers",
        type=int,
        default=None,
        help="front-end processes over the same engines, like vllm serve's --api-server-count "
        "(default: common.workers, else one per GPU in use and at least 2 on a GPU, else 1)",
    )
    where.add_argument("--log-level", default="info", help="uvicorn's and lylm's (default: %(default)s)")
    where.add_argument(
        "--debug", action="store_true", help="on an error, show the whole traceback, not the one-line message"
    )

    access = parser.add_argument_group("access")
    access.add_argument(
        "--api-key",
        action="append",
        default=_api_keys_from_environment(),
        help="require 'Authorization: Bearer KEY' (repeat for several; or LYLM_API_KEYS=k1,k2)",
    )
    access.add_argument("--keys-for-health", action="store_true", help="/health and /metrics need a key too")

    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--max-in-flight", type=int, default=None, help="per model: requests beyond it get 429 + Retry-After"
    )
    limits.add_argument(
        "--max-body-bytes", type=int, default=8 * 1024 * 1024, help="larger bodies get 413 (default: %(default)s)"
    )
    limits.add_argument("--max-header-bytes", type=int, help="larger request heads get 431 (default: 65536)")
    limits.add_argument(
        "--header-timeout", type=float, help="seconds for a request's head to arrive, else 408 (default: 20)"
    )
    limits.add_argument(
        "--body-timeout", type=float, help="seconds for a request's body to arrive, else 408 (default: 60)"
    )

    failures = parser.add_argument_group("failures and shutdown")
    failures.add_argument(
        "--retries",
        type=int,
        default=2,
        help="retries on another engine for a request whose engine failed before output (default: %(default)s)",
    )
    failures.add_argument(
        "--restart-backoff",
        type=float,
        default=1.0,
        help="seconds before the first restart of a failed engine; doubles per failed attempt, at most 30 "
        "(default: %(default)s)",
    )
    failures.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds to let requests finish on SIGTERM/SIGINT (default: %(default)s)",
    )
    failures.add_argument(
        "--worker-timeout",
        type=float,
        default=10.0,
        help="with workers: seconds a worker may go without answering the hub before it is killed and "
        "replaced (default: %(default)s)",
    )
    failures.add_argument(
        "--worker-replacements",
        type=int,
        default=None,
        help="with workers: how many dead workers may be replaced while the engine cores run; each takes a "
        "spare client slot on every core (default: as many as there are workers)",
    )


def run_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``lylm serve`` with parsed ``args`` (errors in them are reported through ``parser``)."""
    from . import PoolConfig, PoolOptions, RestartPolicy
    from .server import HttpLimits, ServerOptions, default_workers, serve

    if any(not key for key in args.api_key):
        # Never open by accident: LYLM_API_KEYS="" or "a,," means a mistake, not "no keys".
        source = "LYLM_API_KEYS" if "LYLM_API_KEYS" in os.environ else "--api-key"
        parser.error(f"{source} holds an empty API key; unset it (or drop the flag) to serve without keys")
    given = {
        name: getattr(args, name)
        for name in ("max_header_bytes", "header_timeout", "body_timeout")
        if getattr(args, name) is not None
    }
    try:
        limits = HttpLimits(**given)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    pool_options = PoolOptions(
        max_in_flight_requests=args.max_in_flight,
        retries=args.retries,
        restart=RestartPolicy(initial_backoff=args.restart_backoff, max_backoff=max(30.0, args.restart_backoff)),
    )
    engine_flags: list[str] = getattr(args, "engine_flags", [])
    if args.model is None and (engine_flags or args.gpus or args.instances or args.balancer):
        what = " ".join(engine_flags) or "--gpus/--instances/--balancer"
        parser.error(f"{what}: vLLM's engine flags and --gpus, --instances, --balancer go with MODEL")
    if args.model is not None:
        if args.config:
            parser.error("give MODEL or --config, not both")
        from ._model_form import model_config

        if not args.print_config:  # a config printed here may be for another machine's paths
            from .engines._local import check_model_path  # before vLLM's parser is imported (seconds)

            check_model_path(args.model, "lylm serve MODEL")
        made = model_config(
            args.model, engine_flags, gpus=args.gpus, instances=args.instances, balancer=args.balancer
        )
        if args.print_config:
            print(json.dumps(made, indent=2))
            return
        config = PoolConfig.load(made)
        logger.info("serving %s", args.model)
    elif args.config:
        config = PoolConfig.load(args.config)
        if args.print_config:
            print(Path(args.config).read_text())
            return
        logger.info("serving %s from %s", ", ".join(config.model_names), args.config)
    else:
        # The demo must run with no network at all.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        demo = demo_config()
        if args.print_config:
            print(json.dumps(demo, indent=2))
            return
        config = PoolConfig.load(demo)
        logger.warning(
            "no --config given: serving the embedded demo model %r on two engines (weights 1:2). "
            "It has RANDOM WEIGHTS: it demonstrates the machinery, its words are noise. "
            "Pass --config (or CONFIG_PATH) to serve real models.",
            DEMO_MODEL,
        )
    if args.api_key:
        # The count only: keys are never logged.
        logger.info("API keys required: %d key(s) configured", len(args.api_key))
    try:
        options = ServerOptions(
            host=args.host,
            port=args.port,
            api_keys=tuple(args.api_key),
            keys_for_health=args.keys_for_health,
            max_body_bytes=args.max_body_bytes,
            drain_timeout=args.drain_timeout,
            log_level=args.log_level,
            limits=limits,
            worker_timeout=args.worker_timeout,
            replacements=args.worker_replacements,
        )
    except ValueError as exc:
        parser.error(str(exc).replace("worker_timeout", "--worker-timeout").replace("replacements", "--worker-replacements"))
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1 (got {args.workers})")
    workers = args.workers if args.workers is not None else default_workers(config)
    serve(config, workers=workers, options=options, pool_options=pool_options)


def main(argv: Sequence[str] | None = None) -> None:
    """The console script's entry point."""
    parser = build_parser()
    # vLLM's engine flags after `lylm serve MODEL` are vLLM's parser's to read (_model_form).
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # `lylm serve MODEL [flags]`: MODEL first, as `vllm serve MODEL`; the rest is vLLM's.
    if args.command == "serve":  # (lylm core has a MODEL of its own)
        args.model = extra.pop(0) if extra and not extra[0].startswith("-") else None
        args.engine_flags = extra
    if args.command is None:
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    if args.command == "core":
        from .engines._core_host import run_core_host

        parse_core_arguments(args, args.parser)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        run_core_host(args)
        return
    try:
        run_serve(args, args.parser)
    except KeyboardInterrupt:
        # Ctrl-C: the server drained and stopped its engines; uvicorn re-raises the signal
        # at the end, which Python turns into a traceback. Exit as a shell expects instead.
        raise SystemExit(128 + signal.SIGINT) from None
    except LylmError as exc:
        if args.debug:
            raise
        raise SystemExit(_one_line(exc)) from None


def _one_line(exc: BaseException) -> int:
    """Print a command's error on one line (``--debug`` shows the traceback instead); the exit
    code: 2 for a mistake in the command or its config (nothing was started), 1 otherwise."""
    from ._exceptions import ConfigError, EngineStartError

    message = " ".join(str(exc).split())
    # With a root cause the message ends with it, the line to read last; without one, vLLM's
    # own message and where to look.
    if isinstance(exc, EngineStartError) and exc.root_cause is None:
        cause = exc.__cause__
        while cause is not None and cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is not None and str(cause) not in message:
            message += f" (caused by {type(cause).__name__}: {' '.join(str(cause).split())})"
        message += "; the engine's own log above says why (run with --debug for the traceback)"
    print(f"lylm serve: error: {message}", file=sys.stderr)
    return 2 if isinstance(exc, ConfigError) else 1
