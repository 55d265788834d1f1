"""lylm's HTTP front end over FakeEngines: the whole server without a model or a GPU.

    python -m lylm.testing.fake_server [--port 8000] [--engines 2] [--workers N] [--token-delay S]
        [--drain-timeout S] [--shutdown-delay S] [--worker-timeout S] [--worker-replacements K]
        [--max-in-flight K]

Serves model ``fake`` through the real server (``lylm.openai.serve``: workers, drain,
limits, metrics), each engine a :class:`FakeEngine` answering every prompt with the
same scripted tokens, at once or ``--token-delay`` s apart; ``--shutdown-delay`` makes
each engine take that long to stop, as a real one does (seconds: vLLM waits for its
processes), so that what the server answers while it stops can be seen. For testing clients and
the server's own machinery in seconds (lylm's tests do), and for measuring the front
end alone: with zero-latency tokens the numbers are lylm's own per-token work
(validation, books, SSE encoding, Starlette, uvicorn). Profile it with
``python -m pyinstrument -r text -o profile.txt -m lylm.testing.fake_server --port 8000``
and stop it with Ctrl-C (SIGINT) to write the profile. Needs the ``server`` extra and vLLM
(the adapter builds vLLM's sampling parameters).
"""

from __future__ import annotations

import argparse
from typing import Any

import anyio

from lylm import EngineSpec, PoolConfig, PoolOptions
from lylm.server import EngineKinds, ServerOptions, serve
from lylm.testing import FakeEngine

MODEL = "fake"


class SlowToStopEngine(FakeEngine):
    """A FakeEngine whose shutdown takes ``shutdown_delay`` s after it stops serving, as a
    vLLM engine's does while its processes exit."""

    def __init__(self, *, shutdown_delay: float, **options: Any) -> None:
        super().__init__(**options)
        self.shutdown_delay = shutdown_delay

    async def shutdown(self) -> None:
        await super().shutdown()  # unhealthy at once, its requests fail: then the wait
        await anyio.sleep(self.shutdown_delay)


def fake_engine(spec: EngineSpec) -> FakeEngine:
    """A zero-latency engine (or ``token_delay`` s per token, and ``shutdown_delay`` s to stop,
    from the spec's engine args)."""
    token_delay = float(spec.engine_args.get("token_delay", 0.0))
    options: dict[str, Any] = {"max_model_len": 1 << 20, "token_delay": token_delay}
    shutdown_delay = float(spec.engine_args.get("shutdown_delay", 0.0))
    if shutdown_delay:
        return SlowToStopEngine(shutdown_delay=shutdown_delay, **options)
    return FakeEngine(**options)


def launch_fake(spec: EngineSpec, workers: int, on_started: Any) -> FakeEngine:
    """With workers: the main process's stand-in for an engine core."""
    engine = fake_engine(spec)
    engine.handle = None  # type: ignore[attr-defined]
    return engine


def attach_fake(spec: EngineSpec, handle: Any, index: int) -> FakeEngine:
    """With workers: a worker's engine (each worker generates its own tokens)."""
    import vllm.sampling_params  # noqa: F401  (see main())

    return fake_engine(spec)


def main() -> None:
    """Parse the command line and serve until stopped."""
    # The adapter builds vLLM SamplingParams; with real engines vLLM is imported long
    # before the first request, so import it here too, or the first request would
    # pay (and the profile would show) a 10 s import.
    import vllm.sampling_params  # noqa: F401

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds per token (default: none)")
    parser.add_argument("--workers", type=int, default=1, help="front-end worker processes")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to let requests finish on shutdown")
    parser.add_argument("--shutdown-delay", type=float, default=0.0, help="seconds each engine takes to stop (default: none)")
    parser.add_argument("--worker-timeout", type=float, default=10.0, help="seconds a silent worker lives")
    parser.add_argument("--worker-replacements", type=int, default=None, help="dead workers that may be replaced")
    parser.add_argument("--max-in-flight", type=int, default=None, help="per model: requests beyond it get 429")
    args = parser.parse_args()
    engine_args = {"model": "fake", "token_delay": args.token_delay, "shutdown_delay": args.shutdown_delay}
    specs = [EngineSpec(model=MODEL, engine_args=engine_args, index=i) for i in range(args.engines)]
    config = PoolConfig.from_specs(specs)
    options = ServerOptions(
        host=args.host,
        port=args.port,
        log_level="warning",
        drain_timeout=args.drain_timeout,
        worker_timeout=args.worker_timeout,
        replacements=args.worker_replacements,
    )
    limits: PoolOptions = {"max_in_flight_requests": args.max_in_flight} if args.max_in_flight else {}
    if args.workers == 1:
        serve(config, options=options, pool_options={"engine_factory": fake_engine, **limits})
    else:
        engines = EngineKinds(launch=launch_fake, attach=attach_fake)
        serve(config, workers=args.workers, options=options, pool_options=limits, engines=engines)


if __name__ == "__main__":
    main()
