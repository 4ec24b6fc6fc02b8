"""Activation functions with their first and second derivatives, for the Python engine.

Written once for every array library (:class:`~wsbound_fast._engine.namespace.Arrays`).  The
C++ core has its own implementation (cpp/wsbound/activations.hpp); the two are held to each
other and to finite differences by the tests.  No derivative subtracts from 1 a number that
tends to 1 (1 - t^2, 1 - s, 1 + erf): saturated hidden units keep their relative accuracy.
"""

from __future__ import annotations

import math
from typing import Any

from .._problem.activations import Activation
from .namespace import Arrays

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715


def _logistic_slope(xp: Any, z: Any) -> Any:
    """sigma(z) (1 - sigma(z)) = e / (1 + e)^2, e = exp(-|z|): accurate when saturated."""
    e = xp.exp(-xp.abs(z))
    return e / ((1.0 + e) * (1.0 + e))


def _sech2(xp: Any, x: Any) -> Any:
    """1 - tanh(x)^2 = 4 e / (1 + e)^2, e = exp(-2|x|): accurate when saturated."""
    return 4.0 * _logistic_slope(xp, 2.0 * x)


def evaluate(act: Activation, z: Any, arr: Arrays) -> tuple[Any, Any, Any]:
    """Return (sigma(z), sigma'(z), sigma''(z)) elementwise, in z's dtype."""
    xp = arr.xp
    name = act.name
    if name == "identity":
        return xp.asarray(z, copy=True), xp.ones_like(z), xp.zeros_like(z)
    if name == "tanh":
        t = xp.tanh(z)
        d1 = _sech2(xp, z)
        return t, d1, -2.0 * t * d1
    if name == "sigmoid":
        s = arr.sigmoid(z)
        d1 = _logistic_slope(xp, z)
        return s, d1, -d1 * xp.tanh(0.5 * z)  # 1 - 2 s = -tanh(z/2)
    if name == "softplus":
        s = arr.sigmoid(z)
        f = xp.maximum(z, 0.0) + xp.log1p(xp.exp(-xp.abs(z)))
        return f, s, _logistic_slope(xp, z)
    if name == "gelu":
        phi = _INV_SQRT_2PI * xp.exp(-0.5 * z * z)
        cdf = 0.5 * arr.erfc(-z / math.sqrt(2.0))
        return z * cdf, cdf + z * phi, phi * (2.0 - z * z)
    if name == "gelu_tanh":
        u = _SQRT_2_OVER_PI * (z + _GELU_TANH_C * z**3)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * z * z)
        ddu = _SQRT_2_OVER_PI * 6.0 * _GELU_TANH_C * z
        t = xp.tanh(u)
        sech2 = _sech2(xp, u)
        half = arr.sigmoid(2.0 * u)  # (1 + tanh u) / 2
        f = z * half
        d1 = half + 0.5 * z * sech2 * du
        d2 = sech2 * (du + 0.5 * z * (ddu - 2.0 * t * du * du))
        return f, d1, d2
    if name == "silu":
        s = arr.sigmoid(z)
        d = _logistic_slope(xp, z)
        return z * s, s + z * d, d * (2.0 - z * xp.tanh(0.5 * z))
    if name == "relu":
        pos = z > 0
        return xp.where(pos, z, 0.0), xp.astype(pos, z.dtype), xp.zeros_like(z)
    if name == "leaky_relu":
        pos = z > 0
        k = act.param
        return xp.where(pos, z, k * z), xp.where(pos, xp.ones_like(z), xp.full_like(z, k)), xp.zeros_like(z)
    raise AssertionError(f"unhandled activation {name!r}")  # pragma: no cover
