"""certify=True gives up early, with the reason, when the two moments cannot reach rtol.

A random (untrained) network's Hessian has most of tr(H^2) in a bulk of many small
eigenvalues; the deflated certificate cannot see past it, since tr(H) and tr(H^2) cannot tell
a spread-out bulk from one large eigenvalue.  These tests check that certify=True then stops
well before lanczos_maxiter, says why, still holds against eigvalsh of an independent dense
Hessian (finite differences of the reference gradient, tests/reference.py), that running on
to lanczos_maxiter would not have met rtol either, and that it never gives up where Lanczos
may span the whole space.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import reference as R
import wsbound_fast as wsb
from wsbound_fast._spectral import certify

MAXITER = 240


def _bulk_model(seed: int, dims=(20, 40, 4), n: int = 200):
    rng = np.random.default_rng(seed)
    layers = [(rng.standard_normal((b, a)) / np.sqrt(a), 0.1 * rng.standard_normal(b)) for a, b in zip(dims[:-1], dims[1:])]
    return layers, rng.standard_normal((n, dims[0])), rng.integers(0, dims[-1], n)


@pytest.fixture(scope="module")
def bulk():
    layers, X, y = _bulk_model(0)
    return layers, X, y, np.linalg.eigvalsh(R.fd_hessian(layers, "tanh", X, y))


def _run(layers, X, y, **kw):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = wsb.bound(layers, X, y, activation="tanh", certify=True, rtol=0.01, **kw)
    return res, [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]


def _holds(res, eig):
    s = 1e-9 * float(np.abs(eig).max())  # the finite-difference reference's own error
    lo, hi = res.lambda_max_bracket
    assert lo <= hi and lo <= eig[-1] + s and eig[-1] <= hi + s
    lo, hi = res.lambda_min_bracket
    assert lo <= hi and lo <= eig[0] + s and eig[0] <= hi + s


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_gives_up_early_with_the_reason_and_stays_certified(bulk, which, backend):
    layers, X, y, eig = bulk
    res, msgs = _run(layers, X, y, which=which, lanczos_maxiter=MAXITER, backend=backend)
    name = "lambda_max" if which == "LA" else "lambda_min"
    assert res.certify_met is False and res.certify_width > 0.01
    assert res.lanczos_iterations <= MAXITER // 2  # it stopped early
    assert len(msgs) == 1 and f"the moments cannot certify {name} to rtol" in msgs[0]
    assert "of tr(H^2)" in msgs[0] and f"lanczos_maxiter = {MAXITER}" in msgs[0]
    _holds(res, eig)


def test_running_on_to_maxiter_would_not_have_met_rtol(bulk, monkeypatch):
    layers, X, y, eig = bulk
    early, _ = _run(layers, X, y, lanczos_maxiter=MAXITER)
    monkeypatch.setattr(certify, "STALL_BLOCKS", 10 ** 9)  # never give up
    full, msgs = _run(layers, X, y, lanczos_maxiter=MAXITER)
    assert full.lanczos_iterations == MAXITER > early.lanczos_iterations
    assert full.certify_met is False and full.certify_width > 0.01
    assert "lanczos_maxiter = 240 products were used" in msgs[0]
    _holds(full, eig)


def test_never_gives_up_where_lanczos_may_span_the_space():
    layers, X, y = _bulk_model(1, dims=(6, 12, 3), n=40)  # P = 84 + 39 = 123
    eig = np.linalg.eigvalsh(R.fd_hessian(layers, "tanh", X, y))
    res, msgs = _run(layers, X, y)  # the default lanczos_maxiter is min(P, ...) = P here
    assert res.certify_met is True and not msgs
    _holds(res, eig)


def test_a_reachable_rtol_is_not_given_up(bulk):
    layers, X, y, eig = bulk
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = wsb.bound(layers, X, y, activation="tanh", certify=True, rtol=2.0, lanczos_maxiter=MAXITER)
    assert res.certify_met is True and res.certify_width <= 2.0  # 1.70 at 240 products
    _holds(res, eig)


def test_stall_rule():
    # the contraction falls by 0.01 per 8 products; twice that pace takes it from 0.29 to
    # 0.05 / 1.05 (hi/lo - 1 = 0.05) in about 100 products
    hist = [(8 * i, 1.0, 0.34 - 0.01 * i) for i in range(1, 6)]
    assert certify._stalled(hist, 0.05, 500, 8) == ""
    why = certify._stalled(hist, 0.05, 60, 8)
    assert "bracket would be 1 wide" in why and "wide after lanczos_maxiter = 60 products" in why
    assert certify._stalled(hist[:4], 0.05, 60, 8) == ""  # too little history
    assert certify._stalled([(8, 0.3, 0.23), (40, 0.3, 0.23)], 0.35, 60, 8) == ""  # already below rtol
    assert certify._stalled([(8, 0.3, 0.23), (40, 0.3, 0.23)], 0.1, 60000, 8) != ""  # no progress at all


def test_width_is_hi_over_lo_minus_one():
    assert certify.relative_width(2.0, 3.0) == 0.5 and certify.relative_width(-3.0, -2.0) == 0.5
    assert certify.relative_width(-1.0, 3.0) == pytest.approx(4.0 / 3.0) and certify.relative_width(0.0, 0.0) == 0.0
    assert certify.relative_width(1e-9, 2e-9, radius=1.0) == pytest.approx(1e-3)  # ~0: against 1e-6 of the radius
    assert certify._contraction(2.0, 3.0, 0.0) == pytest.approx(1.0 / 3.0)
