"""Saturation-stable softmax quantities (docs/numerics.md sections 1-2).

Everything built from the softmax (delta_L, A, its quadratic forms) is shifted to the
reference class r = argmax z_L, with q = 1 - p_r from the non-reference exponentials, so
that nothing is a difference of O(1) numbers when 1 - p_y is 1e-300.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat


def _take(x: Any, idx: Any, axis: int, xp: Any) -> Any:
    """x gathered along ``axis`` at ``idx`` (same number of dimensions, broadcast in the others)."""
    return xp.take_along_axis(x, idx, axis=axis)


def _float(mask: Any, like: Any, xp: Any) -> Any:
    """A boolean array as 0 / 1 in ``like``'s dtype."""
    return xp.astype(mask, like.dtype)


class Softmax(NamedTuple):
    """p = softmax(z) per row with its reference class (docs/numerics.md section 1)."""

    p: Any  # (B, C)
    r: Any  # (B,) int: argmax_k z_k, the first one on ties
    ref: Any  # (B, C) bool: k == r
    q: Any  # (B,) 1 - p_r = sum_{k != r} e_k / E, no cancellation


def softmax_ref(z: Any, xp: Any) -> Softmax:
    """Softmax of the rows of z (B, C) with e_k = exp(z_k - z_r) <= 1, e_r = 1, and q = 1 - p_r
    summed from the non-reference e_k.  Margins beyond ~745 give exact zeros, never NaN."""
    r = z.argmax(1)
    C = z.shape[1]
    cols = xp.arange(C, device=array_api_compat.device(z))
    ref = cols[None, :] == r[:, None]
    e = xp.exp(z - _take(z, r[:, None], 1, xp))
    E = e.sum(1)
    q = xp.where(ref, 0.0, e).sum(1) / E
    return Softmax(e / E[:, None], r, ref, q)


def delta_last(sm: Softmax, w: Any, Y: Any, xp: Any) -> Any:
    """delta_L = w p - y for k != r and delta_r = -sum_{k != r} delta_k (exact: sum delta = 0)."""
    d = xp.where(sm.ref, 0.0, w[:, None] * sm.p - Y)
    return xp.where(sm.ref, -d.sum(1)[:, None], d)


def diag_a(sm: Softmax, w: Any, xp: Any) -> Any:
    """The diagonal of A = w (diag p - p p^T), w p_i (1 - p_i) with 1 - p_r = q, (B, C)."""
    return w[:, None] * sm.p * xp.where(sm.ref, sm.q[:, None], 1.0 - sm.p)


def dense_a(sm: Softmax, w: Any, xp: Any) -> Any:
    """A per sample, (B, C, C): -w p_i p_j off the diagonal, diag_a on it."""
    p = sm.p
    A = (-w)[:, None, None] * p[:, :, None] * p[:, None, :]
    C = p.shape[1]
    A.reshape(A.shape[0], C * C)[:, :: C + 1] = diag_a(sm, w, xp)  # the diagonal, as a view of A
    return A


def a_times(sm: Softmax, w: Any, x: Any, xp: Any) -> Any:
    """A x per row, (B, C), as w p o (xhat - xbar 1), xhat = x - x_r 1, xbar = sum_i p_i xhat_i
    (A 1 = 0; entry r is -w p_r xbar, of size q |x|)."""
    xh = x - _take(x, sm.r[:, None], 1, xp)
    xb = (sm.p * xh).sum(1)
    return w[:, None] * sm.p * (xh - xb[:, None])


def _diag_tat(sm: Softmax, w: Any, T: Any, xp: Any) -> Any:
    """diag(T^T A T) per sample, (B, d), for T stacked (B, C, d) and A = w (diag p - p p^T), on
    NumPy arrays or torch tensors.

    x^T A x = w sum_i p_i (xhat_i - xbar)^2 for every column x of T, shifted to the reference
    class (xhat = x - x_r 1, xbar = sum_{i != r} p_i xhat_i; docs/numerics.md section 2): a sum
    of non-negative terms, of size q |x|^2 when p is peaked.  For T = T_{L-1} = W_L D_{L-1} that
    is u of docs/structured.md; summed over k, tr(A T T^T).
    """
    Th = T - _take(T, sm.r[:, None, None], 1, xp)
    Th -= xp.einsum("ni,nik->nk", sm.p, Th)[:, None, :]
    Th *= Th
    return w[:, None] * xp.einsum("ni,nik->nk", sm.p, Th)
