"""The block schedule of the Python engine: blocks of samples, block pairs I <= J, and the
fixed-order reduction (docs/design.md, "The pair sum")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .features import BlockFeatures, block_features, label_rows
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


def moments(prob: Any, progress: ProgressFn | None = None) -> Moments:
    """Unnormalised moments per parameter block, as the C++ core returns them, and the magnitudes
    of the rounding allowances (docs/numerics.md section 4):

    (trace[l] = sum_n tr H_n^{ll}, blocks[l, m] = sum_{n,n'} <H_n^{lm}, H_n'^{lm}> for l <= m,
    trace_abs[l] = sum_n |a~_{l-1}|^2 sum_k |(M_l)_kk|, norms[l, m] = sum_n nu_n^{lm} for l <= m).
    """
    N, B, L = prob.n_samples, prob.batch_size, prob.n_layers
    bounds = [(lo, min(lo + B, N)) for lo in range(0, N, B)]
    nb = len(bounds)
    group = prob.group_blocks

    def features(k: int) -> BlockFeatures:
        lo, hi = bounds[k]
        return block_features(prob, np.asarray(prob.X[lo:hi], dtype=np.float64), label_rows(prob, lo, hi))

    block_trace = np.zeros((nb, L))
    block_abs = np.zeros((nb, L))
    block_norms = np.zeros((nb, L, L))
    row_sum = np.zeros((nb, L, L))  # row i: sum over j >= i of the pair sums, j increasing, off-diagonal twice
    done, total_pairs = 0, nb * (nb + 1) // 2
    for g0 in range(0, nb, group):
        rows = {i: features(i) for i in range(g0, min(g0 + group, nb))}
        for i in rows:
            block_trace[i], block_abs[i], block_norms[i] = rows[i].trace, rows[i].trace_abs, rows[i].norms
        for h0 in range(g0, nb, group):
            cols = rows if h0 == g0 else {j: features(j) for j in range(h0, min(h0 + group, nb))}
            for i, fi in rows.items():
                for j, fj in cols.items():
                    if j >= i:
                        s = pair_sum(prob, fi, fj)
                        row_sum[i] += s if i == j else 2.0 * s
                        done += 1
                        if progress is not None:
                            progress(done, total_pairs)
            cols = fi = fj = None  # no reference to this group while the next one is computed
    trace, blocks, trace_abs, norms = np.zeros(L), np.zeros((L, L)), np.zeros(L), np.zeros((L, L))
    for k in range(nb):
        trace += block_trace[k]
        blocks += row_sum[k]
        trace_abs += block_abs[k]
        norms += block_norms[k]
    return Moments(trace, blocks, trace_abs, norms)


def products(prob: Any, V: np.ndarray) -> np.ndarray:
    """sum_n H_n V[j] for V (k, P) float64, block by block in block order (:func:`block_hvp`)."""
    off = offsets(prob)
    N, B = prob.n_samples, prob.batch_size
    out = np.zeros_like(V)
    for lo in range(0, N, B):
        hi = min(lo + B, N)
        out += block_hvp(prob, prob.weights, prob.biases, np.asarray(prob.X[lo:hi], dtype=np.float64),
                         label_rows(prob, lo, hi), V, off)
    return out
