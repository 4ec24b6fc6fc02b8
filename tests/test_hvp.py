"""wsb.hvp: exact curvature-vector products against independent dense references."""

from __future__ import annotations

import math

import numpy as np
import pytest

import reference as R
import wsbound_fast as wsb
from wsbound_fast._planning import blocks as planning_blocks
from wsbound_fast._problem import validate as validation

# depths 1-4, every kind of activation curvature, bias patterns, label kinds, float32 X
SPECS = [
    R.ModelSpec((5, 3), "tanh", "all", n=6, labels="hard", seed=900),
    R.ModelSpec((4, 6, 3), "softplus", "none", n=7, labels="soft", seed=901),
    R.ModelSpec((3, 5, 4, 3), ("gelu", "silu"), "alt", n=6, labels="hard", seed=902),
    R.ModelSpec((3, 4, 5, 3, 2), "sigmoid", (False, True, True, False), n=5, labels="soft", seed=903),
    R.ModelSpec((4, 6, 3), "relu", "all", n=8, labels="hard", seed=904, margin=0.05),
    R.ModelSpec((4, 5, 3), "gelu_tanh", "all", n=6, labels="hard", seed=905, x_dtype="float32"),
]
IDS = [f"{s.activation}-d{s.depth}" for s in SPECS]


def _rel_err(got: np.ndarray, want: np.ndarray, H: np.ndarray, v: np.ndarray) -> float:
    scale = float(np.linalg.norm(H, 2) * np.linalg.norm(v)) or 1.0
    return float(np.abs(got - want).max()) / scale


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_hvp_equals_dense_reference(spec, curvature, hvp_backend, refs):
    """H v equals the finite-difference Hessian (or backprop-Jacobian GGN) times v."""
    layers, X, y = refs.model(spec)
    H = refs.numpy(spec, curvature, "mean")
    rng = np.random.default_rng(1)
    v = rng.standard_normal(H.shape[0])
    got = wsb.hvp(layers, X, y, v, activation=spec.activation_arg(), curvature=curvature, backend=hvp_backend)
    assert got.shape == v.shape
    assert _rel_err(got, H @ v, H, v) < 1e-9


@pytest.mark.parametrize("spec", SPECS[:4], ids=IDS[:4])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_hvp_equals_torch(spec, curvature, torch, refs):
    layers, X, y = refs.model(spec)
    H = refs.torch(spec, curvature, "sum")
    V = np.random.default_rng(2).standard_normal((H.shape[0], 3))
    got = wsb.hvp(layers, X, y, V, activation=spec.activation_arg(), curvature=curvature, reduction="sum")
    assert got.shape == V.shape
    assert _rel_err(got, H @ V, H, V) < 1e-12


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_torch_hvp_equals_cpp_and_torch_autograd(spec, curvature, reduction, torch, refs):
    """backend="torch" against the C++ core and the dense autograd Hessian / torch.func GGN:
    depths 1-4, every activation kind, no-bias layers, soft labels, float32 X, both reductions."""
    layers, X, y = refs.model(spec)
    H = refs.torch(spec, curvature, reduction)
    V = np.random.default_rng(7).standard_normal((H.shape[0], 2))
    kw = dict(activation=spec.activation_arg(), curvature=curvature, reduction=reduction)
    got = wsb.hvp(layers, X, y, V, backend="torch", **kw)
    assert got.shape == V.shape and got.dtype == np.float64
    assert _rel_err(got, wsb.hvp(layers, X, y, V, backend="cpp", **kw), H, V) < 1e-10
    assert _rel_err(got, H @ V, H, V) < 1e-10


def test_hvp_columns_reduction_and_backends_agree():
    spec = SPECS[3]
    layers, X, y = spec.build()
    P = R.n_params(layers)
    V = np.random.default_rng(3).standard_normal((P, 4))
    kw = dict(activation=spec.activation_arg())
    full = wsb.hvp(layers, X, y, V, **kw)
    for j in range(V.shape[1]):
        np.testing.assert_allclose(wsb.hvp(layers, X, y, V[:, j], **kw), full[:, j], rtol=0, atol=1e-14)
    np.testing.assert_allclose(wsb.hvp(layers, X, y, V, reduction="sum", **kw), full * X.shape[0],
                               rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(wsb.hvp(layers, X, y, V, backend="numpy", **kw), full, rtol=1e-12, atol=1e-14)
    # a Fortran-ordered or integer-valued v is accepted and converted
    np.testing.assert_allclose(wsb.hvp(layers, X, y, np.asfortranarray(V), **kw), full, rtol=0, atol=0)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_hvp_threads_bitwise_and_batch_invariant(curvature):
    rng = np.random.default_rng(4)
    layers = [(rng.standard_normal((9, 6)) / 2, rng.standard_normal(9)), (rng.standard_normal((7, 9)) / 3, None),
              (rng.standard_normal((4, 7)) / 3, rng.standard_normal(4))]
    X = rng.standard_normal((103, 6))
    y = rng.integers(0, 4, 103)
    v = rng.standard_normal(R.n_params(layers))
    kw = dict(activation="tanh", curvature=curvature)
    one = wsb.hvp(layers, X, y, v, batch_size=10, threads=1, **kw)
    two = wsb.hvp(layers, X, y, v, batch_size=10, threads=2, **kw)
    three = wsb.hvp(layers, X, y, v, batch_size=10, threads=3, **kw)
    assert np.array_equal(one, two) and np.array_equal(one, three)
    # nor on where v sits in memory (the core copies it to an aligned buffer)
    for shift in (1, 2, 3):
        buf = np.zeros(v.size + shift)
        buf[shift:] = v
        assert np.array_equal(wsb.hvp(layers, X, y, buf[shift:], batch_size=10, threads=2, **kw), one)
    for b in (1, 7, 103, 500):
        np.testing.assert_allclose(wsb.hvp(layers, X, y, v, batch_size=b, **kw), one, rtol=1e-12, atol=1e-15)
    # the matvec of the symmetric curvature is symmetric: u^T H v = v^T H u
    u = rng.standard_normal(v.size)
    Hu = wsb.hvp(layers, X, y, u, **kw)
    assert math.isclose(float(u @ one), float(v @ Hu), rel_tol=1e-12, abs_tol=1e-14)


def test_hvp_plan_respects_memory_limit():
    spec = SPECS[1]
    layers, X, y = spec.build()
    prob = validation.validate(layers, X, y, activation="tanh", curvature="hessian", reduction="mean", threads=8,
                              memory_limit=1)
    planned = planning_blocks.plan_hvp(prob, 5, None)
    assert planned.threads == 1 and 1 <= planned.batch_size <= X.shape[0]


def _model():
    rng = np.random.default_rng(5)
    layers = [(rng.standard_normal((4, 3)), rng.standard_normal(4)), (rng.standard_normal((3, 4)), None)]
    return layers, rng.standard_normal((6, 3)), rng.integers(0, 3, 6)


P0 = 4 * 3 + 4 + 3 * 4


@pytest.mark.parametrize(("v", "exc", "match"), [
    (np.ones(P0 + 1), ValueError, r"v must have shape \(28,\)"),
    (np.ones((P0, 2, 1)), ValueError, "v must be a vector"),
    (np.ones((P0 - 1, 2)), ValueError, "v must have shape"),
    (np.ones((P0, 0)), ValueError, "k >= 1"),
    (np.full(P0, np.nan), ValueError, "v contains NaN"),
    (np.r_[np.ones(P0 - 1), np.inf], ValueError, "v contains NaN or Inf"),
    (np.array(["a"] * P0), TypeError, "v must hold real numbers"),
    (np.ones(P0, dtype=bool), TypeError, "v must hold real numbers"),
    ([[1, 2], [3]], TypeError, "v must be an array"),
])
def test_hvp_bad_vector(v, exc, match, hvp_backend):
    layers, X, y = _model()
    with pytest.raises(exc, match=match):
        wsb.hvp(layers, X, y, v, activation="tanh", backend=hvp_backend)


def test_hvp_bad_common_arguments(hvp_backend):
    layers, X, y = _model()
    v = np.ones(P0)
    with pytest.raises(ValueError, match="curvature"):
        wsb.hvp(layers, X, y, v, activation="tanh", curvature="fisher", backend=hvp_backend)
    with pytest.raises(ValueError, match="backend"):
        wsb.hvp(layers, X, y, v, activation="tanh", backend="gpu")
    with pytest.raises(ValueError, match="batch_size"):
        wsb.hvp(layers, X, y, v, activation="tanh", batch_size=0, backend=hvp_backend)
    with pytest.raises(ValueError, match="X has 2 features"):
        wsb.hvp(layers, X[:, :2], y, v, activation="tanh", backend=hvp_backend)
    with pytest.raises(ValueError, match=r"dtype='float32' is not available for the curvature-vector product"):
        wsb.hvp(layers, X, y, v, activation="tanh", dtype="float32", backend=hvp_backend)
    if hvp_backend != "torch":
        with pytest.raises(ValueError, match=r"device= applies to backend='torch' only"):
            wsb.hvp(layers, X, y, v, activation="tanh", device="cpu", backend=hvp_backend)
