"""Mount lylm's OpenAI adapter in your own app.

    python examples/serve.py --config config.json [--host 127.0.0.1] [--port 8000]

A Starlette app of your own: the adapter's routes (``/v1/...``, ``/health``,
``/metrics``) mounted beside a route of the app's own, the pool started and
stopped by the app's lifespan, uvicorn to run it. Without ``--config`` it serves
lylm's embedded demo (a tiny random-weight model on two engines).

``lylm serve`` is the ready server (front-end workers, draining on SIGTERM, bounded
request reading, every flag): use it as is, or start from this file when lylm is
one part of a service of yours.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from lylm import EnginePool, PoolConfig
from lylm.openai import routes


def build_app(config: PoolConfig) -> Starlette:
    pool = EnginePool.from_config(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with pool:  # every engine is up before the server accepts a connection
            # Importing torch and vLLM left millions of objects: keep full garbage
            # collections from walking them on every request's time (README, Production notes).
            gc.collect()
            gc.freeze()
            yield  # on SIGTERM uvicorn lets requests in flight finish, then the engines stop here

    async def about(request: Request) -> JSONResponse:
        # A route of your own, beside OpenAI's: the pool is yours to read.
        return JSONResponse({"models": list(pool.models), "engines": [i.name for i in pool.instances()]})

    return Starlette(routes=[Route("/about", about), Mount("/", routes=routes(pool))], lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config JSON (default: lylm's embedded demo)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    if args.config:
        config = PoolConfig.load(args.config)
    else:
        from lylm.cli import demo_config

        config = PoolConfig.load(demo_config())
    uvicorn.run(build_app(config), host=args.host, port=args.port)


if __name__ == "__main__":  # vLLM spawns engine processes: the guard is required
    main()
