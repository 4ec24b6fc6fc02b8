// The pair sum of a block pair (docs/design.md, "The pair sum"): the Gram contractions of two
// blocks' features into sum_{n in I, n' in J} kappa_lm(n, n'), through the generic path
// (pairs.cpp: Grams of G, the cross terms of the Hessian) or the K route (kroute.cpp,
// docs/design.md, "The K route").  Mirrors the Python engine (python/wsbound_fast/_engine/:
// pairs.py, kroute.py).
#pragma once

#include "features.hpp"
#include "model.hpp"

#include <type_traits>
#include <vector>

namespace wsb {

// Operands of the K route (docs/structured.md) in the precision of the Gram products.
template <class M>
struct KBuffers {
    M omega;       // W_i o W_j (i <= j, i-major), (C(C+1)/2, d_{L-1})
    M wl;          // W_L, (C, d_{L-1})
    M left, left2;  // per sample n of I: rows scaled by s_n (and s_n o a_n), (., d_{L-1})
    M sa_j;        // s o a_{L-1} of every sample of J, (B', d_{L-1})
    std::vector<M> tj;  // T_l of J stacked class-major: row j B' + n', (C B', d_l)
    M xt;          // adjacent cross terms, narrow d_{l+1}: (diag(a_n) G_n)^T stacked, (B d_{l+1}, d_l)
};

// Scratch for pair_sum, reused across block pairs by one thread (no allocation once warm).
struct PairScratch {
    RowMat alpha, beta, gram, inner, p2, z;
    RowMatF single;                    // float32 products before they are widened to float64
    std::vector<RowMat> alphas;       // structured path: Gram of each layer's inputs
    RowMat k1, k2, pt, dt, u, v;      // K route: GEMM outputs over n'; p^T and delta^T of J; S p', S^T p
    RowMat at, dc;                    // K route: diag(A')/w' of J transposed, (C, B'); K_{i r'} - K_{r r'}, (C, B')
    RowMat ct;                        // adjacent cross terms, narrow d_{l+1}: delta_{l+1}^T of the other block
    std::vector<RowMat> kt;           // K route (GGN): Grams of T_l for a few rows of I
    std::vector<RowMat> kh;           // K route (GGN), diagonal losses: h_i (K_l)_ij h'_j, (C^2, B')
    KBuffers<RowMat> kd;
    KBuffers<RowMatF> kf;
    template <class M>
    KBuffers<M>& kbuf() {
        if constexpr (std::is_same_v<M, RowMat>) {
            return kd;
        } else {
            return kf;
        }
    }
};

// out[pair(l, m)] = sum over n in I, n' in J of kappa_lm(n, n') for l <= m: the block pair's
// share of <H^{lm}, H^{lm}> (the Frobenius product of the (l, m) parameter blocks).  Entries
// with l > m are left untouched.
// With float32 features every product runs in float32 and is widened to float64 before the
// elementwise products and all sums (float64 accumulation).
template <class M>
void pair_sum(const Model& model, const FeaturesOf<M>& I, const FeaturesOf<M>& J, const Options& opt,
              PairScratch& s, double* out);

}  // namespace wsb
