"""The loss at the logits of a block (docs/design.md, "Losses"): delta_L = dl/dz_L and the
output curvature A = d^2 l / dz_L^2 per sample, mirroring cpp/wsbound/losses.hpp.

Cross-entropy goes through the saturation-stable softmax forms (softmax.py); mse and bce
have a diagonal A = diag(h), h >= 0, and their own stable forms: bce never subtracts a
sigmoid from 1 (sigma(-|z|) = t / (1 + t), t = exp(-|z|)).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat

from .._problem.problem import Problem
from .softmax import (
    Softmax,
    _diag_tat,
    a_times,
    delta_last,
    dense_a,
    diag_a,
    softmax_ref,
)

#: Unit roundoff of float64 (the features are computed in float64).
_U = 2.0 ** -53


class Output(NamedTuple):
    """delta_L and what A needs, for a block of B samples."""

    delta: Any  # (B, C)
    sm: Softmax | None = None  # cross-entropy: the softmax with its reference class
    w: Any | None = None  # cross-entropy: label row sums (A = w (diag p - p p^T))
    h: Any | None = None  # mse, bce: the diagonal of A, (B, C)
    sneg: Any | None = None  # bce: sigma(-|z|), (B, C) (for the rounding allowance)


def _bce(z: Any, Y: Any, xp: Any) -> tuple[Any, Any, Any]:
    """(delta, h, sigma(-|z|)) of binary cross-entropy with logits, without cancellation:
    delta = (1 - y) - sigma(-z) for z >= 0 and sigma(z) - y below; h = t / (1 + t)^2."""
    t = xp.exp(-xp.abs(z))
    sneg = t / (1.0 + t)
    h = sneg / (1.0 + t)
    delta = xp.where(z >= 0, (1.0 - Y) - sneg, sneg - Y)
    return delta, h, sneg


def output(prob: Problem, z: Any, Yb: Any, xp: Any) -> Output:
    """The loss at the logits z (B, C) for the target (label) rows Yb (B, C)."""
    if prob.loss == "mse":
        d = z - Yb
        return Output(d + d, h=xp.full(z.shape, 2.0, dtype=z.dtype, device=array_api_compat.device(z)))
    if prob.loss == "bce":
        delta, h, sneg = _bce(z, Yb, xp)
        return Output(delta, h=h, sneg=sneg)
    sm = softmax_ref(z, xp)  # the reference class r = argmax z (docs/numerics.md section 1)
    w = xp.sum(Yb, axis=1)  # 1 up to rounding; kept so the maths is exact for the given rows
    return Output(delta_last(sm, w, Yb, xp), sm=sm, w=w)


def a_diagonal(o: Output, xp: Any) -> Any:
    """The diagonal of A per sample, (B, C)."""
    return o.h if o.h is not None else diag_a(o.sm, o.w, xp)


def a_dense(o: Output, xp: Any) -> Any:
    """A per sample, (B, C, C)."""
    if o.h is None:
        return dense_a(o.sm, o.w, xp)
    B, C = o.h.shape
    A = xp.zeros((B, C, C), dtype=o.h.dtype, device=array_api_compat.device(o.h))
    A.reshape(B, C * C)[:, :: C + 1] = o.h  # the diagonal, as a view of A
    return A


def a_apply(o: Output, x: Any, xp: Any) -> Any:
    """A x per row, (B, C)."""
    return o.h * x if o.h is not None else a_times(o.sm, o.w, x, xp)


def tat_diagonal(o: Output, T: Any, xp: Any) -> Any:
    """diag(T^T A T) per sample, (B, d), for T stacked (B, C, d): sum_i h_i T_ik^2 for a diagonal
    A (non-negative terms), the shifted form of softmax._diag_tat for cross-entropy."""
    if o.h is None:
        return _diag_tat(o.sm, o.w, T, xp)
    return xp.einsum("ni,nik->nk", o.h, T * T)


def gamma(k: float) -> float:
    """Higham's gamma_k in float64."""
    return k * _U / (1.0 - k * _U)


def delta_error(prob: Problem, o: Output, z: Any, Yb: Any, E: Any, xp: Any) -> Any:
    """The componentwise bound on the error of delta_L of a diagonal loss (docs/numerics.md
    section 5), (B, C): z is inexact by at most E (forward error bound), and the
    difference with the target rounds."""
    if prob.loss == "mse":
        return 2.0 * E + 4.0 * _U * (xp.abs(z) + xp.abs(Yb))
    s = o.sneg
    return o.h * E + 4.0 * _U * xp.where(z >= 0, xp.abs(1.0 - Yb) + s, s + xp.abs(Yb))
