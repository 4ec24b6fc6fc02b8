// Per-block features (DESIGN.md section 3) and their pair contraction (section 4).
// Mirrors python/wsbound_fast/_numpy_backend.py (block_features, pair_sum).
#pragma once

#include "model.hpp"

#include <vector>

namespace wsb {

// Every per-sample quantity of one block of B samples; row n of every matrix is sample n.
// Layers are numbered 1..L as in DESIGN.md; index 0 of per-layer vectors is unused, and
// per-pair quantities live at pair(l, m) = l * (L + 1) + m.
using RowMatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// M is RowMat (float64) or RowMatF (the operands of the pair phase in float32, Options::f32).
template <class M>
struct FeaturesOf {
    Index B = 0;
    Index L = 0;
    std::vector<M> at;     // at[l]: augmented input a~_{l-1}, (B, d_{l-1} [+1])
    std::vector<M> delta;  // delta[l]: dloss/dz_l, (B, d_l)
    std::vector<M> sp;     // sp[l]: sigma'(z_l), (B, d_l), l < L
    std::vector<M> G;      // G[pair(l,m)]: G_lm = T_ml^T M_m flattened, (B, d_l d_m), l <= m
    std::vector<M> Q;      // Q[pair(l,m)]: dense Q_lm flattened, (B, d_{m-1} d_l), l < m - 1
    std::vector<M> X;      // X[l]: a_l (row-scaled) G_{l,l+1}, (B, d_l d_{l+1})
    std::vector<M> Y;      // Y[l]: sigma'_l outer delta_{l+1}, (B, d_l d_{l+1})
    // Structured path.  A = S S^T (S = sqrt(w) (diag sqrt p - p sqrt p^T)), V_L = S,
    // V_l = D_l W_{l+1}^T V_{l+1} (so the GGN block G_lm = V_l V_m^T and, for the Hessian,
    // M_{L-1} = V_{L-1} V_{L-1}^T + diag(rho)).  Vt[l] stacks the per-sample V_l^T:
    // rows n C .. n C + C - 1 belong to sample n, (B C, d_l).
    Index C = 0;
    std::vector<M> Vt;     // GGN: every l; Hessian: l = L - 1 only
    M rho;                 // Hessian: sigma''(z_{L-1}) * g_{L-1}, (B, d_{L-1})
    M u2;                  // Hessian: squared row norms of V_{L-1}, (B, d_{L-1})
    std::vector<double> trace;  // trace[l]: sum over the block of |a~_{l-1}|^2 tr(M_l) (= its share of tr H^{ll})

    Index pair(Index l, Index m) const { return l * (L + 1) + m; }
};
using BlockFeatures = FeaturesOf<RowMat>;
using BlockFeaturesF = FeaturesOf<RowMatF>;

// The Gram operands of F rounded to float32 (for Options::f32); F's matrices are released.
void to_single(BlockFeatures& F, BlockFeaturesF& out);

// Features of the block (Xb: (B, d_0) inputs; Yb: (B, C) label rows).
void block_features(const Model& model, const RowMat& Xb, const RowMat& Yb, const Options& opt,
                    BlockFeatures& out);

// Scratch for pair_sum, reused across block pairs by one thread (no allocation once warm).
struct PairScratch {
    RowMat alpha, beta, gram, inner, p2, z;
    RowMatF single;                   // float32 products before they are widened to float64
    std::vector<RowMat> alphas, psi;  // structured path: Gram of each layer's inputs, C x C blocks
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
