from __future__ import annotations

import os

import pytest

# Tests run offline: the tiny model is built locally and vLLM must not phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    # vLLM is asyncio-only; session scope lets engine fixtures live across tests.
    return "asyncio"
