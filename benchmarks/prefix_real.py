"""Prefix-cache hit rate and throughput per balancer on 2 real vLLM engines.

    python benchmarks/prefix_real.py [--device cpu|gpu] [--model-dir DIR] [--shape NAME] [--engine-args JSON] \\
        [--rounds 3 --requests 240 --concurrency 8] [--kv-tokens 6144] [--out benchmarks/results/prefix_real]

(or ``python -m benchmarks.prefix_real ...``; on a shared machine inside ``flock /tmp/lylm-bench.lock``).
Two engines of the target's model in one real ``EnginePool``: ``--device cpu`` (the
default without a GPU) the tiny model on the CPU build with the tests' engine args, each
engine pinned to its own core (``VLLM_CPU_OMP_THREADS_BIND``); ``--device gpu --model-dir
DIR`` both on GPU 0. Each has a KV cache of ``--kv-tokens`` tokens (``kv_cache_memory_bytes``
from the model's layers, KV heads, head size and dtype; the blocks vLLM actually made are
recorded): the prefix groups together need more than one engine holds (16 groups x 640
tokens = 10,240 tokens against 6,144), about what both hold together.

Two workloads, closed loop at ``--concurrency``, 16 output tokens (ignore_eos):

- ``shared``: each request is one of 16 group prefixes (640 tokens) plus a unique
  96-token question, the group drawn at random (seeded, the same for every balancer
  of a round);
- ``distinct``: every prompt is 736 unique tokens (the low-sharing control);
- ``chat`` (``--workloads``): conversations of 4 turns, each turn's prompt the whole
  conversation so far (a 256-token opening, then per turn the engine's 16-token answer and
  a 64-token message); a worker runs one conversation's turns in order.

``--groups`` sets the shared workload's prefix groups (16; 40 are 200 blocks against the
two engines' 96: eviction-heavy).

Per run: both engines' prefix caches are reset, a fresh balancer is swapped in
(through a delegating Balancer, so engines start once), and every balancer runs once
per round in a rotated order so that machine noise hits all alike. Measured: output
tokens/s, TTFT p50/p90 at the client, the prefix-cache hit rate from vLLM's
``num_cached_tokens`` (prompt tokens served from the cache / prompt tokens) and,
as a cross-check, from the engines' live signals. Writes OUT.json (the harness's
provenance block first) and OUT.md; default OUT: ``results/prefix_real`` on cpu,
``results/gpu/prefix_real_<shape>`` on gpu.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import attrs
import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
for _path in (_ROOT, _ROOT / "benchmarks"):  # run as a script or as ``-m benchmarks.prefix_real``
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import harness  # noqa: E402
from benchmarks.sim.real import Switch, _pinned_factory  # noqa: E402
from lylm import EnginePool  # noqa: E402
from lylm.balancers import BALANCERS, resolve_balancer  # noqa: E402

GROUPS, PREFIX, QUESTION, OUTPUT = 16, 640, 96, 16
VOCAB = 500


def prompts(kind: str, seed: int, n: int, groups: int = GROUPS) -> list[list[int]]:
    """The prompts of one round (the same for every balancer in it)."""
    rng = np.random.default_rng(seed)
    if kind == "distinct":
        return [rng.integers(3, VOCAB, size=PREFIX + QUESTION).tolist() for _ in range(n)]
    # The group prefixes are fixed across rounds; which group comes when is the round's.
    prefixes = [np.random.default_rng(10_000 + g).integers(3, VOCAB, size=PREFIX).tolist() for g in range(groups)]
    return [prefixes[int(rng.integers(groups))] + rng.integers(3, VOCAB, size=QUESTION).tolist() for _ in range(n)]


#: The chat workload: each conversation opens with its own 256-token message, then every turn
#: adds the engine's answer (16 tokens) and a 64-token user message: turn k's prompt is the
#: whole conversation so far (what the engine cached of it, answers included, is reusable).
CHAT_OPEN, CHAT_USER, CHAT_TURNS = 256, 64, 4


def conversations(seed: int, n: int) -> list[tuple[list[int], list[list[int]]]]:
    """``n`` requests' worth of conversations: (opening, the user messages of later turns)."""
    rng = np.random.default_rng(50_000 + seed)
    return [(rng.integers(3, VOCAB, size=CHAT_OPEN).tolist(),
             [rng.integers(3, VOCAB, size=CHAT_USER).tolist() for _ in range(CHAT_TURNS - 1)])
            for _ in range(n // CHAT_TURNS)]  # fmt: skip


async def run(pool: EnginePool, batch: list[Any], concurrency: int, chat: bool = False) -> dict[str, Any]:
    """Serve ``batch`` closed-loop at ``concurrency`` (prompts; with ``chat``, conversations,
    each one's turns in order); return the run's measurements."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    instances = pool.instances("tiny")
    for inst in instances:
        assert await inst.engine.llm.reset_prefix_cache(), "prefix cache reset refused"  # type: ignore[attr-defined]
    before = [(i.completed, i.prefix_cache_queries, i.prefix_cache_hits) for i in instances]
    params = SamplingParams(max_tokens=OUTPUT, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    queue = list(reversed(batch))
    ttft: list[float] = []
    cached = prompt_tokens = tokens = 0

    async def one(ids: list[int]) -> list[int]:
        nonlocal cached, prompt_tokens, tokens
        t0 = time.perf_counter()
        first = None
        last = None
        answer: list[int] = []
        async for out in pool.generate("tiny", ids, params):
            n = len(out.outputs[0].token_ids)
            answer += out.outputs[0].token_ids
            if n and first is None:
                first = time.perf_counter() - t0
            tokens += n
            last = out
        assert last is not None and first is not None
        ttft.append(first)
        cached += last.num_cached_tokens or 0
        prompt_tokens += len(ids)
        return answer

    async def worker() -> None:
        while queue:
            item = queue.pop()
            if not chat:
                await one(item)
                continue
            opening, later = item
            history = list(opening)
            for user in [[], *later]:
                history += user
                history += await one(history)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    wall = time.perf_counter() - start
    after = [(i.completed, i.prefix_cache_queries, i.prefix_cache_hits) for i in instances]
    served = [a[0] - b[0] for a, b in zip(after, before)]
    queries = sum(a[1] - b[1] for a, b in zip(after, before))
    hits = sum(a[2] - b[2] for a, b in zip(after, before))
    return {
        "wall_s": wall,
        "throughput": tokens / wall,
        "ttft_p50": float(np.percentile(ttft, 50)),
        "ttft_p90": float(np.percentile(ttft, 90)),
        "ttft_p99": float(np.percentile(ttft, 99)),
        "hit_rate": cached / prompt_tokens,
        "signal_hit_rate": hits / queries if queries else 0.0,
        "served": served,
        "request_spread": max(served) / statistics.fmean(served),
    }


def kv_bytes_per_token(model_dir: str, eargs: dict[str, Any]) -> int:
    """Bytes of KV cache one token takes: layers x (K and V) x KV heads x head size x element size."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_dtype = str(eargs.get("kv_cache_dtype") or "auto")
    dtype = str(eargs.get("dtype") or "auto")
    if dtype == "auto":
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    size = 1 if kv_dtype.startswith("fp8") else 4 if dtype in ("float32", "float") else 2
    return int(cfg["num_hidden_layers"]) * 2 * int(heads) * int(head_dim) * size


async def main_async(args: argparse.Namespace, engine_args: dict[str, Any]) -> dict[str, Any]:
    instance = {"devices": harness.devices(), "engine_args": engine_args}
    config = {"models": {"tiny": [instance, instance]}}
    switch = Switch()
    names = args.balancers
    if "kv_aware" in names:
        # The engines publish their KV events for the whole run (the pool subscribes when its
        # balancer asks, and the switch is the pool's balancer): every request then carries the
        # index's prediction, whichever balancer routes it, and kv_agreement counts them all.
        switch.kv_events = True  # type: ignore[misc]
    results: dict[str, Any] = {"runs": {}}
    # One core per engine on the CPU build (else vLLM binds both to the same one).
    factory = {"engine_factory": _pinned_factory} if harness.DEVICE == "cpu" else {}
    progress = harness.Progress(args.rounds * len(args.workloads) * len(names), "prefix_real")
    t0 = time.time()
    async with EnginePool.from_config(config, balancer=switch, **factory) as pool:
        cache = pool.instances("tiny")[0].engine.llm.vllm_config.cache_config  # type: ignore[attr-defined]
        block = cache.block_size
        print(f"engines up in {time.time() - t0:.0f} s; KV block {block} tokens, "
              f"{cache.num_gpu_blocks} blocks per engine", flush=True)
        results["block_size"] = block
        results["kv_blocks_per_engine"] = cache.num_gpu_blocks
        await run(pool, prompts("distinct", 999, 16), args.concurrency)  # warm-up, not counted
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for kind in args.workloads:
                batch: list[Any] = (conversations(r, args.requests) if kind == "chat"
                                    else prompts(kind, r, args.requests, args.groups))  # fmt: skip
                for name in order:
                    switch.inner = resolve_balancer(name, rng=random.Random(r))
                    res = await run(pool, batch, args.concurrency, chat=kind == "chat")
                    results["runs"].setdefault(kind, {}).setdefault(name, []).append(res)
                    print(f"round {r} {kind:8} {name:18} {res['throughput']:6.0f} tok/s  "
                          f"TTFT p90 {res['ttft_p90'] * 1e3:6.0f} ms  hits {res['hit_rate']:.1%} "
                          f"(signals {res['signal_hit_rate']:.1%})  served {res['served']}", flush=True)
                    progress.step(f"round {r}, {kind}, {name}")
        results["kv_agreement"] = [attrs.asdict(a) for a in pool.kv_agreement()]
    return results


def markdown(results: dict[str, Any]) -> str:
    """Medians over rounds per workload and balancer, with ratios to the baselines."""
    keys = ("throughput", "ttft_p50", "ttft_p90", "ttft_p99", "hit_rate", "signal_hit_rate", "request_spread")
    lines = []
    for kind, runs in results["runs"].items():
        med = {b: {k: statistics.median(r[k] for r in rs) for k in keys} for b, rs in runs.items()}
        base = "least_outstanding" if kind == "distinct" else "weighted_random"
        if base not in med:
            base = "least_outstanding" if "least_outstanding" in med else next(iter(med))
        lines += [f"### {kind} ({len(next(iter(runs.values())))} rounds; ratios vs {base})", "",
                  "| balancer | tok/s | x tok/s | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | TTFT p90 / it | "
                  "hit rate (num_cached_tokens) | hit rate (signals) | req spread | tok/s per round |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for b, m in med.items():
            per_round = ", ".join(f"{r['throughput']:.0f}" for r in runs[b])
            lines.append(
                f"| {b} | {m['throughput']:.0f} | {m['throughput'] / med[base]['throughput']:.3f} | "
                f"{m['ttft_p50'] * 1e3:.0f} | {m['ttft_p90'] * 1e3:.0f} | {m['ttft_p99'] * 1e3:.0f} | "
                f"{m['ttft_p90'] / med[base]['ttft_p90']:.3f} | {m['hit_rate']:.1%} | "
                f"{m['signal_hit_rate']:.1%} | {m['request_spread']:.2f} | {per_round} |")
        lines.append("")
    agreement = results.get("kv_agreement") or []
    if agreement:
        total = {k: sum(a[k] for a in agreement) for k in
                 ("exact", "over", "under", "unpredicted", "predicted_tokens", "reported_tokens")}
        predicted = total["exact"] + total["over"] + total["under"]
        lines += ["### KV events: predicted against reported cached tokens (every request of every run)", "",
                  f"{predicted} predicted: {total['exact']} exact ({total['exact'] / max(predicted, 1):.1%}), "
                  f"{total['over']} over, {total['under']} under; {total['unpredicted']} without a prediction; "
                  f"tokens predicted {total['predicted_tokens']:,}, reported {total['reported_tokens']:,}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_target_arguments(parser)
    parser.add_argument("--out", default=None,
                        help="result prefix (default: results/prefix_real; gpu: results/gpu/prefix_real_<shape>)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--kv-tokens", type=int, default=6144, help="KV cache per engine, in tokens")
    parser.add_argument("--groups", type=int, default=GROUPS, help=f"shared: prefix groups ({GROUPS})")
    parser.add_argument("--workloads", default="shared,distinct",
                        help="comma-separated: shared, distinct, chat (default: shared,distinct)")
    parser.add_argument("--balancers", default=",".join(sorted(BALANCERS)),
                        help="comma-separated built-in balancers to compare (default: all)")
    args = parser.parse_args()
    args.balancers = sorted(args.balancers.split(","))
    args.workloads = args.workloads.split(",")
    if set(args.workloads) - {"shared", "distinct", "chat"}:
        parser.error(f"--workloads: shared, distinct or chat (got {args.workloads})")
    unknown = set(args.balancers) - set(BALANCERS)
    if unknown:
        parser.error(f"--balancers: unknown {sorted(unknown)} (known: {', '.join(sorted(BALANCERS))})")
    harness.resolve_target(args)
    if args.out is None:
        gpu = harness.BENCH / "results" / "gpu" / f"prefix_real_{args.shape}"
        args.out = str(harness.BENCH / "results" / "prefix_real" if args.device == "cpu" else gpu)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    overrides = json.loads(args.engine_args)
    base = harness.engine_args(args.model_dir, overrides)
    per_token = kv_bytes_per_token(args.model_dir, base)
    engine_args = harness.engine_args(args.model_dir, overrides, kv_cache_memory_bytes=args.kv_tokens * per_token)
    results = anyio.run(main_async, args, engine_args)
    results["args"] = vars(args)
    results["kv_bytes_per_token"] = per_token
    results["meta"] = {"python": platform.python_version(), "machine": platform.machine()}
    table = markdown(results)
    print(table)
    sampling = {"max_tokens": OUTPUT, "ignore_eos": True, "output_kind": "DELTA",
                "other": "vLLM's SamplingParams defaults",
                "prompts": f"token ids 3..{VOCAB}: shared = one of {args.groups} {PREFIX}-token prefixes + a unique "
                           f"{QUESTION}-token question; distinct = {PREFIX + QUESTION} unique tokens; chat = "
                           f"conversations of {CHAT_TURNS} turns: a {CHAT_OPEN}-token opening, then the answer and "
                           f"a {CHAT_USER}-token message per turn, each turn's prompt the whole conversation"}
    client = {"kind": "in-process pool.generate, closed loop", "concurrency": args.concurrency,
              "requests_per_run": args.requests, "rounds": args.rounds, "balancers": args.balancers,
              "between_runs": "both engines' prefix caches reset, a fresh balancer"}
    harness.save_results(args.out, results, table + "\n", engine_args=engine_args, sampling=sampling, client=client)


if __name__ == "__main__":
    main()
