"""What only backend="torch" has (on the CPU here): tensor inputs and their errors, device and
dtype resolution, the device memory budget, float32 mode, the TF32 guard, the flop count
against torch's FlopCounterMode, gpu_check.py; and the engine on tensors equal to the engine on
NumPy arrays block by block.

Exactness against the references runs for torch in the shared tests (the ``backend`` fixture
of conftest.py: cpp, numpy, torch).  Skipped as a whole without torch.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import reference as R  # noqa: E402
import wsbound_fast as wsb  # noqa: E402
from test_consistency import SPEC_IDS, SPECS  # noqa: E402
from test_errors import CASES  # noqa: E402
from wsbound_fast._backends import torch as torch_backend  # noqa: E402
from wsbound_fast._backends import numpy as numpy_backend  # noqa: E402
from wsbound_fast._engine.features import block_features  # noqa: E402
from wsbound_fast._engine.namespace import Weights  # noqa: E402
from wsbound_fast._engine.pairs import pair_sum  # noqa: E402
from wsbound_fast._planning import blocks as planning_blocks  # noqa: E402
from wsbound_fast._planning import cost as cost_model  # noqa: E402
from wsbound_fast._problem import validate as validation  # noqa: E402

TOL = 1e-10
#: float32 mode against float64: measured up to ~2e-7 relative on these small models and
#: ~1e-6 on the digits models of the README; the assertion leaves a margin.
FLOAT32_TOL = 2e-5
CURVATURES = ("hessian", "ggn")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread(torch):  # the conftest fixture: torch with one intra-op thread
    yield


def _bound(layers, X, y, spec, **kw) -> wsb.Bound:
    return wsb.bound(layers, X, y, activation=spec.activation_arg(), **kw)


def assert_close(a: wsb.Bound, b: wsb.Bound, tol: float = TOL) -> None:
    """trace relative to max(|trace|, ||H||_F) (cancellation-proof), trace_sq plain relative."""
    scale = math.sqrt(max(a.trace_sq, b.trace_sq))
    assert R.rel(a.trace, b.trace, scale) <= tol, (a.trace, b.trace)
    assert R.rel(a.trace_sq, b.trace_sq) <= tol, (a.trace_sq, b.trace_sq)
    assert a.n_params == b.n_params and a.n_samples == b.n_samples
    assert a.curvature == b.curvature and a.reduction == b.reduction


# ------------------------------------------------------------------------------------
# exactness: torch == cpp on the foundation models
# ------------------------------------------------------------------------------------


def _torch_problem(layers, X, y, spec, curvature, **kw):
    return torch_backend.validate_torch(layers, X, y, activation=spec.activation_arg(), curvature=curvature,
                                         reduction="sum", **kw)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("curvature", CURVATURES)
def test_moments_blockwise_equal_numpy_backend(spec, curvature, refs):
    """Per-layer traces and every (l, m) block moment, for the same block plan, as the NumPy
    backend (the same Python engine, ``_engine``, run on NumPy arrays)."""
    layers, X, y = refs.model(spec)
    tprob = _torch_problem(layers, X, y, spec, curvature, batch_size=3)
    tprob = _replace(tprob, group_blocks=2)
    nprob = validation.validate(layers, X, y, activation=spec.activation_arg(), curvature=curvature,
                               reduction="sum", batch_size=3)
    nprob = _replace(nprob, group_blocks=2)
    t_trace, t_blocks, t_abs, t_norms = torch_backend.moments(tprob)
    n_trace, n_blocks, n_abs, n_norms = numpy_backend.moments(nprob)
    scale = max(float(np.abs(n_blocks).max()), 1e-300)
    np.testing.assert_allclose(t_trace, n_trace, rtol=1e-12, atol=1e-12 * math.sqrt(scale))
    np.testing.assert_allclose(t_blocks, n_blocks, rtol=1e-12, atol=1e-13 * scale)
    assert np.all(np.tril(t_blocks, -1) == 0)
    # the magnitudes of the rounding allowances (docs/numerics.md section 4), same formulas
    np.testing.assert_allclose(t_abs, n_abs, rtol=1e-12)
    np.testing.assert_allclose(t_norms, n_norms, rtol=1e-12)
    assert np.all(np.tril(t_norms, -1) == 0) and np.all(t_norms[np.triu_indices(spec.depth)] > 0)
    assert np.all(t_abs >= (1 - 1e-12) * np.abs(t_trace))


def _replace(prob, **kw):
    import dataclasses

    return dataclasses.replace(prob, **kw)


def test_bitwise_reproducible(refs):
    spec = SPECS[3]
    layers, X, y = refs.model(spec)
    runs = [_bound(layers, X, y, spec, backend="torch", batch_size=4) for _ in range(3)]
    assert len({(r.trace, r.trace_sq) for r in runs}) == 1


# ------------------------------------------------------------------------------------
# float32 mode
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("curvature", CURVATURES)
def test_float32_mode(spec, curvature, refs):
    layers, X, y = refs.model(spec)
    ref = _bound(layers, X, y, spec, curvature=curvature, backend="cpp")
    res = _bound(layers, X, y, spec, curvature=curvature, backend="torch", dtype="float32", batch_size=5)
    assert_close(res, ref, FLOAT32_TOL)


def test_float32_mode_digits():
    """A 64-32-10 tanh MLP on 300 digits: float32 within FLOAT32_TOL of float64."""
    X, y = wsb.load_digits()
    rng = np.random.default_rng(5)
    layers = [(rng.standard_normal((32, 64)) / 8, rng.standard_normal(32) * 0.1),
              (rng.standard_normal((10, 32)) / 6, np.zeros(10))]
    for curvature in CURVATURES:
        ref = wsb.bound(layers, X[:300], y[:300], activation="tanh", curvature=curvature, backend="cpp")
        res = wsb.bound(layers, X[:300], y[:300], activation="tanh", curvature=curvature, backend="torch", dtype=torch.float32)
        assert_close(res, ref, FLOAT32_TOL)


# ------------------------------------------------------------------------------------
# errors: the same type and message as the C++ backend
# ------------------------------------------------------------------------------------


def _error(fn):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except (ValueError, TypeError) as exc:
        return type(exc), str(exc)
    raise AssertionError("no error raised")  # pragma: no cover


def _as_tensor(a):
    """A NumPy array as a tensor when torch has its dtype (strings / objects stay NumPy)."""
    if isinstance(a, np.ndarray) and a.dtype.kind in "biufc":
        return torch.from_numpy(a.copy())
    return a


def _tensor_layers(layers):
    if not isinstance(layers, list):
        return layers
    return [tuple(_as_tensor(v) for v in layer) if isinstance(layer, tuple) else layer for layer in layers]


@pytest.mark.parametrize(("layers", "X", "y", "kwargs", "exc", "match"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_tensor_input_same_error_as_cpp(layers, X, y, kwargs, exc, match):
    """The same cases with X, y, W and b as tensors (X is checked on its device, not in NumPy)."""
    cpp = _error(lambda: wsb.bound(layers, X, y, backend="cpp", **{"activation": "tanh", **kwargs}))
    tch = _error(lambda: wsb.bound(_tensor_layers(layers), _as_tensor(X), _as_tensor(y), backend="torch", **{"activation": "tanh", **kwargs}))
    assert tch == cpp


def test_check_X_finite_in_chunks(monkeypatch):
    """The NaN / Inf check of a tensor X walks it in chunks (no X-sized temporary)."""
    monkeypatch.setattr(torch_backend, "_FINITE_CHUNK", 8)
    X = torch.zeros((50, 4), dtype=torch.float64)
    assert torch_backend.check_X(X, 4) is not None
    X[49, 3] = math.inf
    with pytest.raises(ValueError, match="X contains NaN or Inf"):
        torch_backend.check_X(X, 4)


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"dtype": "float16"}, ValueError, r"dtype must be 'float64' or 'float32'"),
    ({"dtype": torch.bfloat16}, ValueError, r"dtype"),
    ({"dtype": 3}, TypeError, r"dtype"),
    ({"dtype": np.float32}, TypeError, r"dtype"),
    ({"device": "nonsense"}, ValueError, r"device.*nonsense"),
    ({"device": 5}, TypeError, r"device"),
    ({"device": "cuda:99"}, ValueError, r"device.*cuda"),
])
def test_bad_device_dtype(kwargs, exc, match):
    layers, X, y = _small()
    with pytest.raises(exc, match=match):
        wsb.bound(layers, X, y, backend="torch", **{"activation": "tanh", **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_unavailable_is_a_value_error():
    layers, X, y = _small()
    with pytest.raises(ValueError, match="CUDA is not available"):
        wsb.bound(layers, X, y, activation="tanh", backend="torch", device="cuda")


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
def test_device_only_for_torch(backend):
    layers, X, y = _small()
    with pytest.raises(ValueError, match=r"device= applies to backend='torch' only"):
        wsb.bound(layers, X, y, activation="tanh", backend=backend, device="cpu")


def test_dtype_float32_for_cpp_and_torch_not_numpy():
    layers, X, y = _small()
    ref = wsb.bound(layers, X, y, activation="tanh", backend="cpp")
    assert wsb.bound(layers, X, y, activation="tanh", backend="numpy", dtype="float64").trace_sq == pytest.approx(ref.trace_sq, rel=1e-12)
    got = wsb.bound(layers, X, y, activation="tanh", backend="cpp", dtype=torch.float32)  # a torch dtype is understood too
    assert got.trace_sq == pytest.approx(ref.trace_sq, rel=1e-5)
    with pytest.raises(ValueError, match=r"needs backend='cpp' or 'torch'"):
        wsb.bound(layers, X, y, activation="tanh", backend="numpy", dtype=torch.float32)


def test_overflow_raises_floating_point_error():
    layers, X, y = _small()
    for dtype in ("float64", "float32"):
        with pytest.raises(FloatingPointError, match="overflow"):
            wsb.bound(layers, X * 1e200, y, activation="tanh", backend="torch", dtype=dtype)


# ------------------------------------------------------------------------------------
# tensors as inputs, devices, dtypes
# ------------------------------------------------------------------------------------


def _small(seed: int = 3):
    spec = R.ModelSpec((4, 5, 6, 3), ("gelu", "tanh"), "alt", n=11, labels="hard", seed=seed)
    layers, X, y = spec.build()
    return layers, X, y


def test_tensor_inputs_equal_numpy_inputs():
    layers, X, y = _small()
    ref = wsb.bound(layers, X, y, activation="tanh", backend="torch", batch_size=4)
    assert_close(ref, wsb.bound(layers, X, y, activation="tanh", backend="cpp"))
    t_layers = [(torch.tensor(W, requires_grad=True), None if b is None else torch.tensor(b, requires_grad=True))
                for W, b in layers]
    variants = [
        (t_layers, X, y),
        (layers, torch.from_numpy(X), y),
        (layers, X, torch.from_numpy(y)),
        (t_layers, torch.tensor(X, requires_grad=True), torch.from_numpy(y).to(torch.int32)),
        (tuple(t_layers), torch.from_numpy(np.asfortranarray(X)).T.contiguous().T, torch.from_numpy(y)),  # non-contiguous
    ]
    for lay, XX, yy in variants:
        res = wsb.bound(lay, XX, yy, activation="tanh", backend="torch", batch_size=4)
        assert (res.trace, res.trace_sq) == (ref.trace, ref.trace_sq)
    # float32 and integer X: converted per block exactly as NumPy converts them
    X32 = X.astype(np.float32)
    a = wsb.bound(layers, torch.from_numpy(X32), y, activation="tanh", backend="torch", batch_size=4)
    b = wsb.bound(layers, X32, y, activation="tanh", backend="torch", batch_size=4)
    assert (a.trace, a.trace_sq) == (b.trace, b.trace_sq)
    Xi = np.round(X * 3).astype(np.int16)
    a = wsb.bound(layers, torch.from_numpy(Xi), y, activation="tanh", backend="torch", batch_size=4)
    assert_close(a, wsb.bound(layers, Xi, y, activation="tanh", backend="cpp"))
    # bfloat16 weights (no NumPy dtype): widened exactly
    bf = [(torch.from_numpy(W).to(torch.bfloat16), b) for W, b in layers]
    up = [(W.to(torch.float32).numpy(), b) for W, b in bf]
    assert_close(wsb.bound(bf, X, y, activation="tanh", backend="torch"), wsb.bound(up, X, y, activation="tanh", backend="cpp"))


def test_soft_label_tensors():
    spec = R.ModelSpec((4, 6, 3), "silu", "all", n=9, labels="soft", seed=9)
    layers, X, y = spec.build()
    ref = wsb.bound(layers, X, y, activation="silu", backend="cpp")
    for yy in (torch.from_numpy(y), torch.from_numpy(y).to(torch.float32)):
        res = wsb.bound(layers, torch.from_numpy(X), yy, activation="silu", backend="torch")
        yy_np = yy.numpy()
        assert_close(res, wsb.bound(layers, X, yy_np, activation="silu", backend="cpp"))
    assert_close(wsb.bound(layers, X, y, activation="silu", backend="torch"), ref)


def test_device_and_dtype_resolution():
    layers, X, y = _small()
    r = torch_backend.resolve_device
    assert r(None, layers, X, y) == torch.device("cpu")
    assert r(None, layers, torch.from_numpy(X), y) == torch.device("cpu")
    meta = torch.empty((3, 4), device="meta")
    assert r(None, layers, meta, y) == torch.device("meta")  # X's device first
    assert r(None, [(meta, None)], X, y) == torch.device("meta")  # then the weights'
    assert r("cpu", layers, meta, y) == torch.device("cpu")  # an explicit device wins
    assert r(torch.device("cpu"), layers, X, y) == torch.device("cpu")
    assert torch_backend.resolve_dtype(None) is torch.float64
    assert torch_backend.resolve_dtype(" Float32 ") is torch.float32
    assert torch_backend.resolve_dtype("torch.float64") is torch.float64
    for kw in ({"device": "cpu"}, {"device": torch.device("cpu")}, {"dtype": torch.float64}):
        assert wsb.bound(layers, X, y, backend="torch", **{"activation": "tanh", **kw}).backend == "torch"


def test_module_device_is_the_default(monkeypatch):
    """A torch module's own device is the default compute device when X is not a tensor (its
    weights become NumPy copies before resolve_device sees them); a tensor X's device wins."""
    from wsbound_fast import _backends as backends

    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    X = np.random.default_rng(0).standard_normal((6, 4))
    assert backends._module_device(net.to("meta"), X) == torch.device("meta")
    assert backends._module_device(net, torch.from_numpy(X)) is None
    seen = []
    real = torch_backend.validate_torch
    monkeypatch.setattr(torch_backend, "validate_torch", lambda *a, **kw: seen.append(kw["device"]) or real(*a, **kw))
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    y = np.array([0, 1, 2, 0, 1, 2])
    ref = wsb.bound(net, X, y, activation="tanh", backend="cpp")
    got = wsb.bound(net, X, y, activation="tanh", backend="torch")
    assert seen == [torch.device("cpu")]
    assert abs(got.trace_sq - ref.trace_sq) <= TOL * ref.trace_sq


def test_plan_uses_device_budget(monkeypatch):
    """memory_limit is the device budget; on CUDA the default comes from mem_get_info, and
    an accelerator gets larger blocks."""
    layers, X, y = _small()
    X = np.tile(X, (400, 1))
    y = np.tile(y, 400)
    kw = dict(activation="tanh", curvature="hessian", reduction="mean")
    tight = validation.min_memory_limit(layers, "hessian", "torch")
    p = torch_backend.validate_torch(layers, X, y, memory_limit=tight, **kw)
    assert p.memory_limit == tight and p.batch_size == 1 and p.group_blocks == 1
    with pytest.raises(ValueError, match=f"memory_limit = 1 bytes is below .* give memory_limit >= {tight} or None"):
        torch_backend.validate_torch(layers, X, y, memory_limit=1, **kw)
    p = torch_backend.validate_torch(layers, X, y, **kw)
    assert p.memory_limit == planning_blocks.default_memory_limit() and p.device == torch.device("cpu")
    assert p.batch_size <= planning_blocks._TARGET_BATCH
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 << 30)
    assert torch_backend.default_budget(torch.device("cuda")) == int(0.5 * (12 << 30))
    dims, has_bias = [4, 5, 6, 3], [True, False, True]
    cpu = planning_blocks.plan_blocks(dims, has_bias, len(y), True, False, 1, None, 1 << 30)
    gpu = planning_blocks.plan_blocks(dims, has_bias, len(y), True, False, 1, None, 1 << 30, **torch_backend.GPU_PLAN)
    assert gpu[0] > cpu[0]


def test_progress_callback():
    layers, X, y = _small()
    prob = torch_backend.validate_torch(layers, X, y, activation="tanh", curvature="hessian", reduction="sum",
                                         batch_size=2)
    prob = _replace(prob, group_blocks=2)
    calls = []
    out = torch_backend.moments(prob, progress=lambda d, t: calls.append((d, t)))
    nb = math.ceil(11 / 2)
    total = nb * (nb + 1) // 2
    assert calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    again = torch_backend.moments(prob)
    assert len(out) == len(again) == 4 and all(np.array_equal(a, b) for a, b in zip(out, again))


# ------------------------------------------------------------------------------------
# the flop count of the cost model (bench/, gpu_check.py) follows what the pair sum does
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dims", "bias", "curvature"), [
    ((5, 3), "all", "hessian"),
    ((4, 7, 3), "none", "hessian"),
    ((4, 7, 3), "all", "ggn"),
    ((4, 5, 6, 3, 4), "alt", "hessian"),
    ((4, 5, 6, 3, 4), "all", "ggn"),
])
@pytest.mark.parametrize("structured", [False, True], ids=["generic", "structured"])
def test_pair_flops_match_flop_counter(dims, bias, curvature, structured):
    from torch.utils.flop_counter import FlopCounterMode

    spec = R.ModelSpec(dims, "tanh", bias, n=13, seed=11)
    layers, X, y = spec.build()
    prob = torch_backend.validate_torch(layers, X, y, activation="tanh", curvature=curvature, reduction="sum")
    prob = _replace(prob, structured=structured)
    arr = torch_backend.arrays(prob)
    net = Weights.of(prob, arr)
    Y = torch.nn.functional.one_hot(torch.from_numpy(y), dims[-1]).to(torch.float64)
    FI = block_features(prob, arr, net, torch.from_numpy(X[:5]), Y[:5])
    FJ = block_features(prob, arr, net, torch.from_numpy(X[5:]), Y[5:])
    with FlopCounterMode(display=False) as counter:
        pair_sum(prob, arr, FI, FJ)
    has_bias = [b is not None for _, b in layers]
    hess = curvature == "hessian"
    assert counter.get_total_flops() == cost_model.block_pair_flops(dims, has_bias, hess, 5, 8, structured)
    assert cost_model.total_pair_flops(dims, has_bias, hess, 13, 5, structured) == sum(
        cost_model.block_pair_flops(dims, has_bias, hess, a, b, structured)
        for a, b in [(5, 5), (5, 5), (5, 3), (5, 5), (5, 3), (3, 3)])


# ------------------------------------------------------------------------------------
# torch stays optional; the GPU check script's CPU path
# ------------------------------------------------------------------------------------


def test_import_does_not_import_torch():
    code = ("import sys, numpy as np, wsbound_fast as wsb\n"
            "assert 'torch' not in sys.modules, 'import'\n"
            "L = [(np.ones((3, 2)), None)]\n"
            "for b in ('cpp', 'numpy'):\n"
            "    wsb.bound(L, np.ones((4, 2)), np.array([0, 1, 2, 0]), backend=b, certify=2)\n"
            "    wsb.hvp(L, np.ones((4, 2)), np.array([0, 1, 2, 0]), np.ones(6), backend=b)\n"
            "    wsb.eigsh(L, np.ones((4, 2)), np.array([0, 1, 2, 0]), backend=b)\n"
            "    assert 'torch' not in sys.modules, b\n"
            "wsb.bound(L, np.ones((4, 2)), np.array([0, 1, 2, 0]), backend='torch')\n"
            "assert 'torch' in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_gpu_check_quick(capsys):
    """bench/gpu_check.py --quick: the CPU self-check (what runs where there is no CUDA).
    In-process, to save a second torch import; the script is also run as a program by hand."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "self-check passed" in out and "Lanczos" in out


def _gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_failures", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_reports_a_failed_row_and_goes_on(capsys, monkeypatch):
    """One row running out of CUDA memory and one verify case raising: both are reported in
    their tables with the error, the other rows still run, the tracebacks follow, exit 1."""
    mod = _gpu_check_module()
    small = dict(dims=(6, 5, 3), act="tanh", n=20, seed=1, repeats=1)
    monkeypatch.setattr(mod, "CPU_WORKLOADS", [dict(small, name="first"), dict(small, name="second")])
    monkeypatch.setattr(mod, "VERIFY_CASES", [dict(dims=(6, 4), act="tanh", curv="hessian", n=9, seed=1),
                                              dict(dims=(6, 4), act="tanh", curv="ggn", n=9, seed=1)] * 2)
    real_row, real_case = mod.table_row, mod.verify_case

    def row(device, w, rate):
        if w["name"] == "first":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_row(device, w, rate)

    def case(device, c, ref):
        if c["curv"] == "ggn":
            raise RuntimeError("Expected all tensors to be on the same device")
        return real_case(device, c, ref)

    monkeypatch.setattr(mod, "table_row", row)
    monkeypatch.setattr(mod, "verify_case", case)
    monkeypatch.setattr(mod, "lanczos_time", lambda *a: (0.0, 1.0, 1))  # the torch.func Lanczos: not needed here
    assert mod.main(["--quick"]) == 1
    out = capsys.readouterr().out
    assert "| first | 20 | FAILED: CUDA OUT OF MEMORY" in out
    assert "| second | 20 |" in out and out.count("| second | 20 | FAILED") == 0
    assert out.count("FAILED: RuntimeError: Expected all tensors to be on the same device") == 2
    assert out.count("| 6-4 tanh N=9 | hessian | hard |") == 2  # the cases after a failure ran
    assert "## errors (3)" in out and "OutOfMemoryError" in out and "CHECK FAILED" in out


def test_gpu_check_time_limit(capsys, monkeypatch):
    """Past the guard no row is started, and the row running at the limit is stopped
    (SIGALRM); the tables are still printed and the exit status is 1."""
    mod = _gpu_check_module()
    small = dict(dims=(6, 5, 3), act="tanh", n=20, seed=1, repeats=1)
    monkeypatch.setattr(mod, "CPU_WORKLOADS", [dict(small, name="slow"), dict(small, name="late")])
    monkeypatch.setattr(mod, "VERIFY_CASES", [dict(dims=(6, 4), act="tanh", curv="hessian", n=9, seed=1)])

    def slow(device, w, rate):
        time.sleep(30)

    monkeypatch.setattr(mod, "table_row", slow)
    t0 = time.perf_counter()
    assert mod.main(["--quick", "--time-limit", "8", "--guard", "6"]) == 1
    assert time.perf_counter() - t0 < 25
    out = capsys.readouterr().out
    assert "| slow | 20 | FAILED: stopped: past the 8 s limit" in out
    assert "| late | 20 | not run: past the 6 s guard |" in out
    assert "| 6-4 tanh N=9 | hessian | hard |" in out and "CHECK FAILED" in out


_TF32_SCRIPT = r"""
import sys, torch
from wsbound_fast._backends.torch import ieee_float32
m = torch.backends.cuda.matmul
mode = sys.argv[1]
if mode == "legacy": m.allow_tf32 = True
elif mode == "new": m.fp32_precision = "tf32"
elif mode == "high": torch.set_float32_matmul_precision("high")
elif mode == "global": torch.backends.fp32_precision = "tf32"
def read():
    out = {}
    for name, get in [("allow_tf32", lambda: m.allow_tf32), ("fp32_precision", lambda: m.fp32_precision),
                      ("precision", torch.get_float32_matmul_precision)]:
        try:
            out[name] = str(get())
        except RuntimeError:
            out[name] = "refused"
    return out
before = read()
with ieee_float32(torch.device("cuda")):
    during = read()
with ieee_float32(torch.device("cpu")):
    cpu = read()
print(repr((before, during, read(), cpu)))
"""


@pytest.mark.parametrize("mode", ["default", "legacy", "new", "high", "global"])
def test_float32_mode_turns_tf32_off_on_cuda(mode):
    """float32 on CUDA must not run in TF32 whatever the caller's setting (the legacy
    allow_tf32, the new fp32_precision, set_float32_matmul_precision("high"), the global
    torch.backends.fp32_precision): ieee_float32 turns it off within and restores the caller's
    state after, readable through the same APIs as before (torch refuses to read the legacy
    flag once the new API was used).  In a subprocess: the flags are process-wide."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch < 2.9: only the legacy allow_tf32 flag")
    out = subprocess.run([sys.executable, "-c", _TF32_SCRIPT, mode], capture_output=True, text=True, check=True)
    before, during, after, cpu = eval(out.stdout.strip())
    assert during["allow_tf32"] == "False" and during["fp32_precision"] in ("ieee", "none")  # none: the default, IEEE
    assert after == before and cpu == before
    assert (before["fp32_precision"] == "tf32") == (mode != "default")


def test_moments_runs_under_ieee_float32(monkeypatch):
    """moments() enters ieee_float32 for its device around the whole computation."""
    import contextlib

    seen = []

    @contextlib.contextmanager
    def record(device):
        seen.append(("enter", device))
        yield
        seen.append(("exit", device))

    monkeypatch.setattr(torch_backend, "ieee_float32", record)
    layers, X, y = _small()
    prob = torch_backend.validate_torch(layers, X, y, activation="tanh", curvature="hessian", reduction="sum",
                                         dtype="float32", batch_size=4)
    calls = []
    torch_backend.moments(prob, progress=lambda d, t: calls.append(list(seen)))
    assert seen == [("enter", prob.device), ("exit", prob.device)]
    assert calls and all(c == [("enter", prob.device)] for c in calls)  # the work runs inside


class _FakeMatmul:
    """torch.backends.cuda.matmul's TF32 flags, recording every write (legacy or new API)."""

    def __init__(self, api: str) -> None:
        self.api = api
        self._allow = True
        self._precision = "tf32"
        self.writes = 0

    @property
    def allow_tf32(self) -> bool:
        if self.api == "new":
            raise RuntimeError("the legacy flag cannot be read once the new API was used")
        return self._allow

    @allow_tf32.setter
    def allow_tf32(self, value: bool) -> None:
        self._allow = bool(value)
        self.writes += 1

    @property
    def fp32_precision(self) -> str:
        return self._precision

    @fp32_precision.setter
    def fp32_precision(self, value: str) -> None:
        self._precision = value
        self.writes += 1

    def tf32(self) -> bool:
        return self._allow if self.api == "legacy" else self._precision == "tf32"


@pytest.mark.parametrize("api", ["legacy", "new"])
def test_ieee_float32_is_safe_across_threads(monkeypatch, api):
    """Two threads in ieee_float32 at once: the first to leave must not turn TF32 back on while
    the other still computes (it did before the guard counted its users); the last restores the
    caller's setting, written once each way.  The guard's state logic, on a stand-in flag."""
    import threading

    fake = _FakeMatmul(api)
    monkeypatch.setattr(torch.backends.cuda, "matmul", fake)
    cuda = torch.device("cuda")
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with torch_backend.ieee_float32(cuda):
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second():
        a_in.wait(10)
        with torch_backend.ieee_float32(cuda):
            b_in.set()
            a_out.wait(10)
            seen["after the first left"] = fake.tf32()
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"after the first left": False}
    assert fake.tf32() and fake.writes == 2  # restored, once
    # many threads, nested calls: TF32 is off whenever any of them is inside
    bad = []

    def worker(k):
        for i in range(200):
            with torch_backend.ieee_float32(cuda):
                if fake.tf32():
                    bad.append(k)
                if i % 7 == 0:
                    with torch_backend.ieee_float32(cuda):
                        if fake.tf32():
                            bad.append(k)

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert not bad and fake.tf32() and torch_backend._TF32.depth == 0
    with torch_backend.ieee_float32(torch.device("cpu")):  # off CUDA: untouched
        assert fake.tf32()


def test_ieee_float32_recovers_from_a_failed_switch(monkeypatch):
    """If turning TF32 off raises, nothing is counted: the next call tries again."""

    class Broken(_FakeMatmul):
        @property
        def allow_tf32(self) -> bool:
            return True

        @allow_tf32.setter
        def allow_tf32(self, value: bool) -> None:
            raise RuntimeError("cannot set")

    monkeypatch.setattr(torch.backends.cuda, "matmul", Broken("legacy"))
    with pytest.raises(RuntimeError, match="cannot set"):
        with torch_backend.ieee_float32(torch.device("cuda")):
            pass  # pragma: no cover
    assert torch_backend._TF32.depth == 0
    fake = _FakeMatmul("legacy")
    monkeypatch.setattr(torch.backends.cuda, "matmul", fake)
    with torch_backend.ieee_float32(torch.device("cuda")):
        assert not fake.tf32()
    assert fake.tf32()
