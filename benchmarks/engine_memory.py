"""Resident memory of a pool of tiny CPU engines, per process, idle and after load.

    python benchmarks/engine_memory.py [--engines 2] [--requests 200]

Prints one line per process (the pool's own process, each engine core and its
worker) and the total. The tiny model has random weights: this measures what an
engine costs by itself (torch, vLLM, KV cache), not a real model's weights.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import anyio
import psutil

from lylm import EnginePool
from lylm.testing import TINY_MODEL_ENGINE_ARGS, build_tiny_model


def rss_report(label: str) -> int:
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0
    print(f"-- {label}")
    for p in procs:
        try:
            rss = p.memory_info().rss
            cmdline = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "resource_tracker" in cmdline:  # multiprocessing's helper, not an engine's
            continue
        name = "pool process" if p is me else cmdline.strip()[:40]
        total += rss
        print(f"{rss / 2**20:8.0f} MiB  pid {p.pid:<7} {name}")
    print(f"{total / 2**20:8.0f} MiB  total")
    return total


async def main(engines: int, requests: int) -> None:
    from vllm import SamplingParams

    model_dir = build_tiny_model(os.path.join(tempfile.gettempdir(), "lylm-tiny-model"))
    instance = {"engine_args": {"model": str(model_dir), **TINY_MODEL_ENGINE_ARGS}}
    async with EnginePool.from_config({"models": {"tiny": [instance] * engines}}) as pool:
        rss_report(f"{engines} engines, idle")
        limit = anyio.Semaphore(32)

        async def one(i: int) -> None:
            async with limit:
                params = SamplingParams(max_tokens=32, ignore_eos=True)
                async for _ in pool.generate("tiny", f"request {i}", params):
                    pass

        async with anyio.create_task_group() as tg:
            for i in range(requests):
                tg.start_soon(one, i)
        rss_report(f"{engines} engines, after {requests} requests")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    anyio.run(main, args.engines, args.requests)
