"""Calibrate the simulator's step-time model on a real CPU vLLM engine of lylm's tiny model.

    flock /tmp/lylm-bench.lock .venv/bin/python -m benchmarks.sim.calibrate --out benchmarks/results/sim \
        [--device cpu] [--model-dir DIR] [--engine-args JSON] [--repeats 3] [--decode-steps 24] [--replot]

CPU only: the simulator models vLLM's CPU build (``--device gpu`` is refused, and so is a
vLLM built for another device). Without ``--model-dir`` the model is lylm's tiny test model
with the tests' engine args (``harness.engine_args``), prefix caching off and a token
budget of 2,048.

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and is stepped by hand
through ``LLMEngine.step()``, so every timed call is exactly one scheduler step whose
batch we know: all requests are added before the first step, prefix caching is off and
each batch fits the token budget. Two families of points:

- decode: B requests (B = 1..64) decoding together after a 16-token prompt (and, to
  see the cost of attention over a long context, B = 8, 32 after a 768-token one);
  each step = B tokens, B decoding sequences, context = their summed lengths;
- prefill: B requests (B = 1..64) of P prompt tokens (P = 16..1024, B*P <= 2048),
  one step each = B*P tokens, no decoding sequence.

It fits ``step_s = a + b*tokens + c*decode_seqs + d*context`` by least squares
(first run: prefill tokens are ~90 us each, a decoding sequence ~140 us, so one
shared per-token cost cannot fit both) and writes
calibration.json (the harness's provenance block, raw points, coefficients, R^2),
calibration.md and calibration.png (measured vs fitted). ``--replot`` refits the saved
points without an engine.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import random
import statistics
import time
from typing import Any

import numpy as np

from . import results as results_io

# In-process engine core: step() then runs exactly one scheduler step, synchronously.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

DECODE_BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64)
LONG_CONTEXT_BATCHES = (8, 32)
LONG_CONTEXT = 768
PREFILL_LENGTHS = (32, 64, 128, 256, 512)
PREFILL_BATCHES = (1, 2, 4)  # plus the 16-token prefills of the decode runs, B up to 64
MAX_BATCHED_TOKENS = 2048


def _prompt(rng: random.Random, length: int) -> list[int]:
    # Ids 3.. skip the special tokens; random ids never share a prefix worth caching.
    return [rng.randrange(3, 500) for _ in range(length)]


def _run_batch(engine: Any, params: Any, prompts: list[list[int]], tag: str) -> list[float]:
    """Add every prompt, then step to the end; return each step's wall time in seconds."""
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": ids}, params)
    times: list[float] = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def _point(kind: str, tokens: int, seqs: int, decode_seqs: int, context: int, step_s: float) -> dict[str, Any]:
    return {"kind": kind, "tokens": tokens, "seqs": seqs, "decode_seqs": decode_seqs,
            "context": context, "step_s": step_s}


def features(p: dict[str, Any]) -> list[float]:
    """The regressors of one point: 1, tokens, decoding sequences, their context tokens."""
    return [1.0, float(p["tokens"]), float(p["decode_seqs"]), float(p["context"])]


def calibration_engine_args(harness: Any, model_dir: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The target's engine args (the tests' tiny-model args on the CPU build), prefix caching
    off and the token budget every prefill point fits in."""
    return harness.engine_args(model_dir, overrides, enable_prefix_caching=False,
                               max_num_batched_tokens=MAX_BATCHED_TOKENS)


def measure(engine_args: dict[str, Any], repeats: int, decode_steps: int, progress: Any) -> list[dict[str, Any]]:
    """Run the grid on a fresh engine; return one dict per measured point."""
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_args)
    engine = llm.llm_engine
    rng = random.Random(0)
    points: list[dict[str, Any]] = []
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    _run_batch(engine, one, [_prompt(rng, 64) for _ in range(4)], "warm")  # not counted
    for rep in range(repeats):
        for p in PREFILL_LENGTHS:
            for b in PREFILL_BATCHES:
                times = _run_batch(engine, one, [_prompt(rng, p) for _ in range(b)], f"p{rep}-{p}-{b}")
                # One step does the whole prefill (b*p <= budget) and samples the first token.
                points.append(_point("prefill", b * p, b, 0, 0, times[0]))
                progress.step(f"repeat {rep}: prefill {b} x {p}")
        grid = [(b, 16) for b in DECODE_BATCHES] + [(b, LONG_CONTEXT) for b in LONG_CONTEXT_BATCHES]
        for b, p in grid:
            params = SamplingParams(max_tokens=decode_steps + 1, ignore_eos=True)
            times = _run_batch(engine, params, [_prompt(rng, p) for _ in range(b)], f"d{rep}-{b}-{p}")
            if b * p <= MAX_BATCHED_TOKENS:
                # Step 0 is then the whole prefill; otherwise prefill is chunked over several.
                points.append(_point("prefill", b * p, b, 0, 0, times[0]))
            # The last steps are pure decode: b tokens, contexts of about p + decode_steps/2 each.
            tail = times[-(decode_steps // 2) :]
            ctx = b * (p + decode_steps // 2)
            points.append(_point("decode", b, b, b, ctx, statistics.median(tail)))
            progress.step(f"repeat {rep}: decode {b} x {p}")
    return points


#: Batches per repeat (for the progress count).
BATCHES_PER_REPEAT = len(PREFILL_LENGTHS) * len(PREFILL_BATCHES) + len(DECODE_BATCHES) + len(LONG_CONTEXT_BATCHES)


def fit(points: list[dict[str, Any]]) -> dict[str, float]:
    """Least squares for step_s = a + b*tokens + c*decode_seqs + d*context; a..d and R^2."""
    x = np.array([features(p) for p in points])
    y = np.array([p["step_s"] for p in points])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    pred = x @ coef
    r2 = 1.0 - float(np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2))
    rel = float(np.median(np.abs(y - pred) / y))
    return {"a": float(coef[0]), "b": float(coef[1]), "c": float(coef[2]), "d": float(coef[3]),
            "r2": r2, "median_rel_error": rel}


def plot(points: list[dict[str, Any]], coef: dict[str, float], path: pathlib.Path) -> None:
    """Measured vs fitted step time, by batch tokens, one colour per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, colour in (("decode", "tab:blue"), ("prefill", "tab:orange")):
        if not any(p["kind"] == kind for p in points):
            continue
        pts = [p for p in points if p["kind"] == kind]
        tok = np.array([p["tokens"] for p in pts])
        meas = np.array([p["step_s"] for p in pts]) * 1e3
        w = np.array([coef["a"], coef["b"], coef["c"], coef["d"]])
        fitted = np.array([features(p) for p in pts]) @ w * 1e3
        axes[0].scatter(tok, meas, s=14, c=colour, label=f"{kind} measured")
        axes[0].scatter(tok, fitted, s=14, marker="x", c="k" if kind == "decode" else "tab:red",
                        label=f"{kind} fitted")
        axes[1].scatter(fitted, meas, s=14, c=colour, label=kind)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("batch tokens")
    axes[0].set_ylabel("step time (ms)")
    axes[0].legend(fontsize=8)
    hi = max(p["step_s"] for p in points) * 1e3 * 1.05
    axes[1].plot([0, hi], [0, hi], "k--", lw=0.8)
    axes[1].set_xlabel("fitted (ms)")
    axes[1].set_ylabel("measured (ms)")
    axes[1].legend(fontsize=8)
    fig.suptitle(
        f"tiny model, CPU: step = {coef['a']*1e3:.2f} ms + {coef['b']*1e6:.1f} us/token "
        f"+ {coef['c']*1e6:.1f} us/decoding seq + {coef['d']*1e9:.1f} ns/context token"
        f"  (R^2 = {coef['r2']:.3f})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/sim")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=24)
    parser.add_argument("--replot", action="store_true", help="refit and replot the saved points")
    results_io.harness().add_target_arguments(parser, shape=False)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "calibration.json"
    sampling = {"prefill points": {"max_tokens": 1, "ignore_eos": True},
                "decode points": {"max_tokens": args.decode_steps + 1, "ignore_eos": True},
                "prompts": "random token ids 3..499 (no shared prefixes)"}
    client = {"kind": "in-process LLMEngine stepped by hand (VLLM_ENABLE_V1_MULTIPROCESSING=0)",
              "repeats": args.repeats, "decode_steps": args.decode_steps}
    if args.replot:  # no engine: the saved points, with the saved run's provenance
        harness = results_io.engine_free()
        saved = json.loads(path.read_text())
        points = saved["points"]
        head = saved.get("provenance") or {}
        engine_args = head.get("engine_args")
        sampling, client = head.get("sampling", sampling), head.get("client", client)
        measured_at = saved.get("points_measured_at") or {
            "commit": saved.get("commit"), "vllm": head.get("vllm"), "device": head.get("device")}
    else:
        harness = results_io.cpu_only(args, "sim.calibrate")
        engine_args = calibration_engine_args(harness, args.model_dir, json.loads(args.engine_args))
        t0 = time.time()
        progress = harness.Progress(args.repeats * BATCHES_PER_REPEAT, "calibrate")
        points = measure(engine_args, args.repeats, args.decode_steps, progress)
        print(f"measured {len(points)} points in {time.time() - t0:.0f} s")
        measured_at = None  # this run: the provenance block
    coef = fit(points)
    result = {
        "model": "step_s = a + b*tokens + c*decode_seqs + d*context",
        "coefficients": coef,
        "max_num_batched_tokens": MAX_BATCHED_TOKENS,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "points": points,
    }
    if measured_at is not None:  # --replot: the points are an earlier run's
        result["points_measured_at"] = measured_at
    md = (
        "| a (ms per step) | b (us per token) | c (us per decoding seq) | d (ns per context token) | R^2 | "
        "median relative error | points |\n|---|---|---|---|---|---|---|\n"
        f"| {coef['a'] * 1e3:.2f} | {coef['b'] * 1e6:.1f} | {coef['c'] * 1e6:.1f} | {coef['d'] * 1e9:.1f} | "
        f"{coef['r2']:.3f} | {coef['median_rel_error']:.1%} | {len(points)} |\n"
    )
    harness.save_results(str(out / "calibration"), result, md, engine_args=engine_args, sampling=sampling,
                         client=client)
    plot(points, coef, out / "calibration.png")
    print(json.dumps(coef))


if __name__ == "__main__":
    main()
