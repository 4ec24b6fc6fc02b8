"""The engines on a dask.distributed cluster (``client=`` of bound, hvp, eigsh and plan).

docs/design.md, "On a cluster".  dask is optional (the ``dask`` extra) and is imported only
when a client is given.  What runs where:

- The client validates and plans as the local engine does (the same batch size for the same
  arguments), so the blocks of samples are the local engine's.
- The data goes to the workers once: a NumPy X and the labels are cut into those blocks and
  scattered (one copy each, spread over the workers); a dask.array X is rechunked to the
  blocks and its chunks computed where they are (never gathered on the client).  The model
  (the problem without X and labels) is broadcast once.
- The moments are tasks over tiles of the upper triangle of block pairs
  (``_planning/tiles.py``); each task runs the chosen backend's tile entry (``_core.pair_sums``
  on the worker's core, or ``_engine.schedule.pair_sums`` on NumPy or torch) and returns each
  referenced block's values and each pair's sum.  The client feeds them to the engine's
  :class:`~wsbound_fast._engine.schedule.Reduction` in its fixed order, so the moments are
  bitwise those of the local engine with the same blocks (and the same CPU variant: one
  variant is chosen for the whole cluster), for any number of workers, tiles, schedules and
  reruns.
- A product V -> sum_n H_n V is a map over a fixed partition of the blocks (independent of
  the workers), each task adding its blocks in order, the partials added on the workers in a
  fixed binary tree; Lanczos stays on the client.  So products are bitwise reproducible for
  any number of workers, and equal the local product to rounding (reassociation only).
- Faults: a lost worker's tasks are rerun by dask; scattered blocks it held are scattered
  again from the client and the tiles that needed them resubmitted.  Ctrl-C cancels the
  cluster's tasks (a running C++ tile stops at its next progress poll) and raises
  KeyboardInterrupt; a task's exception is raised on the client as itself.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import itertools
import math
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._engine import schedule
from .._engine.data import label_rows
from .._engine.namespace import Weights
from .._engine.products import block_hvp, offsets
from .._engine.schedule import Moments, ProgressFn, Reduction, block_ranges
from .._planning.blocks import moments_plan, plan_python
from .._planning.tiles import PRODUCT_TASK_SAMPLES, plan_tiles, product_groups
from .._problem.inputs import adapt_inputs
from .._problem.problem import Problem
from .._problem.validate import check_X_shape, compute_dtype, validate, validate_X
from . import compiled
from . import numpy as numpy_backend

#: What ``pip install`` brings the cluster path.
INSTALL_HINT = 'pip install "wsbound_fast[dask]" (dask[array] and distributed)'

#: Seconds between checks of the task futures (the latency of Ctrl-C on the client).
POLL_S = 0.1


# --------------------------------------------------------------------------------------
# dask, lazily
# --------------------------------------------------------------------------------------


def require_dask() -> Any:
    """The ``distributed`` module, or ImportError saying how to install it."""
    try:
        import dask.array  # noqa: F401 - needed by dask.array inputs
        import distributed
    except ImportError as exc:
        raise ImportError(f"client= needs dask.distributed, which is not installed ({exc}): {INSTALL_HINT}") from exc
    return distributed


def check_client(client: Any) -> Any:
    """``client`` as a dask.distributed.Client (TypeError otherwise; ImportError without dask)."""
    distributed = require_dask()
    if not isinstance(client, distributed.Client):
        raise TypeError(f"client must be a dask.distributed.Client or None; got {type(client).__name__}")
    if client.status not in ("running", "connecting", "newly-created"):
        raise ValueError(f"client is not connected to a scheduler (status {client.status!r})")
    return client


def is_dask_array(x: Any) -> bool:
    """Whether x is a dask.array (checked without importing dask)."""
    return type(x).__module__.split(".")[:2] == ["dask", "array"]


class ClusterX:
    """A dask.array X that stays on the cluster, with the summaries of it that the rounding
    allowances and the rank bound read (max |x|, the columns that are not all zero), computed
    there in one pass with the finiteness check (_spectral reads them through ``max_abs`` and
    ``nonzero_columns`` instead of scanning X)."""

    def __init__(self, array: Any, client: Any) -> None:
        import dask.array as da

        self.array, self.client = array, client
        finite, top, cols = client.compute([da.isfinite(array).all(), abs(array).max(),
                                            (array != 0).any(axis=0)], sync=True)
        if not bool(finite):
            raise ValueError("X contains NaN or Inf")
        self.max_abs, self.nonzero_columns = float(top), np.asarray(cols, dtype=bool)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def ndim(self) -> int:
        return 2

    def __getitem__(self, idx: Any) -> ClusterX:  # samples left out (ignore_index): a new X
        return ClusterX(self.array[idx], self.client)


def dask_check_X(client: Any) -> Callable[[Any, int], Any]:
    """validate_X for a dask.array X: the same checks and messages, computed on the cluster; X
    stays there (a :class:`ClusterX`; integer X converted lazily to float64)."""
    def check(X: Any, d_in: int) -> Any:
        if not is_dask_array(X):
            return validate_X(X, d_in)
        dt = np.dtype(X.dtype)
        if dt == np.bool_ or dt.kind not in "iuf":
            raise TypeError(f"X must hold real numbers (integer or floating dtype); got dtype {dt}")
        if any(isinstance(s, float) and math.isnan(s) for s in X.shape):
            raise ValueError(f"X (a dask.array) has unknown chunk sizes {X.shape}: call X.compute_chunk_sizes() first")
        check_X_shape(tuple(int(s) for s in X.shape), d_in)
        if dt not in (np.float32, np.float64):
            X = X.astype(np.float64)
        return ClusterX(X, client)
    return check


# --------------------------------------------------------------------------------------
# validation and plan on the client
# --------------------------------------------------------------------------------------


def validate_cluster(backend: str, layers: Any, X: Any, y: Any, *, client: Any, device: Any, dtype: Any,
                     moments: bool, **kw: Any) -> Problem:
    """validate_for() with a client: the plan of the local engine for ``backend`` (for "torch",
    the NumPy backend's plan, or an accelerator's when ``device`` is not the CPU: the device
    is the workers'); X may be a dask.array (checked on the cluster, left there); tensors are
    copied to NumPy."""
    check_client(client)
    with moments_plan(moments):
        layers, X, y, activation, kw["params"] = adapt_inputs(layers, X, y, kw.pop("activation"), loss=kw["loss"],
                                                              params=kw.get("params"), memory_limit=kw.get("memory_limit"))
        if is_dask_array(y):
            y = client.compute(y).result()  # O(N) values, validated here; scattered in blocks below
        kw["activation"] = activation
        prob = validate(layers, X, y, backend="numpy" if backend == "torch" else backend,
                        check_X=dask_check_X(client), **kw)
        if backend == "torch":  # a TorchProblem: its dtype sets the rounding allowances; its device is the plan's
            tmod = importlib.import_module(f"{__package__}.torch")
            if device is not None and str(device) != "cpu":
                batch, group, chunks = plan_python(prob, kw.get("batch_size"), prob.memory_limit, accelerator=True,
                                                   **tmod.GPU_PLAN)
                prob = dataclasses.replace(prob, batch_size=batch, group_blocks=group, chunks=chunks)
            prob = tmod.TorchProblem.of(prob, tmod.torch.device("cpu"), tmod.resolve_dtype(dtype))
        elif device is not None:
            raise ValueError(f"device= applies to backend='torch' only; got backend={backend!r}")
    return prob


def _spec(prob: Problem) -> Problem:
    """The problem without its data: what every task needs (the weights and options)."""
    return dataclasses.replace(prob, X=np.empty((0, prob.weights[0].shape[1])),
                               labels=np.empty((0,) + prob.labels.shape[1:], dtype=prob.labels.dtype))


# --------------------------------------------------------------------------------------
# what runs on the workers
# --------------------------------------------------------------------------------------


def _worker_core() -> str:
    """The variant load_core() picks on this worker."""
    core = compiled.load_core()
    return "avx2" if core.__name__.endswith("_core_avx2") else "baseline"


#: glibc's mmap threshold set in each worker process on its first task (bytes; see
#: :func:`_tune_worker_malloc`).  $WSBOUND_FAST_WORKER_MALLOC=0 on the workers leaves it alone.
WORKER_MMAP_THRESHOLD = 256 << 20
_malloc_tuned = False


def _tune_worker_malloc() -> None:
    """Keep the engines' scratch (Eigen's and NumPy's temporaries, 0.1-100 MB) in the heap.

    dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also freezes glibc's
    mmap threshold at 128 KiB: every larger temporary is then a fresh mmap, zeroed page by page,
    and the C++ tiles of a 784-1024-10 model ran 35 % slower in a worker than in the client's
    process (measured here; MALLOC_MMAP_THRESHOLD_=256 MiB restores the speed, the trim
    threshold alone does not).  Once per process, on Linux/glibc only.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    if not sys.platform.startswith("linux") or os.environ.get("WSBOUND_FAST_WORKER_MALLOC", "1") == "0":
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, WORKER_MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


class TileCancelled(Exception):
    """Raised inside a running tile whose task was cancelled (its result is not wanted)."""


def _cancel_poll() -> Callable[[int, int], None] | None:
    """A progress function for the C++ tile that raises once the task was cancelled (Ctrl-C on
    the client), so that the worker stops instead of finishing a tile nobody waits for."""
    try:
        from distributed import get_worker
        from distributed.worker import thread_state

        worker, key = get_worker(), thread_state.key
    except Exception:  # pragma: no cover - not on a dask worker
        return None

    def poll(done: int, total: int) -> None:
        ts = worker.state.tasks.get(key)
        if ts is None or ts.state in ("cancelled", "released", "forgotten"):
            raise TileCancelled("the tile's task was cancelled")  # an Exception: dask takes BaseExceptions as fatal
    return poll


def _local_pairs(pairs: Sequence[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    used = sorted({k for ij in pairs for k in ij})
    where = {k: n for n, k in enumerate(used)}
    return used, [(where[i], where[j]) for i, j in pairs]


TileResult = tuple[list[int], np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def cpp_tile(spec: Problem, variant: str, threads: int, pairs: list[tuple[int, int]], X_blocks: list[np.ndarray],
             label_blocks: list[np.ndarray]) -> TileResult:
    """One tile on the compiled core: (blocks used (global indices, increasing), trace (K, L),
    trace_abs (K, L), norms (K, L, L), pair sums (T, L, L)); X_blocks / label_blocks are the
    used blocks, in that order."""
    _tune_worker_malloc()
    used, local = _local_pairs(pairs)
    core = compiled.load_core(variant)
    out = core.pair_sums(
        list(spec.weights), list(spec.biases), [a.code for a in spec.activations], [a.param for a in spec.activations],
        list(X_blocks), list(label_blocks), np.asarray(local, dtype=np.int64), spec.hessian, spec.structured, threads,
        _cancel_poll(), spec.f32, loss=spec.loss_code, parts=list(spec.parts or ()))
    _, tr, ta, nu, po = out
    return used, tr, ta, nu, po


def _torch_setup(spec: Problem, device: Any, dtype: Any) -> tuple[Any, Any, Any, Any]:
    tmod = importlib.import_module(f"{__package__}.torch")
    dev = tmod.resolve_device(device, None, None, None)
    tp = tmod.TorchProblem.of(spec, dev, tmod.resolve_dtype(dtype))
    return tmod, tp, tmod.arrays(tp), dev


def _torch_block(tmod: Any, tp: Any, Xb: np.ndarray, yb: np.ndarray) -> tuple[Any, Any]:
    """A block on the device as DeviceData serves it (the same conversions, so the same bits)."""
    torch = tmod.torch
    x = torch.from_numpy(np.array(Xb)).to(device=tp.device, dtype=tp.dtype)
    lab = tmod._from_numpy(np.ascontiguousarray(yb)).to(device=tp.device)
    if tp.soft:
        return x, lab.to(tp.dtype)
    return x, torch.nn.functional.one_hot(lab, tp.n_classes).to(tp.dtype)


def _numpy_block(spec: Problem, Xb: np.ndarray, yb: np.ndarray) -> tuple[Any, Any]:
    """A block as HostData serves it."""
    arr = numpy_backend.ARRAYS
    rows = label_rows(dataclasses.replace(spec, labels=yb), 0, yb.shape[0])
    return arr.from_host(np.asarray(Xb, dtype=np.float64)), arr.from_host(rows)


def python_tile(spec: Problem, engine: str, device: Any, dtype: Any, pairs: list[tuple[int, int]],
                X_blocks: list[np.ndarray], label_blocks: list[np.ndarray]) -> TileResult:
    """One tile on the Python engine (``engine`` "numpy" or "torch" on ``device``); as cpp_tile."""
    _tune_worker_malloc()
    used, local = _local_pairs(pairs)
    if engine == "numpy":
        arr = numpy_backend.ARRAYS
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            blocks = [_numpy_block(spec, x, y) for x, y in zip(X_blocks, label_blocks)]
            stats, sums = schedule.pair_sums(spec, arr, Weights.of(spec, arr), blocks, local)
    else:
        tmod, tp, arr, dev = _torch_setup(spec, device, dtype)
        with tmod.torch.no_grad(), tmod.ieee_float32(dev):
            blocks = [_torch_block(tmod, tp, x, y) for x, y in zip(X_blocks, label_blocks)]
            stats, sums = schedule.pair_sums(tp, arr, Weights.of(tp, arr), blocks, local)
    host = arr.to_numpy
    tr = np.stack([host(stats[k][0]) for k in range(len(used))])
    ta = np.stack([host(stats[k][1]) for k in range(len(used))])
    nu = np.stack([host(stats[k][2]) for k in range(len(used))])
    return used, tr, ta, nu, np.stack([host(s) for s in sums])


def product_task(spec: Problem, engine: str, variant: str, threads: int, device: Any, V: np.ndarray,
                 X_blocks: list[np.ndarray], label_blocks: list[np.ndarray]) -> np.ndarray:
    """sum over the given consecutive blocks of sum_n H_n V[j], block by block in order (as the
    local engines add them), unnormalised."""
    _tune_worker_malloc()
    out = np.zeros_like(V)
    if engine == "cpp":
        core = compiled.load_core(variant)
        args = (list(spec.weights), list(spec.biases), [a.code for a in spec.activations],
                [a.param for a in spec.activations])
        for x, y in zip(X_blocks, label_blocks):
            out += core.hvp(*args, x, y, V, spec.hessian, x.shape[0], threads, loss=spec.loss_code)
        return out
    off = offsets(spec)
    if engine == "numpy":
        arr = numpy_backend.ARRAYS
        net = Weights.of(spec, arr)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for x, y in zip(X_blocks, label_blocks):
                out += block_hvp(spec, arr, net, *_numpy_block(spec, x, y), V, off)
        return out
    tmod, tp, arr, dev = _torch_setup(spec, device, "float64")
    with tmod.torch.no_grad():
        net = Weights.of(tp, arr)
        Vd = tmod._from_numpy(V).to(device=dev, dtype=tmod.ACC)
        acc = tmod.torch.zeros_like(Vd)
        for x, y in zip(X_blocks, label_blocks):
            acc += block_hvp(tp, arr, net, *_torch_block(tmod, tp, x, y), Vd, off)
        return acc.cpu().numpy()


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One node of the products' fixed reduction tree."""
    return a + b


# --------------------------------------------------------------------------------------
# the session on the client
# --------------------------------------------------------------------------------------


class Cluster:
    """The data of one problem on a cluster, and the passes over it (moments, products).

    ``batch``: the samples per block the data is cut into (default the problem's);
    ``threads``: the core's threads per task (default 1: dask runs a worker's threads' worth
    of tasks at once); ``memory_limit``: bytes per task for the tile plan (default: the
    smallest worker memory_limit per thread).  Use as a context manager: the workers' copies
    are released at the end.
    """

    def __init__(self, client: Any, prob: Problem, backend: str, *, device: Any = None, dtype: Any = None,
                 threads: int | None = None, batch: int | None = None, memory_limit: int | None = None) -> None:
        self.client, self.prob, self.backend = check_client(client), prob, backend
        self.device = None if device is None else str(device)
        self.dtype = compute_dtype(dtype)
        self.threads = 1 if threads is None else int(threads)
        self.batch = prob.batch_size if batch is None else batch
        self.bounds = block_ranges(prob.n_samples, self.batch)
        self.token = uuid.uuid4().hex[:12]
        self._keys = itertools.count()
        info = client.scheduler_info(n_workers=-1)["workers"]
        if not info:
            raise ValueError("the dask cluster has no workers")
        self.worker_threads = sum(int(w.get("nthreads", 1)) for w in info.values())
        limits = [int(w["memory_limit"]) // max(1, int(w.get("nthreads", 1))) for w in info.values()
                  if w.get("memory_limit")]
        # each task's budget: memory_limit (bytes per task), else the workers' own limit per thread
        self.task_memory = memory_limit if memory_limit is not None else (min(limits) if limits else None)
        self.variant = "baseline"
        if backend == "cpp":
            self.variant = self._choose_variant()
        self.spec = client.scatter(_spec(prob), broadcast=True, hash=False)
        self._X_source = None if isinstance(prob.X, ClusterX) else prob.X
        self._x = self._data_blocks()
        self._y = client.scatter([self._labels(k) for k in range(len(self.bounds))], hash=False)
        self._live: list[Any] = []
        self.resubmitted = 0  # tasks (or products) run again after their inputs were lost

    # -- data ------------------------------------------------------------------------------

    def _choose_variant(self) -> str:
        """The CPU variant of the core every worker runs: the one they all pick, else the baseline
        (so that a mixed cluster still adds the same bits whichever worker runs a tile)."""
        variants = set(self.client.run(_worker_core).values())
        return variants.pop() if len(variants) == 1 else "baseline"

    def _rows(self, k: int) -> np.ndarray:
        lo, hi = self.bounds[k]
        return np.asarray(self._X_source[lo:hi])  # as given (float32 or float64); the engines convert

    def _data_blocks(self) -> list[Any]:
        if self._X_source is not None:
            return self.client.scatter([self._rows(k) for k in range(len(self.bounds))], hash=False)
        sizes = tuple(hi - lo for lo, hi in self.bounds)
        Xd = self.prob.X.array.rechunk({0: sizes, 1: -1})
        return self.client.compute(list(Xd.to_delayed().ravel()))  # computed where they are, kept there

    def _labels(self, k: int) -> np.ndarray:
        lo, hi = self.bounds[k]
        return np.ascontiguousarray(self.prob.labels[lo:hi])

    def _refresh(self, blocks: Sequence[int]) -> None:
        """Scatter again the blocks whose only copy was lost with a worker (a dask.array's chunks
        are recomputed by dask itself)."""
        for k in blocks:
            if self._X_source is not None and self._x[k].status in ("lost", "cancelled", "error"):
                self._x[k] = self.client.scatter(self._rows(k), hash=False)
            if self._y[k].status in ("lost", "cancelled", "error"):
                self._y[k] = self.client.scatter(self._labels(k), hash=False)
        if self.spec.status in ("lost", "cancelled", "error"):
            self.spec = self.client.scatter(_spec(self.prob), broadcast=True, hash=False)

    def close(self) -> None:
        futures = [self.spec, *self._x, *self._y, *self._live]
        self._live = []
        try:
            self.client.cancel(futures)
        except Exception:  # pragma: no cover - the client is already gone
            pass

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running tasks -----------------------------------------------------------------------

    def _key(self, what: str) -> str:
        return f"wsbound-{what}-{self.token}-{next(self._keys)}"

    def _run(self, jobs: dict[int, Callable[[], Any]], blocks_of: dict[int, Sequence[int]],
             on_done: Callable[[int, Any], None]) -> None:
        """Submit every job, give each finished one's result to on_done(job, result), resubmit a
        job whose inputs were lost with a worker, raise a job's exception as itself; on any
        exit before the end (Ctrl-C included) the remaining tasks are cancelled."""
        distributed = require_dask()

        def start(j: int) -> Any:
            self._refresh(blocks_of[j])  # inputs lost since (a worker gone): scattered again first
            return jobs[j]()

        pending = {start(j): j for j in sorted(jobs)}
        self._live = list(pending)
        try:
            while pending:
                for fut in _finished(distributed, list(pending)):
                    j = pending.pop(fut)
                    if fut.status == "finished":
                        on_done(j, fut.result())
                    elif fut.status == "error":
                        fut.result()  # raises the task's exception, with its message and traceback
                    else:  # cancelled, its inputs lost with a worker: again, from the client's copy
                        self.resubmitted += 1
                        pending[start(j)] = j
                    fut.release()
                self._live = list(pending)
        except BaseException:
            if pending:
                self.client.cancel(list(pending), force=True)
            raise
        finally:
            self._live = []

    # -- the moments ---------------------------------------------------------------------------

    def tile_plan(self) -> Any:
        prob = self.prob
        dims = [prob.weights[0].shape[1]] + [w.shape[0] for w in prob.weights]
        return plan_tiles(dims, [b is not None for b in prob.biases], prob.n_samples, self.batch, prob.hessian,
                          prob.structured, max(1, self.worker_threads // self.threads), self.task_memory)

    def moments(self, progress: ProgressFn | None = None) -> Moments:
        """The moments: tiles as tasks, reduced on the client in the engine's fixed order."""
        tiles = self.tile_plan().tiles
        nb, L = len(self.bounds), self.prob.n_layers
        per_block: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        per_pair: dict[tuple[int, int], np.ndarray] = {}
        total, done = sum(len(t) for t in tiles), 0
        used = {t: sorted({k for ij in pairs for k in ij}) for t, pairs in enumerate(tiles)}

        def job(t: int) -> Callable[[], Any]:
            def submit() -> Any:
                xs, ys = [self._x[k] for k in used[t]], [self._y[k] for k in used[t]]
                if self.backend == "cpp":
                    return self.client.submit(cpp_tile, self.spec, self.variant, self.threads, tiles[t], xs, ys,
                                              key=self._key("tile"), pure=False)
                return self.client.submit(python_tile, self.spec, self.backend, self.device, self.dtype, tiles[t],
                                          xs, ys, key=self._key("tile"), pure=False)
            return submit

        def on_done(t: int, res: TileResult) -> None:
            nonlocal done
            blocks, tr, ta, nu, po = res
            for n, k in enumerate(blocks):
                per_block.setdefault(k, (tr[n], ta[n], nu[n]))  # the same bits from any tile
            for n, ij in enumerate(tiles[t]):
                per_pair[ij] = po[n]
            done += len(tiles[t])
            if progress is not None:
                progress(done, total)

        self._run({t: job(t) for t in range(len(tiles))}, used, on_done)
        red = Reduction(nb, L, numpy_backend.ARRAYS)
        for k in range(nb):
            red.block(k, *per_block[k])
        for i in range(nb):
            for j in range(i, nb):
                red.pair(i, j, per_pair[(i, j)])
        return red.result()

    # -- products --------------------------------------------------------------------------------

    def products(self, k: int = 1) -> Callable[[np.ndarray], np.ndarray]:
        """The unnormalised product V (k', P) -> sum_n H_n V[j] on the cluster: one task per group
        of consecutive blocks (a partition fixed by the blocks alone), the partials added on the
        workers in a fixed binary tree, one (k', P) array back to the client per call."""
        groups = product_groups(len(self.bounds), self.batch, PRODUCT_TASK_SAMPLES)

        def build(Vf: Any) -> tuple[Any, list[Any]]:
            nodes = [self.client.submit(product_task, self.spec, self.backend, self.variant, self.threads,
                                        self.device, Vf, [self._x[b] for b in ks], [self._y[b] for b in ks],
                                        key=self._key("hvp"), pure=False) for ks in groups]
            level, every = nodes, list(nodes)
            while len(level) > 1:
                level = [self.client.submit(add, level[i], level[i + 1], key=self._key("add"), pure=False)
                         if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
                every += level
            return level[0], every

        def products(V: np.ndarray) -> np.ndarray:
            V = np.ascontiguousarray(V, dtype=np.float64)
            while True:
                self._refresh(range(len(self.bounds)))
                Vf = self.client.scatter(V, broadcast=True, hash=False)
                root, nodes = build(Vf)
                try:
                    status = self._wait_one(root, nodes)
                    if status == "finished":
                        return root.result()
                    if status == "error":
                        root.result()  # raises the task's exception
                finally:
                    self.client.cancel([Vf, *nodes])
                self.resubmitted += 1  # an input lost with a worker: scattered again, the product rebuilt
        return products

    def _wait_one(self, root: Any, nodes: list[Any]) -> str:
        """Wait for ``root`` (polling, so that Ctrl-C is seen); its final status."""
        distributed = require_dask()
        self._live = nodes
        try:
            while True:
                if _finished(distributed, [root]):
                    return root.status
        except BaseException:
            self.client.cancel(nodes, force=True)
            raise
        finally:
            self._live = []


def _finished(distributed: Any, futures: list[Any]) -> list[Any]:
    """The futures that are done after waiting at most POLL_S for the first (none: timed out)."""
    try:
        done, _ = distributed.wait(futures, timeout=POLL_S, return_when="FIRST_COMPLETED")
    except TimeoutError:
        return []
    except Exception:  # wait() raises when a future was cancelled (its inputs lost with a worker)
        ended = [f for f in futures if f.status != "pending"]
        if not ended:
            raise
        return ended
    return list(done)
