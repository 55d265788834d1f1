"""lylm: run many vLLM engines as one.

The public surface is re-exported here; everything else is private. Importing
lylm does not import vLLM, torch or Starlette: vLLM loads when an engine starts.
"""

from __future__ import annotations

from ._balancer import Balancer as Balancer
from .balancers._resolve import BalancerLike as BalancerLike
from ._config import EngineSpec as EngineSpec
from ._config import ModelSpec as ModelSpec
from ._config import PoolConfig as PoolConfig
from ._config import RemoteCore as RemoteCore
from ._engine import Engine as Engine
from ._engine import EngineSignals as EngineSignals
from ._engine import EngineStep as EngineStep
from ._engine import RenderedPrompt as RenderedPrompt
from ._exceptions import ConfigError as ConfigError
from ._exceptions import ContextLengthError as ContextLengthError
from ._exceptions import EngineDeadError as EngineDeadError
from ._exceptions import EngineError as EngineError
from ._exceptions import EngineStartError as EngineStartError
from ._exceptions import InvalidRequestError as InvalidRequestError
from ._exceptions import LylmError as LylmError
from ._exceptions import NoHealthyEngineError as NoHealthyEngineError
from ._exceptions import OverloadedError as OverloadedError
from ._exceptions import PromptError as PromptError
from ._exceptions import ShuttingDownError as ShuttingDownError
from ._exceptions import HubUnavailableError as HubUnavailableError
from ._exceptions import UnknownModelError as UnknownModelError
from ._exceptions import UnsupportedVLLMError as UnsupportedVLLMError
from ._instance import EngineStats as EngineStats
from ._instance import Instance as Instance
from ._instance import Outcome as Outcome
from ._instance import State as State
from ._kv_routing import KVAgreement as KVAgreement
from ._pool import EngineFactory as EngineFactory
from ._pool import EnginePool as EnginePool
from ._pool import PoolOptions as PoolOptions
from ._pool import Prompt as Prompt
from ._request import RequestInfo as RequestInfo
from ._request import RequestRecord as RequestRecord
from ._shadow import ShadowReport as ShadowReport
from ._supervisor import RestartPolicy as RestartPolicy
from .engines._local import VLLMEngine as VLLMEngine

__version__ = "0.1.0"

__all__ = [
    "Balancer",
    "BalancerLike",
    "ConfigError",
    "ContextLengthError",
    "Engine",
    "EngineDeadError",
    "EngineError",
    "EngineFactory",
    "EnginePool",
    "EngineSignals",
    "EngineSpec",
    "EngineStartError",
    "EngineStats",
    "EngineStep",
    "HubUnavailableError",
    "Instance",
    "InvalidRequestError",
    "KVAgreement",
    "LylmError",
    "ModelSpec",
    "NoHealthyEngineError",
    "Outcome",
    "OverloadedError",
    "PoolConfig",
    "PoolOptions",
    "Prompt",
    "PromptError",
    "RemoteCore",
    "RenderedPrompt",
    "RequestInfo",
    "RequestRecord",
    "RestartPolicy",
    "ShadowReport",
    "ShuttingDownError",
    "State",
    "UnknownModelError",
    "UnsupportedVLLMError",
    "VLLMEngine",
    "__version__",
]
