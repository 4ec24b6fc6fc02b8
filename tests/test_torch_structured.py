"""backend="torch" on the K route (docs/structured.md): float32 mode, the accelerator's chunking of
the block pair, the plan's scratch for it, and the engine's K-route features on tensors equal
to those on NumPy arrays.  Both paths for every backend against the generic path and the dense
Hessian: tests/test_structured.py.  Skipped as a whole without torch.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import reference as R  # noqa: E402
import wsbound_fast as wsb  # noqa: E402
from wsbound_fast._backends import compiled  # noqa: E402
from wsbound_fast._engine.schedule import total_moments  # noqa: E402
from test_structured import SPECS  # noqa: E402
from test_torch_backend import FLOAT32_TOL  # noqa: E402
from wsbound_fast._backends import torch as torch_backend  # noqa: E402
from wsbound_fast._planning import blocks as planning_blocks  # noqa: E402
from wsbound_fast._planning import cost as cost_model  # noqa: E402
from wsbound_fast._problem import validate as validation  # noqa: E402

SPEC_IDS = ["-".join(map(str, s.dims)) + f"-{s.seed}" for s in SPECS]


@pytest.fixture(autouse=True)
def _one_thread(torch):  # the conftest fixture: torch with one intra-op thread
    yield


def _tprob(spec, layers, X, y, curvature, batch_size, structured, **kw):
    prob = torch_backend.validate_torch(layers, X, y, activation=spec.activation_arg(), curvature=curvature,
                                         reduction="sum", batch_size=batch_size, **kw)
    return replace(prob, structured=structured)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_float32_structured(spec, curvature, refs):
    """float32 on the structured path: within the float32 tolerance of the float64 C++ core."""
    layers, X, y = refs.model(spec)
    p32 = _tprob(spec, layers, X, y, curvature, 4, True, dtype="float32")
    p64 = replace(p32, dtype=torch.float64)
    tr32, sq32 = total_moments(*torch_backend.moments(p32)[:2])
    tr64, sq64 = total_moments(*compiled.moments(p64)[:2])
    assert R.rel(tr32, tr64, np.sqrt(sq64)) <= FLOAT32_TOL
    assert R.rel(sq32, sq64) <= FLOAT32_TOL


def test_validate_torch_keeps_structured_choice():
    """A wide hidden layer with few classes: the cost model picks the structured path, and
    the torch backend keeps it (and plans its blocks for it)."""
    spec = R.ModelSpec((6, 64, 2), "tanh", "all", n=20, labels="hard", seed=9)
    layers, X, y = spec.build()
    for curvature in ("ggn", "hessian"):
        kw = dict(activation="tanh", curvature=curvature, reduction="sum")
        prob = validation.validate(layers, X, y, **kw)
        tprob = torch_backend.validate_torch(layers, X, y, **kw)
        assert prob.structured and tprob.structured
        a = wsb.bound(layers, X, y, backend="torch", **kw)
        b = wsb.bound(layers, X, y, backend="cpp", **kw)
        assert a.trace == pytest.approx(b.trace, rel=1e-11)
        assert a.trace_sq == pytest.approx(b.trace_sq, rel=1e-11)


@pytest.mark.parametrize("chunk_values", [1.0, 700.0, 1e9])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("spec", [s for s in SPECS if s.depth >= 2], ids=lambda s: "-".join(map(str, s.dims)))
def test_k_route_accelerator_chunks(spec, curvature, chunk_values, refs):
    """The chunking an accelerator plan asks for (prob.chunk_values: one budget for the GEMM
    outputs of a chunk and for the elementwise work of a sub-chunk; single pairs, a few rows,
    the whole block pair), run here on the CPU, still equals the C++ core."""
    layers, X, y = refs.model(spec)
    prob = replace(_tprob(spec, layers, X, y, curvature, 5, True), chunks=(chunk_values, chunk_values))
    t_t, b_t = torch_backend.moments(prob)[:2]
    t_c, b_c = compiled.moments(prob)[:2]
    np.testing.assert_allclose(b_t, b_c, rtol=1e-11, atol=1e-13 * np.abs(b_c).max())
    np.testing.assert_allclose(t_t, t_c, rtol=1e-11, atol=1e-13 * np.abs(t_c).max())


def test_plan_sets_aside_k_route_scratch():
    """The K route's chunks get at most KROUTE_SCRATCH_SHARE of memory_limit (16 bytes per chunk
    value: GEMM outputs and elementwise work) and the block plan the rest: on the CPU no more
    than the cache-sized CPU_CHUNK_VALUES, on any other device (planned as an accelerator) the
    whole share."""
    rng = np.random.default_rng(0)
    layers = [(rng.standard_normal((128, 20)), rng.standard_normal(128)), (rng.standard_normal((10, 128)), None)]
    X, y = rng.standard_normal((300, 20)), rng.integers(0, 10, 300)
    kw = dict(activation="tanh", curvature="hessian", reduction="mean")
    share = planning_blocks.KROUTE_SCRATCH_SHARE
    dims, has_bias = [20, 128, 10], [True, False]
    py = dict(cross_copies=planning_blocks.PY_CROSS_COPIES, feature_temporaries=planning_blocks.PY_FEATURE_TEMPORARIES,
              feature_scratch=cost_model.feature_scratch_doubles(dims, True, True))
    for limit in (1 << 24, 1 << 32):
        cpu = torch_backend.validate_torch(layers, X, y, memory_limit=limit, **kw)
        assert cpu.structured
        want = tuple(min(cap, share * limit / 16) for cap in planning_blocks.CPU_CHUNK_VALUES)
        assert cpu.chunks == pytest.approx(want)
        expect = planning_blocks.plan_blocks(dims, has_bias, 300, True, True, 1, None, limit - int(8 * sum(want)), **py)
        assert (cpu.batch_size, cpu.group_blocks) == expect
    assert cpu.chunks == planning_blocks.CPU_CHUNK_VALUES  # a large budget: the cache-sized chunks
    meta = torch_backend.validate_torch(layers, X, y, device="meta", memory_limit=1 << 24, **kw)
    assert meta.memory_limit == 1 << 24
    assert meta.chunks == pytest.approx((share * (1 << 24) / 16,) * 2)
    expect = planning_blocks.plan_blocks(dims, has_bias, 300, True, True, 1, None, int((1 - share) * (1 << 24)),
                                   **torch_backend.GPU_PLAN, **py)
    assert (meta.batch_size, meta.group_blocks) == expect


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("spec", [s for s in SPECS if s.depth >= 2], ids=lambda s: "-".join(map(str, s.dims)))
def test_k_route_features_match_numpy(spec, curvature, refs):
    """The engine's K-route features (p, w, rho, u, the stacked T_l) on torch tensors are those on
    NumPy arrays."""
    from wsbound_fast._backends.numpy import ARRAYS
    from wsbound_fast._engine.data import label_rows
    from wsbound_fast._engine.features import block_features
    from wsbound_fast._engine.namespace import Weights

    layers, X, y = refs.model(spec)
    prob = _tprob(spec, layers, X, y, curvature, 100, True)
    Y = label_rows(prob, 0, X.shape[0])
    fn = block_features(prob, ARRAYS, Weights.of(prob, ARRAYS), X, Y)
    tarr = torch_backend.arrays(prob)
    ft = block_features(prob, tarr, Weights.of(prob, tarr), torch.from_numpy(X), torch.from_numpy(Y))
    for name in ("p", "w", "rho", "u"):
        a, b = getattr(fn, name), getattr(ft, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_allclose(b.numpy(), a, rtol=1e-13, atol=1e-15, err_msg=name)
    assert set(ft.G) == set(fn.G) and set(ft.T or {}) == set(fn.T or {})
    for l in fn.T or {}:
        np.testing.assert_allclose(ft.T[l].numpy(), fn.T[l], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(ft.trace.numpy(), fn.trace, rtol=1e-13)
