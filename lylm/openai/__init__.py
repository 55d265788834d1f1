"""OpenAI-compatible HTTP API over an EnginePool, as Starlette routes.

    from lylm.openai import create_app
    app = create_app(pool)           # a Starlette app; run it with uvicorn

or mount :func:`routes` in your own app. The ready server (uvicorn; with ``workers=N``,
N front-end processes over shared engine cores) is :func:`lylm.server.serve`, also
reachable here as ``lylm.openai.serve``. Needs the ``server`` extra:
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
from ._monitor import LocalMonitor as LocalMonitor
from ._monitor import Monitor as Monitor

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..server import EngineKinds as EngineKinds
    from ..server import HttpLimits as HttpLimits
    from ..server import ServerOptions as ServerOptions
    from ..server import default_workers as default_workers
    from ..server import serve as serve

# The server lives in lylm.server since the processes moved there; these names stay
# reachable here, where they were first published.
_SERVER = ("EngineKinds", "HttpLimits", "ServerOptions", "default_workers", "serve")


def __getattr__(name: str) -> Any:
    # The server needs uvicorn; mounting the routes in your own app does not.
    if name in _SERVER:
        from .. import server

        return getattr(server, name)
    raise AttributeError(f"module 'lylm.openai' has no attribute {name!r}")


__all__ = [
    "EngineKinds",
    "HttpLimits",
    "LocalMonitor",
    "Monitor",
    "OpenAIError",
    "PoolMetrics",
    "ServerOptions",
    "create_app",
    "default_workers",
    "routes",
    "serve",
]
