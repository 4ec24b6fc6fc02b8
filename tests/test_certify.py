"""Certificates: rank-aware, per-layer, Lanczos and deflated bounds against eigvalsh.

Every bound must hold for the spectrum of an independent dense reference (finite
differences of a backprop gradient for the Hessian, backprop Jacobians for the GGN), on
random models, models with negative curvature, trained models, and when Lanczos is
stopped early with large residuals.  See docs/certificates.md for the statements.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as R
import wsbound_fast as wsb
from wsbound_fast._cli import demo as cli_demo
from wsbound_fast._problem import validate as validation
from wsbound_fast._spectral import certify as spectral_certify

HYPO = settings(max_examples=60, deadline=None, database=None)
EPS = np.finfo(float).eps


def _slack(H_or_eig: np.ndarray) -> float:
    """Rounding allowance: 1e-9 of the Frobenius norm, plus the conditioning of sqrt(t2 - ...)
    (an absolute error ~eps t2 under the root)."""
    eig = H_or_eig if H_or_eig.ndim == 1 else np.linalg.eigvalsh(H_or_eig)
    fro = float(np.sqrt(np.sum(eig * eig)))
    return 1e-9 * fro + math.sqrt(64 * EPS) * fro * 1e-3


def _assert_bound_holds(res: wsb.Bound, eig: np.ndarray) -> None:
    """Every certified field of res against the true spectrum."""
    lo, hi = float(eig[0]), float(eig[-1])
    s = _slack(eig)
    assert res.lambda_max_lower <= hi + s and hi <= res.lambda_max_upper + s
    assert res.lambda_min_lower <= lo + s and lo <= res.lambda_min_upper + s
    assert hi <= res.lambda_max_upper_rank + s
    assert res.lambda_min_lower_rank <= lo + s
    # never looser than the plain bounds
    assert res.lambda_max_upper_rank <= res.lambda_max_upper + s
    assert res.lambda_min_lower_rank >= res.lambda_min_lower - s
    b_lo, b_hi = res.lambda_max_bracket
    assert b_lo <= hi + s and hi <= b_hi + s and b_lo <= b_hi + s
    c_lo, c_hi = res.lambda_min_bracket
    assert c_lo <= lo + s and lo <= c_hi + s and c_lo <= c_hi + s
    assert b_hi <= min(res.lambda_max_upper, res.lambda_max_upper_rank) + s
    assert b_lo >= res.lambda_max_lower - s
    if res.lambda_max is not None:  # Rayleigh quotients
        assert lo - s <= res.lambda_min <= res.lambda_max <= hi + s
        assert res.lambda_max_residual >= 0 and res.lambda_min_residual >= 0
        # some eigenvalue lies within the residual of each Rayleigh quotient
        assert np.min(np.abs(eig - res.lambda_max)) <= res.lambda_max_residual + s
        assert np.min(np.abs(eig - res.lambda_min)) <= res.lambda_min_residual + s
        if res.lambda_max > 0:
            assert res.tightness == pytest.approx(res.lambda_max_upper / res.lambda_max, rel=1e-15)
    if res.certify_k is not None:
        assert hi <= res.lambda_max_upper_deflated + s
        assert res.lambda_min_lower_deflated <= lo + s
        assert b_hi <= res.lambda_max_upper_deflated + s
        assert 1 <= res.certify_k and res.certify_residual >= 0


def _layer_slices(layers) -> list[slice]:
    out, off = [], 0
    for W, b in layers:
        n = W.size + (0 if b is None else b.size)
        out.append(slice(off, off + n))
        off += n
    return out


# --------------------------------------------------------------------------------------
# rank
# --------------------------------------------------------------------------------------

RANK_SPECS = [
    R.ModelSpec((4, 5, 3), "tanh", "all", n=1, seed=920),
    R.ModelSpec((3, 6, 4, 2), "softplus", "none", n=1, seed=921),
    R.ModelSpec((4, 5, 6, 3, 4), ("gelu", "silu", "sigmoid"), "alt", n=1, labels="soft", seed=922),
    R.ModelSpec((6, 3, 5, 4), "gelu_tanh", "all", n=1, seed=923),
    R.ModelSpec((5, 3), "tanh", "all", n=1, seed=924),
    R.ModelSpec((2, 9, 9, 3), "tanh", "all", n=1, seed=925),  # p_1 = 27 < s_1 + ...: the per-block cap
]


@pytest.mark.parametrize("spec", RANK_SPECS, ids=lambda s: f"{s.activation}-{s.dims}")
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_one_sample_rank_is_at_most_r1(spec, curvature, refs):
    layers, X, y = refs.model(spec)
    H = refs.numpy(spec, curvature, "sum")
    prob = validation.validate(layers, X, y, activation=spec.activation_arg(), curvature=curvature,
                              reduction="sum")
    r1 = spectral_certify.sample_rank(prob)
    d = spec.dims
    closed = d[-1] - 1 + (2 * sum(d[1:-1]) if curvature == "hessian" else 0)
    assert r1 <= closed
    rank = np.linalg.matrix_rank(H, tol=1e-9 * np.abs(H).max())
    assert rank <= r1
    assert spectral_certify.rank_bound(prob) == min(r1, prob.n_params) or spectral_certify.rank_bound(prob) <= r1


DATA_SPECS = [
    R.ModelSpec((4, 5, 3), "tanh", "all", n=3, seed=930),
    R.ModelSpec((3, 6, 4, 2), "sigmoid", "alt", n=2, labels="soft", seed=931),
    R.ModelSpec((4, 5, 6, 3, 4), "softplus", "all", n=2, seed=932),
    R.ModelSpec((6, 4, 3), "gelu", "none", n=4, seed=933),
]


@pytest.mark.parametrize("spec", DATA_SPECS, ids=lambda s: f"{s.activation}-{s.dims}")
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_data_rank_bound_and_rank_aware_bounds_hold(spec, curvature, backend, refs):
    layers, X, y = refs.model(spec)
    H = refs.numpy(spec, curvature, "mean")
    eig = np.linalg.eigvalsh(H)
    res = wsb.bound(layers, X, y, activation=spec.activation_arg(), curvature=curvature, backend=backend)
    assert np.linalg.matrix_rank(H, tol=1e-9 * np.abs(H).max()) <= res.rank <= res.n_params
    assert res.rank < res.n_params  # these small data sets are rank deficient
    _assert_bound_holds(res, eig)


def test_zero_input_columns_reduce_the_rank(refs):
    spec = R.ModelSpec((5, 4, 3), "tanh", "all", n=30, seed=934)
    layers, X, y = refs.model(spec)
    X = X.copy()
    X[:, [0, 3]] = 0.0
    H = R.fd_hessian(layers, "tanh", X, y)
    res = wsb.bound(layers, X, y, activation="tanh")
    assert res.rank == res.n_params - 2 * 4
    assert np.linalg.matrix_rank(H, tol=1e-9 * np.abs(H).max()) <= res.rank
    _assert_bound_holds(res, np.linalg.eigvalsh(H))


@st.composite
def low_rank_spectra(draw):
    n = draw(st.integers(min_value=2, max_value=30))
    r = draw(st.integers(min_value=1, max_value=n))
    nz = draw(st.lists(st.floats(min_value=-50, max_value=50, allow_nan=False), min_size=1, max_size=r))
    # the tiny curvatures of saturated networks (issue 12): scaled by 2^-k (exact), k <= 160
    scale = draw(st.one_of(st.just(1.0), st.integers(min_value=1, max_value=160).map(lambda k: 2.0 ** -k)))
    nz = [0.0 if abs(v) < 1e-100 else v * scale for v in nz]  # no squares below the normal range
    return n, r, np.array(nz + [0.0] * (n - len(nz)))


@HYPO
@given(low_rank_spectra())
def test_ws_bounds_rank_holds_and_is_never_looser(case):
    n, r, eig = case
    t, t2 = float(eig.sum()), float(np.sum(eig * eig))
    plain = wsb.ws_bounds(t, t2, n)
    ranked = wsb.ws_bounds(t, t2, n, rank=r)
    s = 1e-9 * float(np.abs(eig).max()) + math.sqrt(64 * EPS * t2)  # relative: the spectra may be tiny
    assert ranked.rank == (r if r < n else n)
    assert ranked.lambda_max_lower - s <= eig.max() <= ranked.lambda_max_upper + s
    assert ranked.lambda_min_lower - s <= eig.min() <= ranked.lambda_min_upper + s
    assert ranked.lambda_max_upper <= plain.lambda_max_upper + s
    assert ranked.lambda_max_lower >= plain.lambda_max_lower - s
    assert ranked.lambda_min_lower >= plain.lambda_min_lower - s
    assert ranked.lambda_min_upper <= plain.lambda_min_upper + s
    # the un-intersected claim of Lemma 2: max(WS_upper(r), 0) <= WS_upper(n)
    if r < n:
        own = wsb.ws_bounds(t, t2, r)
        assert max(own.lambda_max_upper, 0.0) <= plain.lambda_max_upper + s


def test_ws_bounds_rank_errors():
    with pytest.raises(TypeError, match="rank must be a positive integer"):
        wsb.ws_bounds(1.0, 1.0, 3, rank=1.5)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        wsb.ws_bounds(1.0, 1.0, 3, rank=0)
    with pytest.raises(ValueError, match="rank <= 1"):
        wsb.ws_bounds(1.0, 2.0, 3, rank=1)  # t2 > t^2: not rank one


# --------------------------------------------------------------------------------------
# per-layer bounds
# --------------------------------------------------------------------------------------

LAYER_SPECS = [
    R.ModelSpec((4, 6, 3), "tanh", "all", n=8, seed=940),
    R.ModelSpec((3, 5, 4, 3), ("gelu", "softplus"), "alt", n=7, labels="soft", seed=941),
    R.ModelSpec((3, 4, 5, 3, 2), "sigmoid", "none", n=3, seed=942, w_scale=2.0),
]


@pytest.mark.parametrize("spec", LAYER_SPECS, ids=lambda s: f"{s.activation}-d{s.depth}")
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_layer_bounds_hold_for_diagonal_blocks(spec, curvature, backend, refs):
    layers, X, y = refs.model(spec)
    H = refs.numpy(spec, curvature, "mean")
    res = wsb.bound(layers, X, y, activation=spec.activation_arg(), curvature=curvature, backend=backend)
    lam_max = float(np.linalg.eigvalsh(H)[-1])
    assert len(res.layer_bounds) == spec.depth
    for lb, sl in zip(res.layer_bounds, _layer_slices(layers)):
        blk = H[sl, sl]
        eig = np.linalg.eigvalsh(blk)
        s = _slack(eig) + 1e-12
        assert lb.n_params == blk.shape[0]
        assert lb.trace == pytest.approx(float(np.trace(blk)), rel=1e-9, abs=1e-12)
        assert lb.trace_sq == pytest.approx(float(np.sum(blk * blk)), rel=1e-9, abs=1e-12)
        assert np.linalg.matrix_rank(blk, tol=1e-9 * max(np.abs(blk).max(), 1e-300)) <= lb.rank
        assert lb.lambda_max_lower <= eig[-1] + s and eig[-1] <= lb.lambda_max_upper + s
        assert lb.lambda_min_lower <= eig[0] + s and eig[0] <= lb.lambda_min_upper + s
        assert lb.lambda_max_upper <= lb.lambda_max_upper_plain + s
        assert lb.lambda_min_lower >= lb.lambda_min_lower_plain - s
        assert lb.lambda_max_lower <= lam_max + s  # interlacing: a lower bound on lambda_max(H) too
    assert res.lambda_max_bracket[0] >= max(lb.lambda_max_lower for lb in res.layer_bounds) - 1e-15


# --------------------------------------------------------------------------------------
# the deflated certificate on synthetic matrices (the theorem, independent of networks)
# --------------------------------------------------------------------------------------


def _sym_with_spectrum(eig: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    Q, _ = np.linalg.qr(rng.standard_normal((eig.size, eig.size)))
    return (Q * eig) @ Q.T


SPECTRA = {
    "dominant": lambda rng, n: np.r_[10.0, 6.0, rng.normal(0, 0.3, n - 2)],
    "negative": lambda rng, n: np.r_[-8.0, 3.0, rng.normal(0, 1.0, n - 2)],
    "flat": lambda rng, n: rng.uniform(-1, 1, n),
    "low_rank": lambda rng, n: np.r_[5.0, -2.0, 1.0, np.zeros(n - 3)],
    "cluster": lambda rng, n: np.r_[4.0, 4.0, 4.0 - 1e-9, rng.normal(0, 0.1, n - 3)],
    "psd": lambda rng, n: np.r_[3.0, 1.0, np.abs(rng.normal(0, 0.2, n - 2))],
}


@pytest.mark.parametrize("kind", list(SPECTRA))
@pytest.mark.parametrize("quality", ["random", "noisy", "exact"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_deflated_bounds_hold_for_any_orthonormal_Y(kind, quality, k):
    rng = np.random.default_rng(hash((kind, quality, k)) % 2**32)
    n = 25
    eig = np.sort(SPECTRA[kind](rng, n))
    H = _sym_with_spectrum(eig, rng)
    t, t2 = float(np.trace(H)), float(np.sum(H * H))
    rank = int(np.count_nonzero(np.abs(eig) > 1e-12)) if kind == "low_rank" else None
    _, V = np.linalg.eigh(H)
    top = V[:, np.argsort(-np.abs(np.linalg.eigvalsh(H)))[:k]]
    if quality == "random":
        Y = rng.standard_normal((n, k))
    elif quality == "noisy":
        Y = top + 0.05 * rng.standard_normal((n, k))
    else:
        Y = top
    Y, _ = np.linalg.qr(Y)
    Theta = Y.T @ H @ Y
    theta = np.linalg.eigvalsh(0.5 * (Theta + Theta.T))
    rho = float(np.linalg.norm(H @ Y - Y @ Theta, 2))
    d = spectral_certify.deflated_bounds(t, t2, n, theta, rho, rank)
    s = 1e-9 * math.sqrt(t2) + math.sqrt(64 * EPS * t2)
    assert eig[-1] <= d.max_upper + s
    assert d.min_lower <= eig[0] + s
    # Kahan alone: sqrt(T2) form is never better than the WS-refined one
    T2 = max(t2 - float(np.sum(np.maximum(np.abs(theta) - rho, 0) ** 2)), 0)
    assert d.max_upper <= max(theta.max() + rho, math.sqrt(T2)) + s
    if quality == "exact":  # exact eigenvectors of the largest |lambda|: the bound is sharp-ish
        assert d.max_upper <= math.sqrt(t2) + s
    # the same through ritz_certificate (exact products H @ Y)
    cert = spectral_certify.ritz_certificate(lambda V_: V_ @ H, Y, t, t2, n, rank)
    assert eig[-1] <= cert.deflated.max_upper + s and cert.deflated.min_lower <= eig[0] + s
    assert eig[0] - s <= cert.theta_min <= cert.theta_max <= eig[-1] + s


@HYPO
@given(st.integers(min_value=1, max_value=12), st.integers(min_value=1, max_value=4), st.integers(0, 2**31),
       st.floats(min_value=0.0, max_value=2.0), st.sampled_from([0, 40, 100, 160]))
def test_deflated_bounds_random(n, k, seed, noise, k_scale):
    k = min(k, n)
    rng = np.random.default_rng(seed)
    # scaled by 2^-k_scale (exact): the tiny curvatures of saturated networks (issue 12)
    eig = np.sort(rng.normal(0, 1, n) * rng.choice([0.0, 1.0, 5.0], n)) * 2.0 ** -k_scale
    H = _sym_with_spectrum(eig, rng)
    Y, _ = np.linalg.qr(np.linalg.eigh(H)[1][:, -k:] + noise * rng.standard_normal((n, k)))
    Theta = Y.T @ H @ Y
    theta = np.linalg.eigvalsh(0.5 * (Theta + Theta.T))
    rho = float(np.linalg.norm(H @ Y - Y @ Theta, 2))
    rank = int(np.count_nonzero(eig))
    t, t2 = float(eig.sum()), float(np.sum(eig * eig))
    s = 1e-9 * math.sqrt(t2) + math.sqrt(64 * EPS * t2)  # relative: the spectra may be tiny
    for r in (None, max(rank, 1)):
        d = spectral_certify.deflated_bounds(t, t2, n, theta, rho, r)
        assert eig[-1] <= d.max_upper + s and d.min_lower <= eig[0] + s


# --------------------------------------------------------------------------------------
# bound(exact=True, certify=k) on networks
# --------------------------------------------------------------------------------------

NET_SPECS = [
    R.ModelSpec((4, 6, 3), "tanh", "all", n=8, seed=950),
    R.ModelSpec((3, 5, 4, 3), ("gelu", "softplus"), "alt", n=7, labels="soft", seed=951),
    R.ModelSpec((3, 4, 5, 3, 2), "sigmoid", "none", n=6, seed=952, w_scale=2.5, last_scale=3.0),
    R.ModelSpec((5, 3), "tanh", "all", n=9, labels="soft", seed=953),
    R.ModelSpec((6, 8, 8, 4), "silu", "all", n=12, seed=954, w_scale=2.0),
]


@pytest.mark.parametrize("spec", NET_SPECS, ids=lambda s: f"{s.activation}-d{s.depth}")
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_exact_and_certified_on_random_models(spec, curvature, backend, refs):
    layers, X, y = refs.model(spec)
    H = refs.numpy(spec, curvature, "mean")
    eig = np.linalg.eigvalsh(H)
    res = wsb.bound(layers, X, y, activation=spec.activation_arg(), curvature=curvature, backend=backend,
                    certify=4)
    _assert_bound_holds(res, eig)
    scale = float(np.abs(eig).max())
    assert res.lanczos_converged
    assert res.lambda_max == pytest.approx(eig[-1], abs=1e-8 * scale)
    if curvature == "hessian":  # (for the GGN Lanczos does not wait for the bottom: lambda_min >= 0 is known)
        assert res.lambda_min == pytest.approx(eig[0], abs=1e-8 * scale)
    else:
        assert res.lambda_min_bracket[0] == 0.0
    if curvature == "hessian" and spec.depth > 1:
        assert eig[0] < -1e-6 * scale  # these random models have negative curvature
        assert res.lambda_min < 0


@pytest.mark.parametrize("spec", NET_SPECS[1:4], ids=lambda s: f"{s.activation}-d{s.depth}")
@pytest.mark.parametrize(("maxiter", "k"), [(1, 1), (2, 3), (3, 6), (5, 12)])
def test_certificates_hold_when_lanczos_is_stopped_early(spec, maxiter, k, refs):
    layers, X, y = refs.model(spec)
    H = refs.numpy(spec, "hessian", "mean")
    eig = np.linalg.eigvalsh(H)
    res = wsb.bound(layers, X, y, activation=spec.activation_arg(), certify=k, lanczos_maxiter=maxiter,
                    lanczos_tol=0.0)
    assert res.lanczos_iterations == maxiter and res.lanczos_converged is False
    assert res.certify_residual > 1e-6 * float(np.abs(eig).max())  # genuinely unconverged
    _assert_bound_holds(res, eig)


def _train(layers, activation, X, y, steps, lr=0.5, momentum=0.9):
    """Full-batch gradient descent with momentum on the mean loss (reference gradient)."""
    acts = R.per_layer_activations(activation, len(layers) - 1)
    shapes = R.layer_shapes(layers)
    Y = R.label_rows(y, shapes[-1][0])
    theta = R.flatten(layers)
    vel = np.zeros_like(theta)
    for _ in range(steps):
        vel = momentum * vel - lr * R.gradient(R.unflatten(theta, shapes), acts, X, Y, "mean")
        theta = theta + vel
    return R.unflatten(theta, shapes), R.loss(R.unflatten(theta, shapes), acts, X, Y, "mean")


def _ggn(layers, activation, X, y) -> np.ndarray:
    """R.ggn_reference (backprop Jacobians, mean reduction) with the contraction done as one GEMM."""
    acts = R.per_layer_activations(activation, len(layers) - 1)
    J = R.logit_jacobians(layers, acts, X)  # (N, C, P)
    p = R.softmax(R.forward(layers, acts, np.asarray(X, dtype=float))[0])
    A = np.einsum("nk,kl->nkl", p, np.eye(p.shape[1])) - p[:, :, None] * p[:, None, :]  # hard labels: w = 1
    N, C, P = J.shape
    G = J.reshape(N * C, P).T @ np.matmul(A, J).reshape(N * C, P) / N
    return 0.5 * (G + G.T)


@pytest.fixture(scope="module")
def trained_digits():
    """Small digits MLPs trained to low loss (a few hundred GD steps), and their references."""
    X, y = wsb.load_digits()
    idx = np.random.default_rng(0).choice(X.shape[0], 120, replace=False)
    X, y = X[idx], y[idx]
    out = {}
    for act, sizes in (("tanh", (64, 8, 10)), ("sigmoid", (64, 8, 10)), ("tanh", (64, 6, 6, 10))):
        layers = [(W, b) for W, b in cli_demo.init_mlp(sizes, np.random.default_rng(1))]
        lr = 2.0 if act == "sigmoid" else 0.5
        layers, final_loss = _train(layers, act, X, y, steps=300, lr=lr)
        out[(act, len(sizes))] = (layers, final_loss)
    return X, y, out


@pytest.mark.parametrize("key", [("tanh", 3), ("sigmoid", 3), ("tanh", 4)], ids=lambda k: f"{k[0]}-{k[1]}")
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_certificates_on_trained_digits_models(trained_digits, key, curvature):
    X, y, models = trained_digits
    layers, final_loss = models[key]
    assert final_loss < 0.05  # trained to low loss
    act = key[0]
    H = R.fd_hessian(layers, act, X, y) if curvature == "hessian" else _ggn(layers, act, X, y)
    eig = np.linalg.eigvalsh(H)
    res = wsb.bound(layers, X, y, activation=act, curvature=curvature, certify=10)
    _assert_bound_holds(res, eig)
    scale = float(np.abs(eig).max())
    assert res.lambda_max == pytest.approx(eig[-1], abs=1e-8 * scale)
    # on trained networks the top eigenvalues carry most of |H|_F^2: the deflated bound is
    # close to lambda_max and tighter than plain WS
    assert res.lambda_max_upper_deflated < res.lambda_max_upper
    assert res.lambda_max_bracket[1] <= 1.2 * eig[-1]


def test_exact_fields_default_none_and_to_dict():
    spec = NET_SPECS[0]
    layers, X, y = spec.build()
    plain = wsb.bound(layers, X, y, activation="tanh")
    assert plain.lambda_max is None and plain.tightness is None and plain.certify_k is None
    assert plain.rank is not None and plain.layer_bounds is not None and plain.lambda_max_bracket is not None
    res = wsb.bound(layers, X, y, activation="tanh", exact=True)
    assert res.lambda_max is not None and res.certify_k is None and res.lanczos_s >= 0
    d = res.to_dict()
    assert d["lambda_max"] == res.lambda_max and isinstance(d["layer_bounds"][0], dict)
    text = repr(res)
    assert "Lanczos" in text and "certified" in text and "layer 1" in text
    assert "deflated" in repr(wsb.bound(layers, X, y, activation="tanh", certify=2))
    # the old constructor (without the new fields) still works
    old = wsb.Bound(n_params=1, n_samples=1, trace=1.0, trace_sq=1.0, mean=1.0, std=0.0, lambda_max_lower=1.0,
                    lambda_max_upper=1.0, lambda_min_lower=1.0, lambda_min_upper=1.0, curvature="hessian",
                    reduction="mean", backend="cpp", elapsed_s=0.0)
    assert old.rank is None and "lambda_max in" in repr(old)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.lambda_max = 0.0  # type: ignore[misc]
    # deterministic for a seed
    again = wsb.bound(layers, X, y, activation="tanh", exact=True)
    assert again.lambda_max == res.lambda_max and again.lambda_max_bracket == res.lambda_max_bracket


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"exact": "yes"}, TypeError, "exact must be True or False"),
    ({"certify": 0}, ValueError, r"certify must satisfy 1 <= k <= P = 51"),
    ({"certify": 52}, ValueError, "certify must satisfy"),
    ({"certify": 2.0}, TypeError, "certify must be None, True .* or a positive integer"),
    ({"certify": "yes"}, TypeError, "certify must be None, True .* or a positive integer"),
    ({"certify": True, "rtol": 0.0}, ValueError, r"rtol must be a number in \(0, 10\]"),
    ({"certify": True, "rtol": float("nan")}, ValueError, "rtol must be"),
    ({"certify": True, "which": "LM"}, ValueError, "which must be 'LA'"),
    ({"exact": True, "lanczos_tol": -1e-3}, ValueError, "lanczos_tol must be a finite number >= 0"),
    ({"exact": True, "lanczos_maxiter": 0}, ValueError, "lanczos_maxiter must be >= 1"),
    ({"exact": True, "seed": -2}, TypeError, "seed must be a non-negative integer"),
])
def test_bound_bad_exact_arguments(kwargs, exc, match):
    layers, X, y = NET_SPECS[0].build()
    with pytest.raises(exc, match=match):
        wsb.bound(layers, X, y, **{"activation": "tanh", **kwargs})


# --------------------------------------------------------------------------------------
# certify=True: certified to a requested width (block Lanczos, judged by the certificate)
# --------------------------------------------------------------------------------------


def _width(lo: float, hi: float, radius: float) -> float:
    """hi/lo - 1 (lo/hi - 1 below 0); a bracket around 0 against its larger end, and an
    eigenvalue ~0 against 1e-6 of the spectral radius."""
    floor = 1e-6 * radius
    if lo > floor:
        return (hi - lo) / lo  # hi/lo - 1, without its cancellation
    if hi < -floor:
        return (hi - lo) / -hi
    return (hi - lo) / (max(abs(lo), abs(hi), floor) if lo <= 0 <= hi else floor)


@pytest.mark.parametrize("spec", NET_SPECS, ids=lambda s: f"{s.activation}-d{s.depth}")
@pytest.mark.parametrize("which", ["LA", "SA", "BE"])
@pytest.mark.parametrize("rtol", [0.1, 1e-3])
def test_certify_to_width_on_random_models(spec, which, rtol, refs):
    layers, X, y = refs.model(spec)
    eig = np.linalg.eigvalsh(refs.numpy(spec, "hessian", "mean"))
    res = wsb.bound(layers, X, y, activation=spec.activation_arg(), certify=True, rtol=rtol, which=which)
    _assert_bound_holds(res, eig)
    assert res.certify_met is True and res.certify_rtol == rtol
    lo, hi = res.lambda_max_bracket
    c_lo, c_hi = res.lambda_min_bracket
    assert lo <= eig[-1] <= hi and c_lo <= eig[0] <= c_hi  # no slack: the brackets hold as printed
    asked = {"LA": [(lo, hi)], "SA": [(c_lo, c_hi)], "BE": [(lo, hi), (c_lo, c_hi)]}[which]
    radius = max(abs(lo), abs(c_hi))
    assert res.certify_width == pytest.approx(max(_width(a, b, radius) for a, b in asked), rel=1e-12, abs=1e-300)
    assert all(_width(a, b, radius) <= rtol for a, b in asked)  # it met rtol as it says


@pytest.mark.parametrize("key", [("tanh", 3), ("tanh", 4)], ids=lambda k: f"{k[0]}-{k[1]}")
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_certify_to_width_on_trained_digits_models(trained_digits, key, curvature):
    X, y, models = trained_digits
    layers, _ = models[key]
    act = key[0]
    H = R.fd_hessian(layers, act, X, y) if curvature == "hessian" else _ggn(layers, act, X, y)
    eig = np.linalg.eigvalsh(H)
    for rtol in (0.1, 0.01, 1e-3):
        res = wsb.bound(layers, X, y, activation=act, curvature=curvature, certify=True, rtol=rtol)
        _assert_bound_holds(res, eig)
        lo, hi = res.lambda_max_bracket
        assert res.certify_met and lo <= hi and hi / lo - 1 <= rtol * (1 + 1e-12)
        s = 1e-9 * float(np.abs(eig).max())  # the dense reference's own error (finite differences)
        assert lo <= eig[-1] + s and eig[-1] <= hi + s


def test_certify_to_width_is_deterministic_and_stops_short_with_a_warning(refs):
    spec = NET_SPECS[4]
    layers, X, y = refs.model(spec)
    eig = np.linalg.eigvalsh(refs.numpy(spec, "hessian", "mean"))
    kw = dict(activation=spec.activation_arg(), certify=True, rtol=1e-6, seed=3)
    a, b = wsb.bound(layers, X, y, **{"activation": "tanh", **kw}), wsb.bound(layers, X, y, **{"activation": "tanh", **kw})
    assert a.lambda_max_bracket == b.lambda_max_bracket and a.lanczos_iterations == b.lanczos_iterations
    with pytest.warns(RuntimeWarning, match=r"certify=True: the certified bracket of lambda_max is .* wide"):
        short = wsb.bound(layers, X, y, **dict(kw, rtol=1e-9), lanczos_maxiter=8)
    assert short.certify_met is False and short.certify_width > 1e-9 and short.lanczos_iterations <= 8
    _assert_bound_holds(short, eig)  # still certified, only wider
