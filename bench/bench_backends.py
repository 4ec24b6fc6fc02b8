"""Compare the compiled and the NumPy backend of wsbound_fast.bound() on the digits.

Setting W1: a 64-128-10 tanh MLP (P = 9610) trained briefly on the bundled digits
(N = 1797), full Hessian, mean reduction.  Times ``bound(backend="cpp")`` and
``bound(backend="numpy")`` (best of ``--repeats`` wall-clock calls each, taking turns),
checks that tr(H) and tr(H^2) agree to 1e-10 relative, prints a markdown table and writes
bench/results/backends.json.

    python bench/bench_backends.py [--repeats 3] [--threads T] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
try:
    import wsbound_fast as wsb
except ImportError:  # not installed: use the source tree (the NumPy backend only)
    sys.path.insert(0, str(HERE.parent / "python"))
    import wsbound_fast as wsb

from wsbound_fast._api.data import load_digits  # noqa: E402
from wsbound_fast._cli.demo import init_mlp, loss_and_grads, train  # noqa: E402

HIDDEN = 128
EPOCHS = 200
SEED = 0
RTOL = 1e-10


def setup(hidden: int = HIDDEN, epochs: int = EPOCHS, seed: int = SEED) -> dict[str, Any]:
    """The digits and a 64-hidden-10 tanh MLP after ``epochs`` steps of the demo's training."""
    X, y = load_digits()
    layers = train(init_mlp((X.shape[1], hidden, 10), np.random.default_rng(seed)), X, y, epochs=epochs)
    loss, acc, _ = loss_and_grads(layers, X, y)
    return {"X": X, "y": y, "layers": layers, "loss": loss, "accuracy": acc, "hidden": hidden, "epochs": epochs}


def time_backends(problem: dict[str, Any], backends: Sequence[str], repeats: int,
                  threads: int | None) -> dict[str, dict[str, Any]]:
    """Best and median wall-clock time of ``repeats`` bound() calls per backend, and the last result.

    The backends take turns (cpp, numpy, cpp, ...) so that a burst of load elsewhere on the
    machine does not fall on one backend only.
    """
    walls: dict[str, list[float]] = {b: [] for b in backends}
    engine: dict[str, list[float]] = {b: [] for b in backends}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for backend in backends:
            t0 = time.perf_counter()
            res = wsb.bound(problem["layers"], problem["X"], problem["y"], activation="tanh",
                            curvature="hessian", reduction="mean", backend=backend, threads=threads)
            walls[backend].append(time.perf_counter() - t0)
            engine[backend].append(res.elapsed_s)
            results[backend] = res.to_dict()
    return {b: {"backend": b, "best_s": min(walls[b]), "median_s": statistics.median(walls[b]), "wall_s": walls[b],
                "engine_s": engine[b], "result": results[b]} for b in backends}


def check_agree(a: dict[str, Any], b: dict[str, Any], rtol: float = RTOL) -> None:
    """Raise AssertionError unless tr(H) and tr(H^2) of the two runs agree to ``rtol``."""
    for key in ("trace", "trace_sq"):
        x, z = a["result"][key], b["result"][key]
        if not math.isclose(x, z, rel_tol=rtol, abs_tol=0.0):
            raise AssertionError(f"{key} differs between backends: {a['backend']} {x!r} vs {b['backend']} {z!r} "
                                 f"(relative {abs(x - z) / max(abs(x), abs(z)):.3g} > {rtol:g})")


def _load() -> float | None:
    """The 1-minute load average (None where the OS has none): high values mean noisy timings."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _fmt_load(load: float | None) -> str:
    return "n/a" if load is None else f"{load:.2f}"


def _blas() -> str | None:
    try:
        cfg = np.show_config(mode="dicts")
        info = cfg["Build Dependencies"]["blas"]
        return f"{info.get('name')} {info.get('version', '')}".strip()
    except Exception:  # older NumPy, or a layout we do not know
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="calls per backend; the best is reported (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="threads of the cpp backend (default: all cores)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "backends.json", help="JSON output path")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    try:
        from wsbound_fast._backends.compiled import load_core
        load_core()
    except ImportError as exc:
        print(f"bench_backends: the compiled backend is needed for this comparison: {exc}", file=sys.stderr)
        return 2

    problem = setup()
    X, layers = problem["X"], problem["layers"]
    P = sum(W.size + b.size for W, b in layers)
    load_before = _load()
    runs = time_backends(problem, ("cpp", "numpy"), args.repeats, args.threads)
    load_after = _load()
    check_agree(runs["cpp"], runs["numpy"])
    ratio = runs["numpy"]["best_s"] / runs["cpp"]["best_s"]

    arch = f"{X.shape[1]}-{problem['hidden']}-10"
    print(f"W1: tanh MLP {arch}, P = {P}, N = {X.shape[0]}, full Hessian, mean reduction; "
          f"after {problem['epochs']} epochs (loss {problem['loss']:.4f}, accuracy {100 * problem['accuracy']:.1f}%)")
    print()
    print("| backend | best (s) | median (s) | tr(H) | tr(H^2) | lambda_max <= |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, run in runs.items():
        r = run["result"]
        print(f"| {name} | {run['best_s']:.4f} | {run['median_s']:.4f} | {r['trace']:.12g} | {r['trace_sq']:.12g} "
              f"| {r['lambda_max_upper']:.6g} |")
    print()
    print(f"numpy / cpp time: {ratio:.2f}x (best of {args.repeats}, taking turns); "
          f"tr(H), tr(H^2) agree to {RTOL:g} relative; 1-min load average {_fmt_load(load_before)} -> "
          f"{_fmt_load(load_after)}")

    record = {
        "setting": {"name": "W1", "arch": arch, "activation": "tanh", "n_params": P, "n_samples": int(X.shape[0]),
                    "curvature": "hessian", "reduction": "mean", "epochs": problem["epochs"], "seed": SEED,
                    "loss": problem["loss"], "accuracy": problem["accuracy"]},
        "repeats": args.repeats,
        "threads": args.threads,
        "runs": runs,
        "ratio_numpy_over_cpp": ratio,
        "rtol_checked": RTOL,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "numpy": np.__version__, "blas": _blas(),
                    "cpu_count": os.cpu_count(),
                    "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "loadavg_before": load_before, "loadavg_after": load_after,
                    "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
                            if k in os.environ}},
        "wsbound_fast": wsb.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
