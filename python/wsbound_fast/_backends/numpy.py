"""The Python engine on NumPy arrays (host memory, the BLAS's own threads).

Overflow surfaces as the FloatingPointError that bound() and the matvec raise on a non-finite
result, not as NumPy warnings.
"""

from __future__ import annotations

import numpy as np

from .._engine import schedule
from .._engine.schedule import Moments, ProgressFn
from .._problem.problem import Problem


def moments(prob: Problem, progress: ProgressFn | None = None) -> Moments:
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return schedule.moments(prob, progress)


def hvp(prob: Problem, V: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return schedule.products(prob, V)
