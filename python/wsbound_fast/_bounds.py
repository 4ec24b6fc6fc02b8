"""The Wolkowicz–Styan bounds and the result type."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Bound", "WSBounds", "ws_bounds"]


@dataclass(frozen=True)
class WSBounds:
    """Wolkowicz–Styan bounds of a real symmetric n x n matrix from tr and tr of its square."""

    n: int
    trace: float
    trace_sq: float
    mean: float
    std: float
    lambda_max_lower: float
    lambda_max_upper: float
    lambda_min_lower: float
    lambda_min_upper: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite; got {v!r}")
    return v


def ws_bounds(trace: float, trace_sq: float, n: int) -> WSBounds:
    """Wolkowicz–Styan (1980) bounds on the extreme eigenvalues of a real symmetric matrix.

    With m = trace/n and s^2 = trace_sq/n - m^2 (the mean and variance of the eigenvalues)::

        m + s/sqrt(n-1) <= lambda_max <= m + s*sqrt(n-1)
        m - s*sqrt(n-1) <= lambda_min <= m - s/sqrt(n-1)

    For n = 1 all four equal m.  Raises ValueError when n < 1 or when no real symmetric
    matrix has these moments (trace_sq < trace^2/n beyond float64 rounding).
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be a positive integer (the matrix dimension); got {n!r}")
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1 (the matrix dimension); got {n}")
    t = _real(trace, "trace")
    t2 = _real(trace_sq, "trace_sq")
    if t2 < 0:
        raise ValueError(f"trace_sq is the squared Frobenius norm and cannot be negative; got {t2!r}")
    m = t / n
    var = t2 / n - m * m
    # Rounding in trace and trace_sq can make a zero variance slightly negative.
    if var < -1e-12 * max(t2 / n, m * m):
        raise ValueError(
            f"no real symmetric {n}x{n} matrix has trace {t!r} and trace_sq {t2!r}: "
            f"trace_sq must be >= trace^2/n = {t * t / n!r}"
        )
    s = math.sqrt(max(var, 0.0))
    if n == 1:
        return WSBounds(n, t, t2, m, s, m, m, m, m)
    r = math.sqrt(n - 1)
    lo, hi = s / r, s * r
    return WSBounds(n, t, t2, m, s, m + lo, m + hi, m - hi, m - lo)


@dataclass(frozen=True)
class Bound:
    """Exact tr(H), tr(H^2) of the loss curvature over a data set, and the WS bounds.

    ``trace`` and ``trace_sq`` are exact to float64 rounding; the four ``lambda_*`` fields
    bound the extreme eigenvalues of the P x P curvature matrix (P = ``n_params``).
    """

    n_params: int
    n_samples: int
    trace: float
    trace_sq: float
    mean: float
    std: float
    lambda_max_lower: float
    lambda_max_upper: float
    lambda_min_lower: float
    lambda_min_upper: float
    curvature: str
    reduction: str
    backend: str
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __repr__(self) -> str:
        name = "H" if self.curvature == "hessian" else "G"
        return (
            f"Bound({self.curvature}, reduction={self.reduction!r}, P={self.n_params}, N={self.n_samples}, "
            f"backend={self.backend!r}, {self.elapsed_s:.3g} s)\n"
            f"  tr({name})   = {self.trace:.10g}\n"
            f"  tr({name}^2) = {self.trace_sq:.10g}\n"
            f"  lambda_max in [{self.lambda_max_lower:.6g}, {self.lambda_max_upper:.6g}]\n"
            f"  lambda_min in [{self.lambda_min_lower:.6g}, {self.lambda_min_upper:.6g}]"
        )
