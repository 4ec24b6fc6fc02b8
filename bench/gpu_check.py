"""GPU check of bound(backend="torch"): exactness on CUDA, then time, TFLOP/s and Lanczos.

    python bench/gpu_check.py            # on a CUDA machine: the full check (< 5 minutes)
    python bench/gpu_check.py --quick    # anywhere: the small CPU self-check only

On a CUDA device:

1. verifies torch-CUDA (float64) against the C++ backend (NumPy if the extension is not
   built) on small models -- depths 1-4, full Hessian and GGN, hard and soft labels, layers
   without bias, and a 784-1024-10 model at N = 256 -- to 1e-10 relative: tr(H), tr(H^2)
   and the curvature-vector product ``wsb.hvp`` of two random vectors; and reports the
   float32 mode's error on the same models;
2. measures the card's float64 (and float32, TF32 off) GEMM rate with torch.matmul;
3. prints a table for 784-1024-10 tanh at N = 4000 and N = 10000 and a deep
   784-512-512-512-10 GELU model at N = 2000 (full Hessian, mean reduction, random weights
   and pixel-like inputs; X and y already on the GPU): time to the bound, the flop count of
   the pair phase (``_planning.cost.total_pair_flops``: the GEMMs that the pair sum performs,
   for the block plan and contraction path chosen) and the TFLOP/s that makes against the measured GEMM rate,
   the float32 mode's time and error, and the time of a torch Hessian-vector-product
   Lanczos estimate of lambda_max on the same card (forward-over-reverse HVP with
   torch.func, full reorthogonalisation, stopped when the Ritz value changes by < 1e-6
   relative), checked to lie below the certified upper bound, and the time of
   ``wsb.eigsh(..., backend="torch")`` on the same card (Lanczos over the package's exact
   product, basis on the device, tol=1e-6 on the residual), checked to agree with it.

Without CUDA (or with --quick) it says so and runs the same code on the CPU with tiny
models, finishing in seconds; the exit status is 0 when every check passes.

A row that fails (an exception, CUDA out of memory) is reported in its table as FAILED with
the error, and the script goes on to the next row; the exit status is then 1 and the
tracebacks follow the tables.  No row is started past TIME_GUARD_S, and past TIME_LIMIT_S
(SIGALRM) the row running is stopped and reported, so the whole run stays under 5 minutes.
On CUDA, TF32 is deliberately switched on for the process (``torch.set_float32_matmul_precision
("high")``, as a training script might) so that the float32 columns also check that
bound(dtype="float32") turns it off (TF32 would show as errors of ~1e-3, not ~1e-7).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
try:
    import wsbound_fast as wsb
except ImportError:  # not installed: use the source tree (no compiled backend)
    sys.path.insert(0, str(HERE.parent / "python"))
    import wsbound_fast as wsb

import torch  # noqa: E402
from wsbound_fast._backends import torch as torch_backend  # noqa: E402
from wsbound_fast._planning import cost as cost_model  # noqa: E402

RTOL = 1e-10
FLOAT32_RTOL = 2e-5
EIGSH_TOL = 1e-6  # wsb.eigsh's residual tolerance in the table (relative to |lambda|)
TIME_GUARD_S = 240.0  # no row (or step of a table row) is started past this
TIME_LIMIT_S = 285.0  # the row running is stopped here (SIGALRM): the whole script stays < 5 min

#: (where, traceback) of every failed row, printed after the tables.
ERRORS: list[tuple[str, str]] = []
#: time.perf_counter() at the start of main().
T_START = time.perf_counter()


def past_guard() -> bool:
    return time.perf_counter() - T_START > TIME_GUARD_S


class Deadline(Exception):
    """Raised by SIGALRM past TIME_LIMIT_S."""


@contextlib.contextmanager
def time_limit(seconds_left: float) -> Iterator[None]:
    """Raise Deadline in the main thread after ``seconds_left`` (POSIX; a no-op elsewhere)."""
    if not hasattr(signal, "SIGALRM") or seconds_left == math.inf:
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise Deadline(f"stopped: past the {TIME_LIMIT_S:.0f} s limit of the whole check")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds_left, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def failure(where: str, exc: BaseException, device: torch.device) -> str:
    """Record the traceback, free what the failed row left on the GPU, and return a short
    description for its table row."""
    ERRORS.append((where, traceback.format_exc()))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "CUDA OUT OF MEMORY: " + str(exc).split(".")[0]
    if isinstance(exc, Deadline):
        return str(exc)
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def reference_backend() -> str:
    try:
        from wsbound_fast._backends.compiled import load_core
        load_core()
        return "cpp"
    except Exception:  # pragma: no cover - extension not built
        return "numpy"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------


def make_model(dims: tuple[int, ...], n: int, seed: int, *, bias: Any = True, soft: bool = False,
               pixels: bool = False) -> tuple[list, np.ndarray, np.ndarray]:
    """Random MLP (W ~ N(0, 1/d_in), b ~ 0.1 N(0, 1)) and data, as NumPy arrays."""
    rng = np.random.default_rng(seed)
    L = len(dims) - 1
    mask = [bias] * L if isinstance(bias, bool) else list(bias)
    layers = []
    for l in range(L):
        W = rng.standard_normal((dims[l + 1], dims[l])) / math.sqrt(dims[l])
        layers.append((W, 0.1 * rng.standard_normal(dims[l + 1]) if mask[l] else None))
    X = rng.random((n, dims[0])) if pixels else rng.standard_normal((n, dims[0]))
    y = rng.dirichlet(np.ones(dims[-1]), size=n) if soft else rng.integers(0, dims[-1], size=n)
    return layers, X, y


# --------------------------------------------------------------------------------------
# 1. exactness against the C++ / NumPy backend
# --------------------------------------------------------------------------------------


def verify_case(device: torch.device, c: dict[str, Any], ref_backend: str) -> tuple[float, float, float, float]:
    """Relative errors of torch on ``device`` against ``ref_backend``: tr(H), tr(H^2), H v
    (float64), and tr(H^2) in float32."""
    layers, X, y = make_model(c["dims"], c["n"], c["seed"], bias=c.get("bias", True), soft=c.get("soft", False))
    kw = dict(activation=c["act"], curvature=c["curv"])
    ref = wsb.bound(layers, X, y, backend=ref_backend, **kw)
    Xt, yt = torch.from_numpy(X).to(device), torch.from_numpy(y).to(device)
    res = wsb.bound(layers, Xt, yt, backend="torch", device=device, **kw)
    r32 = wsb.bound(layers, Xt, yt, backend="torch", device=device, dtype="float32", **kw)
    scale = math.sqrt(ref.trace_sq)
    e1 = abs(res.trace - ref.trace) / max(abs(ref.trace), scale, 1e-300)
    e2 = rel(res.trace_sq, ref.trace_sq)
    e32 = rel(r32.trace_sq, ref.trace_sq)
    V = np.random.default_rng(c["seed"]).standard_normal((ref.n_params, 2))
    hv = wsb.hvp(layers, X, y, V, backend=ref_backend, **kw)
    ehv = float(np.abs(wsb.hvp(layers, Xt, yt, V, backend="torch", device=device, **kw) - hv).max()
                / max(float(np.abs(hv).max()), 1e-300))
    return e1, e2, ehv, e32


def verify(device: torch.device, cases: list[dict[str, Any]]) -> bool:
    ref_backend = reference_backend()
    print(f"\n## 1. torch on {device} against backend={ref_backend!r} (float64 to {RTOL:g}; float32 reported)\n")
    print("| model | curvature | labels | rel err tr(H) | rel err tr(H^2) | rel err H v | float32 rel err tr(H^2) "
          "| ok |")
    print("|---|---|---|---:|---:|---:|---:|:---:|")
    ok_all = True
    for c in cases:
        name = "-".join(map(str, c["dims"])) + f" {c['act'] if isinstance(c['act'], str) else '+'.join(c['act'])}" \
            + f" N={c['n']}" + ("" if c.get("bias", True) is True else " (no-bias layers)")
        labels = "soft" if c.get("soft") else "hard"
        if past_guard():
            ok_all = False
            print(f"| {name} | {c['curv']} | {labels} | not run: past the {TIME_GUARD_S:.0f} s guard | | | | NO |")
            continue
        try:
            e1, e2, ehv, e32 = verify_case(device, c, ref_backend)
        except Exception as exc:  # noqa: BLE001 - reported, and the next case runs
            ok_all = False
            why = failure(f"verify {name} {c['curv']}", exc, device)
            print(f"| {name} | {c['curv']} | {labels} | FAILED: {why} | | | | NO |")
            continue
        ok = e1 <= RTOL and e2 <= RTOL and ehv <= RTOL and e32 <= FLOAT32_RTOL
        ok_all &= ok
        print(f"| {name} | {c['curv']} | {labels} | {e1:.1e} | {e2:.1e} | {ehv:.1e} "
              f"| {e32:.1e} | {'yes' if ok else 'NO'} |")
    return ok_all


# --------------------------------------------------------------------------------------
# 2. GEMM rate
# --------------------------------------------------------------------------------------


def gemm_rate(device: torch.device, n: int, dtype: torch.dtype, reps: int) -> float:
    """Measured torch.matmul rate of an n x n x n product, flop/s (best of reps)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn((n, n), generator=g, device=device, dtype=dtype)
    b = torch.randn((n, n), generator=g, device=device, dtype=dtype)
    c = a @ b  # warm-up
    sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        c = a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del a, b, c
    return 2.0 * n**3 / best


# --------------------------------------------------------------------------------------
# 3. Lanczos on Hessian-vector products (the uncertified estimate, for comparison)
# --------------------------------------------------------------------------------------


def mlp_loss_fn(layers: list, acts: list[str], X: torch.Tensor, y: torch.Tensor):
    """(theta0, loss(theta)): mean cross-entropy of the MLP with flat parameters theta
    (layer by layer, W row-major then b, as torch.nn.Sequential.parameters())."""
    shapes = [(W.shape, None if b is None else b.shape) for W, b in layers]
    parts = []
    for (W, b) in layers:
        parts.append(torch.from_numpy(np.ascontiguousarray(W)).reshape(-1))
        if b is not None:
            parts.append(torch.from_numpy(np.ascontiguousarray(b)))
    theta0 = torch.cat(parts).to(device=X.device, dtype=torch.float64)
    fns = {"tanh": torch.tanh, "gelu": torch.nn.functional.gelu}

    def loss(theta: torch.Tensor) -> torch.Tensor:
        a, off = X, 0
        for l, (ws, bs) in enumerate(shapes):
            k = ws[0] * ws[1]
            z = a @ theta[off:off + k].view(ws).T
            off += k
            if bs is not None:
                z = z + theta[off:off + bs[0]]
                off += bs[0]
            a = fns[acts[l]](z) if l < len(shapes) - 1 else z
        return torch.nn.functional.cross_entropy(a, y)

    return theta0, loss


def lanczos_lambda_max(hvp, theta0: torch.Tensor, max_iter: int = 60, tol: float = 1e-6,
                       seed: int = 0) -> tuple[float, int]:
    """Largest Ritz value of Lanczos with full reorthogonalisation; (estimate, iterations)."""
    n = theta0.numel()
    g = torch.Generator(device=theta0.device).manual_seed(seed)
    q = torch.randn(n, generator=g, device=theta0.device, dtype=theta0.dtype)
    q /= q.norm()
    Qs = torch.empty((max_iter, n), device=theta0.device, dtype=theta0.dtype)
    alphas: list[float] = []
    betas: list[float] = []
    prev = math.nan
    for j in range(max_iter):
        Qs[j] = q
        w = hvp(q)
        alpha = float(w @ q)
        w = w - Qs[:j + 1].T @ (Qs[:j + 1] @ w)  # full reorthogonalisation (covers alpha q + beta q_prev)
        w = w - Qs[:j + 1].T @ (Qs[:j + 1] @ w)
        alphas.append(alpha)
        T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        est = float(np.linalg.eigvalsh(T)[-1])
        if abs(est - prev) <= tol * abs(est):
            return est, j + 1
        prev = est
        beta = float(w.norm())
        if beta <= 1e-14 * max(1.0, abs(est)):
            return est, j + 1
        betas.append(beta)
        q = w / beta
    return prev, max_iter


def lanczos_time(layers: list, acts: list[str], X: torch.Tensor, y: torch.Tensor) -> tuple[float, float, int]:
    theta0, loss = mlp_loss_fn(layers, acts, X, y)
    grad = torch.func.grad(loss)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(grad, (theta0,), (v,))[1]

    with warnings.catch_warnings():
        # forward-mode AD through nll_loss's backward uses a torch.jit.script decomposition,
        # which recent torch flags as deprecated (torch's own business, once per process)
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
        hvp(torch.ones_like(theta0))  # warm-up (kernels, autotuning)
        sync(X.device)
        t0 = time.perf_counter()
        est, iters = lanczos_lambda_max(hvp, theta0)
        sync(X.device)
    return time.perf_counter() - t0, est, iters


def eigsh_time(layers: list, act: str, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Time and value of ``wsb.eigsh(k=1, which="LA", backend="torch")`` on X's device
    (validation and the Lanczos, basis on the device, included)."""
    sync(X.device)
    t0 = time.perf_counter()
    lam = float(wsb.eigsh(layers, X, y, k=1, which="LA", activation=act, backend="torch", tol=EIGSH_TOL)[0])
    sync(X.device)
    return time.perf_counter() - t0, lam


# --------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------


def time_bound(layers, X, y, act, device, dtype, repeats: int, memory_limit: int) -> tuple[float, wsb.Bound]:
    """Best wall-clock time of bound() (validation, transfers, features, pairs), and its result."""
    best, res = math.inf, None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        res = wsb.bound(layers, X, y, activation=act, backend="torch", device=device, dtype=dtype,
                        memory_limit=memory_limit)
        best = min(best, time.perf_counter() - t0)
    assert res is not None
    return best, res


def table_row(device: torch.device, w: dict[str, Any], rate64: float) -> tuple[str, bool]:
    """One row of the table: (the row's cells after the model name, ok).  The Lanczos and
    eigsh steps are skipped (and reported so) when the run is past TIME_GUARD_S."""
    dims, n, act = w["dims"], w["n"], w["act"]
    layers, Xn, yn = make_model(dims, n, w["seed"], pixels=True)
    X = torch.from_numpy(Xn).to(device)
    y = torch.from_numpy(yn).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prob = torch_backend.validate_torch(layers, X, y, activation=act, curvature="hessian", reduction="mean",
                                         device=device)
    has_bias = [b is not None for _, b in layers]
    flops = cost_model.total_pair_flops(dims, has_bias, True, n, prob.batch_size, prob.structured)
    plan = f"{prob.batch_size} x {prob.group_blocks}{', structured' if prob.structured else ''}"
    # the plan (and so the flop count) fixed by passing its budget explicitly
    t64, r64 = time_bound(layers, X, y, act, device, "float64", w["repeats"], prob.memory_limit)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    t32, r32 = time_bound(layers, X, y, act, device, "float32", w["repeats"], prob.memory_limit)
    e32 = rel(r32.trace_sq, r64.trace_sq)
    acts = [act] * (len(dims) - 2)
    ok = math.isfinite(r64.trace_sq)
    lanczos_cells, lam_cells = "skipped (time) | |", ""
    lam = lam_e = math.nan
    if not past_guard():
        tl, lam, iters = lanczos_time(layers, acts, X, y)
        lanczos_cells = f"{tl:.3f} | {iters}"
    eigsh_cell = "skipped (time)"
    if not past_guard():
        te, lam_e = eigsh_time(layers, act, X, y)
        eigsh_cell = f"{te:.3f}"
    # both are Ritz values (<= lambda_max); eigsh's is within EIGSH_TOL of lambda_max
    if math.isfinite(lam):
        ok &= lam <= r64.lambda_max_upper * (1 + 1e-9)
    if math.isfinite(lam_e):
        ok &= lam_e <= r64.lambda_max_upper * (1 + 1e-9)
    if math.isfinite(lam) and math.isfinite(lam_e):
        ok &= lam <= lam_e * (1 + 2 * EIGSH_TOL)
    lam_cells = (f"{lam:.4g}, {lam_e:.6g} <= {r64.lambda_max_upper:.4g} (WS lower {r64.lambda_max_lower:.4g}) "
                 f"{'ok' if ok else 'FAILED'}")
    tf = flops / t64 / 1e12
    cells = (f"{n} | {r64.n_params} | {plan} | {prob.memory_limit / 2**30:.1f} | {peak:.1f} | {flops / 1e12:.3g} "
             f"| {t64:.3f} | {tf:.3g} | {100 * flops / t64 / rate64:.0f}% | {t32:.3f} | {e32:.1e} | {lanczos_cells} "
             f"| {eigsh_cell} | {lam_cells} |")
    return cells, ok


def table(device: torch.device, workloads: list[dict[str, Any]], rate64: float) -> bool:
    print("\n## 3. time to the certified bound vs Lanczos lambda_max (full Hessian, mean reduction)\n")
    print("TFLOP/s = pair-phase flops / whole time to the bound (features and transfers included); budget = "
          "memory_limit on the device (default), peak = torch.cuda.max_memory_allocated during bound f64. "
          "Lanczos: torch.func HVPs, basis on the device; eigsh: wsb.eigsh(backend='torch'), exact product and "
          f"basis on the device, tol={EIGSH_TOL:g}.\n")
    print("| model | N | P | plan (batch x group) | budget (GiB) | peak (GiB) | pair TFLOP | bound f64 (s) | TFLOP/s "
          "| % of GEMM f64 | bound f32 (s) | f32 rel err tr(H^2) | Lanczos (s) | iters | eigsh (s) "
          "| lambda_max: Lanczos, eigsh <= WS upper |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    ok_all = True
    for w in workloads:
        if past_guard():
            ok_all = False
            print(f"| {w['name']} | {w['n']} | not run: past the {TIME_GUARD_S:.0f} s guard |")
            continue
        try:
            cells, ok = table_row(device, w, rate64)
        except Exception as exc:  # noqa: BLE001 - reported, and the next row runs
            ok_all = False
            why = failure(f"table {w['name']} N={w['n']}", exc, device)
            print(f"| {w['name']} | {w['n']} | FAILED: {why} |")
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        ok_all &= ok
        print(f"| {w['name']} | {cells}")
    return ok_all


VERIFY_CASES = [
    dict(dims=(6, 4), act="tanh", curv="hessian", n=37, seed=1),
    dict(dims=(6, 9, 4), act="gelu", curv="hessian", n=41, seed=2, soft=True),
    dict(dims=(6, 9, 4), act="silu", curv="ggn", n=41, seed=3, bias=[False, True]),
    dict(dims=(5, 7, 6, 3), act=["tanh", "softplus"], curv="hessian", n=33, seed=4, bias=[True, False, True]),
    dict(dims=(5, 7, 6, 5, 4), act="gelu", curv="hessian", n=29, seed=5, soft=True),
    dict(dims=(5, 7, 6, 5, 4), act="sigmoid", curv="ggn", n=29, seed=6),
]
GPU_VERIFY_EXTRA = [dict(dims=(784, 1024, 10), act="tanh", curv="hessian", n=256, seed=7)]
GPU_WORKLOADS = [
    dict(name="784-1024-10 tanh", dims=(784, 1024, 10), act="tanh", n=4000, seed=10, repeats=2),
    dict(name="784-1024-10 tanh", dims=(784, 1024, 10), act="tanh", n=10000, seed=11, repeats=1),
    dict(name="784-512-512-512-10 gelu", dims=(784, 512, 512, 512, 10), act="gelu", n=2000, seed=12, repeats=1),
]
CPU_WORKLOADS = [
    dict(name="64-32-10 tanh", dims=(64, 32, 10), act="tanh", n=150, seed=10, repeats=1),
    dict(name="64-16-16-16-10 gelu", dims=(64, 16, 16, 16, 10), act="gelu", n=80, seed=12, repeats=1),
]


def source_revision() -> str:
    """``git describe`` of the source tree next to this script, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def describe_cuda(device: torch.device) -> None:
    props = torch.cuda.get_device_properties(device)
    print(f"device: {torch.cuda.get_device_name(device)}, compute capability {props.major}.{props.minor}, "
          f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs; CUDA runtime {torch.version.cuda}, "
          f"{torch.cuda.device_count()} visible device(s)")
    free, total = torch.cuda.mem_get_info(device)
    print(f"memory free at start: {free / 2**30:.1f} of {total / 2**30:.1f} GiB; bound()'s default budget "
          f"{torch_backend.default_budget(device) / 2**30:.1f} GiB")
    print('TF32 switched on for this process (torch.set_float32_matmul_precision("high")): the float32 columns '
          "check that bound(dtype='float32') turns it off (TF32 would show as errors of ~1e-3)")


def run_section(title: str, device: torch.device, fn: Callable[[], bool]) -> bool:
    """fn() with its exceptions reported (the next section still runs)."""
    if past_guard():
        print(f"\n{title}: not run, past the {TIME_GUARD_S:.0f} s guard")
        return False
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported
        print(f"\n{title}: FAILED: {failure(title, exc, device)}")
        return False


def main(argv: list[str] | None = None) -> int:
    global T_START, TIME_GUARD_S, TIME_LIMIT_S
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the small CPU self-check (seconds; any machine)")
    ap.add_argument("--time-limit", type=float, default=TIME_LIMIT_S,
                    help=f"stop the row running after this many seconds in all (default {TIME_LIMIT_S:g})")
    ap.add_argument("--guard", type=float, default=None,
                    help="start no row after this many seconds (default: time limit - 45 s)")
    args = ap.parse_args(argv)
    T_START = time.perf_counter()
    TIME_LIMIT_S = args.time_limit
    TIME_GUARD_S = args.guard if args.guard is not None else max(0.0, args.time_limit - 45.0)
    ERRORS.clear()
    cuda = torch.cuda.is_available()
    print(f"# wsbound_fast {wsb.__version__} ({source_revision()}) GPU check -- torch {torch.__version__}, "
          f"Python {platform.python_version()}, NumPy {np.__version__}, {platform.platform()}")
    print(f"reference backend: {reference_backend()}; time guard {TIME_GUARD_S:.0f} s, limit {TIME_LIMIT_S:.0f} s")
    with time_limit(TIME_LIMIT_S):
        if args.quick or not cuda:
            if not cuda:
                print("CUDA is not available on this machine: running the small CPU self-check only "
                      "(no GPU numbers).")
            else:
                print("--quick: running the small CPU self-check only.")
            device = torch.device("cpu")
            print(f"device: CPU ({platform.processor() or platform.machine()}), torch threads {torch.get_num_threads()}")
            ok = run_section("## 1. verify", device, lambda: verify(device, VERIFY_CASES[:4]))
            rate = gemm_rate(device, 256, torch.float64, 3)
            print(f"\n## 2. GEMM rate (torch.matmul, n = 256): float64 {rate / 1e9:.1f} GFLOP/s")
            ok &= run_section("## 3. table", device, lambda: table(device, CPU_WORKLOADS, rate))
        else:
            device = torch.device("cuda")
            torch.set_float32_matmul_precision("high")  # see describe_cuda: the package must undo this
            describe_cuda(device)

            def warm_up() -> bool:  # CUDA context, cuBLAS handles
                wsb.bound(*make_model((8, 8, 3), 16, 0)[:3], backend="torch", device=device)
                return True

            ok = run_section("warm-up", device, warm_up)
            ok &= run_section("## 1. verify", device, lambda: verify(device, VERIFY_CASES + GPU_VERIFY_EXTRA))
            rates: list[float] = []

            def gemm() -> bool:
                rates.append(gemm_rate(device, 8192, torch.float64, 5))
                with torch_backend.ieee_float32(device):
                    rate32 = gemm_rate(device, 8192, torch.float32, 5)
                print(f"\n## 2. GEMM rate (torch.matmul, 8192^3): float64 {rates[0] / 1e12:.1f} TFLOP/s, "
                      f"float32 (IEEE, TF32 off: what dtype='float32' gets) {rate32 / 1e12:.1f} TFLOP/s")
                return True

            ok &= run_section("## 2. GEMM rate", device, gemm)
            rate = rates[0] if rates else math.nan
            ok &= run_section("## 3. table", device, lambda: table(device, GPU_WORKLOADS, rate))
    elapsed = time.perf_counter() - T_START
    if ERRORS:
        print(f"\n## errors ({len(ERRORS)})")
        for where, tb in ERRORS:
            print(f"\n### {where}\n```\n{tb.rstrip()}\n```")
    print(f"\ntotal {elapsed:.1f} s")
    if ok:
        print("self-check passed" if device.type == "cpu" else "GPU check passed")
        return 0
    print("CHECK FAILED" + (f" ({len(ERRORS)} error(s), see above)" if ERRORS else ""))
    return 1


if __name__ == "__main__":
    sys.exit(main())
