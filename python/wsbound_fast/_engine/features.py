"""Per-sample features of one block of samples (docs/design.md, "Per-sample features")."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._problem.problem import PART_ALL, PART_BIAS, PART_NONE, PART_WEIGHT, Problem
from .activations import evaluate
from .losses import _U, a_dense, a_diagonal, delta_error, gamma, output, tat_diagonal
from .namespace import Arrays, Weights


@dataclass
class BlockFeatures:
    """Per-sample features of one block of B samples (index 0 of every array is n), on the engine's device;
    per-sample values in the compute dtype, the block sums ``trace``, ``trace_abs``, ``norms`` in the
    accumulation dtype.

    Layers are numbered 1..L as in docs/design.md; index 0 of the lists is unused.
    """

    at: list[Any]  # at[l]: augmented input of layer l, (B, d_{l-1} [+1])
    delta: list[Any]  # delta[l]: dloss/dz_l, (B, d_l)
    sp: list[Any]  # sp[l]: sigma'(z_l), (B, d_l), l < L
    G: dict[tuple[int, int], Any]  # G[l, m]: (B, d_l * d_m) flattened row-major, l <= m
    Q: dict[tuple[int, int], Any]  # Q[l, m]: (B, d_{m-1}, d_l), l < m - 1 (full Hessian)
    trace: Any  # trace[l-1]: sum over the block's samples of |a~_{l-1}|^2 tr(M_l)
    # Structured path (docs/structured.md): p = softmax(z_L) and w = sum of the label row
    # (A = w (diag p - p p^T)); W = W_L, (C, d_{L-1}), the same array for every block.
    # GGN: T[l] = T_{L,l} = dz_L/dz_l stacked per sample, (B, C, d_l), l <= L - 2.
    # Hessian (L >= 2): M_{L-1} = V V^T + diag(rho), u_k = |V_k|^2 (V = D_{L-1} W_L^T S, A = S S^T);
    # G[L-1, L-1] and G[L-1, L] are not kept.
    p: Any | None = None
    w: Any | None = None
    W: Any | None = None
    T: dict[int, Any] | None = None
    rho: Any | None = None
    u: Any | None = None
    # Structured path: r = argmax z_L (the reference class, docs/numerics.md section 1), int64 (B,),
    # and q = 1 - p_r (B,), from the non-reference exponentials.
    r: Any | None = None
    q: Any | None = None
    # Structured path, diagonal losses (mse, bce): h = the diagonal of A per sample, (B, C)
    # (then p, w, r and q are None).
    h: Any | None = None
    # Magnitudes for the rounding allowances (docs/numerics.md section 4), the block's sums:
    # trace_abs[l-1] = sum_n |a~_{l-1}|^2 sum_k |(M_l)_kk|; norms[l-1, m-1] = sum_n nu_n^{lm} (l <= m).
    trace_abs: Any | None = None
    norms: Any | None = None


def block_features(prob: Problem, arr: Arrays, net: Weights, Xb: Any, Yb: Any) -> BlockFeatures:
    """Features of one block; Xb is (B, d_0), Yb is (B, C) label rows, both on ``arr``'s device in
    its compute dtype, as are the weights ``net``."""
    xp = arr.xp
    W, bias, L = net.W, net.b, prob.n_layers
    B = Xb.shape[0]
    none = xp.empty((0,), dtype=arr.dtype, device=arr.device)
    at: list[Any] = [none] * (L + 1)
    sp: list[Any] = [none] * (L + 1)
    spp: list[Any] = [none] * (L + 1)
    delta: list[Any] = [none] * (L + 1)
    a = Xb
    z = Xb
    u_feat = 2.0 ** -24 if arr.dtype == xp.float32 else _U  # the unit roundoff of the features
    fwd_err = None  # diagonal losses, Hessian: the forward error bound of z_l (docs/numerics.md section 5)
    track = prob.diagonal and prob.hessian and L >= 2
    ea: list[Any] = [none] * (L + 1)  # ea[l] >= |error of a~_{l-1}|_2 per sample (section 4; 0 for l = 1)
    ea[1] = xp.zeros((B,), dtype=arr.dtype, device=arr.device)  # x is exact
    for l in range(1, L + 1):
        b = bias[l - 1]
        at[l] = a if b is None else xp.concat([a, xp.ones((B, 1), dtype=a.dtype, device=arr.device)], axis=1)
        if track:
            fwd_err = _forward_error(W[l - 1], b, at[l], sp[l - 1], fwd_err, xp)
        z = a @ W[l - 1].T
        if b is not None:
            z += b
        if l < L:
            a, sp[l], spp[l] = evaluate(prob.activations[l - 1], z, arr)
            ea[l + 1] = _activation_error(W[l - 1], b, at[l], ea[l], sp[l], a, u_feat, xp)
    u_pair = 2.0 ** -24 if getattr(prob, "f32", False) or arr.dtype == xp.float32 else _U
    c_fold, c_trace = _fold(W, u_feat, u_pair)
    out = output(prob, z, Yb, xp)
    sm, w = out.sm, out.w
    p = None if sm is None else sm.p
    r, q = (None, None) if sm is None else (sm.r, sm.q)
    delta[L] = out.delta
    at_sq = [none] + [xp.sum(at[l] * at[l], axis=1) for l in range(1, L + 1)]
    # Parameter subset (docs/design.md, "Parameter subsets"): the traces and the pair sums see only
    # the columns of a~_{l-1} in the set (at_sel); the magnitudes stay the whole model's, which
    # bound the submatrix's blocks too and the product (run over the whole model) needs.
    at_sel, sq_sel = at, at_sq
    if prob.partial:
        at_sel = [none] + [_masked(at[l], prob.parts[l - 1], bias[l - 1] is not None, arr) for l in range(1, L + 1)]
        sq_sel = [none] + [xp.sum(at_sel[l] * at_sel[l], axis=1) for l in range(1, L + 1)]
    if prob.structured and not prob.hessian:  # GGN, K route: T_{L-1} = W_L D_{L-1}, T_l = T_{l+1} W_{l+1} D_l
        T: dict[int, Any] = {}
        tr_m = [none] * (L + 1)
        tr_abs = [none] * (L + 1)
        dA = a_diagonal(out, xp)
        tr_m[L], tr_abs[L] = xp.sum(dA, axis=1), xp.sum(xp.abs(dA), axis=1)  # tr(A)
        Tl = none
        for l in range(L - 1, 0, -1):
            Tl = (W[L - 1][None, :, :] if l == L - 1 else Tl @ W[l]) * sp[l][:, None, :]
            dg = tat_diagonal(out, Tl, xp)
            tr_m[l], tr_abs[l] = xp.sum(dg, axis=1), xp.sum(xp.abs(dg), axis=1)
            if l <= L - 2:
                T[l] = Tl
        nu, dnu = nu_ggn(at_sq, tr_m, xp, ea)
        norms = _sum_nu({k: v + c_fold * dnu[k] for k, v in nu.items()}, L, arr)
        trace_abs = _layer_traces(at_sq, tr_abs, arr) + _layer_traces(_sq_error(at_sq, ea, c_trace, xp), tr_abs, arr)
        return BlockFeatures(at_sel, delta, sp, {}, {}, _layer_traces(sq_sel, tr_m, arr), p=p, w=w, W=W[L - 1], T=T,
                             r=r, q=q, h=out.h, trace_abs=trace_abs, norms=norms)
    M: list[Any] = [none] * (L + 1)
    M[L] = a_dense(out, xp)
    kroute = prob.structured and L >= 2  # Hessian blocks (L-1, L-1) and (L-1, L) by the K route
    rho = u = None
    G_next: dict[int, Any] = {}  # G_{l,l+1}, formed on the way to M_l
    for l in range(L - 1, 0, -1):
        Wn = W[l]  # W_{l+1}, (d_{l+1}, d_l)
        g = delta[l + 1] @ Wn
        delta[l] = sp[l] * g
        if kroute and l == L - 1:  # M_{L-1} = V V^T + diag(rho), |V_k|^2 = (T^T A T)_kk
            rho = spp[l] * g
            u = tat_diagonal(out, Wn[None, :, :] * sp[l][:, None, :], xp)
            if L == 2:
                continue  # nothing below needs the dense d x d matrix
        G_next[l], M[l] = _curvature_step(Wn, M[l + 1], sp[l], spp[l] * g if prob.hessian else None)
    tr_m = [none] + [xp.linalg.trace(M[l]) if M[l].ndim == 3 else none for l in range(1, L + 1)]
    tr_abs = [none] + [xp.sum(xp.abs(xp.linalg.diagonal(M[l])), axis=1) if M[l].ndim == 3 else none
                       for l in range(1, L + 1)]
    if kroute:
        tr_m[L - 1] = xp.sum(u, axis=1) + xp.sum(rho, axis=1)
        tr_abs[L - 1] = xp.sum(xp.abs(u + rho), axis=1)
    trace = _layer_traces(sq_sel, tr_m, arr)
    trace_abs = _layer_traces(at_sq, tr_abs, arr) + _layer_traces(_sq_error(at_sq, ea, c_trace, xp), tr_abs, arr)
    G: dict[tuple[int, int], Any] = {}
    for m in range(1, L + 1):
        Gc = M[m]
        if Gc.ndim != 3:  # M_1 of a one-hidden-layer net on the K route: never formed
            continue
        G[m, m] = Gc.reshape(B, -1)
        for l in range(m - 1, 0, -1):  # G_{l,m} = D_l W_{l+1}^T G_{l+1,m}
            if kroute and L == 2:
                break  # G_{1,2} goes by the K route and nothing lies below it
            Gc = G_next[l] if l == m - 1 and l in G_next else sp[l][:, :, None] * (W[l].T @ Gc)
            G[l, m] = Gc.reshape(B, -1)
    Q: dict[tuple[int, int], Any] = {}
    if prob.hessian:
        for l in range(1, L - 1):  # Q_{l,l+1} = D_l;  Q_{l,m} = D_{m-1} W_{m-1} Q_{l,m-1}
            Qc = W[l][None, :, :] * sp[l][:, None, :]  # W_{l+1} D_l, (B, d_{l+1}, d_l)
            Q[l, l + 2] = Qc = sp[l + 1][:, :, None] * Qc
            for m in range(l + 3, L + 1):
                Q[l, m] = Qc = sp[m - 1][:, :, None] * (W[m - 2] @ Qc)
    last = (xp.sum(u, axis=1), rho, tr_m[L]) if kroute else None
    nu, dnu_a = nu_formed(prob, at_sq, G, Q, delta, sp, last, xp, ea)
    nu = {k: v + c_fold * dnu_a[k] for k, v in nu.items()}
    if track:  # the error of delta_L, folded into the magnitudes (docs/numerics.md section 5)
        dnu, dtr = _delta_error_terms(W, at_sq, sp, spp, delta_error(prob, out, z, Yb, fwd_err, xp), xp)
        nu = {k: v + dnu[k] for k, v in nu.items()}
        trace_abs = trace_abs + _layer_traces(at_sq, dtr, arr)
    norms = _sum_nu(nu, L, arr)
    if prob.partial:  # a layer's weights out of the set: its delta . Q terms are none of the submatrix's
        delta = [d if l == 0 or prob.parts[l - 1] in (PART_ALL, PART_WEIGHT) else xp.zeros_like(d)
                 for l, d in enumerate(delta)]
    if not kroute:
        return BlockFeatures(at_sel, delta, sp, G, Q, trace, trace_abs=trace_abs, norms=norms)
    G.pop((L - 1, L - 1), None)  # both were needed only to form the blocks below them
    G.pop((L - 1, L), None)
    return BlockFeatures(at_sel, delta, sp, G, Q, trace, p=p, w=w, W=W[L - 1], rho=rho, u=u, r=r, q=q, h=out.h,
                         trace_abs=trace_abs, norms=norms)


def _masked(at_l: Any, part: int, has_bias: bool, arr: Arrays) -> Any:
    """a~_{l-1} with the columns outside the parameter set zeroed: the bias column for
    PART_WEIGHT, the weight columns for PART_BIAS, all of them for PART_NONE."""
    width = at_l.shape[1]
    keep = np.ones(width)
    if part in (PART_BIAS, PART_NONE):
        keep[: width - int(has_bias)] = 0.0
    if part in (PART_WEIGHT, PART_NONE) and has_bias:
        keep[-1] = 0.0
    return at_l * arr.from_host(keep)


def _curvature_step(Wn: Any, M_next: Any, s: Any, diag: Any) -> tuple[Any, Any]:
    """One step of the backward recursion per sample: G_{l,l+1} = D_l W_{l+1}^T M_{l+1}, (B, d_l, d_{l+1}), and
    M_l = G_{l,l+1} W_{l+1} D_l + diag(diag) (``diag`` None for the GGN), (B, d_l, d_l)."""
    Gn = s[:, :, None] * (Wn.T @ M_next)
    Ml = Gn @ Wn
    Ml *= s[:, None, :]
    if diag is not None:
        d = Ml.shape[1]
        Ml.reshape(Ml.shape[0], d * d)[:, :: d + 1] += diag  # the diagonal, as a view of Ml
    return Gn, Ml


def _layer_traces(at_sq: list[Any], tr_m: list[Any], arr: Arrays) -> Any:
    """trace[l-1] = sum over the block of |a~_{l-1}|^2 tr(M_l), from |a~_{l-1}|^2 and tr(M_l) per sample
    (in the compute dtype), summed in the accumulation dtype, (L,)."""
    return arr.xp.stack([arr.total(at_sq[l] * tr_m[l]) for l in range(1, len(at_sq))])


def _row_norm(x: Any, xp: Any) -> Any:
    """The Euclidean (Frobenius) norm of each sample's entries of x (B, ...), (B,), scaled by the
    largest magnitude first so that entries below sqrt(tiny) do not underflow to a zero norm (as
    Eigen's stableNorm in the C++ engine): a norm that underflowed would make a rounding allowance
    too small (docs/numerics.md section 4)."""
    f = x.reshape(x.shape[0], -1)
    if f.shape[1] == 0:
        return xp.sum(f, axis=1)
    m = xp.max(xp.abs(f), axis=1)
    g = f / xp.where(m > 0, m, xp.ones_like(m))[:, None]
    return m * xp.sqrt(xp.einsum("ni,ni->n", g, g))


Nu = dict[tuple[int, int], Any]


def nu_formed(prob: Problem, at_sq: list[Any], G: dict[tuple[int, int], Any], Q: dict[tuple[int, int], Any],
              delta: list[Any], sp: list[Any], last: tuple[Any, Any, Any] | None,
              xp: Any, ea: list[Any]) -> tuple[Nu, Nu]:
    """(nu_n^{lm}, dnu_n^{lm}) (docs/numerics.md section 4) per sample, {(l, m): (B,)} for l <= m,
    wherever the G_lm are formed (g_lm = |G_lm|_F), except on the Hessian's K route (``last`` =
    (sum_k u_k, rho, tr A) per sample): g_{L-1,L-1} = sum_k u_k + |rho|, g_{L-1,L} = (sum_k u_k tr A)^{1/2}.

    nu = |a~_{l-1}| (g_lm |a~_{m-1}| + [l < m] |delta_m| |Q_lm|_F), |Q_{l,l+1}|_F = |sigma'(z_l)|;
    dnu bounds what errors ea[l], ea[m] of a~_{l-1}, a~_{m-1} move the block: nu with |a~| + ea in
    place of |a~|, less nu."""
    L = prob.n_layers
    na = [None] + [xp.sqrt(at_sq[l]) for l in range(1, L + 1)]
    nu, dnu = {}, {}
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
            dnu[l, m] = ea[l] * v + (na[l] + ea[l]) * (g * ea[m])
    return nu, dnu


def nu_ggn(at_sq: list[Any], tau: list[Any], xp: Any, ea: list[Any]) -> tuple[Nu, Nu]:
    """(nu_n^{lm}, dnu_n^{lm}) of the GGN's K route: nu = |a~_{l-1}| |a~_{m-1}| (tau_l tau_m)^{1/2},
    tau_l = tr(T_l^T A T_l) per sample (tau_L = tr A); dnu as in :func:`nu_formed`."""
    L = len(at_sq) - 1
    na = [None] + [xp.sqrt(at_sq[l]) for l in range(1, L + 1)]
    nu, dnu = {}, {}
    for l in range(1, L + 1):
        for m in range(l, L + 1):
            s = xp.sqrt(tau[l] * tau[m])
            nu[l, m] = na[l] * (s * na[m])
            dnu[l, m] = ea[l] * (s * na[m]) + (na[l] + ea[l]) * (s * ea[m])
    return nu, dnu


def _fold(W: list[Any], u_feat: float, u_pair: float) -> tuple[float, float]:
    """The factors (pair, trace) of the activation errors' addition (docs/numerics.md section 4):
    dnu pair joins nu, the trace term times trace joins trace_abs.  Each is 1 over a lower bound of
    its gamma in the error model: gamma_pair >= max(u_feat K0, 3 gamma_{d_max + 1} in u_pair) and
    gamma_trace >= u_feat K0, K0 = sum_l 3 (d_{l-1} + d_l + 1) (the forward chain's share of k_chain),
    d_max the widest layer input."""
    k0 = sum(3 * (Wl.shape[1] + Wl.shape[0] + 1) for Wl in W)
    d_max = max(Wl.shape[1] for Wl in W)
    return 1.0 / max(u_feat * k0, 3.0 * u_pair * (d_max + 1)), 1.0 / (u_feat * k0)


def _sq_error(at_sq: list[Any], ea: list[Any], c: float, xp: Any) -> list[Any]:
    """(2 |a~| ea + ea^2) c per sample and layer: how far the errors ea of a~_{l-1} move |a~_{l-1}|^2,
    for trace_abs (docs/numerics.md section 4)."""
    return [at_sq[0]] + [(2.0 * xp.sqrt(at_sq[l]) + ea[l]) * ea[l] * c for l in range(1, len(at_sq))]


def _sum_nu(nu: dict[tuple[int, int], Any], L: int, arr: Arrays) -> Any:
    """norms[l-1, m-1] = sum over the block of nu_n^{lm} (per sample in the compute dtype, summed in
    the accumulation dtype), upper triangle, (L, L)."""
    out = arr.zeros((L, L))
    for (l, m), v in nu.items():
        out[l - 1, m - 1] = arr.total(v)
    return out


def _activation_error(Wl: Any, bl: Any, at_l: Any, ea_l: Any, sp_l: Any, a_l: Any, u: float, xp: Any) -> Any:
    """ea_{l+1} >= |error of a~_l|_2 per sample (B,) (docs/numerics.md section 4), from ea_l for
    a~_{l-1} and the rows' norms r_i = |W_l[i, :]|_2: z_l[i] is in error by at most
    E = gamma(d_{l-1} + 2) (r_i |a_{l-1}| + |b_i|) + r_i ea_l, and a_l[i] = sigma(z_l[i]) by
    |sigma'_l[i]| E + 8 u |a_l[i]|.  Relative to |a~_l| it is unbounded where z_l cancels (a hidden
    unit near its zero), which the relative error chain of section 4 cannot cover."""
    d_in = Wl.shape[1]
    k = (d_in + 2) * u
    r = xp.sqrt(xp.sum(Wl * Wl, axis=1))
    na = _row_norm(at_l[:, :d_in], xp)
    mag = na[:, None] * r[None, :]
    if bl is not None:
        mag = mag + xp.abs(bl)
    E = (k / (1.0 - k)) * mag + ea_l[:, None] * r[None, :]
    return _row_norm(xp.abs(sp_l) * E + 8.0 * u * xp.abs(a_l), xp)


def _forward_error(Wl: Any, bl: Any, at_l: Any, sp_prev: Any, err_prev: Any, xp: Any) -> Any:
    """The componentwise bound E_l on the error of z_l (B, d_l), first order (docs/numerics.md
    section 5): gamma(d_{l-1} + 2) |W~_l| |a~_{l-1}|, plus for l >= 2 the error of
    a_{l-1} = sigma(z_{l-1}) carried through |W_l|: |sigma'| E_{l-1} + 8 u |a_{l-1}|."""
    d_in = Wl.shape[1]
    absW = xp.abs(Wl)
    mag = xp.abs(at_l[:, :d_in]) @ absW.T
    if bl is not None:
        mag = mag + xp.abs(bl)
    E = gamma(d_in + 2) * mag
    if err_prev is not None:
        E = E + (xp.abs(sp_prev) * err_prev + 8.0 * _U * xp.abs(at_l[:, :d_in])) @ absW.T
    return E


def _delta_error_terms(W: Any, at_sq: list[Any], sp: list[Any], spp: list[Any], d_err: Any,
                       xp: Any) -> tuple[dict[tuple[int, int], Any], list[Any]]:
    """(dnu^{lm} / u per sample, sqrt(d_l) dM_l / u per sample) of docs/numerics.md section 5:
    how far an error d_err (B, C) in delta_L can move the Hessian's blocks, by a scalar
    backward recursion on norms (Frobenius norms of the weights bound their 2-norms)."""
    L = len(W)
    na = [None] + [xp.sqrt(at_sq[l]) for l in range(1, L + 1)]
    wn = [0.0] + [float(xp.sqrt(xp.sum(Wl * Wl))) for Wl in W]  # |W_l|_F
    s1 = [None] + [xp.max(xp.abs(sp[l]), axis=1) for l in range(1, L)]
    s2 = [None] + [xp.max(xp.abs(spp[l]), axis=1) for l in range(1, L)]
    e = [None] * (L + 1)
    dM = [None] * (L + 1)
    e[L] = _row_norm(d_err, xp)
    dM[L] = xp.zeros_like(e[L])
    for l in range(L - 1, 0, -1):
        dg = wn[l + 1] * e[l + 1]
        e[l] = s1[l] * dg
        dM[l] = (s1[l] * wn[l + 1]) ** 2 * dM[l + 1] + s2[l] * dg
    dnu: dict[tuple[int, int], Any] = {}
    for l in range(1, L + 1):
        tau = xp.ones_like(e[L])  # tau_{m,l} >= |T_{m,l}|_2, starting at m = l
        for m in range(l, L + 1):
            if m > l:  # |Q_{l,m}|_F <= sqrt(d_l) max|sigma'_{m-1}| tau_{m-1,l} (|sigma'_l| itself for m = l + 1)
                qn = _row_norm(sp[l], xp) if m == l + 1 else math.sqrt(W[l - 1].shape[0]) * s1[m - 1] * tau
                tau = wn[m] * s1[m - 1] * tau
            v = tau * dM[m] * na[m]
            if m > l:
                v = v + e[m] * qn
            dnu[l, m] = na[l] * v / _U
    dtr = [None] + [math.sqrt(W[l - 1].shape[0]) * dM[l] / _U for l in range(1, L + 1)]
    return dnu, dtr
