"""One vLLM engine core launched apart from its front ends, serving two AsyncLLM clients."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from lylm._vllm_cores import EngineCores
from lylm.testing import TINY_MODEL_ENGINE_ARGS, build_tiny_model

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

pytestmark = pytest.mark.anyio


async def tokens_of(llm: Any, request_id: str, max_tokens: int) -> tuple[int, bool]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    last = None
    async for out in llm.generate({"prompt_token_ids": list(range(5, 37))}, params, request_id):
        last = out
    assert last is not None
    return len(last.outputs[0].token_ids), last.finished


async def test_two_clients_share_one_engine_core(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny")
    args = {"model": str(model), **TINY_MODEL_ENGINE_ARGS, "disable_log_stats": True}
    mark = {"LYLM_TEST_SPAWN_MARK": "core-1"}
    cores = await anyio.to_thread.run_sync(lambda: EngineCores.launch(args, clients=2, environment=mark))
    clients: list[Any] = []
    try:
        (pid,) = cores.process_ids()
        assert cores.alive() and cores.clients == 2
        # The environment reached the engine core (spawned on the CPU build), not this process.
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"LYLM_TEST_SPAWN_MARK=core-1" in environ
        assert "LYLM_TEST_SPAWN_MARK" not in os.environ
        clients = [cores.client(0), cores.client(1)]
        # Both at once, different lengths: each client gets exactly its own outputs.
        results: dict[int, tuple[int, bool]] = {}

        async def run(i: int, n: int) -> None:
            results[i] = await tokens_of(clients[i], f"client-{i}", n)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, 0, 7)
                tg.start_soon(run, 1, 11)
        assert results == {0: (7, True), 1: (11, True)}
        assert all(c.output_processor.get_num_unfinished_requests() == 0 for c in clients)
        # The front ends carry what they need, not the processes: only the launcher owns those.
        import pickle

        copy = pickle.loads(pickle.dumps(cores))
        assert copy.client_addresses(1) == cores.client_addresses(1) and copy.process_ids() == []
    finally:
        for c in clients:
            c.shutdown()
        cores.shutdown()
    assert not cores.alive()
    with anyio.fail_after(30):
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            await anyio.sleep(0.05)
