"""Input validation and normalisation, shared by every backend.

Every input error is raised here, before any work, with a message that names the
argument and says what was expected.  The result is a :class:`Problem`: float64
C-contiguous weights, resolved activations, X as given (float32 or float64, any
layout; integer X is converted once to float64), labels as int64 indices or float64
probability rows, and the block plan (batch size, blocks cached at once).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._activations import ACTIVATIONS, Activation
from ._cost import (
    choose_structured,
    cpp_fixed_doubles,
    cpp_group_doubles,
    cpp_worker_doubles,
    feature_doubles,
    feature_flops,
    feature_scratch_doubles,
    pair_flops,
    pair_scratch_doubles,
)

CURVATURES = ("hessian", "ggn")
REDUCTIONS = ("mean", "sum")
#: Backends of the curvature-vector product (hvp, eigsh, bound(exact=...)).
HVP_BACKENDS = ("cpp", "numpy", "torch")
BACKENDS = ("cpp", "numpy", "torch")

#: Default memory budget for the streamed engine: a quarter of the machine's memory,
#: at most 4 GiB.
_MAX_DEFAULT_BUDGET = 4 << 30
#: Preferred number of samples per block (large enough for efficient GEMMs).
_TARGET_BATCH = 256
#: Largest flop count of one block pair, so that Ctrl-C (checked between block pairs) is
#: honoured within about a second (one core does 1.6e10 flops in ~0.4 s here); smaller
#: blocks make the Gram GEMMs short and slow (deep nets: batch 38 at 4e9, 84 at 1.6e10).
_MAX_PAIR_FLOPS = 1.6e10
#: Smallest block the planner splits N into to give every thread block pairs.
_MIN_BATCH = 32
#: Blocks of features cached at once: enough that recomputing the features of the other
#: groups costs at most 1/_RECOMPUTE_FACTOR of the pair phase by flop count.  Features are
#: per-sample small matrix products, far slower per flop than the pair phase's GEMMs (the
#: digits 64-32-10 Hessian lost 7 % at a factor of 50, nothing measurable at 500).
_RECOMPUTE_FACTOR = 500.0


@dataclass(frozen=True)
class Problem:
    """A validated problem, ready for a backend."""

    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray | None, ...]
    activations: tuple[Activation, ...]
    X: np.ndarray
    labels: np.ndarray
    soft: bool
    hessian: bool
    structured: bool
    mean: bool
    batch_size: int
    threads: int
    group_blocks: int
    memory_limit: int
    single: bool = False  # cpp backend: Gram products in float32, float64 accumulation
    #: NumPy and torch backends, K route: float64 values that the GEMM outputs of a chunk of
    #: sample pairs, and the elementwise work of a sub-chunk, may hold; set by
    #: :func:`plan_python` from the budget.  None: the NumPy backend's cache-sized defaults.
    chunks: tuple[float, float] | None = None

    @property
    def n_layers(self) -> int:
        return len(self.weights)

    @property
    def n_samples(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.weights[-1].shape[0])

    @property
    def n_params(self) -> int:
        return n_params(self.weights, self.biases)

    @property
    def curvature(self) -> str:
        return "hessian" if self.hessian else "ggn"

    @property
    def reduction(self) -> str:
        return "mean" if self.mean else "sum"


def n_params(weights: Sequence[np.ndarray], biases: Sequence[np.ndarray | None]) -> int:
    return int(sum(w.size + (0 if b is None else b.size) for w, b in zip(weights, biases)))


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
            )
        weights.append(_float64(W))
        if layer[1] is None:
            biases.append(None)
            continue
        b = _real_array(layer[1], f"layers[{i}] bias b")
        if b.shape != (W.shape[0],):
            raise ValueError(f"layers[{i}] bias b must have shape ({W.shape[0]},) or be None; got shape {b.shape}")
        _check_finite(b, f"layers[{i}] bias b")
        biases.append(_float64(b))
    return tuple(weights), tuple(biases)


def resolve_activation(spec: Any, where: str) -> Activation:
    param = None
    name = spec
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
        name, param = spec
    if not isinstance(name, str):
        raise TypeError(f"{where} must be an activation name (str) or a (name, parameter) pair; got {spec!r}")
    key = name.strip().lower()
    if key not in ACTIVATIONS:
        raise ValueError(f"{where}: unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")
    code, default = ACTIVATIONS[key]
    if param is None:
        param = default
    elif key != "leaky_relu":
        raise ValueError(f"{where}: activation {key!r} takes no parameter; got {spec!r}")
    elif not isinstance(param, numbers.Real) or isinstance(param, bool) or not math.isfinite(param):
        raise ValueError(f"{where}: the leaky_relu negative slope must be a finite real number; got {param!r}")
    return Activation(key, code, float(param))


def validate_activations(activation: Any, n_layers: int) -> tuple[Activation, ...]:
    n_hidden = n_layers - 1
    if isinstance(activation, str) or (
        isinstance(activation, tuple) and len(activation) == 2 and isinstance(activation[0], str)
        and not isinstance(activation[1], str)
    ):
        act = resolve_activation(activation, "activation")
        return (act,) * n_hidden
    if isinstance(activation, Sequence):
        if len(activation) != n_hidden:
            raise ValueError(
                f"activation: a list must hold one name per hidden layer, {n_hidden} for {n_layers} layers; "
                f"got {len(activation)}"
            )
        return tuple(resolve_activation(a, f"activation[{i}]") for i, a in enumerate(activation))
    raise TypeError(f"activation must be a name (str) or a list of {n_hidden} names; got {type(activation).__name__}")


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


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n:,} bytes ({n / size:.3g} {unit})"
    return f"{n:,} bytes"


#: Whether the plan being made is the moments' (bound(), the default) and its memory minimum
#: and thread clamp apply; the curvature-vector product (hvp, eigsh) plans its own blocks and
#: threads (_hvp.plan_hvp) from the same validated problem, so it validates within
#: ``moments_plan(False)`` (``_torch.validate_for(moments=False)``).  A context variable, so
#: that the torch backend's validation, which calls validate() and plan_python() itself,
#: follows it too.
_MOMENTS_PLAN: contextvars.ContextVar[bool] = contextvars.ContextVar("wsbound_moments_plan", default=True)


@contextlib.contextmanager
def moments_plan(moments: bool) -> Iterator[None]:
    """Within the block, validation plans for the moments (True) or for products (False)."""
    token = _MOMENTS_PLAN.set(bool(moments))
    try:
        yield
    finally:
        _MOMENTS_PLAN.reset(token)


def check_memory_limit(memory_limit: int, minimum: int, what: str) -> None:
    """ValueError naming the minimum when ``memory_limit`` is below it (the engine would have
    to exceed the budget whatever the plan).  Not while validating for products."""
    if memory_limit < minimum and _MOMENTS_PLAN.get():
        raise ValueError(f"memory_limit = {_bytes(memory_limit)} is below what one sample needs: at least "
                         f"{_bytes(minimum)} for this model ({what}); give memory_limit >= {minimum} "
                         "or None for the default")


def min_memory_cpp(dims: Sequence[int], has_bias: Sequence[bool], hessian: bool, structured: bool) -> int:
    """Smallest memory_limit of the C++ engine's moments: its weight copy and fixed part, one
    worker's scratch for one-sample blocks, the features of two one-sample blocks and the
    bookkeeping of one block pair (_cost.cpp_*)."""
    f = feature_doubles(dims, has_bias, hessian, structured)
    return 8 * (cpp_fixed_doubles(dims, has_bias) + cpp_worker_doubles(dims, has_bias, 1, hessian, structured)
                + 2 * f + cpp_group_doubles(len(dims) - 1, 1, 1))


def min_memory_python(dims: Sequence[int], has_bias: Sequence[bool], hessian: bool, structured: bool) -> int:
    """Smallest memory_limit of the NumPy and torch backends' moments: the weights, two
    one-sample blocks' features and their scratch (plan_blocks' count at batch 1); on the K
    route the chunks of sample pairs take KROUTE_SCRATCH_SHARE of the budget on top."""
    P = sum(dims[l - 1] * dims[l] + dims[l] * int(has_bias[l - 1]) for l in range(1, len(dims)))
    f = feature_doubles(dims, has_bias, hessian, structured)
    scratch = (pair_scratch_doubles(dims, 1, hessian, structured, PY_CROSS_COPIES) + int(PY_FEATURE_TEMPORARIES * f)
               + feature_scratch_doubles(dims, hessian, structured))
    need = 8 * (P + 2 * f + scratch)
    if structured:
        need = math.ceil(need / (1.0 - KROUTE_SCRATCH_SHARE))
    return need


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


def _parallelism(n_samples: int, batch: int, group: int) -> int:
    """Most tasks one parallel step of the C++ engine's plan runs: the block pairs of the first
    group with itself, or of two groups (engine.cpp, compute_moments); the features are one
    task per block of a group, never more."""
    nb = math.ceil(n_samples / batch)
    g = min(group, nb)
    return max(g * (g + 1) // 2, g * min(g, nb - g) if nb > g else 0)


def plan_cpp(dims: Sequence[int], has_bias: Sequence[bool], n_samples: int, hessian: bool, structured: bool,
             threads: int, batch_size: int | None, memory_limit: int) -> tuple[int, int, int]:
    """(batch_size, blocks cached at once, threads) of the C++ engine's moments.

    ValueError when ``memory_limit`` is below what one sample needs (:func:`min_memory_cpp`).
    ``threads`` is clamped to the workers the budget holds (each with its scratch and two
    blocks of features for one-sample blocks) and to the most tasks one step of the plan runs
    at once, so that no worker is planned for, or allocated, without work.
    """
    minimum = min_memory_cpp(dims, has_bias, hessian, structured)
    check_memory_limit(memory_limit, minimum, "the weights, one sample's features and one worker's scratch")
    worker = 8 * (cpp_worker_doubles(dims, has_bias, 1, hessian, structured)
                  + 2 * feature_doubles(dims, has_bias, hessian, structured))
    threads = max(1, min(threads, 1 + (memory_limit - minimum) // worker))
    while True:
        batch, group = plan_blocks(dims, has_bias, n_samples, hessian, structured, threads, batch_size, memory_limit,
                                   cpp=True)
        tasks = _parallelism(n_samples, batch, group)
        if tasks >= threads:
            return batch, group, threads
        threads = max(1, tasks)  # fewer threads than planned for: plan again with them


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_memory_limit() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        total = 8 << 30
    return int(min(_MAX_DEFAULT_BUDGET, total // 4))


def plan_blocks(dims: Sequence[int], has_bias: Sequence[bool], n_samples: int, hessian: bool, structured: bool,
                threads: int, batch_size: int | None, memory_limit: int, *,
                target_batch: int = _TARGET_BATCH, max_pair_flops: float = _MAX_PAIR_FLOPS,
                cross_copies: int = 1, feature_temporaries: float = 0.0, feature_scratch: int = 0,
                cpp: bool = False) -> tuple[int, int]:
    """Choose (batch_size, blocks cached at once) within ``memory_limit`` bytes.

    ``target_batch`` and ``max_pair_flops`` shape the preferred block (the torch backend on a
    GPU asks for larger blocks than the CPU backends).  ``cpp``: the C++ engine's accounting
    (_cost.cpp_*: its weight copy, per worker its pair scratch and one block's intermediates,
    its bookkeeping per block and block pair) instead of pair_scratch_doubles.  Otherwise (the
    NumPy and torch backends) ``cross_copies``: see :func:`pair_scratch_doubles`;
    ``feature_temporaries`` (in blocks of features) and ``feature_scratch`` (float64 values
    per sample): what the batched features hold while a block is computed, beyond the
    features kept.
    """
    f = feature_doubles(dims, has_bias, hessian, structured)
    if cpp:  # off the budget first: the weight copy and what each worker holds whatever the block size
        base = cpp_worker_doubles(dims, has_bias, 1, hessian, structured)
        memory_limit -= 8 * (cpp_fixed_doubles(dims, has_bias) + threads * base)

    def scratch(b: int) -> int:  # float64 values per worker besides the cached features
        if cpp:  # (the rest of it: halving the block halves this part only)
            return cpp_worker_doubles(dims, has_bias, b, hessian, structured) - base
        return (pair_scratch_doubles(dims, b, hessian, structured, cross_copies)
                + int(feature_temporaries * b * f) + b * feature_scratch)

    if batch_size is None:
        flops = pair_flops(dims, has_bias, hessian, structured)
        target = min(target_batch, max(8, int(math.sqrt(max_pair_flops / flops))))
        n_blocks = max(1, math.ceil(n_samples / target))
        if threads > 1:  # enough block pairs to keep every thread busy (small N)
            n_blocks = max(n_blocks, min(2 * threads, math.ceil(n_samples / _MIN_BATCH)))
        batch = math.ceil(n_samples / n_blocks)
        # Shrink until two blocks of features and the pair scratch of every thread take at most
        # half the budget; the other half caches features of further blocks.
        while batch > 1 and 8 * (threads * (2 * batch * f + scratch(batch))) > memory_limit // 2:
            batch = max(1, batch // 2)
    else:
        batch = min(batch_size, n_samples)
    n_blocks = math.ceil(n_samples / batch)
    spare = memory_limit - 8 * threads * scratch(batch)
    fits = max(1, min(n_blocks, spare // max(1, 16 * batch * f)))  # two groups live at once
    if cpp:  # the engine's bookkeeping per block and per block pair (_cost.cpp_group_doubles)
        def over(g: int) -> bool:
            return 16 * batch * f * g + 8 * cpp_group_doubles(len(dims) - 1, n_blocks, g) > spare

        lo, hi = 1, fits  # the largest fits that is not over (1 if none is)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (lo, mid - 1) if over(mid) else (mid, hi)
        fits = lo
    # Cache no more blocks than it takes to keep the recomputation of features a small part of
    # the pair phase (and the threads busy), so that memory stays flat in N beyond that.
    ratio = feature_flops(dims, hessian, structured) / pair_flops(dims, has_bias, hessian, structured)
    useful = max(2 * threads, math.ceil(_RECOMPUTE_FACTOR * ratio / batch))
    groups = math.ceil(n_blocks / min(fits, useful))
    return batch, math.ceil(n_blocks / groups)  # groups of equal size (a short last group idles threads)


#: The Python backends' K route (NumPy, torch): values held by the GEMM outputs of a chunk of
#: sample pairs, and by the elementwise work on a sub-chunk, on the CPU (the chunks' outputs
#: and temporaries stay in cache; few large GEMMs, as each call of a multithreaded BLAS wakes
#: its threads).  A tight memory_limit lowers both (plan_python).
CPU_CHUNK_VALUES = (4.0e6, 1.0e6)
#: Share of memory_limit at most that the Python backends set aside for those chunks (the
#: block plan gets the rest); on an accelerator the whole share, for few, large kernels.
KROUTE_SCRATCH_SHARE = 0.25
#: (B, B', d_l) temporaries that the Python backends' batched cross terms hold at once
#: (_numpy_backend._dense_cross: its two products).
PY_CROSS_COPIES = 2
#: Intermediate products of the Python backends' batched features while a block is computed,
#: in blocks of features (copies, reshapes), on top of _cost.feature_scratch_doubles.
PY_FEATURE_TEMPORARIES = 0.5


def plan_python(prob: Problem, batch_size: int | None, memory_limit: int, *, accelerator: bool = False,
                **shape: float) -> tuple[int, int, tuple[float, float]]:
    """(batch_size, blocks cached at once, K-route chunks) of the NumPy and torch backends,
    which contract one block pair at a time with batched temporaries, within ``memory_limit``.

    The K route's chunks (``Problem.chunks``) get up to KROUTE_SCRATCH_SHARE of the budget,
    16 bytes per chunk value (a chunk's GEMM outputs and a sub-chunk's elementwise work), and
    the block plan the rest; on the CPU no more than CPU_CHUNK_VALUES.  ``shape``: the
    preferred block of :func:`plan_blocks` (target_batch, max_pair_flops).  ValueError when
    ``memory_limit`` is below what one sample needs (:func:`min_memory_python`).
    """
    dims = [prob.weights[0].shape[1]] + [w.shape[0] for w in prob.weights]
    has_bias = [b is not None for b in prob.biases]
    check_memory_limit(memory_limit, min_memory_python(dims, has_bias, prob.hessian, prob.structured),
                       "the weights, two one-sample blocks' features and their scratch")
    share = max(1.0, KROUTE_SCRATCH_SHARE * memory_limit / 16.0)
    chunks = (share, share) if accelerator else (min(CPU_CHUNK_VALUES[0], share), min(CPU_CHUNK_VALUES[1], share))
    budget = memory_limit
    if prob.structured:
        budget = max(1, memory_limit - int(8 * (chunks[0] + chunks[1])))
    batch, group = plan_blocks(dims, has_bias, prob.n_samples, prob.hessian, prob.structured, 1, batch_size, budget,
                               cross_copies=PY_CROSS_COPIES, feature_temporaries=PY_FEATURE_TEMPORARIES,
                               feature_scratch=feature_scratch_doubles(dims, prob.hessian, prob.structured),
                               **shape)
    return batch, group, chunks


def validate(layers: Any, X: Any, y: Any, *, activation: Any, curvature: Any, reduction: Any,
             batch_size: Any = None, threads: Any = None, memory_limit: Any = None,
             check_X: Callable[[Any, int], Any] | None = None, backend: str | None = None) -> Problem:
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
    if n_classes < 2:
        raise ValueError(f"layers: the last layer must have at least 2 outputs (classes) for cross-entropy; got {n_classes}")
    labels, soft = validate_labels(y, Xa.shape[0], n_classes)
    curv = _choice(curvature, "curvature", CURVATURES)
    red = _choice(reduction, "reduction", REDUCTIONS)
    batch = None if batch_size is None else _positive_int(batch_size, "batch_size")
    nthreads = validate_threads(threads)
    budget = default_memory_limit() if memory_limit is None else _positive_int(memory_limit, "memory_limit")
    dims = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    has_bias = [b is not None for b in biases]
    hessian = curv == "hessian"
    structured = choose_structured(dims, has_bias, hessian)
    prob = Problem(weights, biases, acts, Xa, labels, soft, hessian, structured, red == "mean",
                   1, nthreads, 1, budget)
    if backend in ("cpp", None):
        if backend is None or not _MOMENTS_PLAN.get():  # a default plan (the caller plans again)
            size, group = plan_blocks(dims, has_bias, Xa.shape[0], hessian, structured, nthreads, batch, budget,
                                      cpp=True)
            return dataclasses.replace(prob, batch_size=size, group_blocks=group)
        size, group, nthreads = plan_cpp(dims, has_bias, Xa.shape[0], hessian, structured, nthreads, batch, budget)
        return dataclasses.replace(prob, batch_size=size, group_blocks=group, threads=nthreads)
    size, group, chunks = plan_python(prob, batch, budget)  # NumPy, torch: one block pair at a time
    return dataclasses.replace(prob, batch_size=size, group_blocks=group, chunks=chunks)
