"""Data given as batches: a torch DataLoader or an iterable of (X, y) batches, with y left out.

The reference is the same call on the concatenated arrays (the batches are collected in order,
so the moments agree to rounding: the engine's blocks are the same samples).
"""

from __future__ import annotations

import numpy as np
import pytest
import wsbound_fast as wsb
from wsbound_fast._problem import loaders


def _problem(seed=0, N=23):
    rng = np.random.default_rng(seed)
    layers = [(rng.standard_normal((6, 4)), rng.standard_normal(6)), (rng.standard_normal((3, 6)), None)]
    return layers, rng.standard_normal((N, 4)), rng.integers(0, 3, N)


def _close(a, b):
    assert a.trace == pytest.approx(b.trace, rel=1e-12) and a.trace_sq == pytest.approx(b.trace_sq, rel=1e-12)
    assert a.n_samples == b.n_samples and a.n_params == b.n_params


def test_iterable_of_batches_equals_arrays(backend):
    layers, X, y = _problem()
    batches = [(X[i:i + 5], y[i:i + 5]) for i in range(0, len(y), 5)]
    ref = wsb.bound(layers, X, y, activation="tanh", backend=backend, certify=True)
    for data in (batches, iter(batches), (b for b in batches)):
        _close(wsb.bound(layers, data, activation="tanh", backend=backend, certify=True), ref)
    v = np.ones(wsb.plan(layers, 10).n_params)
    np.testing.assert_allclose(wsb.hvp(layers, batches, v=v, activation="tanh", backend=backend),
                               wsb.hvp(layers, X, y, v, activation="tanh", backend=backend), rtol=1e-12)
    np.testing.assert_allclose(wsb.eigsh(layers, batches, k=2, activation="tanh", backend=backend),
                               wsb.eigsh(layers, X, y, k=2, activation="tanh", backend=backend), rtol=1e-10)
    assert wsb.plan(layers, batches).n_samples == len(y)


def test_torch_dataloader(torch):
    layers, X, y = _problem(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.as_tensor(layers[0][0]))
        model[0].bias.copy_(torch.as_tensor(layers[0][1]))
        model[2].weight.copy_(torch.as_tensor(layers[1][0]))
    ds = torch.utils.data.TensorDataset(torch.as_tensor(X), torch.as_tensor(y))
    dl = torch.utils.data.DataLoader(ds, batch_size=4)
    ref = wsb.bound(layers, X, y, activation="tanh")
    _close(wsb.bound(model, dl), ref)
    _close(wsb.bound(model, dl, backend="torch"), ref)
    assert wsb.plan(model, dl).n_samples == len(y)
    H = wsb.dense_hessian(model, dl)
    np.testing.assert_allclose(H, wsb.dense_hessian(layers, X, y, activation="tanh"), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="shuffles"):
        wsb.bound(model, torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True))
    with pytest.raises(ValueError, match="drop_last=True"):
        wsb.bound(model, torch.utils.data.DataLoader(ds, batch_size=4, drop_last=True))
    with pytest.raises(ValueError, match="shuffles"):
        wsb.plan(model, torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True))


def test_large_data_goes_to_a_memory_map():
    layers, X, y = _problem(2, N=40)
    batches = [(X[i:i + 8], y[i:i + 8]) for i in range(0, 40, 8)]
    Xc, yc = loaders.collect(batches, memory_limit=1000)  # 40 x 4 float64 = 1280 bytes > 1000
    assert isinstance(Xc, np.memmap) and np.array_equal(Xc, X) and np.array_equal(yc, y)
    Xm, _ = loaders.collect(batches, memory_limit=10**6)
    assert not isinstance(Xm, np.memmap)
    _close(wsb.bound(layers, batches, activation="tanh", memory_limit=2**22),
           wsb.bound(layers, X, y, activation="tanh", memory_limit=2**22))


@pytest.mark.parametrize(("data", "exc", "match"), [
    ([(np.zeros((2, 4)), np.zeros(2, dtype=int)), (np.zeros((2, 5)), np.zeros(2, dtype=int))], ValueError,
     r"batch 1 has inputs of shape \(5,\) per sample; batch 0 had \(4,\)"),
    ([(np.zeros((2, 4)), np.zeros(3, dtype=int))], ValueError, r"batch 0 has inputs of shape"),
    ([(np.zeros((2, 4)), np.zeros(2, dtype=int), 1)], TypeError, r"batch 0 must be an \(inputs, targets\) pair"),
    (iter([]), ValueError, r"the loader gave no samples"),
    ([(np.array([["a"] * 4] * 2), np.zeros(2, dtype=int))], TypeError, r"inputs must hold real numbers"),
])
def test_bad_batches(data, exc, match):
    layers, _, _ = _problem()
    with pytest.raises(exc, match=match):
        wsb.bound(layers, data, activation="tanh")


def test_y_is_required_for_arrays_and_refused_with_a_loader():
    layers, X, y = _problem()
    with pytest.raises(TypeError, match="y is required"):
        wsb.bound(layers, X, activation="tanh")
    with pytest.raises(ValueError, match="leave y out"):
        wsb.bound(layers, [(X, y)], y, activation="tanh")
    with pytest.raises(TypeError, match="hvp\\(\\) needs v"):
        wsb.hvp(layers, [(X, y)], activation="tanh")
