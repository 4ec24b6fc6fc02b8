"""Activation functions with their first and second derivatives, for the Python engine.

The C++ core has its own implementation (cpp/wsbound/activations.hpp); the two are held
to each other and to finite differences by the tests.
"""

from __future__ import annotations

import math

import numpy as np

from .._problem.activations import Activation

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


_GELU_TANH_C = 0.044715


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # exp of a non-positive argument only: no overflow for any finite z
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _logistic_slope(z: np.ndarray) -> np.ndarray:
    """sigma(z) (1 - sigma(z)) = e / (1 + e)^2, e = exp(-|z|): accurate when saturated."""
    e = np.exp(-np.abs(z))
    return e / ((1.0 + e) * (1.0 + e))


def _sech2(x: np.ndarray) -> np.ndarray:
    """1 - tanh(x)^2 = 4 e / (1 + e)^2, e = exp(-2|x|): accurate when saturated."""
    return 4.0 * _logistic_slope(2.0 * x)


def _erfc(z: np.ndarray) -> np.ndarray:
    try:  # SciPy's vectorised erfc when present; the pure-NumPy path otherwise
        from scipy.special import erfc  # type: ignore[import-untyped]

        return erfc(z)
    except ImportError:  # pragma: no cover - exercised only without SciPy
        from math import erfc as _e

        return np.vectorize(_e, otypes=[float])(z)


def evaluate(act: Activation, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (sigma(z), sigma'(z), sigma''(z)) elementwise, in float64.

    No derivative subtracts from 1 a number that tends to 1 (1 - t^2, 1 - s, 1 + erf):
    saturated hidden units keep their relative accuracy (as cpp/wsbound/activations.hpp)."""
    name = act.name
    if name == "identity":
        return z.copy(), np.ones_like(z), np.zeros_like(z)
    if name == "tanh":
        t = np.tanh(z)
        d1 = _sech2(z)
        return t, d1, -2.0 * t * d1
    if name == "sigmoid":
        s = _sigmoid(z)
        d1 = _logistic_slope(z)
        return s, d1, -d1 * np.tanh(0.5 * z)  # 1 - 2 s = -tanh(z/2)
    if name == "softplus":
        s = _sigmoid(z)
        f = np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z)))
        return f, s, _logistic_slope(z)
    if name == "gelu":
        phi = _INV_SQRT_2PI * np.exp(-0.5 * z * z)
        cdf = 0.5 * _erfc(-z / math.sqrt(2.0))
        return z * cdf, cdf + z * phi, phi * (2.0 - z * z)
    if name == "gelu_tanh":
        u = _SQRT_2_OVER_PI * (z + _GELU_TANH_C * z**3)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * z * z)
        ddu = _SQRT_2_OVER_PI * 6.0 * _GELU_TANH_C * z
        t = np.tanh(u)
        sech2 = _sech2(u)
        half = _sigmoid(2.0 * u)  # (1 + tanh u) / 2
        f = z * half
        d1 = half + 0.5 * z * sech2 * du
        d2 = sech2 * (du + 0.5 * z * (ddu - 2.0 * t * du * du))
        return f, d1, d2
    if name == "silu":
        s = _sigmoid(z)
        d = _logistic_slope(z)
        return z * s, s + z * d, d * (2.0 - z * np.tanh(0.5 * z))
    if name == "relu":
        pos = z > 0
        return np.where(pos, z, 0.0), pos.astype(np.float64), np.zeros_like(z)
    if name == "leaky_relu":
        pos = z > 0
        k = act.param
        return np.where(pos, z, k * z), np.where(pos, 1.0, k), np.zeros_like(z)
    raise AssertionError(f"unhandled activation {name!r}")  # pragma: no cover
