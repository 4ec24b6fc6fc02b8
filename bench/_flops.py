"""Cost model of the pair phase, and the machine's GEMM rate (benchmark helpers).

``pair_flops`` counts the floating-point operations of the Gram GEMMs that contract the
per-sample features of two samples (DESIGN.md sections 4 and 5), summed over the upper
triangle of sample pairs, at 2 flops per multiply-add.  Only Gram GEMMs are counted: the
element-wise combination of the B x B' Gram blocks (products with alpha, beta, gamma and
the final sums, O(L^2) per pair) and the per-sample feature phase (O(N * sum d^3)) are not.

Notation (per sample pair, in multiply-adds, "MA"): L layers, widths d_0..d_L, C = d_L,
e_l = d_{l-1} + [layer l has a bias] (the augmented input of layer l).

Two variants:

``structured`` (the default; the cost model of DESIGN.md section 5 with its fast paths)
    shared Grams      alpha_l = beta_l:  sum_l e_l;    gamma_m (full Hessian): sum_{m>=2} d_m
    l = m = L         <A, A'>:                          C^2
    l = m = L-1       <M, M'> with M = U U^T + diag(rho), U = D W_L^T S (d x C):
                      ||U^T U'||_F^2 -> C^2 d;  the three rho terms -> 3 d   (GGN: C^2 d),
                      or the dense d^2 Gram where that is cheaper (d < C^2)
    l = m < L-1       dense <M_l, M_l'>:                d_l^2
    l < m = L         <G_lL, G_lL'> with G_lL = T^T A (d_l x C):  d_l C
    l < m < L         dense <G_lm, G_lm'>:              d_l d_m
    full Hessian only, l < m:
      m = l+1         <Q, Q'> = s_l . s_l':  d_l;   cross terms X.Y', Y.X':  2 d_l d_m
      m >= l+2        dense <Q, Q'>:  d_{m-1} d_l;  cross terms (G d')(Q'^T a) both ways:
                      2 (d_l d_m + d_{m-1} d_l)
    GGN (G_lm = J_l^T A J_m, A = S S^T, U_l = J_l^T S of d_l x C, U_L = S):
                      <G_lm, G_lm'> = <U_l^T U_l', U_m^T U_m'>, so per pair sum_l C^2 d_l
                      for the C x C Grams K_l, plus C^2 per (l, m), l <= m, plus alpha --
                      or, where cheaper, the dense Grams sum_{l<=m} d_l d_m (as the dense variant).
    On W1 (64-128-10, biases, full Hessian) this is 17,456 MA per pair, 5.64e10 flops for
    N = 1797, of which the C^2 h term is 73 % -- the numbers the performance issue starts from.

``dense`` (what the v0.1 engine on main does: no structure fast paths)
    every <G_lm, G_lm'> as a dense d_l d_m Gram (also l = m), alpha_l once per l,
    beta_m and gamma_m recomputed for every (l, m), l < m; Q and cross terms as above.

Pairs: N (N + 1) / 2 sample pairs (the upper triangle including n = n').  With
``batch=B`` the count follows the engine's blocking instead: every block pair I <= J of
the upper triangle is contracted in full, sum_{I <= J} |I| |J| pairs (N^2/2 + N B/2 for
equal blocks).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

VARIANTS = ("structured", "dense")


def _widths(dims: Sequence[int], bias: bool | Sequence[bool]) -> tuple[list[int], list[int]]:
    d = [int(x) for x in dims]
    L = len(d) - 1
    if L < 1:
        raise ValueError("dims needs at least an input and an output width")
    b = [bool(bias)] * L if isinstance(bias, (bool, np.bool_)) else [bool(x) for x in bias]
    if len(b) != L:
        raise ValueError("bias: one flag per layer")
    e = [0] + [d[l - 1] + int(b[l - 1]) for l in range(1, L + 1)]  # e[l], l = 1..L
    return d, e


def pair_multiply_adds(dims: Sequence[int], bias: bool | Sequence[bool] = True, curvature: str = "hessian",
                       variant: str = "structured") -> dict[str, int]:
    """Multiply-adds of the Gram GEMMs for one sample pair, by term (see the module docstring)."""
    if curvature not in ("hessian", "ggn"):
        raise ValueError("curvature must be 'hessian' or 'ggn'")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}")
    d, e = _widths(dims, bias)
    L = len(d) - 1
    C = d[L]
    hess = curvature == "hessian"
    terms: dict[str, int] = {}

    def add(key: str, value: int) -> None:
        terms[key] = terms.get(key, 0) + int(value)

    if variant == "structured":
        add("alpha", sum(e[1:]))
        if hess:
            add("gamma", sum(d[m] for m in range(2, L + 1)))
        if not hess:
            via_k = sum(C * C * d[l] for l in range(1, L + 1)) + C * C * L * (L + 1) // 2
            dense = sum(d[l] * d[m] for l in range(1, L + 1) for m in range(l, L + 1))
            if via_k <= dense:
                for l in range(1, L + 1):
                    add(f"K_{l} (C^2 d_{l})", C * C * d[l])
                add("<K_l, K_m> (C^2 per l<=m)", C * C * L * (L + 1) // 2)
            else:
                for l in range(1, L + 1):
                    for m in range(l, L + 1):
                        add(f"<G_{l}{m}>", d[l] * d[m])
            return terms
        for l in range(1, L + 1):
            for m in range(l, L + 1):
                if l == m:
                    if l == L:
                        add(f"<G_{l}{m}> (C^2)", C * C)
                    elif l == L - 1 and C * C * d[l] + 3 * d[l] < d[l] * d[l]:
                        add(f"<G_{l}{m}> (C^2 d)", C * C * d[l])
                        add(f"<G_{l}{m}> rho (3d)", 3 * d[l])
                    else:
                        add(f"<G_{l}{m}> (d^2)", d[l] * d[l])
                    continue
                add(f"<G_{l}{m}>", d[l] * (C if m == L else d[m]))
                if m == l + 1:
                    add(f"<Q_{l}{m}>", d[l])
                    add(f"cross_{l}{m}", 2 * d[l] * d[m])
                else:
                    add(f"<Q_{l}{m}>", d[m - 1] * d[l])
                    add(f"cross_{l}{m}", 2 * (d[l] * d[m] + d[m - 1] * d[l]))
        return terms

    # dense: mirrors pair_sum() of the v0.1 engine (cpp/wsbound/features.cpp)
    for l in range(1, L + 1):
        add("alpha", e[l])
        for m in range(l, L + 1):
            add(f"<G_{l}{m}>", d[l] * d[m])
            if l == m:
                continue
            add("beta", e[m])
            if hess:
                add("gamma", d[m])
                if m == l + 1:
                    add(f"<Q_{l}{m}>", d[l])
                    add(f"cross_{l}{m}", 2 * d[l] * d[m])
                else:
                    add(f"<Q_{l}{m}>", d[m - 1] * d[l])
                    add(f"cross_{l}{m}", 2 * (d[l] * d[m] + d[m - 1] * d[l]))
    return terms


def n_pairs(N: int, batch: int | None = None) -> int:
    """Sample pairs contracted: N (N+1)/2, or with ``batch`` the engine's full block pairs I <= J."""
    N = int(N)
    if batch is None:
        return N * (N + 1) // 2
    B = int(batch)
    sizes = [min(B, N - lo) for lo in range(0, N, B)]
    total = 0
    for i, bi in enumerate(sizes):
        total += bi * bi + bi * sum(sizes[i + 1:])  # the diagonal block in full, then the blocks J > I
    return total


def pair_flops(dims: Sequence[int], bias: bool | Sequence[bool], N: int, curvature: str = "hessian", *,
               variant: str = "structured", batch: int | None = None) -> float:
    """Flops of the pair phase: 2 * (multiply-adds per pair) * (pairs).  See the module docstring."""
    return 2.0 * sum(pair_multiply_adds(dims, bias, curvature, variant).values()) * n_pairs(N, batch)


def gemm_rate(dtype: str = "float64", n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` NumPy matmul rate (flop/s) of two n x n matrices, 2 n^3 flops each."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    c = np.empty((n, n), dtype=dtype)
    np.matmul(a, b, out=c)  # warm-up (threads, pages)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"n": n, "repeats": repeats, "best_s": best, "flops_per_s": 2.0 * n ** 3 / best,
            "median_flops_per_s": 2.0 * n ** 3 / float(np.median(times))}
