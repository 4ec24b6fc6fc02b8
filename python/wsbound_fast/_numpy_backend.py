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
   row by row for tr(H^2), the off-diagonal pairs counted twice by symmetry.

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


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


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
    p = _softmax(z)
    w = Yb.sum(axis=1)  # 1 up to rounding; kept so the maths is exact for the given rows
    delta[L] = w[:, None] * p - Yb
    if prob.structured and not prob.hessian:  # GGN, K route: T_{L-1} = W_L D_{L-1}, T_l = T_{l+1} W_{l+1} D_l
        T: dict[int, np.ndarray] = {}
        tr_m = [np.empty(0)] * (L + 1)
        tr_m[L] = w * np.sum(p * (1.0 - p), axis=1)  # tr(A)
        Tl = np.empty(0)
        for l in range(L - 1, 0, -1):
            Tl = (W[L - 1][None, :, :] if l == L - 1 else Tl @ W[l]) * sp[l][:, None, :]
            tr_m[l] = _diag_tat(p, w, Tl).sum(axis=1)
            if l <= L - 2:
                T[l] = Tl
        return BlockFeatures(at, delta, sp, {}, {}, _layer_traces(at, tr_m), p=p, w=w, W=W[L - 1], T=T)
    M: list[np.ndarray] = [np.empty(0)] * (L + 1)
    C = p.shape[1]
    M[L] = w[:, None, None] * (np.einsum("ni,ij->nij", p, np.eye(C)) - p[:, :, None] * p[:, None, :])
    kroute = prob.structured and L >= 2  # Hessian blocks (L-1, L-1) and (L-1, L) by the K route
    rho = u = None
    G_next: dict[int, np.ndarray] = {}  # G_{l,l+1}, formed on the way to M_l
    for l in range(L - 1, 0, -1):
        Wn = W[l]  # W_{l+1}, (d_{l+1}, d_l)
        g = delta[l + 1] @ Wn
        delta[l] = sp[l] * g
        if kroute and l == L - 1:  # M_{L-1} = V V^T + diag(rho), |V_k|^2 = (T^T A T)_kk
            rho = spp[l] * g
            u = _diag_tat(p, w, Wn[None, :, :] * sp[l][:, None, :])
            if L == 2:
                continue  # nothing below needs the dense d x d matrix
        G_next[l], M[l] = _curvature_step(Wn, M[l + 1], sp[l], spp[l] * g if prob.hessian else None)
    tr_m = [np.empty(0)] + [np.trace(M[l], axis1=1, axis2=2) if M[l].size else np.empty(0) for l in range(1, L + 1)]
    if kroute:
        tr_m[L - 1] = u.sum(axis=1) + rho.sum(axis=1)
    trace = _layer_traces(at, tr_m)
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
    if not kroute:
        return BlockFeatures(at, delta, sp, G, Q, trace)
    G.pop((L - 1, L - 1), None)  # both were needed only to form the blocks below them
    G.pop((L - 1, L), None)
    return BlockFeatures(at, delta, sp, G, Q, trace, p=p, w=w, W=W[L - 1], rho=rho, u=u)


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


def _diag_tat(p: np.ndarray, w: np.ndarray, T: np.ndarray) -> np.ndarray:
    """diag(T^T A T) per sample, (B, d), for T stacked (B, C, d) and A = w (diag p - p p^T).

    w sum_i p_i (T_ik - (T^T p)_k)^2, which equals w (sum_i p_i T_ik^2 - (T^T p)_k^2) as sum p = 1
    but does not cancel when p is peaked.  For T = T_{L-1} = W_L D_{L-1} that is u of
    docs/structured.md; summed over k, tr(A T T^T).
    """
    Tc = T - np.einsum("ni,nik->nk", p, T)[:, None, :]
    return w[:, None] * np.einsum("ni,nik->nk", p, Tc * Tc)


def _layer_traces(at: list[np.ndarray], tr_m: list[np.ndarray]) -> np.ndarray:
    """trace[l-1] = sum over the block of |a~_{l-1}|^2 tr(M_l), from tr(M_l) per sample."""
    return np.array([float(np.sum(np.einsum("ni,ni->n", at[l], at[l]) * tr_m[l])) for l in range(1, len(at))])


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
    """K (r, C, C, c) from _t_gram's (r, C, c, C)."""
    return np.ascontiguousarray(G.transpose(0, 1, 3, 2))


class _KTerms(NamedTuple):
    """What the identity of docs/structured.md needs of one C x C matrix K per pair of a chunk;
    K = None stands for the identity K_L = I.  Arrays of the backend's library (NumPy arrays
    here, torch tensors in the torch backend, which calls these helpers with ``xp=torch``)."""

    K: Any  # (r, C, C, c) or None
    Kp: Any  # K p', (r, C, c)
    Ktp: Any  # K^T p, (r, C, c)
    pKp: Any  # p^T K p', (r, c)


def _k_terms(K: Any, pI: Any, pJT: Any, xp: Any = np) -> _KTerms:
    """_KTerms of K (r, C, C, c) for the chunk's softmax rows pI (r, C) and columns pJT (C, c);
    ``xp`` is the array library (numpy or torch: both have this einsum)."""
    Kp = xp.einsum("aijb,jb->aib", K, pJT)
    return _KTerms(K, Kp, xp.einsum("aijb,ai->ajb", K, pI), xp.einsum("aib,ai->ab", Kp, pI))


def _identity_terms(pI: Any, pJT: Any, pp: Any, xp: Any = np) -> _KTerms:
    """_KTerms of K = I (pp = p . p', (r, c))."""
    shape = (pI.shape[0], pI.shape[1], pJT.shape[1])
    return _KTerms(None, xp.broadcast_to(pJT, shape), xp.broadcast_to(pI[:, :, None], shape), pp)


def _tr_akak(pI: Any, pJT: Any, k: _KTerms, kt: _KTerms, xp: Any = np) -> Any:
    """tr(A K A' Kt^T) / (w w') for every pair of a chunk, (r, c), in O(C^2) per pair:

    sum_ij p_i p'_j K_ij Kt_ij - sum_i p_i (K p')_i (Kt p')_i - sum_j p'_j (K^T p)_j (Kt^T p)_j
    + (p^T K p')(p^T Kt p')   (docs/structured.md).  Kt may be I, and K only if Kt is.
    """
    if kt.K is None:  # sum_i p_i p'_i K_ii  (p . p' if K = I as well)
        t1 = kt.pKp if k.K is None else xp.einsum("aib,ai->ab", xp.einsum("aiib->aib", k.K) * pJT, pI)
    else:
        t1 = xp.einsum("aib,ai->ab", xp.einsum("aijb,jb->aib", k.K * kt.K, pJT), pI)
    t2 = xp.einsum("aib,ai->ab", k.Kp * kt.Kp, pI)
    t3 = xp.einsum("ajb,jb->ab", k.Ktp * kt.Ktp, pJT)
    return t1 - t2 - t3 + k.pKp * kt.pKp


def _pair_sum_ggn(prob: Problem, FI: BlockFeatures, FJ: BlockFeatures) -> np.ndarray:
    """GGN by the K route: out[l-1, m-1] = sum alpha_l alpha_m tr(A K_l A' K_m^T) over the pairs,
    K_L = I, K_{L-1} from the packed GEMM, K_l = T_l T_l'^T below."""
    L = prob.n_layers
    out = np.zeros((L, L))
    alphas = {l: FI.at[l] @ FJ.at[l].T for l in range(1, L + 1)}
    ww = np.outer(FI.w, FJ.w)
    pp = FI.p @ FJ.p.T
    (B, C), Bp = FI.p.shape, FJ.p.shape[0]
    omega, pos = _omega(FI.W, ones_row=False)  # (not used when L = 1: K_L = I only)
    gemm_per_pair = omega.shape[0] + (L - 2) * C * C if L >= 2 else 1  # packed K_{L-1}, T_l Grams
    per_pair = (2 * L - 1) * C * C + 8 * L * C
    chunk_outer, chunk_inner = chunk_budgets(prob)
    for rows, cols in _pair_chunks(B, Bp, gemm_per_pair, omega.size, chunk_outer):
        packed = _stacked_gram(omega[None, :, :] * FI.sp[L - 1][rows, None, :], FJ.sp[L - 1][cols]) if L >= 2 else None
        grams = {l: _t_gram(FI.T[l][rows], FJ.T[l][cols]) for l in range(1, L - 1)}
        for sr, sc in _pair_chunks(rows.stop - rows.start, cols.stop - cols.start, per_pair, 0, chunk_inner):
            rr, cc = _within(rows, sr), _within(cols, sc)
            pI, pJT = FI.p[rr], FJ.p[cc].T
            terms = {L: _identity_terms(pI, pJT, pp[rr, cc])}
            for l in range(1, L):
                K = _unpack(packed[sr, :, sc], pos) if l == L - 1 else _t_layout(grams[l][sr, :, sc])
                terms[l] = _k_terms(K, pI, pJT)
            weight = ww[rr, cc]
            for l in range(1, L + 1):
                for m in range(l, L + 1):
                    tr = _tr_akak(pI, pJT, terms[l], terms[m])
                    out[l - 1, m - 1] += np.sum(alphas[l][rr, cc] * alphas[m][rr, cc] * weight * tr)
    return out


def _pair_sum_last(prob: Problem, FI: BlockFeatures, FJ: BlockFeatures) -> tuple[float, float]:
    """Hessian blocks (L-1, L-1) and (L-1, L) by the K route (docs/structured.md), L >= 2:

    alpha^2 (w w' tr(A K A' K) + u . rho' + rho . u' + rho . rho') and
    alpha (beta w w' tr(A K A') + gamma s . s' + cross + cross'), K = K_{L-1}, summed over the pairs.
    One GEMM per chunk gives s . s' (Omega's row of ones), the packed K and E_i = sum_k W_ik a_k s_k s'_k
    (rows W_i a_n s_n after Omega diag(s_n)); a second one E'_i = sum_k W_ik s_k a'_k s'_k.
    """
    L = prob.n_layers
    W = FI.W
    C, d = W.shape
    alpha = FI.at[L - 1] @ FJ.at[L - 1].T
    beta = FI.at[L] @ FJ.at[L].T
    gamma = FI.delta[L] @ FJ.delta[L].T
    inner = FI.u @ FJ.rho.T + FI.rho @ FJ.u.T + FI.rho @ FJ.rho.T
    ww = np.outer(FI.w, FJ.w)
    pp = FI.p @ FJ.p.T
    p_dJ = FI.p @ FJ.delta[L].T  # p . delta'
    dI_p = FI.delta[L] @ FJ.p.T  # delta . p'
    sI, sJ = FI.sp[L - 1], FJ.sp[L - 1]
    asJ = FJ.at[L][:, :d] * sJ  # a' s'
    omega, pos = _omega(W, ones_row=True)
    n_k = omega.shape[0]
    omega = np.vstack([omega, W])
    total = np.zeros(2)
    per_pair = 3 * C * C + 16 * C
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
            k = _k_terms(_unpack(R, pos), pI, pJT)
            t_kk = _tr_akak(pI, pJT, k, k)
            t_ki = _tr_akak(pI, pJT, k, _identity_terms(pI, pJT, pp[rr, cc]))
            E = R[:, n_k:, :]
            cross = FI.w[rr, None] * (np.einsum("aib,ai->ab", E * FJ.delta[L][cc].T, pI)
                                      - p_dJ[rr, cc] * np.einsum("aib,ai->ab", E, pI))
            cross += FJ.w[None, cc] * (np.einsum("aib,ib->ab", Ep * FI.delta[L][rr, :, None], pJT)
                                       - dI_p[rr, cc] * np.einsum("aib,ib->ab", Ep, pJT))
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


def moments(prob: Problem, progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unnormalised moments per parameter block, as the C++ core returns them.

    (trace[l] = sum_n tr H_n^{ll}, blocks[l, m] = sum_{n,n'} <H_n^{lm}, H_n'^{lm}> for l <= m).
    """
    N, B, L = prob.n_samples, prob.batch_size, prob.n_layers
    bounds = [(lo, min(lo + B, N)) for lo in range(0, N, B)]
    nb = len(bounds)
    group = prob.group_blocks

    def features(k: int) -> BlockFeatures:
        lo, hi = bounds[k]
        return block_features(prob, np.asarray(prob.X[lo:hi], dtype=np.float64), label_rows(prob, lo, hi))

    block_trace = np.zeros((nb, L))
    row_sum = np.zeros((nb, L, L))  # row i: sum over j >= i of the pair sums, j increasing, off-diagonal twice
    done, total_pairs = 0, nb * (nb + 1) // 2
    for g0 in range(0, nb, group):
        rows = {i: features(i) for i in range(g0, min(g0 + group, nb))}
        for i in rows:
            block_trace[i] = rows[i].trace
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
    trace, blocks = np.zeros(L), np.zeros((L, L))
    for k in range(nb):
        trace += block_trace[k]
        blocks += row_sum[k]
    return trace, blocks
