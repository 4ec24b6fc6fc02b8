"""Trained models at the end of training (issue 12): moments and brackets against references
that stay exact when the softmax saturates.

* digits, 64-8-10 tanh (the README's W1 shape, narrower: P = 618), 60 samples, trained 3000 epochs of
  full-batch heavy-ball gradient descent (the demo's trainer), last layer scaled x1, x2, x3, x6:
  train losses 1.7e-4, 1.8e-8, 3.3e-12, ~1e-25.  Reference: mp_reference.hybrid_curvatures
  (float64 Jacobians and curvature of the network, the softmax part from 60-digit AD).
* the same at a size the full 60-digit AD reference handles: digits 0-2 projected on 4
  principal directions, 4-4-3 tanh trained on 90 samples, its curvature on 6 of them.
Everything is computed in the tests (fixed seeds; about 0.5 s of training).
"""

from __future__ import annotations

import numpy as np
import pytest
from mpmath import mp, mpf

import mp_reference as MP
import wsbound_fast as wsb
from test_saturation import check_allowance, check_bound, check_moments, engine  # noqa: F401
from wsbound_fast._api import data as api_data
from wsbound_fast._cli import demo as cli_demo

SCALES = (1, 2, 3, 6)
SMALL_SCALES = (1, 3, 6)


def _scaled(layers, s: float):
    (W0, b0), (W1, b1) = layers
    return [(W0.copy(), b0.copy()), (W1 * s, b1 * s)]


def _loss(layers, X, y) -> float:
    """The mean cross-entropy in mpmath (the demo's float64 one rounds to 0 below ~1e-16)."""
    a = np.tanh(X @ layers[0][0].T + layers[0][1])
    Z = a @ layers[1][0].T + layers[1][1]
    with mp.workdps(40):
        tot = mpf(0)
        for zn, c in zip(Z, y):
            m = max(zn)
            tot += m + mp.log(mp.fsum(mp.exp(mpf(t) - m) for t in zn)) - mpf(zn[c])
        return float(tot / len(y))


@pytest.fixture(scope="module")
def digits_model():
    X, y = api_data.load_digits()
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), 6, replace=False) for c in range(10)])
    X, y = X[idx], y[idx]
    layers = cli_demo.train(cli_demo.init_mlp([64, 8, 10], np.random.default_rng(1)), X, y, epochs=3000)
    return layers, X, y


_HYB: dict[float, MP.DenseRef] = {}


@pytest.fixture(scope="module")
def digits_ref(digits_model, torch):
    def get(s: float):
        layers, X, y = digits_model
        L = _scaled(layers, s)
        if s not in _HYB:
            H, G = MP.hybrid_curvatures(L, "tanh", X, y, "mean")
            _HYB[s] = MP.DenseRef(H, G, MP.block_sizes(L))
        return L, X, y, _HYB[s]
    return get


def test_digits_model_is_trained_to_saturation(digits_model):
    layers, X, y = digits_model
    losses = [_loss(_scaled(layers, s), X, y) for s in SCALES]
    assert losses[0] < 1e-3 and 1e-10 > losses[2] > 1e-14 and losses[3] < 1e-20, losses
    assert all(a > b for a, b in zip(losses, losses[1:]))


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"x{s}")
def test_digits_moments(digits_ref, scale, curvature, engine):
    L, X, y, ref = digits_ref(scale)
    check_moments(L, X, y, "tanh", "mean", curvature, engine, ref, f"loss {_loss(L, X, y):.3g}:")


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("scale", (2, 6), ids=lambda s: f"x{s}")
def test_digits_bound(digits_ref, scale, curvature, engine):
    L, X, y, ref = digits_ref(scale)
    # a short Lanczos run (40 steps): the certificates must hold however far it got
    res = wsb.bound(L, X, y, activation="tanh", curvature=curvature, backend=engine, exact=True, certify=3, lanczos_maxiter=40)
    check_bound(res, ref, curvature)


# --------------------------------------------------------------------------------------
# a trained model small enough for the 60-digit reference
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    X, y = api_data.load_digits()
    keep = y < 3
    X, y = X[keep], y[keep]
    Xc = X - X.mean(axis=0)
    _, _, Vt = np.linalg.svd(Xc, full_matrices=False)
    Z = Xc @ Vt[:4].T
    Z /= Z.std(axis=0)
    rng = np.random.default_rng(2)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), 30, replace=False) for c in range(3)])
    Z, y = Z[idx], y[idx]
    layers = cli_demo.train(cli_demo.init_mlp([4, 4, 3], np.random.default_rng(3)), Z, y, epochs=3000)
    sub = np.array([0, 1, 30, 31, 60, 61])  # two samples of each class
    return layers, np.ascontiguousarray(Z[sub]), y[sub].copy(), Z, y


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("scale", SMALL_SCALES, ids=lambda s: f"x{s}")
def test_small_trained_moments(small_model, scale, curvature, engine):
    layers, X, y, _, _ = small_model
    L = _scaled(layers, scale)
    ref = MP.reference(L, "tanh", X, y, "mean")
    check_moments(L, X, y, "tanh", "mean", curvature, engine, ref, f"loss {mp.nstr(ref.loss, 3)}:")


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("scale", SMALL_SCALES, ids=lambda s: f"x{s}")
def test_small_trained_bound(small_model, scale, curvature, engine):
    layers, X, y, _, _ = small_model
    L = _scaled(layers, scale)
    ref = MP.reference(L, "tanh", X, y, "mean")
    res = wsb.bound(L, X, y, activation="tanh", curvature=curvature, backend=engine, exact=True, certify=3)
    check_bound(res, ref, curvature)
    check_allowance(res, ref, curvature)
