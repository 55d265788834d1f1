"""Request generators for the scenarios; every one is a pure function of its seed.

    from benchmarks.sim.workloads import poisson_times, unique_prompt
"""

from __future__ import annotations

import numpy as np

from .model import StepModel
from .engine import EngineConfig

VOCAB = 500


def unique_prompt(rng: np.random.Generator, length: int) -> tuple[int, ...]:
    """Random token ids: two unique prompts share no 16-token block in practice."""
    return tuple(rng.integers(3, VOCAB, size=length).tolist())


def poisson_times(rng: np.random.Generator, n: int, rate: float) -> list[float]:
    """``n`` arrival times of a Poisson process of ``rate`` requests per second."""
    return [float(t) for t in np.cumsum(rng.exponential(1.0 / rate, size=n))]


def request_cost(model: StepModel, cfg: EngineConfig, prompt: float, output: float, cached: float = 0.0) -> float:
    """Engine-seconds one request costs at a full batch: its prefill, its decodes, its
    share of every step's fixed cost. Used to set arrival rates relative to capacity."""
    batch = cfg.max_num_seqs
    decode = output * (model.b + model.c + model.d * (prompt + output / 2) + model.a / batch)
    return ((prompt - cached) * model.b + decode) / cfg.speed


def capacity(model: StepModel, engines: list[EngineConfig], prompt: float, output: float, cached: float = 0.0) -> float:
    """Requests per second the pool sustains for a mean request (prompt, output tokens)."""
    return sum(1.0 / request_cost(model, cfg, prompt, output, cached) for cfg in engines)
