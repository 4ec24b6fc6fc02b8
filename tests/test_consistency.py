"""Invariances: backends, batch sizes, threads, memory limits, dtypes, memory layouts, label
forms, and extreme magnitudes (huge logits, saturated activations)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import reference as R
import wsbound_fast as wsb
from wsbound_fast._problem import validate as validation

TOL = 1e-12

SPECS = [
    R.ModelSpec((5, 3), "tanh", "all", n=13, labels="hard", seed=600),
    R.ModelSpec((4, 6, 3), "gelu", "none", n=13, labels="soft", seed=601),
    R.ModelSpec((3, 5, 4, 2), ("silu", "sigmoid"), "alt", n=13, labels="hard", seed=602),
    R.ModelSpec((4, 5, 6, 3, 4), "softplus", (True, False, True, True), n=13, labels="soft", seed=603),
    R.ModelSpec((4, 5, 6, 3, 4), ("relu", "leaky_relu", "gelu_tanh"), "all", n=13, labels="hard", seed=604),
]
SPEC_IDS = ["d1", "d2-gelu", "d3-mixed", "d4-softplus", "d4-relu-mix"]
CURVATURES = ("hessian", "ggn")


def _bound(layers, X, y, spec, **kw) -> wsb.Bound:
    return wsb.bound(layers, X, y, activation=spec.activation_arg(), **kw)


def assert_same(a: wsb.Bound, b: wsb.Bound, tol: float = TOL) -> None:
    """trace to tol relative to max(|trace|, ||H||_F) (cancellation-proof), trace_sq plain relative."""
    scale = math.sqrt(max(a.trace_sq, b.trace_sq))
    assert R.rel(a.trace, b.trace, scale) <= tol, (a.trace, b.trace)
    assert R.rel(a.trace_sq, b.trace_sq) <= tol, (a.trace_sq, b.trace_sq)
    assert a.n_params == b.n_params and a.n_samples == b.n_samples


# ------------------------------------------------------------------------------------
# extreme magnitudes (defined first: also used by the backend comparison)
# ------------------------------------------------------------------------------------

EXTREME = []
for i, act in enumerate(["tanh", "sigmoid", "softplus", "gelu", "gelu_tanh", "silu", "relu", "leaky_relu"]):
    # logits up to ~1e4: the last layer scaled
    EXTREME.append(pytest.param(R.ModelSpec((4, 6, 5, 3), act, "all", n=10, labels="hard" if i % 2 else "soft",
                                            seed=700 + i, last_scale=5e3), id=f"logits-{act}"))
    # saturated hidden units: every layer scaled by 40 (pre-activations up to ~100)
    EXTREME.append(pytest.param(R.ModelSpec((4, 6, 5, 3), act, "alt", n=10, labels="soft" if i % 2 else "hard",
                                            seed=720 + i, w_scale=40.0), id=f"saturated-{act}"))


def _jacobian_scale(layers, spec, X, reduction: str) -> float:
    """sum_n ||J_n||_F^2 (/N): the size of J^T A J for ||A|| ~ 1.  A computed in float64 from a
    saturated softmax has absolute errors ~eps, so the curvature is only defined to
    ~eps * this scale; the comparisons below allow that much."""
    acts = R.per_layer_activations(spec.activation_arg(), spec.depth - 1)
    J = R.logit_jacobians(layers, acts, np.asarray(X, dtype=float))
    s = float(np.sum(J * J))
    return s / X.shape[0] if reduction == "mean" else s


def _check_extreme(res: wsb.Bound, ref: np.ndarray, jscale: float) -> None:
    assert math.isfinite(res.trace) and math.isfinite(res.trace_sq)
    for f in ("lambda_max_lower", "lambda_max_upper", "lambda_min_lower", "lambda_min_upper"):
        assert math.isfinite(getattr(res, f))
    d = np.diag(ref)
    floor = 1e-14 * jscale
    assert abs(res.trace - d.sum()) <= 1e-9 * max(abs(d.sum()), np.abs(d).sum()) + floor
    t2 = float(np.sum(ref * ref))
    assert abs(res.trace_sq - t2) <= 1e-9 * t2 + 2 * math.sqrt(t2) * floor * math.sqrt(ref.shape[0]) + floor**2


@pytest.mark.parametrize("spec", EXTREME)
@pytest.mark.parametrize("curvature", CURVATURES)
def test_extreme_magnitudes_vs_reference(spec, curvature, backend, refs):
    layers, X, y = refs.model(spec)
    z = R.logits(layers, spec.activation_arg(), X)
    if spec.last_scale > 1:
        assert np.abs(z).max() > 2e3  # the regime this test is about
    else:
        zs = R.hidden_preactivations(layers, R.per_layer_activations(spec.activation_arg(), 2), X)
        assert max(np.abs(h).max() for h in zs) > 30
    reduction = "sum" if spec.seed % 2 else "mean"
    if curvature == "hessian":
        pytest.importorskip("torch")
        ref = refs.torch(spec, curvature, reduction)
    else:
        ref = refs.numpy(spec, curvature, reduction)
    res = _bound(layers, X, y, spec, curvature=curvature, reduction=reduction, backend=backend)
    _check_extreme(res, ref, _jacobian_scale(layers, spec, X, reduction))


# ------------------------------------------------------------------------------------
# cpp == numpy
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cpp_matches_numpy(spec, curvature, reduction, refs):
    layers, X, y = refs.model(spec)
    for batch_size in (None, 4):
        kw = dict(curvature=curvature, reduction=reduction, batch_size=batch_size)
        assert_same(_bound(layers, X, y, spec, backend="cpp", **kw), _bound(layers, X, y, spec, backend="numpy", **kw))


@pytest.mark.parametrize("spec", EXTREME)
@pytest.mark.parametrize("curvature", CURVATURES)
def test_cpp_matches_numpy_extreme(spec, curvature, refs):
    layers, X, y = refs.model(spec)
    a = _bound(layers, X, y, spec, curvature=curvature, backend="cpp")
    b = _bound(layers, X, y, spec, curvature=curvature, backend="numpy")
    jscale = _jacobian_scale(layers, spec, X, "mean")
    floor = 1e-14 * jscale
    assert abs(a.trace - b.trace) <= TOL * max(abs(b.trace), math.sqrt(b.trace_sq)) + floor
    assert abs(a.trace_sq - b.trace_sq) <= TOL * b.trace_sq + 2 * math.sqrt(b.trace_sq * a.n_params) * floor + floor**2


# ------------------------------------------------------------------------------------
# batch size, threads, memory limit
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("curvature", CURVATURES)
def test_batch_size_invariance(spec, curvature, backend, refs):
    layers, X, y = refs.model(spec)
    base = _bound(layers, X, y, spec, curvature=curvature, backend=backend)
    for batch_size in (1, 3, 7, 13, 50):
        assert_same(_bound(layers, X, y, spec, curvature=curvature, backend=backend, batch_size=batch_size), base)


@pytest.mark.parametrize("curvature", CURVATURES)
def test_threads_bitwise_cpp(curvature, refs):
    spec = R.ModelSpec((4, 5, 6, 3, 4), ("gelu", "tanh", "softplus"), "alt", n=23, labels="soft", seed=610)
    layers, X, y = refs.model(spec)
    runs = [_bound(layers, X, y, spec, curvature=curvature, backend="cpp", batch_size=3, threads=t)
            for t in (1, 2, 3, 8, 1)]
    for r in runs[1:]:
        assert r.trace == runs[0].trace
        assert r.trace_sq == runs[0].trace_sq
    assert_same(runs[0], _bound(layers, X, y, spec, curvature=curvature, backend="numpy", batch_size=3))


def test_threads_argument_accepted(backend, refs):
    spec = SPECS[2]
    layers, X, y = refs.model(spec)
    a = _bound(layers, X, y, spec, backend=backend, batch_size=4, threads=1)
    b = _bound(layers, X, y, spec, backend=backend, batch_size=4, threads=2)
    assert_same(a, b)


def _tightest(layers, curvature) -> int:
    """The smallest memory_limit both the C++ and the NumPy plans accept (one sample's needs)."""
    return max(validation.min_memory_limit(layers, curvature, b) for b in ("cpp", "numpy"))


def _plan(layers, X, y, spec, **kw):
    return validation.validate(layers, X, y, activation=spec.activation_arg(), curvature=kw.pop("curvature", "hessian"),
                              reduction="mean", **kw)


@pytest.mark.parametrize("curvature", CURVATURES)
def test_memory_limit_recomputes_features_in_groups(curvature, backend, refs):
    spec = R.ModelSpec((4, 5, 6, 3, 4), ("silu", "tanh", "gelu"), "alt", n=24, labels="hard", seed=611)
    layers, X, y = refs.model(spec)
    base = _bound(layers, X, y, spec, curvature=curvature, backend=backend)
    # a budget between "one block at a time" and "everything cached": groups of 2..7 of 8 blocks
    # (a grid finer than powers of two: the window is narrow beside the C++ plan's fixed part)
    mid = None
    tight = _tightest(layers, curvature)
    for limit in (int(2 ** (k / 16)) for k in range(160, 480)):
        if limit < tight:
            continue
        plan = _plan(layers, X, y, spec, curvature=curvature, batch_size=3, memory_limit=limit)
        if 1 < plan.group_blocks < 8:
            mid = limit
            break
    assert mid is not None
    cases = [dict(batch_size=3, memory_limit=tight), dict(batch_size=3, memory_limit=mid), dict(memory_limit=tight)]
    for kw in cases:
        plan = _plan(layers, X, y, spec, curvature=curvature, **kw)
        assert plan.group_blocks < math.ceil(24 / plan.batch_size)  # features are recomputed
        assert_same(_bound(layers, X, y, spec, curvature=curvature, backend=backend, **kw), base)
    assert _plan(layers, X, y, spec, curvature=curvature, memory_limit=tight).batch_size == 1
    with pytest.raises(ValueError, match=r"memory_limit = 1 bytes is below what one sample needs: at least .* "
                                         r"give memory_limit >= \d+ or None"):
        _bound(layers, X, y, spec, curvature=curvature, backend=backend, memory_limit=1)


# ------------------------------------------------------------------------------------
# dtypes and memory layouts
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS[1:4], ids=SPEC_IDS[1:4])
@pytest.mark.parametrize("curvature", CURVATURES)
def test_float32_inputs_equal_float64_cast(spec, curvature, backend, refs):
    layers, X, y = refs.model(spec)
    X32 = X.astype(np.float32)
    a = _bound(layers, X32, y, spec, curvature=curvature, backend=backend, batch_size=4)
    b = _bound(layers, X32.astype(np.float64), y, spec, curvature=curvature, backend=backend, batch_size=4)
    assert_same(a, b)
    # float32 weights (and soft labels) are converted to float64 the same way
    l32 = [(W.astype(np.float32), None if bb is None else bb.astype(np.float32)) for W, bb in layers]
    l64 = [(W.astype(np.float64), None if bb is None else bb.astype(np.float64)) for W, bb in l32]
    y32 = y.astype(np.float32) if y.ndim == 2 else y
    y64 = y32.astype(np.float64) if y.ndim == 2 else y
    a = _bound(l32, X32, y32, spec, curvature=curvature, backend=backend)
    b = _bound(l64, X32.astype(np.float64), y64, spec, curvature=curvature, backend=backend)
    assert_same(a, b)


def _misaligned(A: np.ndarray) -> np.ndarray:
    raw = np.zeros(A.size * A.itemsize + 1, dtype=np.uint8)
    out = raw[1:].view(A.dtype).reshape(A.shape)
    out[...] = A
    assert not out.flags.aligned
    return out


def _strided_columns(A: np.ndarray) -> np.ndarray:
    big = np.zeros((A.shape[0], 3 * A.shape[1]), dtype=A.dtype)
    big[:, ::3] = A
    return big[:, ::3]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("curvature", CURVATURES)
def test_memory_layouts_of_X(dtype, curvature, backend, refs):
    spec = SPECS[3]
    layers, X, y = refs.model(spec)
    X = X.astype(dtype)
    kw = dict(curvature=curvature, backend=backend, batch_size=5)
    base = _bound(layers, X, y, spec, **kw)
    views = {
        "fortran": np.asfortranarray(X),
        "transposed-copy": X.T.copy().T,
        "column-stride-3": _strided_columns(X),
        "misaligned": _misaligned(X),
    }
    for name, Xv in views.items():
        assert np.array_equal(Xv, X), name
        assert_same(_bound(layers, Xv, y, spec, **kw), base)
    # reversed features, with the first layer's weight columns reversed to match: same function
    W0, b0 = layers[0]
    rev = [(W0[:, ::-1], b0)] + layers[1:]
    Xr = X[:, ::-1]
    assert_same(_bound(rev, Xr, y, spec, **kw), base)
    assert_same(_bound(rev, Xr, y, spec, **kw), _bound([(W0[:, ::-1].copy(), b0)] + layers[1:], Xr.copy(), y, spec, **kw))
    # every other sample, and the samples in reverse order
    for sl in (slice(None, None, 2), slice(None, None, -1), slice(1, None, 3)):
        Xs, ys = X[sl], y[sl]
        assert_same(_bound(layers, Xs, ys, spec, **kw), _bound(layers, Xs.copy(), ys.copy(), spec, **kw))
    both = X[::-1, ::-1]
    assert_same(_bound(rev, both, y[::-1], spec, **kw), base)


@pytest.mark.parametrize("curvature", CURVATURES)
def test_non_contiguous_weights_and_hidden_permutation(curvature, backend, refs):
    """Weights as Fortran arrays / reversed views; permuting hidden units leaves tr(H), tr(H^2) unchanged."""
    spec = SPECS[2]  # depth 3
    layers, X, y = refs.model(spec)
    kw = dict(curvature=curvature, backend=backend)
    base = _bound(layers, X, y, spec, **kw)
    fortran = [(np.asfortranarray(W), b) for W, b in layers]
    assert_same(_bound(fortran, X, y, spec, **kw), base)
    (W0, b0), (W1, b1), (W2, b2) = layers
    perm = slice(None, None, -1)  # reverse the first hidden layer's units (views, not copies)
    b0p = None if b0 is None else b0[perm]
    permuted = [(W0[perm], b0p), (W1[:, perm], b1), (W2, b2)]
    assert not permuted[0][0].flags.c_contiguous
    assert_same(_bound(permuted, X, y, spec, **kw), base)


def test_soft_label_layouts(backend, refs):
    spec = SPECS[1]
    layers, X, y = refs.model(spec)
    assert y.ndim == 2
    base = _bound(layers, X, y, spec, backend=backend)
    assert_same(_bound(layers, X, np.asfortranarray(y), spec, backend=backend), base)
    assert_same(_bound(layers, X, _misaligned(y), spec, backend=backend), base)
    assert_same(_bound(layers, X, _strided_columns(y), spec, backend=backend), base)


def test_read_only_inputs(backend, refs):
    spec = SPECS[3]
    layers, X, y = refs.model(spec)
    base = _bound(layers, X, y, spec, backend=backend)
    ro = []
    for W, b in layers:
        W = W.copy()
        W.flags.writeable = False
        if b is not None:
            b = b.copy()
            b.flags.writeable = False
        ro.append((W, b))
    Xr, yr = X.copy(), y.copy()
    Xr.flags.writeable = False
    yr.flags.writeable = False
    assert_same(_bound(ro, Xr, yr, spec, backend=backend), base)


# ------------------------------------------------------------------------------------
# label and input forms
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[2], SPECS[4]], ids=[SPEC_IDS[0], SPEC_IDS[2], SPEC_IDS[4]])
@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_hot_rows_equal_integer_labels(spec, curvature, reduction, backend, refs):
    layers, X, y = refs.model(spec)
    assert y.ndim == 1
    onehot = np.eye(spec.dims[-1])[y]
    kw = dict(curvature=curvature, reduction=reduction, backend=backend)
    assert_same(_bound(layers, X, onehot, spec, **kw), _bound(layers, X, y, spec, **kw))


@pytest.mark.parametrize("form", ["int32", "uint8", "float-integral", "list", "strided"])
def test_integer_label_forms(form, backend, refs):
    spec = SPECS[2]
    layers, X, y = refs.model(spec)
    base = _bound(layers, X, y, spec, backend=backend)
    if form == "int32":
        yy = y.astype(np.int32)
    elif form == "uint8":
        yy = y.astype(np.uint8)
    elif form == "float-integral":
        yy = y.astype(np.float64)
    elif form == "list":
        yy = [int(v) for v in y]
    else:
        yy = np.repeat(y, 2)[::2]
    assert_same(_bound(layers, X, yy, spec, backend=backend), base)


def test_integer_and_list_inputs(backend):
    rng = np.random.default_rng(620)
    Xi = rng.integers(-3, 4, size=(9, 4))
    layers = [(rng.standard_normal((5, 4)) * 0.3, rng.standard_normal(5)), (rng.standard_normal((3, 5)), None)]
    y = rng.integers(0, 3, 9)
    base = wsb.bound(layers, Xi.astype(np.float64), y, activation="tanh", backend=backend)
    assert_same(wsb.bound(layers, Xi, y, activation="tanh", backend=backend), base)
    assert_same(wsb.bound(layers, Xi.astype(np.int8), y, activation="tanh", backend=backend), base)
    assert_same(wsb.bound(layers, Xi.tolist(), y.tolist(), activation="tanh", backend=backend), base)
    as_lists = [(W.tolist(), None if b is None else b.tolist()) for W, b in layers]
    assert_same(wsb.bound(as_lists, Xi.tolist(), y, activation="tanh", backend=backend), base)


@pytest.mark.parametrize("act", ["tanh", "leaky_relu", ("leaky_relu", 0.01)])
def test_activation_list_equals_single_name(act, backend, refs):
    spec = R.ModelSpec((4, 5, 6, 3, 4), act, "all", n=9, labels="hard", seed=630)
    layers, X, y = refs.model(spec)
    a = wsb.bound(layers, X, y, activation=act, backend=backend)
    b = wsb.bound(layers, X, y, activation=[act] * 3, backend=backend)
    c = wsb.bound(layers, X, y, activation=[act if isinstance(act, str) else list(act)] * 3, backend=backend)
    assert_same(a, b)
    assert_same(a, c)


def test_activation_names_case_and_default_slope(backend, refs):
    spec = R.ModelSpec((4, 6, 3), "leaky_relu", "all", n=9, labels="hard", seed=631)
    layers, X, y = refs.model(spec)
    a = wsb.bound(layers, X, y, activation="leaky_relu", backend=backend)
    assert_same(wsb.bound(layers, X, y, activation=" Leaky_ReLU ", backend=backend), a)
    assert_same(wsb.bound(layers, X, y, activation=("leaky_relu", 0.01), backend=backend), a)
    other = wsb.bound(layers, X, y, activation=("leaky_relu", 0.3), backend=backend)
    assert other.trace != a.trace


def test_repeated_calls_bitwise(backend, refs):
    spec = SPECS[4]
    layers, X, y = refs.model(spec)
    a = _bound(layers, X, y, spec, backend=backend, batch_size=4)
    b = _bound(layers, X, y, spec, backend=backend, batch_size=4)
    assert (a.trace, a.trace_sq) == (b.trace, b.trace_sq)
