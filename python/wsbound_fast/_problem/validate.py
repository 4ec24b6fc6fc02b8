"""Input validation and normalisation, shared by every backend.

Every input error is raised here, before any work, with a message that names the
argument and says what was expected.  The result is a :class:`Problem`: float64
C-contiguous weights, resolved activations, X as given (float32 or float64, any
layout; integer X is converted once to float64), labels as int64 indices or float64
probability rows, and the block plan (batch size, blocks cached at once).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._planning.blocks import (
    default_memory_limit,
    default_threads,
    min_memory_cpp,
    min_memory_python,
    moments_plan_active,
    plan_blocks,
    plan_cpp,
    plan_python,
)
from .._planning.cost import choose_structured
from .activations import validate_activations
from .losses import resolve_loss, smoothed_rows, validate_targets
from .problem import (
    BACKENDS,
    CURVATURES,
    PART_ALL,
    PART_BIAS,
    PART_NONE,
    PART_WEIGHT,
    REDUCTIONS,
    Problem,
)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real_array(value: Any, name: str) -> np.ndarray:
    """np.asarray(value) that refuses anything but real numbers."""
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be an array of real numbers; could not convert: {exc}") from None
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers (integer or floating dtype); got dtype {arr.dtype}")
    return arr


def _check_finite(arr: np.ndarray, name: str) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or Inf")


def _float64(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr, dtype=np.float64)


#: Appended where the shapes say a layer was given as (d_in, d_out), as Flax and Keras store kernels.
_TRANSPOSED = ("; layers[{i}] weight W looks like (d_in, d_out) (a Flax/Keras kernel): pass W.T, "
               "the (d_out, d_in) layout of torch.nn.Linear")


def validate_layers(layers: Any) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray | None, ...]]:
    if isinstance(layers, (str, bytes, np.ndarray)) or not isinstance(layers, Sequence):
        raise TypeError("layers must be a sequence of (W, b) pairs, W of shape (d_out, d_in), b of shape (d_out,) or None")
    if len(layers) == 0:
        raise ValueError("layers must hold at least one (W, b) pair; got an empty sequence")
    weights: list[np.ndarray] = []
    biases: list[np.ndarray | None] = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, (tuple, list)) or len(layer) != 2:
            raise TypeError(f"layers[{i}] must be a (W, b) pair; got {type(layer).__name__}")
        W = _real_array(layer[0], f"layers[{i}] weight W")
        if W.ndim != 2 or W.shape[0] < 1 or W.shape[1] < 1:
            raise ValueError(f"layers[{i}] weight W must be a non-empty 2-D array (d_out, d_in); got shape {W.shape}")
        _check_finite(W, f"layers[{i}] weight W")
        if weights and W.shape[1] != weights[-1].shape[0]:
            raise ValueError(
                f"layer shapes do not chain: layers[{i}] weight W has shape {W.shape}, so it expects "
                f"{W.shape[1]} inputs, but layers[{i - 1}] has {weights[-1].shape[0]} outputs"
                + (_TRANSPOSED.format(i=i) if W.shape[0] == weights[-1].shape[0] else "")
            )
        weights.append(_float64(W))
        if layer[1] is None:
            biases.append(None)
            continue
        b = _real_array(layer[1], f"layers[{i}] bias b")
        if b.shape != (W.shape[0],):
            raise ValueError(f"layers[{i}] bias b must have shape ({W.shape[0]},) or be None; got shape {b.shape}"
                             + (_TRANSPOSED.format(i=i) if b.shape == (W.shape[1],) else ""))
        _check_finite(b, f"layers[{i}] bias b")
        biases.append(_float64(b))
    return tuple(weights), tuple(biases)


def check_X_shape(shape: tuple[int, ...], d_in: int) -> None:
    """X's shape checks, shared by arrays and tensors (same messages, same order)."""
    if len(shape) != 2:
        raise ValueError(f"X must be a 2-D array (n_samples, {d_in}); got shape {shape}")
    if shape[0] == 0:
        raise ValueError("X is empty: it must hold at least one sample")
    if shape[1] != d_in:
        raise ValueError(f"X has {shape[1]} features per sample but layers[0] expects {d_in}")


def validate_X(X: Any, d_in: int) -> np.ndarray:
    arr = _real_array(X, "X")
    check_X_shape(arr.shape, d_in)
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)  # integer pixels and the like: one explicit conversion
    _check_finite(arr, "X")
    if any(s % arr.itemsize for s in arr.strides):
        arr = np.ascontiguousarray(arr)  # byte strides that are not whole elements (rare)
    return arr


def validate_labels(y: Any, n_samples: int, n_classes: int) -> tuple[np.ndarray, bool]:
    arr = _real_array(y, "y")
    if arr.ndim == 1:
        if arr.shape[0] != n_samples:
            raise ValueError(f"y must have one label per sample ({n_samples}); got {arr.shape[0]}")
        if arr.dtype.kind == "f":
            _check_finite(arr, "y")
            if not np.all(arr == np.round(arr)):
                raise ValueError("y must hold integer class indices (or be an (N, C) array of probability rows); got non-integer values")
        if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
            raise ValueError(
                f"y holds class indices out of range: expected 0 <= y < {n_classes} (the last layer's outputs); "
                f"got min {arr.min()}, max {arr.max()}"
            )
        return np.ascontiguousarray(arr, dtype=np.int64), False
    if arr.ndim == 2:
        if arr.shape != (n_samples, n_classes):
            raise ValueError(
                f"y as probability rows must have shape ({n_samples}, {n_classes}) (samples, classes); got {arr.shape}"
            )
        soft = _float64(arr)
        _check_finite(soft, "y")
        if (soft < 0).any():
            raise ValueError("y (soft labels) must be non-negative; found negative entries")
        sums = soft.sum(axis=1)
        bad = np.abs(sums - 1.0) > 1e-6
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"y (soft labels): every row must sum to 1; row {i} sums to {sums[i]!r}")
        return soft, True
    raise ValueError(f"y must be (N,) class indices or (N, C) probability rows; got shape {arr.shape}")


def _choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {', '.join(map(repr, allowed))}; got {value!r}")
    key = value.strip().lower()
    if key not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return key


def compute_dtype(dtype: Any) -> str:
    """'float64' or 'float32' from None, a name, or a NumPy dtype; else ValueError/TypeError."""
    if dtype is None:
        return "float64"
    if type(dtype).__module__ == "torch":  # torch.float32 / torch.float64
        dtype = str(dtype).removeprefix("torch.")
    try:
        name = np.dtype(dtype).name
    except TypeError:
        raise TypeError(f"dtype must be 'float64' or 'float32' (or a NumPy dtype); got {dtype!r}") from None
    if name not in ("float64", "float32"):
        raise ValueError(f"dtype must be 'float64' or 'float32'; got {dtype!r}")
    return name


def _positive_int(value: Any, name: str) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be a positive integer or None; got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")
    return int(value)


#: Most worker threads accepted: more is a mistake, not a machine (and the C++ engine takes
#: a C int).  Within it, the plan clamps threads to the work's parallelism and the budget.
MAX_THREADS = 4096


def validate_threads(value: Any) -> int:
    """``threads``: None (every core available) or an integer in [1, MAX_THREADS]."""
    if value is None:
        return default_threads()
    t = _positive_int(value, "threads")
    if t > MAX_THREADS:
        raise ValueError(f"threads must be at most {MAX_THREADS} (worker threads, clamped to the work's "
                         f"parallelism); got {t}")
    return t


def min_memory_limit(layers: Any, curvature: str = "hessian", backend: str = "cpp") -> int:
    """The smallest memory_limit bound() accepts for ``layers`` ((W, b) pairs) on ``backend``:
    the C++ engine's count (:func:`min_memory_cpp`), or the NumPy and torch backends'
    (:func:`min_memory_python`; for torch, on its device)."""
    weights, biases = validate_layers(layers)
    dims = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    has_bias = [b is not None for b in biases]
    hessian = _choice(curvature, "curvature", CURVATURES) == "hessian"
    structured = choose_structured(dims, has_bias, hessian)
    cpp = min_memory_cpp(dims, has_bias, hessian, structured)
    py = min_memory_python(dims, has_bias, hessian, structured)
    return cpp if _choice(backend, "backend", BACKENDS) == "cpp" else py


class Parts(tuple):
    """Resolved per-layer parameter parts (PART_* codes), e.g. from a torch module's
    requires_grad flags; validate_params passes it through."""


def _part(w: bool, b: bool, has_bias: bool) -> int:
    if not has_bias:
        b = w  # a layer without bias: its weights are all of it
    return {(True, True): PART_ALL, (True, False): PART_WEIGHT, (False, True): PART_BIAS,
            (False, False): PART_NONE}[(w, b)]


def validate_params(params: Any, biases: Sequence[Any]) -> tuple[int, ...] | None:
    """``params``: None (every parameter), or which parameters the curvature is taken over: layer
    indices (0-based, as W0/b0 of a model file: the layer's weights and bias), and "W{i}" /
    "b{i}" for a layer's weights or bias alone.  Returns the per-layer parts (PART_* codes), or
    None for all of them."""
    n_layers = len(biases)
    if params is None:
        return None
    if isinstance(params, Parts):
        parts = tuple(params)
    else:
        if isinstance(params, (str, bytes)) or _is_int(params) or not isinstance(params, Sequence | range | set):
            raise TypeError(f"params must be None or a sequence of layer indices (0 .. {n_layers - 1}) and "
                            f"'W<i>' / 'b<i>' names; got {params!r}")
        w_sel, b_sel = [False] * n_layers, [False] * n_layers
        for v in params:
            if isinstance(v, str):
                key = v.strip()
                kind, num = key[:1], key[1:]
                if kind not in ("W", "b") or not num.isdigit():
                    raise ValueError(f"params: {v!r} is not a layer index or a name 'W<i>' / 'b<i>' (the weights or "
                                     "the bias of layer i)")
                layer = int(num)
            elif _is_int(v):
                kind, layer = "", int(v)
            else:
                raise TypeError(f"params: layer indices must be integers (or 'W<i>' / 'b<i>' names); got {v!r}")
            if not 0 <= layer < n_layers:
                raise ValueError(f"params: layer index {layer} is out of range for a model of {n_layers} layers "
                                 f"(0 .. {n_layers - 1})")
            if kind == "b" and biases[layer] is None:
                raise ValueError(f"params: layer {layer} has no bias, so {v!r} names no parameter")
            if kind in ("", "W"):
                w_sel[layer] = True
            if kind in ("", "b"):
                b_sel[layer] = True
        parts = tuple(_part(w, b, biases[l] is not None) for l, (w, b) in enumerate(zip(w_sel, b_sel)))
    if all(p == PART_NONE for p in parts):
        raise ValueError("params selects no parameters: give at least one layer (or leave params=None for all)")
    return None if all(p == PART_ALL for p in parts) else parts


def _drop_ignored(Xa: Any, y: Any, ignore_index: int | None) -> tuple[Any, Any]:
    """Samples whose class index is ``ignore_index`` left out (torch's CrossEntropyLoss), for
    1-D integer targets; X may be an array or a tensor (indexed on its device)."""
    arr = np.asarray(y)
    if ignore_index is None or arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.shape[0] != Xa.shape[0]:
        return Xa, y
    keep = arr != ignore_index
    if keep.all():
        return Xa, y
    if not keep.any():
        raise ValueError(f"y: every sample has the loss's ignore_index ({ignore_index}); nothing is left to compute on")
    idx = np.flatnonzero(keep)
    if type(Xa).__module__.startswith("torch"):
        import torch

        return Xa[torch.as_tensor(idx, device=Xa.device)], arr[idx]
    return Xa[idx], arr[idx]


def validate(layers: Any, X: Any, y: Any, *, activation: Any, curvature: Any, reduction: Any,
             batch_size: Any = None, threads: Any = None, memory_limit: Any = None,
             check_X: Callable[[Any, int], Any] | None = None, backend: str | None = None,
             loss: Any = "cross_entropy", params: Any = None) -> Problem:
    """Validate everything; ``check_X`` replaces :func:`validate_X` (the torch backend checks
    tensors on their own device, with the same errors, instead of copying them to NumPy).
    ``backend``: whose memory the block plan counts ("cpp": the C++ engine's own accounting,
    "numpy": :func:`plan_python`'s).  For these, the moments' plan (unless within
    ``moments_plan(False)``): a memory_limit below what one sample needs is a ValueError
    naming the minimum, and threads are clamped (:func:`plan_cpp`).  None: the C++ engine's
    plan as a default, without those checks, for callers that plan again themselves
    (validate_torch for its device, where plan_python checks the budget; the dense reference).
    """
    weights, biases = validate_layers(layers)
    acts = validate_activations(activation, len(weights))
    Xa = (validate_X if check_X is None else check_X)(X, weights[0].shape[1])
    n_classes = weights[-1].shape[0]
    lossr, reduction = resolve_loss(loss, reduction)
    if lossr.diagonal:
        labels, soft = validate_targets(y, Xa.shape[0], n_classes, lossr.name)
    else:
        if n_classes < 2:
            raise ValueError(f"layers: the last layer must have at least 2 outputs (classes) for cross-entropy; "
                             f"got {n_classes} (for one output use loss='bce' or loss='mse')")
        Xa, y = _drop_ignored(Xa, y, lossr.ignore_index)
        labels, soft = validate_labels(y, Xa.shape[0], n_classes)
        if lossr.label_smoothing:
            labels, soft = smoothed_rows(labels, soft, n_classes, lossr.label_smoothing), True
    curv = _choice(curvature, "curvature", CURVATURES)
    red = _choice(reduction, "reduction", REDUCTIONS)
    batch = None if batch_size is None else _positive_int(batch_size, "batch_size")
    nthreads = validate_threads(threads)
    budget = default_memory_limit() if memory_limit is None else _positive_int(memory_limit, "memory_limit")
    dims = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    has_bias = [b is not None for b in biases]
    hessian = curv == "hessian"
    structured = choose_structured(dims, has_bias, hessian, lossr.diagonal)
    prob = Problem(weights, biases, acts, Xa, labels, soft, hessian, structured, red == "mean",
                   1, nthreads, 1, budget, loss=lossr.name, parts=validate_params(params, biases))
    if backend in ("cpp", None):
        if backend is None or not moments_plan_active():  # a default plan (the caller plans again)
            size, group = plan_blocks(dims, has_bias, Xa.shape[0], hessian, structured, nthreads, batch, budget,
                                      cpp=True, diagonal=lossr.diagonal)
            return dataclasses.replace(prob, batch_size=size, group_blocks=group)
        size, group, nthreads = plan_cpp(dims, has_bias, Xa.shape[0], hessian, structured, nthreads, batch, budget,
                                         lossr.diagonal)
        return dataclasses.replace(prob, batch_size=size, group_blocks=group, threads=nthreads)
    size, group, chunks = plan_python(prob, batch, budget)  # NumPy, torch: one block pair at a time
    return dataclasses.replace(prob, batch_size=size, group_blocks=group, chunks=chunks)
