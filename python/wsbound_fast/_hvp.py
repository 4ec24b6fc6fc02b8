"""Exact curvature-vector products H v (or GGN v) over the whole data set.

``hvp()`` validates like ``bound()`` and dispatches to the C++ core (``_core.hvp``:
forward pass, forward R-propagation and backward pass with the second-order terms,
Pearlmutter 1994, streamed over blocks of samples), to the NumPy fallback below, which
implements the same algorithm block by block (:func:`block_hvp`), or to the torch backend
(``_torch_backend.hvp_products``), which runs that same :func:`block_hvp` on tensors.
Blocks are summed in block order, so for a fixed batch size the result does not depend on
the number of threads.  :func:`make_matvec` wraps any backend as the float64 NumPy matvec
that the Lanczos of ``eigsh`` and ``bound(exact=..., certify=...)`` run on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._activations import Activation, evaluate
from ._numpy_backend import a_times, delta_last, label_rows, softmax_ref
from . import _torch
from ._validate import HVP_BACKENDS, Problem, _choice, _positive_int, _real_array, compute_dtype

#: Samples per block of the curvature-vector product when the caller does not choose.
_HVP_TARGET_BATCH = 256

Matvec = Callable[[np.ndarray], np.ndarray]


def _state_doubles(prob: Problem) -> int:
    """Float64 values held per sample of a block (forward state and one direction)."""
    dims = [prob.weights[0].shape[1]] + [w.shape[0] for w in prob.weights]
    return dims[0] + 10 * sum(dims[1:])


def plan_hvp(prob: Problem, k: int, batch_size: int | None, *, target_batch: int = _HVP_TARGET_BATCH) -> Problem:
    """The problem with batch size and threads set for products with k vectors.

    The C++ core holds one (k, P) buffer per concurrently processed block and one block's
    state per thread; threads are reduced until both fit in the memory limit.  The torch
    backend plans with one thread (one block at a time) and, on an accelerator, a larger
    ``target_batch``.
    """
    N, P = prob.n_samples, prob.n_params
    per_sample = _state_doubles(prob)
    batch = min(N, target_batch) if batch_size is None else min(batch_size, N)
    threads = max(1, min(prob.threads, math.ceil(N / batch)))
    while threads > 1 and 8 * threads * (k * P + batch * per_sample) > prob.memory_limit:
        threads -= 1
    if batch_size is None:
        while batch > 16 and 8 * threads * batch * per_sample > prob.memory_limit // 2:
            batch //= 2
    return dataclasses.replace(prob, batch_size=batch, threads=threads)


def validate_vectors(v: Any, n_params: int, name: str = "v") -> tuple[np.ndarray, bool]:
    """v (an array or a tensor on any device) as a C-contiguous float64 (k, P) array, and
    whether it was one vector (P,)."""
    if _torch.is_tensor(v):
        v = _torch.tensor_to_numpy(v, copy=False)
    arr = _real_array(v, name)
    if arr.ndim == 1:
        if arr.shape[0] != n_params:
            raise ValueError(f"{name} must have shape ({n_params},) or ({n_params}, k) (P = {n_params} parameters); "
                             f"got shape {arr.shape}")
        single = True
        arr = arr[None, :]
    elif arr.ndim == 2:
        if arr.shape[0] != n_params or arr.shape[1] < 1:
            raise ValueError(f"{name} must have shape ({n_params},) or ({n_params}, k) with k >= 1 "
                             f"(P = {n_params} parameters); got shape {arr.shape}")
        single = False
        arr = arr.T
    else:
        raise ValueError(f"{name} must be a vector ({n_params},) or a matrix ({n_params}, k); got shape {arr.shape}")
    out = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return out, single


# --------------------------------------------------------------------------------------
# backends: V is (k, P) C-contiguous float64; they return sum_n H_n V[j] as (k, P)
# --------------------------------------------------------------------------------------


def _hvp_cpp(prob: Problem, V: np.ndarray) -> np.ndarray:
    from . import _load_core

    return _load_core().hvp(
        list(prob.weights), list(prob.biases), [a.code for a in prob.activations],
        [a.param for a in prob.activations], prob.X, prob.labels, V, prob.hessian, prob.batch_size, prob.threads,
    )


def offsets(prob: Problem) -> list[int]:
    """Where each layer's parameters (W row-major, then b) start in the flat vector; P last."""
    off = [0]
    for W, b in zip(prob.weights, prob.biases):
        off.append(off[-1] + W.size + (0 if b is None else b.size))
    return off


@dataclasses.dataclass(frozen=True)
class ArrayOps:
    """The operations of :func:`block_hvp` that NumPy and torch spell differently.

    Everything else it uses (``@``, ``.T``, slicing, ``reshape``, ``ravel``,
    ``sum(axis=..., keepdims=...)``, broadcasting, in-place ``+=``) is common to both.
    """

    evaluate: Callable[[Activation, Any], tuple[Any, Any, Any]]  # (sigma, sigma', sigma'') of z
    xp: Any  # the array library (numpy or torch), for the softmax helpers of _numpy_backend
    zeros_like: Callable[[Any], Any]


NUMPY_OPS = ArrayOps(evaluate, np, np.zeros_like)


def block_hvp(prob: Problem, W: Sequence[Any], bias: Sequence[Any], Xb: Any, Yb: Any, V: Any, off: list[int],
              ops: ArrayOps = NUMPY_OPS) -> Any:
    """sum over the block of H_n V[j] (mirrors cpp/wsbound/hvp.cpp; layers 1..L).

    One implementation for both array libraries: ``W``, ``bias`` (entries None for layers
    without bias), ``Xb`` (B, d_0), ``Yb`` (B, C) label rows and ``V`` (k, P) are all NumPy
    arrays (``ops`` = :data:`NUMPY_OPS`) or all tensors on one device (the torch backend's
    ops); the result is a (k, P) array of the same kind.  ``off`` is :func:`offsets`.
    """
    L, hess = prob.n_layers, prob.hessian
    nw = [0] + [Wl.shape[0] * Wl.shape[1] for Wl in W]  # entries of W_l (torch's .size is a method)
    A: list[Any] = [Xb]
    S1: list[Any] = [None] * (L + 1)
    S2: list[Any] = [None] * (L + 1)
    z = Xb
    for l in range(1, L + 1):
        z = A[l - 1] @ W[l - 1].T
        if bias[l - 1] is not None:
            z = z + bias[l - 1]
        if l < L:
            a, S1[l], S2[l] = ops.evaluate(prob.activations[l - 1], z)
            A.append(a)
    sm = softmax_ref(z, ops.xp)  # the reference class r = argmax z (docs/numerics.md section 1)
    w = Yb.sum(axis=1)
    D: list[Any] = [None] * (L + 1)
    G: list[Any] = [None] * (L + 1)
    D[L] = delta_last(sm, w, Yb, ops.xp)
    for l in range(L - 1, 0, -1):
        G[l] = D[l + 1] @ W[l]
        D[l] = S1[l] * G[l]
    out = ops.zeros_like(V)
    for j in range(V.shape[0]):
        v = V[j]
        Vl = [v[off[l - 1]: off[l - 1] + nw[l]].reshape(W[l - 1].shape) for l in range(1, L + 1)]
        RZ: list[Any] = [None] * (L + 1)
        RA: list[Any] = [None] * (L + 1)
        for l in range(1, L + 1):
            rz = A[l - 1] @ Vl[l - 1].T
            if l > 1:
                rz += RA[l - 1] @ W[l - 1].T
            if bias[l - 1] is not None:
                rz += v[off[l - 1] + nw[l]: off[l]]
            RZ[l] = rz
            if l < L:
                RA[l] = S1[l] * rz
        RD: list[Any] = [None] * (L + 1)
        RD[L] = a_times(sm, w, RZ[L], ops.xp)  # A R{z_L}, shifted to r: no cancellation when p saturates
        for l in range(L - 1, 0, -1):
            T = RD[l + 1] @ W[l]
            if hess:
                T += D[l + 1] @ Vl[l]
                RD[l] = S1[l] * T + S2[l] * RZ[l] * G[l]
            else:
                RD[l] = S1[l] * T
        for l in range(1, L + 1):
            gW = RD[l].T @ A[l - 1]
            if hess and l > 1:
                gW += D[l].T @ RA[l - 1]
            out[j, off[l - 1]: off[l - 1] + nw[l]] = gW.ravel()
            if bias[l - 1] is not None:
                out[j, off[l - 1] + nw[l]: off[l]] = RD[l].sum(axis=0)
    return out


def _hvp_numpy(prob: Problem, V: np.ndarray) -> np.ndarray:
    off = offsets(prob)
    N, B = prob.n_samples, prob.batch_size
    out = np.zeros_like(V)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for lo in range(0, N, B):
            hi = min(lo + B, N)
            out += block_hvp(prob, prob.weights, prob.biases, np.asarray(prob.X[lo:hi], dtype=np.float64),
                             label_rows(prob, lo, hi), V, off)
    return out


_BACKENDS = {"cpp": _hvp_cpp, "numpy": _hvp_numpy}


def _products(prob: Problem, backend: str, k: int, batch_size: int | None) -> Matvec:
    """The backend's unnormalised product V (k', P) -> sum_n H_n V[j], planned for k vectors."""
    if backend == "torch":
        from ._torch_backend import hvp_products

        return hvp_products(prob, k, batch_size)  # type: ignore[arg-type]  # a TorchProblem (validate_torch)
    fn = _BACKENDS[backend]
    planned = plan_hvp(prob, k, batch_size)
    return lambda V: fn(planned, V)


def make_matvec(prob: Problem, backend: str, k: int = 1, batch_size: int | None = None) -> Matvec:
    """A function V (k', P) -> the curvature applied to each row, normalised as prob says.

    Backend-agnostic for its callers (:func:`hvp`, the Lanczos of :func:`eigsh` and
    ``bound(exact=..., certify=...)``): V and the result are float64 NumPy arrays whatever
    the backend computes on.
    """
    products = _products(prob, backend, k, batch_size)
    scale = 1.0 / prob.n_samples if prob.mean else 1.0

    def matvec(V: np.ndarray) -> np.ndarray:
        out = products(np.ascontiguousarray(V, dtype=np.float64))
        if scale != 1.0:
            out *= scale
        if not np.isfinite(out).all():
            raise FloatingPointError("the curvature-vector product overflowed float64; "
                                     "the weights, inputs or v are too large in magnitude")
        return out

    on_device = getattr(products, "on_device", None)
    if on_device is not None and getattr(prob, "device", None) is not None and \
            (prob.device.type != "cpu" or _DEVICE_BASIS_ON_CPU):  # type: ignore[attr-defined]
        from ._torch_backend import DeviceSpace

        matvec.space = DeviceSpace(on_device, scale, prob)  # type: ignore[attr-defined]  # see _lanczos.lanczos
    return matvec


#: Tests only: give the torch backend's Lanczos its device space on the CPU as well (it is
#: used off the CPU only, where the host basis would cost a transfer and a host pass per step).
_DEVICE_BASIS_ON_CPU = False


def validate_for_products(backend: str, layers: Any, X: Any, y: Any, *, activation: Any, curvature: Any,
                          reduction: Any, threads: Any, memory_limit: Any, device: Any, dtype: Any) -> Problem:
    """Validation of :func:`hvp` and :func:`eigsh`: as :func:`bound` (torch objects, and for
    backend="torch" the device and its memory budget), then dtype, which must mean float64."""
    prob = _torch.validate_for(backend, layers, X, y, activation=activation, curvature=curvature,
                               reduction=reduction, threads=threads, memory_limit=memory_limit, device=device,
                               dtype=dtype, moments=False)
    if compute_dtype(dtype) == "float32":
        raise ValueError("dtype='float32' is not available for the curvature-vector product (hvp, eigsh): it is "
                         "computed in float64 on every backend; leave dtype=None")
    return prob


def hvp(layers: Any, X: Any, y: Any, v: Any, *, activation: Any = None, curvature: str = "hessian",
        reduction: str = "mean", batch_size: int | None = None, threads: int | None = None,
        backend: str = "cpp", memory_limit: int | None = None, device: Any = None, dtype: Any = None) -> np.ndarray:
    """Exact curvature-vector product H v (or G v for the GGN) of the loss over the data set.

    Same conventions as :func:`bound` (parameters ordered layer by layer, W row-major then
    b, as ``torch.nn.Sequential.parameters()``).  ``v`` is one vector (P,) or k vectors as
    the columns of a (P, k) array (or tensor, on any device); the result is a float64 NumPy
    array of the same shape.  Computed exactly (to float64 rounding) by R-propagation,
    streamed over blocks of ``batch_size`` samples (default 256; results are bitwise
    identical for any ``threads`` at a fixed batch size), in O(k N P) time and
    O(P k + batch x widths) memory.

    ``backend``: "cpp" (compiled core, threads), "numpy" (the same algorithm in NumPy) or
    "torch" (the same algorithm on torch tensors, CPU or GPU).  For "torch", ``device``
    is where to compute (default: the device of X, or of the weights, if they are tensors,
    else the CPU), ``memory_limit`` is the budget on that device (as for :func:`bound`),
    the default block on a GPU is larger (up to 2048 samples) and ``threads`` does not
    apply.  ``dtype`` may only be None or "float64": the product is always float64
    (float32 raises ValueError).  ``device=`` with another backend raises ValueError.
    """
    which = _choice(backend, "backend", HVP_BACKENDS)
    prob = validate_for_products(which, layers, X, y, activation=activation, curvature=curvature,
                                 reduction=reduction, threads=threads, memory_limit=memory_limit, device=device,
                                 dtype=dtype)
    batch = None if batch_size is None else _positive_int(batch_size, "batch_size")
    V, single = validate_vectors(v, prob.n_params)
    out = make_matvec(prob, which, V.shape[0], batch)(V)
    return out[0] if single else np.ascontiguousarray(out.T)
