"""The cost model of the streamed engine (docs/design.md, "Cost model"), as the code implements it.

Per sample pair (n, n') the pair phase is a set of Gram products, one multiply-add per
feature value: ``pair_flops`` counts them (2 flops each).  ``feature_doubles`` is the
float64 storage of one sample's features.  Both depend on the contraction path:

- generic: dense G_lm = T_ml^T M_m blocks (and dense Q_lm for the Hessian; its cross terms go through G delta' products);
- structured (docs/structured.md): the curvature blocks that touch A = w (diag p - p p^T)
  through the C x C matrices K_l = T_l T_l'^T and an O(C^2) identity per sample pair: the
  whole GGN, and the Hessian's (L-1, L-1) and (L-1, L) blocks (M_{L-1} = V V^T + diag(rho)).
"""

from __future__ import annotations

from collections.abc import Sequence

#: Relative cost of an elementwise multiply-add (vectorised over n', outside a GEMM) against
#: one inside a GEMM, used only to choose a path (fitted on this machine: 64-16-10 ... 64-512-10,
#: depths 2-4, C = 3 ... 100, both curvatures; bench/calibrate_paths.py).
_ELEMENTWISE_WEIGHT = 2.5
#: The structured path is chosen only when its weighted cost is below this fraction of the
#: generic one (its GEMMs are shorter; near a tie the generic path is the safer choice).
_STRUCTURED_MAX_RATIO = 0.95


def _terms(dims: Sequence[int], has_bias: Sequence[bool], hessian: bool, structured: bool,
           diagonal: bool = False) -> tuple[float, float]:
    """(GEMM multiply-adds, elementwise multiply-adds) per sample pair.  ``diagonal``: the loss's
    A is diagonal (mse, bce), so that the K route's identity is one weighted sum per (l, m)
    (docs/design.md, "Losses") instead of four terms after a shift to the reference classes."""
    L = len(dims) - 1
    d = dims
    aug = [0] + [d[l - 1] + int(has_bias[l - 1]) for l in range(1, L + 1)]
    C = d[L]
    R = C * (C + 1) // 2  # distinct entries of the symmetric K_{L-1}
    gemm = float(sum(aug[1:]))  # alpha_l
    elem = 0.0
    if structured and not hessian:  # docs/structured.md: K_l for every l, O(C^2) identity per (l, m)
        if diagonal and L == 1:  # h . h' only
            return gemm, elem + C
        if L == 2:  # K_1 packed; one fused, vectorised pass over it (~3 per entry), then O(C)
            return gemm + R * d[1], elem + (2 * C * C + 3 * C if diagonal else 3 * R + 10 * C)
        if L >= 3:  # K_{L-1} packed, then unpacked for kh, u, v
            gemm += R * d[L - 1]
            elem += 0 if diagonal else 4 * C * C
        gemm += C * C * sum(d[1:L - 1])  # K_l = T_l T_l'^T, l <= L - 2
        if diagonal:  # no shift: 2 C^2 to prepare each K_l, l < L; C^2 per (l, m < L), C per (l, L)
            elem += 2 * C * C * (L - 1) + C * C * L * (L - 1) / 2 + C * L
        else:
            elem += 3 * C * C * max(L - 2, 0) + (C * C + 2 * C) * L * (L + 1) / 2
        return gemm, elem
    kroute = structured and L >= 2
    for l in range(1, L + 1):
        for m in range(l, L + 1):
            if kroute and l == L - 1:
                if m == l:  # (L-1, L-1) and (L-1, L) together through K_{L-1}
                    gemm += (1 + R + 2 * C) * d[l] + 3 * d[l] + aug[L] + C
                    # fused pass over the packed K, then O(C) and the cross terms
                    elem += 2 * C * C + 8 * C if diagonal else 3 * R + 14 * C
                continue
            if l == m:
                gemm += d[l] * d[m]
                continue
            gemm += d[l] * d[m] + aug[m]  # G Gram, beta
            if hessian:
                gemm += d[m]  # gamma
                if m == l + 1:
                    gemm += d[l] + 2 * d[l] * d[m]  # sigma' Gram, G delta' products of the cross terms
                    elem += 4 * min(d[l], d[m])  # the sum over the narrower of r (or c), both ways
                else:
                    gemm += d[m - 1] * d[l] + 2 * (d[l] * d[m] + d[m - 1] * d[l])  # Q Gram, dense cross
                    elem += 2 * d[l]
    return gemm, elem


def pair_flops(dims: Sequence[int], has_bias: Sequence[bool], hessian: bool, structured: bool,
               diagonal: bool = False) -> float:
    """Flops (2 per multiply-add) of the pair phase per ordered sample pair."""
    gemm, elem = _terms(dims, has_bias, hessian, structured, diagonal)
    return 2.0 * (gemm + elem)


def choose_structured(dims: Sequence[int], has_bias: Sequence[bool], hessian: bool, diagonal: bool = False) -> bool:
    """Whether the structured contraction is cheaper than the generic one (``diagonal``: the
    loss's A is diagonal)."""
    if hessian and len(dims) - 1 < 2:
        return False  # logistic regression: nothing to exploit for the Hessian
    costs = []
    for structured in (False, True):
        gemm, elem = _terms(dims, has_bias, hessian, structured, diagonal)
        costs.append(gemm + _ELEMENTWISE_WEIGHT * elem)
    return costs[1] < _STRUCTURED_MAX_RATIO * costs[0]


def feature_doubles(dims: Sequence[int], has_bias: Sequence[bool], hessian: bool, structured: bool) -> int:
    """Float64 values held per sample by a block's features."""
    L = len(dims) - 1
    d = dims
    C = d[L]
    f = sum(d[l - 1] + int(has_bias[l - 1]) for l in range(1, L + 1))  # augmented inputs
    f += 2  # the reference class r and q = 1 - p_r (docs/numerics.md section 1)
    if structured and not hessian:  # sigma', delta, p, w and the stacked T_l for l <= L - 2
        return f + 2 * sum(d[1:]) + C + 1 + C * sum(d[1:L - 1])
    f += 2 * sum(d[1:])  # delta and sigma'
    f += sum(d[l] * d[m] for l in range(1, L + 1) for m in range(l, L + 1))  # G blocks
    if hessian:
        f += sum(d[m - 1] * d[l] for l in range(1, L + 1) for m in range(l + 2, L + 1))  # dense Q
        if structured and L >= 2:  # rho, u, p, w instead of G_{L-1,L-1} and G_{L-1,L} (r, q: above)
            f += 2 * d[L - 1] + C + 1 - d[L - 1] ** 2 - d[L - 1] * C
    return f


def feature_scratch_doubles(dims: Sequence[int], hessian: bool, structured: bool) -> int:
    """Float64 intermediates per sample that the Python backends' batched features hold at once
    while a block is computed, beyond the features kept: the forward pass's vectors, M_L, one
    (d_l, d_m) product before it is scaled (where dense curvature blocks are formed: not on
    the structured path of the GGN or of a one-hidden-layer Hessian), and on the structured
    path diag(T^T A T)'s three (C, d_l) stacks (T, T - p^T T, its square)."""
    L = len(dims) - 1
    d = dims
    C = d[L]
    s = 2 * C * C + 4 * sum(d[1:])
    if structured:
        s += 3 * C * max(d[1:L], default=0)
    if not structured or (hessian and L > 2):
        s += max((d[l] * d[m] for l in range(1, L) for m in range(l, L + 1)), default=0)
    return s


def feature_flops(dims: Sequence[int], hessian: bool, structured: bool) -> float:
    """Flops (2 per multiply-add) of one sample's features (forward and backward pass, the
    curvature blocks the path keeps); used to decide how many blocks' features to cache."""
    L = len(dims) - 1
    d = dims
    C = d[L]
    ma = float(sum(d[l - 1] * d[l] for l in range(1, L + 1)))  # forward
    if structured and not hessian:
        ma += C * sum(d[l] * d[l + 1] for l in range(1, L - 1)) + 2 * C * d[L - 1] * (L >= 2)
        return 2.0 * ma
    kroute = structured and L >= 2
    for l in range(L - 1, 0, -1):
        ma += d[l] * d[l + 1]  # g_l
        if not (kroute and l == L - 1 and L == 2):
            ma += d[l + 1] * d[l] ** 2  # M_l = G_{l,l+1} W_{l+1} D_l
        ma += sum(d[l + 1] * d[l] * d[m] for m in range(l + 1, L + 1))  # G_{l,m}
        if hessian:
            ma += sum(d[m - 1] * d[m - 2] * d[l] for m in range(l + 3, L + 1))  # dense Q
    return 2.0 * ma


def pair_scratch_doubles(dims: Sequence[int], batch: int, hessian: bool, structured: bool,
                         cross_copies: int) -> int:
    """Float64 scratch of the Python backends (NumPy, torch) contracting a block pair: a few
    (B, B') Gram matrices (on the GGN's K route all L alphas at once, w w', and the two Grams of
    the reference-shifted p) and ``cross_copies`` (B, B', d_l) temporaries of the batched cross
    terms.  (The K route's chunks of sample pairs are budgeted apart, _planning.blocks.plan_python;
    the C++ engine's scratch is cpp_worker_doubles.)"""
    L = len(dims) - 1
    # The cross terms' G delta' products, (B', B d_l), wherever a generic (l, m > l) block is left.
    widest = max(dims[1:-1], default=0) if hessian and (L > 2 or not structured) else 0
    grams = max(8, L + 3) if structured and not hessian else 8
    return batch * batch * (grams + cross_copies * widest)


# The C++ engine's own memory (cpp/wsbound/engine.cpp, features.cpp, pairs.cpp, kroute.cpp), for
# its block plan (plan_blocks(cpp=True), wsb.plan's memory_bytes): checked against the heap
# high-water mark of bound() (heaptrack and an allocation counter; tests/test_cpp_memory.py) on both paths and
# curvatures, 0-4 hidden layers, 1-4 threads, float64 and float32, tight budgets (the peak
# came to 0.4-1.0 of this count, within memory_limit).  The features of the cached blocks are
# feature_doubles, as for the other backends.

#: Eigen's GEMM packs its operands (GeneralBlockPanelKernel.h, GeneralMatrixMatrix.h): kc x mc
#: values of the left one, mc up to all its rows, and kc x nc of the right one, at most
#: 1.5 MB / 16 values; kc <= min(k, 376) for an L1 data cache up to 48 KiB.  Buffers of up to
#: 128 KiB (EIGEN_STACK_ALLOCATION_LIMIT) are on the stack.
_GEMM_KC = 384
_GEMM_RIGHT = 98304
_GEMM_ON_STACK = 16384


def cpp_fixed_doubles(dims: Sequence[int], has_bias: Sequence[bool]) -> int:
    """Float64 values the C++ engine holds once per call: its copy of the weights (P), and
    64 KiB for what is not itemised (bound()'s Python objects, threads, allocator rounding;
    where features dominate, the rest of this model came within 0.3 % of the measured peak)."""
    return sum(dims[l - 1] * dims[l] + dims[l] * int(has_bias[l - 1]) for l in range(1, len(dims))) + 8192


def cpp_group_doubles(n_layers: int, n_blocks: int, group: int) -> int:
    """Float64 values of the C++ engine's bookkeeping with ``group`` blocks cached per side:
    per block its partial sums and magnitudes (four (L+1)^2 rows) and, for the two groups held, the objects
    and allocation headers of its features; per block pair of two groups its task and result
    (noticeable only for small blocks: batch 1 of a logistic regression doubled the memory)."""
    L = n_layers
    np_ = (L + 1) ** 2
    # RowMat objects, malloc headers; trace, trace_abs and norms
    per_block = 3 * (4 * (L + 1) + 2 * np_) + 6 * (L * L + 4 * L + 12) + 32 + 2 * (L + 1) + np_
    return 4 * n_blocks * np_ + 2 * group * per_block + group * group * (6 + np_)


def cpp_worker_doubles(dims: Sequence[int], has_bias: Sequence[bool], batch: int, hessian: bool,
                       structured: bool, diagonal: bool = False) -> int:
    """Float64 values one C++ worker holds besides the cached blocks' features: its pair
    scratch (PairScratch, kept from one block pair to the next, so also while the worker
    computes features), one block's intermediates in block_features, and the packed operands
    of one GEMM.  Each buffer at its largest size (B = B' = batch).  ``diagonal`` (mse, bce):
    the Hessian's rounding addition holds 3 B max d_l + max |W_l| + B ((L+1)^2 + L + 1) more
    while a block's features are computed."""
    L = len(dims) - 1
    d = dims
    C, B = d[L], batch
    R = C * (C + 1) // 2
    dl = d[L - 1]  # d_{L-1}, the width the K route works over
    kroute_hessian = structured and hessian and L >= 2
    kroute_ggn = structured and not hessian
    left = right = 0  # the largest packed operands of one GEMM

    def gemm(m: int, k: int, n: int) -> None:  # a product (m, k) x (k, n)
        nonlocal left, right
        kc = min(k, _GEMM_KC)
        left, right = max(left, m * kc), max(right, min(kc * n, _GEMM_RIGHT))

    def gemm_rows(h: int) -> int:  # rows_per_gemm (kroute.cpp), left operands of width d_{L-1}
        return min(B, max(1, min(16, 131072 // max(h * B, 1), 131072 // max(h * dl, 1))))

    def cross_rows(w: int) -> int:  # cross_rows (pairs.cpp), at most the block
        return min(B, max(1, 262144 // max(1, w * B)))

    # block_features: the block's inputs and labels, a and z of the forward pass, g, sigma''
    # (computed for every curvature); the per-sample magnitudes (tr A, |diag M_l|, g_lm);
    # the shifted quadratic forms' three rows (squared_v_rows, the GGN's tau_l)
    np_ = (L + 1) ** 2
    feat = B * (d[0] + 2 * C + max(d[:L]) + max(d[1:L], default=0) + sum(d[1:L]))
    feat += B * (1 + (L + 1) + (0 if kroute_ggn else np_))
    for l in range(1, L + 1):
        gemm(B, d[l - 1], d[l])  # forward (and g, transposed)
    if structured and L >= 2:
        feat += 3 * max(d[1:L])
    if kroute_ggn:  # T_{L-1} before Omega replaces it (M_L = A is not formed on this path)
        feat += B * C * dl if L >= 3 else 0
        for l in range(1, L - 1):
            gemm(B * C, d[l + 1], d[l])  # T_l = T_{l+1} W_{l+1} D_l
    else:  # per-sample products of the backward pass and of the G and Q blocks
        for l in range(1, L):
            gemm(d[l], d[l + 1], max(d[l:]))
            for m in range(l + 2, L + 1) if hessian else ():
                gemm(d[m - 1], d[m - 2], d[l])
    if kroute_hessian and L >= 3:  # M_{L-1} and G_{L-1,L}, needed only to build the blocks below
        feat += B * (dl * dl + dl * C)

    if kroute_ggn:  # pair_sum_ggn
        pair = L * B * B + 5 * C * B + 8 * B  # alphas; p'^T, u, v, diag(A')^T, the shift's dc; row arrays
        gemm(B, max(d) + 1, B)  # alphas
        rows = gemm_rows(R)
        if L >= 2:
            pair += (R + C) * dl + rows * R * (dl + B)  # Omega, W_L; left, k1
            gemm(rows * R, dl, B)
        if L >= 3:
            pair += C * B * sum(d[1:L - 1]) + (L - 2) * rows * C * C * B  # tj; kt
            pair += 2 * (L - 1) * C * C * B + 2 * L * C * B  # KRows k, kh, u, v per level
            gemm(rows * C, max(d[1:L - 1]), C * B)
    else:
        pair = 4 * B * B  # alpha, beta, gram, inner
        gemm(B, max(max(d) + 1, max(d[l] * d[m] for l in range(1, L + 1) for m in range(l, L + 1))), B)
        if kroute_hessian:  # k_route_hessian
            H = 1 + R + C
            rows = gemm_rows(H)
            pair += (R + C) * dl + B * dl + rows * (H + C) * (dl + B) + 5 * C * B + 17 * B
            gemm(rows * H, dl, B)
        p2 = xt = ct = z = 0
        for l in range(1, L + 1):
            for m in range(l + 1, L + 1):
                if not hessian or (kroute_hessian and l == L - 1):
                    continue
                if m > l + 1:  # add_dense_cross: G delta' of the whole block, Q^T b
                    p2, z = max(p2, B * B * d[l]), max(z, B * d[l])
                    gemm(B, d[m], B * d[l])
                    gemm(B, d[m - 1], d[l])
                elif d[m] >= d[l]:
                    c = cross_rows(d[l])
                    p2 = max(p2, B * c * d[l])
                    gemm(B, d[m], c * d[l])
                else:  # narrow d_{l+1}
                    c = cross_rows(d[m]) * d[m]
                    p2, xt, ct = max(p2, c * B), max(xt, c * d[l]), max(ct, d[m] * B)
                    gemm(c, d[l], B)
        pair += p2 + xt + ct + z
    packed = sum(v for v in (left, right) if v > _GEMM_ON_STACK)
    if diagonal and hessian and L >= 2:
        feat += 3 * B * max(d) + max(d[l - 1] * d[l] for l in range(1, L + 1)) + B * ((L + 1) ** 2 + L + 1)
    return feat + pair + packed


# Exact GEMM flop counts of the Python engine's pair sum (held to torch's FlopCounterMode by the
# tests): what the benchmarks divide by the time.  The planner's pair_flops above weighs the same
# terms per sample pair with the elementwise work added, to choose paths and block sizes.


def block_pair_flops(dims: Sequence[int], has_bias: Sequence[bool], hessian: bool, bI: int, bJ: int,
                     structured: bool = False, diagonal: bool = False) -> int:
    """Floating-point operations of the matrix products in one pair_sum of a bI x bJ block pair.

    Counts 2 flops per multiply-add of every GEMM / batched GEMM / einsum contraction that
    the engine's pair_sum performs on the path ``structured`` selects, term by term; the
    elementwise products and sums are left out (a few per Gram matrix against inner
    dimensions of d or d^2; on the K route a few per entry of each C x C matrix K, against
    the C(C+1)/2 d of forming K_{L-1}).
    """
    L = len(dims) - 1
    d = list(dims)
    C = d[L]
    na = [0] + [d[l - 1] + int(has_bias[l - 1]) for l in range(1, L + 1)]  # len(at[l])
    pq = 2 * bI * bJ
    f = 0
    if structured and not hessian:  # kroute._pair_sum_ggn
        # alpha_l; then h . h' (diagonal A), or pn . pn' and phat . phat' (S_I's terms)
        f += pq * (sum(na[1:]) + (C if diagonal else 2 * C))
        if L >= 2:
            f += pq * (C * (C + 1) // 2) * d[L - 1]  # packed K_{L-1}
        f += pq * C * C * sum(d[1:L - 1])  # K_l = T_l T_l'^T, l <= L - 2
        if not diagonal:
            f += pq * (L - 1) * _k_terms_madds(C)  # K p', K^T p, p^T K p' of every K but K_L = I
        trace_madds = _tr_hkhk_madds if diagonal else _tr_akak_madds
        f += pq * sum(trace_madds(C, l == L, m == L) for l in range(1, L + 1) for m in range(l, L + 1))
        return int(f)
    kroute = structured and L >= 2
    if kroute:  # kroute._pair_sum_last
        # alpha, beta, gamma, the u/rho Grams; phat . phat', the pn/delta Grams
        f += pq * (na[L - 1] + na[L] + C + 3 * d[L - 1] + 3 * C)
        f += pq * (1 + C * (C + 1) // 2 + C) * d[L - 1]  # [s . s'; packed K; E]
        f += pq * C * d[L - 1]  # E'
        if diagonal:
            f += pq * (_tr_hkhk_madds(C, False, False) + _tr_hkhk_madds(C, False, True))
            f += pq * 2 * C  # the two cross terms
        else:
            f += pq * (_k_terms_madds(C) + _tr_akak_madds(C, False, False) + _tr_akak_madds(C, False, True))
            f += pq * 4 * C  # the two cross terms
    for l in range(1, L + 1):
        if kroute and l == L - 1:
            continue
        f += pq * na[l]  # alpha
        for m in range(l, L + 1):
            f += pq * d[l] * d[m]  # KG
            if l == m:
                continue
            f += pq * na[m]  # at[m] Gram
            if not hessian:
                continue
            f += pq * d[m]  # gamma
            if m == l + 1:
                f += pq * d[l]  # sigma' Gram
                f += 2 * (pq * d[l] * d[m] + pq * min(d[l], d[m]))  # two adjacent crosses: GEMM, then the narrower sum
            else:
                f += pq * d[m - 1] * d[l]  # Q Gram
                # two dense crosses: P1 (b Q), P2 (G delta); their product summed over r is elementwise
                f += 2 * (pq * d[m - 1] * d[l] + pq * d[l] * d[m])
    return int(f)


def _k_terms_madds(C: int) -> int:
    """Multiply-adds per pair of _k_terms: K p', K^T p (C^2 each), p^T K p' (C)."""
    return 2 * C * C + C


def _tr_akak_madds(C: int, k_is_identity: bool, kt_is_identity: bool) -> int:
    """Multiply-adds per pair of the einsums in _tr_akak(k, kt) (the elementwise products left out)."""
    if k_is_identity:  # t1 = (1 + [r = r']) pn . pn' + gathered terms: elementwise
        t1 = 0
    elif kt_is_identity:
        t1 = C  # sum_i p_i p'_i K_ii
    else:
        t1 = C * C + C  # (K * Kt) p', then p^T
    return t1 + 2 * C  # t2, t3


def _tr_hkhk_madds(C: int, k_is_identity: bool, kt_is_identity: bool) -> int:
    """Multiply-adds per pair of kroute._tr_hkhk(k, kt) (diagonal A; elementwise products left out)."""
    if kt_is_identity:
        return C  # h . h' (K = I too), or sum_i h_i h'_i K_ii
    return C * C + C  # (K * Kt) h', then h^T


def total_pair_flops(dims: Sequence[int], has_bias: Sequence[bool], hessian: bool, n_samples: int,
                     batch_size: int, structured: bool = False, diagonal: bool = False) -> int:
    """block_pair_flops summed over the block pairs I <= J that the moment pass visits (what bench/
    and gpu_check.py divide by the time: TFLOP/s reached)."""
    sizes = [min(batch_size, n_samples - lo) for lo in range(0, n_samples, batch_size)]
    return sum(block_pair_flops(dims, has_bias, hessian, sizes[i], sizes[j], structured, diagonal)
               for i in range(len(sizes)) for j in range(i, len(sizes)))
