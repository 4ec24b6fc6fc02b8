"""bound()'s refinements: rank-aware and per-layer bounds, Lanczos (exact=True), the
deflated certificate (certify=k) and the certified brackets.  Proofs: docs/certificates.md.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
import warnings
from typing import Any, NamedTuple

import numpy as np

from .._backends import make_matvec
from .._problem.problem import Problem
from .._problem.validate import _positive_int
from .bounds import Bound, LayerBound, ws_bounds
from .certify import (
    certify_to_width,
    layer_rank_bounds,
    rank_bound,
    rayleigh_intervals,
    relative_width,
    ritz_certificate,
)
from .lanczos import _seed, _tol, default_maxiter, lanczos, select_indices
from .rounding import Allowance, down, up


class ExactOptions(NamedTuple):
    exact: bool
    certify: int  # 0: no deflated certificate
    tol: float
    maxiter: int
    seed: int
    auto: bool = False  # certify=True: to the width rtol
    rtol: float = 1e-2
    ends: tuple[str, ...] = ("max",)


#: Vectors per product pass of certify=True's block Lanczos.
CERTIFY_BLOCK = 8
_WHICH_ENDS = {"LA": ("max",), "SA": ("min",), "BE": ("max", "min")}


def check_exact_options(exact: Any, certify: Any, tol: Any, maxiter: Any, seed: Any, n_params: int,
                        memory_limit: int | None = None, rtol: Any = 1e-2, which: Any = "LA") -> ExactOptions:
    if not isinstance(exact, (bool, np.bool_)):
        raise TypeError(f"exact must be True or False; got {exact!r}")
    k, auto = 0, certify is True or certify is np.True_
    if not auto and certify is not None and certify is not False:
        if isinstance(certify, bool) or not isinstance(certify, numbers.Integral):
            raise TypeError("certify must be None, True (certified to the width rtol) or a positive integer k "
                            f"(Ritz pairs to deflate); got {certify!r}")
        if not 1 <= int(certify) <= n_params:
            raise ValueError(f"certify must satisfy 1 <= k <= P = {n_params} (the number of parameters); got {certify}")
        k = int(certify)
    t = _tol(tol, "lanczos_tol")
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not (math.isfinite(float(rtol)) and
                                                                             0.0 < float(rtol) <= 10.0):
        raise ValueError(f"rtol must be a number in (0, 10], the relative width hi/lo - 1 to reach; got {rtol!r}")
    if not isinstance(which, str) or which.strip().upper() not in _WHICH_ENDS:
        raise ValueError(f"which must be 'LA' (lambda_max), 'SA' (lambda_min) or 'BE' (both); got {which!r}")
    want = max(k, 2) if not auto else 10 * CERTIFY_BLOCK
    mi = default_maxiter(n_params, want, memory_limit) if maxiter is None else _positive_int(maxiter, "lanczos_maxiter")
    return ExactOptions(bool(exact) or k > 0 or auto, k, t, mi, _seed(seed), auto, float(rtol),
                        _WHICH_ENDS[which.strip().upper()])


def _chunked(matvec: Any, rows: int) -> Any:
    """The product applied to at most ``rows`` vectors per pass (what it was planned for)."""
    def apply(V: np.ndarray) -> np.ndarray:
        if V.shape[0] <= rows:
            return matvec(V)
        return np.vstack([matvec(V[i: i + rows]) for i in range(0, V.shape[0], rows)])
    return apply


def _layer_bounds(prob: Problem, layer_trace: np.ndarray, blocks: np.ndarray,
                  allowance: Allowance) -> tuple[LayerBound, ...]:
    N = prob.divisor
    f1, f2 = (1.0 / N, 1.0 / (N * N)) if prob.mean else (1.0, 1.0)
    ranks = layer_rank_bounds(prob)
    out = []
    for l, (W, b) in enumerate(zip(prob.weights, prob.biases)):
        n = prob.layer_params(l)
        if n == 0:
            continue  # not in the parameter set
        t, t2 = float(layer_trace[l]) * f1, max(float(blocks[l, l]) * f2, 0.0)
        err = {"trace_err": allowance.layer_trace[l], "trace_sq_err": allowance.layer_trace_sq[l]}
        plain = ws_bounds(t, t2, n, **err)
        best = ws_bounds(t, t2, n, rank=min(ranks[l], n), **err)
        out.append(LayerBound(l + 1, n, min(ranks[l], n), t, t2, best.lambda_max_lower, best.lambda_max_upper,
                              best.lambda_min_lower, best.lambda_min_upper, plain.lambda_max_upper,
                              plain.lambda_min_lower))
    return tuple(out)


def _ratio_lower(t2: float, e2: float, t: float, e1: float) -> float | None:
    """A certified lower bound on tr(G^2)/tr(G) (<= lambda_max of a PSD G) from moments with
    allowances, or None when the allowances leave it at or below 0."""
    num, den = t2 - e2, t + e1
    if num <= 0 or den <= 0:
        return None
    return down(num / den, 2)


def refine(res: Bound, prob: Problem, backend: str, layer_trace: np.ndarray, blocks: np.ndarray,
           opts: ExactOptions, allowance: Allowance, cluster: Any = None) -> Bound:
    """Everything bound() adds after the moments; ``cluster`` (a ``_backends.distributed.Cluster``):
    the products of Lanczos and the certificates run on its workers."""
    P, tr, tr2 = res.n_params, res.trace, max(res.trace_sq, 0.0)
    e1, e2 = allowance.trace, allowance.trace_sq
    ggn = not prob.hessian
    r = rank_bound(prob)
    rk = ws_bounds(tr, tr2, P, rank=r, trace_err=e1, trace_sq_err=e2)
    layers = _layer_bounds(prob, layer_trace, blocks, allowance)
    max_lo = [res.lambda_max_lower, rk.lambda_max_lower, *(lb.lambda_max_lower for lb in layers)]
    max_hi = [res.lambda_max_upper, rk.lambda_max_upper]
    min_lo = [res.lambda_min_lower, rk.lambda_min_lower]
    min_hi = [res.lambda_min_upper, rk.lambda_min_upper, *(lb.lambda_min_upper for lb in layers)]
    if ggn:  # positive semi-definite: tr(G^2) <= lambda_max tr(G), for G and each block G^{ll}
        ratios = [_ratio_lower(tr2, e2, tr, e1)]
        ratios += [_ratio_lower(lb.trace_sq, allowance.layer_trace_sq[lb.layer - 1], lb.trace,
                                allowance.layer_trace[lb.layer - 1]) for lb in layers]
        max_lo.extend(x for x in ratios if x is not None)
        min_lo.append(0.0)
    extra: dict[str, Any] = {"rank": r, "lambda_max_upper_rank": rk.lambda_max_upper,
                             "lambda_min_lower_rank": rk.lambda_min_lower, "layer_bounds": layers}
    if opts.exact:
        t0 = time.perf_counter()
        kc = opts.certify
        rng = np.random.default_rng(opts.seed)
        if opts.auto:
            matvec = _chunked(make_matvec(prob, backend, CERTIFY_BLOCK, cluster=cluster), CERTIFY_BLOCK)
            ends_wanted = tuple(e for e in opts.ends if not (e == "min" and ggn and r < P))  # G: lambda_min = 0
            other = {"max": (max(max_lo), min(max_hi)), "min": (max(min_lo), min(min_hi))}
            wc = certify_to_width(matvec, P, tr, tr2, r, allowance, rtol=opts.rtol, ends=ends_wanted or ("max",),
                                  maxiter=opts.maxiter, block=CERTIFY_BLOCK, rng=rng, other=other)
            Y = wc.extremes
            iterations, converged = wc.products, wc.met
            certs = wc.certificates
        else:
            matvec = make_matvec(prob, backend, max(kc, 2), cluster=cluster)

            def wanted(theta: np.ndarray) -> np.ndarray:
                # The GGN is positive semi-definite (lambda_min >= 0 is certified, = 0 when r < P) and
                # the bottom of its spectrum is a large cluster at or near 0 on which Lanczos converges
                # slowly; only the top end (and the deflation set) is waited for there.
                ends = np.array([theta.shape[0] - 1] if ggn else [0, theta.shape[0] - 1])
                return np.union1d(ends, select_indices(theta, "LM", kc)) if kc else ends

            run = lanczos(matvec, P, wanted=wanted, n_wanted=max(kc, 2), tol=opts.tol, maxiter=opts.maxiter, rng=rng)
            Y = run.vectors(np.array([int(np.argmax(run.theta)), int(np.argmin(run.theta))]))
            iterations, converged = run.iterations, run.converged
            certs = {}
            if kc:
                idx = select_indices(run.theta, "LM", kc)
                certs["max"] = ritz_certificate(matvec, run.vectors(idx), tr, tr2, P, r, allowance)
        Y = Y / np.linalg.norm(Y, axis=0)
        HY = matvec(Y.T).T
        rq = np.einsum("pi,pi->i", Y, HY)
        resid = np.linalg.norm(HY - Y * rq, axis=0)
        lam_max, lam_min = float(rq[0]), float(rq[1])
        # Rayleigh quotients: lambda_min <= y^T H y / y^T y <= lambda_max, for the exact quotient
        q_lo, q_hi = rayleigh_intervals(Y, HY, allowance.product)
        max_lo.append(float(q_lo[0]))
        min_hi.append(float(q_hi[1]))
        extra.update(lambda_max=lam_max, lambda_min=lam_min, lambda_max_residual=float(resid[0]),
                     lambda_min_residual=float(resid[1]), lanczos_iterations=iterations,
                     lanczos_converged=converged)
        for cert in certs.values():
            max_hi.append(cert.deflated.max_upper)
            min_lo.append(cert.deflated.min_lower)
            max_lo.append(cert.max_lower)
            min_hi.append(cert.min_upper)
        if certs:
            first = certs.get("max", certs.get("min"))
            extra.update(certify_k=first.deflated.k, certify_residual=first.deflated.residual,
                         lambda_max_upper_deflated=min(c.deflated.max_upper for c in certs.values()),
                         lambda_min_lower_deflated=max(c.deflated.min_lower for c in certs.values()))
        if opts.auto:
            radius = max(abs(max(max_lo)), abs(min(min_hi)))  # <= the spectral radius
            widths = {"max": relative_width(max(max_lo), min(max_hi), radius),
                      "min": relative_width(max(min_lo), min(min_hi), radius)}
            width = max(widths[e] for e in opts.ends)
            met = width <= opts.rtol
            extra.update(certify_rtol=opts.rtol, certify_width=width, certify_met=met)
            if not met:
                names = " and ".join("lambda_max" if e == "max" else "lambda_min" for e in opts.ends)
                warnings.warn(f"certify=True: the certified bracket of {names} is {width:.3g} wide (relative), "
                              f"not rtol={opts.rtol:g}: {wc.why or 'the certificate could not tighten further'}",
                              RuntimeWarning, stacklevel=3)
        extra["lanczos_s"] = time.perf_counter() - t0
    max_b = (float(max(max_lo)), float(min(max_hi)))
    min_b = (float(max(min_lo)), float(min(min_hi)))
    if any(not math.isfinite(v) for v in (*max_b, *min_b)):
        raise FloatingPointError("a certified bound is not finite")  # pragma: no cover
    if max_b[0] > max_b[1] or min_b[0] > min_b[1]:  # every item is proved, with its rounding allowance
        raise FloatingPointError(  # pragma: no cover
            f"internal error: certified bounds disagree (lambda_max in {max_b}, lambda_min in {min_b}): "
            "a rounding allowance is too small; please report this model")
    extra["lambda_max_bracket"], extra["lambda_min_bracket"] = max_b, min_b
    if opts.exact:  # the estimates, inside what is certified (the GGN's lambda_min = 0 when its rank < P);
        # an eigenvalue lies within the residual of the Rayleigh quotient, so within the residual plus
        # the shift of the moved estimate
        for key, (lo, hi) in (("lambda_max", max_b), ("lambda_min", min_b)):
            est = float(extra[key])
            moved = min(max(est, lo), hi)
            if moved != est:
                extra[key] = moved
                extra[key + "_residual"] = up(extra[key + "_residual"] + abs(moved - est), 2)
        lam = extra["lambda_max"]
        extra["tightness"] = res.lambda_max_upper / lam if lam > 0 else None
    extra["trace_allowance"], extra["trace_sq_allowance"] = e1, e2
    return dataclasses.replace(res, **extra)
