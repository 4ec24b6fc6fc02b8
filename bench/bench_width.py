"""Time to a certified lambda_max bracket of a requested width (issue: certify=True, rtol=).

For each workload (bench/_workloads.py) and in one run, so that the ratios are fair on a
noisy machine:

* one uncertified estimate: scipy eigsh(k=1, 'LA') over curvlinops' Hessian operator (float64),
  the cost a peer pays for a lambda_max that is a lower estimate only;
* wsb.bound(certify=True, rtol=r) for r in 0.1, 0.01, 0.001: the whole call (moments +
  block Lanczos + certificate), the width it reached and the products it used;
* the same with dtype="float32" (float32 moments with their rounding allowances; the
  products and the certificate stay float64);
* wsb.bound(certify=k) for a few k (the fixed-k certificate): time and width.

Where rtol cannot be met, the row gives the width reached and the reason certify=True gave.

    python bench/bench_width.py [--quick] [--workloads W1 D W3] [--threads T] [--repeats R]

Prints a markdown table and writes bench/results/width.json.  Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import wsbound_fast as wsb  # noqa: E402
from _peers import curvlinops_eigsh, versions  # noqa: E402
from _timing import best_of  # noqa: E402
from _workloads import RESULTS, Workload, full_workloads, make_data, quick_workloads, trained_layers  # noqa: E402

#: A deep model whose moment pass takes seconds, not minutes (W2's takes ~110 s here).
DEEP = Workload("D", "deep: digits, 64-64-64-64-10 tanh trained by the demo's gradient descent", "digits", 1797,
                (64, 64, 64, 64, 10), "tanh", ("hessian",), "demo", 1000, 0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny workloads (smoke run)")
    parser.add_argument("--workloads", nargs="+", default=["W1", "D", "W3"],
                        help="names from bench/_workloads.py, and D (a deep digits model)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rtols", type=float, nargs="+", default=[0.1, 0.01, 0.001])
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 10, 30])
    parser.add_argument("--f32-rtols", type=float, nargs="*", default=[0.01],
                        help='rtols also run with dtype="float32" moments')
    parser.add_argument("--out", default=None, help="JSON file name under bench/results (default width.json)")
    args = parser.parse_args(argv)
    table = quick_workloads() if args.quick else full_workloads()
    table["D"] = DEEP
    print(f"1-min load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (timings are noisy above it)")
    rows = []
    for name in args.workloads:
        w = table[name]
        X, y = make_data(w)
        layers, info = trained_layers(w, X, y)
        act = w.activation
        kw = dict(activation=act, threads=args.threads)
        peer_t, peer = best_of(lambda: curvlinops_eigsh(layers, X, y, act, "hessian", dtype="float64"),
                             max(2, args.repeats))  # at least twice: the first call also imports and warms up
        print(f"\n{name}: {w.description}, P = {w.n_params}, N = {X.shape[0]}; train loss {info.get('loss', float('nan')):.3g}")
        print(f"curvlinops eigsh lambda_max (float64, uncertified): {peer_t:.3f} s, {peer.get('matvecs')} products, "
              f"estimate {peer.get('lambda_max_est')}")
        print("| call | time s | x curvlinops eigsh | bracket | width hi/lo-1 | products |")
        print("|---|---|---|---|---|---|")
        t_plain, plain = best_of(lambda: wsb.bound(layers, X, y, **kw), args.repeats)
        print(f"| bound() (moments only, WS) | {t_plain:.3f} | {t_plain / peer_t:.2f} | "
              f"[{plain.lambda_max_bracket[0]:.6g}, {plain.lambda_max_bracket[1]:.6g}] | "
              f"{plain.lambda_max_bracket[1] / plain.lambda_max_bracket[0] - 1:.3g} | 0 |")
        entry = {"workload": name, "n_params": w.n_params, "n_samples": int(X.shape[0]), "peer_eigsh_s": peer_t,
                 "peer_matvecs": peer.get("matvecs"), "moments_only_s": t_plain, "runs": []}
        calls = [(f"certify=True, rtol={r:g}", dict(certify=True, rtol=r)) for r in args.rtols]
        calls += [(f"certify=True, rtol={r:g}, float32 moments", dict(certify=True, rtol=r, dtype="float32"))
                  for r in args.f32_rtols]
        calls += [(f"certify={k}", dict(certify=k)) for k in args.ks]
        notes = []
        for label, extra in calls:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                t, res = best_of(lambda: wsb.bound(layers, X, y, **kw, **extra), args.repeats)
            why = next((str(w.message) for w in caught if "certify=True" in str(w.message)), "")
            lo, hi = res.lambda_max_bracket
            width = hi / lo - 1 if lo > 0 else float("inf")
            mark = "" if res.certify_met in (True, None) else " (not met)"
            print(f"| {label} | {t:.3f} | {t / peer_t:.2f} | [{lo:.8g}, {hi:.8g}] | {width:.3g}{mark} | "
                  f"{res.lanczos_iterations} |")
            if why:
                notes.append(f"{label}: {why}")
            entry["runs"].append({"call": label, "time_s": t, "ratio_to_peer": t / peer_t, "lo": lo, "hi": hi,
                                  "width": width, "products": res.lanczos_iterations, "met": res.certify_met,
                                  "moments_s": res.elapsed_s, "lanczos_s": res.lanczos_s, "why": why})
        for line in notes:
            print(f"- {line}")
        rows.append(entry)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / (args.out or ("width-quick.json" if args.quick else "width.json"))
    out.write_text(json.dumps({"versions": versions(), "load_average": os.getloadavg()[0], "rows": rows}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
