"""The block schedule of the Python engine: blocks of samples, block pairs I <= J, and the
fixed-order reduction (docs/design.md, "The pair sum").

The reduction order is the C++ engine's (cpp/wsbound/engine.cpp): for each block row i, the
pair sums of (i, j) for j = i, i+1, ... added in that order (off-diagonal pairs twice), then the
rows, the block traces and magnitudes added block by block.  :class:`Reduction` is that order
written once, so that any way of computing the block pairs (all at once here, or tile by tile
elsewhere) that feeds it the same numbers gets the same moments, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .features import BlockFeatures, block_features
from .namespace import Arrays, Weights
from .pairs import pair_sum
from .products import block_hvp, offsets

#: progress(done, total): block pairs finished so far, of all.
ProgressFn = Callable[[int, int], None]


class Moments(NamedTuple):
    """What a backend's moment pass returns (unnormalised, per parameter block, layers 0..L-1).

    trace[l] = sum_n tr H_n^{ll}; blocks[l, m] = sum_{n,n'} <H_n^{lm}, H_n'^{lm}> (l <= m, zero
    below); and the magnitudes of docs/numerics.md section 4 that the rounding allowances use:
    trace_abs[l] = sum_n |a~_{l-1}|^2 sum_k |(M_l)_kk|, norms[l, m] = sum_n nu_n^{lm} (l <= m).
    """

    trace: np.ndarray
    blocks: np.ndarray
    trace_abs: np.ndarray
    norms: np.ndarray


def select_layers(mom: Moments, layers_in: tuple[bool, ...] | None) -> Moments:
    """The moments of the principal submatrix of the selected layers' parameters: the blocks
    (l, m) with both layers selected, the traces and magnitudes of the selected layers (the
    others zero).  ``layers_in`` None: ``mom`` itself."""
    if layers_in is None:
        return mom
    keep = np.asarray(layers_in, dtype=bool)
    pair = np.outer(keep, keep)
    return Moments(np.where(keep, mom.trace, 0.0), np.where(pair, mom.blocks, 0.0),
                   np.where(keep, mom.trace_abs, 0.0), np.where(pair, mom.norms, 0.0))


def total_moments(layer_trace: np.ndarray, blocks: np.ndarray) -> tuple[float, float]:
    """(tr H, tr H^2) from per-layer traces and the upper triangle of <H^{lm}, H^{lm}>.

    Summed in a fixed order, so the totals are as reproducible as the blocks.
    """
    L = layer_trace.shape[0]
    tr = 0.0
    for t in layer_trace:
        tr += float(t)
    tr2 = 0.0
    for l in range(L):
        for m in range(l, L):
            tr2 += float(blocks[l, m]) if l == m else 2.0 * float(blocks[l, m])
    return tr, tr2


class Reduction:
    """The fixed-order sum of per-block and per-pair results into :class:`Moments`.

    ``block(i, trace, trace_abs, norms)`` once per block; ``pair(i, j, s)`` for every i <= j, the
    pairs of one row i in increasing j (rows in any order).  The accumulators live on ``arr``'s
    device; :meth:`result` copies them to the host once and adds them up in block order.
    """

    def __init__(self, n_blocks: int, n_layers: int, arr: Arrays) -> None:
        self.arr, self.nb, self.L = arr, n_blocks, n_layers
        self.block_vec = arr.zeros((n_blocks, 2, n_layers))  # per block: trace, trace_abs
        # per block row i: [0] the pair sums over j >= i, j increasing (off-diagonal twice); [1] its norms
        self.row_mat = arr.zeros((n_blocks, 2, n_layers, n_layers))
        self._next = list(range(n_blocks))  # the next column each row expects

    def block(self, i: int, trace: Any, trace_abs: Any, norms: Any) -> None:
        self.block_vec[i, 0], self.block_vec[i, 1], self.row_mat[i, 1] = trace, trace_abs, norms

    def pair(self, i: int, j: int, s: Any) -> None:
        if j != self._next[i]:
            raise AssertionError(f"block pair ({i}, {j}) out of order: row {i} expects column {self._next[i]}")
        self._next[i] = j + 1
        self.row_mat[i, 0] += s if i == j else 2.0 * s

    def result(self) -> Moments:
        bv, rm = self.arr.to_numpy(self.block_vec), self.arr.to_numpy(self.row_mat)
        L = self.L
        trace, blocks, trace_abs, norms = np.zeros(L), np.zeros((L, L)), np.zeros(L), np.zeros((L, L))
        for k in range(self.nb):
            trace += bv[k, 0]
            blocks += rm[k, 0]
            trace_abs += bv[k, 1]
            norms += rm[k, 1]
        return Moments(trace, blocks, trace_abs, norms)


def block_ranges(n_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """(lo, hi) of each block of samples, in order."""
    return [(lo, min(lo + batch_size, n_samples)) for lo in range(0, n_samples, batch_size)]


def moments(prob: Any, arr: Arrays, net: Weights, data: Any, progress: ProgressFn | None = None) -> Moments:
    """Unnormalised moments per parameter block, as the C++ core returns them, and the magnitudes
    of the rounding allowances (docs/numerics.md section 4):

    (trace[l] = sum_n tr H_n^{ll}, blocks[l, m] = sum_{n,n'} <H_n^{lm}, H_n'^{lm}> for l <= m,
    trace_abs[l] = sum_n |a~_{l-1}|^2 sum_k |(M_l)_kk|, norms[l, m] = sum_n nu_n^{lm} for l <= m).

    ``data`` serves X and label rows on ``arr``'s device (``rows(lo, hi)``, ``label_rows(lo, hi)``).
    Groups of ``prob.group_blocks`` blocks of features are held at once: at most two groups.
    ``progress(done, total)`` after each block pair, or (``arr.report_each_pair`` False) after each
    group of them once the device has finished.
    """
    bounds = block_ranges(prob.n_samples, prob.batch_size)
    nb = len(bounds)
    group = prob.group_blocks
    red = Reduction(nb, prob.n_layers, arr)

    def features(k: int) -> BlockFeatures:
        lo, hi = bounds[k]
        return block_features(prob, arr, net, data.rows(lo, hi), data.label_rows(lo, hi))

    done, total_pairs = 0, nb * (nb + 1) // 2
    for g0 in range(0, nb, group):
        rows = {i: features(i) for i in range(g0, min(g0 + group, nb))}
        for i, f in rows.items():
            red.block(i, f.trace, f.trace_abs, f.norms)
        for h0 in range(g0, nb, group):
            cols = rows if h0 == g0 else {j: features(j) for j in range(h0, min(h0 + group, nb))}
            for i, fi in rows.items():
                for j, fj in cols.items():
                    if j >= i:
                        red.pair(i, j, pair_sum(prob, arr, fi, fj))
                        done += 1
                        if progress is not None and arr.report_each_pair:
                            progress(done, total_pairs)
            cols = fi = fj = None  # no reference to this group while the next one is computed
            if progress is not None and not arr.report_each_pair:
                arr.sync()
                progress(done, total_pairs)
        del rows
    return red.result()


def pair_sums(prob: Any, arr: Arrays, net: Weights, blocks: list[tuple[Any, Any]],
              pairs: list[tuple[int, int]]) -> tuple[dict[int, tuple[Any, Any, Any]], list[Any]]:
    """The block results and pair sums of a tile: ``blocks`` are (X rows, label rows) on ``arr``'s
    device, ``pairs`` (i, j) with i <= j index them.  Returns ({block: (trace, trace_abs, norms)}
    for every block a pair references, [the pair sum of each pair]): exactly the numbers
    :func:`moments` feeds its :class:`Reduction` for the same blocks."""
    used = sorted({k for ij in pairs for k in ij})
    feats = {k: block_features(prob, arr, net, *blocks[k]) for k in used}
    stats = {k: (f.trace, f.trace_abs, f.norms) for k, f in feats.items()}
    return stats, [pair_sum(prob, arr, feats[i], feats[j]) for i, j in pairs]


def products(prob: Any, arr: Arrays, net: Weights, data: Any, V: Any) -> Any:
    """sum_n H_n V[j] for V (k, P) on ``arr``'s device, block by block in block order (:func:`block_hvp`)."""
    off = offsets(prob)
    out = arr.xp.zeros_like(V)
    for lo, hi in block_ranges(prob.n_samples, prob.batch_size):
        out += block_hvp(prob, arr, net, data.rows(lo, hi), data.label_rows(lo, hi), V, off)
    return out
