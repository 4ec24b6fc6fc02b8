// Internal to the pair phase (pairs.cpp): the K route of the pair sum (docs/design.md, "The K
// route"; docs/structured.md), every K shifted to the reference classes (docs/numerics.md
// section 3).  Mirrors the Python engine (python/wsbound_fast/_engine/kroute.py).
// Instantiated in kroute.cpp for float64 (RowMat) and float32 (RowMatF) features.
#pragma once

#include "features.hpp"
#include "model.hpp"
#include "pairs.hpp"

namespace wsb {

// GGN (docs/structured.md): out[l,m] = sum_{n,n'} alpha_l alpha_m w w' tr(A K_l A' K_m^T),
// K_L = I, K_{L-1} from (Omega o s_n) s_n'^T, K_l = T_l T_l'^T (l <= L - 2), every K shifted to
// the reference classes (docs/numerics.md section 3).  Writes out[pair(l, m)] for l <= m.
template <class M>
void pair_sum_ggn(const Model& model, const FeaturesOf<M>& I, const FeaturesOf<M>& J, PairScratch& s, double* out);

// Hessian, the blocks (L-1, L-1) and (L-1, L) through K = K_{L-1} (docs/structured.md), shifted
// to the reference classes (docs/numerics.md section 3); alpha is the Gram of a~_{L-2}.
template <class M>
void k_route_hessian(const Model& model, const FeaturesOf<M>& I, const FeaturesOf<M>& J, const RowMat& alpha,
                     PairScratch& s, double& out_ll, double& out_lm);

// The same two for the diagonal losses (Loss::Mse, Loss::Bce; A = diag(h), FeaturesOf::h): the
// identities of docs/numerics.md section 5, without the reference-class shift.
template <class M>
void pair_sum_ggn_diagonal(const Model& model, const FeaturesOf<M>& I, const FeaturesOf<M>& J, PairScratch& s,
                           double* out);
template <class M>
void k_route_hessian_diagonal(const Model& model, const FeaturesOf<M>& I, const FeaturesOf<M>& J, const RowMat& alpha,
                              PairScratch& s, double& out_ll, double& out_lm);

}  // namespace wsb
