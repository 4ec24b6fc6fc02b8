"""wsb.plan(): what bound() will cost, before running it."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .._backends import distributed
from .._planning.blocks import default_memory_limit, min_memory_cpp, plan_cpp
from .._planning.cost import (
    choose_structured,
    cpp_fixed_doubles,
    cpp_group_doubles,
    cpp_worker_doubles,
    feature_doubles,
    feature_flops,
    pair_flops,
)
from .._planning.tiles import plan_tiles
from .._problem import loaders, torch_input
from .._problem.activations import validate_activations
from .._problem.losses import resolve_loss
from .._problem.problem import CURVATURES, PART_ALL, part_size
from .._problem.validate import (
    _choice,
    _positive_int,
    validate_layers,
    validate_params,
    validate_threads,
)

#: Fraction of NumPy's float64 GEMM rate the engine is assumed to reach (pairs and features).
ASSUMED_EFFICIENCY = 0.6


@dataclass(frozen=True)
class Plan:
    """Predicted cost of ``bound()`` on this machine (see ``wsb.plan``)."""

    n_params: int
    n_samples: int
    curvature: str
    structured: bool
    batch_size: int
    n_blocks: int
    block_pairs: int
    group_blocks: int
    pair_flops: float
    feature_flops: float
    feature_bytes: int
    memory_bytes: int
    gemm_gflops: float
    predicted_seconds: float
    #: Worker threads of the plan: ``threads`` clamped to the work's parallelism and the budget.
    threads: int = 1
    #: The smallest memory_limit bound() accepts for this model (backend "cpp"): one sample's needs.
    min_memory_limit: int = 0
    #: The loss the plan is for (mse and bce: a diagonal output curvature, a cheaper K route).
    loss: str = "cross_entropy"
    #: On a cluster (``workers=`` or ``client=``): the tasks running at once (0: this machine),
    #: the tiles of block pairs, blocks per tile side, what one task holds in features at most,
    #: and the X and label bytes a task reads (its blocks; at most, if none is on its worker).
    workers: int = 0
    tiles: int = 0
    tile_blocks: int = 0
    task_memory_bytes: int = 0
    task_input_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __repr__(self) -> str:
        return (f"Plan({self.curvature}, loss={self.loss!r}, P={self.n_params}, N={self.n_samples}, "
                f"{'structured' if self.structured else 'generic'} path, batch {self.batch_size} "
                f"({self.block_pairs} block pairs), {self.pair_flops:.3g} flops + {self.feature_flops:.3g} "
                f"in features, "
                f"~{self.memory_bytes / 2**20:.0f} MiB, ~{self.predicted_seconds:.3g} s at "
                f"{ASSUMED_EFFICIENCY:.0%} of {self.gemm_gflops:.1f} GFLOP/s"
                + (f" on {self.workers} workers, {self.tiles} tiles of {self.tile_blocks}x{self.tile_blocks} blocks"
                   if self.workers else "") + ")")


@functools.lru_cache(maxsize=1)
def gemm_rate() -> float:
    """This machine's float64 GEMM rate in FLOP/s (NumPy matmul, best of 3; cached)."""
    n = 768
    a = np.random.default_rng(0).standard_normal((n, n))
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def plan(layers: Any, n_samples: int, *, activation: Any = None, curvature: str = "hessian",
         batch_size: int | None = None, threads: int | None = None, memory_limit: int | None = None,
         loss: Any = "cross_entropy", params: Any = None, workers: int | None = None, client: Any = None) -> Plan:
    """Predicted flops, memory and seconds of ``bound(layers, X, y, ...)`` for ``n_samples``
    (a number, or the DataLoader / iterable of (X, y) batches bound() would take).

    ``pair_flops`` is the pair phase's flop count (Gram products over the upper triangle of
    sample pairs, 2 flops per multiply-add) from the engine's cost model; ``feature_flops``
    that of the per-sample features (forward and backward passes, the curvature blocks),
    counted as often as the block plan computes them (blocks beyond the ones cached at once
    are recomputed for each group).  Seconds assume the engine reaches 60% of this machine's
    float64 NumPy GEMM rate, measured once, on both.
    ``activation`` is accepted for symmetry with :func:`bound` and checked; the cost does not
    depend on it.  ``layers`` may be a torch module.  ``threads`` is clamped as bound() clamps
    it (to the block pairs one step runs at once and the workers the budget holds; the plan's
    ``threads``); a ``memory_limit`` below what one sample needs is a ValueError naming the
    minimum.  ``loss`` as for :func:`bound`: mse and bce have a diagonal output curvature,
    whose K route costs less (and may be chosen where cross-entropy's is not).  ``params`` as
    for :func:`bound`: ``n_params`` counts the selected parameters; the cost is the model's.

    On a cluster: ``workers`` (tasks running at once: the workers' dask threads together) or
    ``client`` (a dask.distributed.Client: its workers' threads and their memory_limit per
    thread for the tiles).  The plan then also gives the tiles bound(client=...) would run, and
    predicts the seconds as if each worker thread ran at this machine's rate, the tiles spread
    evenly (the feature flops counted per tile).
    """
    lossr, _ = resolve_loss(loss, None)
    params = torch_input.selected_params(layers, params)
    layers, _, _, activation = torch_input.adapt(layers, None, None, activation)
    weights, biases = validate_layers(layers)
    if activation is not None:
        validate_activations(activation, len(weights))
    n = _positive_int(loaders.count(n_samples) if loaders.is_batches(n_samples) else n_samples, "n_samples")
    curv = _choice(curvature, "curvature", CURVATURES)
    nthreads = validate_threads(threads)
    budget = default_memory_limit() if memory_limit is None else _positive_int(memory_limit, "memory_limit")
    batch_arg = None if batch_size is None else _positive_int(batch_size, "batch_size")
    dims = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    has_bias = [b is not None for b in biases]
    hessian = curv == "hessian"
    structured = choose_structured(dims, has_bias, hessian, lossr.diagonal)
    batch, group, nthreads = plan_cpp(dims, has_bias, n, hessian, structured, nthreads, batch_arg, budget,
                                      lossr.diagonal)
    n_blocks = math.ceil(n / batch)
    sizes = [min(batch, n - k * batch) for k in range(n_blocks)]
    # upper triangle of block pairs: sum_{I <= J} |I| |J| = (N^2 + sum |I|^2) / 2 sample pairs
    sample_pairs = (n * n + sum(s * s for s in sizes)) / 2.0
    flops = sample_pairs * pair_flops(dims, has_bias, hessian, structured, lossr.diagonal)
    # Features: group g0 computes its own blocks and those of every later group (moments()).
    featured = sum(sizes[k] for g0 in range(0, n_blocks, group) for k in range(g0, n_blocks))
    fflops = featured * feature_flops(dims, hessian, structured)
    f = feature_doubles(dims, has_bias, hessian, structured)
    held = min(n_blocks, 2 * group) * batch * f
    memory = 8 * (cpp_fixed_doubles(dims, has_bias) + held + cpp_group_doubles(len(dims) - 1, n_blocks, group)
                  + nthreads * cpp_worker_doubles(dims, has_bias, batch, hessian, structured, lossr.diagonal))
    rate = gemm_rate()
    parts = validate_params(params, biases)
    # the parameters the curvature is taken over (the engine's cost is the whole model's)
    P = sum(part_size(W, b, PART_ALL if parts is None else p) for W, b, p in
            zip(weights, biases, parts or [PART_ALL] * len(weights)))
    cluster: dict[str, int] = {}
    seconds = (flops + fflops) / (ASSUMED_EFFICIENCY * rate)
    task_memory: int | None = budget  # per task: memory_limit, or the workers' own limit per thread
    if client is not None:
        distributed.check_client(client)
        info = client.scheduler_info(n_workers=-1)["workers"].values()
        workers = sum(int(w.get("nthreads", 1)) for w in info) if workers is None else workers
        limits = [int(w["memory_limit"]) // max(1, int(w.get("nthreads", 1))) for w in info if w.get("memory_limit")]
        task_memory = min(limits) if limits and memory_limit is None else budget
    if workers is not None:
        k = _positive_int(workers, "workers")
        tp = plan_tiles(dims, has_bias, n, batch, hessian, structured, k, task_memory)
        featured = sum(sizes[b] for pairs in tp.tiles for b in {x for ij in pairs for x in ij})
        fflops = featured * feature_flops(dims, hessian, structured)
        seconds = (flops + fflops) / (ASSUMED_EFFICIENCY * rate * min(k, len(tp.tiles)))
        label_bytes = 8 * (dims[-1] if lossr.diagonal else 1)
        cluster = dict(workers=k, tiles=len(tp.tiles), tile_blocks=tp.group, task_memory_bytes=tp.memory_bytes,
                       task_input_bytes=2 * tp.group * batch * (8 * dims[0] + label_bytes))
    return Plan(P, n, curv, structured, batch, n_blocks, n_blocks * (n_blocks + 1) // 2, group, flops, fflops,
                8 * n * f, memory, rate / 1e9, seconds, nthreads,
                min_memory_cpp(dims, has_bias, hessian, structured, lossr.diagonal), lossr.name, **cluster)
