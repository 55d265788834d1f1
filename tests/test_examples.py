"""The examples are real code, and they work: the README's custom balancer, the mount
example (examples/serve.py), and the `lylm` command."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from _helpers import fake_specs, make_instances
from _server import ServerProcess
from lylm import EnginePool, RequestInfo
from lylm.testing import FakeEngine, FakeSamplingParams

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.anyio


def load_example(name: str) -> object:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # inspect.getsource looks the module up there
    spec.loader.exec_module(module)
    return module


def readme_block(containing: str) -> str:
    """The README's ```python block that contains ``containing``."""
    blocks = (ROOT / "README.md").read_text().split("```python\n")[1:]
    (block,) = [b.split("```", 1)[0] for b in blocks if containing in b]
    return block


def test_readme_shows_the_example_verbatim_and_its_block_runs_as_shown() -> None:
    example = load_example("custom_balancer")
    source = inspect.getsource(example.StickyByUser)  # type: ignore[attr-defined]
    block = readme_block("class StickyByUser")
    assert source in block
    # Copied as shown, with its imports: it chooses (a missing import fails here).
    namespace: dict[str, object] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    balancer = namespace["StickyByUser"](rng=random.Random(1))  # type: ignore[operator]
    instances = make_instances([1.0, 1.0])
    request = RequestInfo(model="m", request_id="r", prompt_tokens=1, max_tokens=1, session_key="alice")
    assert balancer.choose(instances, request) in instances  # type: ignore[attr-defined]


def test_readmes_first_example_prints_the_final_text_and_who_served_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("vllm")  # the block imports vLLM's SamplingParams
    block = readme_block("pool.add_observer(lambda r: print(")
    model = "Qwen/Qwen2.5-7B-Instruct"
    # The config file's engines are stand-ins here; the block runs as printed.
    original = EnginePool.from_config
    monkeypatch.setattr(
        EnginePool, "from_config",
        lambda source: original(fake_specs([1.0, 2.0], model=model), engine_factory=lambda spec: FakeEngine()),
    )  # fmt: skip
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(compile(block, "README.md", "exec"), namespace)
    import anyio

    anyio.run(namespace["main"])
    lines = capsys.readouterr().out.splitlines()
    # Two lines, in either order (the observer runs as the books close the request): the
    # whole text once (the fake's 64 tokens are characters 32, 33, ...), and who served it.
    assert len(lines) == 2, lines
    assert "".join(chr(32 + i) for i in range(64)) in lines, lines
    (served,) = [line for line in lines if line.endswith(", completed")]
    assert re.fullmatch(r'\S+: models\["Qwen/Qwen2.5-7B-Instruct"\]\[[01]\], completed', served), served


async def test_sticky_balancer_keeps_users_on_one_instance() -> None:
    example = load_example("custom_balancer")
    pool = EnginePool.from_config(
        fake_specs([1.0, 1.0, 1.0]),
        balancer=example.StickyByUser(rng=random.Random(5)),  # type: ignore[attr-defined]
        engine_factory=lambda spec: FakeEngine(),
        rng=random.Random(0),
    )
    params = FakeSamplingParams(max_tokens=2)

    async def serve(n: int, user: str | None) -> list[int]:
        before = [s.dispatched for s in pool.stats()["m"]]
        for _ in range(n):
            async for _out in pool.generate("m", "hi", params, session_key=user):
                pass
        return [s.dispatched - b for s, b in zip(pool.stats()["m"], before)]

    async with pool:
        # Each user's requests all land on one instance...
        homes = set()
        for user in [f"user{i}" for i in range(12)]:
            counts = await serve(5, user)
            assert sorted(counts) == [0, 0, 5], (user, counts)
            homes.add(counts.index(5))
        assert len(homes) > 1  # ...users do not all share one instance...
        # ...and anonymous requests go to the least loaded, ties spread over all.
        assert all(count > 0 for count in await serve(30, None))


# -- examples/serve.py (mounting the adapter) and the `lylm` command ---------------------


@pytest.mark.engines
def test_the_mount_example_serves_its_own_route_beside_openais(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    from lylm.testing import TINY_MODEL_ENGINE_ARGS, build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"models": {"tiny": [{"engine_args": {"model": str(model), **TINY_MODEL_ENGINE_ARGS}}]}}))
    server = ServerProcess("--config", str(config), script="examples/serve.py", log=tmp_path / "serve.log")
    try:
        server.wait_ready(timeout=240)
        about = httpx.get(f"{server.url}/about", timeout=30).json()
        assert about == {"models": ["tiny"], "engines": ['models["tiny"][0]']}
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        answer = client.completions.create(model="tiny", prompt="hello", max_tokens=3, extra_body={"ignore_eos": True})
        assert answer.usage is not None and answer.usage.completion_tokens == 3
        # SIGTERM: a clean stop (uvicorn ends by the signal it was stopped with).
        assert server.stop() == -signal.SIGTERM
        assert "Application shutdown complete" in server.log_path.read_text()
    finally:
        server.stop()


def run_lylm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # The console script pip installed beside this interpreter (what users type).
    script = Path(sys.executable).parent / "lylm"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lylm"]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}, cwd=ROOT
    )


def test_lylm_version_names_lylm_vllm_and_the_supported_range() -> None:
    import lylm
    from lylm.engines._internals import installed_version

    out = run_lylm("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == (
        f"lylm {lylm.__version__} (vLLM {installed_version()} installed; lylm supports vLLM 0.26 through 0.32)"
    )


def test_lylm_serve_help_lists_the_servers_flags_and_bad_values_name_themselves() -> None:
    out = run_lylm("serve", "--help")
    assert out.returncode == 0
    for flag in ("--config", "--host", "--port", "--workers", "--api-key", "--max-in-flight", "--drain-timeout",
                 "--header-timeout", "--body-timeout", "--max-header-bytes"):  # fmt: skip
        assert flag in out.stdout, flag
    assert run_lylm().returncode == 2  # no command: the help, as an error
    bad = run_lylm("serve", "--header-timeout", "0")
    assert bad.returncode == 2 and "header_timeout must be a positive number" in bad.stderr


# -- lylm serve's mistakes: one line, exit 2, before any engine starts (issue 28) ----------


def timed_lylm(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    out = run_lylm(*args)
    return out, time.monotonic() - began


def error_lines(out: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.startswith("lylm serve: error:")]


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"models": {"m": [{"engine_args": {"model": "/m"}, "devices": {"weight": 0}}]}},
         'lylm serve: error: models["m"][0].devices.weight: must be > 0 (got 0)'),
        ({"models": {"m": [{"engine_args": {"model": "/m"}, "wieght": 2}]}},
         'lylm serve: error: models["m"][0].wieght: unknown key'),
        ('{"models": {', "invalid JSON at line 1, column 13"),
    ],
)
def test_a_config_mistake_is_one_line_and_exit_2_at_once(tmp_path: Path, config: Any, says: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    out, took = timed_lylm("serve", "--config", str(path))
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and says in out.stderr, out.stderr  # no traceback
    assert took < 10  # the interpreter's start; no vLLM imported (under 2 s on an idle machine)


# Runs lylm serve in this interpreter, then says whether vLLM had been imported by the time it exited.
_SERVE_THEN_REPORT = """
import sys
from lylm.cli import main
try:
    main(sys.argv[1:])
finally:
    print("vllm imported:", "vllm" in sys.modules, file=sys.stderr)
"""


@pytest.mark.parametrize(
    ("instances", "says"),
    [
        # A typo in the second instance: named before the first one's slow checks.
        ([{"model": "{model}"}, {"model": "{model}", "max_model_length": 64}],
         'lylm serve: error: models["m"][1].engine_args.max_model_length: not an engine argument of the installed vLLM'),
        ([{"model": "{model}"}, {"model": "/no/such/model"}],
         'lylm serve: error: models["m"][1].engine_args.model: /no/such/model: no such file or directory'),
    ],
)
def test_an_engine_argument_mistake_is_named_before_vllm_is_imported(
    tmp_path: Path, instances: list[dict[str, Any]], says: str
) -> None:
    pytest.importorskip("vllm")
    model = tmp_path / "model"
    model.mkdir()
    config = {"models": {"m": [
        {"engine_args": {k: (str(model) if v == "{model}" else v) for k, v in args.items()}} for args in instances
    ]}}  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = subprocess.run(
        [sys.executable, "-c", _SERVE_THEN_REPORT, "serve", "--config", str(path), "--port", "0"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert error_lines(out) == [says], out.stderr
    assert out.stderr.splitlines()[-1] == "vllm imported: False", out.stderr
    assert "Traceback" not in out.stderr


def test_a_model_path_that_is_not_there_is_named_before_vllm_is_imported() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _SERVE_THEN_REPORT, "serve", "./no/such/model", "--max-model-len", "64"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert error_lines(out) == ["lylm serve: error: lylm serve MODEL: ./no/such/model: no such file or directory"]
    assert out.stderr.splitlines()[-1] == "vllm imported: False", out.stderr


def test_a_port_in_use_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"models": {"m": [{"engine_args": {"model": "/m"}}]}}))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        out, _ = timed_lylm("serve", "--config", str(path), "--port", str(port))
    assert out.returncode == 2, out.stderr
    assert error_lines(out) == [
        f"lylm serve: error: port: cannot listen on 127.0.0.1:{port}: Address already in use; "
        "stop what holds it or choose another port"
    ]
    assert "Traceback" not in out.stderr


def test_an_engine_start_failure_is_one_line_ending_with_the_engines_own_cause(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lylm import EngineStartError
    from lylm.cli import _one_line

    cause = "RuntimeError: Cannot find any model weights with `/m`"
    try:
        raise EngineStartError('models["m"][0]', cause, root_cause=cause) from RuntimeError("See root cause above.")
    except EngineStartError as exc:
        assert _one_line(exc) == 1
    assert capsys.readouterr().err == f'lylm serve: error: models["m"][0]: engine failed to start: {cause}\n'
    # No cause found in the engine's output: vLLM's own message, and where to look.
    try:
        raise EngineStartError('models["m"][0]', "RuntimeError: boom") from RuntimeError("boom")
    except EngineStartError as exc:
        assert _one_line(exc) == 1
    err = capsys.readouterr().err
    assert err.startswith('lylm serve: error: models["m"][0]: engine failed to start: RuntimeError: boom;')
    assert err.count("\n") == 1


def test_workers_below_one_is_a_usage_error() -> None:
    out = run_lylm("serve", "--workers", "0")
    assert out.returncode == 2 and "lylm serve: error: --workers must be at least 1 (got 0)" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_mistake_in_the_second_instances_engine_args_stops_the_serve_before_any_engine(
    tmp_path: Path, workers: str
) -> None:
    """It used to be found when that instance started, after the first engine had started."""
    from lylm.testing import TINY_MODEL_ENGINE_ARGS, build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    args = {"model": str(model), **TINY_MODEL_ENGINE_ARGS}
    config = {"models": {"m": [{"engine_args": args}, {"engine_args": {**args, "max_model_len": "long"}}]}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out, took = timed_lylm("serve", "--config", str(path), "--port", "0", "--workers", workers)
    assert out.returncode == 2, out.stderr[-3000:]
    (line,) = error_lines(out)
    assert line.startswith('lylm serve: error: models["m"][1].engine_args.max_model_len: ')
    assert "Traceback" not in out.stderr and "starting its engine" not in out.stderr
    print(f"\nthe error after {took:.1f} s (importing vLLM included)")


# -- lylm serve MODEL (issue 28) ------------------------------------------------------------


def test_the_model_form_makes_the_config_a_user_would_write() -> None:
    pytest.importorskip("vllm")
    from lylm._model_form import model_config

    made = model_config(
        "Qwen/Qwen2.5-7B-Instruct",
        ["--tensor-parallel-size", "2", "--max-model-len", "8k", "--enable-prefix-caching", "-O3"],
        gpus="0,1,3,4",
        balancer="least_outstanding",
    )
    engine_args = {
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "tensor_parallel_size": 2,
        "max_model_len": 8000,  # vLLM's parser reads "8k" as 8000 ("8K": 8192)
        "enable_prefix_caching": True,
        "optimization_level": "3",  # as vLLM's parser leaves it (-O3)
    }
    assert made == {
        "models": {
            "Qwen/Qwen2.5-7B-Instruct": {
                "instances": [
                    {"devices": {"gpu_ids": [0, 1]}, "engine_args": engine_args},
                    {"devices": {"gpu_ids": [3, 4]}, "engine_args": engine_args},
                ],
                "balancer": "least_outstanding",
            }
        }
    }
    from lylm import PoolConfig

    assert PoolConfig.load(made) == PoolConfig.load(json.loads(json.dumps(made)))  # what a file of it loads


@pytest.mark.parametrize(
    ("flags", "kw", "says"),
    [
        (["--max-model-lenn", "5"], {}, "lylm serve MODEL: unrecognized arguments: --max-model-lenn 5"),
        (["--max-num-seqs", "many"], {}, "lylm serve MODEL: argument --max-num-seqs: invalid"),
        (["-tp", "2"], {"gpus": "0,1,2"}, "--gpus: 3 GPU(s) do not split into instances of 2"),
        ([], {"gpus": "0,x"}, "--gpus: expected GPU indices"),
        ([], {"gpus": "0", "instances": 2}, "give --gpus or --instances, not both"),
        (["--compilation-config.mode", "3"], {}, "give it as JSON here"),
    ],
)
def test_the_model_forms_mistakes_name_the_flag(flags: list[str], kw: dict[str, Any], says: str) -> None:
    pytest.importorskip("vllm")
    from lylm import ConfigError
    from lylm._model_form import model_config

    with pytest.raises(ConfigError) as caught:
        model_config("org/m", flags, **kw)  # an id: a path must exist
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_the_model_form_on_the_command_line(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    out = run_lylm("serve", "/models/m", "--served-model-name", "m", "--instances", "2", "--max-model-len", "4096",
                   "--port", "9", "--print-config")  # fmt: skip
    assert out.returncode == 0, out.stderr
    members = [{"engine_args": {"model": "/models/m", "max_model_len": 4096}}] * 2  # no GPU here: unpinned
    assert json.loads(out.stdout) == {"models": {"m": {"instances": members}}}
    out = run_lylm("serve", "--max-model-len", "4096", "/models/m")
    assert out.returncode == 2 and "go with MODEL" in out.stderr


@pytest.mark.engines
def test_lylm_serve_model_serves_it(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    from lylm.engines._core_host import serve_flags
    from lylm.testing import TINY_MODEL_ENGINE_ARGS, build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    flags = serve_flags(dict(TINY_MODEL_ENGINE_ARGS))
    server = ServerProcess(str(model), *flags, "--served-model-name", "tiny", log=tmp_path / "serve.log")
    try:
        server.wait_ready(timeout=240)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        assert [m.id for m in client.models.list().data] == ["tiny"]
        answer = client.completions.create(model="tiny", prompt="hello", max_tokens=3, extra_body={"ignore_eos": True})
        assert answer.usage is not None and answer.usage.completion_tokens == 3
        # Ctrl-C with nothing in flight: a quiet exit, as a shell expects (it was a traceback).
        began = time.monotonic()
        assert server.stop(sig=signal.SIGINT) == 128 + signal.SIGINT
        print(f"\nexited {time.monotonic() - began:.1f} s after SIGINT")
        assert "Traceback" not in server.log_path.read_text()
    finally:
        server.stop()
