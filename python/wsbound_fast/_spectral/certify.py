"""Certificates beyond the plain Wolkowicz–Styan bounds (proofs: docs/certificates.md).

* :func:`rank_bound` / :func:`layer_rank_bounds`: upper bounds on the rank of the
  curvature matrix and of its diagonal blocks, from the block structure of one sample's
  Hessian;
* :func:`deflated_bounds`: the deflated certificate from k Ritz pairs (Kahan's theorem for
  Ritz clusters plus the exact tr(H), tr(H^2));
* :func:`ritz_certificate`: Ritz vectors -> exact residual block -> the best deflated bound
  over the leading pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .._backends import Matvec
from .._problem.problem import PART_ALL, PART_BIAS, PART_WEIGHT, Problem
from .bounds import _sup_upper
from .lanczos import BlockLanczos
from .rounding import U_DOUBLE, Allowance, down, gamma, up


def _dims(prob: Problem) -> list[int]:
    return [prob.weights[0].shape[1]] + [w.shape[0] for w in prob.weights]


def _first_layer_inputs(prob: Problem) -> int:
    """Columns of the augmented input x~ that are not identically zero over the data set.

    A column of X that is zero for every sample makes every Hessian entry of the weights
    W_1[:, c] zero (each carries the factor x~_n[c]); it is an exact, cheap rank reduction.
    """
    X = prob.X
    if hasattr(X, "nonzero_columns"):  # an X kept on a cluster (_backends.distributed.ClusterX)
        return int(np.count_nonzero(X.nonzero_columns)) + int(prob.biases[0] is not None)
    seen = np.zeros(X.shape[1], dtype=bool)
    step = max(1, (1 << 22) // max(1, X.shape[1]))  # rows per chunk: ~4 MB of booleans
    for lo in range(0, X.shape[0], step):
        chunk = X[lo:lo + step]
        if not isinstance(chunk, np.ndarray):  # a torch tensor (backend="torch"), on its device
            chunk = (chunk != 0).any(dim=0).cpu().numpy()
            seen |= chunk
            continue
        seen |= np.any(chunk != 0, axis=0)
    nonzero = int(np.count_nonzero(seen))
    return nonzero + int(prob.biases[0] is not None)


def _rank_a(prob: Problem) -> int:
    """The rank bound of one sample's output curvature A: C - 1 for cross-entropy (A 1 = 0), C
    for a diagonal A (mse, bce)."""
    C = prob.n_classes
    return C if prob.diagonal else C - 1


def block_spans(prob: Problem) -> tuple[list[int], list[int]]:
    """(p_l, s_l) per layer: the effective size of parameter block l, and the dimension of the
    space that contains block l of every column of one sample's Hessian (docs, Theorem 2)."""
    d = _dims(prob)
    L, ra = prob.n_layers, _rank_a(prob)
    p, s = [], []
    for l in range(1, L + 1):
        part = PART_ALL if prob.parts is None else prob.parts[l - 1]
        has_b = prob.biases[l - 1] is not None
        weights_in = (_first_layer_inputs(prob) - int(has_b)) if l == 1 else d[l - 1]
        width_in = (weights_in if part in (PART_ALL, PART_WEIGHT) else 0) + int(has_b and part in (PART_ALL, PART_BIAS))
        p.append(d[l] * width_in)  # only the columns of a~_{l-1} in the parameter set
        if not prob.hessian:
            s.append(ra)
            continue
        e = d[l] if l < L else ra  # the G-term: e_r (x) a~_{l-1}, or A's range at the output layer
        s.append(e + (d[l - 1] if l >= 2 else 0))  # + the delta-term: delta_l (x) q, q in R^{d_{l-1}}
    return p, s


def sample_rank(prob: Problem) -> int:
    """r_1: an upper bound on the rank of one sample's curvature H_n."""
    p, s = block_spans(prob)
    if not prob.hessian:
        return min(sum(p), s[0])  # J^T A J with rank(A) <= C - 1 (C for mse, bce)
    return sum(min(pl, sl) for pl, sl in zip(p, s))


def rank_bound(prob: Problem) -> int:
    """r: an upper bound on the rank of the curvature of the whole data set (<= P)."""
    N, P = prob.n_samples, prob.n_params
    p, s = block_spans(prob)
    r = min(P, sum(p), N * sample_rank(prob))
    if prob.hessian:
        r = min(r, sum(min(pl, N * sl) for pl, sl in zip(p, s)))
    return int(max(r, 1))


def layer_rank_bounds(prob: Problem) -> list[int]:
    """Upper bounds on rank(H^{ll}) = rank(sum_n E_l^T G_ll E_l): N * rank(G_ll) per sample."""
    d = _dims(prob)
    L, ra, N = prob.n_layers, _rank_a(prob), prob.n_samples
    p, _ = block_spans(prob)
    out = []
    for l in range(1, L + 1):
        g = (d[l] if l < L else ra) if prob.hessian else min(d[l], ra)
        out.append(int(max(1, min(p[l - 1], N * g))))
    return out


# --------------------------------------------------------------------------------------
# the deflated certificate
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deflated:
    """Deflated bounds: lambda_max <= max_upper, lambda_min >= min_lower."""

    max_upper: float
    min_lower: float
    k: int
    residual: float


def deflated_bounds(trace: float, trace_sq: float, n: int, theta: Sequence[float], rho: float,
                    rank: int | None = None, *, trace_err: float = 0.0, trace_sq_err: float = 0.0) -> Deflated:
    """Bounds on lambda_max and lambda_min of a symmetric n x n H from k Ritz values.

    Assumptions (docs/certificates.md, Theorem 3): theta are the eigenvalues of Y^T H Y for
    some Y (n x k) with orthonormal columns, rho >= ||H Y - Y (Y^T H Y)||_2, trace = tr H,
    trace_sq = tr H^2, and rank (if given) >= rank(H).  Then (Kahan) k eigenvalues of H,
    with distinct indices, lie within rho of the theta_i, and every other eigenvalue mu
    satisfies mu^2 <= trace_sq - sum_i (|theta_i| - rho)_+^2; the remaining eigenvalues'
    sum lies in trace - sum theta_i +- k rho, which the WS bound on the remainder uses.

    ``trace_err``, ``trace_sq_err``: rounding allowances of the two moments (the bounds hold
    for every moment pair within them); the arithmetic here is rounded outward as well
    (theta may be computed eigenvalues as long as rho covers their error: ritz_certificate).
    """
    th = np.asarray(theta, dtype=float)
    k = int(th.shape[0])
    rho = float(rho)
    r = n if rank is None else min(int(rank), n)
    matched_hi, matched_lo = up(float(th.max()) + rho), down(float(th.min()) - rho)
    n_rem = n - k
    if n_rem <= 0:
        return Deflated(matched_hi, matched_lo, k, rho)
    k_nonzero = int(np.count_nonzero(np.abs(th) > rho))  # matched eigenvalues certainly non-zero
    m = min(n_rem, max(r - k_nonzero, 0))  # room for the remainder's non-zero eigenvalues
    zero = m < n_rem  # the remainder then contains the eigenvalue 0
    taken = float(np.sum(np.maximum(np.abs(th) - rho, 0.0) ** 2))
    t2 = float(trace_sq) + float(trace_sq_err)
    T2 = max(t2 - taken + gamma(k + 4) * (abs(t2) + taken), 0.0)
    centre = float(trace) - float(th.sum())
    spread = k * rho + float(trace_err) + gamma(k + 4) * (abs(float(trace)) + float(np.abs(th).sum()))
    a, b = centre - spread, centre + spread
    if m == 0:
        rem_hi = rem_lo = 0.0
    else:
        w = 8 * U_DOUBLE * (max(abs(a), abs(b)) / m + math.sqrt(T2))  # the WS formula's own rounding
        rem_hi = _sup_upper(m, a, b, T2) + w
        rem_lo = -_sup_upper(m, -b, -a, T2) - w
        if zero:
            rem_hi, rem_lo = max(rem_hi, 0.0), min(rem_lo, 0.0)
    return Deflated(max(matched_hi, rem_hi), min(matched_lo, rem_lo), k, rho)


@dataclass(frozen=True)
class RitzCertificate:
    deflated: Deflated
    theta_max: float  # largest eigenvalue of Y^T H Y (a Rayleigh-Ritz estimate of lambda_max, from below)
    theta_min: float
    #: certified: lambda_max >= max_lower and lambda_min <= min_upper (the Ritz vectors' exact
    #: Rayleigh quotients, with the rounding of the product and of the dot products)
    max_lower: float
    min_upper: float


def rayleigh_intervals(Y: np.ndarray, HY: np.ndarray, product_err: float) -> tuple[np.ndarray, np.ndarray]:
    """Intervals that contain the exact Rayleigh quotient y^T H y / y^T y of every column y of
    Y (P x j), given HY computed with ||fl(H y) - H y|| <= product_err ||y|| (docs/numerics.md).

    The dot products' own rounding is at most gamma_P |y|^T |H y| (and gamma_P y^T y)."""
    P = Y.shape[0]
    g = gamma(P + 2)
    num = np.einsum("pi,pi->i", Y, HY)
    nrm = np.einsum("pi,pi->i", Y, Y)
    err = product_err * nrm + g * np.einsum("pi,pi->i", np.abs(Y), np.abs(HY))
    lo = (num - err) / (nrm * np.where(num - err >= 0, 1.0 + g, 1.0 - g))
    hi = (num + err) / (nrm * np.where(num + err >= 0, 1.0 - g, 1.0 + g))
    return np.nextafter(lo, -np.inf), np.nextafter(hi, np.inf)


def _certified_ritz(Yj: np.ndarray, HYj: np.ndarray, trace_sq: float, trace_sq_err: float,
                    product_err: float) -> tuple[np.ndarray, float]:
    """(Ritz values theta, rho) such that k eigenvalues of H with distinct indices lie within rho
    of the theta_i: Kahan's theorem for the exactly orthonormal Q nearest to the computed Yj,
    with the rounding of Yj, H Yj, Theta, its eigenvalues and the residual norm added to rho.

    With eta = ||Yj^T Yj - I||_2 (bounded by its Frobenius norm plus its rounding), Yj = Q P
    (polar) has ||Yj - Q||_2 <= eta.  Theta_Q = Q^T H Q minimises ||H Q - Q Theta||, so
    ||H Q - Q Theta_Q|| <= ||fl(H Yj) - Yj Th|| + ||H Yj - fl(H Yj)|| + eta (||H|| + ||Th||), and the
    eigenvalues of Theta_Q are within ||Theta_Q - Th|| + the eigen-solver's backward error of
    the computed theta (Weyl); ||H||_2 <= sqrt(tr H^2).
    """
    P, k = Yj.shape
    Th = Yj.T @ HYj
    Th = 0.5 * (Th + Th.T)
    theta = np.linalg.eigvalsh(Th)
    R = HYj - Yj @ Th
    rho_c = float(np.linalg.norm(R, 2))
    gP, gk = gamma(P + 4), gamma(4 * k * k + 16)
    E = Yj.T @ Yj - np.eye(k)
    eta = float(np.linalg.norm(E)) + gP * k
    h_norm = math.sqrt(max(trace_sq + trace_sq_err, 0.0))
    th_norm = float(np.linalg.norm(Th))
    y_fro = math.sqrt(k * (1.0 + eta))
    hy_fro = float(np.linalg.norm(HYj))
    prod = product_err * y_fro  # ||fl(H Yj) - H Yj||_F
    resid_round = gamma(k + 4) * (hy_fro + y_fro * th_norm) + gk * float(np.linalg.norm(R))
    rho_q = rho_c + prod + eta * (h_norm + th_norm) + resid_round
    theta_err = 2.0 * eta * (1.0 + eta) * h_norm + y_fro * prod + gP * y_fro * hy_fro + gk * th_norm
    return theta, up(rho_q + theta_err, 8)


def ritz_certificate(matvec: Matvec, Y: np.ndarray, trace: float, trace_sq: float, n: int,
                     rank: int | None, allowance: Allowance | None = None, end: str = "max") -> RitzCertificate:
    """The best deflated certificate over the leading columns of Y (P x k, by |Ritz value|).

    Y is re-orthonormalised, H Y computed with the exact product, Y rotated so that
    Theta = Y^T H Y is diagonal; for each leading set of j columns the residual block
    R_j = H Y_j - Y_j Theta_j gives a deflated bound, and the j with the smallest upper bound
    on lambda_max is kept (``end="min"``: the largest lower bound on lambda_min).  Its bound is
    then recomputed from scratch for those j columns
    (fresh Theta, R and the spectral norm by SVD, with every rounding allowance of
    :func:`_certified_ritz` and of the moments), so the certificate does not rest on the
    selection arithmetic.
    """
    al = allowance if allowance is not None else Allowance.zero(1)
    e1, e2 = al.trace, al.trace_sq
    Yq, _ = np.linalg.qr(Y)
    HY = matvec(Yq.T).T
    Theta = Yq.T @ HY
    Theta = 0.5 * (Theta + Theta.T)
    theta, U = np.linalg.eigh(Theta)
    order = np.argsort(-np.abs(theta), kind="stable")
    theta, U = theta[order], U[:, order]
    Yr, HYr = Yq @ U, HY @ U
    R = HYr - Yr * theta
    gram = R.T @ R
    best_j, best = 1, math.inf
    for j in range(1, theta.shape[0] + 1):
        rho_j = math.sqrt(max(float(np.linalg.eigvalsh(gram[:j, :j])[-1]), 0.0))
        d = deflated_bounds(trace, trace_sq, n, theta[:j], rho_j, rank, trace_err=e1, trace_sq_err=e2)
        score = d.max_upper if end == "max" else -d.min_lower
        if score < best:
            best_j, best = j, score
    Yj, HYj = Yr[:, :best_j], HYr[:, :best_j]
    th_j, rho = _certified_ritz(Yj, HYj, trace_sq, e2, al.product)
    # the Ritz vectors' exact Rayleigh quotients: lambda_max >= max, lambda_min <= min
    lo, hi = rayleigh_intervals(Yr, HYr, al.product)
    return RitzCertificate(deflated_bounds(trace, trace_sq, n, th_j, rho, rank, trace_err=e1, trace_sq_err=e2),
                           float(theta.max()), float(theta.min()), float(lo.max()), float(hi.min()))


# --------------------------------------------------------------------------------------
# certified to a requested width (certify=True)
# --------------------------------------------------------------------------------------


#: An end whose bracket is below this fraction of the spectral radius is judged against it
#: (an eigenvalue that is 0 up to rounding can only be bracketed to the rounding).
WIDTH_FLOOR = 1e-6


def relative_width(lo: float, hi: float, radius: float = 0.0) -> float:
    """hi/lo - 1 for a positive bracket, lo/hi - 1 for a negative one: (hi - lo) / min(|lo|, |hi|).
    A bracket that contains 0 is measured against its larger end, and every bracket against at
    least WIDTH_FLOOR radius; 0 for [0, 0]."""
    ends = (abs(lo), abs(hi))
    den = max(min(ends) if lo > 0 or hi < 0 else max(ends), WIDTH_FLOOR * radius)
    return 0.0 if den == 0.0 else max(hi - lo, 0.0) / den


def _predicted(theta: np.ndarray, res: np.ndarray, trace: float, trace_sq: float, n: int, rank: int | None,
               allowance: Allowance, end: str, usable: int) -> tuple[float, int]:
    """The width the certificate would have from the current Ritz pairs, if the Lanczos
    residual estimates were the true residual norms (they are, up to rounding, with full
    reorthogonalisation), and the number of leading pairs (by |theta|) that gives it."""
    order = np.argsort(-np.abs(theta), kind="stable")[:usable]
    th, rho = theta[order], np.sqrt(np.cumsum(res[order] ** 2))
    radius = max(abs(float(theta[-1])), abs(float(theta[0])))
    best, best_j = math.inf, 1
    for j in range(1, th.shape[0] + 1):
        d = deflated_bounds(trace, trace_sq, n, th[:j], float(rho[j - 1]), rank, trace_err=allowance.trace,
                            trace_sq_err=allowance.trace_sq)
        w = relative_width(float(theta[-1]), d.max_upper, radius) if end == "max" else \
            relative_width(d.min_lower, float(theta[0]), radius)
        if w < best:
            best, best_j = w, j
    return best, best_j


#: certify=True gives up early on an end whose bracket the moments cannot bring to rtol: judged
#: over the last STALL_BLOCKS block steps (see :func:`_stalled`).
STALL_BLOCKS = 4


def _contraction(lo: float, hi: float, radius: float) -> float:
    """(hi - lo) / max(|lo|, |hi|, WIDTH_FLOOR radius), in [0, 2]: 1 - lo/hi for a positive bracket.
    Unlike hi/lo - 1 it changes at a steady pace as the upper end falls, which is what the stall
    rule extrapolates; r = hi/lo - 1 corresponds to r / (1 + r)."""
    den = max(abs(lo), abs(hi), WIDTH_FLOOR * radius)
    return 0.0 if den == 0.0 else max(hi - lo, 0.0) / den


def _floor(theta: np.ndarray, usable: int, trace: float, trace_sq: float, n: int, rank: int | None,
           allowance: Allowance, end: str, other: tuple[float, float]) -> tuple[float, float, float]:
    """(width, contraction, unresolved share of tr(H^2)): the width the certificate would have if
    every usable Ritz pair had converged (residual 0), with the bounds already known, the same
    as a contraction (:func:`_contraction`), and the part of tr(H^2) that those Ritz values leave
    to the rest of the spectrum.  Lanczos lowers it only by finding more of the spectrum; it is
    an effort estimate, never part of a certificate."""
    order = np.argsort(-np.abs(theta), kind="stable")[:usable]
    th = theta[order]
    d = deflated_bounds(trace, trace_sq, n, th, 0.0, rank, trace_err=allowance.trace,
                        trace_sq_err=allowance.trace_sq)
    radius = max(abs(float(theta[-1])), abs(float(theta[0])))
    lo0, hi0 = other
    if end == "max":
        lo, hi = max(lo0, float(theta[-1])), min(hi0, d.max_upper)
    else:
        lo, hi = max(lo0, d.min_lower), min(hi0, float(theta[0]))
    share = max(trace_sq - float(np.sum(th * th)), 0.0) / trace_sq if trace_sq > 0 else 0.0
    return relative_width(lo, hi, radius), _contraction(lo, hi, radius), share


def _stalled(history: list[tuple[int, float, float]], rtol: float, maxiter: int, block: int) -> str:
    """Why the end whose floors per step are ``history`` [(products, width, contraction)] cannot
    reach rtol within maxiter products, or "" while it may.

    Given up when the floor (:func:`_floor`) is wider than rtol and, at twice the pace its
    contraction fell over the last STALL_BLOCKS block steps, would still be wider than rtol
    after maxiter products.  This is the case where most of tr(H^2) beyond the converged pairs
    lies in a bulk of many small eigenvalues: Lanczos resolves it a few eigenvalues per block,
    and two moments cannot tell a spread-out bulk from one large eigenvalue
    (docs/certificates.md, section 8)."""
    m, w, c = history[-1]
    if w <= rtol:
        return ""
    past = [h for h in history if h[0] <= m - STALL_BLOCKS * block]
    if not past:
        return ""
    mo, wo, co = past[-1]
    pace = max(co - c, 0.0) / (m - mo)
    if c - 2.0 * pace * (maxiter - m) <= rtol / (1.0 + rtol):
        return ""
    later = max(c - pace * (maxiter - m), 0.0)
    later_w = later / (1.0 - later) if later < 1.0 and w < math.inf else later
    return (f"even if every Ritz pair found so far had converged, the bracket would be {w:.3g} wide, and it narrowed "
            f"from {wo:.3g} over the last {m - mo} products: at that pace it would still be about "
            f"{later_w:.3g} wide after lanczos_maxiter = {maxiter} products")


@dataclass(frozen=True)
class WidthCertificate:
    """What certify=True found: one RitzCertificate per end asked for, the Lanczos effort."""

    certificates: dict  # "max" / "min" -> RitzCertificate
    products: int  # curvature-vector products of the Lanczos run
    widths: dict  # "max" / "min" -> relative width reached (with the other bounds, see refine)
    met: bool
    why: str  # when not met: what stopped it
    extremes: np.ndarray  # (P, 2): the Ritz vectors of the largest and the smallest Ritz value


def certify_to_width(matvec: Matvec, n: int, trace: float, trace_sq: float, rank: int | None,
                     allowance: Allowance, *, rtol: float, ends: tuple[str, ...], maxiter: int, block: int,
                     rng: np.random.Generator, other: dict) -> WidthCertificate:
    """Block Lanczos until the certified bracket of every end in ``ends`` is within ``rtol``.

    Judged by the certificate, not by a fixed tolerance: after every block step the deflated
    certificate is predicted from the Ritz values and residual estimates; when it would meet
    rtol (with a factor 2 to spare), it is computed for real (ritz_certificate: H Y with the
    exact product, every rounding allowance), and the run stops if that meets rtol.
    ``other[end]`` = (lo, hi): the bounds already known (WS, rank-aware, per-layer), which the
    width counts as well.
    """
    lz = BlockLanczos(matvec, n, block, rng, maxiter)
    certs: dict = {}
    widths: dict = {}
    retry_at = 0
    floors: dict = {e: [] for e in ends}  # end -> [(products, floor width, contraction)]
    can_span = lz.maxiter >= n  # Lanczos may reach the whole space (then the remainder vanishes): never give up

    def combined(end: str, cert: RitzCertificate) -> float:
        lo0, hi0 = other[end]
        radius = max(abs(cert.theta_max), abs(cert.theta_min))
        if end == "max":
            return relative_width(max(lo0, cert.max_lower), min(hi0, cert.deflated.max_upper), radius)
        return relative_width(max(lo0, cert.deflated.min_lower), min(hi0, cert.min_upper), radius)

    while True:
        lz.step()
        done = lz.exhausted()
        if lz.m < 2 and not done:
            continue
        theta, S, res = lz.ritz()
        usable = max(1, lz.m - (0 if done else lz.b))  # the newest block's Ritz pairs are rough
        pending = [e for e in ends if e not in certs or widths[e] > rtol]
        stalled = ""
        if not done and not can_span:
            for e in pending:
                w, c, share = _floor(theta, usable, trace, trace_sq, n, rank, allowance, e, other[e])
                floors[e].append((lz.m, w, c))
                why_e = _stalled(floors[e], rtol, lz.maxiter, lz.b)
                if why_e and not stalled:
                    name = "lambda_max" if e == "max" else "lambda_min"
                    stalled = (f"the moments cannot certify {name} to rtol: the spectrum Lanczos has not resolved "
                               f"still holds {share:.1%} of tr(H^2); {why_e}")
        met = False
        if done or stalled or lz.m >= retry_at:
            pred = {e: _predicted(theta, res, trace, trace_sq, n, rank, allowance, e, usable) for e in pending}
            if done or stalled or all(w <= 0.5 * rtol for w, _ in pred.values()):
                for e in pending:
                    # the predicted pairs and the extreme one, in whole passes of the product: the
                    # leading pairs fill the rest of the last pass (the certificate picks its j among them)
                    ext = int(np.argmax(theta)) if e == "max" else int(np.argmin(theta))
                    count = min(usable, lz.b * math.ceil((pred[e][1] + 1) / lz.b))
                    order = np.argsort(-np.abs(theta), kind="stable")[:count]
                    if ext not in order:
                        order = np.append(order[: max(count - 1, pred[e][1])], ext)
                    Y = lz.vectors(S[:, np.sort(order)])
                    certs[e] = ritz_certificate(matvec, Y, trace, trace_sq, n, rank, allowance, end=e)
                    widths[e] = combined(e, certs[e])
                met = all(widths[e] <= rtol for e in ends)
                retry_at = lz.m + 2 * lz.b
        if met or done or stalled:
            if met:
                why = ""
            elif stalled:
                why = stalled
            elif lz.m >= n:
                why = "the Krylov space spans every direction"
            else:
                why = (f"lanczos_maxiter = {lz.maxiter} products were used; raise lanczos_maxiter (or memory_limit, "
                       "which bounds the Lanczos basis)")
            ext = lz.vectors(S[:, [int(np.argmax(theta)), int(np.argmin(theta))]])
            return WidthCertificate(certs, lz.products, widths, met, why, ext)
