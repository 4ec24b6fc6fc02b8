#include "pairs.hpp"

#include "kroute.hpp"
#include "losses.hpp"
#include "precision.hpp"

#include <algorithm>

namespace wsb {
namespace {

// The cross terms of the Hessian's off-diagonal blocks (l < m): the part of <H_n^{lm}, H_n'^{lm}>
// that couples G_lm of one sample with delta_m and Q_lm of the other.

// s.p2 = Bf.delta[m] G_n^T for the c samples n0 .. n0 + c - 1 of A, (nB, c d_l): row k holds
// (G_n delta_k)[r] at (n - n0) d_l + r, so that each sample k of Bf reads a contiguous (c, d_l) matrix.
template <class M>
void cross_products(const FeaturesOf<M>& A, const FeaturesOf<M>& Bf, Index l, Index m, Index d_l, Index d_m,
                    Index n0, Index c, PairScratch& s) {
    using CMap = Eigen::Map<const M>;
    const CMap GA(A.G[A.pair(l, m)].row(n0).data(), c * d_l, d_m);
    product(Bf.delta[m], GA.transpose(), s.p2, s);
}

// Rows of A per GEMM of the cross terms, so that their (rows * width, nB) output stays in cache.
Index cross_rows(Index width, Index nB) { return std::max<Index>(1, 262144 / std::max<Index>(1, width * nB)); }

// inner(n, n') += b_n^T Q_{n'} G_n delta_{n'} for n in A, n' in Bf (swap: inner(n', n)).
// Used where Q_lm is dense (m > l + 1).
template <class M>
void add_dense_cross(const FeaturesOf<M>& A, const FeaturesOf<M>& Bf, Index l, Index m, Index d_l, Index d_m,
                     Index d_prev, bool swap, PairScratch& s) {
    using CMap = Eigen::Map<const M>;
    const Index p = A.pair(l, m);
    const Index nA = A.B, nB = Bf.B;
    const Eigen::VectorXd& gA = A.G_scale.empty() ? no_scale() : A.G_scale[static_cast<size_t>(p)];
    const Eigen::VectorXd& dB = Bf.delta_scale.empty() ? no_scale() : Bf.delta_scale[static_cast<size_t>(m)];
    cross_products(A, Bf, l, m, d_l, d_m, 0, nA, s);
    for (Index k = 0; k < nB; ++k) {
        const CMap Qk(Bf.Q[p].row(k).data(), d_prev, d_l);
        product(A.at[m].leftCols(d_prev), Qk, s.z, s);  // [n, r] = (Q_k^T b_n)[r]
        const CMapMat P(s.p2.row(k).data(), nA, d_l);
        Eigen::VectorXd t = (s.z.array() * P.array()).rowwise().sum().matrix();
        if (gA.size() > 0) t.array() *= gA.array() * row_scale(dB, k);
        if (swap) {
            s.inner.row(k) += t.transpose();
        } else {
            s.inner.col(k) += t;
        }
    }
}

// inner(n, n') += <X_n, Y_{n'}> for n in A, n' in Bf (swap: inner(n', n)), m = l + 1, where
// X_n = diag(a_l) G_{l,l+1} and Y_{n'} = sigma'_l delta_{l+1}^T (rank one):
// <X_n, Y_{n'}> = sum_r a_n[r] sigma'_{n'}[r] (G_n delta_{n'})[r] = sum_c delta_{n'}[c] (X_n^T sigma'_{n'})[c].
// One GEMM over the wider of d_l, d_{l+1} and an elementwise pass over the narrower one, instead
// of a Gram product of two d_l d_{l+1} wide factors per sample (which need not be stored).
template <class M>
void add_adjacent_cross(const FeaturesOf<M>& A, const FeaturesOf<M>& Bf, Index l, Index d_l, Index d_m, bool swap,
                        PairScratch& s) {
    const Index nA = A.B, nB = Bf.B;
    const auto a = A.at[l + 1].leftCols(d_l);  // a_l of A
    const bool scaled = !A.G_scale.empty();
    const Eigen::VectorXd& gA = scaled ? A.G_scale[static_cast<size_t>(A.pair(l, l + 1))] : no_scale();
    const Eigen::VectorXd& dB = scaled ? Bf.delta_scale[static_cast<size_t>(l + 1)] : no_scale();
    if (d_m >= d_l) {  // P = G delta' over d_m, then sum over r with a o sigma'
        const Index rows = cross_rows(d_l, nB);
        for (Index n0 = 0; n0 < nA; n0 += rows) {
            const Index c = std::min(rows, nA - n0);
            cross_products(A, Bf, l, l + 1, d_l, d_m, n0, c, s);
            const auto ad = a.middleRows(n0, c).template cast<double>();
            for (Index k = 0; k < nB; ++k) {
                const CMapMat P(s.p2.row(k).data(), c, d_l);
                const auto spk = Bf.sp[l].row(k).template cast<double>().array();
                Eigen::VectorXd t = ((P.array() * ad.array()).rowwise() * spk).rowwise().sum().matrix();
                if (scaled) t.array() *= gA.segment(n0, c).array() * row_scale(dB, k);
                if (swap) {
                    s.inner.row(k).segment(n0, c) += t.transpose();
                } else {
                    s.inner.col(k).segment(n0, c) += t;
                }
            }
        }
        return;
    }
    // Narrow d_{l+1} (e.g. the output layer): P = X^T sigma'' over d_l, then sum over c with delta'.
    using CMap = Eigen::Map<const M>;
    M& xt = s.kbuf<M>().xt;
    const M& G = A.G[A.pair(l, l + 1)];
    s.ct = Bf.delta[l + 1].transpose().template cast<double>();  // (d_m, nB)
    if (scaled) s.ct = s.ct * dB.asDiagonal();
    const Index rows = cross_rows(d_m, nB);
    for (Index n0 = 0; n0 < nA; n0 += rows) {
        const Index c = std::min(rows, nA - n0);
        xt.resize(c * d_m, d_l);
        for (Index n = 0; n < c; ++n) {
            const CMap Gn(G.row(n0 + n).data(), d_l, d_m);
            xt.middleRows(n * d_m, d_m) = (Gn.array().colwise() * a.row(n0 + n).transpose().array()).transpose();
        }
        product(xt, Bf.sp[l].transpose(), s.p2, s);  // [n d_m + c, n'] = (X_n^T sigma'_{n'})[c]
        for (Index n = 0; n < c; ++n) {
            Eigen::RowVectorXd t = (s.p2.middleRows(n * d_m, d_m).array() * s.ct.array()).colwise().sum().matrix();
            if (scaled) t *= gA[n0 + n];
            if (swap) {
                s.inner.col(n0 + n) += t.transpose();
            } else {
                s.inner.row(n0 + n) += t;
            }
        }
    }
}

}  // namespace

template <class M>
void pair_sum(const Model& model, const FeaturesOf<M>& I, const FeaturesOf<M>& J, const Options& opt,
              PairScratch& s, double* out) {
    const bool hessian = opt.hessian;
    const Index L = model.n_layers();
    const bool diagonal = diagonal_loss(opt.loss);  // A = diag(h): the K route's own identities
    if (opt.structured && !hessian) {
        if (diagonal) {
            pair_sum_ggn_diagonal(model, I, J, s, out);
        } else {
            pair_sum_ggn(model, I, J, s, out);
        }
        return;
    }
    const bool kroute = opt.structured && L >= 2;
    for (Index l = 1; l <= L; ++l) {
        product(I.at[l], J.at[l].transpose(), s.alpha, s);
        if (kroute && l == L - 1) {
            if (diagonal) {
                k_route_hessian_diagonal(model, I, J, s.alpha, s, out[I.pair(l, l)], out[I.pair(l, L)]);
            } else {
                k_route_hessian(model, I, J, s.alpha, s, out[I.pair(l, l)], out[I.pair(l, L)]);
            }
            continue;
        }
        for (Index m = l; m <= L; ++m) {
            const Index p = I.pair(l, m);
            product(I.G[p], J.G[p].transpose(), s.gram, s);
            if (!I.G_scale.empty()) unscale(s.gram, I.G_scale[static_cast<size_t>(p)], J.G_scale[static_cast<size_t>(p)]);
            if (l == m) {
                out[p] = (s.alpha.array().square() * s.gram.array()).sum();
                continue;
            }
            product(I.at[m], J.at[m].transpose(), s.beta, s);
            s.inner.noalias() = s.beta.cwiseProduct(s.gram);
            if (hessian) {
                product(I.delta[m], J.delta[m].transpose(), s.beta, s);  // gamma
                if (!I.delta_scale.empty())
                    unscale(s.beta, I.delta_scale[static_cast<size_t>(m)], J.delta_scale[static_cast<size_t>(m)]);
                if (m == l + 1) {
                    product(I.sp[l], J.sp[l].transpose(), s.gram, s);
                    s.inner.array() += s.beta.array() * s.gram.array();
                    add_adjacent_cross(I, J, l, model.d(l), model.d(m), false, s);
                    add_adjacent_cross(J, I, l, model.d(l), model.d(m), true, s);
                } else {
                    product(I.Q[p], J.Q[p].transpose(), s.gram, s);
                    s.inner.array() += s.beta.array() * s.gram.array();
                    const Index d_l = model.d(l), d_m = model.d(m), d_prev = model.d(m - 1);
                    add_dense_cross(I, J, l, m, d_l, d_m, d_prev, false, s);
                    add_dense_cross(J, I, l, m, d_l, d_m, d_prev, true, s);
                }
            }
            out[p] = (s.alpha.array() * s.inner.array()).sum();
        }
    }
}

template void pair_sum<RowMat>(const Model&, const BlockFeatures&, const BlockFeatures&, const Options&, PairScratch&,
                               double*);
template void pair_sum<RowMatF>(const Model&, const BlockFeaturesF&, const BlockFeaturesF&, const Options&,
                                PairScratch&, double*);

}  // namespace wsb
