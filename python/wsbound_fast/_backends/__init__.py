"""Where the engine runs: the compiled core, or the Python engine on NumPy or torch arrays.

This package is the one door to the backends: validation for a backend (torch input stays on
its device for backend="torch"), the moment pass and the curvature-vector product, dispatched
by backend name.  Library-specific code lives in one module per library: ``compiled.py`` (the
C++ core), ``numpy.py`` and ``torch.py`` (device, memory budget, TF32 guard); the algorithm
itself is ``_engine`` (Python) and cpp/wsbound (C++).  torch is optional: ``torch.py`` is
imported only when backend="torch" is asked for.  ``distributed.py`` runs any of them on a
dask.distributed cluster (``client=``; dask is optional and imported only then).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from .._engine.schedule import Moments, ProgressFn
from .._planning.blocks import moments_plan, plan_hvp
from .._problem import torch_input
from .._problem.inputs import adapt_inputs
from .._problem.problem import PART_ALL, PART_BIAS, PART_WEIGHT, Problem
from .._problem.validate import compute_dtype, validate
from . import compiled, distributed, numpy

#: A float64 NumPy matvec V (k, P) -> (k, P), whatever the backend computes on.
Matvec = Callable[[np.ndarray], np.ndarray]


def torch_backend() -> ModuleType:
    """The torch adapter (``_backends/torch.py``), imported on first use: torch is optional."""
    return importlib.import_module(f"{__name__}.torch")


def validate_for(backend: str, layers: Any, X: Any, y: Any, *, activation: Any, curvature: Any, reduction: Any,
                 batch_size: Any = None, threads: Any = None, memory_limit: Any = None, device: Any = None,
                 dtype: Any = None, moments: bool = True, loss: Any = "cross_entropy", params: Any = None,
                 client: Any = None) -> Problem:
    """:func:`adapt_inputs` then validation for ``backend``, shared by bound(), hvp() and eigsh().

    backend="torch": X and y stay tensors on their device and ``validate_torch`` resolves
    ``device``, ``dtype`` and the device's memory budget (importing torch).  Any other
    backend: ``validate`` on NumPy arrays, and ``device=`` is refused; ``dtype`` is left to
    the caller, which knows what float32 means for it.  activation None means the torch
    module's activations; for a list of layers it is required when there are hidden layers.  ``moments``: the problem is for
    the moments (bound(): their memory minimum and thread clamp apply) or, False, for the
    curvature-vector product, which plans its own blocks (:func:`moments_plan`).
    ``client``: a dask.distributed.Client: the plan of the local engine, X possibly a
    dask.array, the device the workers' (:func:`distributed.validate_cluster`).
    """
    if client is not None:
        return distributed.validate_cluster(backend, layers, X, y, client=client, device=device, dtype=dtype,
                                            moments=moments, activation=activation, curvature=curvature,
                                            reduction=reduction, batch_size=batch_size, threads=threads,
                                            memory_limit=memory_limit, loss=loss, params=params)
    with moments_plan(moments):
        if backend == "torch" and device is None and torch_input.is_module(layers):
            device = _module_device(layers, X)
        layers, X, y, activation, params = adapt_inputs(layers, X, y, activation, loss=loss, params=params,
                                                        memory_limit=memory_limit, keep_tensors=backend == "torch")
        kw = dict(activation=activation, curvature=curvature, reduction=reduction,
                  batch_size=batch_size, threads=threads, memory_limit=memory_limit, loss=loss, params=params)
        if backend == "torch":
            return torch_backend().validate_torch(layers, X, y, device=device, dtype=dtype, **kw)
        prob = validate(layers, X, y, backend=backend, **kw)
    if device is not None:
        raise ValueError(f"device= applies to backend='torch' only; got backend={backend!r}")
    return prob


def _module_device(module: Any, X: Any) -> Any:
    """The default device of backend="torch" for a module: X's if X is a tensor, else that of
    the module's first parameter (adapt() turns the weights into NumPy copies, which would
    lose it: a model on "cuda" with NumPy data would otherwise be computed on the CPU)."""
    if torch_input.is_tensor(X):
        return None  # resolve_device takes X's device
    for param in module.parameters():
        return param.device
    return None


def validate_for_products(backend: str, layers: Any, X: Any, y: Any, *, activation: Any, curvature: Any,
                          reduction: Any, threads: Any, memory_limit: Any, device: Any, dtype: Any,
                          loss: Any = "cross_entropy", params: Any = None, client: Any = None) -> Problem:
    """Validation of hvp() and eigsh(): as bound() (torch objects, and for backend="torch" the
    device and its memory budget), then dtype, which must mean float64."""
    prob = validate_for(backend, layers, X, y, activation=activation, curvature=curvature, reduction=reduction,
                        threads=threads, memory_limit=memory_limit, device=device, dtype=dtype, moments=False,
                        loss=loss, params=params, client=client)
    if compute_dtype(dtype) == "float32":
        raise ValueError("dtype='float32' is not available for the curvature-vector product (hvp, eigsh): it is "
                         "computed in float64 on every backend; leave dtype=None")
    return prob


def moments(prob: Problem, backend: str, progress: ProgressFn | None = None,
            cluster: distributed.Cluster | None = None) -> Moments:
    """The moment pass of ``backend`` ("cpp", "numpy" or "torch") on a problem validated for it,
    here or (``cluster``) on the cluster's workers."""
    if cluster is not None:
        return cluster.moments(progress)
    if backend == "cpp":
        return compiled.moments(prob, progress)
    if backend == "numpy":
        return numpy.moments(prob, progress)
    return torch_backend().moments(prob, progress)  # a TorchProblem (validate_torch)


def _products(prob: Problem, backend: str, k: int, batch_size: int | None) -> Matvec:
    """The backend's unnormalised product V (k', P) -> sum_n H_n V[j], planned for k vectors."""
    if backend == "torch":
        return torch_backend().hvp_products(prob, k, batch_size)  # a TorchProblem (validate_torch)
    fn = compiled.hvp if backend == "cpp" else numpy.hvp
    planned = plan_hvp(prob, k, batch_size)
    return lambda V: fn(planned, V)


def selected_columns(prob: Problem) -> np.ndarray | None:
    """The positions of the selected parameters in the model's flat vector (layer by layer, W
    row-major then b), or None for all of them."""
    if prob.parts is None:
        return None
    cols, off = [], 0
    for W, b, part in zip(prob.weights, prob.biases, prob.parts):
        nb = 0 if b is None else b.size
        if part in (PART_ALL, PART_WEIGHT):
            cols.append(np.arange(off, off + W.size))
        if part in (PART_ALL, PART_BIAS) and nb:
            cols.append(np.arange(off + W.size, off + W.size + nb))
        off += W.size + nb
    return np.concatenate(cols)


def make_matvec(prob: Problem, backend: str, k: int = 1, batch_size: int | None = None,
                cluster: distributed.Cluster | None = None) -> Matvec:
    """A function V (k', P) -> the curvature applied to each row, normalised as prob says.

    Backend-agnostic for its callers (hvp(), the Lanczos of eigsh() and bound(exact=...,
    certify=...)): V and the result are float64 NumPy arrays whatever the backend computes on.
    A backend that keeps the Lanczos basis on its device gives the matvec a ``space``
    (_spectral.lanczos.lanczos uses it).  With a parameter subset (``prob.layers_in``) V has
    the selected parameters' P columns: they are placed in the model's vector (zeros elsewhere)
    and the product's selected entries come back, H_SS v.  ``cluster``: the products run on its
    workers, over the blocks its data was cut into (``batch_size`` is then the cluster's).
    """
    products = cluster.products(k) if cluster is not None else _products(prob, backend, k, batch_size)
    scale = 1.0 / prob.divisor if prob.mean else 1.0
    cols = selected_columns(prob)

    def matvec(V: np.ndarray) -> np.ndarray:
        V = np.ascontiguousarray(V, dtype=np.float64)
        if cols is not None:
            full = np.zeros((V.shape[0], prob.n_params_all))
            full[:, cols] = V
            out = products(full)[:, cols]
        else:
            out = products(V)
        if scale != 1.0:
            out *= scale
        if not np.isfinite(out).all():
            raise FloatingPointError("the curvature-vector product overflowed float64; "
                                     "the weights, inputs or v are too large in magnitude")
        return out

    device_space = None if cols is not None else getattr(products, "device_space", None)
    space = None if device_space is None else device_space(scale)
    if space is not None:
        matvec.space = space  # type: ignore[attr-defined]
    return matvec
