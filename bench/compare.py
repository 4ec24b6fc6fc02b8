"""wsbound_fast side by side with the tools users use today, in one run on one machine.

    python bench/compare.py                       # all workloads (minutes; see README "Performance")
    python bench/compare.py --quick               # tiny sizes, a smoke run well under a minute
    python bench/compare.py --workloads W1,dense --repeats 5

Workloads (bench/_workloads.py): ``dense`` digits 64-32-10 tanh (P = 2410, where the dense
autograd Hessian still fits); ``W1`` the paper's setting, digits 64-128-10 tanh trained to
low loss (P = 9610, full Hessian and GGN); ``W2`` deep 64-256-256-256-10 GELU on the digits
resampled to N = 2000; ``W3`` large 784-1024-10 tanh on 4000 synthetic MNIST-sized samples
(P = 814,090).  Trained weights are cached in bench/results/*.npz.

Methods, each where it fits (otherwise its row says why it was skipped): wsbound_fast cpp
(float64, and float32 when the installed version takes ``dtype=``), wsbound_fast numpy,
dense autograd Hessian + eigvalsh (torch), PyHessian top eigenvalue and Hutchinson trace,
curvlinops eigsh for lambda_max and a Hutchinson ||H||_F^2 run to 1 % standard error,
BackPACK DiagHessian / DiagGGNExact exact trace.  Also the NumPy GEMM rate (float64,
float32), the pair-phase flop count of the cost model (bench/_flops.py) and the fraction
of the GEMM rate reached.

Timing: wall clock, best of ``--repeats`` (a method whose first call takes longer than
``--single-run-after`` seconds, or stops at its time cap, is run once).  Threads: torch
``set_num_threads(2)`` for the peers, the C++ core's default (all cores), OpenBLAS default.
Ratios are time / (wsbound_fast cpp float64 time) of the same workload and curvature.

Checks (the run fails, after writing its JSON, when one does not hold): cpp vs numpy tr(H),
tr(H^2) to 1e-10; our trace vs BackPACK's exact diagonal sum to 1e-8 (float64); trace and
tr(H^2) vs the dense autograd Hessian to 1e-8, whose lambda_max lies within the WS bounds;
the WS upper bound >= every peer's lambda_max estimate.

Writes bench/results/compare.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import wsbound_fast as wsb  # noqa: E402
from wsbound_fast._backends import compiled

import _flops  # noqa: E402
import _peers  # noqa: E402
from _workloads import Workload, full_workloads, make_data, quick_workloads, trained_layers  # noqa: E402

TORCH_THREADS = 2
RTOL_BACKENDS = 1e-10
RTOL_EXACT = 1e-8


# ----------------------------------------------------------------------------- helpers

def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _blas() -> Any:
    try:
        cfg = np.show_config(mode="dicts")
        info = cfg["Build Dependencies"]["blas"]
        return {"name": info.get("name"), "version": info.get("version")}
    except Exception:
        return None


def _threadpools() -> Any:
    try:
        from threadpoolctl import threadpool_info

        return [{k: d.get(k) for k in ("internal_api", "version", "num_threads", "threading_layer")}
                for d in threadpool_info()]
    except Exception:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _rel(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return abs(a - b) / max(abs(b), 1e-300)


def timed(fn: Callable[[], dict[str, Any]], repeats: int, single_after: float) -> dict[str, Any]:
    """Best-of-``repeats`` of ``fn()`` (which reports its own ``time_s``); the best call's result."""
    runs: list[dict[str, Any]] = []
    for _ in range(repeats):
        r = fn()
        runs.append(r)
        if r.get("capped") or r["time_s"] > single_after:
            break
    best = min(runs, key=lambda r: r["time_s"])
    out = dict(best)
    out["times_s"] = [r["time_s"] for r in runs]
    out["k"] = len(runs)
    return out


def _wsb_call(layers: Any, X: np.ndarray, y: np.ndarray, activation: str, curvature: str, backend: str,
              dtype: str | None) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if dtype is not None:
        kw["dtype"] = dtype
    t0 = time.perf_counter()
    res = wsb.bound(layers, X, y, activation=activation, curvature=curvature, reduction="mean",
                    backend=backend, **kw)
    t = time.perf_counter() - t0
    d = res.to_dict()
    d["time_s"] = t
    return d


def _supports(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _plan(layers: Any, N: int, activation: str, curvature: str) -> Any:
    """wsb.plan(...) where the installed wsbound_fast has it (its prediction is recorded beside ours)."""
    plan = getattr(wsb, "plan", None)
    if plan is None:
        return None
    try:
        p = plan(layers, N, activation=activation, curvature=curvature)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if hasattr(p, "to_dict"):
        return p.to_dict()
    if hasattr(p, "__dict__"):
        return {k: v for k, v in vars(p).items() if isinstance(v, (int, float, str, bool, type(None)))}
    return repr(p)


# ----------------------------------------------------------------------------- one case

def run_case(w: Workload, curvature: str, layers: Any, X: np.ndarray, y: np.ndarray, args: argparse.Namespace,
             rates: dict[str, Any]) -> dict[str, Any]:
    """All methods on one workload and curvature: rows, checks and the GEMM-fraction record."""
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    act = w.activation
    N, P = X.shape[0], w.n_params
    cap = args.max_peer_seconds if args.max_peer_seconds is not None else w.peer_max_seconds
    rep, single = args.repeats, args.single_run_after

    def row(method: str, dtype: str, fn: Callable[[], dict[str, Any]] | None, skip: str | None = None,
            repeats: int | None = None) -> dict[str, Any]:
        r: dict[str, Any] = {"workload": w.name, "curvature": curvature, "method": method, "dtype": dtype}
        if skip is not None:
            r["skipped"] = skip
        else:
            assert fn is not None
            print(f"  {w.name} {curvature}: {method} ({dtype}) ...", end="", flush=True, file=sys.stderr)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r.update(timed(fn, rep if repeats is None else repeats, single))
                print(f" {r['time_s']:.3f} s", file=sys.stderr)
            except _peers.PeerUnavailable as exc:
                r["skipped"] = str(exc)
                print(f" skipped: {exc}", file=sys.stderr)
            except MemoryError as exc:
                r["failed"] = f"MemoryError: {exc}"
                print(" failed: out of memory", file=sys.stderr)
            except Exception as exc:
                r["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                r["traceback"] = traceback.format_exc(limit=4)
                print(f" failed: {r['failed']}", file=sys.stderr)
        rows.append(r)
        return r

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"workload": w.name, "curvature": curvature, "check": name, "passed": bool(ok),
                       "detail": detail})

    # -- wsbound_fast
    cpp = row("wsbound_fast cpp", "float64", lambda: _wsb_call(layers, X, y, act, curvature, "cpp", None))
    exact = cpp if "time_s" in cpp else None
    row("wsbound_fast cpp", "float32", lambda: _wsb_call(layers, X, y, act, curvature, "cpp", "float32"))

    dense_flops = _flops.pair_flops(w.sizes, N, curvature, structured=False)  # the generic Gram path
    predicted_numpy = dense_flops / (0.5 * rates["float64"]["flops_per_s"])
    if predicted_numpy > args.numpy_max_seconds:
        row("wsbound_fast numpy", "float64", None,
            skip=f"predicted {predicted_numpy:.0f} s (cost model at 50 % of the float64 GEMM rate) "
                 f"> --numpy-max-seconds {args.numpy_max_seconds:g}")
    else:
        row("wsbound_fast numpy", "float64", lambda: _wsb_call(layers, X, y, act, curvature, "numpy", None))

    # -- peers
    pdt = args.peer_dtype
    if curvature != "hessian":
        row("dense autograd + eigvalsh", "float64", None, skip="run for the full Hessian only")
    elif args.quick and not w.dense_ok:
        row("dense autograd + eigvalsh", "float64", None, skip="--quick: run on the dense workload only")
    elif P > args.dense_max_params:
        row("dense autograd + eigvalsh", "float64", None,
            skip=f"P = {P} > --dense-max-params {args.dense_max_params} (P x P float64 = "
                 f"{P * P * 8 / 2**30:.2f} GiB)")
    else:
        row("dense autograd + eigvalsh", "float64",
            lambda: _peers.dense_autograd(layers, X, y, act, curvature, "float64", max_params=12000))
    pe_iter = 100 if cap >= 60 or args.quick else 20
    row("PyHessian eigenvalues (power iteration)", pdt,
        lambda: _peers.pyhessian_eig(layers, X, y, act, curvature, pdt, max_iter=pe_iter))
    row("PyHessian trace (Hutchinson)", pdt,
        lambda: _peers.pyhessian_trace(layers, X, y, act, curvature, pdt, max_iter=pe_iter))
    eig_dtypes = [pdt] if w.name in ("W2", "W3") or args.quick else ["float32", "float64"]
    for dt in eig_dtypes:
        row("curvlinops eigsh", dt, lambda dt=dt: _peers.curvlinops_eigsh(layers, X, y, act, curvature, dt,
                                                                            max_seconds=cap))
    row("curvlinops Hutchinson ||H||_F^2 to 1% s.e.", pdt,
        lambda: _peers.curvlinops_fro2(layers, X, y, act, curvature, pdt, max_seconds=cap))
    row("BackPACK " + ("DiagHessian" if curvature == "hessian" else "DiagGGNExact") + " sum", "float64",
        lambda: _peers.backpack_diag(layers, X, y, act, curvature, "float64"))

    # -- derived columns and checks
    base = exact["time_s"] if exact else None
    for r in rows:
        if "time_s" in r and base:
            r["ratio_to_cpp"] = r["time_s"] / base
        if exact is None:
            continue
        if "trace_est" in r:
            r["rel_err_trace"] = _rel(r["trace_est"], exact["trace"])
        if "trace_sq_est" in r:
            r["rel_err_trace_sq"] = _rel(r["trace_sq_est"], exact["trace_sq"])
        if "trace" in r and r is not exact:
            r["rel_err_trace"] = _rel(r["trace"], exact["trace"])
        if "trace_sq" in r and r is not exact:
            r["rel_err_trace_sq"] = _rel(r["trace_sq"], exact["trace_sq"])
        est = r.get("lambda_max_est")
        if est is not None:
            r["lambda_max_est_over_ws_upper"] = est / exact["lambda_max_upper"]
            tol = 1e-4 if r["dtype"] == "float32" else 1e-8
            check(f"WS upper >= {r['method']} ({r['dtype']}) lambda_max",
                  est <= exact["lambda_max_upper"] * (1 + tol) + 1e-12,
                  f"{est:.6g} <= {exact['lambda_max_upper']:.6g}")
        m, dt = r["method"], r["dtype"]
        if m == "wsbound_fast numpy" and "trace" in r:
            ok = r["rel_err_trace"] <= RTOL_BACKENDS and r["rel_err_trace_sq"] <= RTOL_BACKENDS
            check("cpp == numpy backend (tr, tr^2)", ok,
                  f"rel {r['rel_err_trace']:.2g}, {r['rel_err_trace_sq']:.2g} <= {RTOL_BACKENDS:g}")
        if m.startswith("BackPACK") and "trace" in r:
            check("trace == BackPACK exact diagonal sum", r["rel_err_trace"] <= RTOL_EXACT,
                  f"rel {r['rel_err_trace']:.2g} <= {RTOL_EXACT:g}")
        if m.startswith("dense autograd") and "trace" in r:
            check("trace, tr(H^2) == dense autograd Hessian",
                  r["rel_err_trace"] <= RTOL_EXACT and r["rel_err_trace_sq"] <= RTOL_EXACT,
                  f"rel {r['rel_err_trace']:.2g}, {r['rel_err_trace_sq']:.2g} <= {RTOL_EXACT:g}")
            lam = r["lambda_max"]
            r["lambda_max_over_ws_upper"] = lam / exact["lambda_max_upper"]
            slack = 1e-8 * max(abs(lam), 1.0)
            check("WS lower <= exact lambda_max <= WS upper",
                  exact["lambda_max_lower"] - slack <= lam <= exact["lambda_max_upper"] + slack,
                  f"{exact['lambda_max_lower']:.6g} <= {lam:.6g} <= {exact['lambda_max_upper']:.6g}")
            check(f"WS upper >= {m} lambda_max", lam <= exact["lambda_max_upper"] + slack,
                  f"{lam:.6g} <= {exact['lambda_max_upper']:.6g}")
        if m == "wsbound_fast cpp" and dt == "float32" and "trace" in r:
            r["note"] = f"vs float64: tr rel {r['rel_err_trace']:.1e}, tr^2 rel {r['rel_err_trace_sq']:.1e}"

    # -- pair phase against the GEMM rate
    gemm: list[dict[str, Any]] = []
    flops = _flops.pair_flops(w.sizes, N, curvature)
    plan_record = _plan(layers, N, act, curvature)
    # the engine's own count (wsb.plan: the contraction path it actually takes)
    engine_flops = plan_record.get("pair_flops") if isinstance(plan_record, dict) else None
    for r in rows:
        if r["method"] == "wsbound_fast cpp" and "time_s" in r:
            rate = rates[r["dtype"]]["flops_per_s"]
            gemm.append({"workload": w.name, "curvature": curvature, "dtype": r["dtype"], "flops": flops,
                         "flops_generic_path": dense_flops, "time_s": r["time_s"],
                         "engine_s": r.get("elapsed_s"), "gflops_per_s": flops / r["time_s"] / 1e9,
                         "gemm_gflops_per_s": rate / 1e9, "fraction": flops / (r["time_s"] * rate),
                         "fraction_generic_path": dense_flops / (r["time_s"] * rate),
                         "engine_flops": engine_flops,
                         "engine_fraction": None if engine_flops is None else engine_flops / (r["time_s"] * rate)})
            r["pair_gflops_per_s"] = flops / r["time_s"] / 1e9
            r["gemm_fraction"] = flops / (r["time_s"] * rate)
    return {"workload": w.name, "curvature": curvature, "n_samples": N, "n_params": P, "rows": rows,
            "checks": checks, "gemm": gemm, "pair_flops": flops,
            "pair_flops_generic_path": dense_flops, "plan": plan_record}


# ----------------------------------------------------------------------------- output

def _g(x: float | None, fmt: str = ".4g") -> str:
    return "" if x is None else format(x, fmt)


def _result_cell(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return "skipped: " + r["skipped"]
    if "failed" in r:
        return "failed: " + r["failed"]
    parts = []
    if "lambda_max_upper" in r:
        parts.append(f"tr {_g(r['trace'], '.6g')}, tr² {_g(r['trace_sq'], '.6g')}, "
                     f"λmax ∈ [{_g(r['lambda_max_lower'])}, {_g(r['lambda_max_upper'])}]")
    elif "lambda_max" in r:
        parts.append(f"λmax {_g(r['lambda_max'])} (exact), tr {_g(r['trace'], '.6g')}")
    if "lambda_max_est" in r:
        parts.append("λmax ≈ " + (_g(r["lambda_max_est"]) if r["lambda_max_est"] is not None else "none"))
    if "trace_est" in r:
        parts.append(f"tr ≈ {_g(r['trace_est'])}")
    if "trace_sq_est" in r:
        parts.append(f"tr² ≈ {_g(r['trace_sq_est'])}")
    if "trace" in r and "lambda_max_upper" not in r and "lambda_max" not in r:
        parts.append(f"tr {_g(r['trace'], '.6g')} (exact)")
    return "; ".join(parts)


def _detail_cell(r: dict[str, Any]) -> str:
    bits = []
    if r.get("rel_err_trace") is not None and r["method"] != "wsbound_fast cpp":
        bits.append(f"tr err {r['rel_err_trace']:.1e}")
    if r.get("rel_err_trace_sq") is not None and r["method"] != "wsbound_fast cpp":
        bits.append(f"tr² err {r['rel_err_trace_sq']:.1e}")
    if r.get("lambda_max_est_over_ws_upper") is not None:
        bits.append(f"est / WS upper {r['lambda_max_est_over_ws_upper']:.3f}")
    if r.get("lambda_max_over_ws_upper") is not None:
        bits.append(f"λmax / WS upper {r['lambda_max_over_ws_upper']:.3f}")
    if "matvecs" in r:
        bits.append(f"{r['matvecs']} matvecs")
    if r.get("capped"):
        bits.append(f"capped at {r.get('max_seconds', 0):g} s" + (f", s.e. {r['rel_se']:.1%}" if 'rel_se' in r else ""))
    if "hessian_s" in r:
        bits.append(f"Hessian {r['hessian_s']:.2f} s + eigvalsh {r['eigvalsh_s']:.2f} s")
    if "gemm_fraction" in r:
        bits.append(f"pair phase ≥ {r['gemm_fraction']:.0%} of GEMM")
    if "note" in r:
        bits.append(r["note"])
    if r.get("k", 1) > 1:
        bits.append(f"best of {r['k']}")
    return "; ".join(bits)


def markdown(record: dict[str, Any]) -> str:
    lines = []
    m = record["machine"]
    lines.append(f"Machine: {m['cpu']} ({m['cpu_count']} CPUs), {m['platform']}; NumPy {m['numpy']} "
                 f"({(m['blas'] or {}).get('name')}), torch {record['versions'].get('torch')}; "
                 f"load average {_g(m['loadavg_before'], '.2f')} -> {_g(m['loadavg_after'], '.2f')}")
    r64, r32 = record["gemm_rate"]["float64"], record["gemm_rate"]["float32"]
    lines.append(f"GEMM rate (NumPy matmul {r64['n']}², best of {r64['repeats']}, the better of the start and "
                 "the end of the run): float64 "
                 f"{r64['flops_per_s'] / 1e9:.1f} GFLOP/s, float32 {r32['flops_per_s'] / 1e9:.1f} GFLOP/s")
    lines.append(f"Threads: {record['threads']}")
    lines.append("")
    lines.append("| workload | curv. | method | dtype | time (s) | × cpp | result | detail |")
    lines.append("|---|---|---|---|---:|---:|---|---|")
    for case in record["cases"]:
        for r in case["rows"]:
            t = _g(r.get("time_s"), ".3f")
            ratio = _g(r.get("ratio_to_cpp"), ".2f")
            lines.append(f"| {r['workload']} | {r['curvature']} | {r['method']} | {r['dtype']} | {t} | {ratio} "
                         f"| {_result_cell(r)} | {_detail_cell(r)} |")
    lines.append("")
    lines.append("Pair phase against the GEMM rate (flops: the engine's GEMMs, `_planning.cost.total_pair_flops` on the path the planner takes; "
                 "time: whole bound() call, features included, so the fraction is a lower bound):")
    lines.append("")
    lines.append("| workload | curv. | N | P | dtype | pair flops | (generic path) | time (s) | GFLOP/s | "
                 "GEMM GFLOP/s | fraction | engine flops (wsb.plan) | engine fraction |")
    lines.append("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in record["cases"]:
        for g in case["gemm"]:
            lines.append(f"| {g['workload']} | {g['curvature']} | {case['n_samples']} | {case['n_params']} "
                         f"| {g['dtype']} | {g['flops']:.3g} | {g['flops_generic_path']:.3g} | {g['time_s']:.3f} "
                         f"| {g['gflops_per_s']:.1f} | {g['gemm_gflops_per_s']:.1f} | {g['fraction']:.0%} "
                         f"| {_g(g.get('engine_flops'), '.3g')} | {_g(g.get('engine_fraction'), '.0%')} |")
    lines.append("")
    bad = [c for c in record["checks"] if not c["passed"]]
    lines.append(f"Checks: {len(record['checks']) - len(bad)} of {len(record['checks'])} passed"
                 + ("" if not bad else "; FAILED: " + "; ".join(f"{c['workload']} {c['curvature']} {c['check']}: "
                                                                 f"{c['detail']}" for c in bad)))
    return "\n".join(lines)


def warm_up() -> dict[str, str]:
    """Run every method once, untimed, on a tiny model: first-call costs (lazy LAPACK loading,
    torch.func / vmap set-up) are not the methods' cost (measured here: a first eigvalsh of a
    610 x 610 matrix 13 s, the next 0.6 s; a first curvlinops matvec 5 s, the next 0.06 s)."""
    rng = np.random.default_rng(0)
    X = rng.random((64, 64))
    y = rng.integers(0, 10, size=64)
    layers = [(rng.standard_normal((4, 64)) / 8, np.zeros(4)), (rng.standard_normal((10, 4)) / 2, np.zeros(10))]
    status: dict[str, str] = {}

    def curvlinops_matvec(curv: str, dt: str) -> None:
        import torch

        op = _peers._curvlinops_operator(layers, X, y, "tanh", curv, dt)
        op.to_scipy(np.dtype(dt)).matvec(np.ones(op.shape[1], dtype=dt))
        _ = op @ torch.ones(op.shape[1], 2, dtype=op.dtype)

    calls: dict[str, Callable[[], Any]] = {
        "wsbound_fast cpp": lambda: wsb.bound(layers, X, y, activation="tanh", backend="cpp"),
        "wsbound_fast numpy": lambda: wsb.bound(layers, X, y, activation="tanh", backend="numpy"),
        "dense autograd": lambda: _peers.dense_autograd(layers, X, y, "tanh", "hessian", "float64"),
        "pyhessian": lambda: (_peers.pyhessian_eig(layers, X, y, "tanh", "hessian", "float32", max_iter=2),
                              _peers.pyhessian_trace(layers, X, y, "tanh", "hessian", "float32", max_iter=2)),
        "backpack": lambda: _peers.backpack_diag(layers, X, y, "tanh", "hessian", "float64"),
    }
    for curv in ("hessian", "ggn"):
        for dt in ("float32", "float64"):
            calls[f"curvlinops {curv} {dt}"] = lambda c=curv, d=dt: curvlinops_matvec(c, d)
    for name, fn in calls.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
            status[name] = "ok"
        except Exception as exc:
            status[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
    return status


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workloads", default="dense,W1,W2,W3",
                        help="comma-separated subset of dense,W1,W2,W3 (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run well under a minute")
    parser.add_argument("--repeats", type=int, default=None, help="best of k calls per method (default 3; quick 1)")
    parser.add_argument("--single-run-after", type=float, default=20.0,
                        help="a method whose first call takes longer (s) is not repeated (default 20)")
    parser.add_argument("--peer-dtype", choices=("float32", "float64"), default="float32",
                        help="dtype of the stochastic peers (PyHessian, curvlinops Hutchinson; default float32, "
                             "torch's default); curvlinops eigsh runs in both on dense and W1")
    parser.add_argument("--max-peer-seconds", type=float, default=None,
                        help="time cap of one curvlinops eigsh / Hutchinson run (default per workload: 120 s, "
                             "W3 90 s, quick 2 s)")
    parser.add_argument("--dense-max-params", type=int, default=3000,
                        help="run the dense autograd route up to this P (default 3000: the 64-32-10 model; "
                             "at most 12000)")
    parser.add_argument("--numpy-max-seconds", type=float, default=600.0,
                        help="skip the numpy backend when the cost model predicts more (default 600)")
    parser.add_argument("--gemm-size", type=int, default=None, help="matmul size of the GEMM rate (default 2048)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "compare.json", help="JSON output")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if not 1 <= args.dense_max_params <= 12000:
        parser.error("--dense-max-params must be in 1..12000 (never a dense P x P beyond that)")
    table = quick_workloads() if args.quick else full_workloads()
    names = [s.strip() for s in args.workloads.split(",") if s.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {list(table)}")
    try:
        compiled.load_core()
    except ImportError as exc:
        print(f"compare: the compiled backend is needed: {exc}", file=sys.stderr)
        return 2
    try:
        import torch

        torch.set_num_threads(TORCH_THREADS)
    except ImportError:
        torch = None  # type: ignore[assignment]

    load_before = _load()
    gsize = args.gemm_size or (512 if args.quick else 2048)
    rates = {dt: _flops.gemm_rate(dt, gsize, 3 if args.quick else 5) for dt in ("float64", "float32")}
    print(f"GEMM rate: float64 {rates['float64']['flops_per_s'] / 1e9:.1f}, float32 "
          f"{rates['float32']['flops_per_s'] / 1e9:.1f} GFLOP/s", file=sys.stderr)

    t0 = time.perf_counter()
    warm = warm_up()
    print(f"warm-up: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    cases: list[dict[str, Any]] = []
    workloads: dict[str, Any] = {}
    for name in names:
        w = table[name]
        X, y = make_data(w)
        print(f"{w.name}: {w.description} (N = {X.shape[0]}, P = {w.n_params}) ...", file=sys.stderr)
        if torch is None and w.trainer == "torch-adam":
            workloads[name] = {"skipped": "torch is needed to train this workload"}
            continue
        layers, info = trained_layers(w, X, y)
        workloads[name] = {"description": w.description, "data": w.data, "sizes": list(w.sizes),
                           "activation": w.activation, "n_samples": int(X.shape[0]), "n_params": w.n_params,
                           "curvatures": list(w.curvatures), "training": info, "peer_max_seconds":
                           args.max_peer_seconds if args.max_peer_seconds is not None else w.peer_max_seconds}
        for curv in w.curvatures:
            cases.append(run_case(w, curv, layers, X, y, args, rates))

    # The rate again at the end: on a shared machine one measurement can fall into a burst of
    # load elsewhere, so the better of the two is the reference (both are recorded).
    rates_end = {dt: _flops.gemm_rate(dt, gsize, 3 if args.quick else 5) for dt in ("float64", "float32")}
    for dt in rates:
        rates[dt]["start_flops_per_s"] = rates[dt]["flops_per_s"]
        rates[dt]["end_flops_per_s"] = rates_end[dt]["flops_per_s"]
        rates[dt]["flops_per_s"] = max(rates[dt]["flops_per_s"], rates_end[dt]["flops_per_s"])
    for case in cases:
        for g in case["gemm"]:
            rate = rates[g["dtype"]]["flops_per_s"]
            g["gemm_gflops_per_s"] = rate / 1e9
            g["fraction"] = g["flops"] / (g["time_s"] * rate)
            g["fraction_generic_path"] = g["flops_generic_path"] / (g["time_s"] * rate)
        for r in case["rows"]:
            if "gemm_fraction" in r:
                r["gemm_fraction"] = r["pair_gflops_per_s"] * 1e9 / rates[r["dtype"]]["flops_per_s"]

    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "quick": args.quick, "repeats": args.repeats, "single_run_after_s": args.single_run_after,
        "wsbound_fast": wsb.__version__, "wsbound_fast_has_dtype": _supports(wsb.bound, "dtype"),
        "wsbound_fast_has_plan": hasattr(wsb, "plan"),
        "threads": f"torch.set_num_threads({TORCH_THREADS}) for the peers; wsbound_fast cpp default threads "
                   f"(all {os.cpu_count()} cores); NumPy/OpenBLAS default"
                   + (f" (OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']})"
                      if "OPENBLAS_NUM_THREADS" in os.environ else ""),
        "gemm_rate": rates,
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "numpy": np.__version__, "blas": _blas(),
                    "threadpools": _threadpools(), "loadavg_before": load_before, "loadavg_after": _load(),
                    "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                        "MKL_NUM_THREADS") if k in os.environ}},
        "versions": _peers.versions(),
        "warm_up": warm,
        "workloads": workloads,
        "cases": cases,
        "checks": [c for case in cases for c in case["checks"]],
    }
    text = markdown(record)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out}")
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")
    failed = [c for c in record["checks"] if not c["passed"]]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
