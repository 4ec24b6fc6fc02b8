"""The curvature over a subset of the parameters (frozen layers of a torch module, params=).

The reference is torch.autograd's Hessian (or the J^T A J GGN) of every parameter, restricted
to the selected parameters' rows and columns: the Hessian with respect to those parameters
alone (a principal submatrix).
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as R
import wsbound_fast as wsb


def _model(torch, seed=0):
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data(torch, N=14):
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g)


def _columns(layers, keep):
    cols, off = [], 0
    for (W, b), k in zip(layers, keep):
        n = W.size + (0 if b is None else b.size)
        if k:
            cols.extend(range(off, off + n))
        off += n
    return np.array(cols)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("keep", [(False, True, True), (True, False, True), (False, False, True), (True, True, False)])
def test_frozen_layers_against_autograd(keep, curvature, backend, torch):
    model = _model(torch)
    X, y = _data(torch)
    layers, acts = wsb.from_torch(model)
    ref = (R.torch_hessian if curvature == "hessian" else R.torch_ggn)(layers, acts, X.numpy(), y.numpy())
    cols = _columns(layers, keep)
    M = ref[np.ix_(cols, cols)]
    ev = np.linalg.eigvalsh(M)
    for i, k in enumerate(keep):
        model[2 * i].requires_grad_(k)
    res = wsb.bound(model, X, y, curvature=curvature, backend=backend, certify=True)
    arrays = wsb.bound(layers, X.numpy(), y.numpy(), activation=acts, curvature=curvature, backend=backend,
                       params=[i for i, k in enumerate(keep) if k], certify=True)
    for r in (res, arrays):
        assert r.n_params == len(cols)
        assert r.trace == pytest.approx(np.trace(M), rel=1e-11)
        assert r.trace_sq == pytest.approx(np.sum(M * M), rel=1e-11)
        tol = 1e-13 * np.abs(ev).max()
        lo, hi = r.lambda_max_bracket
        assert lo - tol <= ev[-1] <= hi + tol
        lo, hi = r.lambda_min_bracket
        assert lo - tol <= ev[0] <= hi + tol
        assert [lb.layer for lb in r.layer_bounds] == [i + 1 for i, k in enumerate(keep) if k]
    v = np.random.default_rng(0).standard_normal(len(cols))
    np.testing.assert_allclose(wsb.hvp(model, X, y, v, curvature=curvature, backend=backend), M @ v,
                               rtol=1e-11, atol=1e-12 * np.abs(M @ v).max())
    top = wsb.eigsh(model, X, y, k=1, curvature=curvature, backend=backend)
    assert top[-1] == pytest.approx(ev[-1], rel=1e-9)
    if backend == "numpy":
        np.testing.assert_allclose(wsb.dense_hessian(model, X, y, curvature=curvature), M, rtol=1e-11,
                                   atol=1e-12 * np.abs(M).max())


def test_all_trainable_is_the_whole_model(torch):
    model = _model(torch)
    X, y = _data(torch)
    layers, acts = wsb.from_torch(model)
    a = wsb.bound(model, X, y)
    b = wsb.bound(layers, X.numpy(), y.numpy(), activation=acts, params=[0, 1, 2])
    c = wsb.bound(layers, X.numpy(), y.numpy(), activation=acts)
    assert (a.trace, a.trace_sq, a.n_params) == (b.trace, b.trace_sq, b.n_params) == (c.trace, c.trace_sq, c.n_params)


def test_params_with_mse_and_plan(torch):
    model = _model(torch)
    X, _ = _data(torch)
    T = torch.randn(X.shape[0], 3, dtype=torch.float64)
    layers, acts = wsb.from_torch(model)
    import torch.nn.functional as F
    from torch.autograd.functional import hessian

    fn = R._torch_logits_fn(layers, acts, X.numpy())
    H = hessian(lambda th: F.mse_loss(fn(th), T), torch.as_tensor(R.flatten(layers))).numpy()
    cols = _columns(layers, (False, True, False))
    M = H[np.ix_(cols, cols)]
    res = wsb.bound(layers, X.numpy(), T.numpy(), activation=acts, loss="mse", params=[1])
    assert res.trace == pytest.approx(np.trace(M), rel=1e-11)
    assert res.trace_sq == pytest.approx(np.sum(M * M), rel=1e-11)
    assert wsb.plan(layers, 100, params=[1]).n_params == len(cols)
    model[0].requires_grad_(False)
    assert wsb.plan(model, 100).n_params == R.n_params(layers) - layers[0][0].size - layers[0][1].size


@pytest.mark.parametrize(("params", "exc", "match"), [
    ([3], ValueError, r"params: layer index 3 is out of range for a model of 3 layers"),
    ([], ValueError, r"params selects no parameters"),
    ("0", TypeError, r"params must be None or a sequence of layer indices"),
    (["x1"], ValueError, r"params: 'x1' is not a layer index or a name"),
    (["b9"], ValueError, r"params: layer index 9 is out of range"),
    (["b0"], ValueError, r"params: layer 0 has no bias"),
    (1, TypeError, r"params must be None or a sequence"),
    ([0.5], TypeError, r"params: layer indices must be integers"),
])
def test_bad_params(params, exc, match):
    rng = np.random.default_rng(0)
    layers = [(rng.standard_normal((5, 4)), None), (rng.standard_normal((5, 5)), None), (rng.standard_normal((3, 5)), None)]
    X, y = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    for call in (lambda: wsb.bound(layers, X, y, activation="tanh", params=params),
                 lambda: wsb.hvp(layers, X, y, np.ones(10), activation="tanh", params=params),
                 lambda: wsb.dense_hessian(layers, X, y, activation="tanh", params=params)):
        with pytest.raises(exc, match=match):
            call()


def test_everything_frozen_is_refused(torch):
    model = _model(torch)
    X, y = _data(torch)
    with pytest.raises(ValueError, match="selects no parameters"):
        wsb.bound(model.requires_grad_(False), X, y)


def _part_columns(layers, selection):
    """Flat positions of the parameters named by selection ("W<i>", "b<i>", or i)."""
    cols, off = [], 0
    for i, (W, b) in enumerate(layers):
        nb = 0 if b is None else b.size
        if i in selection or f"W{i}" in selection:
            cols.extend(range(off, off + W.size))
        if nb and (i in selection or f"b{i}" in selection):
            cols.extend(range(off + W.size, off + W.size + nb))
        off += W.size + nb
    return np.array(cols)


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("selection", [("W0", 1, 2), (0, "b1", 2), ("b0", "W2"), ("W1", "b2"), ("b0", "b1", "b2")])
def test_weights_or_biases_alone_against_autograd(selection, curvature, structured, backend, torch):
    """A layer's weights without its bias (or the reverse): the principal submatrix of those
    parameters, on the generic and the structure-aware paths."""
    from dataclasses import replace

    from wsbound_fast import _backends as backends
    from wsbound_fast._engine.schedule import select_layers, total_moments

    model = _model(torch, seed=2)
    X, y = _data(torch)
    layers, acts = wsb.from_torch(model)
    ref = (R.torch_hessian if curvature == "hessian" else R.torch_ggn)(layers, acts, X.numpy(), y.numpy())
    cols = _part_columns(layers, selection)
    M = ref[np.ix_(cols, cols)]
    prob = backends.validate_for(backend, layers, X.numpy(), y.numpy(), activation=acts, curvature=curvature,
                                 reduction="mean", params=list(selection), batch_size=5)
    assert prob.n_params == len(cols)
    mom = select_layers(backends.moments(replace(prob, structured=structured), backend), prob.layers_in)
    tr, tr2 = total_moments(mom.trace, mom.blocks)
    assert tr / prob.divisor == pytest.approx(np.trace(M), rel=1e-11)
    assert tr2 / prob.divisor**2 == pytest.approx(np.sum(M * M), rel=1e-11)
    res = wsb.bound(layers, X.numpy(), y.numpy(), activation=acts, curvature=curvature, params=list(selection),
                    backend=backend, certify=True)
    ev = np.linalg.eigvalsh(M)
    tol = 1e-13 * np.abs(ev).max()
    lo, hi = res.lambda_max_bracket
    assert lo - tol <= ev[-1] <= hi + tol
    v = np.random.default_rng(1).standard_normal(len(cols))
    np.testing.assert_allclose(wsb.hvp(layers, X.numpy(), y.numpy(), v, activation=acts, curvature=curvature,
                                       params=list(selection), backend=backend), M @ v, rtol=1e-11,
                               atol=1e-12 * np.abs(M @ v).max())


def test_requires_grad_per_parameter(torch):
    """A module whose first layer's bias alone is frozen: the trainable parameters' curvature."""
    model = _model(torch)
    X, y = _data(torch)
    layers, acts = wsb.from_torch(model)
    model[0].bias.requires_grad_(False)
    a = wsb.bound(model, X, y)
    b = wsb.bound(layers, X.numpy(), y.numpy(), activation=acts, params=["W0", 1, 2])
    assert (a.trace, a.trace_sq, a.n_params) == (b.trace, b.trace_sq, b.n_params)
    assert a.n_params == R.n_params(layers) - 6


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_subset_magnitudes_are_the_whole_models(curvature, backend):
    """A weights-or-bias subset changes the traces and pair sums, never the rounding magnitudes
    (trace_abs, norms): they stay the whole model's, which bound the submatrix's blocks too and
    which the product's allowance needs (the product runs over the whole model)."""
    from wsbound_fast import _backends as backends

    rng = np.random.default_rng(6)
    layers = [(rng.standard_normal((6, 4)), rng.standard_normal(6)), (rng.standard_normal((5, 6)), rng.standard_normal(5)),
              (rng.standard_normal((3, 5)), rng.standard_normal(3))]
    X, y = rng.standard_normal((13, 4)), rng.integers(0, 3, 13)
    kw = dict(activation="tanh", curvature=curvature, reduction="mean", batch_size=5)
    full = backends.moments(backends.validate_for(backend, layers, X, y, **kw), backend)
    part = backends.moments(backends.validate_for(backend, layers, X, y, params=["b0", "W1", 2], **kw), backend)
    np.testing.assert_array_equal(part.trace_abs, full.trace_abs)
    np.testing.assert_array_equal(part.norms, full.norms)
    assert not np.array_equal(part.blocks, full.blocks)
