"""Flops of the pair phase and the machine's GEMM rate (benchmark helpers).

The flop count is the package's own cost model, not a copy: ``_planning.cost.total_pair_flops``
counts the multiply-adds of every GEMM / einsum contraction the engine's pair sum performs on
the contraction path it takes (2 flops each; held to torch's FlopCounterMode by
tests/test_torch_backend.py), summed over the block pairs I <= J of the plan.  The elementwise
work and the per-sample features are not counted, so a flop rate computed from the time of a
whole bound() call is a lower bound on the pair phase's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from wsbound_fast._planning.cost import choose_structured, total_pair_flops

#: Samples per block assumed when the caller gives none (the planner's preferred block).
DEFAULT_BATCH = 256


def pair_flops(dims: Sequence[int], N: int, curvature: str = "hessian", *, bias: bool = True,
               structured: bool | None = None, batch: int = DEFAULT_BATCH) -> int:
    """GEMM flops of the pair phase for N samples in blocks of ``batch``: ``structured`` None is
    the contraction path the planner chooses, False the generic Gram path, True the K route."""
    d = [int(x) for x in dims]
    has_bias = [bool(bias)] * (len(d) - 1)
    hessian = curvature == "hessian"
    if structured is None:
        structured = choose_structured(d, has_bias, hessian)
    return total_pair_flops(d, has_bias, hessian, int(N), min(int(batch), int(N)), structured)


def gemm_rate(dtype: str = "float64", n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` NumPy matmul rate (flop/s) of two n x n matrices, 2 n^3 flops each."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    c = np.empty((n, n), dtype=dtype)
    np.matmul(a, b, out=c)  # warm-up (threads, pages)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"n": n, "repeats": repeats, "best_s": best, "flops_per_s": 2.0 * n ** 3 / best,
            "median_flops_per_s": 2.0 * n ** 3 / float(np.median(times))}
