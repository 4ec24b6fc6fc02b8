"""pytest-benchmark of bound() with both backends (not part of the test suite).

    python -m pytest bench/ --benchmark-only

Model: a 64-32-10 tanh MLP (P = 2410) after 100 epochs of the demo's training on the
bundled digits (N = 1797); full Hessian, mean reduction.  Every benchmarked result is
checked against tr(H), tr(H^2) of the explicit dense Hessian to 1e-10 relative.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")

try:
    import wsbound_fast as wsb
except ImportError:  # not installed: use the source tree (the NumPy backend only)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
    import wsbound_fast as wsb

from wsbound_fast._api.data import load_digits
from wsbound_fast._cli.demo import init_mlp, train

HIDDEN = 32
EPOCHS = 100
RTOL = 1e-10


@pytest.fixture(scope="module")
def problem() -> tuple[Any, np.ndarray, np.ndarray]:
    X, y = load_digits()
    layers = train(init_mlp((X.shape[1], HIDDEN, 10), np.random.default_rng(0)), X, y, epochs=EPOCHS)
    return layers, X, y


@pytest.fixture(scope="module")
def reference(problem: tuple[Any, np.ndarray, np.ndarray]) -> tuple[float, float]:
    """tr(H) and tr(H^2) = ||H||_F^2 of the explicit P x P Hessian."""
    H = wsb.dense_hessian(*problem, activation="tanh", curvature="hessian", reduction="mean")
    return float(np.trace(H)), float(np.sum(H * H))


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
def test_bound(benchmark: Any, problem: tuple[Any, np.ndarray, np.ndarray], reference: tuple[float, float],
               backend: str) -> None:
    if backend == "cpp":
        try:
            from wsbound_fast._backends.compiled import load_core
            load_core()
        except ImportError as exc:
            pytest.skip(str(exc))
    layers, X, y = problem
    benchmark.group = f"bound: tanh 64-{HIDDEN}-10, N = {X.shape[0]}, hessian, mean"
    res = benchmark(wsb.bound, layers, X, y, activation="tanh", curvature="hessian", reduction="mean",
                    backend=backend)
    benchmark.extra_info.update(n_params=res.n_params, n_samples=res.n_samples, trace=res.trace,
                                trace_sq=res.trace_sq)
    assert res.trace == pytest.approx(reference[0], rel=RTOL, abs=0)
    assert res.trace_sq == pytest.approx(reference[1], rel=RTOL, abs=0)
