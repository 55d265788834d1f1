"""One engine core, several front-end processes (issue 13's mechanism, measured before the server).

    python benchmarks/engine_clients.py [--device cpu|gpu] [--model-dir DIR] [--engine-args JSON] \
        [--clients 1,2,4] [--streams 256] [--requests 1024] [--prompt-len 128] [--max-tokens 256] \
        [--rounds 2] [--gpu-mem 0.85] [--out PREFIX]

A CPU dry run (``--device cpu``, the tiny model) wants a light load, e.g. ``--clients 1,2
--streams 8 --requests 32 --prompt-len 32 --max-tokens 16 --rounds 1``.

``lylm.engines._cores.EngineCores`` launches one engine core (pinned to GPU 0 on a GPU)
for as many front-end clients as the largest arm, as ``vllm serve --api-server-count``
does. Each arm then drives the same load (--streams concurrent requests, --requests
in all, 128-token prompts of token ids, --max-tokens output tokens, ``ignore_eos``,
DELTA outputs, greedy) through k client processes, each with its own ``AsyncLLM``
attached as client i of k (``client_addresses``, ``client_index``), each running
streams / k of the requests. No HTTP: this isolates what issue 13 expects from
several front ends, output processing spread over processes. Reported per arm:
output tok/s (all tokens / wall time from a common start), and each client process's
CPU share. Arms alternate within each round.

With ``--device cpu`` (vLLM's CPU build, the tiny model with the tests' engine args, the
core not pinned) the same code runs as a dry run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # lylm (the repository root) and harness, also in spawned clients


def client_main(cores: Any, index: int, max_tokens: int, commands: Any, results: Any) -> None:
    """One front-end process: attaches once (a client index serves one AsyncLLM per core
    lifetime: the core greets each client once), then runs the arms it is given."""
    import asyncio

    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    async def run() -> None:
        llm = cores.client(index)
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                                output_kind=RequestOutputKind.DELTA)
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, commands.get)
            if command is None:
                break
            prompts, streams, start_at, tag = command
            # Warm this client's path (output handler, detokenizer) before the common start.
            async for _ in llm.generate({"prompt_token_ids": prompts[0]}, params, f"warm-{tag}-{index}"):
                pass
            queue = list(enumerate(prompts))
            tokens = 0

            async def worker() -> None:
                nonlocal tokens
                while queue:
                    i, ids = queue.pop()
                    async for out in llm.generate({"prompt_token_ids": ids}, params, f"{tag}-c{index}-{i}"):
                        tokens += len(out.outputs[0].token_ids)

            await asyncio.sleep(max(0.0, start_at - time.time()))
            cpu0 = time.process_time()
            t0 = time.time()
            await asyncio.gather(*(worker() for _ in range(streams)))
            t1 = time.time()
            cpu = time.process_time() - cpu0
            results.put({"index": index, "tokens": tokens, "t0": t0, "t1": t1, "cpu_share": cpu / max(t1 - t0, 1e-9)})
        llm.shutdown()

    asyncio.run(run())


def run_arm(clients: list[tuple[Any, Any]], results: Any, k: int, args: argparse.Namespace, vocab: int,
            seed: int, tag: str) -> dict[str, Any]:
    import random

    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    start_at = time.time() + 3.0
    for i in range(k):
        clients[i][1].put((prompts[i::k], args.streams // k, start_at, tag))
    outs = [results.get(timeout=600) for _ in range(k)]
    t0 = min(o["t0"] for o in outs)
    t1 = max(o["t1"] for o in outs)
    tokens = sum(o["tokens"] for o in outs)
    return {"clients": k, "tokens": tokens, "wall_s": t1 - t0, "tok_s": tokens / (t1 - t0),
            "client_cpu_share": sorted(round(o["cpu_share"], 3) for o in outs)}


def main() -> None:
    import harness

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_target_arguments(parser, shape=False)
    parser.add_argument("--clients", default="1,2,4")
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gpu-mem", type=float, default=0.85)
    parser.add_argument("--out", default=None, help="result prefix (default: results/engine_clients_<device>)")
    args = parser.parse_args()
    harness.resolve_target(args)
    args.out = args.out or str(harness.BENCH / "results" / f"engine_clients_{args.device}")

    from lylm import EngineSpec
    from lylm.engines._cores import EngineCores

    arms = [int(k) for k in args.clients.split(",")]
    engine_args = harness.engine_args(args.model_dir, json.loads(args.engine_args), gpu_memory_utilization=args.gpu_mem)
    engine_args["disable_log_stats"] = True
    spec = EngineSpec(model="bench", engine_args=engine_args, gpu_ids=(0,) if harness.DEVICE == "gpu" else ())
    vocab = min(harness.vocab_size(args.model_dir), harness.FIRST_SPECIAL_ID)
    t = time.monotonic()
    cores = EngineCores.launch(spec, clients=max(arms))
    started = time.monotonic() - t
    print(f"engine core up in {started:.1f} s for {max(arms)} clients (pids {cores.process_ids()})", flush=True)
    result: dict[str, Any] = {"config": {**vars(args), "engine_args": engine_args, "gpu_ids": list(spec.gpu_ids)},
                              "machine": harness.device_info(), "start_s": started, "samples": []}
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    clients = []
    progress = harness.Progress(args.rounds * len(arms), "engine_clients")
    try:
        for i in range(max(arms)):
            commands = ctx.Queue()
            proc = ctx.Process(target=client_main, args=(cores, i, args.max_tokens, commands, results), daemon=True)
            proc.start()
            clients.append((proc, commands))
        for r in range(args.rounds):
            for k in (arms if r % 2 == 0 else arms[::-1]):
                s = run_arm(clients, results, k, args, vocab, seed=r, tag=f"r{r}k{k}")
                s["round"] = r
                result["samples"].append(s)
                print(f"r{r} clients={k}: {s['tok_s']:9.0f} tok/s over {s['wall_s']:.1f} s, client CPU {s['client_cpu_share']}", flush=True)
                progress.step(f"round {r}, {k} client{'s' if k > 1 else ''}")
    finally:
        for proc, commands in clients:
            commands.put(None)
        for proc, _ in clients:
            proc.join(timeout=30)
        cores.shutdown()
    rows = []
    for k in arms:
        ss = [s for s in result["samples"] if s["clients"] == k]
        rows.append({"clients": k, "tok_s": statistics.median(s["tok_s"] for s in ss),
                     "max_client_cpu": max(max(s["client_cpu_share"]) for s in ss)})
    base = rows[0]["tok_s"]
    md = ["| front-end clients | output tok/s (median) | vs 1 | busiest client's CPU share |", "|---|---|---|---|"]
    for row in rows:
        md.append(f"| {row['clients']} | {row['tok_s']:.0f} | {row['tok_s'] / base:.2f}x | {row['max_client_cpu']:.2f} |")
    result["rows"] = rows
    text = "\n".join(md) + "\n"
    print(text, flush=True)
    sampling = {"api": "AsyncLLM.generate (no HTTP)", "prompt": f"{args.prompt_len} random token ids",
                "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0.0, "output_kind": "DELTA"}
    client = {"kind": "k spawned processes, each an AsyncLLM attached to the one engine core (EngineCores.client)",
              "clients": args.clients, "streams": args.streams, "requests": args.requests, "rounds": args.rounds,
              "warm_up": "one request per client per arm before the common start, not counted"}
    harness.save_results(args.out, result, text, engine_args=engine_args, sampling=sampling, client=client)


if __name__ == "__main__":  # engines and clients are spawned: the guard is required
    main()
