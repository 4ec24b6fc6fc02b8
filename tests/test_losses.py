"""MSE and binary cross-entropy (and cross-entropy's torch options) against torch.autograd.

The references share nothing with the engine: the dense Hessian is torch.autograd's of the
torch loss function itself (F.mse_loss, F.binary_cross_entropy_with_logits, nn.CrossEntropyLoss
with label smoothing and ignore_index), and the GGN is J^T A J with J = jacrev of the logits and
A = autograd's Hessian of the same loss with respect to the logits.  Saturated sigmoids and a
near-perfect fit are checked against the 60-digit AD reference (tests/mp_reference.py).
"""

from __future__ import annotations

from dataclasses import replace

import mp_reference as MP
import numpy as np
import pytest
import reference as R
import wsbound_fast as wsb
from wsbound_fast import _backends as backends
from wsbound_fast._engine.schedule import total_moments


def _model(dims, seed, bias="all", scale=1.0):
    rng = np.random.default_rng(seed)
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        W = rng.standard_normal((b, a)) * scale / np.sqrt(a)
        has_b = bias == "all" or (bias == "alt" and i % 2 == 0)
        layers.append((W, rng.standard_normal(b) * 0.3 if has_b else None))
    return layers


def _targets(loss, N, C, rng, shape="rows"):
    if loss == "mse":
        if shape == "indices":
            return rng.integers(0, C, N)
        return rng.standard_normal((N, C)) if shape == "rows" else rng.standard_normal(N)
    T = rng.random((N, C))
    T[: N // 3] = np.round(T[: N // 3])  # hard 0/1 targets too
    return T if shape == "rows" else T[:, 0]


def _torch_loss(loss, reduction, label_smoothing=0.0, ignore_index=-100):
    import torch.nn.functional as F

    if loss == "mse":
        return lambda z, t: F.mse_loss(z, t, reduction=reduction)
    if loss == "bce":
        return lambda z, t: F.binary_cross_entropy_with_logits(z, t, reduction=reduction)
    return lambda z, t: F.cross_entropy(z, t, reduction=reduction, label_smoothing=label_smoothing,
                                        ignore_index=ignore_index)


def torch_curvatures(layers, activation, X, target, loss_fn):
    """(H, G) of loss_fn(logits(theta), target) by torch.autograd: H its Hessian in theta,
    G = J^T (d^2 loss / d z^2) J with both factors from autograd."""
    import torch
    from torch.autograd.functional import hessian

    fn = R._torch_logits_fn(layers, activation, X)
    theta0 = torch.as_tensor(R.flatten(layers))
    H = hessian(lambda th: loss_fn(fn(th), target), theta0, vectorize=True).detach().numpy()
    with torch.no_grad():
        z0 = fn(theta0)
    shape = z0.shape
    Hz = hessian(lambda z: loss_fn(z.reshape(shape), target), z0.reshape(-1), vectorize=True).detach()
    J = torch.func.jacrev(fn)(theta0).reshape(-1, theta0.numel()).detach()
    G = (J.T @ Hz @ J).numpy()
    return 0.5 * (H + H.T), 0.5 * (G + G.T)


def _torch_target(loss, y, C):
    import torch

    y = np.asarray(y)
    if loss == "cross_entropy":
        return torch.as_tensor(y.astype(np.int64) if y.ndim == 1 else y.astype(np.float64))
    if y.ndim == 1 and C > 1:  # class indices: one-hot targets
        return torch.as_tensor(R.label_rows(y, C))
    return torch.as_tensor(np.asarray(y, dtype=np.float64).reshape(-1, C))


# (dims, activation, bias, target shape)
SPECS = [
    ((4, 3), "tanh", "all", "rows"),
    ((4, 1), "tanh", "all", "vector"),
    ((4, 6, 3), "tanh", "all", "rows"),
    ((4, 5, 1), "sigmoid", "none", "vector"),
    ((3, 5, 4, 3), ("gelu", "sigmoid"), "alt", "rows"),
    ((3, 4, 5, 4, 2), ("silu", "tanh", "softplus"), "all", "rows"),
]
IDS = ["-".join(map(str, s[0])) for s in SPECS]


def _case(spec, loss, seed):
    dims, act, bias, shape = spec
    rng = np.random.default_rng(seed)
    layers = _model(dims, seed, bias, scale=1.5)
    N = 11
    X = rng.standard_normal((N, dims[0]))
    return layers, act, X, _targets(loss, N, dims[-1], rng, shape)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["mse", "bce"])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_moments_and_brackets_match_autograd(spec, loss, reduction, backend, torch):
    layers, act, X, y = _case(spec, loss, seed=len(spec[0]) * 7 + (loss == "bce"))
    C = spec[0][-1]
    H, G = torch_curvatures(layers, act, X, _torch_target(loss, y, C), _torch_loss(loss, reduction))
    for curvature, M in (("hessian", H), ("ggn", G)):
        ev = np.linalg.eigvalsh(M)
        scale = np.abs(ev).max()
        prob = backends.validate_for(backend, layers, X, y, activation=act, curvature=curvature,
                                     reduction=reduction, batch_size=4, loss=loss)
        div = prob.divisor
        for structured in (False, True) if (curvature == "ggn" or len(layers) >= 2) else (False,):
            mom = backends.moments(replace(prob, structured=structured), backend)
            tr, tr2 = total_moments(mom.trace, mom.blocks)
            assert tr / div == pytest.approx(np.trace(M), rel=1e-11, abs=1e-13 * scale), (curvature, structured)
            assert tr2 / div**2 == pytest.approx(np.sum(M * M), rel=1e-11), (curvature, structured)
        res = wsb.bound(layers, X, y, activation=act, curvature=curvature, reduction=reduction, loss=loss,
                        backend=backend, certify=True)
        tol = 1e-13 * scale  # eigvalsh's own error on the reference
        lo, hi = res.lambda_max_bracket
        assert lo <= hi and lo - tol <= ev[-1] <= hi + tol, (curvature, res.lambda_max_bracket, ev[-1])
        lo, hi = res.lambda_min_bracket
        assert lo <= hi and lo - tol <= ev[0] <= hi + tol, (curvature, res.lambda_min_bracket, ev[0])
        if curvature == "ggn":
            assert ev[0] >= -1e-12 * scale  # J^T A J with A >= 0


@pytest.mark.parametrize("loss", ["mse", "bce"])
@pytest.mark.parametrize("spec", [SPECS[2], SPECS[3], SPECS[5]], ids=[IDS[2], IDS[3], IDS[5]])
def test_hvp_eigsh_and_dense_match_autograd(spec, loss, backend, torch):
    layers, act, X, y = _case(spec, loss, seed=3)
    C = spec[0][-1]
    H, G = torch_curvatures(layers, act, X, _torch_target(loss, y, C), _torch_loss(loss, "mean"))
    V = np.random.default_rng(0).standard_normal((H.shape[0], 2))
    for curvature, M in (("hessian", H), ("ggn", G)):
        out = wsb.hvp(layers, X, y, V, activation=act, curvature=curvature, loss=loss, backend=backend)
        np.testing.assert_allclose(out, M @ V, rtol=1e-11, atol=1e-12 * np.abs(M @ V).max())
        top = wsb.eigsh(layers, X, y, k=1, activation=act, curvature=curvature, loss=loss, backend=backend)
        assert top[-1] == pytest.approx(np.linalg.eigvalsh(M)[-1], rel=1e-9)
        if backend == "numpy":
            D = wsb.dense_hessian(layers, X, y, activation=act, curvature=curvature, loss=loss)
            np.testing.assert_allclose(D, M, rtol=1e-11, atol=1e-12 * np.abs(M).max())


def test_mse_class_indices_are_one_hot_targets(backend, torch):
    layers = _model((4, 6, 3), 1)
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((9, 4)), rng.integers(0, 3, 9)
    a = wsb.bound(layers, X, y, activation="tanh", loss="mse", backend=backend)
    b = wsb.bound(layers, X, R.label_rows(y, 3), activation="tanh", loss="mse", backend=backend)
    assert a.trace == b.trace and a.trace_sq == b.trace_sq


def test_torch_loss_modules(torch):
    nn = torch.nn
    layers = _model((4, 6, 3), 2)
    rng = np.random.default_rng(2)
    X = rng.standard_normal((10, 4))
    T = rng.standard_normal((10, 3))
    P = rng.random((10, 3))
    y = rng.integers(0, 3, 10)
    for mod, name, tgt in ((nn.MSELoss(reduction="sum"), "mse", T), (nn.BCEWithLogitsLoss(), "bce", P),
                           (nn.CrossEntropyLoss(reduction="sum"), "cross_entropy", y)):
        a = wsb.bound(layers, X, tgt, activation="tanh", loss=mod)
        b = wsb.bound(layers, X, tgt, activation="tanh", loss=name, reduction=mod.reduction)
        assert (a.trace, a.trace_sq, a.reduction) == (b.trace, b.trace_sq, mod.reduction)
        with pytest.raises(ValueError, match="reduction='mean' disagrees|reduction='sum' disagrees"):
            wsb.bound(layers, X, tgt, activation="tanh", loss=mod, reduction="mean" if mod.reduction == "sum" else "sum")
    for bad, match in ((nn.CrossEntropyLoss(weight=torch.ones(3)), "weight"),
                       (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), "pos_weight"),
                       (nn.MSELoss(reduction="none"), "reduction='none'"),
                       (nn.BCELoss(), "BCEWithLogitsLoss"),
                       (nn.L1Loss(), "unsupported torch loss module L1Loss")):
        with pytest.raises((ValueError, TypeError), match=match):
            wsb.bound(layers, X, P if "BCE" in type(bad).__name__ else y, activation="tanh", loss=bad)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_label_smoothing_and_ignore_index(reduction, backend, torch):
    nn = torch.nn
    layers = _model((4, 6, 3), 3, scale=2.0)
    rng = np.random.default_rng(3)
    X = rng.standard_normal((12, 4))
    y = rng.integers(0, 3, 12)
    y[[2, 7]] = -100  # ignored
    mod = nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.2, ignore_index=-100)
    H, G = torch_curvatures(layers, "tanh", X, torch.as_tensor(y), mod)
    for curvature, M in (("hessian", H), ("ggn", G)):
        res = wsb.bound(layers, X, y, activation="tanh", loss=mod, curvature=curvature, backend=backend, certify=True)
        assert res.n_samples == 10
        assert res.trace == pytest.approx(np.trace(M), rel=1e-11)
        assert res.trace_sq == pytest.approx(np.sum(M * M), rel=1e-11)
        lo, hi = res.lambda_max_bracket
        assert lo <= np.linalg.eigvalsh(M)[-1] * (1 + 1e-13) and np.linalg.eigvalsh(M)[-1] <= hi * (1 + 1e-13)
    with pytest.raises(ValueError, match="every sample"):
        wsb.bound(layers, X[:2], np.array([-100, -100]), activation="tanh", loss=mod)


BAD_TARGETS = [
    ("mse", (4, 6, 3), lambda N: np.zeros((N, 2)), "shape"),
    ("mse", (4, 6, 3), lambda N: np.full(N, 0.5), "integer class indices"),
    ("mse", (4, 6, 3), lambda N: np.full(N, 3), "out of range"),
    ("mse", (4, 6, 3), lambda N: np.full((N, 3), np.nan), "NaN"),
    ("mse", (4, 6, 1), lambda N: np.zeros(N + 1), "one target per sample"),
    ("bce", (4, 6, 3), lambda N: np.full((N, 3), 1.5), r"\[0, 1\]"),
    ("bce", (4, 6, 3), lambda N: np.full((N, 3), -0.1), r"\[0, 1\]"),
    ("bce", (4, 6, 3), lambda N: np.zeros(N), r"\(5, 3\) array"),
    ("bce", (4, 6, 1), lambda N: np.full(N, np.inf), "NaN or Inf"),
    ("bce", (4, 6, 1), lambda N: np.zeros((N, 2)), "shape"),
]


@pytest.mark.parametrize("loss,dims,make,match", BAD_TARGETS)
def test_bad_targets_raise(loss, dims, make, match):
    layers = _model(dims, 0)
    X = np.zeros((5, 4))
    with pytest.raises(ValueError, match=match) as info:
        wsb.bound(layers, X, make(5), activation="tanh", loss=loss)
    assert "y" in str(info.value) and (loss in str(info.value) or "NaN" in match)


def test_bad_loss_argument():
    layers = _model((4, 3), 0)
    X, y = np.zeros((3, 4)), np.zeros(3, dtype=int)
    with pytest.raises(ValueError, match="loss must be one of"):
        wsb.bound(layers, X, y, activation="tanh", loss="hinge")
    with pytest.raises(TypeError, match="loss must be a string"):
        wsb.bound(layers, X, y, activation="tanh", loss=3)
    with pytest.raises(ValueError, match="loss='bce' or loss='mse'"):
        wsb.bound(_model((4, 1), 0), X, y, activation="tanh", loss="cross_entropy")


def test_plan_reports_the_loss_and_its_cheaper_k_route():
    layers = _model((64, 128, 10), 0)
    ce = wsb.plan(layers, 1000, curvature="ggn")
    mse = wsb.plan(layers, 1000, curvature="ggn", loss="mse")
    assert (ce.loss, mse.loss) == ("cross_entropy", "mse")
    assert ce.structured and mse.structured
    assert mse.pair_flops < ce.pair_flops
    assert "loss='mse'" in repr(mse)


# ---- saturation: 60-digit references ---------------------------------------------------


def _saturated_bce(seed):
    """A 3-5-2 tanh model whose logits are about +-40 with matching hard targets (a trained,
    confident binary classifier): h = sigma(z) sigma(-z) ~ 4e-18."""
    rng = np.random.default_rng(seed)
    layers = _model((3, 5, 2), seed, scale=1.0)
    X = rng.standard_normal((6, 3))
    W2, _ = layers[1]
    layers[1] = (W2 * 5.0, np.array([40.0, -38.0]))
    logits = R.logits(layers, "tanh", X)
    return layers, X, (logits > 0).astype(np.float64)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_saturated_bce_against_60_digits(curvature, backend, torch):
    layers, X, T = _saturated_bce(5)
    assert np.abs(R.logits(layers, "tanh", X)).min() > 10
    ref = MP.reference(layers, "tanh", X, T, "mean", loss="bce")
    tr_ref, tr2_ref = ref.moments(curvature)
    res = wsb.bound(layers, X, T, activation="tanh", loss="bce", curvature=curvature, backend=backend, certify=True)
    assert abs(res.trace - float(tr_ref)) <= res.trace_allowance
    assert abs(res.trace_sq - float(tr2_ref)) <= res.trace_sq_allowance
    assert MP.mp_rel(res.trace_sq, tr2_ref) < 1e-12  # the saturated forms lose nothing
    ext = ref.extremes(curvature)
    assert ext.contains_max(*res.lambda_max_bracket) and ext.contains_min(*res.lambda_min_bracket)


@pytest.mark.parametrize("offset", [1e-9, 0.0])
def test_near_perfect_fit_mse_is_certified(offset, backend, torch):
    """Targets equal to the model's own outputs (up to 1e-9, or exactly as float64 computes
    them): delta_L is below the rounding of z_L, and the brackets must still hold."""
    rng = np.random.default_rng(7)
    layers = _model((3, 5, 4, 2), 7, scale=2.0)
    X = rng.standard_normal((6, 3))
    T = R.logits(layers, "tanh", X) + offset
    ref = MP.reference(layers, "tanh", X, T, "mean", loss="mse")
    for curvature in ("hessian", "ggn"):
        tr_ref, tr2_ref = ref.moments(curvature)
        res = wsb.bound(layers, X, T, activation="tanh", loss="mse", curvature=curvature, backend=backend, certify=True)
        assert abs(res.trace - float(tr_ref)) <= res.trace_allowance
        assert abs(res.trace_sq - float(tr2_ref)) <= res.trace_sq_allowance
        ext = ref.extremes(curvature)
        assert ext.contains_max(*res.lambda_max_bracket) and ext.contains_min(*res.lambda_min_bracket)


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_float32_products_for_the_diagonal_losses(loss, torch):
    """dtype="float32" (the Gram products in float32) stays within its allowances of the float64
    moments on cpp and torch, and its bracket still holds."""
    layers, act, X, y = _case(SPECS[2], loss, seed=11)
    H, _ = torch_curvatures(layers, act, X, _torch_target(loss, y, 3), _torch_loss(loss, "mean"))
    ev = np.linalg.eigvalsh(H)
    for backend in ("cpp", "torch"):
        r64 = wsb.bound(layers, X, y, activation=act, loss=loss, backend=backend)
        r32 = wsb.bound(layers, X, y, activation=act, loss=loss, backend=backend, dtype="float32")
        assert abs(r32.trace - np.trace(H)) <= r32.trace_allowance + 1e-13 * abs(np.trace(H))
        assert abs(r32.trace_sq - np.sum(H * H)) <= r32.trace_sq_allowance
        assert r32.trace_sq == pytest.approx(r64.trace_sq, rel=1e-5)
        lo, hi = r32.lambda_max_bracket
        assert lo <= ev[-1] * (1 + 1e-12) and ev[-1] <= hi * (1 + 1e-12)
