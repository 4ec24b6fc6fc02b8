"""wsb.eigsh: Lanczos extremes against eigvalsh of independent dense references."""

from __future__ import annotations

import numpy as np
import pytest

import reference as R
import wsbound_fast as wsb

SPECS = [
    R.ModelSpec((5, 3), "tanh", "all", n=6, labels="hard", seed=910),
    R.ModelSpec((4, 6, 3), "softplus", "none", n=7, labels="soft", seed=911),
    R.ModelSpec((3, 5, 4, 3), ("gelu", "silu"), "alt", n=6, labels="hard", seed=912),
    R.ModelSpec((3, 4, 5, 3, 2), "sigmoid", (False, True, True, False), n=5, labels="soft", seed=913, w_scale=2.0),
]
IDS = [f"{s.activation}-d{s.depth}" for s in SPECS]


def _expected(eig: np.ndarray, which: str, k: int) -> np.ndarray:
    if which == "LA":
        return eig[-k:]
    if which == "SA":
        return eig[:k]
    if which == "BE":
        return np.concatenate([eig[: k // 2], eig[len(eig) - (k - k // 2):]])
    return np.sort(eig[np.argsort(-np.abs(eig), kind="stable")[:k]])


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize(("which", "k"), [("LA", 1), ("SA", 1), ("BE", 2), ("LA", 3), ("BE", 3), ("LM", 2)])
def test_eigsh_matches_eigvalsh(spec, curvature, which, k, refs):
    layers, X, y = refs.model(spec)
    H = refs.numpy(spec, curvature, "mean")
    eig = np.linalg.eigvalsh(H)
    got = wsb.eigsh(layers, X, y, k=k, which=which, activation=spec.activation_arg(), curvature=curvature)
    assert got.shape == (k,) and np.all(np.diff(got) >= 0)
    scale = float(np.abs(eig).max())
    # LM: ties in |lambda| (e.g. zero eigenvalues of the GGN) make the set ambiguous; compare |values|
    if which == "LM":
        np.testing.assert_allclose(np.sort(np.abs(got)), np.sort(np.abs(_expected(eig, which, k))), rtol=0,
                                   atol=1e-8 * scale)
    else:
        np.testing.assert_allclose(got, _expected(eig, which, k), rtol=0, atol=1e-8 * scale)


@pytest.mark.parametrize("spec", SPECS[1:3], ids=IDS[1:3])
def test_eigsh_vectors_and_numpy_backend(spec, backend, refs):
    layers, X, y = refs.model(spec)
    H = refs.numpy(spec, "hessian", "mean")
    eig = np.linalg.eigvalsh(H)
    vals, vecs = wsb.eigsh(layers, X, y, k=3, which="BE", activation=spec.activation_arg(), backend=backend,
                           return_eigenvectors=True)
    scale = float(np.abs(eig).max())
    np.testing.assert_allclose(vals, [eig[0], eig[-2], eig[-1]], atol=1e-8 * scale, rtol=0)
    assert vecs.shape == (H.shape[0], 3)
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(3), atol=1e-10)
    assert np.abs(H @ vecs - vecs * vals).max() < 1e-7 * scale


def test_eigsh_deterministic_for_a_seed():
    spec = SPECS[2]
    layers, X, y = spec.build()
    kw = dict(activation=spec.activation_arg(), k=2, which="LA", tol=1e-6, return_eigenvectors=True)
    a = wsb.eigsh(layers, X, y, seed=7, **{"activation": "tanh", **kw})
    b = wsb.eigsh(layers, X, y, seed=7, **{"activation": "tanh", **kw})
    c = wsb.eigsh(layers, X, y, seed=8, **{"activation": "tanh", **kw})
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], c[0], rtol=1e-6)


def test_eigsh_not_converged_warns_and_returns_ritz_values(refs):
    spec = R.ModelSpec((6, 8, 8, 4), "tanh", "all", n=10, seed=914)
    layers, X, y = refs.model(spec)
    eig = np.linalg.eigvalsh(refs.numpy(spec, "hessian", "mean"))
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        got = wsb.eigsh(layers, X, y, activation="tanh", k=2, which="BE", tol=0.0, maxiter=3)
    # Ritz values are Rayleigh quotients: inside the spectrum even when not converged
    slack = 1e-12 * float(np.abs(eig).max())
    assert eig[0] - slack <= got[0] and got[-1] <= eig[-1] + slack


def _model():
    rng = np.random.default_rng(6)
    layers = [(rng.standard_normal((4, 3)), rng.standard_normal(4)), (rng.standard_normal((3, 4)), None)]
    return layers, rng.standard_normal((6, 3)), rng.integers(0, 3, 6)


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"k": 0}, ValueError, r"k must satisfy 1 <= k <= P = 28"),
    ({"k": 29}, ValueError, "k must satisfy"),
    ({"k": 1.0}, TypeError, "k must be an integer"),
    ({"k": True}, TypeError, "k must be an integer"),
    ({"which": "LR"}, ValueError, "which must be one of 'LA', 'SA', 'BE', 'LM'"),
    ({"which": 1}, TypeError, "which must be a string"),
    ({"tol": -1.0}, ValueError, "tol must be a finite number >= 0"),
    ({"tol": float("nan")}, ValueError, "tol must be"),
    ({"tol": "small"}, TypeError, "tol must be a non-negative real"),
    ({"maxiter": 0}, ValueError, "maxiter must be >= 1"),
    ({"maxiter": 2.5}, TypeError, "maxiter must be a positive integer"),
    ({"k": 3, "maxiter": 2}, ValueError, "maxiter must be >= k"),
    ({"seed": -1}, TypeError, "seed must be a non-negative integer"),
    ({"seed": "x"}, TypeError, "seed must be"),
    ({"return_eigenvectors": "yes"}, TypeError, "return_eigenvectors must be True or False"),
    ({"curvature": "fisher"}, ValueError, "curvature"),
    ({"backend": "gpu"}, ValueError, "backend"),
])
def test_eigsh_bad_arguments(kwargs, exc, match):
    layers, X, y = _model()
    with pytest.raises(exc, match=match):
        wsb.eigsh(layers, X, y, **{"activation": "tanh", **kwargs})


def test_eigsh_which_is_case_insensitive():
    layers, X, y = _model()
    np.testing.assert_array_equal(wsb.eigsh(layers, X, y, activation="tanh", which="la"), wsb.eigsh(layers, X, y, activation="tanh", which="LA"))
