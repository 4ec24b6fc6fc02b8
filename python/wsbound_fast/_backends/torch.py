"""The torch adapter: the Python engine (``_engine``) on torch tensors, CPU or GPU.

This module is imported only for ``backend="torch"`` (``bound``, ``hvp``, ``eigsh``);
``import wsbound_fast`` never imports torch.  The algorithm is not here: the moments and the
curvature-vector product are ``_engine.schedule.moments`` / ``products`` run on a
:class:`TorchArrays`.  What is here is what only torch has: the device and its memory budget,
the TF32 guard, the checks of a tensor X on its own device, ``no_grad``, and the Lanczos basis
on the device (:class:`DeviceSpace`).

Precision (``dtype``): ``torch.float64`` (default) computes everything in float64, as the
other backends do.  ``torch.float32`` computes the features and every Gram product (the
GEMMs, which are all the heavy work) in float32, then converts each B x B' Gram matrix
(on the K route: each GEMM's output, the K_l of a chunk of pairs) to float64 before the
elementwise products, the O(C^2) identity, the sums over the block pair and every later
accumulation (tr(H) per sample is formed in float32 and summed in float64).  Measured
against float64 on the CPU: 2e-9 to 1.1e-6 relative on tr(H) and tr(H^2) (random and
trained models up to 784-256-10; see README); the tests allow 2e-5.
TF32 tensor-core matmuls would lower that (a 10-bit mantissa): torch leaves them off by
default, but a training script often turns them on (``torch.set_float32_matmul_precision
("high")``, ``torch.backends.cuda.matmul.allow_tf32 = True`` or ``.fp32_precision = "tf32"``),
so :func:`moments` turns them off on CUDA while it runs (:func:`ieee_float32`) and restores
the caller's setting afterwards, through the same API the caller used.

Validation: weights, biases and labels given as tensors are copied to NumPy (O(P) and
O(N) values) and validated by :func:`wsbound_fast._problem.validate.validate` like any other
input.  A tensor X is *not* copied: :func:`check_X` checks its dtype, shape and
finiteness on its own device (in chunks, so no X-sized temporary), with exactly the
errors of :func:`wsbound_fast._problem.validate.validate_X`, and X stays where it is; each block
of rows is moved to the compute device when it is needed.  X may therefore live on the
host while the work runs on a GPU, or the other way round.

Memory: the block plan is :func:`wsbound_fast._planning.blocks.plan_python`, the NumPy
backend's (one block pair at a time, its batched temporaries counted), with the budget
``memory_limit`` bytes *on the compute device* (default on CUDA: half of the memory that is
free there, ``torch.cuda.mem_get_info`` plus this process's cached-but-unused blocks;
elsewhere the host default).  On a GPU the preferred block is larger (up to 2048 samples, a
block pair up to ~4 TFLOP) so that the GEMMs fill the device, and on the K route the whole
``KROUTE_SCRATCH_SHARE`` of the budget goes to the chunks of sample pairs
(``Problem.chunks``), the block plan getting the rest: a 2000 x 2000 block pair of
784-1024-10 is then a few chunks (~10^3 kernels) instead of ~10^5 kernels in chunks sized
for a CPU cache.  On the CPU the chunks are the NumPy backend's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError("backend='torch' needs PyTorch (pip install torch, or the wsbound_fast[torch] extra)") from exc

import array_api_compat.torch as xp_torch

from .._engine import schedule
from .._engine.namespace import Arrays, Weights
from .._engine.schedule import Moments
from .._planning.blocks import PY_CROSS_COPIES, default_memory_limit, plan_hvp, plan_python
from .._problem.problem import Problem
from .._problem.validate import check_X_shape, validate, validate_X

#: Accepted ``dtype=`` values (strings, or the torch dtypes themselves).
DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32}
#: Accumulation dtype of every pair sum, whatever the compute dtype.
ACC = torch.float64
#: (B, B', d_l) temporaries of the batched cross terms alive at once (_engine.pairs._dense_cross:
#: its two products), for the block plan's scratch (_planning.cost.pair_scratch_doubles); as on NumPy.
CROSS_COPIES = PY_CROSS_COPIES
#: Block shape preferred on an accelerator (see _planning.blocks.plan_blocks).
GPU_PLAN = {"target_batch": 2048, "max_pair_flops": 4e12}
#: Share of the device's free memory used by default on CUDA.
CUDA_BUDGET_FRACTION = 0.5
# KROUTE_SCRATCH_SHARE (_planning.blocks): on an accelerator, the share of memory_limit set aside
# for the K route's chunk temporaries (the GEMM outputs of a chunk of sample pairs and the
# elementwise work on them); the block plan gets the rest.  On the CPU the chunks are the
# NumPy backend's (at most a few million values, sized for its caches); on a GPU that would
# mean ~10^5 small kernels per block pair.
#: Elements of X checked for NaN / Inf at once (bounds the temporary of the check).
_FINITE_CHUNK = 1 << 24


@dataclass(frozen=True)
class TorchProblem(Problem):
    """A validated problem plus where and in which precision to compute.

    ``X`` is the validated NumPy array, or the caller's tensor (detached, on its device).
    """

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float64
    #: The host-side budget (validate()'s memory_limit: the given one, or the host default),
    #: which sets the default maxiter of eigsh / exact= (the Lanczos basis is on the host,
    #: or on the device when it fits in DEVICE_BASIS_SHARE of memory_limit there).
    host_memory_limit: int = 0

    @classmethod
    def of(cls, prob: Problem, device: torch.device, dtype: torch.dtype, **changes: Any) -> TorchProblem:
        """``prob`` on ``device`` in ``dtype``, with ``changes`` to its fields; the host budget is
        ``prob``'s memory_limit."""
        fields = {f.name: getattr(prob, f.name) for f in dataclasses.fields(Problem)}
        fields.update(changes)
        return cls(**fields, device=device, dtype=dtype, host_memory_limit=prob.memory_limit)


# --------------------------------------------------------------------------------------
# validation (same errors as _problem.validate; tensors are checked where they live)
# --------------------------------------------------------------------------------------


def _to_numpy(value: Any) -> Any:
    """A tensor as a NumPy array for validation (weights, biases and labels only)."""
    if not isinstance(value, torch.Tensor):
        return value
    t = value.detach().cpu()
    try:
        return t.numpy()
    except TypeError:  # bfloat16, float8, complex32: no NumPy dtype; widen exactly
        return t.to(torch.complex64 if t.is_complex() else torch.float32).numpy()


def _layers_to_numpy(layers: Any) -> Any:
    """Tensors inside (W, b) pairs -> NumPy; the container is left as it is (so that a bad
    container raises exactly the error it raises for NumPy arrays)."""
    if not isinstance(layers, (list, tuple)):
        return layers
    return [type(layer)(_to_numpy(v) for v in layer) if isinstance(layer, (tuple, list)) else layer
            for layer in layers]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_X(X: Any, d_in: int) -> Any:
    """validate_X for a tensor, on its device and without copying it; anything else goes to
    validate_X itself.  Same checks, same order, same messages."""
    if not isinstance(X, torch.Tensor):
        return validate_X(X, d_in)
    if X.dtype == torch.bool or X.is_complex() or not (X.is_floating_point() or _is_integer(X.dtype)):
        raise TypeError(f"X must hold real numbers (integer or floating dtype); got dtype {_dtype_name(X.dtype)}")
    check_X_shape(tuple(X.shape), d_in)
    X = X.detach()
    if X.is_floating_point():
        rows = max(1, _FINITE_CHUNK // max(1, X.shape[1]))
        for lo in range(0, X.shape[0], rows):
            if not bool(torch.isfinite(X[lo:lo + rows]).all()):
                raise ValueError("X contains NaN or Inf")
    return X


def _is_integer(dtype: torch.dtype) -> bool:
    return dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64) or \
        str(dtype) in ("torch.uint16", "torch.uint32", "torch.uint64")


def resolve_dtype(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float64
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise ValueError(f"dtype must be 'float64' or 'float32'; got {dtype!r}")
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be 'float64', 'float32' or a torch dtype; got {dtype!r}")
    key = dtype.strip().lower().replace("torch.", "")
    if key not in DTYPES:
        raise ValueError(f"dtype must be 'float64' or 'float32'; got {dtype!r}")
    return DTYPES[key]


def _first_tensor_device(*values: Any) -> torch.device | None:
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device
        if isinstance(v, (list, tuple)):
            d = _first_tensor_device(*v)
            if d is not None:
                return d
    return None


def resolve_device(device: Any, layers: Any, X: Any, y: Any) -> torch.device:
    """``device`` if given; else the device of X (if a tensor), of the first weight tensor,
    of y; else the CPU."""
    if device is None:
        return _first_tensor_device(X, layers, y) or torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0', or a torch.device; got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device: {device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available to this torch installation")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA devices")
    return dev


def default_budget(device: torch.device) -> int:
    """Default memory_limit on the compute device (bytes)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return max(1, int(CUDA_BUDGET_FRACTION * (free + cached)))
    return default_memory_limit()


def validate_torch(layers: Any, X: Any, y: Any, *, activation: Any, curvature: Any, reduction: Any,
                   batch_size: Any = None, threads: Any = None, memory_limit: Any = None,
                   device: Any = None, dtype: Any = None, loss: Any = "cross_entropy",
                   params: Any = None) -> TorchProblem:
    """validate() for the torch backend: same errors, then device, dtype and a device plan."""
    prob = validate(_layers_to_numpy(layers), X, _to_numpy(y), activation=activation, curvature=curvature,
                    reduction=reduction, batch_size=batch_size, threads=threads, memory_limit=memory_limit,
                    check_X=check_X, loss=loss, params=params)
    dev = resolve_device(device, layers, X, y)
    cdt = resolve_dtype(dtype)
    budget = default_budget(dev) if memory_limit is None else prob.memory_limit
    accel = dev.type != "cpu"
    # one block pair at a time; features planned as float64 (conservative in float32); the
    # contraction path is the one validate() chose (prob.structured); on an accelerator large
    # K-route chunks (few, large kernels) and larger blocks
    batch, group, chunks = plan_python(prob, None if batch_size is None else prob.batch_size, budget,
                                       accelerator=accel, **(GPU_PLAN if accel else {}))
    return TorchProblem.of(prob, dev, cdt, batch_size=batch, group_blocks=group, memory_limit=budget, chunks=chunks)


# --------------------------------------------------------------------------------------
# the engine on tensors
# --------------------------------------------------------------------------------------


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    """torch.from_numpy, copying read-only arrays (torch warns about sharing those)."""
    return torch.from_numpy(a if a.flags.writeable else a.copy())


@dataclass(frozen=True)
class TorchArrays(Arrays):
    """The engine's arrays on torch tensors (any device; float64, or float32 Gram products)."""

    report_each_pair: bool = False  # progress after each group of block pairs, once the device has finished

    def erfc(self, x: Any) -> Any:
        return torch.special.erfc(x)

    def sigmoid(self, x: Any) -> Any:
        return torch.sigmoid(x)

    def copy_c(self, x: Any) -> Any:
        return x.clone(memory_format=torch.contiguous_format)

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.cpu().numpy()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def from_host(self, a: np.ndarray, dtype: Any = None) -> Any:
        return _from_numpy(np.asarray(a)).to(device=self.device, dtype=self.dtype if dtype is None else dtype)


def arrays(prob: TorchProblem) -> TorchArrays:
    """The engine's arrays on ``prob.device`` in the problem's compute dtype."""
    return TorchArrays(xp_torch, prob.device, prob.dtype, ACC)


@dataclass
class DeviceData:
    """X and the labels of a problem, served block by block on the compute device.

    ``X`` is the problem's X (a NumPy array, or a tensor on any device), each block of rows
    moved and converted when asked for, or, with ``resident``, all of it already on the
    device in the compute dtype (for repeated passes over the data).
    """

    prob: TorchProblem
    X: Any
    labels: torch.Tensor  # on the device: int64 class indices, or probability rows in the compute dtype

    @classmethod
    def of(cls, prob: TorchProblem, *, resident: bool = False) -> DeviceData:
        labels = _from_numpy(prob.labels).to(device=prob.device)
        data = cls(prob, prob.X, labels.to(prob.dtype) if prob.soft else labels)
        if resident:
            data.X = data.rows(0, prob.n_samples)
        return data

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """X[lo:hi] on the device, in the compute dtype and row-major (no copy when it is there
        already; a strided X is copied, so that the GEMMs, and the rounding, do not depend on
        its layout)."""
        dev, cdt = self.prob.device, self.prob.dtype
        if isinstance(self.X, torch.Tensor):
            return self.X[lo:hi].to(device=dev, dtype=cdt).contiguous()
        return torch.from_numpy(np.array(self.X[lo:hi])).to(device=dev, dtype=cdt)  # a copy: X may be read-only

    def label_rows(self, lo: int, hi: int) -> torch.Tensor:
        """The (hi - lo, C) label rows (one-hot for class indices), in the compute dtype."""
        if self.prob.soft:
            return self.labels[lo:hi]
        return torch.nn.functional.one_hot(self.labels[lo:hi], self.prob.n_classes).to(self.prob.dtype)


def moments(prob: TorchProblem, progress: Callable[[int, int], None] | None = None) -> Moments:
    """The engine's moment pass on ``prob.device`` (no_grad, IEEE float32 matmuls on CUDA): the
    per-block partial sums stay on the device and come to the host in two copies at the end, where
    they are added up in block order (:class:`wsbound_fast._engine.schedule.Reduction`)."""
    arr = arrays(prob)
    with torch.no_grad(), ieee_float32(prob.device):
        return schedule.moments(prob, arr, Weights.of(prob, arr), DeviceData.of(prob), progress)


class _TF32Guard:
    """The process-wide state of :func:`ieee_float32`: the flag is global to cuBLAS, so calls
    from several threads share one guard.  The first to enter turns TF32 off and keeps the
    caller's setting; the last to leave restores it (a count under a lock), so that no call
    restores TF32 while another still runs in float32."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.restore: Callable[[], None] | None = None

    def enter(self) -> None:
        with self.lock:
            if self.depth == 0:
                self.restore = _tf32_off()  # raises before counting: nothing to undo
            self.depth += 1

    def exit(self) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                restore, self.restore = self.restore, None
                if restore is not None:
                    restore()


_TF32 = _TF32Guard()


def _tf32_off() -> Callable[[], None] | None:
    """Turn TF32 matmuls off; return what restores the caller's setting (None: it was off)."""
    m = torch.backends.cuda.matmul
    try:
        legacy = bool(m.allow_tf32)
    except RuntimeError:  # the new API is in use (torch >= 2.9): the legacy flag cannot be read
        legacy = None
    if legacy is True:
        m.allow_tf32 = False
        return lambda: setattr(m, "allow_tf32", True)
    if legacy is None:
        old = m.fp32_precision
        if old != "ieee":
            m.fp32_precision = "ieee"
            return lambda: setattr(m, "fp32_precision", old)
    return None


@contextlib.contextmanager
def ieee_float32(device: torch.device) -> Iterator[None]:
    """Within the block: float32 matmuls on ``device`` (CUDA) in IEEE float32, not TF32.

    torch has two APIs for the flag (``allow_tf32``, and ``fp32_precision`` since 2.9) and
    refuses to read the legacy one once the new one was used; the setting is changed and
    restored through the API that can read it, so that the caller's later reads of either
    keep working.  Nothing happens off CUDA (the flag is cuBLAS's).  Safe under concurrent
    calls from several threads (and nested ones): the flag stays off until the last one
    leaves, which restores the setting the first one found (:class:`_TF32Guard`).
    """
    if device.type != "cuda":
        yield
        return
    _TF32.enter()
    try:
        yield
    finally:
        _TF32.exit()


# --------------------------------------------------------------------------------------
# curvature-vector products (hvp, eigsh, bound(exact=..., certify=...))
# --------------------------------------------------------------------------------------

#: Share of memory_limit that X and the labels may take when kept on the device between products.
RESIDENT_DATA_SHARE = 0.25


#: Share of memory_limit that the Lanczos basis (maxiter x P float64 values) may take on the
#: device; a larger basis stays in host memory (see _spectral.lanczos.lanczos).
DEVICE_BASIS_SHARE = 0.25


def hvp_products(prob: TorchProblem, k: int, batch_size: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """The unnormalised product V (k', P) -> sum_n H_n V[j] on ``prob.device``, as a function
    of float64 NumPy arrays (what :func:`wsbound_fast._backends.make_matvec` wraps); the same
    product on float64 tensors on the device is its attribute ``on_device``.

    Always in float64 (``prob.dtype`` is the moments' precision; see README).  The block
    product :func:`wsbound_fast._engine.products.block_hvp` -- the one Python engine, which
    the NumPy backend runs on arrays and this one on tensors -- for each block of samples,
    summed in block order on the device; one copy of the (k', P) result to the host per
    call.  The plan is :func:`~wsbound_fast._planning.blocks.plan_hvp`'s with one block at a
    time within ``memory_limit`` on the device (larger preferred blocks on an accelerator, as
    for the moments).  The weights and labels are copied to the device once,
    and so is X when X and the labels take at most ``RESIDENT_DATA_SHARE`` of memory_limit
    (Lanczos calls the product hundreds of times); otherwise each block of X is moved when
    needed.
    """
    target = {"target_batch": GPU_PLAN["target_batch"]} if prob.device.type != "cpu" else {}
    planned = plan_hvp(dataclasses.replace(prob, threads=1, dtype=ACC), k, batch_size, **target)
    N = planned.n_samples
    data_bytes = 8 * N * (planned.weights[0].shape[1] + planned.n_classes)
    arr = arrays(planned)
    net = Weights.of(planned, arr)
    data = DeviceData.of(planned, resident=data_bytes <= RESIDENT_DATA_SHARE * planned.memory_limit)

    def on_device(Vd: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return schedule.products(planned, arr, net, data, Vd)

    def products(V: np.ndarray) -> np.ndarray:
        return on_device(_from_numpy(V).to(device=planned.device, dtype=ACC)).cpu().numpy()

    def device_space(scale: float) -> DeviceSpace | None:
        """The Lanczos basis on the device (None: on the host), see :func:`uses_device_basis`."""
        return DeviceSpace(on_device, scale, planned) if uses_device_basis(planned.device) else None

    products.on_device = on_device  # type: ignore[attr-defined]
    products.device_space = device_space  # type: ignore[attr-defined]
    return products


def uses_device_basis(device: torch.device) -> bool:
    """Whether Lanczos keeps its basis on ``device``: off the CPU only, where a host basis would
    cost a transfer and a host pass per step (on the CPU the two are the same memory)."""
    return device.type != "cpu"


class DeviceSpace:
    """The Lanczos vectors on the compute device (see :func:`wsbound_fast._spectral.lanczos.lanczos`):
    the basis, its reorthogonalisation and the product stay there, and each step reads
    two scalars (q . Hq and |w|) and a finiteness flag back.  Used on an accelerator when
    maxiter vectors take at most ``DEVICE_BASIS_SHARE`` of memory_limit: with a host basis
    every step moves a P-vector each way and reads the whole (m, P) basis twice from host
    memory (at P = 0.8M and m = 100 steps, ~1.3 GB a step)."""

    def __init__(self, on_device: Callable[[torch.Tensor], torch.Tensor], scale: float, prob: TorchProblem) -> None:
        self.on_device, self.scale, self.device = on_device, scale, prob.device
        self.budget = DEVICE_BASIS_SHARE * prob.memory_limit

    def holds(self, rows: int, n: int) -> bool:
        return 8 * rows * n <= self.budget

    def vector(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(self.device)

    def basis(self, rows: int, n: int, old: torch.Tensor | None = None) -> torch.Tensor:
        Q = torch.empty((rows, n), dtype=ACC, device=self.device)
        if old is not None:
            Q[: old.shape[0]] = old
        return Q

    def norm(self, w: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(w))

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        out = self.on_device(q[None, :])[0]
        if self.scale != 1.0:
            out *= self.scale
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError("the curvature-vector product overflowed float64; "
                                     "the weights, inputs or v are too large in magnitude")
        return out

    def combine(self, Q: torch.Tensor, coeffs: np.ndarray) -> np.ndarray:
        return (Q.T @ torch.from_numpy(np.ascontiguousarray(coeffs)).to(Q)).cpu().numpy()


