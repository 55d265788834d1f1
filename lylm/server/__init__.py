"""The ready server: OpenAI's API over a pool, in one process or in several.

    from lylm.server import serve, ServerOptions
    serve(config, workers=4, options=ServerOptions(port=8000))

``workers=1`` is one process: the pool and uvicorn on one event loop. With
``workers=N`` the main process launches each instance's engine core once and keeps
the hub (books, admission, balancers, health, restarts); N front-end worker
processes attach to every core and serve HTTP on one shared socket, asking the hub
which instance serves each request. ``lylm serve`` is this function on the command
line. Needs the ``server`` extra: ``pip install "lylm[server]"``.

This package knows processes, not OpenAI's schema: the routes come from
:mod:`lylm.openai`, whatever process runs them.
"""

from __future__ import annotations

from ._http import HttpLimits as HttpLimits
from ._serve import EngineKinds as EngineKinds
from ._serve import ServerOptions as ServerOptions
from ._serve import default_workers as default_workers
from ._serve import serve as serve

__all__ = ["EngineKinds", "HttpLimits", "ServerOptions", "default_workers", "serve"]
