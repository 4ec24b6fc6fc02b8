"""The C++ core's numerics: saturated softmax (docs/numerics.md sections 1-3), the magnitudes
for the rounding allowances (section 4), and inputs at any byte offset.

(The 60-digit reference suite over saturated, trained and random models is separate; these
are the core's own checks: exact logistic regression, the two paths against each other,
nu >= |H_n^{lm}|_F per sample.)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import reference as R
import wsbound_fast as wsb
from wsbound_fast._backends import compiled
from wsbound_fast._engine import schedule as engine_schedule
from wsbound_fast._problem.validate import validate


def _core_moments(layers, X, y, hessian, structured, batch=2, group=1, threads=2, f32=False, acts=None):
    core = compiled.load_core()
    L = len(layers)
    codes = [1] * (L - 1) if acts is None else acts
    return core.moments([W for W, _ in layers], [b for _, b in layers], codes, [0.0] * (L - 1), X, y, hessian,
                        structured, batch, group, threads, None, f32)


def _saturated(dims, margin, n=5, seed=0):
    """A tanh MLP whose last layer is scaled so that the logit margins are about ``margin``;
    correct labels (argmax), at least two distinct classes."""
    rng = np.random.default_rng(seed)
    layers = [(rng.normal(size=(o, i)) / np.sqrt(i), 0.3 * rng.normal(size=o)) for i, o in zip(dims[:-1], dims[1:])]
    Xc = rng.normal(size=(200, dims[0]))
    a = Xc
    for W, b in layers[:-1]:
        a = np.tanh(a @ W.T + b)
    z = a @ layers[-1][0].T + layers[-1][1]
    zs = np.sort(z, axis=1)
    m = zs[:, -1] - zs[:, -2]
    order = np.argsort(np.abs(m - np.median(m)))
    pick = list(order[:n])
    r = z.argmax(1)
    if len(set(r[pick])) < 2:  # swap in a sample of another class
        other = next(i for i in order if r[i] != r[pick[0]])
        pick[-1] = other
    s = margin / np.median(m)
    layers[-1] = (layers[-1][0] * s, layers[-1][1] * s)
    return layers, Xc[pick], r[pick].astype(np.int64)


# ----------------------------------------------------------------------------- saturation

@pytest.mark.parametrize("margin", [20, 40, 100, 300])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_saturated_logistic_regression_is_exact(margin, curvature):
    """One layer: H_n = (x~ x~^T) (x) A_n exactly, so tr H = sum |x~|^2 tr A_n and
    tr H^2 = sum_{n,n'} (x~.x~')^2 tr(A_n A_n'), against mpmath from the same float64 logits."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 400
    layers, X, y = _saturated((4, 3), margin)
    W, b = layers[0]
    Xt = np.hstack([X, np.ones((X.shape[0], 1))])
    As = []
    for n in range(X.shape[0]):
        z = [mp.mpf(float(v)) for v in W @ X[n] + b]
        e = [mp.exp(v - max(z)) for v in z]
        p = [v / sum(e) for v in e]
        As.append(mp.matrix([[(p[i] if i == j else 0) - p[i] * p[j] for j in range(3)] for i in range(3)]))
    g = [[mp.mpf(float(Xt[n] @ Xt[k])) for k in range(len(As))] for n in range(len(As))]  # exact enough: O(1)
    tr = sum(g[n][n] * sum(As[n][i, i] for i in range(3)) for n in range(len(As)))
    tr2 = sum(g[n][k] ** 2 * sum((As[n] * As[k])[i, i] for i in range(3)) for n in range(len(As)) for k in range(len(As)))
    for structured in (False, True):
        prob = validate(layers, X, y, activation="tanh", curvature=curvature, reduction="sum", batch_size=2)
        mom = compiled.moments(dataclasses.replace(prob, structured=structured))
        t, t2 = engine_schedule.total_moments(mom.trace, mom.blocks)
        assert float(abs(t - tr) / tr) < 1e-11
        assert float(abs(t2 - tr2) / tr2) < 1e-11


@pytest.mark.parametrize("dims", [(3, 8, 3), (3, 6, 5, 3), (3, 5, 4, 4, 3)])
@pytest.mark.parametrize("margin", [20, 100, 300])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_saturated_paths_agree(dims, margin, curvature):
    """The K route (shifted to the reference classes) and the generic contraction agree to
    ~1e-13 however saturated the softmax is (before the shift they differed by up to 1e200)."""
    layers, X, y = _saturated(dims, margin)
    res = []
    for structured in (False, True):
        t, b, ta, nu = _core_moments(layers, X, y, curvature == "hessian", structured)
        res.append(engine_schedule.total_moments(t, b))
        assert np.all(nu >= 0) and np.all(ta >= np.abs(t) * (1 - 1e-12))
    (t0, s0), (t1, s1) = res
    assert t0 > 0 and s0 > 0
    assert abs(t0 - t1) <= 1e-12 * abs(t0)
    assert abs(s0 - s1) <= 1e-12 * s0


@pytest.mark.parametrize("dims", [(3, 8, 3), (3, 6, 5, 3)])
@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_saturated_float32(dims, structured, curvature):
    """float32 Gram products: the q-sized features (delta, G, rho, u) are rounded to float32
    after a per-row power-of-two scaling, so that 1e-120 does not underflow to zero."""
    for margin in (40, 100, 300):
        layers, X, y = _saturated(dims, margin)
        want = engine_schedule.total_moments(*_core_moments(layers, X, y, curvature == "hessian", structured)[:2])
        got = engine_schedule.total_moments(*_core_moments(layers, X, y, curvature == "hessian", structured, f32=True)[:2])
        assert want[1] > 0
        assert abs(got[0] - want[0]) <= 1e-6 * want[0]
        assert abs(got[1] - want[1]) <= 1e-5 * want[1]


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("f32", [False, True])
def test_underflowing_softmax_gives_exact_zeros(structured, curvature, f32):
    """Margins >= ~800 (here ~1500): every e_k underflows, the curvature is an exact zero, never an exception."""
    for dims in ((3, 8, 3), (3, 6, 5, 3), (4, 3)):
        layers, X, y = _saturated(dims, 1500)
        t, b, ta, nu = _core_moments(layers, X, y, curvature == "hessian", structured, f32=f32)
        assert np.all(t == 0) and np.all(b == 0) and np.all(ta == 0)
        # the Hessian's delta-terms are exact zeros too; only sigma'(z_l) |delta| products remain
        assert np.all(np.isfinite(nu))
    res = wsb.bound(layers, X, y, activation="tanh", curvature=curvature, reduction="sum")
    assert res.trace == 0.0 and res.trace_sq == 0.0


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_saturated_hvp_shifted_form(curvature):
    """R{delta_L} = A R{z_L} in the shifted form: logistic regression, H v = sum_n A_n V x~ x~^T
    exactly, against mpmath from the same float64 logits."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 400
    for margin in (40, 100, 300):
        layers, X, y = _saturated((4, 3), margin)
        W, b = layers[0]
        rng = np.random.default_rng(3)
        V = rng.normal(size=(3, 5))  # [W | b]
        got = wsb.hvp(layers, X, y, V.ravel(order="C")[np.r_[0:4, 5:9, 10:14, 4, 9, 14]], activation="tanh",
                      curvature=curvature, reduction="sum")
        want = np.zeros((3, 5), dtype=object)
        for n in range(X.shape[0]):
            xt = np.r_[X[n], 1.0]
            z = [mp.mpf(float(v)) for v in W @ X[n] + b]
            e = [mp.exp(v - max(z)) for v in z]
            p = [v / sum(e) for v in e]
            A = mp.matrix([[(p[i] if i == j else 0) - p[i] * p[j] for j in range(3)] for i in range(3)])
            u = [sum(mp.mpf(float(V[k, j])) * mp.mpf(float(xt[j])) for j in range(5)) for k in range(3)]
            Au = [sum(A[k, j] * u[j] for j in range(3)) for k in range(3)]
            for k in range(3):
                for j in range(5):
                    want[k, j] += Au[k] * mp.mpf(float(xt[j]))
        want_flat = np.array([float(v) for v in np.r_[want[:, :4].ravel(), want[:, 4]]])
        scale = float(np.abs(want_flat).max())
        assert scale > 0
        assert np.abs(got - want_flat).max() <= 1e-11 * scale


# ----------------------------------------------------------------------------- magnitudes

def _blocks(H, layers):
    sizes = [W.size + (0 if b is None else b.size) for W, b in layers]
    off = np.concatenate([[0], np.cumsum(sizes)])
    L = len(layers)
    return [[H[off[l]:off[l + 1], off[m]:off[m + 1]] for m in range(L)] for l in range(L)]


@pytest.mark.parametrize("dims", [(5, 3), (4, 5, 3), (4, 6, 5, 3), (3, 4, 5, 4, 3)])
@pytest.mark.parametrize("act", ["tanh", "softplus"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("structured", [False, True])
def test_magnitudes_bound_the_per_sample_blocks(dims, act, curvature, structured):
    """nu_n^{lm} >= |H_n^{lm}|_F (one-sample problems against the dense references) and
    trace_abs[l] >= |trace[l]|; for the GGN trace_abs[l] = trace[l] (1 + c (2 |a~| ea + ea^2) / |a~|^2),
    the activations' error term of docs/numerics.md section 4 (tests/reference.py)."""
    rng = np.random.default_rng(len(dims) * 11 + len(act))
    # O(1) logits: the dense references are float64 without the shifted forms
    layers = [(rng.normal(size=(o, i)) / np.sqrt(i), 0.5 * rng.normal(size=o)) for i, o in zip(dims[:-1], dims[1:])]
    L = len(layers)
    code = {"tanh": 1, "softplus": 3}[act]
    for _ in range(3):
        X = rng.normal(size=(1, dims[0]))
        y = rng.integers(0, dims[-1], 1).astype(np.int64)
        if curvature == "hessian":
            H = R.fd_hessian(layers, act, X, y, reduction="sum")
        else:
            H = R.ggn_reference(layers, act, X, y, reduction="sum")
        Hb = _blocks(H, layers)
        t, _, ta, nu = _core_moments(layers, X, y, curvature == "hessian", structured, acts=[code] * (L - 1))
        ea, na, c = R.activation_errors(layers, act, X)
        for l in range(L):
            assert ta[l] >= abs(t[l]) * (1 - 1e-12)
            if curvature == "ggn":
                grow = 1 + c * (2 * na[0, l + 1] + ea[0, l + 1]) * ea[0, l + 1] / na[0, l + 1] ** 2
                assert ta[l] == pytest.approx(t[l] * grow, rel=1e-12, abs=1e-300)
                assert (grow > 1) == (l > 0)  # the inputs are exact
            for m in range(L):
                if m < l:
                    assert nu[l, m] == 0
                    continue
                assert np.linalg.norm(Hb[l][m]) <= nu[l, m] * (1 + 1e-6) + 1e-9 * np.linalg.norm(H)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("structured", [False, True])
def test_magnitudes_are_bitwise_independent_of_threads(curvature, structured):
    rng = np.random.default_rng(5)
    dims = (4, 6, 5, 3)
    layers = [(rng.normal(size=(o, i)), rng.normal(size=o)) for i, o in zip(dims[:-1], dims[1:])]
    X = rng.normal(size=(29, 4))
    y = rng.integers(0, 3, 29).astype(np.int64)
    runs = [_core_moments(layers, X, y, curvature == "hessian", structured, batch=4, group=2, threads=t)
            for t in (1, 2, 3, 5)]
    for r in runs[1:]:
        for a, b in zip(r, runs[0]):
            assert np.array_equal(a, b)


# ----------------------------------------------------------------------------- alignment

def _unaligned(a: np.ndarray, offset: int = 1) -> np.ndarray:
    """A C-contiguous copy of ``a`` that starts ``offset`` bytes into a buffer (not aligned)."""
    buf = np.zeros(a.nbytes + offset, dtype=np.uint8)
    out = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=offset).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned
    return out


@pytest.mark.parametrize("x_dtype", [np.float64, np.float32])
@pytest.mark.parametrize("soft", [False, True])
def test_unaligned_arrays_give_the_same_moments_and_products(x_dtype, soft):
    """NumPy views at odd byte offsets (inputs, strided inputs, labels, weights, V) are read
    bytewise: bitwise the same results as aligned copies."""
    rng = np.random.default_rng(8)
    dims = (4, 5, 3)
    layers = [(rng.normal(size=(o, i)), rng.normal(size=o)) for i, o in zip(dims[:-1], dims[1:])]
    X = rng.normal(size=(11, 4)).astype(x_dtype)
    y = rng.integers(0, 3, 11).astype(np.int64)
    if soft:
        y = rng.dirichlet(np.ones(3), 11)
    Xs = _unaligned(np.asfortranarray(np.repeat(X, 2, axis=1)))[:, ::2]  # strided and unaligned
    ua = [(_unaligned(W), _unaligned(b)) for W, b in layers]
    core = compiled.load_core()
    for hessian in (True, False):
        ref = _core_moments(layers, X, y, hessian, True)
        for Xu in (_unaligned(X), Xs):
            got = _core_moments(ua, Xu, _unaligned(y), hessian, True)
            for a, b in zip(got, ref):
                assert np.array_equal(a, b)
        P = sum(W.size + b.size for W, b in layers)
        V = rng.normal(size=(2, P))
        args = ([W for W, _ in layers], [b for _, b in layers], [1], [0.0])
        want = core.hvp(*args, X, y, V, hessian, 4, 2)
        got = core.hvp([W for W, _ in ua], [b for _, b in ua], [1], [0.0], _unaligned(X), _unaligned(y),
                       _unaligned(V), hessian, 4, 2)
        assert np.array_equal(got, want)
