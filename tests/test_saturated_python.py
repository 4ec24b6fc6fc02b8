"""The Python backends (NumPy, torch) when the softmax saturates (docs/numerics.md).

At the end of training 1 - p_y is 1e-5 ... 1e-300 and every curvature quantity is of size q or
q q'; written naively they were differences of O(1) numbers and lost every digit by q ~ 1e-16.
Here the last layer is set so that the logit margins are 20 ... 300 (correct labels, hard and
smoothed), and:

* a logistic regression with integer weights and inputs (its forward pass exact in float64)
  against its closed form, written from math.exp per class;
* the K route, the generic contraction and the explicit dense Hessian (three different
  assemblies of the same features) agree to 1e-12 at every margin, and so does the
  curvature-vector product with the dense matrix;
* everything underflows (margin 800): exact zeros, no exception;
* the magnitudes of the rounding allowances (docs/numerics.md section 4) against the
  per-sample dense Hessians: trace_abs is sum_n sum |diag H_n^{ll}|, norms[l, l] is
  sum_n |H_n^{ll}|_F where G_ll is formed, and every nu bounds |H_n^{lm}|_F.

(The 60-digit references of the whole suite are elsewhere; this file needs no mpmath.)
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import reference as R

import wsbound_fast as wsb
from wsbound_fast import _backends as backends
from wsbound_fast._engine import schedule as engine_schedule
from wsbound_fast._engine.data import HostData
from wsbound_fast._engine.namespace import Weights
from wsbound_fast._engine.schedule import total_moments
from wsbound_fast._api.dense import dense_hessian
from wsbound_fast._problem.validate import validate

MARGINS = [20.0, 40.0, 100.0, 300.0]
DIMS = {2: (3, 8, 3), 3: (3, 6, 5, 3)}
TOL = 1e-12


def _saturated(depth: int, margin: float, labels: str, n: int = 5, seed: int = 0):
    """A tanh MLP whose last layer (least norm) gives every sample the logit margin ``margin``
    for its (correct) class; labels "hard" or "smooth" (rows (1 - 1e-2) e_c + 1e-2 / C)."""
    rng = np.random.default_rng(seed + 31 * depth)
    dims = DIMS[depth]
    layers = [(rng.standard_normal((b, a)) / math.sqrt(a), 0.3 * rng.standard_normal(b))
              for a, b in zip(dims[:-1], dims[1:])]
    X = rng.standard_normal((n, dims[0]))
    C = dims[-1]
    cls = rng.integers(0, C, n)
    h = X
    for W, b in layers[:-1]:
        h = np.tanh(h @ W.T + b)
    Z = np.zeros((n, C))
    for i in range(n):
        others = [k for k in range(C) if k != cls[i]]
        Z[i, cls[i]] = margin
        Z[i, others[1:]] = -0.5 * margin
    Wa = np.linalg.lstsq(np.hstack([h, np.ones((n, 1))]), Z, rcond=None)[0].T
    layers[-1] = (np.ascontiguousarray(Wa[:, :-1]), np.ascontiguousarray(Wa[:, -1]))
    y = cls if labels == "hard" else (1 - 1e-2) * np.eye(C)[cls] + 1e-2 / C
    return layers, X, y


def _moments(backend: str, layers, X, y, curvature: str, structured: bool, batch_size: int = 2):
    kw = dict(activation="tanh", curvature=curvature, reduction="sum", batch_size=batch_size)
    if backend == "torch":
        pytest.importorskip("torch")
        torch_backend = backends.torch_backend()
        return torch_backend.moments(replace(torch_backend.validate_torch(layers, X, y, **kw), structured=structured))
    prob = replace(validate(layers, X, y, backend="numpy", **kw), structured=structured)
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        arr = backends.numpy.ARRAYS  # the engine itself: backends.numpy.moments ignores FP warnings
        return engine_schedule.moments(prob, arr, Weights.of(prob, arr), HostData(prob, arr))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), np.finfo(float).tiny)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("margin", [20, 100, 300, 800])
def test_logistic_regression_closed_form(backend, margin):
    """Integer weights and inputs: the logits are exact, so tr(H) = sum_n |x~_n|^2 tr A_n and
    tr(H^2) = sum_{n,n'} (x~_n . x~_n')^2 tr(A_n A_n') hold to rounding, A_n = diag p - p p^T
    from p_k = e_k / E, e_k = exp(z_k - z_max) (math.exp, class by class), 1 - p_r = (sum_{k != r} e_k) / E."""
    rng = np.random.default_rng(margin)
    W = rng.integers(-2, 3, size=(3, 4)).astype(float)
    b = np.zeros(3)
    X = rng.integers(-2, 3, size=(6, 4)).astype(float)
    z = X @ W.T
    while True:  # no ties, every gap at least 1 (integers)
        zs = np.sort(z, axis=1)
        if (zs[:, -1] > zs[:, -2]).all():
            break
        X = rng.integers(-2, 3, size=(6, 4)).astype(float)
        z = X @ W.T
    k = math.ceil(margin / float((zs[:, -1] - zs[:, -2]).min()))
    W, z = W * k, z * k
    y = z.argmax(axis=1)
    As = []
    for zn in z:
        r = int(np.argmax(zn))
        e = [math.exp(float(v - zn[r])) for v in zn]
        E = math.fsum(e)
        p = [v / E for v in e]
        A = np.array([[-p[i] * p[j] for j in range(3)] for i in range(3)])
        for i in range(3):
            A[i, i] = p[i] * (math.fsum(e[j] for j in range(3) if j != i) / E)
        As.append(A)
    xt = np.hstack([X, np.ones((len(X), 1))])
    g = xt @ xt.T
    tr = math.fsum(float(g[n, n] * np.trace(As[n])) for n in range(len(X)))
    tr2 = math.fsum(float(g[n, m] ** 2 * np.sum(As[n] * As[m])) for n in range(len(X)) for m in range(len(X)))
    for curvature, paths in (("hessian", [False]), ("ggn", [False, True])):
        for structured in paths:
            t, t2 = total_moments(*_moments(backend, [(W, b)], X, y, curvature, structured)[:2])
            if margin >= 800:
                assert t == 0.0 and t2 == 0.0
            else:
                assert _rel(t, tr) <= TOL and _rel(t2, tr2) <= TOL, (curvature, structured, t, tr, t2, tr2)


@pytest.mark.parametrize("labels", ["hard", "smooth"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("depth", [2, 3])
def test_k_route_generic_and_dense_agree(depth, curvature, labels):
    """tr(H), tr(H^2) of the K route and of the generic path (both backends) and of the dense
    Hessian, and H v of both backends against the dense matrix, at every margin."""
    for margin in MARGINS:
        layers, X, y = _saturated(depth, margin, labels)
        H = dense_hessian(layers, X, y, activation="tanh", curvature=curvature, reduction="sum")
        tr, tr2 = float(np.trace(H)), float(np.sum(H * H))
        assert tr2 > 0
        for backend in ("numpy", "torch"):
            for structured in (False, True):
                t, t2 = total_moments(*_moments(backend, layers, X, y, curvature, structured)[:2])
                assert _rel(t, tr) <= TOL and _rel(t2, tr2) <= TOL, (margin, backend, structured, t, tr, t2, tr2)
        v = np.random.default_rng(1).standard_normal(H.shape[0])
        ref = H @ v
        for backend in ("numpy", "torch"):
            if backend == "torch":
                pytest.importorskip("torch")
            out = wsb.hvp(layers, X, y, v, activation="tanh", curvature=curvature, reduction="sum", backend=backend)
            assert np.linalg.norm(out - ref) <= 1e-12 * np.linalg.norm(ref), (margin, backend)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_everything_underflows(backend):
    """Margin 800: exp underflows to 0, p is one-hot; with hard labels every moment is an exact
    zero, with smoothed labels only the delta terms of the Hessian remain; no exception."""
    for depth in (2, 3):
        for labels in ("hard", "smooth"):
            layers, X, y = _saturated(depth, 800.0, labels)
            for curvature in ("hessian", "ggn"):
                H = dense_hessian(layers, X, y, activation="tanh", curvature=curvature, reduction="sum")
                for structured in (False, True):
                    out = _moments(backend, layers, X, y, curvature, structured)
                    assert all(np.isfinite(a).all() for a in out)
                    t, t2 = total_moments(*out[:2])
                    if labels == "hard" or curvature == "ggn":
                        assert t == 0.0 and t2 == 0.0 and not np.any(H)
                    else:
                        assert _rel(t2, float(np.sum(H * H))) <= TOL


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_magnitudes_against_per_sample_hessians(backend, curvature):
    """trace_abs[l] = sum_n sum_k |(H_n^{ll})_kk| (1 + c (2 |a~| ea + ea^2) / |a~|^2) on every path, the
    activations' error term of docs/numerics.md section 4 (tests/reference.py); norms[l, l] = sum_n
    |H_n^{ll}|_F (1 + c (r_l + (1 + r_l) r_m)), r = ea / |a~|, where G_ll is formed (the generic path;
    all l <= m for the generic GGN), = the trace share on the GGN's K route; nu_n^{lm} >= |H_n^{lm}|_F
    summed, on every path; zero below the diagonal."""
    for depth in (2, 3):
        for margin in (0.0, 40.0, 300.0):
            layers, X, y = _saturated(depth, margin, "smooth") if margin else _saturated(depth, 100.0, "smooth")
            if not margin:  # an unsaturated model too
                layers[-1] = (layers[-1][0] / 100.0, layers[-1][1] / 100.0)
            sizes = [W.size + b.size for W, b in layers]
            off = np.concatenate([[0], np.cumsum(sizes)])
            L = depth
            diag_abs, fro = np.zeros(L), np.zeros((L, L))
            diag_want, fro_want = np.zeros(L), np.zeros((L, L))
            ea, na, c = R.activation_errors(layers, "tanh", X)
            r = np.divide(ea, na, out=np.zeros_like(ea), where=na > 0)  # column 0 is unused
            for n in range(len(X)):
                Hn = dense_hessian(layers, X[n:n + 1], y[n:n + 1], activation="tanh", curvature=curvature,
                                   reduction="sum")
                for l in range(L):
                    d = np.abs(np.diag(Hn)[off[l]:off[l + 1]]).sum()
                    diag_abs[l] += d
                    diag_want[l] += d * (1 + c * (2 + r[n, l + 1]) * r[n, l + 1])
                    for m in range(l, L):
                        f = np.linalg.norm(Hn[off[l]:off[l + 1], off[m]:off[m + 1]])
                        fro[l, m] += f
                        fro_want[l, m] += f * (1 + c * (r[n, l + 1] + (1 + r[n, l + 1]) * r[n, m + 1]))
            for structured in (False, True):
                trace, _, trace_abs, norms = _moments(backend, layers, X, y, curvature, structured)
                np.testing.assert_allclose(trace_abs, diag_want, rtol=1e-12)
                assert np.all(diag_want[1:] > diag_abs[1:])  # the addition is there to be checked
                assert np.all(np.tril(norms, -1) == 0)
                iu = np.triu_indices(L)
                assert np.all(norms[iu] >= (1 - 1e-12) * fro[iu]), (structured, norms, fro)
                if not structured:
                    exact = iu if curvature == "ggn" else np.diag_indices(L)
                    np.testing.assert_allclose(norms[exact], fro_want[exact], rtol=1e-12)
                elif curvature == "ggn":  # nu_n^{ll} = the trace share, with the activations' term
                    np.testing.assert_allclose(np.diag(norms), diag_want, rtol=1e-12)
