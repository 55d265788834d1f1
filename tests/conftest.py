from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    # vLLM is asyncio-only; session scope lets engine fixtures live across tests.
    return "asyncio"
