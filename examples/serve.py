"""Serve an EnginePool over OpenAI's API with uvicorn.

    python examples/serve.py --config config.json [--host 127.0.0.1] [--port 8000]

The config is LyLM's format (see README); CONFIG_PATH works in place of --config.
Without either, it serves the embedded default: a tiny demo model generated
offline on first run, with RANDOM WEIGHTS, on two engines weighted 1:2. It shows
the machinery (balancing, streaming, metrics); the words it writes are noise.

--workers N runs N front-end processes over the same engine cores (default: the
config's common.workers, else one per GPU in use, at least 1): each serves the
whole API on the same port; one pool is seen whole from all of them (README,
"Front-end workers").

SIGINT/SIGTERM: drain first: new requests get 503 (and /health says
"draining", so a load balancer moves on) while those in flight finish, for at
most --drain-timeout seconds; then the server closes, every engine shuts down
and the process exits. A second signal skips the wait.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import attrs
from lylm import PoolConfig, RestartPolicy
from lylm.openai import HttpLimits, ServerOptions, default_workers, serve
from lylm.testing import TINY_MODEL_ENGINE_ARGS, build_tiny_model

DEMO_MODEL = "lylm-tiny-demo"

logger = logging.getLogger("lylm.serve")


def _on_gpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda_alike())


def default_config() -> dict[str, Any]:
    """Two engines (weights 1:2) of an offline tiny model, on GPU 0 if there is one."""
    cache = Path(os.environ.get("LYLM_CACHE_DIR") or Path.home() / ".cache" / "lylm")
    model_dir = build_tiny_model(cache / "tiny-model")
    engine_args = {"model": str(model_dir), **TINY_MODEL_ENGINE_ARGS}
    devices: dict[str, Any] = {}
    if _on_gpu():
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


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve OpenAI's API over a pool of vLLM engines.")
    parser.add_argument("--config", default=os.environ.get("CONFIG_PATH"), help="config JSON (or CONFIG_PATH)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to let requests finish on shutdown")
    parser.add_argument(
        "--retries", type=int, default=2, help="retries on another engine for a request whose engine failed before output"
    )
    parser.add_argument(
        "--restart-backoff",
        type=float,
        default=1.0,
        help="seconds before the first restart of a failed engine (doubles per failed attempt, at most 30)",
    )
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--api-key",
        action="append",
        default=[k.strip() for k in os.environ["LYLM_API_KEYS"].split(",")] if "LYLM_API_KEYS" in os.environ else [],
        help="require 'Authorization: Bearer KEY' (repeat for several; or LYLM_API_KEYS=k1,k2)",
    )
    parser.add_argument("--keys-for-health", action="store_true", help="/health and /metrics need a key too")
    parser.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="larger bodies get 413")
    defaults = HttpLimits()
    parser.add_argument(
        "--max-header-bytes", type=int, default=defaults.max_header_bytes, help="larger request heads get 431"
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=defaults.header_timeout,
        help="seconds for a request's head to arrive (else 408 and the connection closes)",
    )
    parser.add_argument(
        "--body-timeout", type=float, default=defaults.body_timeout, help="seconds for a request's body to arrive (else 408)"
    )
    parser.add_argument(
        "--max-in-flight", type=int, default=None, help="per model: requests beyond it get 429 + Retry-After"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="front-end processes over the same engines (default: common.workers, else one per GPU in use)",
    )
    args = parser.parse_args()
    if any(not key for key in args.api_key):
        # Never open by accident: LYLM_API_KEYS="" or "a,," means a mistake, not "no keys".
        source = "LYLM_API_KEYS" if "LYLM_API_KEYS" in os.environ else "--api-key"
        parser.error(f"{source} holds an empty API key; unset it (or drop the flag) to serve without keys")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    pool_options: dict[str, Any] = {
        "max_in_flight_requests": args.max_in_flight,
        "retries": args.retries,
        "restart": RestartPolicy(initial_backoff=args.restart_backoff, max_backoff=max(30.0, args.restart_backoff)),
    }
    if args.config:
        config = PoolConfig.load(args.config)
        logger.info("serving %s from %s", ", ".join(config.model_names), args.config)
    else:
        # The demo must run with no network at all.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        config = PoolConfig.load(default_config())
        logger.warning(
            "no --config given: serving the embedded demo model %r on two engines (weights 1:2). "
            "It has RANDOM WEIGHTS: it demonstrates the machinery, its words are noise. "
            "Pass --config (or CONFIG_PATH) to serve real models.",
            DEMO_MODEL,
        )
    if args.api_key:
        # The count only: keys are never logged.
        logger.info("API keys required: %d key(s) configured", len(args.api_key))
    options = ServerOptions(
        host=args.host,
        port=args.port,
        api_keys=tuple(args.api_key),
        keys_for_health=args.keys_for_health,
        max_body_bytes=args.max_body_bytes,
        drain_timeout=args.drain_timeout,
        log_level=args.log_level,
        limits=attrs.evolve(
            defaults,
            max_header_bytes=args.max_header_bytes,
            header_timeout=args.header_timeout,
            body_timeout=args.body_timeout,
        ),
    )
    workers = args.workers if args.workers is not None else default_workers(config)
    serve(config, workers=workers, options=options, pool_options=pool_options)


if __name__ == "__main__":  # vLLM spawns engine processes: the guard is required
    main()
