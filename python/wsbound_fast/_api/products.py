"""hvp() and eigsh(): the exact curvature-vector product and Lanczos over it."""

from __future__ import annotations

import contextlib
import numbers
import warnings
from typing import Any

import numpy as np

from .._backends import distributed, make_matvec, validate_for_products
from .._planning.blocks import plan_hvp
from .._problem import torch_input
from .._problem.problem import HVP_BACKENDS
from .._problem.validate import _choice, _positive_int, _real_array
from .._spectral.lanczos import (
    WHICH,
    _seed,
    _tol,
    basis_memory_limit,
    default_maxiter,
    lanczos,
    select_indices,
)


def validate_vectors(v: Any, n_params: int, name: str = "v") -> tuple[np.ndarray, bool]:
    """v (an array or a tensor on any device) as a C-contiguous float64 (k, P) array, and
    whether it was one vector (P,)."""
    if torch_input.is_tensor(v):
        v = torch_input.tensor_to_numpy(v, copy=False)
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


def hvp(layers: Any, X: Any, y: Any = None, v: Any = None, *, activation: Any = None, curvature: str = "hessian",
        reduction: str | None = None, batch_size: int | None = None, threads: int | None = None,
        backend: str = "cpp", memory_limit: int | None = None, device: Any = None, dtype: Any = None,
        loss: Any = "cross_entropy", params: Any = None, client: Any = None) -> np.ndarray:
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
    ``loss``, ``reduction`` (None: the loss module's, else "mean") and ``params`` (the
    parameter subset; v and the result then have its P entries) are as for :func:`bound`.
    ``client``: a ``dask.distributed.Client``: the product runs on the cluster's workers (X may be
    a dask.array), one task per group of consecutive blocks (a partition fixed by N and the block
    size, not by the workers) whose partials are added in a fixed tree: the same bits for any
    number of workers, and the local product's value to rounding.
    """
    if v is None:
        raise TypeError("hvp() needs v, the vector (P,) or vectors (P, k) to multiply (by keyword, v=..., when X is "
                        "a loader of (X, y) batches)")
    which = _choice(backend, "backend", HVP_BACKENDS)
    prob = validate_for_products(which, layers, X, y, activation=activation, curvature=curvature,
                                 reduction=reduction, threads=threads, memory_limit=memory_limit, device=device,
                                 dtype=dtype, loss=loss, params=params, client=client)
    batch = None if batch_size is None else _positive_int(batch_size, "batch_size")
    V, single = validate_vectors(v, prob.n_params)
    with _cluster(client, prob, which, V.shape[0], batch, device, threads, memory_limit) as cluster:
        out = make_matvec(prob, which, V.shape[0], batch, cluster=cluster)(V)
    return out[0] if single else np.ascontiguousarray(out.T)


def _cluster(client: Any, prob: Any, backend: str, k: int, batch: int | None, device: Any,
             threads: Any, memory_limit: Any) -> Any:
    """The problem's data on the cluster, cut into the local product's blocks (or nothing)."""
    if client is None:
        return contextlib.nullcontext()
    size = plan_hvp(prob, k, batch).batch_size
    return distributed.Cluster(client, prob, backend, device=device, threads=threads, batch=size,
                               memory_limit=memory_limit)


def eigsh(layers: Any, X: Any, y: Any = None, k: int = 1, which: str = "LA", *, activation: Any = None,
          curvature: str = "hessian", reduction: str | None = None, tol: float = 1e-10, maxiter: int | None = None,
          seed: int = 0, return_eigenvectors: bool = False, batch_size: int | None = None,
          threads: int | None = None, backend: str = "cpp", memory_limit: int | None = None, device: Any = None,
          dtype: Any = None, loss: Any = "cross_entropy", params: Any = None, client: Any = None) -> Any:
    """Extreme eigenvalues (and vectors) of the loss Hessian or GGN by Lanczos.

    Lanczos with full reorthogonalisation over the exact curvature-vector product
    (:func:`hvp`, same arguments and conventions as :func:`bound`).

    Parameters
    ----------
    k : number of eigenvalues, 1 <= k <= P.
    which : "LA" (largest algebraic), "SA" (smallest algebraic), "BE" (both ends: k // 2
        from the bottom, the rest from the top) or "LM" (largest magnitude).
    tol : stop when every wanted Ritz pair has residual |H y - theta y| <= tol * max|theta|
        (an eigenvalue of H lies within that residual of theta).
    maxiter : at most this many Lanczos steps (curvature-vector products); default
        min(P, max(300, 10 k)), reduced so that the basis (maxiter * P float64 values) takes
        at most half of ``memory_limit``.
    seed : the random start vector; the result is deterministic for a seed.
    return_eigenvectors : also return the unit Ritz vectors as the columns of a (P, k) array.
    loss, reduction, params : as for :func:`bound`.
    backend, device, dtype, batch_size, threads, memory_limit : as for :func:`hvp`, which
        computes the products ("cpp", "numpy" or "torch" on ``device``, e.g. "cuda"; float64
        only).  The Lanczos basis and its reorthogonalisation stay in host memory (NumPy),
        except for "torch" on a GPU, where they stay on the device with the product when
        maxiter vectors take at most a quarter of ``memory_limit`` there (only scalars cross
        per step); otherwise one (P,) vector goes to the device and back per step.
    client : a ``dask.distributed.Client``: every product runs on the cluster (as for
        :func:`hvp`; the data is sent once), Lanczos stays here.

    Returns
    -------
    The k Ritz values in ascending order (as scipy.sparse.linalg.eigsh), or (values, vectors).
    Every Ritz value lies between lambda_min and lambda_max of H (a Rayleigh quotient), so
    the largest is a certified lower bound on lambda_max.  If the wanted pairs have not
    converged within ``maxiter`` steps, a RuntimeWarning says so and the current Ritz
    pairs are returned.
    """
    which_b = _choice(backend, "backend", HVP_BACKENDS)
    prob = validate_for_products(which_b, layers, X, y, activation=activation, curvature=curvature,
                                 reduction=reduction, threads=threads, memory_limit=memory_limit, device=device,
                                 dtype=dtype, loss=loss, params=params, client=client)
    P = prob.n_params
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an integer, the number of eigenvalues; got {k!r}")
    if not 1 <= int(k) <= P:
        raise ValueError(f"k must satisfy 1 <= k <= P = {P} (the number of parameters); got {k}")
    k = int(k)
    if not isinstance(which, str):
        raise TypeError(f"which must be a string, one of {', '.join(map(repr, WHICH))}; got {which!r}")
    wh = which.strip().upper()
    if wh not in WHICH:
        raise ValueError(f"which must be one of {', '.join(map(repr, WHICH))}; got {which!r}")
    t = _tol(tol)
    mi = default_maxiter(P, k, basis_memory_limit(prob)) if maxiter is None else _positive_int(maxiter, "maxiter")
    if mi < k and mi < P:
        raise ValueError(f"maxiter must be >= k = {k} (each step adds one Ritz pair); got {mi}")
    s = _seed(seed)
    batch = None if batch_size is None else _positive_int(batch_size, "batch_size")
    if not isinstance(return_eigenvectors, (bool, np.bool_)):
        raise TypeError(f"return_eigenvectors must be True or False; got {return_eigenvectors!r}")
    with _cluster(client, prob, which_b, 1, batch, device, threads, memory_limit) as cluster:
        matvec = make_matvec(prob, which_b, 1, batch, cluster=cluster)
        res = lanczos(matvec, P, wanted=lambda th: select_indices(th, wh, k), n_wanted=k, tol=t, maxiter=mi,
                      rng=np.random.default_rng(s))
    idx = select_indices(res.theta, wh, k)
    if not res.converged:
        warnings.warn(
            f"eigsh: {k} Ritz pair(s) ({wh}) did not reach tol={t:g} in maxiter={mi} Lanczos steps "
            f"(largest residual {float(res.residuals[idx].max()):.3g}); returning the current Ritz values, "
            "which are Rayleigh quotients (inside [lambda_min, lambda_max]) but not yet accurate",
            RuntimeWarning, stacklevel=2)
    values = res.theta[idx].copy()
    if return_eigenvectors:
        return values, res.vectors(idx)
    return values
