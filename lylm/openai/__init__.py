"""OpenAI-compatible HTTP API over an EnginePool, as Starlette routes.

    from lylm.openai import create_app
    app = create_app(pool)           # a Starlette app; run it with uvicorn

or mount :func:`routes` in your own app. Needs the ``server`` extra:
``pip install "lylm[server]"``.
"""

from __future__ import annotations

try:
    import prometheus_client as _prometheus_client  # noqa: F401
    import starlette as _starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"lylm.openai needs {exc.name!r}, which is not installed; "
        'install the server extra: pip install "lylm[server]"'
    ) from exc

from ._app import create_app as create_app
from ._app import routes as routes
from ._errors import OpenAIError as OpenAIError
from ._metrics import PoolMetrics as PoolMetrics

__all__ = ["OpenAIError", "PoolMetrics", "create_app", "routes"]
