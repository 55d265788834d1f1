from __future__ import annotations

import json
import os

import pytest

from lylm.testing import TINY_MODEL_ENGINE_ARGS

# Tests run offline: the tiny model is built locally and vLLM must not phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

# For running the engine tests elsewhere than the CPU build (benchmarks/gpu/device.sh
# tests26 runs them on a GPU with vLLM 0.26): engine args merged into the tiny model's,
# e.g. {"gpu_memory_utilization": 0.08} so that several engines share one GPU.
TINY_MODEL_ENGINE_ARGS.update(json.loads(os.environ.get("LYLM_TEST_ENGINE_ARGS", "{}")))


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    # vLLM is asyncio-only; session scope lets engine fixtures live across tests.
    return "asyncio"
