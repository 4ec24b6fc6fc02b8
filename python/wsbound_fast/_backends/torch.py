"""torch backend: the streamed algorithm of ``_numpy_backend.py`` on torch tensors (CPU or GPU).

This module is imported only for ``backend="torch"`` (``bound``, ``hvp``, ``eigsh``);
``import wsbound_fast`` never imports torch.  The curvature-vector product
(:func:`hvp_products`) does not mirror the NumPy code but runs it: ``_hvp.block_hvp`` is
written for NumPy arrays and tensors alike.  The moments mirror ``_numpy_backend.py``
function by function, so the two can be read side by side:

1. :func:`block_features` -- every per-sample quantity of DESIGN.md section 3 for one
   block of samples, and the block's share of tr(H) (same arrays, same names);
2. :func:`pair_sum` -- for a block pair I <= J, the Gram contractions into
   sum_{n in I, n' in J} sum_{l<=m} kappa_lm(n, n') (same GEMMs, upper triangle only);
3. :func:`moments` -- the same block schedule (groups of ``group_blocks`` blocks cached,
   pairs (I, J) with J >= I, off-diagonal pairs counted twice) and the same fixed reduction
   order: per-block partial sums stay on the device, are copied to the host once at the
   end and added up there exactly as the NumPy backend adds them.

The contraction path is ``prob.structured``, chosen by the cost model in
:func:`wsbound_fast._validate.validate` as for the other backends: the generic Gram
contractions above, or the "K route" of docs/structured.md (:func:`_pair_sum_ggn` for
every block of the GGN; :func:`_pair_sum_last` for the Hessian's blocks (L-1, L-1) and
(L-1, L) when L >= 2), with the NumPy backend's chunking of the block pair.

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
O(N) values) and validated by :func:`wsbound_fast._validate.validate` like any other
input.  A tensor X is *not* copied: :func:`check_X` checks its dtype, shape and
finiteness on its own device (in chunks, so no X-sized temporary), with exactly the
errors of :func:`wsbound_fast._validate.validate_X`, and X stays where it is; each block
of rows is moved to the compute device when it is needed.  X may therefore live on the
host while the work runs on a GPU, or the other way round.

Memory: the block plan is :func:`wsbound_fast._validate.plan_python`, the NumPy
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
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError("backend='torch' needs PyTorch (pip install torch, or the wsbound_fast[torch] extra)") from exc

from .._engine.activations import _GELU_TANH_C, _INV_SQRT_2PI, _SQRT_2_OVER_PI
from .._engine.features import _curvature_step, nu_formed, nu_ggn
from .._engine.kroute import (
    _identity_terms,
    _k_terms,
    _pair_chunks,
    _ref_rows,
    _refs,
    _shift,
    _tr_akak,
    _vector_values,
    _within,
    chunk_budgets,
)
from .._engine.pairs import _adjacent_cross, _dense_cross
from .._engine.products import ArrayOps, block_hvp, offsets
from .._engine.softmax import _diag_tat, delta_last, dense_a, diag_a, softmax_ref
from .._planning.blocks import (
    PY_CROSS_COPIES,
    default_memory_limit,
    plan_hvp,
    plan_python,
)
from .._problem.activations import Activation
from .._problem.problem import Problem
from .._problem.validate import check_X_shape, validate, validate_X

#: Accepted ``dtype=`` values (strings, or the torch dtypes themselves).
DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32}
#: Accumulation dtype of every pair sum, whatever the compute dtype.
ACC = torch.float64
#: (B, B', d_l) temporaries of the batched cross terms alive at once (_dense_cross: its two
#: products), for the block plan's scratch (_cost.pair_scratch_doubles); as the NumPy backend's.
CROSS_COPIES = PY_CROSS_COPIES
#: Block shape preferred on an accelerator (see plan_blocks).
GPU_PLAN = {"target_batch": 2048, "max_pair_flops": 4e12}
#: Share of the device's free memory used by default on CUDA.
CUDA_BUDGET_FRACTION = 0.5
# KROUTE_SCRATCH_SHARE (_validate): on an accelerator, the share of memory_limit set aside
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


# --------------------------------------------------------------------------------------
# validation (same errors as _validate; tensors are checked where they live)
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
                   device: Any = None, dtype: Any = None) -> TorchProblem:
    """validate() for the torch backend: same errors, then device, dtype and a device plan."""
    prob = validate(_layers_to_numpy(layers), X, _to_numpy(y), activation=activation, curvature=curvature,
                    reduction=reduction, batch_size=batch_size, threads=threads, memory_limit=memory_limit,
                    check_X=check_X)
    dev = resolve_device(device, layers, X, y)
    cdt = resolve_dtype(dtype)
    budget = default_budget(dev) if memory_limit is None else prob.memory_limit
    accel = dev.type != "cpu"
    # one block pair at a time; features planned as float64 (conservative in float32); the
    # contraction path is the one validate() chose (prob.structured); on an accelerator large
    # K-route chunks (few, large kernels) and larger blocks
    batch, group, chunks = plan_python(prob, None if batch_size is None else prob.batch_size, budget,
                                       accelerator=accel, **(GPU_PLAN if accel else {}))
    fields = {f.name: getattr(prob, f.name) for f in dataclasses.fields(Problem)}
    fields.update(batch_size=batch, group_blocks=group, memory_limit=budget, chunks=chunks)
    return TorchProblem(**fields, device=dev, dtype=cdt, host_memory_limit=prob.memory_limit)


# --------------------------------------------------------------------------------------
# activations (the formulas of _activations.evaluate, on tensors)
# --------------------------------------------------------------------------------------


def _logistic_slope(z: torch.Tensor) -> torch.Tensor:
    """sigma(z) (1 - sigma(z)) = e / (1 + e)^2, e = exp(-|z|): accurate when saturated."""
    e = torch.exp(-torch.abs(z))
    return e / ((1.0 + e) * (1.0 + e))


def evaluate(act: Activation, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (sigma(z), sigma'(z), sigma''(z)) elementwise, in z's dtype (the forms of
    _activations.evaluate: no derivative subtracts from 1 a number that tends to 1)."""
    name = act.name
    if name == "identity":
        return z.clone(), torch.ones_like(z), torch.zeros_like(z)
    if name == "tanh":
        t = torch.tanh(z)
        d1 = 4.0 * _logistic_slope(2.0 * z)  # sech^2
        return t, d1, -2.0 * t * d1
    if name == "sigmoid":
        s = torch.sigmoid(z)
        d1 = _logistic_slope(z)
        return s, d1, -d1 * torch.tanh(0.5 * z)
    if name == "softplus":
        s = torch.sigmoid(z)
        f = torch.clamp(z, min=0.0) + torch.log1p(torch.exp(-torch.abs(z)))
        return f, s, _logistic_slope(z)
    if name == "gelu":
        phi = _INV_SQRT_2PI * torch.exp(-0.5 * z * z)
        cdf = 0.5 * torch.erfc(-z / math.sqrt(2.0))
        return z * cdf, cdf + z * phi, phi * (2.0 - z * z)
    if name == "gelu_tanh":
        u = _SQRT_2_OVER_PI * (z + _GELU_TANH_C * z**3)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * z * z)
        ddu = _SQRT_2_OVER_PI * 6.0 * _GELU_TANH_C * z
        t = torch.tanh(u)
        sech2 = 4.0 * _logistic_slope(2.0 * u)
        half = torch.sigmoid(2.0 * u)  # (1 + tanh u) / 2
        f = z * half
        d1 = half + 0.5 * z * sech2 * du
        d2 = sech2 * (du + 0.5 * z * (ddu - 2.0 * t * du * du))
        return f, d1, d2
    if name == "silu":
        s = torch.sigmoid(z)
        d = _logistic_slope(z)
        return z * s, s + z * d, d * (2.0 - z * torch.tanh(0.5 * z))
    if name == "relu":
        pos = z > 0
        return torch.where(pos, z, torch.zeros_like(z)), pos.to(z.dtype), torch.zeros_like(z)
    if name == "leaky_relu":
        pos = z > 0
        k = act.param
        return torch.where(pos, z, k * z), torch.where(pos, torch.ones_like(z), torch.full_like(z, k)), torch.zeros_like(z)
    raise AssertionError(f"unhandled activation {name!r}")  # pragma: no cover


# --------------------------------------------------------------------------------------
# the streamed algorithm (mirrors _numpy_backend.py)
# --------------------------------------------------------------------------------------


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    """torch.from_numpy, copying read-only arrays (torch warns about sharing those)."""
    return torch.from_numpy(a if a.flags.writeable else a.copy())


@dataclass
class DeviceWeights:
    """The weights and biases on the compute device, in the compute dtype (copied once)."""

    W: list[torch.Tensor]
    b: list[torch.Tensor | None]

    @classmethod
    def of(cls, prob: TorchProblem) -> DeviceWeights:
        def put(a: np.ndarray) -> torch.Tensor:
            return _from_numpy(a).to(device=prob.device, dtype=prob.dtype)

        return cls([put(W) for W in prob.weights], [None if b is None else put(b) for b in prob.biases])


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


@dataclass
class BlockFeatures:
    """Per-sample features of one block of B samples (index 0 of every tensor is n).

    The fields of ``_numpy_backend.BlockFeatures``, as tensors on the compute device.
    """

    at: list[torch.Tensor]  # at[l]: augmented input of layer l, (B, d_{l-1} [+1])
    delta: list[torch.Tensor]  # delta[l]: dloss/dz_l, (B, d_l)
    sp: list[torch.Tensor]  # sp[l]: sigma'(z_l), (B, d_l), l < L
    G: dict[tuple[int, int], torch.Tensor]  # G[l, m]: (B, d_l * d_m) row-major, l <= m
    Q: dict[tuple[int, int], torch.Tensor]  # Q[l, m]: (B, d_{m-1}, d_l), l < m - 1 (full Hessian)
    trace: torch.Tensor  # trace[l-1]: sum over the block of |a~_{l-1}|^2 tr(M_l), float64, (L,)
    # Structured path (as _numpy_backend.BlockFeatures): p, w (A = w (diag p - p p^T)), W = W_L;
    # GGN: T[l] = T_{L,l} stacked, (B, C, d_l), l <= L - 2; Hessian (L >= 2): rho, u of M_{L-1}.
    p: torch.Tensor | None = None
    w: torch.Tensor | None = None
    W: torch.Tensor | None = None
    T: dict[int, torch.Tensor] | None = None
    rho: torch.Tensor | None = None
    u: torch.Tensor | None = None
    # Structured path: the reference class r (int64) and q = 1 - p_r per sample (B,).
    r: torch.Tensor | None = None
    q: torch.Tensor | None = None
    # Magnitudes (docs/numerics.md section 4), the block's sums in float64: trace_abs (L,), norms (L, L).
    trace_abs: torch.Tensor | None = None
    norms: torch.Tensor | None = None


def block_features(prob: TorchProblem, net: DeviceWeights, Xb: torch.Tensor, Yb: torch.Tensor) -> BlockFeatures:
    """Features of one block; Xb is (B, d_0), Yb is (B, C) label rows, both in the compute dtype."""
    W, bias, L = net.W, net.b, prob.n_layers
    B = Xb.shape[0]
    none = torch.empty(0)
    at: list[torch.Tensor] = [none] * (L + 1)
    sp: list[torch.Tensor] = [none] * (L + 1)
    spp: list[torch.Tensor] = [none] * (L + 1)
    delta: list[torch.Tensor] = [none] * (L + 1)
    a = Xb
    z = Xb
    for l in range(1, L + 1):
        b = bias[l - 1]
        at[l] = a if b is None else torch.cat([a, a.new_ones((B, 1))], dim=1)
        z = a @ W[l - 1].T
        if b is not None:
            z += b
        if l < L:
            a, sp[l], spp[l] = evaluate(prob.activations[l - 1], z)
    sm = softmax_ref(z, torch)  # the reference class r = argmax z (docs/numerics.md section 1)
    p = sm.p
    w = Yb.sum(dim=1)  # 1 up to rounding; kept so the maths is exact for the given rows
    delta[L] = delta_last(sm, w, Yb, torch)
    at_sq = [none] + [(at[l] * at[l]).sum(dim=1) for l in range(1, L + 1)]
    if prob.structured and not prob.hessian:  # GGN, K route: T_{L-1} = W_L D_{L-1}, T_l = T_{l+1} W_{l+1} D_l
        T: dict[int, torch.Tensor] = {}
        tr_m = [none] * (L + 1)
        tr_abs = [none] * (L + 1)
        dA = diag_a(sm, w, torch)
        tr_m[L], tr_abs[L] = dA.sum(dim=1), dA.abs().sum(dim=1)  # tr(A)
        Tl = none
        for l in range(L - 1, 0, -1):
            Tl = (W[L - 1][None, :, :] if l == L - 1 else Tl @ W[l]) * sp[l][:, None, :]
            dg = _diag_tat(sm, w, Tl, torch)
            tr_m[l], tr_abs[l] = dg.sum(dim=1), dg.abs().sum(dim=1)
            if l <= L - 2:
                T[l] = Tl
        return BlockFeatures(at, delta, sp, {}, {}, _layer_traces(at_sq, tr_m), p=p, w=w, W=W[L - 1], T=T,
                             r=sm.r, q=sm.q, trace_abs=_layer_traces(at_sq, tr_abs),
                             norms=_sum_nu(nu_ggn(at_sq, tr_m, torch), L, p.device))
    M: list[torch.Tensor] = [none] * (L + 1)
    M[L] = dense_a(sm, w, torch)
    kroute = prob.structured and L >= 2  # Hessian blocks (L-1, L-1) and (L-1, L) by the K route
    rho = u = None
    G_next: dict[int, torch.Tensor] = {}  # G_{l,l+1}, formed on the way to M_l
    for l in range(L - 1, 0, -1):
        Wn = W[l]  # W_{l+1}, (d_{l+1}, d_l)
        g = delta[l + 1] @ Wn
        delta[l] = sp[l] * g
        if kroute and l == L - 1:  # M_{L-1} = V V^T + diag(rho), |V_k|^2 = (T^T A T)_kk
            rho = spp[l] * g
            u = _diag_tat(sm, w, Wn[None, :, :] * sp[l][:, None, :], torch)
            if L == 2:
                continue  # nothing below needs the dense d x d matrix
        G_next[l], M[l] = _curvature_step(Wn, M[l + 1], sp[l], spp[l] * g if prob.hessian else None)
    tr_m = [none] + [M[l].diagonal(dim1=1, dim2=2).sum(dim=1) if M[l].numel() else none for l in range(1, L + 1)]
    tr_abs = [none] + [M[l].diagonal(dim1=1, dim2=2).abs().sum(dim=1) if M[l].numel() else none
                       for l in range(1, L + 1)]
    if kroute:
        tr_m[L - 1] = u.sum(dim=1) + rho.sum(dim=1)
        tr_abs[L - 1] = (u + rho).abs().sum(dim=1)
    trace = _layer_traces(at_sq, tr_m)
    trace_abs = _layer_traces(at_sq, tr_abs)
    G: dict[tuple[int, int], torch.Tensor] = {}
    for m in range(1, L + 1):
        Gc = M[m]
        if Gc.numel() == 0:  # M_1 of a one-hidden-layer net on the K route: never formed
            continue
        G[m, m] = Gc.reshape(B, -1)
        for l in range(m - 1, 0, -1):  # G_{l,m} = D_l W_{l+1}^T G_{l+1,m}
            if kroute and L == 2:
                break  # G_{1,2} goes by the K route and nothing lies below it
            Gc = G_next[l] if l == m - 1 and l in G_next else sp[l][:, :, None] * (W[l].T @ Gc)
            G[l, m] = Gc.reshape(B, -1)
    Q: dict[tuple[int, int], torch.Tensor] = {}
    if prob.hessian:
        for l in range(1, L - 1):  # Q_{l,l+1} = D_l;  Q_{l,m} = D_{m-1} W_{m-1} Q_{l,m-1}
            Qc = W[l][None, :, :] * sp[l][:, None, :]  # W_{l+1} D_l, (B, d_{l+1}, d_l)
            Q[l, l + 2] = Qc = sp[l + 1][:, :, None] * Qc
            for m in range(l + 3, L + 1):
                Q[l, m] = Qc = sp[m - 1][:, :, None] * (W[m - 2] @ Qc)
    last = (u.sum(dim=1), rho, tr_m[L]) if kroute else None
    norms = _sum_nu(nu_formed(prob, at_sq, G, Q, delta, sp, last, torch), L, p.device)
    if not kroute:
        return BlockFeatures(at, delta, sp, G, Q, trace, trace_abs=trace_abs, norms=norms)
    G.pop((L - 1, L - 1), None)  # both were needed only to form the blocks below them
    G.pop((L - 1, L), None)
    return BlockFeatures(at, delta, sp, G, Q, trace, p=p, w=w, W=W[L - 1], rho=rho, u=u, r=sm.r, q=sm.q,
                         trace_abs=trace_abs, norms=norms)


def _layer_traces(at_sq: list[torch.Tensor], tr_m: list[torch.Tensor]) -> torch.Tensor:
    """trace[l-1] = sum over the block of |a~_{l-1}|^2 tr(M_l) (per sample in the compute dtype,
    summed in float64), (L,)."""
    return torch.stack([(at_sq[l] * tr_m[l]).to(ACC).sum() for l in range(1, len(at_sq))])


def _sum_nu(nu: dict[tuple[int, int], torch.Tensor], L: int, device: torch.device) -> torch.Tensor:
    """norms[l-1, m-1] = sum over the block of nu_n^{lm} (per sample in the compute dtype, summed
    in float64), the (L, L) upper triangle, on the device."""
    out = torch.zeros((L, L), dtype=ACC, device=device)
    for (l, m), v in nu.items():
        out[l - 1, m - 1] = v.to(ACC).sum()
    return out


def _gram(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A B^T in the compute dtype (the GEMM), returned in the accumulation dtype."""
    return (A @ B.T).to(ACC)


# The K route (docs/structured.md), as in _numpy_backend: per chunk of pairs (r rows n of I,
# c columns n' of J) scalars are (r, c), vectors (r, C, c) and the C x C matrices K (r, C, C, c).


def _omega(W: torch.Tensor, ones_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Omega, the rows W_i * W_j (i <= j, i-major) of W = W_L (C, d), after a row of ones if
    ones_row; and pos (C, C), the row of Omega that holds (i, j) (see _unpack)."""
    C, d = W.shape
    i, j = torch.triu_indices(C, C, device=W.device)
    pos = torch.empty((C, C), dtype=torch.long, device=W.device)
    pos[i, j] = pos[j, i] = torch.arange(i.numel(), device=W.device) + int(ones_row)
    rows = W[i] * W[j]
    return (torch.cat([W.new_ones((1, d)), rows]) if ones_row else rows), pos


def _stacked_gram(YI: torch.Tensor, sJ: torch.Tensor) -> torch.Tensor:
    """out[n, q, n'] = Y_n[q] . s_n' for Y stacked (r, q, d) and s (c, d): one GEMM in the
    compute dtype, (r, q, c) in the accumulation dtype (as _numpy_backend._stacked_gram)."""
    r, q, d = YI.shape
    return _gram(YI.reshape(r * q, d), sJ).reshape(r, q, sJ.shape[0])


def _unpack(packed: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The symmetric K (r, C, C, c) from its packed rows (r, q, c): K[:, i, j] = packed[:, pos[i, j]]."""
    C = pos.shape[0]
    return packed.index_select(1, pos.reshape(-1)).reshape(packed.shape[0], C, C, packed.shape[2])


def _t_gram(TI: torch.Tensor, TJ: torch.Tensor) -> torch.Tensor:
    """G[n, i, n', j] = (T_n T_n'^T)[i, j] from stacked T, (r, C, d) and (c, C, d): (r, C, c, C),
    the GEMM in the compute dtype, G in the accumulation dtype; K of a sub-chunk is
    _t_layout(G[rows, :, cols])."""
    r, C, d = TI.shape
    return _gram(TI.reshape(r * C, d), TJ.reshape(-1, d)).reshape(r, C, TJ.shape[0], C)


def _t_layout(G: torch.Tensor) -> torch.Tensor:
    """K (r, C, C, c) from _t_gram's (r, C, c, C), always a new tensor (_shift works in place)."""
    return G.permute(0, 1, 3, 2).clone(memory_format=torch.contiguous_format)


def _pair_sum_ggn(prob: TorchProblem, FI: BlockFeatures, FJ: BlockFeatures) -> torch.Tensor:
    """GGN by the K route: out[l-1, m-1] = sum alpha_l alpha_m tr(A K_l A' K_m^T) over the pairs,
    K_L = I, K_{L-1} from the packed GEMM, K_l = T_l T_l'^T below, each shifted to the pair's
    reference classes (as _numpy_backend)."""
    L = prob.n_layers
    out = torch.zeros((L, L), dtype=ACC, device=prob.device)
    alphas = {l: _gram(FI.at[l], FJ.at[l]) for l in range(1, L + 1)}
    pI_all, pJ_all = FI.p.to(ACC), FJ.p.to(ACC)
    ww = FI.w.to(ACC)[:, None] * FJ.w.to(ACC)[None, :]
    (pnI, hI), (pnJ, hJ) = _ref_rows(pI_all, FI.r, FI.q.to(ACC), torch), _ref_rows(pJ_all, FJ.r, FJ.q.to(ACC), torch)
    pnpn, hh = pnI @ pnJ.T, hI @ hJ.T
    (B, C), Bp = FI.p.shape, FJ.p.shape[0]
    omega, pos = _omega(FI.W, ones_row=False)  # (not used when L = 1: K_L = I only)
    gemm_per_pair = omega.shape[0] + (L - 2) * C * C if L >= 2 else 1  # packed K_{L-1}, T_l Grams
    per_pair = (2 * L - 1) * C * C + _vector_values(L, C)
    chunk_outer, chunk_inner = chunk_budgets(prob)
    for rows, cols in _pair_chunks(B, Bp, gemm_per_pair, omega.numel(), chunk_outer):
        packed = _stacked_gram(omega[None, :, :] * FI.sp[L - 1][rows, None, :], FJ.sp[L - 1][cols]) if L >= 2 else None
        grams = {l: _t_gram(FI.T[l][rows], FJ.T[l][cols]) for l in range(1, L - 1)}
        for sr, sc in _pair_chunks(rows.stop - rows.start, cols.stop - cols.start, per_pair, 0, chunk_inner):
            rr, cc = _within(rows, sr), _within(cols, sc)
            pI, pJT = pI_all[rr], pJ_all[cc].T
            rf = _refs(FI.r[rr], FJ.r[cc], pI, pJT, pnpn[rr, cc], torch)
            terms = {L: _identity_terms(hI[rr], hJ[cc].T, hh[rr, cc], rf)}
            for l in range(1, L):
                K = _unpack(packed[sr, :, sc], pos) if l == L - 1 else _t_layout(grams[l][sr, :, sc])
                terms[l] = _k_terms(_shift(K, rf), pI, pJT, torch)
            weight = ww[rr, cc]
            for l in range(1, L + 1):
                for m in range(l, L + 1):
                    tr = _tr_akak(pI, pJT, terms[l], terms[m], rf, torch)
                    out[l - 1, m - 1] += torch.sum(alphas[l][rr, cc] * alphas[m][rr, cc] * weight * tr)
    return out


def _pair_sum_last(prob: TorchProblem, FI: BlockFeatures, FJ: BlockFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """Hessian blocks (L-1, L-1) and (L-1, L) by the K route, L >= 2, as float64 scalar tensors
    (as _numpy_backend._pair_sum_last: one GEMM for [s . s'; packed K; E], one for E'; shifted
    to the reference classes)."""
    L = prob.n_layers
    W = FI.W
    C, d = W.shape
    alpha = _gram(FI.at[L - 1], FJ.at[L - 1])
    beta = _gram(FI.at[L], FJ.at[L])
    gamma = _gram(FI.delta[L], FJ.delta[L])
    inner = _gram(FI.u, FJ.rho) + _gram(FI.rho, FJ.u) + _gram(FI.rho, FJ.rho)
    wI, wJ = FI.w.to(ACC), FJ.w.to(ACC)
    qI, qJ = FI.q.to(ACC), FJ.q.to(ACC)
    ww = wI[:, None] * wJ[None, :]
    pI_all, pJ_all, dI_all, dJ_all = FI.p.to(ACC), FJ.p.to(ACC), FI.delta[L].to(ACC), FJ.delta[L].to(ACC)
    (pnI, hI), (pnJ, hJ) = _ref_rows(pI_all, FI.r, qI, torch), _ref_rows(pJ_all, FJ.r, qJ, torch)
    hh = hI @ hJ.T  # p^T S_I p'
    pn_dJ = pnI @ dJ_all.T  # sum_{i != r} p_i delta'_i
    dI_pn = dI_all @ pnJ.T  # sum_{i != r'} delta_i p'_i
    sI, sJ = FI.sp[L - 1], FJ.sp[L - 1]
    asJ = FJ.at[L][:, :d] * sJ  # a' s'
    omega, pos = _omega(W, ones_row=True)
    n_k = omega.shape[0]
    omega = torch.cat([omega, W])
    total = torch.zeros(2, dtype=ACC, device=W.device)
    per_pair = 3 * C * C + _vector_values(2, C)
    gemm_per_pair, gemm_per_row = omega.shape[0] + C, omega.numel() + C * d  # [s . s'; K; E] and E', their left sides
    chunk_outer, chunk_inner = chunk_budgets(prob)
    for rows, cols in _pair_chunks(sI.shape[0], sJ.shape[0], gemm_per_pair, gemm_per_row, chunk_outer):
        YI = omega[None, :, :] * sI[rows, None, :]
        YI[:, n_k:, :] *= FI.at[L][rows, None, :d]  # W diag(a_n s_n)
        R_all = _stacked_gram(YI, sJ[cols])  # [s . s'; packed K; E]
        Ep_all = _stacked_gram(W[None, :, :] * sI[rows, None, :], asJ[cols])
        for sr, sc in _pair_chunks(R_all.shape[0], R_all.shape[2], per_pair, 0, chunk_inner):
            rr, cc = _within(rows, sr), _within(cols, sc)
            R, Ep = R_all[sr, :, sc], Ep_all[sr, :, sc]
            pI, pJT = pI_all[rr], pJ_all[cc].T
            rf = _refs(FI.r[rr], FJ.r[cc], pI, pJT, None, torch)
            k = _k_terms(_shift(_unpack(R, pos), rf), pI, pJT, torch)
            t_kk = _tr_akak(pI, pJT, k, k, rf, torch)
            t_ki = _tr_akak(pI, pJT, k, _identity_terms(hI[rr], hJ[cc].T, hh[rr, cc], rf), rf, torch)
            E = R[:, n_k:, :]
            dJT, dI = dJ_all[cc].T, dI_all[rr]
            d_r = dJT[rf.rI]  # delta'_r, (r, c)
            Dl = dJT[None, :, :] - d_r[:, None, :]
            Dbar = pn_dJ[rr, cc] - qI[rr, None] * d_r
            Dl *= E
            cross = wI[rr, None] * (torch.einsum("aib,ai->ab", Dl, pI) - Dbar * torch.einsum("aib,ai->ab", E, pI))
            d_r = dI[:, rf.rJ]  # delta_r', (r, c)
            Dl = dI[:, :, None] - d_r[:, None, :]
            Dbar = dI_pn[rr, cc] - qJ[None, cc] * d_r
            Dl *= Ep
            cross += wJ[None, cc] * (torch.einsum("aib,ib->ab", Dl, pJT) - Dbar * torch.einsum("aib,ib->ab", Ep, pJT))
            a, w2 = alpha[rr, cc], ww[rr, cc]
            total[0] += torch.sum(a * a * (w2 * t_kk + inner[rr, cc]))
            total[1] += torch.sum(a * (beta[rr, cc] * w2 * t_ki + gamma[rr, cc] * R[:, 0, :] + cross))
    return total[0], total[1]


def pair_sum(prob: TorchProblem, FI: BlockFeatures, FJ: BlockFeatures) -> torch.Tensor:
    """out[l-1, m-1] = sum_{n in I, n' in J} kappa_lm(n, n') for l <= m (zero below the diagonal),
    a float64 (L, L) tensor on the compute device (no host synchronisation)."""
    L = prob.n_layers
    if prob.structured and not prob.hessian:
        return _pair_sum_ggn(prob, FI, FJ)
    kroute = prob.structured and L >= 2
    out = torch.zeros((L, L), dtype=ACC, device=prob.device)
    for l in range(1, L + 1):
        if kroute and l == L - 1:
            continue  # (L-1, L-1) and (L-1, L): _pair_sum_last
        alpha = _gram(FI.at[l], FJ.at[l])
        for m in range(l, L + 1):
            KG = _gram(FI.G[l, m], FJ.G[l, m])
            if l == m:
                out[l - 1, m - 1] = torch.sum(alpha * alpha * KG)
                continue
            inner = _gram(FI.at[m], FJ.at[m]) * KG
            if prob.hessian:
                gamma = _gram(FI.delta[m], FJ.delta[m])
                if m == l + 1:
                    inner += gamma * _gram(FI.sp[l], FJ.sp[l])
                    d_l = FI.sp[l].shape[1]
                    inner += _adjacent_cross(FI.at[m][:, :d_l], FI.G[l, m], FJ.delta[m], FJ.sp[l], torch).to(ACC)
                    inner += _adjacent_cross(FJ.at[m][:, :d_l], FJ.G[l, m], FI.delta[m], FI.sp[l], torch).to(ACC).T
                else:
                    QI, QJ = FI.Q[l, m], FJ.Q[l, m]
                    inner += gamma * _gram(QI.reshape(QI.shape[0], -1), QJ.reshape(QJ.shape[0], -1))
                    d_prev = QI.shape[1]
                    inner += _dense_cross(FI.at[m][:, :d_prev], FI.G[l, m], FJ.delta[m], QJ).to(ACC)
                    inner += _dense_cross(FJ.at[m][:, :d_prev], FJ.G[l, m], FI.delta[m], QI).to(ACC).T
            out[l - 1, m - 1] = torch.sum(alpha * inner)
    if kroute:
        out[L - 2, L - 2], out[L - 2, L - 1] = _pair_sum_last(prob, FI, FJ)
    return out


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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def moments(prob: TorchProblem, progress: Callable[[int, int], None] | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unnormalised moments per parameter block and the magnitudes of the rounding allowances, as
    the C++ core and the NumPy backend return them:

    (trace[l] = sum_n tr H_n^{ll}, blocks[l, m] = sum_{n,n'} <H_n^{lm}, H_n'^{lm}> for l <= m,
    trace_abs[l], norms[l, m] of docs/numerics.md section 4), as float64 NumPy arrays.
    ``progress(done, total)`` is called after each group of block pairs, once that work has
    finished on the device.  The per-block partial sums stay on the device and come to the host
    in two copies at the end, where they are added up in block order.
    """
    N, B, L = prob.n_samples, prob.batch_size, prob.n_layers
    dev = prob.device
    bounds = [(lo, min(lo + B, N)) for lo in range(0, N, B)]
    nb = len(bounds)
    group = prob.group_blocks
    net = DeviceWeights.of(prob)
    data = DeviceData.of(prob)

    def features(k: int) -> BlockFeatures:
        lo, hi = bounds[k]
        return block_features(prob, net, data.rows(lo, hi), data.label_rows(lo, hi))

    with torch.no_grad(), ieee_float32(dev):
        block_vec = torch.zeros((nb, 2, L), dtype=ACC, device=dev)  # per block: trace, trace_abs
        # per block i: [0] the pair sums over j >= i, j increasing (off-diagonal twice); [1] its norms
        row_mat = torch.zeros((nb, 2, L, L), dtype=ACC, device=dev)
        done, total_pairs = 0, nb * (nb + 1) // 2
        for g0 in range(0, nb, group):
            rows = {i: features(i) for i in range(g0, min(g0 + group, nb))}
            for i in rows:
                block_vec[i, 0], block_vec[i, 1], row_mat[i, 1] = rows[i].trace, rows[i].trace_abs, rows[i].norms
            for h0 in range(g0, nb, group):
                cols = rows if h0 == g0 else {j: features(j) for j in range(h0, min(h0 + group, nb))}
                for i, fi in rows.items():
                    for j, fj in cols.items():
                        if j >= i:
                            s = pair_sum(prob, fi, fj)
                            row_mat[i, 0] += s if i == j else 2.0 * s
                            done += 1
                cols = fi = fj = None  # no reference to this group while the next one is computed
                if progress is not None:
                    _synchronize(dev)
                    progress(done, total_pairs)
            del rows
        bv, rm = block_vec.cpu().numpy(), row_mat.cpu().numpy()
    trace, blocks, trace_abs, norms = np.zeros(L), np.zeros((L, L)), np.zeros(L), np.zeros((L, L))
    for k in range(nb):
        trace += bv[k, 0]
        blocks += rm[k, 0]
        trace_abs += bv[k, 1]
        norms += rm[k, 1]
    return trace, blocks, trace_abs, norms


# --------------------------------------------------------------------------------------
# curvature-vector products (hvp, eigsh, bound(exact=..., certify=...))
# --------------------------------------------------------------------------------------

#: _hvp.block_hvp's array operations on tensors.
TORCH_OPS = ArrayOps(evaluate, torch, torch.zeros_like)
#: Share of memory_limit that X and the labels may take when kept on the device between products.
RESIDENT_DATA_SHARE = 0.25


#: Share of memory_limit that the Lanczos basis (maxiter x P float64 values) may take on the
#: device; a larger basis stays in host memory (see _lanczos.lanczos).
DEVICE_BASIS_SHARE = 0.25


def hvp_products(prob: TorchProblem, k: int, batch_size: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """The unnormalised product V (k', P) -> sum_n H_n V[j] on ``prob.device``, as a function
    of float64 NumPy arrays (what :func:`wsbound_fast._hvp.make_matvec` wraps); the same
    product on float64 tensors on the device is its attribute ``on_device``.

    Always in float64 (``prob.dtype`` is the moments' precision; see README).  The block of
    :func:`wsbound_fast._hvp.block_hvp` -- the NumPy backend's code, run on tensors -- for
    each block of samples, summed in block order on the device; one copy of the (k', P)
    result to the host per call.  The plan is :func:`~wsbound_fast._hvp.plan_hvp`'s with
    one block at a time within ``memory_limit`` on the device (larger preferred blocks on an
    accelerator, as for the moments).  The weights and labels are copied to the device once,
    and so is X when X and the labels take at most ``RESIDENT_DATA_SHARE`` of memory_limit
    (Lanczos calls the product hundreds of times); otherwise each block of X is moved when
    needed.
    """
    target = {"target_batch": GPU_PLAN["target_batch"]} if prob.device.type != "cpu" else {}
    planned = plan_hvp(dataclasses.replace(prob, threads=1, dtype=ACC), k, batch_size, **target)
    N, B = planned.n_samples, planned.batch_size
    data_bytes = 8 * N * (planned.weights[0].shape[1] + planned.n_classes)
    net = DeviceWeights.of(planned)
    data = DeviceData.of(planned, resident=data_bytes <= RESIDENT_DATA_SHARE * planned.memory_limit)
    off = offsets(planned)

    def on_device(Vd: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = torch.zeros_like(Vd)
            for lo in range(0, N, B):
                hi = min(lo + B, N)
                out += block_hvp(planned, net.W, net.b, data.rows(lo, hi), data.label_rows(lo, hi), Vd, off, TORCH_OPS)
            return out

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
    """The Lanczos vectors on the compute device (see :func:`wsbound_fast._lanczos.lanczos`):
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


# --------------------------------------------------------------------------------------
# cost model of what pair_sum computes (for benchmarks: TFLOP/s reached)
# --------------------------------------------------------------------------------------


def pair_flops(dims: Sequence[int], has_bias: Sequence[bool], hessian: bool, bI: int, bJ: int,
               structured: bool = False) -> int:
    """Floating-point operations of the matrix products in one pair_sum of a bI x bJ block pair.

    Counts 2 flops per multiply-add of every GEMM / batched GEMM / einsum contraction that
    :func:`pair_sum` performs on the path ``structured`` selects, term by term; the
    elementwise products and sums are left out (a few per Gram matrix against inner
    dimensions of d or d^2; on the K route a few per entry of each C x C matrix K, against
    the C(C+1)/2 d of forming K_{L-1}).
    """
    L = len(dims) - 1
    d = list(dims)
    C = d[L]
    na = [0] + [d[l - 1] + int(has_bias[l - 1]) for l in range(1, L + 1)]  # len(at[l])
    pq = 2 * bI * bJ
    f = 0
    if structured and not hessian:  # _pair_sum_ggn
        f += pq * (sum(na[1:]) + 2 * C)  # alpha_l; pn . pn', phat . phat' (S_I's terms)
        if L >= 2:
            f += pq * (C * (C + 1) // 2) * d[L - 1]  # packed K_{L-1}
        f += pq * C * C * sum(d[1:L - 1])  # K_l = T_l T_l'^T, l <= L - 2
        f += pq * (L - 1) * _k_terms_madds(C)  # K p', K^T p, p^T K p' of every K but K_L = I
        f += pq * sum(_tr_akak_madds(C, l == L, m == L) for l in range(1, L + 1) for m in range(l, L + 1))
        return int(f)
    kroute = structured and L >= 2
    if kroute:  # _pair_sum_last
        # alpha, beta, gamma, the u/rho Grams; phat . phat', the pn/delta Grams
        f += pq * (na[L - 1] + na[L] + C + 3 * d[L - 1] + 3 * C)
        f += pq * (1 + C * (C + 1) // 2 + C) * d[L - 1]  # [s . s'; packed K; E]
        f += pq * C * d[L - 1]  # E'
        f += pq * (_k_terms_madds(C) + _tr_akak_madds(C, False, False) + _tr_akak_madds(C, False, True))
        f += pq * 4 * C  # the two cross terms
    for l in range(1, L + 1):
        if kroute and l == L - 1:
            continue
        f += pq * na[l]  # alpha
        for m in range(l, L + 1):
            f += pq * d[l] * d[m]  # KG
            if l == m:
                continue
            f += pq * na[m]  # at[m] Gram
            if not hessian:
                continue
            f += pq * d[m]  # gamma
            if m == l + 1:
                f += pq * d[l]  # sigma' Gram
                f += 2 * (pq * d[l] * d[m] + pq * min(d[l], d[m]))  # two adjacent crosses: GEMM, then the narrower sum
            else:
                f += pq * d[m - 1] * d[l]  # Q Gram
                # two dense crosses: P1 (b Q), P2 (G delta); their product summed over r is elementwise
                f += 2 * (pq * d[m - 1] * d[l] + pq * d[l] * d[m])
    return int(f)


def _k_terms_madds(C: int) -> int:
    """Multiply-adds per pair of _k_terms: K p', K^T p (C^2 each), p^T K p' (C)."""
    return 2 * C * C + C


def _tr_akak_madds(C: int, k_is_identity: bool, kt_is_identity: bool) -> int:
    """Multiply-adds per pair of the einsums in _tr_akak(k, kt) (the elementwise products left out)."""
    if k_is_identity:  # t1 = (1 + [r = r']) pn . pn' + gathered terms: elementwise
        t1 = 0
    elif kt_is_identity:
        t1 = C  # sum_i p_i p'_i K_ii
    else:
        t1 = C * C + C  # (K * Kt) p', then p^T
    return t1 + 2 * C  # t2, t3


def total_pair_flops(dims: Sequence[int], has_bias: Sequence[bool], hessian: bool, n_samples: int,
                     batch_size: int, structured: bool = False) -> int:
    """pair_flops summed over the block pairs I <= J that moments() visits."""
    sizes = [min(batch_size, n_samples - lo) for lo in range(0, n_samples, batch_size)]
    return sum(pair_flops(dims, has_bias, hessian, sizes[i], sizes[j], structured)
               for i in range(len(sizes)) for j in range(i, len(sizes)))
