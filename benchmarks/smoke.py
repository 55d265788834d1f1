"""Does lylm run on this machine's vLLM? A checklist, each step reported, none fatal to the rest.

    python benchmarks/smoke.py [--device cpu|gpu] [--model-dir DIR] [--engine-args JSON] \
        [--drop KEY ...] [--bad-gpu 1] [--bad-gpu-timeout 150] [--out PREFIX]

On the CPU (``--device cpu``, the tiny model) it runs as it is, in about a minute; leave
--bad-gpu out there (the CPU build has one "device", so ``--bad-gpu 1`` only checks the
ConfigError).

1. versions and which copy of lylm is imported;
2. one VLLMEngine through an EnginePool (devices.gpu_ids [0]; ``--device cpu``: unpinned):
   the effective engine config (batch limits when none are given, device), GPU processes
   seen by nvidia-smi;
3. pool.generate with a text prompt, token ids and chat messages; streamed DELTA
   outputs; num_cached_tokens; the stat logger's signals; num_unfinished_requests;
   default_sampling_params;
4. the OpenAI adapter in-process (httpx over ASGI): completions (streamed and not),
   chat, /health, /metrics;
5. optionally (--bad-gpu N) a pool whose instance names a GPU that does not exist:
   what error, how fast.

The report goes to PREFIX.json (each step's findings, after the provenance block) and
PREFIX.md (one line per step).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from typing import Any

import anyio
import attrs

import harness

MODEL = "smoke"


def step(report: dict[str, Any], name: str):  # type: ignore[no-untyped-def]
    """Decorator-ish context: record ok/error and seconds for one step."""

    class _Step:
        def __enter__(self) -> dict[str, Any]:
            self.t0 = time.monotonic()
            self.entry: dict[str, Any] = {}
            report[name] = self.entry
            print(f"== {name}", flush=True)
            return self.entry

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
            self.entry["seconds"] = round(time.monotonic() - self.t0, 2)
            if exc is not None:
                self.entry["ok"] = False
                self.entry["error"] = f"{exc_type.__name__}: {exc}"[:2000]
                traceback.print_exception(exc_type, exc, tb)
            else:
                self.entry.setdefault("ok", True)
            print(json.dumps({name: self.entry}, default=str)[:3000], flush=True)
            return True  # keep going

    return _Step()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from lylm import EnginePool

    report: dict[str, Any] = {}
    with step(report, "versions") as e:
        e.update(harness.device_info())

    eargs = harness.engine_args(args.model_dir, json.loads(args.engine_args))
    for key in args.drop:
        eargs.pop(key, None)
    config = {"models": {MODEL: [{"devices": harness.devices(), "engine_args": eargs}]}}
    pool = EnginePool.from_config(config)
    with step(report, "start") as e:
        e["engine_args"] = eargs
        t0 = time.monotonic()
        await pool.start()
        e["start_s"] = round(time.monotonic() - t0, 1)
        inst = pool.instances(MODEL)[0]
        llm = inst.engine.llm  # type: ignore[attr-defined]
        sched = llm.vllm_config.scheduler_config
        e["effective"] = {
            "max_num_seqs": sched.max_num_seqs,
            "max_num_batched_tokens": sched.max_num_batched_tokens,
            "enable_prefix_caching": llm.vllm_config.cache_config.enable_prefix_caching,
            "num_gpu_blocks": llm.vllm_config.cache_config.num_gpu_blocks,
            "assigned_physical_gpu_ids": getattr(llm.vllm_config.parallel_config, "assigned_physical_gpu_ids", None),
            "device_config": str(getattr(llm.vllm_config.device_config, "device", None)),
        }
        e["vllm_engine_args_passed"] = inst.engine.engine_args()  # type: ignore[attr-defined]
        e["gpu_processes"] = harness.gpu_processes()
        e["parent_pid"] = os.getpid()

    if pool.instances(MODEL):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        inst = pool.instances(MODEL)[0]
        engine = inst.engine
        with step(report, "generate") as e:
            params = SamplingParams(max_tokens=16, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
            for label, prompt in (
                ("text", "Hello world, this is a smoke test of lylm on a GPU."),
                ("token_ids", list(range(100, 164))),
                ("token_ids_again", list(range(100, 164))),
                ("chat", [{"role": "user", "content": "Say hi"}]),
            ):
                outs = [o async for o in pool.generate(MODEL, prompt, params)]
                last = outs[-1]
                e[label] = {
                    "outputs": len(outs),
                    "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                    "prompt_tokens": len(last.prompt_token_ids or []),
                    "num_cached_tokens": last.num_cached_tokens,
                    "finish_reason": last.outputs[0].finish_reason,
                }
            e["signals"] = attrs.asdict(engine.signals)
            e["num_unfinished_requests"] = engine.num_unfinished_requests()
            e["default_sampling_params"] = repr(engine.default_sampling_params())
            e["stats"] = repr(inst.stats())

        with step(report, "concurrent") as e:
            params = SamplingParams(max_tokens=64, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
            counts: list[int] = []

            async def one(i: int) -> None:
                n = 0
                async for o in pool.generate(MODEL, list(range(200 + i, 328 + i)), params):
                    n += len(o.outputs[0].token_ids)
                counts.append(n)

            t0 = time.monotonic()
            async with anyio.create_task_group() as tg:
                for i in range(64):
                    tg.start_soon(one, i)
            e["requests"] = len(counts)
            e["all_64_tokens"] = all(c == 64 for c in counts)
            e["seconds_64x64"] = round(time.monotonic() - t0, 2)
            e["signals_after"] = attrs.asdict(engine.signals)

        with step(report, "http") as e:
            import httpx

            from lylm.openai import create_app

            app = create_app(pool, manage_pool=False)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://smoke") as client:
                r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi there", "max_tokens": 8})
                e["completions"] = [r.status_code, r.json().get("usage")]
                r = await client.post("/v1/completions", json={
                    "model": MODEL, "prompt": list(range(300, 428)), "max_tokens": 8, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}})
                e["completions_stream"] = [r.status_code, r.text.count("data: "), r.text.strip().endswith("[DONE]")]
                r = await client.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})
                e["chat"] = [r.status_code, r.json().get("usage")]
                r = await client.get("/health")
                e["health"] = [r.status_code, r.json().get("status")]
                r = await client.get("/metrics")
                e["metrics_lines"] = [ln for ln in r.text.splitlines() if ln.startswith(("lylm_requests_total", "lylm_engine_"))]

    with step(report, "shutdown") as e:
        await pool.aclose()
        e["gpu_processes_after"] = harness.gpu_processes()

    if args.bad_gpu is not None:
        with step(report, "bad_gpu") as e:
            bad = {"models": {MODEL: [{"devices": {"gpu_ids": [args.bad_gpu]}, "engine_args": eargs}]}}
            t0 = time.monotonic()
            try:
                with anyio.fail_after(args.bad_gpu_timeout):
                    async with EnginePool.from_config(bad):
                        e["started"] = True
            except Exception as exc:  # the point: what does a wrong GPU id give?
                e["raised"] = f"{type(exc).__name__}: {exc}"[:1500]
            e["after_s"] = round(time.monotonic() - t0, 1)
            e["gpu_processes_after"] = harness.gpu_processes()
    return report


#: What each step's requests asked for (the provenance's sampling).
SAMPLING = {
    "generate": {"prompts": "a text, 64 token ids (twice), chat messages", "max_tokens": 16, "ignore_eos": True,
                 "output_kind": "DELTA", "other": "SamplingParams' defaults"},
    "concurrent": {"prompts": "64 x 128 token ids", "max_tokens": 64, "ignore_eos": True, "output_kind": "DELTA"},
    "http": {"api": "completions (text; 128 token ids streamed, ignore_eos) and chat", "max_tokens": 8,
             "other": "the model's generation config (lylm's default)"},
}


def summary(report: dict[str, Any]) -> str:
    lines = ["| step | ok | seconds | error |", "|---|---|---|---|"]
    for name, entry in report.items():
        error = str(entry.get("error") or "").replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {name} | {'yes' if entry.get('ok') else 'NO'} | {entry.get('seconds', '-')} | {error} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_target_arguments(parser, shape=False)
    parser.add_argument("--drop", nargs="*", default=[], help="the target's engine args to leave out (see vLLM's defaults)")
    parser.add_argument("--bad-gpu", type=int, default=None)
    parser.add_argument("--bad-gpu-timeout", type=float, default=150.0)
    parser.add_argument("--out", default=None, help="result prefix (default: results/smoke_<device>)")
    args = parser.parse_args()
    harness.resolve_target(args)
    args.out = (args.out or str(harness.BENCH / "results" / f"smoke_{args.device}")).removesuffix(".json")
    report = anyio.run(run, args)
    failed = [k for k, v in report.items() if not v.get("ok")]
    verdict = "all steps ok" if not failed else f"FAILED steps: {failed}"
    md = f"smoke test of lylm on {args.device}: {verdict}\n\n" + summary(report)
    eargs = report.get("start", {}).get("engine_args")
    client = {"kind": "in-process: pool.generate, and httpx over ASGI for the OpenAI adapter",
              "concurrent_requests": 64, "bad_gpu": args.bad_gpu}
    harness.save_results(args.out, {"config": vars(args), **report}, md, engine_args=eargs,
                         sampling=SAMPLING, client=client)
    print("smoke:", verdict, flush=True)


if __name__ == "__main__":
    main()
