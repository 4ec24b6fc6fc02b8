"""Both builds of the compiled core (baseline and AVX2+FMA) compute the same moments."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from wsbound_fast._backends import compiled
from wsbound_fast._backends.compiled import cpu_has_avx2_fma, load_core


def _avx2_core():
    """The AVX2 + FMA build, or skip where this CPU or installation has none."""
    if not cpu_has_avx2_fma():
        pytest.skip("this CPU has no AVX2 + FMA")
    try:
        return importlib.import_module("wsbound_fast._core_avx2")
    except ImportError:
        pytest.skip("the AVX2 build is not part of this installation")


def _moments(core, depth: int, curvature: str, structured: bool) -> tuple[np.ndarray, ...]:
    """core.moments: (trace, blocks, trace_abs, norms)."""
    rng = np.random.default_rng(depth)
    dims = [6, 7, 5, 4, 3][: depth] + [3]
    layers = [(rng.normal(size=(dims[i + 1], dims[i])), rng.normal(size=dims[i + 1])) for i in range(depth)]
    X = rng.normal(size=(23, dims[0]))
    y = rng.integers(0, 3, size=23)
    return core.moments([W for W, _ in layers], [b for _, b in layers], [1] * (depth - 1), [0.0] * (depth - 1),
                        X, y.astype(np.int64), curvature == "hessian", structured, 5, 2, 2)


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_avx2_build_equals_baseline(depth: int, curvature: str, structured: bool) -> None:
    fast = _avx2_core()
    base = importlib.import_module("wsbound_fast._core")
    ref = _moments(base, depth, curvature, structured)
    assert len(ref) == 4
    assert [r.shape for r in ref] == [(depth,), (depth, depth), (depth,), (depth, depth)]
    for a, b in zip(_moments(fast, depth, curvature, structured), ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14 * np.abs(b).max())


def test_variant_choice_is_validated() -> None:
    with pytest.raises(ValueError, match="WSBOUND_FAST_CORE"):
        load_core("sse9")


def test_default_core_is_importable() -> None:
    assert hasattr(compiled.load_core(), "moments")


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_both_builds_have_the_same_hvp(curvature: str) -> None:
    base = importlib.import_module("wsbound_fast._core")
    rng = np.random.default_rng(11)
    dims = [6, 7, 5, 3]
    layers = [(rng.normal(size=(dims[i + 1], dims[i])), rng.normal(size=dims[i + 1])) for i in range(3)]
    X = rng.normal(size=(23, dims[0]))
    y = rng.integers(0, 3, size=23).astype(np.int64)
    P = sum(W.size + b.size for W, b in layers)
    V = rng.normal(size=(2, P))

    def run(core):
        return core.hvp([W for W, _ in layers], [b for _, b in layers], [1, 1], [0.0, 0.0], X, y, V,
                        curvature == "hessian", 5, 2)

    ref = run(base)
    assert ref.shape == (2, P)
    fast = _avx2_core()
    np.testing.assert_allclose(run(fast), ref, rtol=1e-12, atol=1e-14 * np.abs(ref).max())
