"""Type stubs for the compiled core (_core, and its AVX2 + FMA build _core_avx2)."""

from typing import Callable, Optional, Sequence

import numpy as np
import numpy.typing as npt

class Cancelled(KeyboardInterrupt): ...

def moments(
    weights: Sequence[npt.NDArray[np.float64]],
    biases: Sequence[Optional[npt.NDArray[np.float64]]],
    act_codes: Sequence[int],
    act_params: Sequence[float],
    X: npt.NDArray[np.floating],
    labels: npt.NDArray[np.int64] | npt.NDArray[np.float64],
    hessian: bool,
    structured: bool,
    batch: int,
    group: int,
    threads: int,
    progress: Optional[Callable[[int, int], None]] = None,
    f32: bool = False,
    loss: int = 0,
    parts: Sequence[int] = (),
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(trace per layer (L,), blocks (L, L), trace_abs (L,), norms (L, L)): sum_n tr H_n^{ll};
    for l <= m, sum_{n,n'} <H_n^{lm}, H_n'^{lm}>; and the magnitudes of docs/numerics.md
    section 4 for the rounding allowances, sum_n |a~_{l-1}|^2 sum_k |(M_l)_kk| and, for
    l <= m, sum_n nu_n^{lm} (nu_n^{lm} >= |H_n^{lm}|_F); for the Hessian of mse and bce both
    include the rounding addition of section 5.  Lower triangles zero; unnormalised.

    loss: 0 = softmax cross-entropy, 1 = mse sum_k (z_k - y_k)^2, 2 = bce with logits
    sum_k softplus(z_k) - y_k z_k (per sample, summed; labels are the targets y for 1 and 2,
    class indices one-hot encoded); another code is a ValueError."""

def hvp(
    weights: Sequence[npt.NDArray[np.float64]],
    biases: Sequence[Optional[npt.NDArray[np.float64]]],
    act_codes: Sequence[int],
    act_params: Sequence[float],
    X: npt.NDArray[np.floating],
    labels: npt.NDArray[np.int64] | npt.NDArray[np.float64],
    V: npt.NDArray[np.float64],
    hessian: bool,
    batch: int,
    threads: int,
    loss: int = 0,
) -> npt.NDArray[np.float64]:
    """(k, P): row j is sum_n H_n V[j] (or the GGN) for V of shape (k, P), C-contiguous
    float64.  Unnormalised.  loss as in moments()."""

def pair_sums(
    weights: Sequence[npt.NDArray[np.float64]],
    biases: Sequence[Optional[npt.NDArray[np.float64]]],
    act_codes: Sequence[int],
    act_params: Sequence[float],
    X_blocks: list[npt.NDArray[np.floating]],
    label_blocks: list[npt.NDArray[np.int64] | npt.NDArray[np.float64]],
    pairs: npt.NDArray[np.integer],
    hessian: bool,
    structured: bool,
    threads: int,
    progress: Optional[Callable[[int, int], None]] = None,
    f32: bool = False,
    loss: int = 0,
    parts: Sequence[int] = (),
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64],
           npt.NDArray[np.float64]]:
    """The tiles of moments() for block k = (X_blocks[k], label_blocks[k]) and the block pairs
    (i, j), i <= j, of pairs (T, 2): (blocks_used (K,) int64, the referenced blocks in increasing
    order; trace (K, L), trace_abs (K, L), norms (K, L, L): each such block's share of moments()'
    trace, trace_abs and norms; pair_out (T, L, L): each pair's unweighted sum over n in I, n' in J).
    With the blocks moments() cuts and the same options, its blocks equal
    sum_i sum_{j >= i} (1 if i == j else 2) pair_out(i, j), bitwise, summed in that order.
    Lower triangles zero; unnormalised.  loss as in moments()."""
