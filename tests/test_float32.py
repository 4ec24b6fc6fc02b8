"""dtype="float32" on the C++ backend: Gram products in float32, float64 accumulation.

Held to the float64 result of the same engine and to a torch autograd Hessian; the
tolerance (1e-5 relative) is far above what was measured (about 1e-9) and far below
anything that would change a bound's meaning.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import reference as R
import wsbound_fast as wsb
from wsbound_fast._backends import compiled
from wsbound_fast._engine.schedule import total_moments
from test_structured import SPECS
from wsbound_fast._problem.validate import validate

F32_RTOL = 1e-5


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(map(str, s.dims)))
def test_float32_close_to_float64_and_torch(spec, curvature, structured, torch, refs):
    layers, X, y = refs.model(spec)
    prob = validate(layers, X, y, activation=spec.activation_arg(), curvature=curvature, reduction="sum",
                    batch_size=4)
    t64, b64 = compiled.moments(replace(prob, structured=structured))[:2]
    t32, b32 = compiled.moments(replace(prob, structured=structured, f32=True))[:2]
    np.testing.assert_allclose(t32, t64, rtol=1e-12)  # traces come from float64 features
    np.testing.assert_allclose(b32, b64, rtol=F32_RTOL, atol=F32_RTOL * np.abs(b64).max())
    ref = R.torch_hessian if curvature == "hessian" else R.torch_ggn
    H = ref(layers, spec.activation_arg(), X, y, reduction="sum")
    assert total_moments(t32, b32)[1] == pytest.approx(np.sum(H * H), rel=F32_RTOL)


def test_float32_bitwise_independent_of_threads():
    X, y = wsb.load_digits()
    rng = np.random.default_rng(0)
    layers = [(rng.normal(size=(16, 64)) / 8, rng.normal(size=16)), (rng.normal(size=(10, 16)) / 4, None)]
    runs = [wsb.bound(layers, X[:300], y[:300], activation="tanh", dtype="float32", batch_size=40, threads=t) for t in (1, 2, 3)]
    assert len({(r.trace, r.trace_sq) for r in runs}) == 1


@pytest.mark.parametrize("dtype, exc", [("float16", ValueError), ("int32", ValueError), (object(), TypeError)])
def test_bad_dtype(dtype, exc):
    rng = np.random.default_rng(1)
    layers = [(rng.normal(size=(3, 4)), None), (rng.normal(size=(2, 3)), None)]
    with pytest.raises(exc, match="dtype"):
        wsb.bound(layers, rng.normal(size=(5, 4)), rng.integers(0, 2, 5), activation="tanh", dtype=dtype)
