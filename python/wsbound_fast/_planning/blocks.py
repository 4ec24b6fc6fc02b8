"""Block plans: samples per block, blocks cached at once, threads and chunks, within memory_limit.

The cost model (cost.py) says what each term costs; these functions choose the plan of each
backend from it.  They take plain shapes, or a validated problem (any object with the fields of
``_problem.problem.Problem``), and import nothing above them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

from .cost import (
    cpp_fixed_doubles,
    cpp_group_doubles,
    cpp_worker_doubles,
    feature_doubles,
    feature_flops,
    feature_scratch_doubles,
    pair_flops,
    pair_scratch_doubles,
)

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


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n:,} bytes ({n / size:.3g} {unit})"
    return f"{n:,} bytes"


#: Whether the plan being made is the moments' (bound(), the default) and its memory minimum
#: and thread clamp apply; the curvature-vector product (hvp, eigsh) plans its own blocks and
#: threads (:func:`plan_hvp`) from the same validated problem, so it validates within
#: ``moments_plan(False)`` (``_backends.validate_for(moments=False)``).  A context variable, so
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


def moments_plan_active() -> bool:
    """Whether the plan being made is the moments' (see :func:`moments_plan`)."""
    return _MOMENTS_PLAN.get()


def check_memory_limit(memory_limit: int, minimum: int, what: str) -> None:
    """ValueError naming the minimum when ``memory_limit`` is below it (the engine would have
    to exceed the budget whatever the plan).  Not while validating for products."""
    if memory_limit < minimum and _MOMENTS_PLAN.get():
        raise ValueError(f"memory_limit = {_bytes(memory_limit)} is below what one sample needs: at least "
                         f"{_bytes(minimum)} for this model ({what}); give memory_limit >= {minimum} "
                         "or None for the default")


def min_memory_cpp(dims: Sequence[int], has_bias: Sequence[bool], hessian: bool, structured: bool,
                   diagonal: bool = False) -> int:
    """Smallest memory_limit of the C++ engine's moments: its weight copy and fixed part, one
    worker's scratch for one-sample blocks, the features of two one-sample blocks and the
    bookkeeping of one block pair (_planning.cost.cpp_*)."""
    f = feature_doubles(dims, has_bias, hessian, structured)
    return 8 * (cpp_fixed_doubles(dims, has_bias) + cpp_worker_doubles(dims, has_bias, 1, hessian, structured, diagonal)
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


def _parallelism(n_samples: int, batch: int, group: int) -> int:
    """Most tasks one parallel step of the C++ engine's plan runs: the block pairs of the first
    group with itself, or of two groups (engine.cpp, compute_moments); the features are one
    task per block of a group, never more."""
    nb = math.ceil(n_samples / batch)
    g = min(group, nb)
    return max(g * (g + 1) // 2, g * min(g, nb - g) if nb > g else 0)


def plan_cpp(dims: Sequence[int], has_bias: Sequence[bool], n_samples: int, hessian: bool, structured: bool,
             threads: int, batch_size: int | None, memory_limit: int, diagonal: bool = False) -> tuple[int, int, int]:
    """(batch_size, blocks cached at once, threads) of the C++ engine's moments.

    ValueError when ``memory_limit`` is below what one sample needs (:func:`min_memory_cpp`).
    ``threads`` is clamped to the workers the budget holds (each with its scratch and two
    blocks of features for one-sample blocks) and to the most tasks one step of the plan runs
    at once, so that no worker is planned for, or allocated, without work.
    """
    minimum = min_memory_cpp(dims, has_bias, hessian, structured, diagonal)
    check_memory_limit(memory_limit, minimum, "the weights, one sample's features and one worker's scratch")
    worker = 8 * (cpp_worker_doubles(dims, has_bias, 1, hessian, structured, diagonal)
                  + 2 * feature_doubles(dims, has_bias, hessian, structured))
    threads = max(1, min(threads, 1 + (memory_limit - minimum) // worker))
    while True:
        batch, group = plan_blocks(dims, has_bias, n_samples, hessian, structured, threads, batch_size, memory_limit,
                                   cpp=True, diagonal=diagonal)
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
                cpp: bool = False, diagonal: bool = False) -> tuple[int, int]:
    """Choose (batch_size, blocks cached at once) within ``memory_limit`` bytes.

    ``target_batch`` and ``max_pair_flops`` shape the preferred block (the torch backend on a
    GPU asks for larger blocks than the CPU backends).  ``cpp``: the C++ engine's accounting
    (_planning.cost.cpp_*: its weight copy, per worker its pair scratch and one block's intermediates,
    its bookkeeping per block and block pair) instead of pair_scratch_doubles.  Otherwise (the
    NumPy and torch backends) ``cross_copies``: see :func:`pair_scratch_doubles`;
    ``feature_temporaries`` (in blocks of features) and ``feature_scratch`` (float64 values
    per sample): what the batched features hold while a block is computed, beyond the
    features kept.
    """
    f = feature_doubles(dims, has_bias, hessian, structured)
    if cpp:  # off the budget first: the weight copy and what each worker holds whatever the block size
        base = cpp_worker_doubles(dims, has_bias, 1, hessian, structured, diagonal)
        memory_limit -= 8 * (cpp_fixed_doubles(dims, has_bias) + threads * base)

    def scratch(b: int) -> int:  # float64 values per worker besides the cached features
        if cpp:  # (the rest of it: halving the block halves this part only)
            return cpp_worker_doubles(dims, has_bias, b, hessian, structured, diagonal) - base
        return (pair_scratch_doubles(dims, b, hessian, structured, cross_copies)
                + int(feature_temporaries * b * f) + b * feature_scratch)

    if batch_size is None:
        flops = pair_flops(dims, has_bias, hessian, structured, diagonal)
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
    if cpp:  # the engine's bookkeeping per block and per block pair (_planning.cost.cpp_group_doubles)
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
#: (_engine.pairs._dense_cross: its two products).
PY_CROSS_COPIES = 2


#: Intermediate products of the Python backends' batched features while a block is computed,
#: in blocks of features (copies, reshapes), on top of _planning.cost.feature_scratch_doubles.
PY_FEATURE_TEMPORARIES = 0.5


def plan_python(prob: Any, batch_size: int | None, memory_limit: int, *, accelerator: bool = False,
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


#: Samples per block of the curvature-vector product when the caller does not choose.
_HVP_TARGET_BATCH = 256


def _state_doubles(prob: Any) -> int:
    """Float64 values held per sample of a block (forward state and one direction)."""
    dims = [prob.weights[0].shape[1]] + [w.shape[0] for w in prob.weights]
    return dims[0] + 10 * sum(dims[1:])


def plan_hvp(prob: Any, k: int, batch_size: int | None, *, target_batch: int = _HVP_TARGET_BATCH) -> Any:
    """The problem with batch size and threads set for products with k vectors.

    The C++ core holds one (k, P) buffer per concurrently processed block and one block's
    state per thread; threads are reduced until both fit in the memory limit.  The torch
    backend plans with one thread (one block at a time) and, on an accelerator, a larger
    ``target_batch``.
    """
    N, P = prob.n_samples, prob.n_params_all
    per_sample = _state_doubles(prob)
    batch = min(N, target_batch) if batch_size is None else min(batch_size, N)
    threads = max(1, min(prob.threads, math.ceil(N / batch)))
    while threads > 1 and 8 * threads * (k * P + batch * per_sample) > prob.memory_limit:
        threads -= 1
    if batch_size is None:
        while batch > 16 and 8 * threads * batch * per_sample > prob.memory_limit // 2:
            batch //= 2
    return dataclasses.replace(prob, batch_size=batch, threads=threads)
