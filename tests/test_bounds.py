"""Wolkowicz-Styan bounds: closed forms, random symmetric matrices, and bound() vs eigvalsh."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import reference as R
import wsbound_fast as wsb

FIELDS = ("lambda_max_lower", "lambda_max_upper", "lambda_min_lower", "lambda_min_upper")
HYPO = settings(max_examples=60, deadline=None, database=None)


def _moments(eigs) -> tuple[float, float]:
    eigs = np.asarray(eigs, dtype=float)
    return float(eigs.sum()), float(np.sum(eigs * eigs))


def _moment_slack(trace_sq: float, n: int, lam_abs_max: float) -> float:
    """How far float64 moments can move the bounds: 1e-9 relative, plus the conditioning of
    s^2 = trace_sq/n - m^2 (rounding error ~eps trace_sq/n in s^2, i.e. ~sqrt of that in s,
    amplified by sqrt(n - 1)) for spectra whose spread is tiny next to their mean."""
    eps = np.finfo(float).eps
    return 1e-9 * lam_abs_max + math.sqrt(max(n - 1, 0)) * math.sqrt(8 * eps * trace_sq / n)


def _assert_brackets(ws, lmin: float, lmax: float, slack: float) -> None:
    assert ws.lambda_max_lower <= lmax + slack
    assert lmax <= ws.lambda_max_upper + slack
    assert ws.lambda_min_lower <= lmin + slack
    assert lmin <= ws.lambda_min_upper + slack


# ------------------------------------------------------------------------------------
# closed forms
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b"), [(3.0, -1.0), (2.5, 2.5), (1e-3, 7.0), (-4.0, -9.0), (0.0, 0.0)])
def test_n2_bounds_are_the_eigenvalues(a, b):
    t, t2 = _moments([a, b])
    ws = wsb.ws_bounds(t, t2, 2)
    hi, lo = max(a, b), min(a, b)
    tol = 1e-14 * max(1.0, abs(a), abs(b))
    assert ws.lambda_max_lower == pytest.approx(hi, abs=tol)
    assert ws.lambda_max_upper == pytest.approx(hi, abs=tol)
    assert ws.lambda_min_lower == pytest.approx(lo, abs=tol)
    assert ws.lambda_min_upper == pytest.approx(lo, abs=tol)


@pytest.mark.parametrize("n", [2, 3, 5, 17, 1000])
@pytest.mark.parametrize(("lam", "mu"), [(5.0, 1.0), (1.0, 0.0), (2.0, -3.0)])
def test_one_outlier_attains_the_outer_bound(n, lam, mu):
    """Spectrum (lam, mu, ..., mu), lam > mu: lambda_max_upper = lam, lambda_min_upper = mu;
    mirrored (mu, ..., mu, lam') with lam' < mu: lambda_min_lower = lam', lambda_max_lower = mu."""
    eigs = [lam] + [mu] * (n - 1)
    ws = wsb.ws_bounds(*_moments(eigs), n)
    tol = 1e-12 * max(abs(lam), abs(mu), 1.0) * math.sqrt(n)
    assert ws.lambda_max_upper == pytest.approx(lam, abs=tol)
    assert ws.lambda_min_upper == pytest.approx(mu, abs=tol)
    low = mu - (lam - mu)
    ws = wsb.ws_bounds(*_moments([low] + [mu] * (n - 1)), n)
    assert ws.lambda_min_lower == pytest.approx(low, abs=tol)
    assert ws.lambda_max_lower == pytest.approx(mu, abs=tol)


@pytest.mark.parametrize(("trace", "trace_sq", "n", "mean", "std"),
                         [(6.0, 14.0, 3, 2.0, math.sqrt(14 / 3 - 4)), (0.0, 8.0, 2, 0.0, 2.0), (-3.0, 9.0, 1, -3.0, 0.0)])
def test_mean_std_and_formulas(trace, trace_sq, n, mean, std):
    ws = wsb.ws_bounds(trace, trace_sq, n)
    assert ws.n == n and ws.trace == trace and ws.trace_sq == trace_sq
    assert ws.mean == pytest.approx(mean, rel=1e-15, abs=1e-15)
    assert ws.std == pytest.approx(std, rel=1e-14, abs=1e-15)
    r = math.sqrt(max(n - 1, 1))
    if n > 1:
        assert ws.lambda_max_lower == pytest.approx(mean + std / r, rel=1e-14)
        assert ws.lambda_max_upper == pytest.approx(mean + std * r, rel=1e-14)
        assert ws.lambda_min_lower == pytest.approx(mean - std * r, rel=1e-14, abs=1e-14)
        assert ws.lambda_min_upper == pytest.approx(mean - std / r, rel=1e-14, abs=1e-14)
    else:
        assert all(getattr(ws, f) == mean for f in FIELDS)
    d = ws.to_dict()
    assert set(FIELDS) <= set(d) and d["mean"] == ws.mean


def test_n1_all_bounds_equal_the_value():
    ws = wsb.ws_bounds(-2.5, 6.25, 1)
    assert all(getattr(ws, f) == -2.5 for f in FIELDS)
    assert ws.std == 0.0


@pytest.mark.parametrize("n", [1, 2, 10, 12345])
@pytest.mark.parametrize("c", [0.1, -3.0, 7.7e5, 1e-200])
def test_multiple_of_identity_with_rounding(n, c):
    """c I: variance 0; a trace_sq a few ulps below trace^2/n is rounding, not an error."""
    t = n * c
    t2 = n * c * c * (1.0 - 4e-16)
    ws = wsb.ws_bounds(t, t2, n)
    for f in FIELDS:
        assert getattr(ws, f) == pytest.approx(c, rel=1e-6)


def test_accepts_numpy_scalars():
    ws = wsb.ws_bounds(np.float64(3.0), np.float32(5.0), np.int64(2))
    assert ws.lambda_max_upper == pytest.approx(2.0) and ws.lambda_min_lower == pytest.approx(1.0)
    ws = wsb.ws_bounds(3, 5, 2)  # Python ints
    assert ws.lambda_max_upper == pytest.approx(2.0)


# ------------------------------------------------------------------------------------
# ws_bounds errors
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, -100])
def test_n_below_one(n):
    with pytest.raises(ValueError, match=r"\bn\b"):
        wsb.ws_bounds(1.0, 1.0, n)


@pytest.mark.parametrize("n", [2.0, 2.5, "3", None, True, [3]])
def test_n_not_an_integer(n):
    with pytest.raises(TypeError, match=r"\bn\b"):
        wsb.ws_bounds(1.0, 1.0, n)


@pytest.mark.parametrize(("trace", "trace_sq", "n"), [(2.0, 1.0, 2), (3.0, 2.9, 3), (10.0, 99.0, 1), (-4.0, 7.9, 2)])
def test_inconsistent_moments(trace, trace_sq, n):
    with pytest.raises(ValueError, match="trace_sq"):
        wsb.ws_bounds(trace, trace_sq, n)


def test_negative_trace_sq():
    with pytest.raises(ValueError, match="trace_sq"):
        wsb.ws_bounds(0.0, -1.0, 3)


@pytest.mark.parametrize("name", ["trace", "trace_sq"])
@pytest.mark.parametrize("bad", ["1.0", None, [1.0], 1 + 2j, True])
def test_non_numbers(name, bad):
    kw = {"trace": 1.0, "trace_sq": 5.0, "n": 3}
    kw[name] = bad
    with pytest.raises(TypeError, match=name):
        wsb.ws_bounds(**kw)


@pytest.mark.parametrize("name", ["trace", "trace_sq"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite(name, bad):
    kw = {"trace": 1.0, "trace_sq": 5.0, "n": 3}
    kw[name] = bad
    with pytest.raises(ValueError, match=name):
        wsb.ws_bounds(**kw)


# ------------------------------------------------------------------------------------
# random matrices (hypothesis)
# ------------------------------------------------------------------------------------

def _no_tiny(v: float) -> float:
    # squares of |v| < 1e-150 underflow (subnormal trace_sq): not what these tests are about
    return 0.0 if abs(v) < 1e-100 else v


_entries = st.floats(min_value=-100.0, max_value=100.0, allow_nan=False, allow_infinity=False).map(_no_tiny)
# Curvatures of saturated networks (issue 12) are tiny: scale by 2^-k (exact), k up to 160, so
# that every square still stays a normal number (the entries are >= 1e-100 or 0).
_scales = st.one_of(st.just(1.0), st.integers(min_value=1, max_value=160).map(lambda k: 2.0 ** -k))


@st.composite
def symmetric_matrices(draw):
    n = draw(st.integers(min_value=1, max_value=9))
    M = draw(arrays(np.float64, (n, n), elements=_entries))
    return 0.5 * (M + M.T) * draw(_scales)


@HYPO
@given(symmetric_matrices())
def test_brackets_random_symmetric_matrices(S):
    n = S.shape[0]
    eig = np.linalg.eigvalsh(S)
    t2 = float(np.sum(S * S))
    ws = wsb.ws_bounds(float(np.trace(S)), t2, n)
    slack = _moment_slack(t2, n, float(np.abs(eig).max()))
    _assert_brackets(ws, float(eig[0]), float(eig[-1]), slack)
    # ordering of the four bounds and the mean
    assert ws.lambda_min_lower <= ws.lambda_min_upper + slack
    assert ws.lambda_min_upper <= ws.mean + slack <= ws.lambda_max_lower + 2 * slack
    assert ws.lambda_max_lower <= ws.lambda_max_upper + slack
    # the upper bound is never worse than the Frobenius norm (Cauchy-Schwarz)
    assert ws.lambda_max_upper <= math.sqrt(float(np.sum(S * S))) + slack


@HYPO
@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).map(_no_tiny), min_size=1, max_size=40),
       _scales)
def test_brackets_any_spectrum(eigs, scale):
    """Any spectrum is the spectrum of a real symmetric matrix (diagonal)."""
    eigs = [e * scale for e in eigs]
    t, t2 = _moments(eigs)
    ws = wsb.ws_bounds(t, t2, len(eigs))
    slack = _moment_slack(t2, len(eigs), max(abs(e) for e in eigs))
    _assert_brackets(ws, min(eigs), max(eigs), slack)


# ------------------------------------------------------------------------------------
# bound() against eigvalsh of a dense reference
# ------------------------------------------------------------------------------------

SPECS = [
    R.ModelSpec((4, 6, 3), "tanh", "all", n=8, labels="hard", seed=500),
    R.ModelSpec((3, 5, 4, 3), ("gelu", "softplus"), "alt", n=7, labels="soft", seed=501),
    R.ModelSpec((3, 4, 5, 3, 2), "sigmoid", "none", n=6, labels="hard", seed=502),
    R.ModelSpec((5, 3), "tanh", "all", n=9, labels="soft", seed=503),
    R.ModelSpec((4, 6, 3), "relu", "all", n=8, labels="hard", seed=504, margin=0.05),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.activation}-d{s.depth}")
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_bound_brackets_reference_eigenvalues(spec, curvature, backend, refs):
    layers, X, y = refs.model(spec)
    ref = refs.numpy(spec, curvature, "mean")
    res = wsb.bound(layers, X, y, activation=spec.activation_arg(), curvature=curvature, backend=backend)
    eig = np.linalg.eigvalsh(ref)
    slack = 1e-9 * float(np.abs(eig).max())
    _assert_brackets(res, float(eig[0]), float(eig[-1]), slack)
    if curvature == "ggn":
        # J^T A J is positive semi-definite; its trace is the sum of non-negative eigenvalues
        assert res.trace >= 0 and res.lambda_max_upper >= 0


def test_bound_fields_are_ws_bounds_of_the_moments(backend, refs):
    spec = SPECS[1]
    layers, X, y = refs.model(spec)
    res = wsb.bound(layers, X, y, activation=spec.activation_arg(), backend=backend)
    ws = wsb.ws_bounds(res.trace, res.trace_sq, res.n_params, trace_err=res.trace_allowance,
                       trace_sq_err=res.trace_sq_allowance)
    assert res.n_params == R.n_params(layers) and res.n_samples == X.shape[0]
    for f in ("mean", "std", *FIELDS):
        assert getattr(res, f) == getattr(ws, f), f
    d = res.to_dict()
    assert d["trace"] == res.trace and d["backend"] == backend and d["n_params"] == res.n_params
    assert {"elapsed_s", "curvature", "reduction", "trace_sq"} <= set(d)
    assert res.elapsed_s >= 0
    assert "lambda_max" in repr(res)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.trace = 0.0  # type: ignore[misc]


# ------------------------------------------------------------------------------------
# results read back: Bound.from_dict / WSBounds.from_dict (also through JSON)
# ------------------------------------------------------------------------------------


def test_bound_from_dict_round_trips_through_json(refs):
    import json

    spec = SPECS[1]
    layers, X, y = refs.model(spec)
    for kw in ({}, {"exact": True}, {"certify": 2}):
        res = wsb.bound(layers, X, y, activation=spec.activation_arg(), **kw)
        assert wsb.Bound.from_dict(res.to_dict()) == res
        back = wsb.Bound.from_dict(json.loads(json.dumps(res.to_dict())))
        assert back == res
        assert isinstance(back.lambda_max_bracket, tuple) and isinstance(back.lambda_min_bracket, tuple)
        assert back.layer_bounds and all(isinstance(lb, wsb.LayerBound) for lb in back.layer_bounds)
        lo, hi = back.lambda_max_bracket  # typed as always present: unpacks without a None check
        assert lo <= hi


def test_bound_brackets_always_present():
    """bound() sets the brackets and layer bounds; a Bound made by hand without them gets the WS
    intervals and no layers (not None), and reads back from its dict the same."""
    old = wsb.Bound(n_params=2, n_samples=1, trace=1.0, trace_sq=1.0, mean=0.5, std=0.5, lambda_max_lower=0.6,
                    lambda_max_upper=1.0, lambda_min_lower=0.0, lambda_min_upper=0.4, curvature="hessian",
                    reduction="mean", backend="cpp", elapsed_s=0.0)
    assert old.lambda_max_bracket == (0.6, 1.0) and old.lambda_min_bracket == (0.0, 0.4)
    assert old.layer_bounds == ()
    assert wsb.Bound.from_dict(old.to_dict()) == old
    given = dataclasses.replace(old, lambda_max_bracket=(0.7, 0.9))
    assert given.lambda_max_bracket == (0.7, 0.9) and given.lambda_min_bracket == (0.0, 0.4)
    hints = {f.name: f.type for f in dataclasses.fields(wsb.Bound)}
    for name in ("lambda_max_bracket", "lambda_min_bracket", "layer_bounds"):
        assert "None" not in str(hints[name]), name


def test_bound_from_dict_refuses_bad_input():
    d = wsb.bound(*_tiny(), activation="tanh").to_dict()
    with pytest.raises(ValueError, match="unknown keys extra"):
        wsb.Bound.from_dict({**d, "extra": 1})
    with pytest.raises(ValueError, match="missing keys trace"):
        wsb.Bound.from_dict({k: v for k, v in d.items() if k != "trace"})
    with pytest.raises(ValueError, match="lambda_max_bracket"):
        wsb.Bound.from_dict({**d, "lambda_max_bracket": [1.0, 2.0, 3.0]})
    with pytest.raises(TypeError, match="mapping"):
        wsb.Bound.from_dict([1, 2])  # type: ignore[arg-type]
    # an older file without the newer fields: their defaults
    older = {k: v for k, v in d.items() if k not in ("trace_allowance", "trace_sq_allowance")}
    assert wsb.Bound.from_dict(older).trace_allowance is None


def _tiny():
    rng = np.random.default_rng(3)
    layers = [(rng.normal(size=(4, 3)), rng.normal(size=4)), (rng.normal(size=(3, 4)), None)]
    return layers, rng.normal(size=(9, 3)), rng.integers(0, 3, 9)


def test_ws_bounds_from_dict():
    import json

    for ws in (wsb.ws_bounds(3.0, 5.0, 4), wsb.ws_bounds(3.0, 5.0, 40, rank=3)):
        assert wsb.WSBounds.from_dict(json.loads(json.dumps(ws.to_dict()))) == ws
    with pytest.raises(ValueError, match="missing keys"):
        wsb.WSBounds.from_dict({"n": 3})
