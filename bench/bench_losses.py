"""bound() per loss on W1- and W3-shaped models: time as a ratio to cross-entropy, same run.

The same weights (the workload's, trained with cross-entropy) and inputs for every loss;
targets: the class labels (cross-entropy), their one-hot rows (mse, as the edge-of-stability
experiments use), and the one-hot rows as binary targets (bce).  Each loss is timed best of
``--repeats`` calls, taking turns, on the compiled backend; the K route or generic path is
whatever bound() chooses (reported).  Writes bench/results/losses.json and prints a table.

    python bench/bench_losses.py [--workloads W1,W3] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _workloads as WL  # noqa: E402
import wsbound_fast as wsb  # noqa: E402

LOSSES = ("cross_entropy", "mse", "bce")


def _targets(loss: str, y: np.ndarray, C: int) -> np.ndarray:
    if loss == "cross_entropy":
        return y
    rows = np.zeros((y.shape[0], C))
    rows[np.arange(y.shape[0]), y] = 1.0
    return rows


def run(names: list[str], repeats: int, quick: bool) -> dict:
    table = WL.quick_workloads() if quick else WL.full_workloads()
    out = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "repeats": repeats,
           "results": []}
    for name in names:
        w = table[name]
        X, y = WL.make_data(w)
        layers, _ = WL.trained_layers(w, X, y)
        C = w.sizes[-1]
        for curvature in ("hessian", "ggn"):
            best = {loss: float("inf") for loss in LOSSES}
            info = {}
            for _ in range(repeats):
                for loss in LOSSES:
                    t0 = time.perf_counter()
                    res = wsb.bound(layers, X, _targets(loss, y, C), activation=w.activation, curvature=curvature,
                                    loss=loss)
                    best[loss] = min(best[loss], time.perf_counter() - t0)
                    info[loss] = res
            for loss in LOSSES:
                p = wsb.plan(layers, len(y), activation=w.activation, curvature=curvature, loss=loss)
                out["results"].append({
                    "workload": name, "sizes": list(w.sizes), "n_samples": len(y), "curvature": curvature,
                    "loss": loss, "seconds": best[loss], "ratio_to_cross_entropy": best[loss] / best["cross_entropy"],
                    "path": "structured" if p.structured else "generic", "pair_flops": p.pair_flops,
                    "trace": info[loss].trace, "lambda_max_bracket": list(info[loss].lambda_max_bracket)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="W1,W3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="the tiny workloads (a smoke run)")
    ap.add_argument("--out", default=str(HERE / "results" / "losses.json"))
    args = ap.parse_args()
    res = run(args.workloads.split(","), args.repeats, args.quick)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print("| workload | curvature | loss | path | pair flops | seconds | ratio to cross-entropy |")
    print("|---|---|---|---|---|---|---|")
    for r in res["results"]:
        print(f"| {r['workload']} {'-'.join(map(str, r['sizes']))} N={r['n_samples']} | {r['curvature']} | {r['loss']} "
              f"| {r['path']} | {r['pair_flops']:.3g} | {r['seconds']:.3f} | {r['ratio_to_cross_entropy']:.2f} |")


if __name__ == "__main__":
    main()
