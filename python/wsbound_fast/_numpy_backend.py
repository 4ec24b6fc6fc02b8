"""NumPy fallback: the same streamed algorithm as the C++ core, vectorised per block.

Structure (mirrors cpp/wsbound/engine.cpp):

1. The samples are cut into blocks of ``batch_size``.  For a block, :func:`block_features`
   computes every per-sample quantity of DESIGN.md section 3 (augmented inputs, deltas,
   sigma', the blocks G_lm = T_ml^T M_m, the dense Q_lm and the cross-term factors)
   and the block's share of tr(H).
2. For every block pair I <= J, :func:`pair_sum` contracts the two blocks' features
   into sum_{n in I, n' in J} sum_{l<=m} c_lm kappa_lm(n, n') with Gram matrices.
3. Partial sums are added in a fixed order: blocks for tr(H), block pairs (I, J)
   row by row for tr(H^2), the off-diagonal pairs counted twice by symmetry.

Only blocks of features (never an N x N or P x P array) are held; at most
``2 * group_blocks`` blocks at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ._activations import evaluate
from ._validate import Problem


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
    X: dict[int, np.ndarray]  # X[l]: (a_l * G_{l,l+1}) flattened, (B, d_l * d_{l+1})
    Y: dict[int, np.ndarray]  # Y[l]: (sigma'_l outer delta_{l+1}) flattened, (B, d_l * d_{l+1})
    trace: np.ndarray  # trace[l-1]: sum over the block's samples of |a~_{l-1}|^2 tr(M_l)
    # Structured path (see cpp/wsbound/features.hpp): Vt[l] stacks V_l^T per sample, (B, C, d_l),
    # V_L = S with A = S S^T, V_l = D_l W_{l+1}^T V_{l+1}; GGN: every l, Hessian: l = L - 1, with
    # M_{L-1} = V V^T + diag(rho) and u2 the squared row norms of V_{L-1}.
    Vt: dict[int, np.ndarray] | None = None
    rho: np.ndarray | None = None
    u2: np.ndarray | None = None


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
    M: list[np.ndarray] = [np.empty(0)] * (L + 1)
    C = p.shape[1]
    M[L] = w[:, None, None] * (np.einsum("ni,ij->nij", p, np.eye(C)) - p[:, :, None] * p[:, None, :])
    ggn_fast = prob.structured and not prob.hessian
    lowrank = prob.structured and prob.hessian and L >= 2
    Vt: dict[int, np.ndarray] = {}
    if ggn_fast or lowrank:  # S^T = sqrt(w) (diag sqrt p - sqrt p p^T)
        q = np.sqrt(p)
        Vt[L] = np.sqrt(w)[:, None, None] * (np.einsum("ni,ij->nij", q, np.eye(C)) - q[:, :, None] * p[:, None, :])
    if ggn_fast:
        for l in range(L - 1, 0, -1):
            Vt[l] = (Vt[l + 1] @ W[l]) * sp[l][:, None, :]
        trace = np.array([float(np.sum(np.einsum("ni,ni->n", at[l], at[l]) * np.einsum("nij,nij->n", Vt[l], Vt[l])))
                          for l in range(1, L + 1)])
        return BlockFeatures(at, delta, sp, {}, {}, {}, {}, trace, Vt)
    rho = u2 = None
    for l in range(L - 1, 0, -1):
        Wn = W[l]  # W_{l+1}, (d_{l+1}, d_l)
        g = delta[l + 1] @ Wn
        delta[l] = sp[l] * g
        if lowrank and l == L - 1:  # M_{L-1} = V V^T + diag(rho)
            rho = spp[l] * g
            Vt[l] = (Vt[l + 1] @ Wn) * sp[l][:, None, :]
            u2 = np.einsum("nik,nik->nk", Vt[l], Vt[l])
            if L == 2:
                continue  # nothing below needs the dense d x d matrix
        WMW = Wn.T @ M[l + 1] @ Wn  # (B, d_l, d_l)
        Ml = sp[l][:, :, None] * WMW * sp[l][:, None, :]
        if prob.hessian:
            idx = np.arange(Ml.shape[1])
            Ml[:, idx, idx] += spp[l] * g
        M[l] = Ml
    def tr_m(l: int) -> np.ndarray:
        if M[l].size == 0:  # low-rank M_1 of a one-hidden-layer net
            return np.einsum("nik,nik->n", Vt[l], Vt[l]) + rho.sum(axis=1)
        return np.trace(M[l], axis1=1, axis2=2)

    trace = np.array([float(np.sum(np.einsum("ni,ni->n", at[l], at[l]) * tr_m(l))) for l in range(1, L + 1)])
    G: dict[tuple[int, int], np.ndarray] = {}
    for m in range(1, L + 1):
        Gc = M[m]
        G[m, m] = Gc.reshape(B, -1)
        for l in range(m - 1, 0, -1):  # G_{l,m} = D_l W_{l+1}^T G_{l+1,m}
            Gc = sp[l][:, :, None] * (W[l].T @ Gc)
            G[l, m] = Gc.reshape(B, -1)
    Q: dict[tuple[int, int], np.ndarray] = {}
    Xc: dict[int, np.ndarray] = {}
    Yc: dict[int, np.ndarray] = {}
    if prob.hessian:
        for l in range(1, L - 1):  # Q_{l,l+1} = D_l;  Q_{l,m} = D_{m-1} W_{m-1} Q_{l,m-1}
            Qc = W[l][None, :, :] * sp[l][:, None, :]  # W_{l+1} D_l, (B, d_{l+1}, d_l)
            Q[l, l + 2] = Qc = sp[l + 1][:, :, None] * Qc
            for m in range(l + 3, L + 1):
                Q[l, m] = Qc = sp[m - 1][:, :, None] * (W[m - 2] @ Qc)
        for l in range(1, L):
            d_l, d_m = W[l].shape[1], W[l].shape[0]
            a_l = at[l + 1][:, :d_l]
            Xc[l] = (a_l[:, :, None] * G[l, l + 1].reshape(B, d_l, d_m)).reshape(B, -1)
            Yc[l] = (sp[l][:, :, None] * delta[l + 1][:, None, :]).reshape(B, -1)
    if lowrank:
        del G[L - 1, L - 1]  # contracted through Vt, rho, u2 instead
    return BlockFeatures(at, delta, sp, G, Q, Xc, Yc, trace, Vt, rho, u2)


def _dense_cross(bI: np.ndarray, GI: np.ndarray, dJ: np.ndarray, QJ: np.ndarray) -> np.ndarray:
    """cross[n, n'] = b_n^T Q_{n'} G_n delta_{n'} for dense Q (l < m - 1)."""
    B, Bp = bI.shape[0], dJ.shape[0]
    d_l = QJ.shape[2]
    P1 = np.matmul(bI, QJ)  # (B', B, d_l): [n', n, r] = sum_e b_n[e] Q_{n'}[e, r]
    P2 = GI.reshape(B * d_l, -1) @ dJ.T  # (B*d_l, B'): [n r, n'] = (G_n delta_{n'})[r]
    return np.einsum("knr,nrk->nk", P1, P2.reshape(B, d_l, Bp))


def _chunk_rows(B: int, Bp: int, C: int, layers: int) -> int:
    """Rows of I per chunk of the structured contraction (as the C++ core)."""
    return max(1, min(B, int(4.0e6 / max(layers, 1) / (C * C * max(Bp, 1)))))


def _psi(VI: np.ndarray, VJ: np.ndarray) -> np.ndarray:
    """Psi[n, i, n', j] = (V_n^T V_n')[i, j] from stacked V^T, (B, C, d) and (B', C, d)."""
    B, C, d = VI.shape
    return (VI.reshape(B * C, d) @ VJ.reshape(-1, d).T).reshape(B, C, VJ.shape[0], C)


def _pair_sum_ggn(prob: Problem, FI: BlockFeatures, FJ: BlockFeatures) -> np.ndarray:
    """GGN: out[l, m] = sum alpha_l beta_m <Psi_l, Psi_m>."""
    assert FI.Vt is not None and FJ.Vt is not None
    L = prob.n_layers
    out = np.zeros((L, L))
    alphas = {l: FI.at[l] @ FJ.at[l].T for l in range(1, L + 1)}
    B, C = FI.Vt[L].shape[:2]
    step = _chunk_rows(B, FJ.Vt[L].shape[0], C, L)
    for r0 in range(0, B, step):
        rows = slice(r0, r0 + step)
        psi = {l: _psi(FI.Vt[l][rows], FJ.Vt[l]) for l in range(1, L + 1)}
        for l in range(1, L + 1):
            for m in range(l, L + 1):
                K = np.einsum("aibj,aibj->ab", psi[l], psi[m])
                out[l - 1, m - 1] += np.sum(alphas[l][rows] * alphas[m][rows] * K)
    return out


def _lowrank_diag_term(FI: BlockFeatures, FJ: BlockFeatures, l: int, alpha: np.ndarray) -> float:
    """<M, M'> = |V^T V'|^2 + sum rho' |V_k|^2 + sum rho |V'_k|^2 + rho . rho', weighted by alpha^2."""
    assert FI.Vt is not None and FJ.Vt is not None
    inner = FI.u2 @ FJ.rho.T + FI.rho @ FJ.u2.T + FI.rho @ FJ.rho.T
    B, C = FI.Vt[l].shape[:2]
    total = 0.0
    step = _chunk_rows(B, FJ.Vt[l].shape[0], C, 1)
    for r0 in range(0, B, step):
        rows = slice(r0, r0 + step)
        psi = _psi(FI.Vt[l][rows], FJ.Vt[l])
        K = np.einsum("aibj,aibj->ab", psi, psi)
        total += float(np.sum(alpha[rows] ** 2 * (K + inner[rows])))
    return total


def pair_sum(prob: Problem, FI: BlockFeatures, FJ: BlockFeatures) -> np.ndarray:
    """out[l-1, m-1] = sum_{n in I, n' in J} kappa_lm(n, n') for l <= m (zero below the diagonal)."""
    L = prob.n_layers
    if prob.structured and not prob.hessian:
        return _pair_sum_ggn(prob, FI, FJ)
    lowrank = prob.structured and L >= 2
    out = np.zeros((L, L))
    for l in range(1, L + 1):
        alpha = FI.at[l] @ FJ.at[l].T
        for m in range(l, L + 1):
            if l == m and lowrank and l == L - 1:
                out[l - 1, m - 1] = _lowrank_diag_term(FI, FJ, l, alpha)
                continue
            KG = FI.G[l, m] @ FJ.G[l, m].T
            if l == m:
                out[l - 1, m - 1] = np.sum(alpha * alpha * KG)
                continue
            inner = (FI.at[m] @ FJ.at[m].T) * KG
            if prob.hessian:
                gamma = FI.delta[m] @ FJ.delta[m].T
                if m == l + 1:
                    inner += gamma * (FI.sp[l] @ FJ.sp[l].T)
                    inner += FI.X[l] @ FJ.Y[l].T + FI.Y[l] @ FJ.X[l].T
                else:
                    QI, QJ = FI.Q[l, m], FJ.Q[l, m]
                    inner += gamma * (QI.reshape(QI.shape[0], -1) @ QJ.reshape(QJ.shape[0], -1).T)
                    d_prev = QI.shape[1]
                    inner += _dense_cross(FI.at[m][:, :d_prev], FI.G[l, m], FJ.delta[m], QJ)
                    inner += _dense_cross(FJ.at[m][:, :d_prev], FJ.G[l, m], FI.delta[m], QI).T
            out[l - 1, m - 1] = np.sum(alpha * inner)
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
        for i, f in rows.items():
            block_trace[i] = f.trace
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
    trace, blocks = np.zeros(L), np.zeros((L, L))
    for k in range(nb):
        trace += block_trace[k]
        blocks += row_sum[k]
    return trace, blocks
