"""The step-time model: how long one engine step takes, from its batch.

    python -m benchmarks.sim.calibrate --out benchmarks/results/sim   # fits the coefficients

``step_s = (a + b*tokens + c*decode_seqs + d*context) / speed``: ``a`` is the fixed
cost of a step (scheduling, Python), ``b`` the cost per batched token (the matmuls),
``c`` the extra cost of each decoding sequence (its sampling and decode attention
call), ``d`` the cost per context token those sequences attend over. ``speed`` is
the instance's capacity factor, so a speed-2 instance runs each step in half the time.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

# Used when no calibration file exists (order of magnitude of the tiny model on 2 CPU cores).
_DEFAULT = {"a": 2e-3, "b": 9e-5, "c": 5e-5, "d": 0.0}


@dataclass(frozen=True)
class StepModel:
    """Linear step-time model, seconds per engine step."""

    a: float
    b: float
    c: float
    d: float = 0.0

    def step_time(self, tokens: int, decode_seqs: int, context: int, speed: float = 1.0) -> float:
        """Seconds for a step of ``tokens`` batched tokens, ``decode_seqs`` of them decodes
        over ``context`` cached tokens in all, on an instance of capacity ``speed``."""
        return (self.a + self.b * tokens + self.c * decode_seqs + self.d * context) / speed

    @classmethod
    def load(cls, path: str | pathlib.Path | None = None) -> StepModel:
        """Coefficients from calibration.json (``calibrate.py``), or the defaults when absent."""
        if path is None:
            path = pathlib.Path(__file__).resolve().parents[1] / "results" / "sim" / "calibration.json"
        try:
            coef = json.loads(pathlib.Path(path).read_text())["coefficients"]
        except (OSError, KeyError, ValueError):
            coef = _DEFAULT
        # A slightly negative fitted term (noise) would make tiny batches free: clamp at zero.
        return cls(*(max(float(coef.get(k, 0.0)), 0.0) for k in "abcd"))
