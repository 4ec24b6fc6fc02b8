"""The cost model of the streamed engine (DESIGN.md section 5), as the code implements it.

Per sample pair (n, n') the pair phase is a set of Gram products, one multiply-add per
feature value: ``pair_flops`` counts them (2 flops each).  ``feature_doubles`` is the
float64 storage of one sample's features.  Both depend on the contraction path:

- generic: dense G_lm = T_ml^T M_m blocks (and dense Q_lm, cross factors for the Hessian);
- structured: the GGN through C x C Gram blocks of V_l = T_{L,l}^T S (A = S S^T), and for
  the Hessian M_{L-1} = V V^T + diag(rho) (C-rank plus diagonal) for the (L-1, L-1) block.
"""

from __future__ import annotations

from collections.abc import Sequence

#: Relative cost of a memory-bound elementwise multiply-add against one inside a GEMM,
#: used only to choose a path.
_ELEMENTWISE_WEIGHT = 4.0
#: The structured path's GEMMs are short (inner dimension d_l rather than d_l d_m) and run
#: at a lower rate, so it is chosen only when it saves at least this fraction of the work.
_STRUCTURED_MAX_RATIO = 0.6


def _terms(dims: Sequence[int], has_bias: Sequence[bool], hessian: bool, structured: bool) -> tuple[float, float]:
    """(GEMM multiply-adds, elementwise multiply-adds) per sample pair."""
    L = len(dims) - 1
    d = dims
    aug = [0] + [d[l - 1] + int(has_bias[l - 1]) for l in range(1, L + 1)]
    C = d[L]
    gemm = float(sum(aug[1:]))  # alpha_l
    elem = 0.0
    if structured and not hessian:
        gemm += C * C * sum(d[1:])  # Psi_l = V_l^T V_l'
        elem += C * C * L * (L + 1) / 2  # <Psi_l, Psi_m> block sums
        return gemm, elem
    lowrank = structured and L >= 2
    for l in range(1, L + 1):
        for m in range(l, L + 1):
            if l == m:
                if lowrank and l == L - 1:
                    gemm += C * C * d[l] + 3 * d[l]
                    elem += C * C
                else:
                    gemm += d[l] * d[m]
                continue
            gemm += d[l] * d[m] + aug[m]  # G Gram, beta
            if hessian:
                gemm += d[m]  # gamma
                if m == l + 1:
                    gemm += d[l] + 2 * d[l] * d[m]  # sigma' Gram, cross factors
                else:
                    gemm += d[m - 1] * d[l] + 2 * (d[l] * d[m] + d[m - 1] * d[l])  # Q Gram, dense cross
                    elem += 2 * d[l]
    return gemm, elem


def pair_flops(dims: Sequence[int], has_bias: Sequence[bool], hessian: bool, structured: bool) -> float:
    """Flops (2 per multiply-add) of the pair phase per ordered sample pair."""
    gemm, elem = _terms(dims, has_bias, hessian, structured)
    return 2.0 * (gemm + elem)


def choose_structured(dims: Sequence[int], has_bias: Sequence[bool], hessian: bool) -> bool:
    """Whether the structured contraction is cheaper than the generic one."""
    if hessian and len(dims) - 1 < 2:
        return False  # logistic regression: nothing to exploit for the Hessian
    costs = []
    for structured in (False, True):
        gemm, elem = _terms(dims, has_bias, hessian, structured)
        costs.append(gemm + _ELEMENTWISE_WEIGHT * elem)
    return costs[1] < _STRUCTURED_MAX_RATIO * costs[0]


def feature_doubles(dims: Sequence[int], has_bias: Sequence[bool], hessian: bool, structured: bool) -> int:
    """Float64 values held per sample by a block's features."""
    L = len(dims) - 1
    d = dims
    C = d[L]
    f = sum(d[l - 1] + int(has_bias[l - 1]) for l in range(1, L + 1))  # augmented inputs
    if structured and not hessian:
        return f + C * sum(d[1:])  # V_l^T stacks
    f += 2 * sum(d[1:])  # delta and sigma'
    f += sum(d[l] * d[m] for l in range(1, L + 1) for m in range(l, L + 1))  # G blocks
    if hessian:
        f += sum(d[m - 1] * d[l] for l in range(1, L + 1) for m in range(l + 2, L + 1))  # dense Q
        f += 2 * sum(d[l] * d[l + 1] for l in range(1, L))  # cross-term factors
        if structured and L >= 2:
            f += (C + 2) * d[L - 1] - d[L - 1] ** 2  # V, rho, u2 instead of dense M_{L-1}
    return f


def pair_scratch_doubles(dims: Sequence[int], batch: int, hessian: bool, structured: bool) -> int:
    """Float64 scratch of one thread contracting a block pair (the structured path's C x C
    Gram blocks are computed in row chunks of at most about 4e6 values)."""
    L = len(dims) - 1
    widest = max(dims[1:-1], default=0) if hessian and L > 2 else 0
    psi = min(4_000_000, L * (batch * dims[-1]) ** 2) if structured else 0
    return batch * batch * (8 + widest) + psi
