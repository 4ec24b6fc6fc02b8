"""Time grows as N^2 and peak memory stays flat in N: bound() on the W1 model for N = 500 ... 8000.

Each N runs in a fresh subprocess, which reports bound()'s elapsed time (best of the first
call and a few repeats; the first call's time is kept too) and the process's peak resident
memory (ru_maxrss) after the first call.  The script fits log(time) = a + e log(N) by least squares
over the runs and prints e (2 is the N^2 of the pair phase), plus the peak memory of each run
with the size of its input X for comparison.

    python bench/scaling.py [--sizes 500,1000,2000,4000,8000] [--curvature hessian] [--memory-limit BYTES]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys
import numpy as np
import wsbound_fast as wsb
from wsbound_fast._cli.demo import init_mlp
N, curvature = int(sys.argv[1]), sys.argv[2]
limit = None if sys.argv[3] == "default" else int(sys.argv[3])
X0, y0 = wsb.load_digits()
rng = np.random.default_rng(0)
idx = rng.integers(0, len(y0), N)
X = X0[idx] + 0.01 * rng.standard_normal((N, X0.shape[1]))   # digits resampled, made distinct
y = y0[idx]
layers = init_mlp([64, 128, 10], np.random.default_rng(1))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
first = wsb.bound(layers, X, y, activation="tanh", curvature=curvature, memory_limit=limit).elapsed_s
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# steady state: best of a few more calls (the first call of a process also pays thread start-up,
# page faults of fresh buffers and cold caches, which would bias the exponent at small N)
repeats = max(1, min(5, 4000 // N))
best = min([first] + [wsb.bound(layers, X, y, activation="tanh", curvature=curvature, memory_limit=limit).elapsed_s
                      for _ in range(repeats)])
plan = wsb.plan(layers, N, curvature=curvature, memory_limit=limit)
print(json.dumps({"N": N, "elapsed_s": best, "first_call_s": first, "peak_rss_mib": peak / 1024,
                  "rss_before_mib": base / 1024, "X_mib": X.nbytes / 2**20, "batch_size": plan.batch_size,
                  "pair_flops": plan.pair_flops}))
"""


def fit_exponent(ns: list[int], ts: list[float]) -> float:
    xs, ys = [math.log(n) for n in ns], [math.log(t) for t in ts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="500,1000,2000,4000,8000")
    ap.add_argument("--curvature", default="hessian", choices=("hessian", "ggn"))
    ap.add_argument("--memory-limit", type=int, default=None,
                    help="bound(memory_limit=...) in bytes (default: the package's default budget, which caches "
                         "every block's features when they fit, so memory then grows with N up to the budget)")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "scaling.json"))
    args = ap.parse_args()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        out = subprocess.run([sys.executable, "-c", CHILD, str(n), args.curvature,
                              "default" if args.memory_limit is None else str(args.memory_limit)], capture_output=True, text=True,
                             check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"N = {n:5d}: {r['elapsed_s']:8.3f} s (first call {r['first_call_s']:.3f} s), "
              f"{r['pair_flops'] / r['elapsed_s'] / 1e9:5.1f} GFLOP/s, "
              f"peak RSS {r['peak_rss_mib']:7.1f} MiB (before bound(): {r['rss_before_mib']:.1f}; X {r['X_mib']:.1f})",
              flush=True)
    e = fit_exponent([r["N"] for r in rows], [r["elapsed_s"] for r in rows])
    e_first = fit_exponent([r["N"] for r in rows], [r["first_call_s"] for r in rows])
    growth = [r["peak_rss_mib"] - r["rss_before_mib"] for r in rows]
    print(f"\nfitted exponent of time in N: {e:.3f} (N^2 expected; {e_first:.3f} from first calls only); "
          f"memory added by bound(): "
          f"{min(growth):.1f} .. {max(growth):.1f} MiB over N = {rows[0]['N']} .. {rows[-1]['N']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"curvature": args.curvature, "memory_limit": args.memory_limit,
                                           "rows": rows, "exponent": e, "exponent_first_call": e_first}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
