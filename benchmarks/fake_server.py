"""lylm's HTTP front end over zero-latency FakeEngines: what the server alone can stream.

    python benchmarks/fake_server.py [--port 8000] [--engines 2]

Every token is ready at once, so the numbers measure lylm's own per-token work:
validation, the pool's books, SSE encoding, Starlette and uvicorn. Profile it with
    python -m pyinstrument -r text -o profile.txt benchmarks/fake_server.py --port 8000
and stop it with Ctrl-C (or SIGINT) to write the profile.
"""

from __future__ import annotations

import argparse

import uvicorn

from lylm import EnginePool, EngineSpec
from lylm.openai import create_app
from lylm.testing import FakeEngine

MODEL = "fake"


def main() -> None:
    # The adapter builds vLLM SamplingParams; with real engines vLLM is imported long
    # before the first request, so import it here too, or the first request would
    # pay (and the profile would show) a 10 s import.
    import vllm.sampling_params  # noqa: F401

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds per token (default: none)")
    args = parser.parse_args()
    specs = [EngineSpec(model=MODEL, engine_args={"model": "fake"}) for _ in range(args.engines)]
    pool = EnginePool.from_config(
        specs, engine_factory=lambda spec: FakeEngine(max_model_len=1 << 20, token_delay=args.token_delay)
    )
    uvicorn.run(create_app(pool), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
