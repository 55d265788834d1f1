"""Does the pool slow vLLM down? pool.generate vs the same AsyncLLM driven directly.

    flock /tmp/lylm-bench.lock python benchmarks/pool_overhead.py [--rounds 6] \
        [--requests 256] [--concurrency 64] [--max-tokens 32] [--out benchmarks/results/pool_overhead]

One tiny CPU engine serves both paths; rounds alternate (direct, pool, direct,
pool, ...) so drift on this shared machine hits both alike. Each round sends the
same token-id prompts with ignore_eos, so both paths generate exactly the same
number of tokens. Reports output tokens/s per round, the medians and their ratio.
Target (BENCHMARKS.md): pool >= 0.97x direct.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio

from lylm import EnginePool
from lylm.testing import TINY_MODEL_ENGINE_ARGS, build_tiny_model

TARGET = 0.97


async def drive(
    stream: Callable[[int, list[int]], AsyncIterator[Any]],
    prompts: list[list[int]],
    concurrency: int,
) -> float:
    """Run every prompt through ``stream`` with bounded concurrency; return tokens/s."""
    limit = anyio.Semaphore(concurrency)
    tokens = 0

    async def one(i: int, ids: list[int]) -> None:
        nonlocal tokens
        async with limit:
            async for out in stream(i, ids):
                tokens += len(out.outputs[0].token_ids)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i, ids in enumerate(prompts):
            tg.start_soon(one, i, ids)
    return tokens / (time.perf_counter() - start)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    model_dir = build_tiny_model(os.path.join(tempfile.gettempdir(), "lylm-tiny-model"))
    config = {"models": {"tiny": [{"engine_args": {"model": str(model_dir), **TINY_MODEL_ENGINE_ARGS}}]}}
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(16, 64))] for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    async with EnginePool.from_config(config) as pool:
        llm = pool.instances("tiny")[0].engine.llm  # type: ignore[attr-defined]
        counter = iter(range(10**9))

        def direct(i: int, ids: list[int]) -> AsyncIterator[Any]:
            return llm.generate({"prompt_token_ids": ids}, params, f"direct-{next(counter)}")  # type: ignore[no-any-return]

        def pooled(i: int, ids: list[int]) -> AsyncIterator[Any]:
            return pool.generate("tiny", ids, params)

        await drive(direct, prompts[:32], args.concurrency)  # warm-up, not counted
        runs: dict[str, list[float]] = {"direct": [], "pool": []}
        for r in range(args.rounds):
            order = [("direct", direct), ("pool", pooled)] if r % 2 == 0 else [("pool", pooled), ("direct", direct)]
            for name, fn in order:
                runs[name].append(await drive(fn, prompts, args.concurrency))
                print(f"round {r} {name:6s} {runs[name][-1]:8.0f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "config": vars(args),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "tokens_per_s": runs,
        "median_tokens_per_s": med,
        "ratio_pool_over_direct": med["pool"] / med["direct"],
        "target": TARGET,
    }


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/pool_overhead")
    args = parser.parse_args()
    result = anyio.run(main, args)
    ratio = result["ratio_pool_over_direct"]
    med = result["median_tokens_per_s"]
    table = (
        "| path | median output tok/s | rounds |\n|---|---|---|\n"
        f"| AsyncLLM direct | {med['direct']:.0f} | {', '.join(f'{x:.0f}' for x in result['tokens_per_s']['direct'])} |\n"
        f"| EnginePool.generate | {med['pool']:.0f} | {', '.join(f'{x:.0f}' for x in result['tokens_per_s']['pool'])} |\n"
        f"\nratio pool/direct = {ratio:.3f} (target >= {TARGET}: {'met' if ratio >= TARGET else 'missed'})\n"
    )
    print(table)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(table)
