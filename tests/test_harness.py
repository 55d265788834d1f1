"""benchmarks/harness.py, the benchmarks' one harness: the parts every result depends on.

Result files must say what was measured (the provenance block), carry no machine paths,
and a scenario's defaults must follow its target. No engine starts here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    # benchmarks/ is not a package: load the script by path (it puts benchmarks/ on
    # sys.path for its siblings, loadgen and seed_table).
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("harness", ROOT / "benchmarks" / "harness.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "DEVICE", "cpu")
    yield module
    for name in ("loadgen", "seed_table", "plots"):
        sys.modules.pop(name, None)


def test_a_result_file_opens_with_its_provenance_and_names_no_machine_path(
    harness: ModuleType, tmp_path: Path
) -> None:
    engine_args = {"model": "/home/someone/models/qwen2.5-1.5b", "max_model_len": 4096}
    result = {
        "config": {"out": str(tmp_path / "x"), "command": f"/usr/bin/python -m lylm serve --config {tmp_path}/c.json"},
        "inside": str(ROOT / "benchmarks" / "results" / "x.json"),
        "rows": [{"url": "http://127.0.0.1:8000/v1", "tok_s": 12.5}],
    }
    prefix = str(tmp_path / "run")
    harness.save_results(prefix, result, "| table |\n", engine_args=engine_args, sampling={"max_tokens": 8},
                         client={"processes": 1})
    written = json.loads(Path(prefix + ".json").read_text())
    assert list(written)[:2] == ["provenance", "commit"]
    head = written["provenance"]
    assert set(head) == {"commit", "vllm", "target", "device", "engine_args", "sampling", "client"}
    assert head["target"] == "cpu" and "no GPU used" in head["device"]
    assert head["engine_args"] == {"model": "qwen2.5-1.5b", "max_model_len": 4096}
    assert (head["sampling"], head["client"]) == ({"max_tokens": 8}, {"processes": 1})
    assert written["commit"] == head["commit"]
    # Paths: outside the repository their last component, inside it relative to it.
    assert written["config"] == {"out": "x", "command": "python -m lylm serve --config c.json"}
    assert written["inside"] == "benchmarks/results/x.json"
    assert written["rows"] == [{"url": "http://127.0.0.1:8000/v1", "tok_s": 12.5}]
    assert Path(prefix + ".md").read_text() == "| table |\n"


@pytest.mark.parametrize(("device", "expected"), [("cpu", (16, "1x16")), ("gpu", (1024, "1x4"))])
def test_defaults_follow_the_target_and_never_override_the_command_line(
    harness: ModuleType, monkeypatch: pytest.MonkeyPatch, device: str, expected: tuple[int, str]
) -> None:
    monkeypatch.setattr(harness, "DEVICE", device)
    sizes = {"cpu": {"requests": 16, "grid": "1x16", "rounds": 9}, "gpu": {"requests": 1024, "grid": "1x4", "rounds": 9}}
    args = argparse.Namespace(requests=None, grid=None, rounds=2)
    harness.device_defaults(args, **sizes)
    assert (args.requests, args.grid, args.rounds) == (*expected, 2)


def test_instances_get_gpu_ids_only_on_a_gpu(harness: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    assert harness.devices(weight=2) == {"weight": 2}
    monkeypatch.setattr(harness, "DEVICE", "gpu")
    assert harness.devices(gpu=3) == {"gpu_ids": [3]}
    # The GPU memory fraction is the GPU's: the CPU build sizes its cache by bytes.
    assert harness.engine_args("m", gpu_memory_utilization=0.4)["gpu_memory_utilization"] == 0.4
    monkeypatch.setattr(harness, "DEVICE", "cpu")
    cpu = harness.engine_args("m", {"max_model_len": 512}, gpu_memory_utilization=0.4)
    assert "gpu_memory_utilization" not in cpu and cpu["max_model_len"] == 512 and "kv_cache_memory_bytes" in cpu


def test_progress_says_how_far_and_how_long_is_left(harness: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    progress = harness.Progress(4, "demo")
    progress.step("cell 1x4")
    progress.step("cell 16x64")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("demo [1/4] cell 1x4: ") and lines[1].startswith("demo [2/4] cell 16x64: ")
    assert all("s elapsed, about" in line and line.endswith("s left") for line in lines)
