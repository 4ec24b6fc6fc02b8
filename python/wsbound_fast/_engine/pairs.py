"""The pair sum of a block pair (docs/design.md, "The pair sum"): Gram contractions of two
blocks' features into sum_{n in I, n' in J} kappa_lm(n, n'), the generic path and the K route."""

from __future__ import annotations

from typing import Any

from .._problem.problem import Problem
from .features import BlockFeatures
from .kroute import _pair_sum_ggn, _pair_sum_last
from .namespace import Arrays


def _dense_cross(bI: Any, GI: Any, dJ: Any, QJ: Any) -> Any:
    """cross[n, n'] = b_n^T Q_{n'} G_n delta_{n'} for dense Q (l < m - 1): two (B', B, d_l) temporaries."""
    B = bI.shape[0]
    d_l = QJ.shape[2]
    P1 = bI @ QJ  # (B', B, d_l): [n', n, r] = sum_e b_n[e] Q_{n'}[e, r]
    P1 *= (dJ @ GI.reshape(B * d_l, -1).T).reshape(dJ.shape[0], B, d_l)  # (G_n delta_{n'})[r], in place
    return P1.sum(-1).T


def _adjacent_cross(aI: Any, GI: Any, dJ: Any, spJ: Any, xp: Any) -> Any:
    """cross[n, n'] = <X_n, Y_{n'}> with X_n = diag(a_n) G_n and the rank-one Y_{n'} =
    sigma'_{n'} delta_{n'}^T (m = l + 1): sum_r a_n[r] sigma'_{n'}[r] (G_n delta_{n'})[r]
    = sum_c delta_{n'}[c] (X_n^T sigma'_{n'})[c]; the GEMM runs over the wider of d_l, d_m
    (as the C++ engine)."""
    B, d_l = aI.shape
    d_m = dJ.shape[1]
    if d_m >= d_l:
        P = (GI.reshape(B * d_l, d_m) @ dJ.T).reshape(B, d_l, -1)  # [n, r, n'] = (G_n delta_{n'})[r]
        P *= aI[:, :, None]  # in place: one (B, d_l, B') temporary, as the cost model counts
        return xp.einsum("nrk,kr->nk", P, spJ)
    XT = (aI[:, :, None] * GI.reshape(B, d_l, d_m)).swapaxes(1, 2).reshape(B * d_m, d_l)  # [n c, r]
    P = (XT @ spJ.T).reshape(B, d_m, -1)  # [n, c, n'] = (X_n^T sigma'_{n'})[c]
    return xp.einsum("nck,kc->nk", P, dJ)


def pair_sum(prob: Problem, arr: Arrays, FI: BlockFeatures, FJ: BlockFeatures) -> Any:
    """out[l-1, m-1] = sum_{n in I, n' in J} kappa_lm(n, n') for l <= m (zero below the diagonal),
    an (L, L) array in the accumulation dtype on the engine's device (no host synchronisation).

    Every Gram product runs in the compute dtype and is widened to the accumulation dtype
    before the elementwise products and sums (:meth:`Arrays.gram`)."""
    xp, gram = arr.xp, arr.gram
    L = prob.n_layers
    if prob.structured and not prob.hessian:
        return _pair_sum_ggn(prob, arr, FI, FJ)
    kroute = prob.structured and L >= 2
    out = arr.zeros((L, L))
    for l in range(1, L + 1):
        if kroute and l == L - 1:
            continue  # (L-1, L-1) and (L-1, L): _pair_sum_last
        alpha = gram(FI.at[l], FJ.at[l])
        for m in range(l, L + 1):
            KG = gram(FI.G[l, m], FJ.G[l, m])
            if l == m:
                out[l - 1, m - 1] = xp.sum(alpha * alpha * KG)
                continue
            inner = gram(FI.at[m], FJ.at[m]) * KG
            if prob.hessian:
                gamma = gram(FI.delta[m], FJ.delta[m])
                if m == l + 1:
                    inner += gamma * gram(FI.sp[l], FJ.sp[l])
                    d_l = FI.sp[l].shape[1]
                    inner += arr.to_acc(_adjacent_cross(FI.at[m][:, :d_l], FI.G[l, m], FJ.delta[m], FJ.sp[l], xp))
                    inner += arr.to_acc(_adjacent_cross(FJ.at[m][:, :d_l], FJ.G[l, m], FI.delta[m], FI.sp[l], xp)).T
                else:
                    QI, QJ = FI.Q[l, m], FJ.Q[l, m]
                    inner += gamma * gram(QI.reshape(QI.shape[0], -1), QJ.reshape(QJ.shape[0], -1))
                    d_prev = QI.shape[1]
                    inner += arr.to_acc(_dense_cross(FI.at[m][:, :d_prev], FI.G[l, m], FJ.delta[m], QJ))
                    inner += arr.to_acc(_dense_cross(FJ.at[m][:, :d_prev], FJ.G[l, m], FI.delta[m], QI)).T
            out[l - 1, m - 1] = xp.sum(alpha * inner)
    if kroute:
        out[L - 2, L - 2], out[L - 2, L - 1] = _pair_sum_last(prob, arr, FI, FJ)
    return out
