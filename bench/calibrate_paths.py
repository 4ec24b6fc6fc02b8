"""Time the generic and the structured contraction of the C++ engine on a range of shapes,
next to the cost model's prediction, to fit ``_ELEMENTWISE_WEIGHT`` and
``_STRUCTURED_MAX_RATIO`` in python/wsbound_fast/_planning/cost.py.

    python bench/calibrate_paths.py [--threads 1] [--repeats 3]

Prints one line per (shape, curvature): best-of-repeats seconds of both paths, their ratio,
the model's ratio and which path ``bound()`` would choose.  Both paths' moments are also
checked against each other (they are exact; they differ by rounding only).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from wsbound_fast._backends import compiled
from wsbound_fast._planning.cost import _ELEMENTWISE_WEIGHT, _terms
from wsbound_fast._problem.validate import validate

SHAPES = ["64-16-10", "64-32-10", "64-64-10", "64-128-10", "64-512-10", "64-32-32-10", "64-128-128-10",
          "64-64-64-64-10", "64-128-3", "64-32-100", "64-128-100"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        dims = [int(v) for v in shape.split("-")]
        n = 500 if max(dims[1:-1]) <= 128 else 200
        X, y = rng.normal(size=(n, dims[0])), rng.integers(0, dims[-1], n)
        layers = [(rng.normal(size=(dims[i + 1], dims[i])) / np.sqrt(dims[i]), 0.1 * rng.normal(size=dims[i + 1]))
                  for i in range(len(dims) - 1)]
        bias = [True] * (len(dims) - 1)
        for curvature in ("hessian", "ggn"):
            prob = validate(layers, X, y, activation="tanh", curvature=curvature, reduction="mean")
            best, sums = {}, {}
            for structured in (False, True):
                p = dataclasses.replace(prob, structured=structured, threads=args.threads)
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    _, blocks = compiled.moments(p)[:2]
                    times.append(time.perf_counter() - t0)
                best[structured], sums[structured] = min(times), float(blocks.sum())
            assert abs(sums[True] - sums[False]) <= 1e-10 * abs(sums[False]), (shape, curvature)
            cost = [g + _ELEMENTWISE_WEIGHT * e for g, e in (_terms(dims, bias, curvature == "hessian", s)
                                                             for s in (False, True))]
            print(f"{shape:16s} {curvature:7s} generic {best[False]:.3f} s  structured {best[True]:.3f} s  "
                  f"ratio {best[True] / best[False]:.2f}  model {cost[1] / cost[0]:.2f}  chosen "
                  f"{'structured' if prob.structured else 'generic'}", flush=True)


if __name__ == "__main__":
    main()
