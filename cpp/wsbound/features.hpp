// Per-block features (docs/design.md, "Per-sample features"): every per-sample quantity of
// one block of samples that the pair sum (pairs.hpp) contracts.  Mirrors the Python engine
// (python/wsbound_fast/_engine/features.py: block_features).
#pragma once

#include "model.hpp"

#include <vector>

namespace wsb {

// Every per-sample quantity of one block of B samples; row n of every matrix is sample n.
// Layers are numbered 1..L as in docs/design.md; index 0 of per-layer vectors is unused, and
// per-pair quantities live at pair(l, m) = l * (L + 1) + m.
using RowMatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Row-major views of one sample's flattened matrix (a row of a feature such as G or Q).
using MapMat = Eigen::Map<RowMat>;
using CMapMat = Eigen::Map<const RowMat>;

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
    // Structured path (docs/structured.md).  K_l = T_l T_l'^T with T_l = dz_L/dz_l (C x d_l).
    Index C = 0;
    RowMat p;              // softmax(z_L), (B, C), always float64 (the O(C^2) identity)
    RowMat w;              // label weight w = sum(y) per sample, (B, 1)
    Eigen::VectorXi ref;   // reference class r = argmax z_L per sample (docs/numerics.md section 1), (B)
    Eigen::VectorXd q;     // q = 1 - p_r per sample, from the non-reference exponentials, (B)
    // (p, w, ref and q: cross-entropy only; empty for the diagonal losses)
    RowMat h;              // diagonal losses (mse, bce): A = diag(h) per sample, (B, C), float64; empty for cross-entropy
    std::vector<M> Tt;     // GGN: Tt[l] stacks T_l, rows n C .. n C + C - 1 for sample n, (B C, d_l), l <= L - 2
    M rho;                 // Hessian: sigma''(z_{L-1}) * g_{L-1}, (B, d_{L-1})
    M u2;                  // squared row norms of V_{L-1} = D W_L^T S, (B, d_{L-1})
    // float32 copies (to_single) only: each row of delta[m], G[p] and of (rho, u2) together was
    // divided by the power of two held here (its largest magnitude brought to [1/2, 1)), so that
    // quantities of size q = 1 - p_r down to 1e-300 do not underflow float32; the pair phase
    // multiplies the widened products back (exact).  Empty for float64 features.
    std::vector<Eigen::VectorXd> delta_scale, G_scale;
    Eigen::VectorXd ru_scale;
    std::vector<double> trace;  // trace[l]: sum over the block of |a~_{l-1}|^2 tr(M_l) (= its share of tr H^{ll})
    // Magnitudes for the rounding allowances (docs/numerics.md section 4), summed over the block:
    std::vector<double> trace_abs;  // trace_abs[l]: sum of |a~_{l-1}|^2 sum_k |(M_l)_kk|
    std::vector<double> norms;      // norms[pair(l,m)]: sum of nu_n^{lm} (>= |H_n^{lm}|_F), l <= m

    Index pair(Index l, Index m) const { return l * (L + 1) + m; }
};
using BlockFeatures = FeaturesOf<RowMat>;
using BlockFeaturesF = FeaturesOf<RowMatF>;

// The Gram operands of F rounded to float32 (for Options::f32); F's matrices are released.
void to_single(BlockFeatures& F, BlockFeaturesF& out);

// Features of the block (Xb: (B, d_0) inputs; Yb: (B, C) label rows).
void block_features(const Model& model, const RowMat& Xb, const RowMat& Yb, const Options& opt,
                    BlockFeatures& out);

}  // namespace wsb
