"""The structure-aware contraction (GGN through C x C Gram blocks; the Hessian's
M_{L-1} as C-rank plus diagonal) equals the generic one and the dense references.

bound() picks the cheaper path by the cost model, which for tiny test models is usually
the generic one; here both paths are forced on every model.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import reference as R
import wsbound_fast._api as api
from wsbound_fast._validate import validate

SPECS = [
    R.ModelSpec((5, 3), "tanh", "all", n=7, labels="hard", seed=1),
    R.ModelSpec((4, 6, 3), "tanh", "all", n=9, labels="hard", seed=2),
    R.ModelSpec((4, 7, 4), "softplus", "none", n=8, labels="soft", seed=3),
    R.ModelSpec((3, 5, 4, 3), ("gelu", "sigmoid"), "alt", n=10, labels="hard", seed=4),
    R.ModelSpec((4, 3, 5, 4, 3), ("silu", "tanh", "gelu_tanh"), "alt", n=11, labels="soft", seed=5),
    R.ModelSpec((3, 6, 2), "relu", "all", n=9, labels="hard", seed=6),
]
MOMENTS = {"cpp": api._moments_cpp, "numpy": api._moments_numpy}


def _moments(spec, layers, X, y, curvature, backend, structured, batch_size):
    prob = validate(layers, X, y, activation=spec.activation_arg(), curvature=curvature, reduction="sum",
                    batch_size=batch_size)
    return MOMENTS[backend](replace(prob, structured=structured))


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
    assert api.total_moments(t_s, b_s)[0] == pytest.approx(np.trace(H), rel=1e-10, abs=1e-12)
    assert api.total_moments(t_s, b_s)[1] == pytest.approx(np.sum(H * H), rel=1e-10)
