"""progress= / callback= of bound(), and the cost model behind wsb.plan()."""

from __future__ import annotations

import numpy as np
import pytest

import wsbound_fast as wsb
from wsbound_fast._backends import numpy as numpy_backend
from wsbound_fast._engine import schedule as engine_schedule
from wsbound_fast._problem import validate as validation
from wsbound_fast._planning.cost import feature_doubles, feature_flops, pair_flops


def _model(rng, dims=(6, 5, 4)):
    return [(rng.normal(size=(dims[i + 1], dims[i])), rng.normal(size=dims[i + 1])) for i in range(len(dims) - 1)]


def test_callback_counts_every_block_pair(backend):
    rng = np.random.default_rng(0)
    layers, X, y = _model(rng), rng.normal(size=(50, 6)), rng.integers(0, 4, 50)
    calls: list[tuple[int, int]] = []
    res = wsb.bound(layers, X, y, activation="tanh", batch_size=7, backend=backend, callback=lambda d, t: calls.append((d, t)))
    n_blocks = 8  # ceil(50 / 7)
    total = n_blocks * (n_blocks + 1) // 2
    assert calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert res.trace == wsb.bound(layers, X, y, activation="tanh", batch_size=7, backend=backend).trace


def test_callback_exception_stops_and_propagates(backend):
    rng = np.random.default_rng(1)
    layers, X, y = _model(rng), rng.normal(size=(40, 6)), rng.integers(0, 4, 40)

    def stop(done, total):
        raise RuntimeError("user stop")

    with pytest.raises(RuntimeError, match="user stop"):
        wsb.bound(layers, X, y, activation="tanh", batch_size=5, backend=backend, callback=stop)


def test_progress_bar_on_stderr(backend, capsys):
    rng = np.random.default_rng(2)
    layers, X, y = _model(rng), rng.normal(size=(30, 6)), rng.integers(0, 4, 30)
    wsb.bound(layers, X, y, activation="tanh", batch_size=10, backend=backend, progress=True)
    err = capsys.readouterr().err
    assert "6/6 block pairs" in err or "6/6" in err


@pytest.mark.parametrize("bad", [{"progress": 1}, {"progress": "yes"}, {"callback": 3}])
def test_progress_arguments_are_checked(bad):
    rng = np.random.default_rng(3)
    with pytest.raises(TypeError, match=next(iter(bad))):
        wsb.bound(_model(rng), rng.normal(size=(5, 6)), rng.integers(0, 4, 5), **bad)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_plan_matches_what_bound_runs(curvature):
    rng = np.random.default_rng(4)
    layers = _model(rng, (6, 9, 7, 5))
    p = wsb.plan(layers, 83, curvature=curvature, batch_size=10)
    assert p.n_params == sum(W.size + b.size for W, b in layers)
    assert (p.batch_size, p.n_blocks, p.block_pairs) == (10, 9, 45)
    calls = []
    wsb.bound(layers, rng.normal(size=(83, 6)), rng.integers(0, 5, 83), activation="tanh", curvature=curvature, batch_size=10,
              callback=lambda d, t: calls.append(t))
    assert calls[-1] == p.block_pairs
    # flops: (N^2 + sum of block sizes squared) / 2 sample pairs, at the per-pair count
    dims, bias = [6, 9, 7, 5], [True] * 3
    per_pair = pair_flops(dims, bias, curvature == "hessian", p.structured)
    assert p.pair_flops == pytest.approx((83**2 + 8 * 100 + 9) / 2 * per_pair)
    assert p.feature_bytes == 8 * 83 * feature_doubles(dims, bias, curvature == "hessian", p.structured)
    assert p.predicted_seconds > 0 and p.gemm_gflops > 0
    assert "Plan(" in repr(p) and p.to_dict()["n_samples"] == 83


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_plan_feature_flops_count_the_recomputed_blocks(curvature, monkeypatch):
    # a budget that caches only some blocks at once: later groups' features are recomputed

    rng = np.random.default_rng(6)
    dims = [6, 9, 7, 5]
    layers = _model(rng, tuple(dims))
    budget = 400_000
    p = wsb.plan(layers, 83, curvature=curvature, batch_size=10, memory_limit=budget, threads=1)
    assert 1 < p.group_blocks < p.n_blocks  # the case this test is about
    rows = []
    real = engine_schedule.block_features

    def counting(prob, arr, net, Xb, Yb):
        rows.append(Xb.shape[0])
        return real(prob, arr, net, Xb, Yb)

    monkeypatch.setattr(engine_schedule, "block_features", counting)
    # the C++ engine's block plan (wsb.plan's), run by the NumPy backend, which counts here
    prob = validation.validate(layers, rng.normal(size=(83, 6)), rng.integers(0, 5, 83), activation="tanh",
                              curvature=curvature, reduction="mean", batch_size=10, memory_limit=budget, threads=1)
    assert (prob.batch_size, prob.group_blocks) == (p.batch_size, p.group_blocks)
    numpy_backend.moments(prob)
    assert sum(rows) > 83  # some blocks were computed more than once
    per_sample = feature_flops(dims, curvature == "hessian", p.structured)
    assert p.feature_flops == pytest.approx(sum(rows) * per_sample)
    assert p.predicted_seconds == pytest.approx((p.pair_flops + p.feature_flops) / (0.6 * p.gemm_gflops * 1e9))


def test_pair_flops_follow_the_cost_model():
    # one hidden layer, generic full Hessian: alpha (d0+1) + (d1+1) ... spelled out by hand
    d0, h, C = 64, 128, 10
    gemm = (d0 + 1) + (h + 1)  # alpha_1, alpha_2
    gemm += h * h  # <M_1, M_1'>
    gemm += h * C + (h + 1) + C + h + 2 * h * C  # G_12 Gram, beta_2, gamma_2, sigma' Gram, G_12 delta_2' (both ways)
    gemm += C * C  # <A, A'>
    elem = 2 * 2 * C  # the cross terms: sum_c delta'[c] (X^T sigma'')[c] (C < h), both ways
    assert pair_flops([d0, h, C], [True, True], True, False) == 2 * (gemm + elem)
    # structured (docs/structured.md), R = C(C+1)/2 distinct entries of K_1 = W diag(s o s') W^T.
    R = C * (C + 1) // 2
    # GGN: alpha_1, alpha_2, K_1 packed; elementwise: one fused pass over the packed K_1, then O(C)
    ggn = (d0 + 1) + (h + 1) + R * h + 3 * R + 10 * C
    assert pair_flops([d0, h, C], [True, True], False, True) == 2 * ggn
    # Hessian: alphas; s.s', K_1, E, E' (1 + R + 2C rows over h), the three rho Grams, beta_2, gamma_2;
    # <A, A'> generic; elementwise: the fused pass over K_1, then O(C) and the cross terms
    hess = (d0 + 1) + (h + 1) + (1 + R + 2 * C) * h + 3 * h + (h + 1) + C + C * C + 3 * R + 14 * C
    assert pair_flops([d0, h, C], [True, True], True, True) == 2 * hess


@pytest.mark.parametrize("bad, match", [({"n_samples": 0}, "n_samples"), ({"curvature": "x"}, "curvature"),
                                        ({"batch_size": 0}, "batch_size")])
def test_plan_rejects_bad_input(bad, match):
    layers = _model(np.random.default_rng(5))
    kwargs = {"n_samples": 10, **bad}
    n = kwargs.pop("n_samples")
    with pytest.raises(ValueError, match=match):
        wsb.plan(layers, n, **kwargs)
