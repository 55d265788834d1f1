"""Serve an EnginePool over OpenAI's API with uvicorn.

    python examples/serve.py --config config.json [--host 127.0.0.1] [--port 8000]

The config is LyLM's format (see README); CONFIG_PATH works in place of --config.
Without either, it serves the embedded default: a tiny demo model generated
offline on first run, with RANDOM WEIGHTS, on two engines weighted 1:2. It shows
the machinery (balancing, streaming, metrics); the words it writes are noise.

SIGINT/SIGTERM: drain first: new requests get 503 (and /health says
"draining", so a load balancer moves on) while those in flight finish, for at
most --drain-timeout seconds; then the server closes, every engine shuts down
and the process exits. A second signal skips the wait.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from lylm import EnginePool, RestartPolicy
from lylm.openai import create_app
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


#: Seconds the server keeps answering 503 after the drain, before it closes.
_LINGER = 1.0


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains the pool before the server stops listening.

    Plain uvicorn closes its socket at once, so new clients would see refused
    connections while old requests finish; here they get a 503 they can retry
    elsewhere, until nothing is in flight or the drain timeout passes.
    """

    def __init__(self, config: uvicorn.Config, pool: EnginePool, drain_timeout: float) -> None:
        super().__init__(config)
        self.pool = pool
        self.drain_timeout = drain_timeout
        self._drain: asyncio.Task[None] | None = None
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)  # runs the lifespan: the engines are up after it
        # Importing torch, transformers and vLLM leaves millions of objects that every
        # full garbage collection walks, stopping the event loop for 0.5 s on a GPU host
        # (BENCHMARKS.md 9.6: TTFT p99 2.4-3.3x worse). Freeze them, as `vllm serve` does.
        gc.collect()
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None or not self.started:
            super().handle_exit(sig, frame)  # a second signal, or not serving yet: stop now
            return
        self._draining = True
        self._captured_signals.append(sig)  # re-raised after shutdown, as uvicorn does
        # A signal handler may interrupt the loop anywhere: hand the work to it safely.
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        in_flight = sum(i.in_flight_requests for i in self.pool.instances())
        logger.info("draining: %d request(s) in flight, new ones get 503 (at most %g s)", in_flight, self.drain_timeout)
        clean = await self.pool.drain(self.drain_timeout)
        if not clean:
            left = sum(i.in_flight_requests for i in self.pool.instances())
            logger.warning("drain timeout: %d request(s) still in flight will fail", left)
        # Clients whose last request just finished send their next one on the same
        # connection at once; answer it (503, Connection: close) rather than cut it
        # off as the server closes.
        await asyncio.sleep(_LINGER)
        self.should_exit = True


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
        default=[k for k in os.environ.get("LYLM_API_KEYS", "").split(",") if k],
        help="require 'Authorization: Bearer KEY' (repeat for several; or LYLM_API_KEYS=k1,k2)",
    )
    parser.add_argument("--keys-for-health", action="store_true", help="/health and /metrics need a key too")
    parser.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    parser.add_argument(
        "--max-in-flight", type=int, default=None, help="per model: requests beyond it get 429 + Retry-After"
    )
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    options: dict[str, Any] = {
        "max_in_flight_requests": args.max_in_flight,
        "retries": args.retries,
        "restart": RestartPolicy(initial_backoff=args.restart_backoff, max_backoff=max(30.0, args.restart_backoff)),
    }
    if args.config:
        pool = EnginePool.from_config(args.config, **options)
        logger.info("serving %s from %s", ", ".join(pool.models), args.config)
    else:
        # The demo must run with no network at all.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        pool = EnginePool.from_config(default_config(), **options)
        logger.warning(
            "no --config given: serving the embedded demo model %r on two engines (weights 1:2). "
            "It has RANDOM WEIGHTS: it demonstrates the machinery, its words are noise. "
            "Pass --config (or CONFIG_PATH) to serve real models.",
            DEMO_MODEL,
        )
    if args.api_key:
        # The count only: keys are never logged.
        logger.info("API keys required: %d key(s) configured", len(args.api_key))
    app = create_app(
        pool,
        api_keys=args.api_key or None,
        keys_for_health=args.keys_for_health,
        max_body_bytes=args.max_body_bytes,
    )
    logger.info("engines start before the server listens on http://%s:%d", args.host, args.port)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        # The pool drains first; this only bounds the last bytes still being sent.
        timeout_graceful_shutdown=5,
    )
    DrainingServer(config, pool, args.drain_timeout).run()


if __name__ == "__main__":  # vLLM spawns engine processes: the guard is required
    main()
