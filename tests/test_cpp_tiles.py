"""The engine's tiles (_core.pair_sums): per-block values and block-pair sums that, reduced in
the order of the streamed engine, give _core.moments bitwise, for any way of splitting the pairs
over calls; and the checks of its arguments."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from wsbound_fast._backends.compiled import cpu_has_avx2_fma, load_core  # the one import of the loader

BATCH = 5
N = 23  # five blocks, the last one of three samples


def _cores() -> list:
    """The baseline core, and the AVX2 + FMA build where this CPU and installation have it."""
    cores = [load_core("baseline")]
    if cpu_has_avx2_fma():
        try:
            cores.append(importlib.import_module("wsbound_fast._core_avx2"))
        except ImportError:
            pass
    return cores


def _problem(depth: int, soft: bool, seed: int = 0, x32: bool = False):
    """A random tanh / gelu MLP with ``depth`` layers (depth - 1 hidden), its inputs and labels."""
    rng = np.random.default_rng(seed + 10 * depth + soft)
    dims = {1: [5, 3], 2: [5, 7, 3], 3: [4, 6, 5, 3]}[depth]
    layers = [(rng.normal(size=(o, i)) / np.sqrt(i), None if (l == 1 and depth == 3) else 0.3 * rng.normal(size=o))
              for l, (i, o) in enumerate(zip(dims[:-1], dims[1:]))]
    X = rng.normal(size=(N, dims[0]))
    if x32:
        X = X.astype(np.float32)
    C = dims[-1]
    if soft:
        y = rng.random(size=(N, C))
        y /= y.sum(axis=1, keepdims=True)
        y[::4] *= 0.5  # label weights other than 1
    else:
        y = rng.integers(0, C, size=N).astype(np.int64)
    acts = [1, 4][: depth - 1]
    return layers, X, y, acts


def _model_args(layers, acts):
    return [W for W, _ in layers], [b for _, b in layers], acts, [0.0] * len(acts)


def _blocks(X, y):
    """X and y cut as the engine cuts them: blocks of BATCH samples, the last one shorter."""
    cuts = range(0, X.shape[0], BATCH)
    return [X[lo:lo + BATCH] for lo in cuts], [np.ascontiguousarray(y[lo:lo + BATCH]) for lo in cuts]


def _upper_pairs(nb: int) -> np.ndarray:
    return np.array([(i, j) for i in range(nb) for j in range(i, nb)], dtype=np.int64)


def _reduce(nb: int, per_block: dict, per_pair: dict) -> tuple[np.ndarray, ...]:
    """moments() from the tiles, in the engine's order: for each block row i, the pairs (i, j),
    j = i .. nb - 1, weighted 1 on the diagonal and 2 off it; then block by block."""
    L = per_block[0][0].shape[0]
    blocks = np.zeros((L, L))
    for i in range(nb):
        acc = np.zeros((L, L))
        for j in range(i, nb):
            acc += (1.0 if i == j else 2.0) * per_pair[(i, j)]
        blocks += acc
    trace, trace_abs, norms = np.zeros(L), np.zeros(L), np.zeros((L, L))
    for k in range(nb):
        t, ta, nu = per_block[k]
        trace += t
        trace_abs += ta
        norms += nu
    return trace, blocks, trace_abs, norms


def _collect(out, pairs, per_block: dict, per_pair: dict) -> None:
    used, tr, ta, nu, po = out
    assert used.dtype == np.int64
    np.testing.assert_array_equal(used, np.unique(pairs))  # the referenced blocks, increasing
    for k, b in enumerate(used):
        vals = (tr[k], ta[k], nu[k])
        if int(b) in per_block:  # computed again by another call: the same bits
            assert all(np.array_equal(a, c) for a, c in zip(per_block[int(b)], vals))
        per_block[int(b)] = vals
    for t, (i, j) in enumerate(pairs):
        per_pair[(int(i), int(j))] = po[t]


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("f32", [False, True], ids=["f64", "f32"])
@pytest.mark.parametrize("structured", [False, True], ids=["generic", "structured"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_tiles_reduce_to_moments_bitwise(depth: int, curvature: str, structured: bool, f32: bool, soft: bool) -> None:
    layers, X, y, acts = _problem(depth, soft, x32=depth == 3 and not soft)
    args = _model_args(layers, acts)
    hessian = curvature == "hessian"
    Xb, yb = _blocks(X, y)
    nb = len(Xb)
    L = depth
    every = _upper_pairs(nb)
    for core in _cores():
        for threads in (1, 2):
            ref = core.moments(*args, X, y, hessian, structured, BATCH, 2, threads, None, f32)
            # all pairs in one call
            out = core.pair_sums(*args, Xb, yb, every, hessian, structured, threads, None, f32)
            assert [a.shape for a in out] == [(nb,), (nb, L), (nb, L), (nb, L, L), (len(every), L, L)]
            per_block: dict = {}
            per_pair: dict = {}
            _collect(out, every, per_block, per_pair)
            for a, b in zip(_reduce(nb, per_block, per_pair), ref):
                assert np.array_equal(a, b), (a, b)
            # the pairs shuffled and split over three calls (each with the full list of blocks)
            order = np.random.default_rng(threads).permutation(len(every))
            per_block, per_pair = {}, {}
            for part in np.array_split(every[order], 3):
                out = core.pair_sums(*args, Xb, yb, part, hessian, structured, threads, None, f32)
                _collect(out, part, per_block, per_pair)
            for a, b in zip(_reduce(nb, per_block, per_pair), ref):
                assert np.array_equal(a, b), (a, b)


def test_only_referenced_blocks_are_used_and_progress_counts_pairs() -> None:
    layers, X, y, acts = _problem(2, False)
    Xb, yb = _blocks(X, y)
    core = load_core()
    seen: list[tuple[int, int]] = []
    pairs = np.array([[1, 3], [3, 3]], dtype=np.int64)
    used, tr, ta, nu, po = core.pair_sums(*_model_args(layers, acts), Xb, yb, pairs, True, False, 2,
                                          lambda done, total: seen.append((done, total)))
    np.testing.assert_array_equal(used, [1, 3])
    assert tr.shape == (2, 2) and po.shape == (2, 2, 2)
    assert seen and seen[-1] == (2, 2)
    assert po[0, 1, 0] == 0.0 and nu[0, 1, 0] == 0.0  # lower triangles zero
    # a block's values depend on that block alone: given as the only block, the same bits
    alone = core.pair_sums(*_model_args(layers, acts), [Xb[3]], [yb[3]], np.array([[0, 0]]), True, False, 1)
    assert np.array_equal(alone[4][0], po[1]) and np.array_equal(alone[1][0], tr[1])


def test_progress_errors_propagate() -> None:
    layers, X, y, acts = _problem(2, False)
    Xb, yb = _blocks(X, y)

    def fail(done: int, total: int) -> None:
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        load_core().pair_sums(*_model_args(layers, acts), Xb, yb, _upper_pairs(len(Xb)), True, False, 1, fail)


def _call(Xb=None, yb=None, pairs=None, threads=1):
    layers, X, y, acts = _problem(2, False)
    bx, by = _blocks(X, y)
    Xb = bx if Xb is None else Xb
    yb = by if yb is None else yb
    pairs = _upper_pairs(len(Xb)) if pairs is None else pairs
    return load_core().pair_sums(*_model_args(layers, acts), Xb, yb, pairs, True, False, threads)


def test_argument_errors() -> None:
    layers, X, y, acts = _problem(2, False)
    Xb, yb = _blocks(X, y)
    with pytest.raises(ValueError, match="at least one block pair"):
        _call(pairs=np.zeros((0, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"shape \(T, 2\)"):
        _call(pairs=np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"shape \(T, 2\)"):
        _call(pairs=np.zeros(2, dtype=np.int64))
    with pytest.raises(TypeError, match="integer"):
        _call(pairs=np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"pairs\[1\] = \(3, 2\): needs i <= j"):
        _call(pairs=np.array([[0, 0], [3, 2]]))
    with pytest.raises(ValueError, match=r"pairs\[0\] = \(0, 5\): block index out of range \[0, 5\)"):
        _call(pairs=np.array([[0, 5]]))
    with pytest.raises(ValueError, match="out of range"):
        _call(pairs=np.array([[-1, 0]]))
    with pytest.raises(ValueError, match="out of range"):
        _call(pairs=np.array([[0, 2**64 - 1]], dtype=np.uint64))
    with pytest.raises(ValueError, match="at least one block is required"):
        _call(Xb=[], yb=[], pairs=np.array([[0, 0]]))
    with pytest.raises(ValueError, match="one label array per block"):
        _call(yb=yb[:-1])
    with pytest.raises(ValueError, match=r"label_blocks\[1\]: .*one label per sample"):
        _call(yb=[yb[0], yb[1][:-1], *yb[2:]])
    with pytest.raises(ValueError, match=r"label_blocks\[0\]: .*shape \(N, C\)"):
        _call(yb=[np.full((BATCH, 4), 0.25), *yb[1:]])
    with pytest.raises(TypeError, match=r"label_blocks\[0\]: .*int64"):
        _call(yb=[yb[0].astype(np.int32), *yb[1:]])
    with pytest.raises(ValueError, match="class index out of range"):
        _call(yb=[np.full(BATCH, 7, dtype=np.int64), *yb[1:]])
    with pytest.raises(ValueError, match=r"X_blocks\[2\]: width 4 does not match layers\[0\] \(5\)"):
        _call(Xb=[Xb[0], Xb[1], Xb[2][:, :4], *Xb[3:]])
    with pytest.raises(ValueError, match=r"X_blocks\[0\]: at least one sample"):
        _call(Xb=[Xb[0][:0], *Xb[1:]], yb=[yb[0][:0], *yb[1:]])
    with pytest.raises(ValueError, match=r"X_blocks\[0\]: X must be 2-D"):
        _call(Xb=[Xb[0][0], *Xb[1:]])
    with pytest.raises(TypeError, match=r"X_blocks\[1\]: X must be a float32 or float64"):
        _call(Xb=[Xb[0], Xb[1].astype(np.int64), *Xb[2:]])
    with pytest.raises(TypeError, match=r"X_blocks\[0\]: must be a NumPy array"):
        _call(Xb=[Xb[0].tolist(), *Xb[1:]])
    with pytest.raises(ValueError, match="threads must be >= 1"):
        _call(threads=0)
