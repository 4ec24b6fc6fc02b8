"""NumPy fallback: the same streamed algorithm as the C++ core, vectorised per block.

Structure (mirrors cpp/wsbound/engine.cpp):

1. The samples are cut into blocks of ``batch_size``.  For a block, :func:`block_features`
   computes every per-sample quantity of DESIGN.md section 3 (augmented inputs, deltas,
   sigma', the blocks G_lm = T_ml^T M_m, the dense Q_lm and the cross-term factors)
   and the block's share of tr(H).
2. For every block pair I <= J, :func:`pair_sum` contracts the two blocks' features
   into sum_{n in I, n' in J} sum_{l<=m} c_lm kappa_lm(n, n') with Gram matrices.
   On the structured path (``prob.structured``, chosen by the cost model) the blocks that
   touch the softmax curvature A go through the "K route" of docs/structured.md instead:
   every block of the GGN, and the (L-1, L-1) and (L-1, L) blocks of the Hessian (L >= 2).
3. Partial sums are added in a fixed order: blocks for tr(H), block pairs (I, J)
   row by row for tr(H^2), the off-diagonal pairs counted twice by symmetry; and beside
   them the magnitudes of the rounding allowances (docs/numerics.md section 4).

Everything built from the softmax (delta_L, A, its quadratic forms, the K route) is written
in the saturation-stable forms of docs/numerics.md: shifted to the reference class
r = argmax z_L, with q = 1 - p_r from the non-reference exponentials, so that nothing is
a difference of O(1) numbers when 1 - p_y is 1e-300.

Only blocks of features (never an N x N or P x P array) are held; at most
``2 * group_blocks`` blocks at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ._activations import evaluate
from ._validate import CPU_CHUNK_VALUES, Problem


@dataclass
class BlockFeatures:
    """Per-sample features of one block of B samples (index 0 of every array is n).

    Layers are numbered 1..L as in DESIGN.md; index 0 of the lists is unused.
    """

    at: list[np.ndarray]  # at[l]: augmented input of layer l, (B, d_{l-1} [+1])
    delta: list[np.ndarray]  # delta[l]: dloss/dz_l, (B, d_l)
    sp: list[np.ndarray]  # sp[l]: sigma'(z_l), (B, d_l), l < L
    G: dict[tuple[int, int], np.ndarray]  # G[l, m]: (B, d_l * d_m) flattened row-major, l <= m
    Q: dict[tuple[int, int], np.ndarray]  # Q[l, m]: (B, d_{m-1}, d_l), l < m - 1 (full Hessian)
    trace: np.ndarray  # trace[l-1]: sum over the block's samples of |a~_{l-1}|^2 tr(M_l)
    # Structured path (docs/structured.md): p = softmax(z_L) and w = sum of the label row
    # (A = w (diag p - p p^T)); W = W_L, (C, d_{L-1}), the same array for every block.
    # GGN: T[l] = T_{L,l} = dz_L/dz_l stacked per sample, (B, C, d_l), l <= L - 2.
    # Hessian (L >= 2): M_{L-1} = V V^T + diag(rho), u_k = |V_k|^2 (V = D_{L-1} W_L^T S, A = S S^T);
    # G[L-1, L-1] and G[L-1, L] are not kept.
    p: np.ndarray | None = None
    w: np.ndarray | None = None
    W: np.ndarray | None = None
    T: dict[int, np.ndarray] | None = None
    rho: np.ndarray | None = None
    u: np.ndarray | None = None
    # Structured path: r = argmax z_L (the reference class, docs/numerics.md section 1), int64 (B,),
    # and q = 1 - p_r (B,), from the non-reference exponentials.
    r: np.ndarray | None = None
    q: np.ndarray | None = None
    # Magnitudes for the rounding allowances (docs/numerics.md section 4), the block's sums:
    # trace_abs[l-1] = sum_n |a~_{l-1}|^2 sum_k |(M_l)_kk|; norms[l-1, m-1] = sum_n nu_n^{lm} (l <= m).
    trace_abs: np.ndarray | None = None
    norms: np.ndarray | None = None


# Saturation-stable softmax quantities (docs/numerics.md sections 1-2), written once for NumPy
# arrays and torch tensors (``xp`` is numpy or torch; the torch backend and _hvp use them too).


def _take(x: Any, idx: Any, axis: int, xp: Any = np) -> Any:
    """x gathered along ``axis`` at ``idx`` (same number of dimensions, broadcast in the others)."""
    return np.take_along_axis(x, idx, axis) if xp is np else xp.take_along_dim(x, idx, axis)


def _float(mask: Any, like: Any, xp: Any = np) -> Any:
    """A boolean array as 0 / 1 in ``like``'s dtype."""
    return mask.astype(like.dtype) if xp is np else mask.to(like.dtype)


class Softmax(NamedTuple):
    """p = softmax(z) per row with its reference class (docs/numerics.md section 1)."""

    p: Any  # (B, C)
    r: Any  # (B,) int: argmax_k z_k, the first one on ties
    ref: Any  # (B, C) bool: k == r
    q: Any  # (B,) 1 - p_r = sum_{k != r} e_k / E, no cancellation


def softmax_ref(z: Any, xp: Any = np) -> Softmax:
    """Softmax of the rows of z (B, C) with e_k = exp(z_k - z_r) <= 1, e_r = 1, and q = 1 - p_r
    summed from the non-reference e_k.  Margins beyond ~745 give exact zeros, never NaN."""
    r = z.argmax(1)
    C = z.shape[1]
    cols = np.arange(C) if xp is np else xp.arange(C, device=z.device)
    ref = cols[None, :] == r[:, None]
    e = xp.exp(z - _take(z, r[:, None], 1, xp))
    E = e.sum(1)
    q = xp.where(ref, 0.0, e).sum(1) / E
    return Softmax(e / E[:, None], r, ref, q)


def delta_last(sm: Softmax, w: Any, Y: Any, xp: Any = np) -> Any:
    """delta_L = w p - y for k != r and delta_r = -sum_{k != r} delta_k (exact: sum delta = 0)."""
    d = xp.where(sm.ref, 0.0, w[:, None] * sm.p - Y)
    return xp.where(sm.ref, -d.sum(1)[:, None], d)


def diag_a(sm: Softmax, w: Any, xp: Any = np) -> Any:
    """The diagonal of A = w (diag p - p p^T), w p_i (1 - p_i) with 1 - p_r = q, (B, C)."""
    return w[:, None] * sm.p * xp.where(sm.ref, sm.q[:, None], 1.0 - sm.p)


def dense_a(sm: Softmax, w: Any, xp: Any = np) -> Any:
    """A per sample, (B, C, C): -w p_i p_j off the diagonal, diag_a on it."""
    p = sm.p
    A = (-w)[:, None, None] * p[:, :, None] * p[:, None, :]
    C = p.shape[1]
    A.reshape(A.shape[0], C * C)[:, :: C + 1] = diag_a(sm, w, xp)  # the diagonal, as a view of A
    return A


def a_times(sm: Softmax, w: Any, x: Any, xp: Any = np) -> Any:
    """A x per row, (B, C), as w p o (xhat - xbar 1), xhat = x - x_r 1, xbar = sum_i p_i xhat_i
    (A 1 = 0; entry r is -w p_r xbar, of size q |x|)."""
    xh = x - _take(x, sm.r[:, None], 1, xp)
    xb = (sm.p * xh).sum(1)
    return w[:, None] * sm.p * (xh - xb[:, None])


def block_features(prob: Problem, Xb: np.ndarray, Yb: np.ndarray) -> BlockFeatures:
    """Features of one block; Xb is (B, d_0) float64, Yb is (B, C) label rows."""
    W, bias, L = prob.weights, prob.biases, prob.n_layers
    B = Xb.shape[0]
    at: list[np.ndarray] = [np.empty(0)] * (L + 1)
    sp: list[np.ndarray] = [np.empty(0)] * (L + 1)
    spp: list[np.ndarray] = [np.empty(0)] * (L + 1)
    delta: list[np.ndarray] = [np.empty(0)] * (L + 1)
    a = Xb
    z = Xb
    for l in range(1, L + 1):
        b = bias[l - 1]
        at[l] = a if b is None else np.hstack([a, np.ones((B, 1))])
        z = a @ W[l - 1].T
        if b is not None:
            z += b
        if l < L:
            a, sp[l], spp[l] = evaluate(prob.activations[l - 1], z)
    sm = softmax_ref(z)
    p = sm.p
    w = Yb.sum(axis=1)  # 1 up to rounding; kept so the maths is exact for the given rows
    delta[L] = delta_last(sm, w, Yb)
    at_sq = [np.empty(0)] + [np.einsum("ni,ni->n", at[l], at[l]) for l in range(1, L + 1)]
    if prob.structured and not prob.hessian:  # GGN, K route: T_{L-1} = W_L D_{L-1}, T_l = T_{l+1} W_{l+1} D_l
        T: dict[int, np.ndarray] = {}
        tr_m = [np.empty(0)] * (L + 1)
        tr_abs = [np.empty(0)] * (L + 1)
        dA = diag_a(sm, w)
        tr_m[L], tr_abs[L] = dA.sum(axis=1), np.abs(dA).sum(axis=1)  # tr(A)
        Tl = np.empty(0)
        for l in range(L - 1, 0, -1):
            Tl = (W[L - 1][None, :, :] if l == L - 1 else Tl @ W[l]) * sp[l][:, None, :]
            dg = _diag_tat(sm, w, Tl)
            tr_m[l], tr_abs[l] = dg.sum(axis=1), np.abs(dg).sum(axis=1)
            if l <= L - 2:
                T[l] = Tl
        norms = _sum_nu(nu_ggn(at_sq, tr_m, np), L)
        return BlockFeatures(at, delta, sp, {}, {}, _layer_traces(at_sq, tr_m), p=p, w=w, W=W[L - 1], T=T,
                             r=sm.r, q=sm.q, trace_abs=_layer_traces(at_sq, tr_abs), norms=norms)
    M: list[np.ndarray] = [np.empty(0)] * (L + 1)
    M[L] = dense_a(sm, w)
    kroute = prob.structured and L >= 2  # Hessian blocks (L-1, L-1) and (L-1, L) by the K route
    rho = u = None
    G_next: dict[int, np.ndarray] = {}  # G_{l,l+1}, formed on the way to M_l
    for l in range(L - 1, 0, -1):
        Wn = W[l]  # W_{l+1}, (d_{l+1}, d_l)
        g = delta[l + 1] @ Wn
        delta[l] = sp[l] * g
        if kroute and l == L - 1:  # M_{L-1} = V V^T + diag(rho), |V_k|^2 = (T^T A T)_kk
            rho = spp[l] * g
            u = _diag_tat(sm, w, Wn[None, :, :] * sp[l][:, None, :])
            if L == 2:
                continue  # nothing below needs the dense d x d matrix
        G_next[l], M[l] = _curvature_step(Wn, M[l + 1], sp[l], spp[l] * g if prob.hessian else None)
    tr_m = [np.empty(0)] + [np.trace(M[l], axis1=1, axis2=2) if M[l].size else np.empty(0) for l in range(1, L + 1)]
    tr_abs = [np.empty(0)] + [np.abs(np.diagonal(M[l], axis1=1, axis2=2)).sum(axis=1) if M[l].size else np.empty(0)
                              for l in range(1, L + 1)]
    if kroute:
        tr_m[L - 1] = u.sum(axis=1) + rho.sum(axis=1)
        tr_abs[L - 1] = np.abs(u + rho).sum(axis=1)
    trace = _layer_traces(at_sq, tr_m)
    trace_abs = _layer_traces(at_sq, tr_abs)
    G: dict[tuple[int, int], np.ndarray] = {}
    for m in range(1, L + 1):
        Gc = M[m]
        if Gc.size == 0:  # M_1 of a one-hidden-layer net on the K route: never formed
            continue
        G[m, m] = Gc.reshape(B, -1)
        for l in range(m - 1, 0, -1):  # G_{l,m} = D_l W_{l+1}^T G_{l+1,m}
            if kroute and L == 2:
                break  # G_{1,2} goes by the K route and nothing lies below it
            Gc = G_next[l] if l == m - 1 and l in G_next else sp[l][:, :, None] * (W[l].T @ Gc)
            G[l, m] = Gc.reshape(B, -1)
    Q: dict[tuple[int, int], np.ndarray] = {}
    if prob.hessian:
        for l in range(1, L - 1):  # Q_{l,l+1} = D_l;  Q_{l,m} = D_{m-1} W_{m-1} Q_{l,m-1}
            Qc = W[l][None, :, :] * sp[l][:, None, :]  # W_{l+1} D_l, (B, d_{l+1}, d_l)
            Q[l, l + 2] = Qc = sp[l + 1][:, :, None] * Qc
            for m in range(l + 3, L + 1):
                Q[l, m] = Qc = sp[m - 1][:, :, None] * (W[m - 2] @ Qc)
    last = (u.sum(axis=1), rho, tr_m[L]) if kroute else None
    norms = _sum_nu(nu_formed(prob, at_sq, G, Q, delta, sp, last, np), L)
    if not kroute:
        return BlockFeatures(at, delta, sp, G, Q, trace, trace_abs=trace_abs, norms=norms)
    G.pop((L - 1, L - 1), None)  # both were needed only to form the blocks below them
    G.pop((L - 1, L), None)
    return BlockFeatures(at, delta, sp, G, Q, trace, p=p, w=w, W=W[L - 1], rho=rho, u=u, r=sm.r, q=sm.q,
                         trace_abs=trace_abs, norms=norms)


def _curvature_step(Wn: Any, M_next: Any, s: Any, diag: Any) -> tuple[Any, Any]:
    """One step of the backward recursion per sample, on NumPy arrays or torch tensors (the
    torch backend uses it too): G_{l,l+1} = D_l W_{l+1}^T M_{l+1}, (B, d_l, d_{l+1}), and
    M_l = G_{l,l+1} W_{l+1} D_l + diag(diag) (``diag`` None for the GGN), (B, d_l, d_l)."""
    Gn = s[:, :, None] * (Wn.T @ M_next)
    Ml = Gn @ Wn
    Ml *= s[:, None, :]
    if diag is not None:
        d = Ml.shape[1]
        Ml.reshape(Ml.shape[0], d * d)[:, :: d + 1] += diag  # the diagonal, as a view of Ml
    return Gn, Ml


def _diag_tat(sm: Softmax, w: Any, T: Any, xp: Any = np) -> Any:
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


def _layer_traces(at_sq: list[np.ndarray], tr_m: list[np.ndarray]) -> np.ndarray:
    """trace[l-1] = sum over the block of |a~_{l-1}|^2 tr(M_l), from |a~_{l-1}|^2 and tr(M_l) per sample."""
    return np.array([float(np.sum(at_sq[l] * tr_m[l])) for l in range(1, len(at_sq))])


def _row_norm(x: Any, xp: Any = np) -> Any:
    """The Euclidean (Frobenius) norm of each sample's entries of x (B, ...), (B,)."""
    f = x.reshape(x.shape[0], -1)
    return xp.sqrt(xp.einsum("ni,ni->n", f, f))


def nu_formed(prob: Problem, at_sq: list[Any], G: dict[tuple[int, int], Any], Q: dict[tuple[int, int], Any],
              delta: list[Any], sp: list[Any], last: tuple[Any, Any, Any] | None,
              xp: Any = np) -> dict[tuple[int, int], Any]:
    """nu_n^{lm} (docs/numerics.md section 4) per sample, {(l, m): (B,)} for l <= m, wherever the
    G_lm are formed (g_lm = |G_lm|_F), except on the Hessian's K route (``last`` = (sum_k u_k,
    rho, tr A) per sample): g_{L-1,L-1} = sum_k u_k + |rho|, g_{L-1,L} = (sum_k u_k tr A)^{1/2}.

    nu = |a~_{l-1}| (g_lm |a~_{m-1}| + [l < m] |delta_m| |Q_lm|_F), |Q_{l,l+1}|_F = |sigma'(z_l)|."""
    L = prob.n_layers
    na = [None] + [xp.sqrt(at_sq[l]) for l in range(1, L + 1)]
    nu = {}
    for l in range(1, L + 1):
        for m in range(l, L + 1):
            if last is not None and l == L - 1:
                usum, rho, tr_a = last
                g = usum + _row_norm(rho, xp) if m == l else xp.sqrt(usum * tr_a)
            else:
                g = _row_norm(G[l, m], xp)
            v = g * na[m]
            if prob.hessian and m > l:
                v = v + _row_norm(delta[m], xp) * _row_norm(sp[l] if m == l + 1 else Q[l, m], xp)
            nu[l, m] = na[l] * v
    return nu


def nu_ggn(at_sq: list[Any], tau: list[Any], xp: Any = np) -> dict[tuple[int, int], Any]:
    """nu_n^{lm} of the GGN's K route: |a~_{l-1}| |a~_{m-1}| (tau_l tau_m)^{1/2}, tau_l = tr(T_l^T A T_l)
    per sample (tau_L = tr A)."""
    L = len(at_sq) - 1
    na = [None] + [xp.sqrt(at_sq[l]) for l in range(1, L + 1)]
    return {(l, m): na[l] * (xp.sqrt(tau[l] * tau[m]) * na[m]) for l in range(1, L + 1) for m in range(l, L + 1)}


def _sum_nu(nu: dict[tuple[int, int], np.ndarray], L: int) -> np.ndarray:
    """norms[l-1, m-1] = sum over the block of nu_n^{lm}, upper triangle, (L, L)."""
    out = np.zeros((L, L))
    for (l, m), v in nu.items():
        out[l - 1, m - 1] = float(np.sum(v))
    return out


def _dense_cross(bI: Any, GI: Any, dJ: Any, QJ: Any) -> Any:
    """cross[n, n'] = b_n^T Q_{n'} G_n delta_{n'} for dense Q (l < m - 1), on NumPy arrays or
    torch tensors (the torch backend uses it too): two (B', B, d_l) temporaries."""
    B = bI.shape[0]
    d_l = QJ.shape[2]
    P1 = bI @ QJ  # (B', B, d_l): [n', n, r] = sum_e b_n[e] Q_{n'}[e, r]
    P1 *= (dJ @ GI.reshape(B * d_l, -1).T).reshape(dJ.shape[0], B, d_l)  # (G_n delta_{n'})[r], in place
    return P1.sum(-1).T


def _adjacent_cross(aI: Any, GI: Any, dJ: Any, spJ: Any, xp: Any = np) -> Any:
    """cross[n, n'] = <X_n, Y_{n'}> with X_n = diag(a_n) G_n and the rank-one Y_{n'} =
    sigma'_{n'} delta_{n'}^T (m = l + 1): sum_r a_n[r] sigma'_{n'}[r] (G_n delta_{n'})[r]
    = sum_c delta_{n'}[c] (X_n^T sigma'_{n'})[c]; the GEMM runs over the wider of d_l, d_m
    (as the C++ engine).  ``xp`` is numpy or torch (the torch backend uses it too)."""
    B, d_l = aI.shape
    d_m = dJ.shape[1]
    if d_m >= d_l:
        P = (GI.reshape(B * d_l, d_m) @ dJ.T).reshape(B, d_l, -1)  # [n, r, n'] = (G_n delta_{n'})[r]
        P *= aI[:, :, None]  # in place: one (B, d_l, B') temporary, as the cost model counts
        return xp.einsum("nrk,kr->nk", P, spJ)
    XT = (aI[:, :, None] * GI.reshape(B, d_l, d_m)).swapaxes(1, 2).reshape(B * d_m, d_l)  # [n c, r]
    P = (XT @ spJ.T).reshape(B, d_m, -1)  # [n, c, n'] = (X_n^T sigma'_{n'})[c]
    return xp.einsum("nck,kc->nk", P, dJ)


def chunk_budgets(prob: Problem) -> tuple[float, float]:
    """(values of a chunk's GEMM outputs, values of a sub-chunk's elementwise work) on the K
    route: the plan's (``prob.chunks``, :func:`wsbound_fast._validate.plan_python`), else the
    cache-sized CPU defaults."""
    return CPU_CHUNK_VALUES if prob.chunks is None else prob.chunks


def _pair_chunks(B: int, Bp: int, per_pair: int, per_row: int, budget: float) -> Iterator[tuple[slice, slice]]:
    """(rows of I, columns of J) chunks of a B x B' block pair whose temporaries, per_pair values
    per sample pair plus per_row per row of I, stay within budget values (at least one pair a
    chunk)."""
    cols = max(1, min(Bp, int(budget // per_pair)))
    rows = max(1, min(B, int(budget // (per_pair * cols + per_row))))
    for r0 in range(0, B, rows):
        for c0 in range(0, Bp, cols):
            yield slice(r0, min(B, r0 + rows)), slice(c0, min(Bp, c0 + cols))


def _within(outer: slice, inner: slice) -> slice:
    """The block pair's indices of the sub-chunk ``inner`` of the chunk ``outer``."""
    return slice(outer.start + inner.start, outer.start + inner.stop)


# The K route (docs/structured.md).  Per chunk of pairs (r rows n of I, c columns n' of J)
# every per-pair quantity is laid out with n first and n' last: scalars (r, c), vectors
# (r, C, c), the C x C matrices K (r, C, C, c).  The GEMMs then write them in place and
# the elementwise work runs along the contiguous n' axis.


def _omega(W: np.ndarray, ones_row: bool) -> tuple[np.ndarray, np.ndarray]:
    """Omega, the rows W_i * W_j (i <= j, i-major) of W = W_L (C, d), after a row of ones if
    ones_row; and pos (C, C), the row of Omega that holds (i, j) (see _unpack)."""
    C, d = W.shape
    i, j = np.triu_indices(C)
    pos = np.empty((C, C), dtype=np.intp)
    pos[i, j] = pos[j, i] = np.arange(i.size) + int(ones_row)
    rows = W[i] * W[j]
    return (np.vstack([np.ones((1, d)), rows]) if ones_row else rows), pos


def _stacked_gram(YI: np.ndarray, sJ: np.ndarray) -> np.ndarray:
    """out[n, q, n'] = Y_n[q] . s_n' for Y stacked (r, q, d) and s (c, d): one GEMM, (r, q, c).

    With Y_n = Omega diag(s_n) that is the packed K_{L-1} = Z Omega^T of docs/structured.md
    (Z = s_n * s_n'), without forming Z: the same C(C+1)/2 d multiply-adds per pair."""
    r, q, d = YI.shape
    return (YI.reshape(r * q, d) @ sJ.T).reshape(r, q, sJ.shape[0])


def _unpack(packed: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The symmetric K (r, C, C, c) from its packed rows (r, q, c): K[:, i, j] = packed[:, pos[i, j]]."""
    C = pos.shape[0]
    return np.take(packed, pos.ravel(), axis=1).reshape(packed.shape[0], C, C, packed.shape[2])


def _t_gram(TI: np.ndarray, TJ: np.ndarray) -> np.ndarray:
    """G[n, i, n', j] = (T_n T_n'^T)[i, j] from stacked T, (r, C, d) and (c, C, d): (r, C, c, C);
    K of a sub-chunk is _t_layout(G[rows, :, cols])."""
    r, C, d = TI.shape
    return (TI.reshape(r * C, d) @ TJ.reshape(-1, d).T).reshape(r, C, TJ.shape[0], C)


def _t_layout(G: np.ndarray) -> np.ndarray:
    """K (r, C, C, c) from _t_gram's (r, C, c, C), always a new array (_shift works in place)."""
    return G.transpose(0, 1, 3, 2).copy()


# Shifted to the reference classes (docs/numerics.md section 3): with Z_r = I - 1 e_r^T, A Z_r = A,
# so tr(A K A' Kt^T) = tr(A S A' St^T) with S = Z_r K Z_r'^T (zero row r, zero column r'), and the
# identity of docs/structured.md is applied to S: p_r and p'_r' only ever meet the zero row and
# column, every term is O(q q') when both samples are saturated and nothing cancels.


class _Refs(NamedTuple):
    """The reference classes of a chunk of pairs and what the shifted identity needs of them."""

    rI: Any  # r of the rows n, (r,)
    rJ: Any  # r' of the columns n', (c,)
    aI: Any  # 0 .. r - 1 (with rI: the index of (n, r_n) along the first two axes)
    aJ: Any  # 0 .. c - 1 (with rJ: the index of (r'_n', n') along the last two axes)
    eq: Any  # [r = r'], (r, c), in the dtype of p
    pJ_r: Any  # p'_r, (r, c)
    pI_r: Any  # p_r', (r, c)
    pnpn: Any  # sum over i not in {r, r'} of p_i p'_i, (r, c) (None where no K = I pairs with itself)


def _refs(rI: Any, rJ: Any, pI: Any, pJT: Any, pnpn: Any, xp: Any = np) -> _Refs:
    """_Refs of a chunk: rI (r,), rJ (c,), its softmax rows pI (r, C) and columns pJT (C, c)."""
    if xp is np:
        aI, aJ = np.arange(rI.shape[0]), np.arange(rJ.shape[0])
    else:
        aI, aJ = xp.arange(rI.shape[0], device=rI.device), xp.arange(rJ.shape[0], device=rJ.device)
    return _Refs(rI, rJ, aI, aJ, _float(rI[:, None] == rJ[None, :], pI, xp), pJT[rI], pI[:, rJ], pnpn)


def _ref_rows(p: Any, r: Any, q: Any, xp: Any = np) -> tuple[Any, Any]:
    """(p with p_r = 0, phat = Z_r^T p = p with p_r replaced by -q) of a block's rows (B, C)."""
    cols = np.arange(p.shape[1]) if xp is np else xp.arange(p.shape[1], device=p.device)
    ref = cols[None, :] == r[:, None]
    return xp.where(ref, 0.0, p), xp.where(ref, -q[:, None], p)


def _shift(K: Any, rf: _Refs) -> Any:
    """S = Z_r K Z_r'^T in place of K (r, C, C, c): S_ij = K_ij - K_rj - (K_ir' - K_rr').  Row r
    and column r' come out exact zeros (the same differences are subtracted)."""
    Kr = K[rf.aI, rf.rI]  # (r, C, c): K_rj
    Kc = K[:, :, rf.rJ, rf.aJ]  # (r, C, c): K_ir'
    Kc -= Kr[:, rf.rJ, rf.aJ][:, None, :]  # K_ir' - K_rr'
    K -= Kr[:, None, :, :]
    K -= Kc[:, :, None, :]
    return K


class _KTerms(NamedTuple):
    """What the identity of docs/structured.md needs of one shifted C x C matrix S per pair of a
    chunk; S = None stands for S_I = Z_r Z_r'^T (K_L = I shifted).  Arrays of the backend's
    library (NumPy arrays here, torch tensors in the torch backend, which calls these helpers
    with ``xp=torch``)."""

    K: Any  # S (r, C, C, c) or None
    Kp: Any  # S p', (r, C, c)
    Ktp: Any  # S^T p, (r, C, c)
    pKp: Any  # p^T S p', (r, c)


def _k_terms(K: Any, pI: Any, pJT: Any, xp: Any = np) -> _KTerms:
    """_KTerms of S (r, C, C, c) for the chunk's softmax rows pI (r, C) and columns pJT (C, c);
    ``xp`` is the array library (numpy or torch: both have this einsum)."""
    Kp = xp.einsum("aijb,jb->aib", K, pJT)
    return _KTerms(K, Kp, xp.einsum("aijb,ai->ajb", K, pI), xp.einsum("aib,ai->ab", Kp, pI))


def _identity_terms(hI: Any, hJT: Any, hh: Any, rf: _Refs) -> _KTerms:
    """_KTerms of S_I = Z_r Z_r'^T = I - 1 e_r^T - e_r' 1^T + [r = r'] 1 1^T from phat = Z_r^T p
    (p with p_r replaced by -q), rows hI (r, C) and columns hJT (C, c), and hh = phat . phat':
    S_I p' = phat' - phat'_r 1, S_I^T p = phat - phat_r' 1, p^T S_I p' = phat . phat'."""
    return _KTerms(None, hJT[None, :, :] - hJT[rf.rI][:, None, :], hI[:, :, None] - hI[:, rf.rJ][:, None, :], hh)


def _tr_akak(pI: Any, pJT: Any, k: _KTerms, kt: _KTerms, rf: _Refs, xp: Any = np) -> Any:
    """tr(A K A' Kt^T) / (w w') for every pair of a chunk, (r, c), in O(C^2) per pair, from the
    shifted S, St (docs/numerics.md section 3):

    sum_ij p_i p'_j S_ij St_ij - sum_i p_i (S p')_i (St p')_i - sum_j p'_j (S^T p)_j (St^T p)_j
    + (p^T S p')(p^T St p').  St may be S_I, and S only if St is; then the first term is
    sum_i p_i p'_i S_ii - p'_r (S^T p)_r - p_r' (S p')_r' + [r = r'] p^T S p', and for S = S_I
    (whose diagonal is 1 + [r = r'] off {r, r'}, 0 on it) its first part (1 + [r = r']) pnpn.
    """
    if kt.K is None:
        if k.K is None:
            diag = (1.0 + rf.eq) * rf.pnpn
        else:
            diag = xp.einsum("aib,ai->ab", xp.einsum("aiib->aib", k.K) * pJT, pI)
        ktp_r = k.Ktp[rf.aI, rf.rI]  # (S^T p)_r, (r, c)
        kp_r = k.Kp[:, rf.rJ, rf.aJ]  # (S p')_r', (r, c)
        t1 = diag - rf.pJ_r * ktp_r - rf.pI_r * kp_r + rf.eq * k.pKp
    else:
        t1 = xp.einsum("aib,ai->ab", xp.einsum("aijb,jb->aib", k.K * kt.K, pJT), pI)
    t2 = xp.einsum("aib,ai->ab", k.Kp * kt.Kp, pI)
    t3 = xp.einsum("ajb,jb->ab", k.Ktp * kt.Ktp, pJT)
    return t1 - t2 - t3 + k.pKp * kt.pKp


def _vector_values(L: int, C: int) -> int:
    """Values per pair of a K-route sub-chunk besides its C x C matrices (L levels): K p', K^T p
    and their products, the gathered K_rj, K_ir' of the shift, S_I's two vectors and the cross
    terms' shifted deltas (_pair_sum_ggn, _pair_sum_last size their sub-chunks with it)."""
    return 8 * L * C + 6 * C + 8


def _pair_sum_ggn(prob: Problem, FI: BlockFeatures, FJ: BlockFeatures) -> np.ndarray:
    """GGN by the K route: out[l-1, m-1] = sum alpha_l alpha_m tr(A K_l A' K_m^T) over the pairs,
    K_L = I, K_{L-1} from the packed GEMM, K_l = T_l T_l'^T below, each shifted to the pair's
    reference classes."""
    L = prob.n_layers
    out = np.zeros((L, L))
    alphas = {l: FI.at[l] @ FJ.at[l].T for l in range(1, L + 1)}
    ww = np.outer(FI.w, FJ.w)
    (pnI, hI), (pnJ, hJ) = _ref_rows(FI.p, FI.r, FI.q), _ref_rows(FJ.p, FJ.r, FJ.q)
    pnpn, hh = pnI @ pnJ.T, hI @ hJ.T
    (B, C), Bp = FI.p.shape, FJ.p.shape[0]
    omega, pos = _omega(FI.W, ones_row=False)  # (not used when L = 1: K_L = I only)
    gemm_per_pair = omega.shape[0] + (L - 2) * C * C if L >= 2 else 1  # packed K_{L-1}, T_l Grams
    per_pair = (2 * L - 1) * C * C + _vector_values(L, C)
    chunk_outer, chunk_inner = chunk_budgets(prob)
    for rows, cols in _pair_chunks(B, Bp, gemm_per_pair, omega.size, chunk_outer):
        packed = _stacked_gram(omega[None, :, :] * FI.sp[L - 1][rows, None, :], FJ.sp[L - 1][cols]) if L >= 2 else None
        grams = {l: _t_gram(FI.T[l][rows], FJ.T[l][cols]) for l in range(1, L - 1)}
        for sr, sc in _pair_chunks(rows.stop - rows.start, cols.stop - cols.start, per_pair, 0, chunk_inner):
            rr, cc = _within(rows, sr), _within(cols, sc)
            pI, pJT = FI.p[rr], FJ.p[cc].T
            rf = _refs(FI.r[rr], FJ.r[cc], pI, pJT, pnpn[rr, cc])
            terms = {L: _identity_terms(hI[rr], hJ[cc].T, hh[rr, cc], rf)}
            for l in range(1, L):
                K = _unpack(packed[sr, :, sc], pos) if l == L - 1 else _t_layout(grams[l][sr, :, sc])
                terms[l] = _k_terms(_shift(K, rf), pI, pJT)
            weight = ww[rr, cc]
            for l in range(1, L + 1):
                for m in range(l, L + 1):
                    tr = _tr_akak(pI, pJT, terms[l], terms[m], rf)
                    out[l - 1, m - 1] += np.sum(alphas[l][rr, cc] * alphas[m][rr, cc] * weight * tr)
    return out


def _pair_sum_last(prob: Problem, FI: BlockFeatures, FJ: BlockFeatures) -> tuple[float, float]:
    """Hessian blocks (L-1, L-1) and (L-1, L) by the K route (docs/structured.md), L >= 2:

    alpha^2 (w w' tr(A K A' K) + u . rho' + rho . u' + rho . rho') and
    alpha (beta w w' tr(A K A') + gamma s . s' + cross + cross'), K = K_{L-1}, summed over the pairs.
    One GEMM per chunk gives s . s' (Omega's row of ones), the packed K and E_i = sum_k W_ik a_k s_k s'_k
    (rows W_i a_n s_n after Omega diag(s_n)); a second one E'_i = sum_k W_ik s_k a'_k s'_k.
    Shifted to the reference classes (docs/numerics.md sections 2-3): K by _shift, and the cross
    terms through A delta' = w p o (Delta - Dbar 1), Delta = delta' - delta'_r 1 (r of n),
    Dbar = sum_{i != r} p_i Delta_i (and the mirror term with r' of n').
    """
    L = prob.n_layers
    W = FI.W
    C, d = W.shape
    alpha = FI.at[L - 1] @ FJ.at[L - 1].T
    beta = FI.at[L] @ FJ.at[L].T
    dI_all, dJ_all = FI.delta[L], FJ.delta[L]
    gamma = dI_all @ dJ_all.T
    inner = FI.u @ FJ.rho.T + FI.rho @ FJ.u.T + FI.rho @ FJ.rho.T
    ww = np.outer(FI.w, FJ.w)
    (pnI, hI), (pnJ, hJ) = _ref_rows(FI.p, FI.r, FI.q), _ref_rows(FJ.p, FJ.r, FJ.q)
    hh = hI @ hJ.T  # p^T S_I p'
    pn_dJ = pnI @ dJ_all.T  # sum_{i != r} p_i delta'_i
    dI_pn = dI_all @ pnJ.T  # sum_{i != r'} delta_i p'_i
    sI, sJ = FI.sp[L - 1], FJ.sp[L - 1]
    asJ = FJ.at[L][:, :d] * sJ  # a' s'
    omega, pos = _omega(W, ones_row=True)
    n_k = omega.shape[0]
    omega = np.vstack([omega, W])
    total = np.zeros(2)
    per_pair = 3 * C * C + _vector_values(2, C)
    gemm_per_pair, gemm_per_row = omega.shape[0] + C, omega.size + C * d  # [s . s'; K; E] and E', their left sides
    chunk_outer, chunk_inner = chunk_budgets(prob)
    for rows, cols in _pair_chunks(sI.shape[0], sJ.shape[0], gemm_per_pair, gemm_per_row, chunk_outer):
        YI = omega[None, :, :] * sI[rows, None, :]
        YI[:, n_k:, :] *= FI.at[L][rows, None, :d]  # W diag(a_n s_n)
        R_all = _stacked_gram(YI, sJ[cols])  # [s . s'; packed K; E]
        Ep_all = _stacked_gram(W[None, :, :] * sI[rows, None, :], asJ[cols])
        for sr, sc in _pair_chunks(R_all.shape[0], R_all.shape[2], per_pair, 0, chunk_inner):
            rr, cc = _within(rows, sr), _within(cols, sc)
            R, Ep = R_all[sr, :, sc], Ep_all[sr, :, sc]
            pI, pJT = FI.p[rr], FJ.p[cc].T
            rf = _refs(FI.r[rr], FJ.r[cc], pI, pJT, None)
            k = _k_terms(_shift(_unpack(R, pos), rf), pI, pJT)
            t_kk = _tr_akak(pI, pJT, k, k, rf)
            t_ki = _tr_akak(pI, pJT, k, _identity_terms(hI[rr], hJ[cc].T, hh[rr, cc], rf), rf)
            E = R[:, n_k:, :]
            dJT, dI = dJ_all[cc].T, dI_all[rr]
            d_r = dJT[rf.rI]  # delta'_r, (r, c)
            Dl = dJT[None, :, :] - d_r[:, None, :]
            Dbar = pn_dJ[rr, cc] - FI.q[rr, None] * d_r
            Dl *= E
            cross = FI.w[rr, None] * (np.einsum("aib,ai->ab", Dl, pI) - Dbar * np.einsum("aib,ai->ab", E, pI))
            d_r = dI[:, rf.rJ]  # delta_r', (r, c)
            Dl = dI[:, :, None] - d_r[:, None, :]
            Dbar = dI_pn[rr, cc] - FJ.q[None, cc] * d_r
            Dl *= Ep
            cross += FJ.w[None, cc] * (np.einsum("aib,ib->ab", Dl, pJT) - Dbar * np.einsum("aib,ib->ab", Ep, pJT))
            a, w2 = alpha[rr, cc], ww[rr, cc]
            total[0] += np.sum(a * a * (w2 * t_kk + inner[rr, cc]))
            total[1] += np.sum(a * (beta[rr, cc] * w2 * t_ki + gamma[rr, cc] * R[:, 0, :] + cross))
    return float(total[0]), float(total[1])


def pair_sum(prob: Problem, FI: BlockFeatures, FJ: BlockFeatures) -> np.ndarray:
    """out[l-1, m-1] = sum_{n in I, n' in J} kappa_lm(n, n') for l <= m (zero below the diagonal)."""
    L = prob.n_layers
    if prob.structured and not prob.hessian:
        return _pair_sum_ggn(prob, FI, FJ)
    kroute = prob.structured and L >= 2
    out = np.zeros((L, L))
    for l in range(1, L + 1):
        if kroute and l == L - 1:
            continue  # (L-1, L-1) and (L-1, L): _pair_sum_last
        alpha = FI.at[l] @ FJ.at[l].T
        for m in range(l, L + 1):
            KG = FI.G[l, m] @ FJ.G[l, m].T
            if l == m:
                out[l - 1, m - 1] = np.sum(alpha * alpha * KG)
                continue
            inner = (FI.at[m] @ FJ.at[m].T) * KG
            if prob.hessian:
                gamma = FI.delta[m] @ FJ.delta[m].T
                if m == l + 1:
                    inner += gamma * (FI.sp[l] @ FJ.sp[l].T)
                    d_l = FI.sp[l].shape[1]
                    inner += _adjacent_cross(FI.at[m][:, :d_l], FI.G[l, m], FJ.delta[m], FJ.sp[l])
                    inner += _adjacent_cross(FJ.at[m][:, :d_l], FJ.G[l, m], FI.delta[m], FI.sp[l]).T
                else:
                    QI, QJ = FI.Q[l, m], FJ.Q[l, m]
                    inner += gamma * (QI.reshape(QI.shape[0], -1) @ QJ.reshape(QJ.shape[0], -1).T)
                    d_prev = QI.shape[1]
                    inner += _dense_cross(FI.at[m][:, :d_prev], FI.G[l, m], FJ.delta[m], QJ)
                    inner += _dense_cross(FJ.at[m][:, :d_prev], FJ.G[l, m], FI.delta[m], QI).T
            out[l - 1, m - 1] = np.sum(alpha * inner)
    if kroute:
        out[L - 2, L - 2], out[L - 2, L - 1] = _pair_sum_last(prob, FI, FJ)
    return out


def label_rows(prob: Problem, lo: int, hi: int) -> np.ndarray:
    if prob.soft:
        return prob.labels[lo:hi]
    rows = np.zeros((hi - lo, prob.n_classes))
    rows[np.arange(hi - lo), prob.labels[lo:hi]] = 1.0
    return rows


def moments(prob: Problem, progress: Callable[[int, int], None] | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unnormalised moments per parameter block, as the C++ core returns them, and the magnitudes
    of the rounding allowances (docs/numerics.md section 4):

    (trace[l] = sum_n tr H_n^{ll}, blocks[l, m] = sum_{n,n'} <H_n^{lm}, H_n'^{lm}> for l <= m,
    trace_abs[l] = sum_n |a~_{l-1}|^2 sum_k |(M_l)_kk|, norms[l, m] = sum_n nu_n^{lm} for l <= m).
    """
    N, B, L = prob.n_samples, prob.batch_size, prob.n_layers
    bounds = [(lo, min(lo + B, N)) for lo in range(0, N, B)]
    nb = len(bounds)
    group = prob.group_blocks

    def features(k: int) -> BlockFeatures:
        lo, hi = bounds[k]
        return block_features(prob, np.asarray(prob.X[lo:hi], dtype=np.float64), label_rows(prob, lo, hi))

    block_trace = np.zeros((nb, L))
    block_abs = np.zeros((nb, L))
    block_norms = np.zeros((nb, L, L))
    row_sum = np.zeros((nb, L, L))  # row i: sum over j >= i of the pair sums, j increasing, off-diagonal twice
    done, total_pairs = 0, nb * (nb + 1) // 2
    for g0 in range(0, nb, group):
        rows = {i: features(i) for i in range(g0, min(g0 + group, nb))}
        for i in rows:
            block_trace[i], block_abs[i], block_norms[i] = rows[i].trace, rows[i].trace_abs, rows[i].norms
        for h0 in range(g0, nb, group):
            cols = rows if h0 == g0 else {j: features(j) for j in range(h0, min(h0 + group, nb))}
            for i, fi in rows.items():
                for j, fj in cols.items():
                    if j >= i:
                        s = pair_sum(prob, fi, fj)
                        row_sum[i] += s if i == j else 2.0 * s
                        done += 1
                        if progress is not None:
                            progress(done, total_pairs)
            cols = fi = fj = None  # no reference to this group while the next one is computed
    trace, blocks, trace_abs, norms = np.zeros(L), np.zeros((L, L)), np.zeros(L), np.zeros((L, L))
    for k in range(nb):
        trace += block_trace[k]
        blocks += row_sum[k]
        trace_abs += block_abs[k]
        norms += block_norms[k]
    return trace, blocks, trace_abs, norms
