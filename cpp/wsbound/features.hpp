// Per-block features (DESIGN.md section 3) and their pair contraction (section 4).
// Mirrors python/wsbound_fast/_numpy_backend.py (block_features, pair_sum).
#pragma once

#include "model.hpp"

#include <vector>

namespace wsb {

// Every per-sample quantity of one block of B samples; row n of every matrix is sample n.
// Layers are numbered 1..L as in DESIGN.md; index 0 of per-layer vectors is unused, and
// per-pair quantities live at pair(l, m) = l * (L + 1) + m.
struct BlockFeatures {
    Index B = 0;
    Index L = 0;
    std::vector<RowMat> at;     // at[l]: augmented input a~_{l-1}, (B, d_{l-1} [+1])
    std::vector<RowMat> delta;  // delta[l]: dloss/dz_l, (B, d_l)
    std::vector<RowMat> sp;     // sp[l]: sigma'(z_l), (B, d_l), l < L
    std::vector<RowMat> G;      // G[pair(l,m)]: G_lm = T_ml^T M_m flattened, (B, d_l d_m), l <= m
    std::vector<RowMat> Q;      // Q[pair(l,m)]: dense Q_lm flattened, (B, d_{m-1} d_l), l < m - 1
    std::vector<RowMat> X;      // X[l]: a_l (row-scaled) G_{l,l+1}, (B, d_l d_{l+1})
    std::vector<RowMat> Y;      // Y[l]: sigma'_l outer delta_{l+1}, (B, d_l d_{l+1})
    // Structured path.  A = S S^T (S = sqrt(w) (diag sqrt p - p sqrt p^T)), V_L = S,
    // V_l = D_l W_{l+1}^T V_{l+1} (so the GGN block G_lm = V_l V_m^T and, for the Hessian,
    // M_{L-1} = V_{L-1} V_{L-1}^T + diag(rho)).  Vt[l] stacks the per-sample V_l^T:
    // rows n C .. n C + C - 1 belong to sample n, (B C, d_l).
    Index C = 0;
    std::vector<RowMat> Vt;     // GGN: every l; Hessian: l = L - 1 only
    RowMat rho;                 // Hessian: sigma''(z_{L-1}) * g_{L-1}, (B, d_{L-1})
    RowMat u2;                  // Hessian: squared row norms of V_{L-1}, (B, d_{L-1})
    std::vector<double> trace;  // trace[l]: sum over the block of |a~_{l-1}|^2 tr(M_l) (= its share of tr H^{ll})

    Index pair(Index l, Index m) const { return l * (L + 1) + m; }
};

// Features of the block (Xb: (B, d_0) inputs; Yb: (B, C) label rows).
void block_features(const Model& model, const RowMat& Xb, const RowMat& Yb, const Options& opt,
                    BlockFeatures& out);

// Scratch for pair_sum, reused across block pairs by one thread (no allocation once warm).
struct PairScratch {
    RowMat alpha, beta, gram, inner, p2, z;
    std::vector<RowMat> alphas, psi;  // structured path: Gram of each layer's inputs, C x C blocks
};

// out[pair(l, m)] = sum over n in I, n' in J of kappa_lm(n, n') for l <= m: the block pair's
// share of <H^{lm}, H^{lm}> (the Frobenius product of the (l, m) parameter blocks).  Entries
// with l > m are left untouched.
void pair_sum(const Model& model, const BlockFeatures& I, const BlockFeatures& J, const Options& opt,
              PairScratch& s, double* out);

}  // namespace wsb
