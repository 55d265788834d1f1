"""Test helpers that ship with lylm: a scripted FakeEngine and an offline tiny model.

``import lylm.testing`` stays light: the tiny-model builder imports ``tokenizers``
only when it runs.
"""

from __future__ import annotations

from ._fake_engine import FakeCompletion as FakeCompletion
from ._fake_engine import FakeEngine as FakeEngine
from ._fake_engine import FakeOutput as FakeOutput
from ._fake_engine import FakeSamplingParams as FakeSamplingParams
from ._tiny_model import TINY_MODEL_ENGINE_ARGS as TINY_MODEL_ENGINE_ARGS
from ._tiny_model import build_tiny_model as build_tiny_model
from ..engines._cli import vllm_cli as vllm_cli

__all__ = [
    "FakeCompletion",
    "FakeEngine",
    "FakeOutput",
    "FakeSamplingParams",
    "TINY_MODEL_ENGINE_ARGS",
    "build_tiny_model",
    "vllm_cli",
]
