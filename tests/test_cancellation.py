"""A hidden pre-activation that cancels: z = W x + b near 0 has a rounding error of about
u |W x|, which relative to the activation a = sigma(z) is unbounded.  The relative error chain
of the rounding model cannot cover it; the activations' error term (docs/numerics.md section 4)
does.  Every bound bound() prints must hold against the 60-digit reference (tests/mp_reference.py,
which shares no formula with the engines), on every backend, for the Hessian and the GGN.

The layer after the cancelling unit has no bias, so that its block of the curvature is the
tiny activation squared times the output curvature: the case the hypothesis search of
test_saturation_props.py once found, with the per-layer lower bound 3e-15 (relative) above the
true lambda_max of that block.
"""

from __future__ import annotations

import mp_reference as MP
import numpy as np
import pytest
import wsbound_fast as wsb
from test_saturation import check_bound


def _cancelling(seed: int, gap: float, hidden: int, depth: int):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.2, 0.9, (1, 2))
    W1 = rng.uniform(0.5, 2.0, (hidden, 2))
    b1 = rng.standard_normal(hidden)
    b1[0] = -(W1[0] @ x[0]) + gap  # unit 0: z = W x + b = gap, computed with an error ~ u |W x|
    layers = [(W1, b1)]
    if depth == 3:
        layers.append((rng.standard_normal((hidden, hidden)) / hidden, None))
    layers.append((rng.standard_normal((2, hidden)), None))
    return layers, x, np.array([0])


CASES = [(seed, gap, hidden, depth) for seed in (0, 1) for gap in (1e-6, 1e-9, 1e-12) for hidden, depth in ((1, 2), (3, 2), (1, 3))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"s{c[0]}-gap{c[1]:g}-h{c[2]}-d{c[3]}")
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_bounds_hold_where_a_hidden_preactivation_cancels(case, curvature, backend):
    layers, X, y = _cancelling(*case)
    ref = MP.reference(layers, "tanh", X, y, "mean")
    res = wsb.bound(layers, X, y, activation="tanh", curvature=curvature, backend=backend, exact=True, certify=2)
    check_bound(res, ref, curvature)


@pytest.mark.parametrize("case", CASES[::3], ids=lambda c: f"s{c[0]}-gap{c[1]:g}-h{c[2]}-d{c[3]}")
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_float32_moments_hold_where_a_hidden_preactivation_cancels(case, backend, request):
    """dtype="float32": float32 Grams (cpp) or float32 features and Grams (torch); the activations'
    term is folded with the factors of that precision (docs/numerics.md section 4)."""
    if backend == "torch":
        request.getfixturevalue("torch")
    layers, X, y = _cancelling(*case)
    ref = MP.reference(layers, "tanh", X, y, "mean")
    for curvature in ("hessian", "ggn"):
        res = wsb.bound(layers, X, y, activation="tanh", curvature=curvature, backend=backend, dtype="float32",
                        exact=True, certify=2)
        check_bound(res, ref, curvature)
