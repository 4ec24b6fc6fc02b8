"""The structure-aware contraction (the "K route" of docs/structured.md: every GGN block, and
the Hessian's blocks (L-1, L-1) and (L-1, L)) equals the generic one and the dense references.

bound() picks the cheaper path by the cost model, which for tiny test models is usually
the generic one; here both paths are forced on every model.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import reference as R
from wsbound_fast import _backends as backends
from wsbound_fast._backends import compiled, numpy as numpy_backend
from wsbound_fast._engine import features as engine_features, kroute as engine_kroute
from wsbound_fast._engine.data import HostData, label_rows
from wsbound_fast._engine.namespace import Weights
from wsbound_fast._engine.schedule import total_moments
from wsbound_fast._problem.validate import validate

SPECS = [
    R.ModelSpec((5, 3), "tanh", "all", n=7, labels="hard", seed=1),
    R.ModelSpec((4, 6, 3), "tanh", "all", n=9, labels="hard", seed=2),
    R.ModelSpec((4, 7, 4), "softplus", "none", n=8, labels="soft", seed=3),
    R.ModelSpec((3, 5, 4, 3), ("gelu", "sigmoid"), "alt", n=10, labels="hard", seed=4),
    R.ModelSpec((4, 3, 5, 4, 3), ("silu", "tanh", "gelu_tanh"), "alt", n=11, labels="soft", seed=5),
    R.ModelSpec((3, 6, 2), "relu", "all", n=9, labels="hard", seed=6),
]
def _moments(spec, layers, X, y, curvature, backend, structured, batch_size, chunks=None):
    prob = backends.validate_for(backend, layers, X, y, activation=spec.activation_arg(), curvature=curvature,
                                 reduction="sum", batch_size=batch_size)
    return backends.moments(replace(prob, structured=structured, chunks=chunks), backend)[:2]


@pytest.mark.parametrize("batch_size", [3, 100])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(map(str, s.dims)))
def test_structured_equals_generic_and_dense(spec, curvature, backend, batch_size, torch, refs):
    layers, X, y = refs.model(spec)
    t_s, b_s = _moments(spec, layers, X, y, curvature, backend, True, batch_size)
    t_g, b_g = _moments(spec, layers, X, y, curvature, backend, False, batch_size)
    scale = np.abs(b_g).max()
    np.testing.assert_allclose(b_s, b_g, rtol=1e-11, atol=1e-13 * scale)
    np.testing.assert_allclose(t_s, t_g, rtol=1e-11, atol=1e-13 * np.abs(t_g).max())
    ref = R.torch_hessian if curvature == "hessian" else R.torch_ggn
    H = ref(layers, spec.activation_arg(), X, y, reduction="sum")
    assert total_moments(t_s, b_s)[0] == pytest.approx(np.trace(H), rel=1e-10, abs=1e-12)
    assert total_moments(t_s, b_s)[1] == pytest.approx(np.sum(H * H), rel=1e-10)


DEEP = [s for s in SPECS if s.depth >= 2]


def _features(spec, layers, X, y, curvature, structured):
    prob = replace(validate(layers, X, y, activation=spec.activation_arg(), curvature=curvature, reduction="sum"),
                   structured=structured)
    return prob, engine_features.block_features(prob, numpy_backend.ARRAYS, Weights.of(prob, numpy_backend.ARRAYS), X,
                                                label_rows(prob, 0, X.shape[0]))


@pytest.mark.parametrize("spec", DEEP, ids=lambda s: "-".join(map(str, s.dims)))
def test_k_route_features(spec, refs):
    """The K route keeps p, w, rho, u (Hessian) and the stacked T_l (GGN) instead of the dense
    blocks; they reproduce the generic path's dense M_{L-1} diagonal and G_ll = T_l^T A T_l."""
    layers, X, y = refs.model(spec)
    L, C = spec.depth, spec.dims[-1]
    _, gen = _features(spec, layers, X, y, "hessian", False)
    _, kro = _features(spec, layers, X, y, "hessian", True)
    assert {(L - 1, L - 1), (L - 1, L)}.isdisjoint(kro.G)
    assert set(kro.G) | {(L - 1, L - 1), (L - 1, L)} == set(gen.G)
    d = spec.dims[L - 1]
    M = gen.G[L - 1, L - 1].reshape(-1, d, d)
    np.testing.assert_allclose(kro.u + kro.rho, np.diagonal(M, axis1=1, axis2=2), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(kro.trace, gen.trace, rtol=1e-12)
    A = gen.G[L, L].reshape(-1, C, C)  # the softmax curvature of every sample
    np.testing.assert_allclose(kro.w[:, None, None] * (np.einsum("ni,ij->nij", kro.p, np.eye(C))
                                                       - kro.p[:, :, None] * kro.p[:, None, :]), A, atol=1e-15)
    _, ggen = _features(spec, layers, X, y, "ggn", False)
    _, gkro = _features(spec, layers, X, y, "ggn", True)
    assert not gkro.G and set(gkro.T) == set(range(1, L - 1))
    for l, T in gkro.T.items():
        G = np.einsum("nik,nij,njm->nkm", T, A, T).reshape(X.shape[0], -1)
        np.testing.assert_allclose(G, ggen.G[l, l], rtol=1e-12, atol=1e-14 * np.abs(G).max())
    np.testing.assert_allclose(gkro.trace, ggen.trace, rtol=1e-12)


@pytest.mark.parametrize(("scratch", "values"), [(1.0, 1.0), (400.0, 150.0), (4e6, 1.0)])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("spec", DEEP, ids=lambda s: "-".join(map(str, s.dims)))
def test_k_route_chunks(spec, curvature, scratch, values, refs):
    """Cutting the block pairs into chunks (GEMMs) and sub-chunks (elementwise work) of single
    pairs, or of a few rows and columns, leaves the NumPy K route's sums unchanged (the test
    models fit one chunk otherwise)."""
    layers, X, y = refs.model(spec)
    whole = _moments(spec, layers, X, y, curvature, "numpy", True, 4)
    chunked = _moments(spec, layers, X, y, curvature, "numpy", True, 4, chunks=(scratch, values))
    np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-12, atol=1e-14 * np.abs(whole[1]).max())
    np.testing.assert_array_equal(chunked[0], whole[0])


@pytest.mark.parametrize(("B", "Bp", "per_pair", "per_row"),
                         [(7, 9, 1e7, 0), (7, 9, 1e6, 0), (50, 40, 3e4, 0), (5, 3, 4e5, 0), (50, 40, 100, 2e5)])
def test_pair_chunks_cover_the_block_pair(B, Bp, per_pair, per_row):
    """Every pair of the block pair in exactly one chunk, each chunk within the budget
    (or a single row of pairs when one row needs more)."""
    budget = 1e6
    seen = np.zeros((B, Bp), dtype=int)
    for rows, cols in engine_kroute._pair_chunks(B, Bp, int(per_pair), int(per_row), budget):
        block = seen[rows, cols]
        size = block.size * per_pair + block.shape[0] * per_row
        assert size <= budget or block.shape[0] == 1
        block += 1
    assert np.all(seen == 1)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("dims", [(6, 20, 5), (6, 9, 20, 5)], ids=["L2", "L3"])
def test_structured_cpp_bitwise_independent_of_threads(dims, curvature, refs):
    # the K route's per-row GEMMs and fused per-pair loop run per block pair on worker threads;
    # results are reduced in a fixed order, so any thread count gives the same bits
    spec = R.ModelSpec(dims, "tanh", "all", n=61, labels="soft", seed=77)
    layers, X, y = refs.model(spec)
    prob = replace(validate(layers, X, y, activation=spec.activation_arg(), curvature=curvature, reduction="sum",
                            batch_size=7), structured=True)
    runs = [compiled.moments(replace(prob, threads=t))[:2] for t in (1, 2, 3, 5)]
    for t, b in runs[1:]:
        np.testing.assert_array_equal(t, runs[0][0])
        np.testing.assert_array_equal(b, runs[0][1])
    t_g, b_g = compiled.moments(replace(prob, structured=False))[:2]
    np.testing.assert_allclose(runs[0][1], b_g, rtol=1e-11, atol=1e-13 * np.abs(b_g).max())


@pytest.mark.parametrize("structured", [False, True], ids=["generic", "structured"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_engine_tiles_reduce_to_the_moments(curvature, structured, backend, refs):
    """The Python engine's tiles (schedule.pair_sums), fed to its Reduction row by row in any
    split over tiles, give the moment pass's numbers bit for bit (the seam of a distributed run)."""
    if backend == "cpp":
        pytest.skip("the C++ tiles: tests/test_cpp_tiles.py")
    from wsbound_fast._engine import schedule
    from wsbound_fast._engine.namespace import Weights

    spec = SPECS[3]
    layers, X, y = refs.model(spec)
    prob = backends.validate_for(backend, layers, X, y, activation=spec.activation_arg(), curvature=curvature,
                                 reduction="sum", batch_size=3)
    prob = replace(prob, structured=structured)
    arr = backends.numpy.ARRAYS if backend == "numpy" else backends.torch_backend().arrays(prob)
    data = HostData(prob, arr) if backend == "numpy" else backends.torch_backend().DeviceData.of(prob)
    ranges = schedule.block_ranges(prob.n_samples, prob.batch_size)
    blocks = [(data.rows(lo, hi), data.label_rows(lo, hi)) for lo, hi in ranges]
    pairs = [(i, j) for i in range(len(blocks)) for j in range(i, len(blocks))]
    net = Weights.of(prob, arr)
    red = schedule.Reduction(len(blocks), spec.depth, arr)
    done = {}
    for tile in (pairs[1::2], pairs[::2]):  # two interleaved tiles, computed in either order
        stats, sums = schedule.pair_sums(prob, arr, net, blocks, tile)
        for k, s in stats.items():
            red.block(k, *s)
        done.update(zip(tile, sums))
    for i, j in pairs:  # then reduced in row order, as the Reduction requires
        red.pair(i, j, done[i, j])
    with pytest.raises(AssertionError, match="out of order"):
        schedule.Reduction(2, spec.depth, arr).pair(0, 1, done[0, 1])
    got = red.result()
    want = backends.moments(prob, backend)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
