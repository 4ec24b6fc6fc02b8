"""The K route of the pair sum (docs/structured.md), shifted to the reference classes
(docs/numerics.md section 3): every block of the GGN, and the Hessian's blocks (L-1, L-1) and
(L-1, L) when L >= 2.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from .._planning.blocks import CPU_CHUNK_VALUES
from .._problem.problem import Problem
from .features import BlockFeatures
from .namespace import Arrays
from .softmax import _float


def chunk_budgets(prob: Problem) -> tuple[float, float]:
    """(values of a chunk's GEMM outputs, values of a sub-chunk's elementwise work) on the K
    route: the plan's (``prob.chunks``, :func:`wsbound_fast._planning.blocks.plan_python`), else the
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


def _omega(W: Any, ones_row: bool, arr: Arrays) -> tuple[Any, Any]:
    """Omega, the rows W_i * W_j (i <= j, i-major) of W = W_L (C, d), after a row of ones if
    ones_row; and pos (C * C,), the row of Omega that holds (i, j) at i C + j (see _unpack)."""
    C, d = W.shape
    i, j = np.triu_indices(C)
    pos = np.empty((C, C), dtype=np.int64)
    pos[i, j] = pos[j, i] = np.arange(i.size) + int(ones_row)
    xp = arr.xp
    rows = W[arr.from_host(i, xp.int64)] * W[arr.from_host(j, xp.int64)]
    if ones_row:
        rows = xp.concat([xp.ones((1, d), dtype=W.dtype, device=arr.device), rows], axis=0)
    return rows, arr.from_host(pos.reshape(-1), xp.int64)


def _stacked_gram(YI: Any, sJ: Any, arr: Arrays) -> Any:
    """out[n, q, n'] = Y_n[q] . s_n' for Y stacked (r, q, d) and s (c, d): one GEMM in the compute
    dtype, (r, q, c) in the accumulation dtype.

    With Y_n = Omega diag(s_n) that is the packed K_{L-1} = Z Omega^T of docs/structured.md
    (Z = s_n * s_n'), without forming Z: the same C(C+1)/2 d multiply-adds per pair."""
    r, q, d = YI.shape
    return arr.gram(YI.reshape(r * q, d), sJ).reshape(r, q, sJ.shape[0])


def _unpack(packed: Any, pos: Any, xp: Any) -> Any:
    """The symmetric K (r, C, C, c) from its packed rows (r, q, c): K[:, i, j] = packed[:, pos[i C + j]]."""
    C = math.isqrt(pos.shape[0])
    return xp.take(packed, pos, axis=1).reshape(packed.shape[0], C, C, packed.shape[2])


def _t_gram(TI: Any, TJ: Any, arr: Arrays) -> Any:
    """G[n, i, n', j] = (T_n T_n'^T)[i, j] from stacked T, (r, C, d) and (c, C, d): (r, C, c, C), the
    GEMM in the compute dtype, G in the accumulation dtype; K of a sub-chunk is _t_layout(G[rows, :, cols])."""
    r, C, d = TI.shape
    return arr.gram(TI.reshape(r * C, d), TJ.reshape(-1, d)).reshape(r, C, TJ.shape[0], C)


def _t_layout(G: Any, arr: Arrays) -> Any:
    """K (r, C, C, c) from _t_gram's (r, C, c, C), always a new array (_shift works in place)."""
    return arr.copy_c(arr.xp.permute_dims(G, (0, 1, 3, 2)))


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


def _refs(rI: Any, rJ: Any, pI: Any, pJT: Any, pnpn: Any, xp: Any) -> _Refs:
    """_Refs of a chunk: rI (r,), rJ (c,), its softmax rows pI (r, C) and columns pJT (C, c)."""
    dev = array_api_compat.device(rI)
    aI, aJ = xp.arange(rI.shape[0], device=dev), xp.arange(rJ.shape[0], device=dev)
    return _Refs(rI, rJ, aI, aJ, _float(rI[:, None] == rJ[None, :], pI, xp), pJT[rI], pI[:, rJ], pnpn)


def _ref_rows(p: Any, r: Any, q: Any, xp: Any) -> tuple[Any, Any]:
    """(p with p_r = 0, phat = Z_r^T p = p with p_r replaced by -q) of a block's rows (B, C)."""
    cols = xp.arange(p.shape[1], device=array_api_compat.device(p))
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
    chunk; S = None stands for S_I = Z_r Z_r'^T (K_L = I shifted)."""

    K: Any  # S (r, C, C, c) or None
    Kp: Any  # S p', (r, C, c)
    Ktp: Any  # S^T p, (r, C, c)
    pKp: Any  # p^T S p', (r, c)


def _k_terms(K: Any, pI: Any, pJT: Any, xp: Any) -> _KTerms:
    """_KTerms of S (r, C, C, c) for the chunk's softmax rows pI (r, C) and columns pJT (C, c);
    ``xp`` is the array namespace (einsum: see namespace.py)."""
    Kp = xp.einsum("aijb,jb->aib", K, pJT)
    return _KTerms(K, Kp, xp.einsum("aijb,ai->ajb", K, pI), xp.einsum("aib,ai->ab", Kp, pI))


def _identity_terms(hI: Any, hJT: Any, hh: Any, rf: _Refs) -> _KTerms:
    """_KTerms of S_I = Z_r Z_r'^T = I - 1 e_r^T - e_r' 1^T + [r = r'] 1 1^T from phat = Z_r^T p
    (p with p_r replaced by -q), rows hI (r, C) and columns hJT (C, c), and hh = phat . phat':
    S_I p' = phat' - phat'_r 1, S_I^T p = phat - phat_r' 1, p^T S_I p' = phat . phat'."""
    return _KTerms(None, hJT[None, :, :] - hJT[rf.rI][:, None, :], hI[:, :, None] - hI[:, rf.rJ][:, None, :], hh)


def _tr_akak(pI: Any, pJT: Any, k: _KTerms, kt: _KTerms, rf: _Refs, xp: Any) -> Any:
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


def _tr_hkhk(hI: Any, hJT: Any, K: Any, Kt: Any, xp: Any) -> Any:
    """tr(A K A' Kt^T) for A = diag(h) (mse, bce; docs/design.md, "Losses") for every pair of a
    chunk, (r, c): sum_ij h_i h'_j K_ij Kt_ij, with rows hI (r, C) and columns hJT (C, c); None
    stands for K_L = I (Kt may be I, and K only if Kt is)."""
    if Kt is None:
        if K is None:
            return hI @ hJT  # sum_i h_i h'_i
        return xp.einsum("aib,ai->ab", xp.einsum("aiib->aib", K) * hJT, hI)
    return xp.einsum("aib,ai->ab", xp.einsum("aijb,jb->aib", K * Kt, hJT), hI)


def _pair_sum_ggn(prob: Problem, arr: Arrays, FI: BlockFeatures, FJ: BlockFeatures) -> Any:
    """GGN by the K route: out[l-1, m-1] = sum alpha_l alpha_m tr(A K_l A' K_m^T) over the pairs,
    K_L = I, K_{L-1} from the packed GEMM, K_l = T_l T_l'^T below; for cross-entropy each K is
    shifted to the pair's reference classes (_tr_akak), for a diagonal A (mse, bce) it enters
    sum_ij h_i h'_j K_ij K~_ij as it is (_tr_hkhk); (L, L) in the accumulation dtype."""
    xp, acc = arr.xp, arr.to_acc
    L = prob.n_layers
    out = arr.zeros((L, L))
    diagonal = FI.h is not None  # docs/design.md, "Losses"
    alphas = {l: arr.gram(FI.at[l], FJ.at[l]) for l in range(1, L + 1)}
    if diagonal:
        hI_all, hJ_all = acc(FI.h), acc(FJ.h)
    else:
        pI_all, pJ_all = acc(FI.p), acc(FJ.p)
        ww = acc(FI.w)[:, None] * acc(FJ.w)[None, :]
        (pnI, hI), (pnJ, hJ) = _ref_rows(pI_all, FI.r, acc(FI.q), xp), _ref_rows(pJ_all, FJ.r, acc(FJ.q), xp)
        pnpn, hh = pnI @ pnJ.T, hI @ hJ.T
    B, C, Bp = FI.at[L].shape[0], FI.W.shape[0], FJ.at[L].shape[0]
    omega, pos = _omega(FI.W, False, arr)  # (not used when L = 1: K_L = I only)
    gemm_per_pair = omega.shape[0] + (L - 2) * C * C if L >= 2 else 1  # packed K_{L-1}, T_l Grams
    per_pair = (2 * L - 1) * C * C + _vector_values(L, C)
    chunk_outer, chunk_inner = chunk_budgets(prob)
    for rows, cols in _pair_chunks(B, Bp, gemm_per_pair, omega.shape[0] * omega.shape[1], chunk_outer):
        packed = _stacked_gram(omega[None, :, :] * FI.sp[L - 1][rows, None, :], FJ.sp[L - 1][cols], arr) \
            if L >= 2 else None
        grams = {l: _t_gram(FI.T[l][rows], FJ.T[l][cols], arr) for l in range(1, L - 1)}
        for sr, sc in _pair_chunks(rows.stop - rows.start, cols.stop - cols.start, per_pair, 0, chunk_inner):
            rr, cc = _within(rows, sr), _within(cols, sc)
            Ks = {l: _unpack(packed[sr, :, sc], pos, xp) if l == L - 1 else _t_layout(grams[l][sr, :, sc], arr)
                  for l in range(1, L)}
            if diagonal:
                hd, hdT = hI_all[rr], hJ_all[cc].T
                for l in range(1, L + 1):
                    for m in range(l, L + 1):
                        tr = _tr_hkhk(hd, hdT, Ks.get(l), Ks.get(m), xp)
                        out[l - 1, m - 1] += xp.sum(alphas[l][rr, cc] * alphas[m][rr, cc] * tr)
                continue
            pI, pJT = pI_all[rr], pJ_all[cc].T
            rf = _refs(FI.r[rr], FJ.r[cc], pI, pJT, pnpn[rr, cc], xp)
            terms = {L: _identity_terms(hI[rr], hJ[cc].T, hh[rr, cc], rf)}
            for l in range(1, L):
                terms[l] = _k_terms(_shift(Ks[l], rf), pI, pJT, xp)
            weight = ww[rr, cc]
            for l in range(1, L + 1):
                for m in range(l, L + 1):
                    tr = _tr_akak(pI, pJT, terms[l], terms[m], rf, xp)
                    out[l - 1, m - 1] += xp.sum(alphas[l][rr, cc] * alphas[m][rr, cc] * weight * tr)
    return out


def _pair_sum_last(prob: Problem, arr: Arrays, FI: BlockFeatures, FJ: BlockFeatures) -> tuple[Any, Any]:
    """Hessian blocks (L-1, L-1) and (L-1, L) by the K route (docs/structured.md), L >= 2:

    alpha^2 (w w' tr(A K A' K) + u . rho' + rho . u' + rho . rho') and
    alpha (beta w w' tr(A K A') + gamma s . s' + cross + cross'), K = K_{L-1}, summed over the pairs
    (two 0-d arrays in the accumulation dtype).
    One GEMM per chunk gives s . s' (Omega's row of ones), the packed K and E_i = sum_k W_ik a_k s_k s'_k
    (rows W_i a_n s_n after Omega diag(s_n)); a second one E'_i = sum_k W_ik s_k a'_k s'_k.
    Shifted to the reference classes (docs/numerics.md sections 2-3): K by _shift, and the cross
    terms through A delta' = w p o (Delta - Dbar 1), Delta = delta' - delta'_r 1 (r of n),
    Dbar = sum_{i != r} p_i Delta_i (and the mirror term with r' of n').
    """
    xp, acc = arr.xp, arr.to_acc
    L = prob.n_layers
    W = FI.W
    C, d = W.shape
    alpha = arr.gram(FI.at[L - 1], FJ.at[L - 1])
    beta = arr.gram(FI.at[L], FJ.at[L])
    gamma = arr.gram(FI.delta[L], FJ.delta[L])
    inner = arr.gram(FI.u, FJ.rho) + arr.gram(FI.rho, FJ.u) + arr.gram(FI.rho, FJ.rho)
    diagonal = FI.h is not None  # A = diag(h): no shift, no rank-one terms (docs/design.md, "Losses")
    dI_all, dJ_all = acc(FI.delta[L]), acc(FJ.delta[L])
    if diagonal:
        hdI_all, hdJ_all = acc(FI.h), acc(FJ.h)
    else:
        wI, wJ, qI, qJ = acc(FI.w), acc(FJ.w), acc(FI.q), acc(FJ.q)
        ww = wI[:, None] * wJ[None, :]
        pI_all, pJ_all = acc(FI.p), acc(FJ.p)
        (pnI, hI), (pnJ, hJ) = _ref_rows(pI_all, FI.r, qI, xp), _ref_rows(pJ_all, FJ.r, qJ, xp)
        hh = hI @ hJ.T  # p^T S_I p'
        pn_dJ = pnI @ dJ_all.T  # sum_{i != r} p_i delta'_i
        dI_pn = dI_all @ pnJ.T  # sum_{i != r'} delta_i p'_i
    sI, sJ = FI.sp[L - 1], FJ.sp[L - 1]
    asJ = FJ.at[L][:, :d] * sJ  # a' s'
    omega, pos = _omega(W, True, arr)
    n_k = omega.shape[0]
    omega = xp.concat([omega, W], axis=0)
    total = arr.zeros((2,))
    per_pair = 3 * C * C + _vector_values(2, C)
    gemm_per_pair, gemm_per_row = omega.shape[0] + C, omega.shape[0] * d + C * d  # [s . s'; K; E] and E', their left sides
    chunk_outer, chunk_inner = chunk_budgets(prob)
    for rows, cols in _pair_chunks(sI.shape[0], sJ.shape[0], gemm_per_pair, gemm_per_row, chunk_outer):
        YI = omega[None, :, :] * sI[rows, None, :]
        YI[:, n_k:, :] *= FI.at[L][rows, None, :d]  # W diag(a_n s_n)
        R_all = _stacked_gram(YI, sJ[cols], arr)  # [s . s'; packed K; E]
        Ep_all = _stacked_gram(W[None, :, :] * sI[rows, None, :], asJ[cols], arr)
        for sr, sc in _pair_chunks(R_all.shape[0], R_all.shape[2], per_pair, 0, chunk_inner):
            rr, cc = _within(rows, sr), _within(cols, sc)
            R, Ep = R_all[sr, :, sc], Ep_all[sr, :, sc]
            if diagonal:
                K = _unpack(R, pos, xp)
                hI_, hJT_ = hdI_all[rr], hdJ_all[cc].T
                t_kk = _tr_hkhk(hI_, hJT_, K, K, xp)
                t_ki = _tr_hkhk(hI_, hJT_, K, None, xp)
                E = R[:, n_k:, :]
                # (G_n delta')(Q'^T a) = E . (A delta') and its mirror E' . (A' delta)
                cross = xp.einsum("aib,ai,ib->ab", E, hI_, dJ_all[cc].T) + xp.einsum("aib,ib,ai->ab", Ep, hJT_,
                                                                                   dI_all[rr])
                a = alpha[rr, cc]
                total[0] += xp.sum(a * a * (t_kk + inner[rr, cc]))
                total[1] += xp.sum(a * (beta[rr, cc] * t_ki + gamma[rr, cc] * R[:, 0, :] + cross))
                continue
            pI, pJT = pI_all[rr], pJ_all[cc].T
            rf = _refs(FI.r[rr], FJ.r[cc], pI, pJT, None, xp)
            k = _k_terms(_shift(_unpack(R, pos, xp), rf), pI, pJT, xp)
            t_kk = _tr_akak(pI, pJT, k, k, rf, xp)
            t_ki = _tr_akak(pI, pJT, k, _identity_terms(hI[rr], hJ[cc].T, hh[rr, cc], rf), rf, xp)
            E = R[:, n_k:, :]
            dJT, dI = dJ_all[cc].T, dI_all[rr]
            d_r = dJT[rf.rI]  # delta'_r, (r, c)
            Dl = dJT[None, :, :] - d_r[:, None, :]
            Dbar = pn_dJ[rr, cc] - qI[rr, None] * d_r
            Dl *= E
            cross = wI[rr, None] * (xp.einsum("aib,ai->ab", Dl, pI) - Dbar * xp.einsum("aib,ai->ab", E, pI))
            d_r = dI[:, rf.rJ]  # delta_r', (r, c)
            Dl = dI[:, :, None] - d_r[:, None, :]
            Dbar = dI_pn[rr, cc] - qJ[None, cc] * d_r
            Dl *= Ep
            cross += wJ[None, cc] * (xp.einsum("aib,ib->ab", Dl, pJT) - Dbar * xp.einsum("aib,ib->ab", Ep, pJT))
            a, w2 = alpha[rr, cc], ww[rr, cc]
            total[0] += xp.sum(a * a * (w2 * t_kk + inner[rr, cc]))
            total[1] += xp.sum(a * (beta[rr, cc] * w2 * t_ki + gamma[rr, cc] * R[:, 0, :] + cross))
    return total[0], total[1]
