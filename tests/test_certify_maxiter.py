"""certify=True stopped by lanczos_maxiter in the middle of a block (a maxiter that is not a
multiple of the block size, as the memory budget of the basis gives for large models): the last
block is cut, and the bracket still holds against eigvalsh of the dense Hessian."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import wsbound_fast as wsb


@pytest.mark.parametrize("maxiter", [9, 13, 21, 30])
def test_certify_cut_by_maxiter_mid_block(maxiter, backend):
    rng = np.random.default_rng(0)
    layers = [(rng.standard_normal((8, 5)), rng.standard_normal(8)), (rng.standard_normal((3, 8)), None)]
    X, y = rng.standard_normal((30, 5)), rng.integers(0, 3, 30)
    ev = np.linalg.eigvalsh(wsb.dense_hessian(layers, X, y, activation="tanh"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "stopped at lanczos_maxiter"
        res = wsb.bound(layers, X, y, activation="tanh", certify=True, rtol=1e-9, which="BE",
                        lanczos_maxiter=maxiter, backend=backend)
    tol = 1e-13 * np.abs(ev).max()
    lo, hi = res.lambda_max_bracket
    assert lo <= hi and lo - tol <= ev[-1] <= hi + tol
    lo, hi = res.lambda_min_bracket
    assert lo <= hi and lo - tol <= ev[0] <= hi + tol
    assert res.lanczos_iterations <= max(maxiter, 8)
