#include "features.hpp"

#include "activations.hpp"

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace wsb {
namespace {

using MapMat = Eigen::Map<RowMat>;
using CMapMat = Eigen::Map<const RowMat>;
using StridedMap = Eigen::Map<const RowMat, 0, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>>;

// out (=|+=) a * b, computed in the operands' precision and widened to float64.
template <class A, class Bx>
void product(const A& a, const Bx& b, RowMat& out, PairScratch& s, bool add = false) {
    using T = typename A::Scalar;
    if constexpr (std::is_same_v<T, double>) {
        if (add) {
            out.noalias() += a * b;
        } else {
            out.noalias() = a * b;
        }
    } else {
        s.single.noalias() = a * b;
        if (add) {
            out += s.single.template cast<double>();
        } else {
            out = s.single.template cast<double>();
        }
    }
}

// inner(n, n') += b_n^T Q_{n'} G_n delta_{n'} for n in A, n' in Bf (swap: inner(n', n)).
// Used where Q_lm is dense (m > l + 1).
template <class M>
void add_dense_cross(const FeaturesOf<M>& A, const FeaturesOf<M>& Bf, Index l, Index m, Index d_l, Index d_m,
                     Index d_prev, bool swap, PairScratch& s) {
    using CMap = Eigen::Map<const M>;
    const Index p = A.pair(l, m);
    const Index nA = A.B, nB = Bf.B;
    const CMap GA(A.G[p].data(), nA * d_l, d_m);
    product(GA, Bf.delta[m].transpose(), s.p2, s);  // [n d_l + r, n'] = (G_n delta_{n'})[r]
    for (Index k = 0; k < nB; ++k) {
        const CMap Qk(Bf.Q[p].row(k).data(), d_prev, d_l);
        product(A.at[m].leftCols(d_prev), Qk, s.z, s);  // [n, r] = (Q_k^T b_n)[r]
        const StridedMap P(s.p2.data() + k, nA, d_l, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>(d_l * nB, nB));
        if (swap) {
            s.inner.row(k) += (s.z.array() * P.array()).rowwise().sum().matrix().transpose();
        } else {
            s.inner.col(k) += (s.z.array() * P.array()).rowwise().sum().matrix();
        }
    }
}

// Vt[l] = Vt[l+1] W_{l+1}, each sample's C rows scaled by sigma'(z_l) column-wise.
void propagate_vt(const Model& model, BlockFeatures& F, Index l) {
    const Index C = F.C;
    F.Vt[l].noalias() = F.Vt[l + 1] * model.W[static_cast<size_t>(l)];
    for (Index n = 0; n < F.B; ++n) F.Vt[l].middleRows(n * C, C).array().rowwise() *= F.sp[l].row(n).array();
}

// K(n, n') = sum over the C x C block (n, n') of Pa o Pb, for rows [r0, r0 + rows) of I.
void block_inner(const RowMat& Pa, const RowMat& Pb, Index C, Index rows, Index cols, RowMat& K) {
    K.resize(rows, cols);
    Eigen::RowVectorXd acc(cols * C);
    for (Index n = 0; n < rows; ++n) {
        acc.noalias() = (Pa.middleRows(n * C, C).array() * Pb.middleRows(n * C, C).array()).colwise().sum().matrix();
        K.row(n) = Eigen::Map<const RowMat>(acc.data(), cols, C).rowwise().sum().transpose();
    }
}

}  // namespace

void block_features(const Model& model, const RowMat& Xb, const RowMat& Yb, const Options& opt, BlockFeatures& F) {
    const bool hessian = opt.hessian;
    const Index L = model.n_layers();
    const Index B = Xb.rows();
    const auto nL = static_cast<size_t>(L + 1);
    F.B = B;
    F.L = L;
    F.at.assign(nL, RowMat());
    F.delta.assign(nL, RowMat());
    F.sp.assign(nL, RowMat());
    F.G.assign(nL * nL, RowMat());
    F.Q.assign(nL * nL, RowMat());
    F.X.assign(nL, RowMat());
    F.Y.assign(nL, RowMat());
    F.Vt.assign(nL, RowMat());
    F.rho.resize(0, 0);
    F.u2.resize(0, 0);
    std::vector<RowMat> spp(nL), M(nL);

    // Forward pass.
    RowMat a = Xb, z;
    for (Index l = 1; l <= L; ++l) {
        const RowMat& W = model.W[static_cast<size_t>(l - 1)];
        const bool bias = model.has_bias[static_cast<size_t>(l - 1)];
        const Index d_in = W.cols(), d_out = W.rows();
        RowMat& at = F.at[l];
        at.resize(B, d_in + (bias ? 1 : 0));
        at.leftCols(d_in) = a;
        if (bias) at.col(d_in).setOnes();
        z.noalias() = a * W.transpose();
        if (bias) z.rowwise() += model.b[static_cast<size_t>(l - 1)].transpose();
        if (l < L) {
            const Activation& act = model.act[static_cast<size_t>(l - 1)];
            a.resize(B, d_out);
            F.sp[l].resize(B, d_out);
            spp[l].resize(B, d_out);
            double* pa = a.data();
            double* p1 = F.sp[l].data();
            double* p2 = spp[l].data();
            const double* pz = z.data();
            for (Index i = 0; i < z.size(); ++i) activate(act, pz[i], pa[i], p1[i], p2[i]);
        }
    }

    // Output: p = softmax(z_L), delta_L = w p - y, M_L = w (diag p - p p^T), w = sum(y) (= 1).
    const Index C = z.cols();
    const bool ggn_fast = opt.structured && !hessian;
    const bool lowrank = opt.structured && hessian && L >= 2;
    F.C = C;
    F.delta[L].resize(B, C);
    M[L].resize(B, C * C);
    if (ggn_fast || lowrank) F.Vt[L].resize(B * C, C);
    Eigen::RowVectorXd p(C), q(C);
    for (Index n = 0; n < B; ++n) {
        p = (z.row(n).array() - z.row(n).maxCoeff()).exp().matrix();
        p /= p.sum();
        const double w = Yb.row(n).sum();
        F.delta[L].row(n) = w * p - Yb.row(n);
        MapMat A(M[L].row(n).data(), C, C);
        A.noalias() = -w * p.transpose() * p;
        A.diagonal() += w * p.transpose();
        if (ggn_fast || lowrank) {  // S^T = sqrt(w) (diag sqrt p - sqrt p p^T)
            q = p.array().sqrt().matrix();
            auto St = F.Vt[L].middleRows(n * C, C);
            St.noalias() = -std::sqrt(w) * q.transpose() * p;
            St.diagonal() += std::sqrt(w) * q.transpose();
        }
    }
    if (ggn_fast) {
        // GGN through V_l: tr(G_ll) share = sum_n |a~_{l-1}|^2 |V_l|_F^2.
        for (Index l = L - 1; l >= 1; --l) propagate_vt(model, F, l);
        F.trace.assign(nL, 0.0);
        for (Index l = 1; l <= L; ++l) {
            double t = 0.0;
            for (Index n = 0; n < B; ++n) t += F.at[l].row(n).squaredNorm() * F.Vt[l].middleRows(n * C, C).squaredNorm();
            F.trace[static_cast<size_t>(l)] = t;
        }
        return;
    }

    // Backward: delta_l and M_l = D W^T M_{l+1} W D + diag(sigma'' g)  (no diag for the GGN).
    RowMat g, tmp;
    for (Index l = L - 1; l >= 1; --l) {
        const RowMat& Wn = model.W[static_cast<size_t>(l)];  // W_{l+1}: (d_{l+1}, d_l)
        const Index d_l = Wn.cols(), d_n = Wn.rows();
        g.noalias() = F.delta[l + 1] * Wn;
        F.delta[l] = F.sp[l].cwiseProduct(g);
        if (lowrank && l == L - 1) {  // M_{L-1} = V V^T + diag(rho)
            F.rho = spp[l].cwiseProduct(g);
            propagate_vt(model, F, l);
            F.u2.resize(B, d_l);
            for (Index n = 0; n < B; ++n) F.u2.row(n) = F.Vt[l].middleRows(n * C, C).colwise().squaredNorm();
            if (L == 2) continue;  // nothing below needs the dense d x d matrix
        }
        M[l].resize(B, d_l * d_l);
        for (Index n = 0; n < B; ++n) {
            const CMapMat Mn(M[l + 1].row(n).data(), d_n, d_n);
            MapMat Ml(M[l].row(n).data(), d_l, d_l);
            tmp.noalias() = Mn * Wn;
            Ml.noalias() = Wn.transpose() * tmp;
            Ml.array().rowwise() *= F.sp[l].row(n).array();
            Ml.array().colwise() *= F.sp[l].row(n).transpose().array();
            if (hessian) Ml.diagonal() += spp[l].row(n).cwiseProduct(g.row(n)).transpose();
        }
    }

    // tr(H) share: sum_n sum_l |a~_{l-1}|^2 tr(M_l).
    F.trace.assign(nL, 0.0);
    for (Index l = 1; l <= L; ++l) {
        const Index d = model.d(l);
        double t = 0.0;
        if (M[l].size() == 0) {  // low-rank M_1 of a one-hidden-layer net: tr = |V|_F^2 + sum(rho)
            for (Index n = 0; n < B; ++n)
                t += F.at[l].row(n).squaredNorm() * (F.Vt[l].middleRows(n * C, C).squaredNorm() + F.rho.row(n).sum());
        } else {
            for (Index n = 0; n < B; ++n) t += F.at[l].row(n).squaredNorm() * CMapMat(M[l].row(n).data(), d, d).trace();
        }
        F.trace[static_cast<size_t>(l)] = t;
    }

    // G_{m,m} = M_m;  G_{l,m} = D_l W_{l+1}^T G_{l+1,m}.
    for (Index m = 1; m <= L; ++m) {
        const Index d_m = model.d(m);
        F.G[F.pair(m, m)] = std::move(M[m]);
        for (Index l = m - 1; l >= 1; --l) {
            const RowMat& Wn = model.W[static_cast<size_t>(l)];
            const Index d_l = Wn.cols(), d_n = Wn.rows();
            const RowMat& Gn = F.G[F.pair(l + 1, m)];
            RowMat& Gl = F.G[F.pair(l, m)];
            Gl.resize(B, d_l * d_m);
            for (Index n = 0; n < B; ++n) {
                MapMat out(Gl.row(n).data(), d_l, d_m);
                out.noalias() = Wn.transpose() * CMapMat(Gn.row(n).data(), d_n, d_m);
                out.array().colwise() *= F.sp[l].row(n).transpose().array();
            }
        }
    }
    if (lowrank) F.G[F.pair(L - 1, L - 1)] = RowMat();  // contracted through Vt, rho, u2 instead
    if (!hessian) return;

    // Dense Q_{l,m} = D_{m-1} W_{m-1} Q_{l,m-1} for m >= l + 2, from Q_{l,l+1} = D_l.
    for (Index l = 1; l + 2 <= L; ++l) {
        const Index d_l = model.d(l);
        for (Index m = l + 2; m <= L; ++m) {
            const RowMat& Wp = model.W[static_cast<size_t>(m - 2)];  // W_{m-1}: (d_{m-1}, d_{m-2})
            const Index d_prev = Wp.rows(), d_pp = Wp.cols();
            RowMat& Qc = F.Q[F.pair(l, m)];
            Qc.resize(B, d_prev * d_l);
            for (Index n = 0; n < B; ++n) {
                MapMat out(Qc.row(n).data(), d_prev, d_l);
                if (m == l + 2) {
                    out = Wp;
                    out.array().rowwise() *= F.sp[l].row(n).array();
                } else {
                    out.noalias() = Wp * CMapMat(F.Q[F.pair(l, m - 1)].row(n).data(), d_pp, d_l);
                }
                out.array().colwise() *= F.sp[m - 1].row(n).transpose().array();
            }
        }
    }
    // Cross-term factors for m = l + 1: X_l = diag(a_l) G_{l,l+1}, Y_l = sigma'_l delta_{l+1}^T.
    for (Index l = 1; l < L; ++l) {
        const Index d_l = model.d(l), d_m = model.d(l + 1);
        const RowMat& Gl = F.G[F.pair(l, l + 1)];
        F.X[l].resize(B, d_l * d_m);
        F.Y[l].resize(B, d_l * d_m);
        for (Index n = 0; n < B; ++n) {
            MapMat x(F.X[l].row(n).data(), d_l, d_m);
            x = CMapMat(Gl.row(n).data(), d_l, d_m);
            x.array().colwise() *= F.at[l + 1].row(n).head(d_l).transpose().array();
            MapMat y(F.Y[l].row(n).data(), d_l, d_m);
            y.noalias() = F.sp[l].row(n).transpose() * F.delta[l + 1].row(n);
        }
    }
}

namespace {

// Rows of I per chunk of the structured contraction, so that the C x C Gram blocks of one
// chunk (rows * C x B' * C per layer) stay within a few tens of MB.
Index chunk_rows(Index B, Index Bp, Index C, Index layers) {
    const double cap = 4.0e6 / static_cast<double>(std::max<Index>(layers, 1));
    const auto r = static_cast<Index>(cap / static_cast<double>(C * C * std::max<Index>(Bp, 1)));
    return std::max<Index>(1, std::min(B, r));
}

// GGN: out[l,m] = sum_{n,n'} alpha_l beta_m <Psi_l, Psi_m>(n, n'), Psi_l = V_l^T V_l' (C x C).
template <class M>
void pair_sum_ggn(const Model& model, const FeaturesOf<M>& I, const FeaturesOf<M>& J, PairScratch& s, double* out) {
    const Index L = model.n_layers(), C = I.C, B = I.B, Bp = J.B;
    s.alphas.resize(static_cast<size_t>(L + 1));
    s.psi.resize(static_cast<size_t>(L + 1));
    for (Index l = 1; l <= L; ++l) product(I.at[l], J.at[l].transpose(), s.alphas[static_cast<size_t>(l)], s);
    const Index step = chunk_rows(B, Bp, C, L);
    for (Index r0 = 0; r0 < B; r0 += step) {
        const Index rows = std::min(step, B - r0);
        for (Index l = 1; l <= L; ++l)
            product(I.Vt[l].middleRows(r0 * C, rows * C), J.Vt[l].transpose(), s.psi[static_cast<size_t>(l)], s);
        for (Index l = 1; l <= L; ++l) {
            const auto al = s.alphas[static_cast<size_t>(l)].middleRows(r0, rows).array();
            for (Index m = l; m <= L; ++m) {
                block_inner(s.psi[static_cast<size_t>(l)], s.psi[static_cast<size_t>(m)], C, rows, Bp, s.gram);
                const auto bm = s.alphas[static_cast<size_t>(m)].middleRows(r0, rows).array();
                out[I.pair(l, m)] += (al * bm * s.gram.array()).sum();
            }
        }
    }
}

// Hessian, l = m = L - 1 with M = V V^T + diag(rho):
// <M, M'> = |V^T V'|_F^2 + sum_k rho'_k |V_k|^2 + sum_k rho_k |V'_k|^2 + rho . rho'.
template <class M>
double lowrank_diag_term(const FeaturesOf<M>& I, const FeaturesOf<M>& J, Index l, PairScratch& s) {
    const Index C = I.C, B = I.B, Bp = J.B;
    product(I.u2, J.rho.transpose(), s.inner, s);
    product(I.rho, J.u2.transpose(), s.inner, s, true);
    product(I.rho, J.rho.transpose(), s.inner, s, true);
    s.psi.resize(1);
    double total = 0.0;
    const Index step = chunk_rows(B, Bp, C, 1);
    for (Index r0 = 0; r0 < B; r0 += step) {
        const Index rows = std::min(step, B - r0);
        product(I.Vt[l].middleRows(r0 * C, rows * C), J.Vt[l].transpose(), s.psi[0], s);
        block_inner(s.psi[0], s.psi[0], C, rows, Bp, s.gram);
        total += (s.alpha.middleRows(r0, rows).array().square() *
                  (s.gram.array() + s.inner.middleRows(r0, rows).array())).sum();
    }
    return total;
}

}  // namespace

template <class M>
void pair_sum(const Model& model, const FeaturesOf<M>& I, const FeaturesOf<M>& J, const Options& opt,
              PairScratch& s, double* out) {
    const bool hessian = opt.hessian;
    const Index L = model.n_layers();
    if (opt.structured && !hessian) {
        pair_sum_ggn(model, I, J, s, out);
        return;
    }
    const bool lowrank = opt.structured && L >= 2;
    for (Index l = 1; l <= L; ++l) {
        product(I.at[l], J.at[l].transpose(), s.alpha, s);
        for (Index m = l; m <= L; ++m) {
            const Index p = I.pair(l, m);
            if (l == m && lowrank && l == L - 1) {
                out[p] = lowrank_diag_term(I, J, l, s);
                continue;
            }
            product(I.G[p], J.G[p].transpose(), s.gram, s);
            if (l == m) {
                out[p] = (s.alpha.array().square() * s.gram.array()).sum();
                continue;
            }
            product(I.at[m], J.at[m].transpose(), s.beta, s);
            s.inner.noalias() = s.beta.cwiseProduct(s.gram);
            if (hessian) {
                product(I.delta[m], J.delta[m].transpose(), s.beta, s);  // gamma
                if (m == l + 1) {
                    product(I.sp[l], J.sp[l].transpose(), s.gram, s);
                    s.inner.array() += s.beta.array() * s.gram.array();
                    product(I.X[l], J.Y[l].transpose(), s.inner, s, true);
                    product(I.Y[l], J.X[l].transpose(), s.inner, s, true);
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

void to_single(BlockFeatures& F, BlockFeaturesF& out) {
    auto cast_all = [](std::vector<RowMat>& from, std::vector<RowMatF>& to) {
        to.resize(from.size());
        for (size_t i = 0; i < from.size(); ++i) {
            to[i] = from[i].cast<float>();
            from[i] = RowMat();
        }
    };
    out.B = F.B;
    out.L = F.L;
    out.C = F.C;
    cast_all(F.at, out.at);
    cast_all(F.delta, out.delta);
    cast_all(F.sp, out.sp);
    cast_all(F.G, out.G);
    cast_all(F.Q, out.Q);
    cast_all(F.X, out.X);
    cast_all(F.Y, out.Y);
    cast_all(F.Vt, out.Vt);
    out.rho = F.rho.cast<float>();
    out.u2 = F.u2.cast<float>();
    F.rho = RowMat();
    F.u2 = RowMat();
    out.trace = F.trace;
}

}  // namespace wsb
