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
contractions above, or the structured ones (:func:`_pair_sum_ggn` through C x C Gram
blocks of V_l for the GGN; :func:`_lowrank_diag_term` for the Hessian's
M_{L-1} = V V^T + diag(rho) when L >= 2), with the NumPy backend's row chunking.

Precision (``dtype``): ``torch.float64`` (default) computes everything in float64, as the
other backends do.  ``torch.float32`` computes the features and every Gram product (the
GEMMs, which are all the heavy work) in float32, then converts each B x B' Gram matrix
to float64 before the elementwise products, the sums over the block pair and every later
accumulation (tr(H) per sample is formed in float32 and summed in float64).  Measured
against float64 on the CPU: 2e-9 to 1.1e-6 relative on tr(H) and tr(H^2) (random and
trained models up to 784-256-10; see README); the tests allow 2e-5.
TF32 tensor-core matmuls (``torch.backends.cuda.matmul.allow_tf32``) would lower that;
torch leaves them off by default.

Validation: weights, biases and labels given as tensors are copied to NumPy (O(P) and
O(N) values) and validated by :func:`wsbound_fast._validate.validate` like any other
input.  A tensor X is *not* copied: :func:`check_X` checks its dtype, shape and
finiteness on its own device (in chunks, so no X-sized temporary), with exactly the
errors of :func:`wsbound_fast._validate.validate_X`, and X stays where it is; each block
of rows is moved to the compute device when it is needed.  X may therefore live on the
host while the work runs on a GPU, or the other way round.

Memory: the block plan is :func:`wsbound_fast._validate.plan_blocks` with one worker (one
block pair at a time) and the budget ``memory_limit`` bytes *on the compute device*
(default on CUDA: half of the memory that is free there, ``torch.cuda.mem_get_info`` plus
this process's cached-but-unused blocks; elsewhere the host default).  On a GPU the
preferred block is larger (up to 2048 samples, a block pair up to ~4 TFLOP) so that the
GEMMs fill the device; on the CPU the plan is the C++/NumPy one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError("backend='torch' needs PyTorch (pip install torch, or the wsbound_fast[torch] extra)") from exc

from ._activations import _GELU_TANH_C, _INV_SQRT_2PI, _SQRT_2_OVER_PI, Activation
from ._hvp import ArrayOps, block_hvp, offsets, plan_hvp
from ._numpy_backend import _chunk_rows
from ._validate import Problem, default_memory_limit, plan_blocks, validate

#: Accepted ``dtype=`` values (strings, or the torch dtypes themselves).
DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32}
#: Accumulation dtype of every pair sum, whatever the compute dtype.
ACC = torch.float64
#: Block shape preferred on an accelerator (see plan_blocks).
GPU_PLAN = {"target_batch": 2048, "max_pair_flops": 4e12}
#: Share of the device's free memory used by default on CUDA.
CUDA_BUDGET_FRACTION = 0.5
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
    #: for what stays on the host whatever the device: the Lanczos basis of eigsh / exact=.
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
        from ._validate import validate_X

        return validate_X(X, d_in)
    if X.dtype == torch.bool or X.is_complex() or not (X.is_floating_point() or _is_integer(X.dtype)):
        raise TypeError(f"X must hold real numbers (integer or floating dtype); got dtype {_dtype_name(X.dtype)}")
    from ._validate import check_X_shape

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
    dims = [prob.weights[0].shape[1]] + [w.shape[0] for w in prob.weights]
    has_bias = [b is not None for b in prob.biases]
    shape = GPU_PLAN if dev.type != "cpu" else {}
    # one block pair at a time (threads=1); features planned as float64 (conservative in float32);
    # the contraction path is the one validate() chose (prob.structured)
    batch, group = plan_blocks(dims, has_bias, prob.n_samples, prob.hessian, prob.structured, 1,
                               None if batch_size is None else prob.batch_size, budget, **shape)
    fields = {f.name: getattr(prob, f.name) for f in dataclasses.fields(Problem)}
    fields.update(batch_size=batch, group_blocks=group, memory_limit=budget)
    return TorchProblem(**fields, device=dev, dtype=cdt, host_memory_limit=prob.memory_limit)


# --------------------------------------------------------------------------------------
# activations (the formulas of _activations.evaluate, on tensors)
# --------------------------------------------------------------------------------------


def evaluate(act: Activation, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (sigma(z), sigma'(z), sigma''(z)) elementwise, in z's dtype."""
    name = act.name
    if name == "identity":
        return z.clone(), torch.ones_like(z), torch.zeros_like(z)
    if name == "tanh":
        t = torch.tanh(z)
        d1 = 1.0 - t * t
        return t, d1, -2.0 * t * d1
    if name == "sigmoid":
        s = torch.sigmoid(z)
        d1 = s * (1.0 - s)
        return s, d1, d1 * (1.0 - 2.0 * s)
    if name == "softplus":
        s = torch.sigmoid(z)
        f = torch.clamp(z, min=0.0) + torch.log1p(torch.exp(-torch.abs(z)))
        return f, s, s * (1.0 - s)
    if name == "gelu":
        phi = _INV_SQRT_2PI * torch.exp(-0.5 * z * z)
        cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
        return z * cdf, cdf + z * phi, phi * (2.0 - z * z)
    if name == "gelu_tanh":
        u = _SQRT_2_OVER_PI * (z + _GELU_TANH_C * z**3)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * z * z)
        ddu = _SQRT_2_OVER_PI * 6.0 * _GELU_TANH_C * z
        t = torch.tanh(u)
        sech2 = 1.0 - t * t
        f = 0.5 * z * (1.0 + t)
        d1 = 0.5 * (1.0 + t) + 0.5 * z * sech2 * du
        d2 = sech2 * (du + 0.5 * z * (ddu - 2.0 * t * du * du))
        return f, d1, d2
    if name == "silu":
        s = torch.sigmoid(z)
        d = s * (1.0 - s)
        return z * s, s + z * d, d * (2.0 + z * (1.0 - 2.0 * s))
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
        """X[lo:hi] on the device, in the compute dtype (no copy when it is there already)."""
        dev, cdt = self.prob.device, self.prob.dtype
        if isinstance(self.X, torch.Tensor):
            return self.X[lo:hi].to(device=dev, dtype=cdt)
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
    X: dict[int, torch.Tensor]  # X[l]: (a_l * G_{l,l+1}) flattened, (B, d_l * d_{l+1})
    Y: dict[int, torch.Tensor]  # Y[l]: (sigma'_l outer delta_{l+1}) flattened, (B, d_l * d_{l+1})
    trace: torch.Tensor  # trace[l-1]: sum over the block of |a~_{l-1}|^2 tr(M_l), float64, (L,)
    # Structured path (as _numpy_backend.BlockFeatures): Vt[l] stacks V_l^T per sample, (B, C, d_l);
    # GGN: every l, Hessian: l = L - 1, with M_{L-1} = V V^T + diag(rho), u2 the squared row norms of V.
    Vt: dict[int, torch.Tensor] | None = None
    rho: torch.Tensor | None = None
    u2: torch.Tensor | None = None


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
    p = torch.softmax(z, dim=1)
    w = Yb.sum(dim=1)  # 1 up to rounding; kept so the maths is exact for the given rows
    delta[L] = w[:, None] * p - Yb
    M: list[torch.Tensor] = [none] * (L + 1)
    M[L] = w[:, None, None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
    ggn_fast = prob.structured and not prob.hessian
    lowrank = prob.structured and prob.hessian and L >= 2
    Vt: dict[int, torch.Tensor] = {}
    if ggn_fast or lowrank:  # S^T = sqrt(w) (diag sqrt p - sqrt p p^T)
        q = torch.sqrt(p)
        Vt[L] = torch.sqrt(w)[:, None, None] * (torch.diag_embed(q) - q[:, :, None] * p[:, None, :])
    if ggn_fast:
        for l in range(L - 1, 0, -1):
            Vt[l] = (Vt[l + 1] @ W[l]) * sp[l][:, None, :]
        trace = torch.stack([((at[l] * at[l]).sum(dim=1) * (Vt[l] * Vt[l]).sum(dim=(1, 2))).to(ACC).sum()
                             for l in range(1, L + 1)])
        return BlockFeatures(at, delta, sp, {}, {}, {}, {}, trace, Vt)
    rho = u2 = None
    for l in range(L - 1, 0, -1):
        Wn = W[l]  # W_{l+1}, (d_{l+1}, d_l)
        g = delta[l + 1] @ Wn
        delta[l] = sp[l] * g
        if lowrank and l == L - 1:  # M_{L-1} = V V^T + diag(rho)
            rho = spp[l] * g
            Vt[l] = (Vt[l + 1] @ Wn) * sp[l][:, None, :]
            u2 = (Vt[l] * Vt[l]).sum(dim=1)
            if L == 2:
                continue  # nothing below needs the dense d x d matrix
        Ml = Wn.T @ M[l + 1] @ Wn  # (B, d_l, d_l)
        Ml.mul_(sp[l][:, :, None]).mul_(sp[l][:, None, :])  # D_l (W^T M W) D_l, in place
        if prob.hessian:
            Ml.diagonal(dim1=1, dim2=2).add_(spp[l] * g)
        M[l] = Ml

    def tr_m(l: int) -> torch.Tensor:
        if M[l].numel() == 0:  # low-rank M_1 of a one-hidden-layer net
            return (Vt[l] * Vt[l]).sum(dim=(1, 2)) + rho.sum(dim=1)
        return M[l].diagonal(dim1=1, dim2=2).sum(dim=1)

    trace = torch.stack([((at[l] * at[l]).sum(dim=1) * tr_m(l)).to(ACC).sum() for l in range(1, L + 1)])
    G: dict[tuple[int, int], torch.Tensor] = {}
    for m in range(1, L + 1):
        Gc = M[m]
        if Gc.numel() == 0:  # low-rank M_1 of a one-hidden-layer net (L = 2): no G[1, 1]
            continue
        G[m, m] = Gc.reshape(B, -1)
        for l in range(m - 1, 0, -1):  # G_{l,m} = D_l W_{l+1}^T G_{l+1,m}
            Gc = sp[l][:, :, None] * (W[l].T @ Gc)
            G[l, m] = Gc.reshape(B, -1)
    Q: dict[tuple[int, int], torch.Tensor] = {}
    Xc: dict[int, torch.Tensor] = {}
    Yc: dict[int, torch.Tensor] = {}
    if prob.hessian:
        for l in range(1, L - 1):  # Q_{l,l+1} = D_l;  Q_{l,m} = D_{m-1} W_{m-1} Q_{l,m-1}
            Qc = W[l][None, :, :] * sp[l][:, None, :]  # W_{l+1} D_l, (B, d_{l+1}, d_l)
            Q[l, l + 2] = Qc = sp[l + 1][:, :, None] * Qc
            for m in range(l + 3, L + 1):
                Q[l, m] = Qc = sp[m - 1][:, :, None] * (W[m - 2] @ Qc)
        for l in range(1, L):
            d_l, d_m = W[l].shape[1], W[l].shape[0]
            a_l = at[l + 1][:, :d_l]
            Xc[l] = (a_l[:, :, None] * G[l, l + 1].reshape(B, d_l, d_m)).reshape(B, -1)
            Yc[l] = (sp[l][:, :, None] * delta[l + 1][:, None, :]).reshape(B, -1)
    if lowrank:
        G.pop((L - 1, L - 1), None)  # contracted through Vt, rho, u2 instead
    return BlockFeatures(at, delta, sp, G, Q, Xc, Yc, trace, Vt, rho, u2)


def _gram(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A B^T in the compute dtype (the GEMM), returned in the accumulation dtype."""
    return (A @ B.T).to(ACC)


def _dense_cross(bI: torch.Tensor, GI: torch.Tensor, dJ: torch.Tensor, QJ: torch.Tensor) -> torch.Tensor:
    """cross[n, n'] = b_n^T Q_{n'} G_n delta_{n'} for dense Q (l < m - 1)."""
    B, Bp = bI.shape[0], dJ.shape[0]
    d_l = QJ.shape[2]
    P1 = torch.matmul(bI, QJ)  # (B', B, d_l): [n', n, r] = sum_e b_n[e] Q_{n'}[e, r]
    P2 = GI.reshape(B * d_l, -1) @ dJ.T  # (B*d_l, B'): [n r, n'] = (G_n delta_{n'})[r]
    return torch.einsum("knr,nrk->nk", P1, P2.reshape(B, d_l, Bp)).to(ACC)


def _psi(VI: torch.Tensor, VJ: torch.Tensor) -> torch.Tensor:
    """Psi[n, i, n', j] = (V_n^T V_n')[i, j] from stacked V^T, (B, C, d) and (B', C, d);
    the GEMM in the compute dtype, the result in the accumulation dtype."""
    B, C, d = VI.shape
    return _gram(VI.reshape(B * C, d), VJ.reshape(-1, d)).reshape(B, C, VJ.shape[0], C)


def _pair_sum_ggn(prob: TorchProblem, FI: BlockFeatures, FJ: BlockFeatures) -> torch.Tensor:
    """GGN: out[l, m] = sum alpha_l beta_m <Psi_l, Psi_m>."""
    assert FI.Vt is not None and FJ.Vt is not None
    L = prob.n_layers
    out = torch.zeros((L, L), dtype=ACC, device=prob.device)
    alphas = {l: _gram(FI.at[l], FJ.at[l]) for l in range(1, L + 1)}
    B, C = FI.Vt[L].shape[:2]
    step = _chunk_rows(B, FJ.Vt[L].shape[0], C, L)
    for r0 in range(0, B, step):
        rows = slice(r0, r0 + step)
        psi = {l: _psi(FI.Vt[l][rows], FJ.Vt[l]) for l in range(1, L + 1)}
        for l in range(1, L + 1):
            for m in range(l, L + 1):
                K = torch.einsum("aibj,aibj->ab", psi[l], psi[m])
                out[l - 1, m - 1] += torch.sum(alphas[l][rows] * alphas[m][rows] * K)
    return out


def _lowrank_diag_term(FI: BlockFeatures, FJ: BlockFeatures, l: int, alpha: torch.Tensor) -> torch.Tensor:
    """<M, M'> = |V^T V'|^2 + sum rho' |V_k|^2 + sum rho |V'_k|^2 + rho . rho', weighted by alpha^2
    (a float64 scalar tensor)."""
    assert FI.Vt is not None and FJ.Vt is not None
    inner = _gram(FI.u2, FJ.rho) + _gram(FI.rho, FJ.u2) + _gram(FI.rho, FJ.rho)
    B, C = FI.Vt[l].shape[:2]
    total = torch.zeros((), dtype=ACC, device=alpha.device)
    step = _chunk_rows(B, FJ.Vt[l].shape[0], C, 1)
    for r0 in range(0, B, step):
        rows = slice(r0, r0 + step)
        psi = _psi(FI.Vt[l][rows], FJ.Vt[l])
        K = torch.einsum("aibj,aibj->ab", psi, psi)
        total += torch.sum(alpha[rows] ** 2 * (K + inner[rows]))
    return total


def pair_sum(prob: TorchProblem, FI: BlockFeatures, FJ: BlockFeatures) -> torch.Tensor:
    """out[l-1, m-1] = sum_{n in I, n' in J} kappa_lm(n, n') for l <= m (zero below the diagonal),
    a float64 (L, L) tensor on the compute device (no host synchronisation)."""
    L = prob.n_layers
    if prob.structured and not prob.hessian:
        return _pair_sum_ggn(prob, FI, FJ)
    lowrank = prob.structured and L >= 2
    out = torch.zeros((L, L), dtype=ACC, device=prob.device)
    for l in range(1, L + 1):
        alpha = _gram(FI.at[l], FJ.at[l])
        for m in range(l, L + 1):
            if l == m and lowrank and l == L - 1:
                out[l - 1, m - 1] = _lowrank_diag_term(FI, FJ, l, alpha)
                continue
            KG = _gram(FI.G[l, m], FJ.G[l, m])
            if l == m:
                out[l - 1, m - 1] = torch.sum(alpha * alpha * KG)
                continue
            inner = _gram(FI.at[m], FJ.at[m]) * KG
            if prob.hessian:
                gamma = _gram(FI.delta[m], FJ.delta[m])
                if m == l + 1:
                    inner += gamma * _gram(FI.sp[l], FJ.sp[l])
                    inner += _gram(FI.X[l], FJ.Y[l]) + _gram(FI.Y[l], FJ.X[l])
                else:
                    QI, QJ = FI.Q[l, m], FJ.Q[l, m]
                    inner += gamma * _gram(QI.reshape(QI.shape[0], -1), QJ.reshape(QJ.shape[0], -1))
                    d_prev = QI.shape[1]
                    inner += _dense_cross(FI.at[m][:, :d_prev], FI.G[l, m], FJ.delta[m], QJ)
                    inner += _dense_cross(FJ.at[m][:, :d_prev], FJ.G[l, m], FI.delta[m], QI).T
            out[l - 1, m - 1] = torch.sum(alpha * inner)
    return out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def moments(prob: TorchProblem, progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unnormalised moments per parameter block, as the C++ core and the NumPy backend return them.

    (trace[l] = sum_n tr H_n^{ll}, blocks[l, m] = sum_{n,n'} <H_n^{lm}, H_n'^{lm}> for l <= m),
    as float64 NumPy arrays.  ``progress(done, total)`` is called after each group of block
    pairs, once that work has finished on the device.
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

    with torch.no_grad():
        block_trace = torch.zeros((nb, L), dtype=ACC, device=dev)
        row_sum = torch.zeros((nb, L, L), dtype=ACC, device=dev)  # row i: sum over j >= i, j increasing
        done, total_pairs = 0, nb * (nb + 1) // 2
        for g0 in range(0, nb, group):
            rows = {i: features(i) for i in range(g0, min(g0 + group, nb))}
            for i, f in rows.items():
                block_trace[i] = f.trace
            for h0 in range(g0, nb, group):
                cols = rows if h0 == g0 else {j: features(j) for j in range(h0, min(h0 + group, nb))}
                for i, fi in rows.items():
                    for j, fj in cols.items():
                        if j >= i:
                            s = pair_sum(prob, fi, fj)
                            row_sum[i] += s if i == j else 2.0 * s
                            done += 1
                del cols
                if progress is not None:
                    _synchronize(dev)
                    progress(done, total_pairs)
            del rows
        bt, rs = block_trace.cpu().numpy(), row_sum.cpu().numpy()
    trace, blocks = np.zeros(L), np.zeros((L, L))
    for k in range(nb):
        trace += bt[k]
        blocks += rs[k]
    return trace, blocks


# --------------------------------------------------------------------------------------
# curvature-vector products (hvp, eigsh, bound(exact=..., certify=...))
# --------------------------------------------------------------------------------------

#: _hvp.block_hvp's array operations on tensors.
TORCH_OPS = ArrayOps(evaluate, lambda z: torch.softmax(z, dim=1), torch.zeros_like)
#: Share of memory_limit that X and the labels may take when kept on the device between products.
RESIDENT_DATA_SHARE = 0.25


def hvp_products(prob: TorchProblem, k: int, batch_size: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """The unnormalised product V (k', P) -> sum_n H_n V[j] on ``prob.device``, as a function
    of float64 NumPy arrays (what :func:`wsbound_fast._hvp.make_matvec` wraps).

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

    def products(V: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            Vd = _from_numpy(V).to(device=planned.device, dtype=ACC)
            out = torch.zeros_like(Vd)
            for lo in range(0, N, B):
                hi = min(lo + B, N)
                out += block_hvp(planned, net.W, net.b, data.rows(lo, hi), data.label_rows(lo, hi), Vd, off, TORCH_OPS)
            return out.cpu().numpy()

    return products


# --------------------------------------------------------------------------------------
# cost model of what pair_sum computes (for benchmarks: TFLOP/s reached)
# --------------------------------------------------------------------------------------


def pair_flops(dims: Sequence[int], has_bias: Sequence[bool], hessian: bool, bI: int, bJ: int,
               structured: bool = False) -> int:
    """Floating-point operations of the matrix products in one pair_sum of a bI x bJ block pair.

    Counts 2 flops per multiply-add of every GEMM / batched GEMM / einsum contraction that
    :func:`pair_sum` performs on the path ``structured`` selects, term by term; the
    O(bI * bJ) elementwise products and sums are left out (they are a few per Gram matrix,
    against inner dimensions of d or d^2).
    """
    L = len(dims) - 1
    d = list(dims)
    C = d[L]
    na = [0] + [d[l - 1] + int(has_bias[l - 1]) for l in range(1, L + 1)]  # len(at[l])
    pq = 2 * bI * bJ
    f = 0
    if structured and not hessian:
        for l in range(1, L + 1):
            f += pq * na[l]  # alpha
            f += pq * C * C * d[l]  # Psi_l = V_l^T V_l' (over the row chunks)
        f += pq * C * C * L * (L + 1) // 2  # <Psi_l, Psi_m> (einsum over i, j)
        return int(f)
    lowrank = structured and L >= 2
    for l in range(1, L + 1):
        f += pq * na[l]  # alpha
        for m in range(l, L + 1):
            if l == m and lowrank and l == L - 1:
                f += 3 * pq * d[l]  # u2 rho^T, rho u2^T, rho rho^T
                f += pq * C * C * d[l] + pq * C * C  # Psi, |Psi|^2 (einsum)
                continue
            f += pq * d[l] * d[m]  # KG
            if l == m:
                continue
            f += pq * na[m]  # at[m] Gram
            if not hessian:
                continue
            f += pq * d[m]  # gamma
            if m == l + 1:
                f += pq * d[l]  # sigma' Gram
                f += 2 * pq * d[l] * d[m]  # X Y^T + Y X^T
            else:
                f += pq * d[m - 1] * d[l]  # Q Gram
                # two dense crosses: P1 (b Q), P2 (G delta), and the contraction over r
                f += 2 * (pq * d[m - 1] * d[l] + pq * d[l] * d[m] + pq * d[l])
    return int(f)


def total_pair_flops(dims: Sequence[int], has_bias: Sequence[bool], hessian: bool, n_samples: int,
                     batch_size: int, structured: bool = False) -> int:
    """pair_flops summed over the block pairs I <= J that moments() visits."""
    sizes = [min(batch_size, n_samples - lo) for lo in range(0, n_samples, batch_size)]
    return sum(pair_flops(dims, has_bias, hessian, sizes[i], sizes[j], structured)
               for i in range(len(sizes)) for j in range(i, len(sizes)))
