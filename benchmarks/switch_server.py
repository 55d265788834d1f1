"""lylm's OpenAI server whose balancer and weights a benchmark can change between runs.

    python benchmarks/switch_server.py --config CONFIG --port PORT

(The scenario scripts start it through ``harness.switch_server_command``.)

Serves exactly what ``lylm serve`` serves (``lylm.openai.routes`` over an
``EnginePool``, uvicorn) plus two benchmark-only routes, so that one set of
started engines serves every balancer (engines take minutes to start on a GPU):

- ``POST /bench/policy`` ``{"balancer": NAME, "weights": [w0, w1, ...], "seed": 0,
  "reset_prefix_cache": false}``: swap the balancer (a registered name, a
  "module:Class" string, ``pin0``, which sends everything to instance 0, or
  ``firstK``, the least loaded of the first K instances), set the
  instances' weights, and optionally empty every engine's prefix cache (vLLM's
  ``AsyncLLM.reset_prefix_cache``) so that runs start cold. Refused (409) while
  requests are in flight.
- ``GET /bench/engines``: per instance, its model, gpu_ids and process ids, the pool's books and the engine's signals
  (running, waiting, KV-cache use, prefix-cache queries and hits from vLLM's stats).
- ``GET /bench/gc[?reset=1]``: this process's garbage-collector runs per generation
  (count, total and longest pause), since start or the last reset.

``--gc-freeze``: once the engines are up, collect and ``gc.freeze()`` the heap, as
vLLM's own server does (``vllm.utils.gc_utils.freeze_gc_heap``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lylm import Balancer, EnginePool, Instance, RequestInfo
from lylm.balancers import resolve_balancer
from lylm.openai import routes

import harness

# "module:Class" balancers (examples.custom_balancer:...) import from the repository root, as
# they do under `python -m lylm serve` started there (-m puts the working directory first).
if str(harness.ROOT) not in sys.path:
    sys.path.append(str(harness.ROOT))


class PinFirst(Balancer):
    """Every request to the first candidate (instance 0 while it is healthy): one engine of a pool."""

    def choose(self, candidates: Sequence[Instance], request: RequestInfo) -> Instance:
        return candidates[0]


class FirstK(Balancer):
    """The least loaded of the first ``k`` candidates: a pool of k engines out of more (scaling arms)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def choose(self, candidates: Sequence[Instance], request: RequestInfo) -> Instance:
        return min(candidates[: self.k], key=lambda c: c.in_flight_requests)


class Switch(Balancer):
    """Delegates to whichever balancer was set last."""

    def __init__(self) -> None:
        self.name = "weighted_random"
        self.inner: Balancer = resolve_balancer(self.name, rng=random.Random(0))

    def choose(self, candidates: Sequence[Instance], request: RequestInfo) -> Instance:
        return self.inner.choose(candidates, request)

    def on_finish(self, instance: Instance, request: RequestInfo, outcome: Any) -> None:
        self.inner.on_finish(instance, request, outcome)


def _process_tree(engine: Any) -> list[int]:
    """The engine's processes and their children (workers), to find them in nvidia-smi."""
    from lylm.engines._watchdog import process_tree

    return [p.pid for p in process_tree(getattr(engine, "process_ids", lambda: [])())]


def _device_env(pids: list[int]) -> dict[str, str | None]:
    """The device-control variable (CUDA_VISIBLE_DEVICES on NVIDIA) of each spawned process, from /proc.

    /proc/PID/environ holds the environment a process was exec'd with, in the memory
    just after its argv. vLLM renames its processes (``VLLM::EngineCore``, through
    setproctitle where installed, as on the GPU image), which overwrites that memory,
    and a forked process shows its parent's start-up environment: both read
    "unreadable". A plainly spawned process (the CPU build) reads true.
    """
    from vllm.platforms import current_platform

    name = current_platform.device_control_env_var.encode()
    out: dict[str, str | None] = {}
    for pid in pids:
        try:
            items = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if pid != os.getpid() and b"spawn_main" not in cmdline:
            out[str(pid)] = "unreadable"
            continue
        values = [i.split(b"=", 1)[1].decode() for i in items if i.startswith(name + b"=")]
        out[str(pid)] = values[0] if values else None
    return out


def build_app(pool: EnginePool, switch: Switch, *, gc_freeze: bool = False) -> Starlette:
    watch = harness.GcWatch()

    async def policy(request: Request) -> JSONResponse:
        body = await request.json()
        instances = pool.instances()
        busy = sum(i.in_flight_requests for i in instances)
        if busy:
            return JSONResponse({"error": f"{busy} requests in flight"}, status_code=409)
        name = body.get("balancer", switch.name)
        rng = random.Random(body.get("seed", 0))
        if name == "pin0":
            switch.inner = PinFirst()
        elif name.startswith("first") and name[5:].isdigit():
            switch.inner = FirstK(int(name[5:]))
        else:
            switch.inner = resolve_balancer(name, rng=rng)
        switch.name = name
        weights = body.get("weights")
        if weights is not None:
            if len(weights) != len(instances):
                return JSONResponse({"error": "one weight per instance"}, status_code=400)
            for inst, w in zip(instances, weights):
                inst.weight = float(w)  # between runs, with nothing in flight
        reset = []
        if body.get("reset_prefix_cache"):
            for inst in instances:
                llm = getattr(inst.engine, "llm", None)
                reset.append(bool(await llm.reset_prefix_cache()) if llm is not None else None)
        return JSONResponse({"balancer": switch.name, "weights": [i.weight for i in instances], "reset": reset})

    async def engines(request: Request) -> JSONResponse:
        out = []
        for inst in pool.instances():
            pids = _process_tree(inst.engine)
            out.append({
                "model": inst.model,
                "index": inst.index,
                "gpu_ids": list(inst.gpu_ids),
                "pids": pids,
                "device_env": _device_env(pids),
                "weight": inst.weight,
                "completed": inst.completed,
                "dispatched": inst.dispatched,
                "in_flight_requests": inst.in_flight_requests,
                "prompt_tokens": inst.prompt_tokens,
                "generated_tokens": inst.generated_tokens,
                "signals": attrs.asdict(inst.engine.signals),
            })
        server_env = {"pid": os.getpid(), **_device_env([os.getpid()])}
        return JSONResponse({"balancer": switch.name, "engines": out, "server_env": server_env})

    async def gc_stats(request: Request) -> JSONResponse:
        return JSONResponse(watch.snapshot(reset=request.query_params.get("reset") == "1"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with pool:
            if gc_freeze:
                watch.freeze()
            watch.reset()
            yield

    return Starlette(
        routes=[*routes(pool), Route("/bench/policy", policy, methods=["POST"]),
                Route("/bench/engines", engines, methods=["GET"]), Route("/bench/gc", gc_stats, methods=["GET"])],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() the heap once the engines are up")
    args = parser.parse_args()
    # The pool's start progress (which instance, on which GPUs, how long) goes to the log.
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("lylm").setLevel(logging.INFO)
    switch = Switch()
    pool = EnginePool.from_config(args.config, balancer=switch)
    uvicorn.run(build_app(pool, switch, gc_freeze=args.gc_freeze), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":  # vLLM spawns engine processes: the guard is required
    main()
