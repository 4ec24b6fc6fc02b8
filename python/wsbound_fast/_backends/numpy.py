"""The Python engine on NumPy arrays (host memory, the BLAS's own threads).

Overflow surfaces as the FloatingPointError that bound() and the matvec raise on a non-finite
result, not as NumPy warnings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import array_api_compat.numpy as xp_numpy
import numpy as np

from .._engine import schedule
from .._engine.data import HostData
from .._engine.namespace import Arrays, Weights
from .._engine.schedule import Moments, ProgressFn
from .._problem.problem import Problem

try:  # SciPy's vectorised erfc when present
    from scipy.special import erfc as _erfc  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - exercised only without SciPy
    _erfc = np.vectorize(math.erfc, otypes=[float])


@dataclass(frozen=True)
class NumpyArrays(Arrays):
    """The engine's arrays on NumPy (float64 throughout)."""

    def erfc(self, x: Any) -> Any:
        return _erfc(x)

    def copy_c(self, x: Any) -> Any:
        return np.array(x, order="C", copy=True)

    def to_numpy(self, x: Any) -> np.ndarray:
        return x


ARRAYS = NumpyArrays(xp_numpy, "cpu", np.float64, np.float64)


def moments(prob: Problem, progress: ProgressFn | None = None) -> Moments:
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return schedule.moments(prob, ARRAYS, Weights.of(prob, ARRAYS), HostData(prob, ARRAYS), progress)


def hvp(prob: Problem, V: np.ndarray) -> np.ndarray:
    """The unnormalised product sum_n H_n V[j] of a (k, P) float64 array."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return schedule.products(prob, ARRAYS, Weights.of(prob, ARRAYS), HostData(prob, ARRAYS), V)
