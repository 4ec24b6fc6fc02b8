"""memory_limit is a budget the NumPy backend keeps: what bound() allocates (features of the
cached blocks, the block pair's batched temporaries, the K route's chunks of sample pairs,
the O(P) copies) stays within it.  NumPy reports its allocations to tracemalloc, so the
high-water mark measured here is the backend's own, not the process's RSS.

(The torch backend's budget is checked on the device in test_torch_device.py.)"""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest

import wsbound_fast as wsb
from wsbound_fast import _backends as backends
from wsbound_fast._backends import compiled
from wsbound_fast._backends import numpy as numpy_backend
from wsbound_fast._planning import blocks as planning_blocks

# (dims, curvature, N, memory_limit): the K route of a one-hidden-layer Hessian (blocks
# (L-1, L-1), (L-1, L)) and of a deep GGN, a deep generic Hessian with its dense cross terms;
# each budget caches only some blocks, so features are recomputed in groups.
CASES = [
    ((100, 160, 10), "hessian", 240, 3 << 20),
    ((60, 96, 96, 10), "ggn", 200, 2 << 20),
    ((30, 64, 64, 6), "hessian", 120, 6 << 20),
]


def _model(dims, n, seed=0):
    rng = np.random.default_rng(seed)
    layers = [(rng.normal(size=(b, a)) / np.sqrt(a), 0.1 * rng.normal(size=b)) for a, b in zip(dims[:-1], dims[1:])]
    return layers, rng.normal(size=(n, dims[0])), rng.integers(0, dims[-1], n)


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(("dims", "curvature", "n", "limit"), CASES, ids=lambda c: str(c))
def test_numpy_backend_keeps_within_memory_limit(dims, curvature, n, limit):
    layers, X, y = _model(dims, n)
    kw = dict(activation="gelu", curvature=curvature, memory_limit=limit, backend="numpy")
    wsb.bound(layers, X[:20], y[:20], **kw)  # imports (SciPy's erf) happen once, outside the measure
    prob = backends.validate_for("numpy", layers, X, y, activation="gelu", curvature=curvature, reduction="mean",
                               memory_limit=limit)
    assert 1 < prob.group_blocks < -(-n // prob.batch_size), "the budget should cache only some blocks"
    peak = _peak(lambda: wsb.bound(layers, X, y, **kw))
    assert 0.4 * limit < peak <= limit, (peak / limit, prob.batch_size, prob.group_blocks)


def test_numpy_plan_differs_from_cpp_only_in_its_shape():
    """The NumPy backend plans its own blocks (one block pair at a time, batched temporaries,
    the K route's chunks within the budget) and gives the same moments as the C++ plan."""
    dims, curvature, n, limit = CASES[0]
    layers, X, y = _model(dims, n)
    kw = dict(activation="gelu", curvature=curvature, reduction="mean", memory_limit=limit)
    cpp = backends.validate_for("cpp", layers, X, y, **kw)
    py = backends.validate_for("numpy", layers, X, y, **kw)
    assert cpp.chunks is None and py.chunks is not None
    assert 8 * sum(py.chunks) <= planning_blocks.KROUTE_SCRATCH_SHARE * limit
    assert py.batch_size == planning_blocks.plan_python(cpp, None, limit)[0]
    a = numpy_backend.moments(py)
    b = compiled.moments(dataclasses.replace(cpp, threads=1))
    np.testing.assert_allclose(a[0], b[0], rtol=1e-12)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-11)
    fixed = backends.validate_for("numpy", layers, X, y, batch_size=37, **kw)
    assert fixed.batch_size == 37  # an explicit batch_size is kept
