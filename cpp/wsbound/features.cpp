#include "features.hpp"

#include "activations.hpp"

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace wsb {
namespace {

using MapMat = Eigen::Map<RowMat>;
using CMapMat = Eigen::Map<const RowMat>;

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
    cross_products(A, Bf, l, m, d_l, d_m, 0, nA, s);
    for (Index k = 0; k < nB; ++k) {
        const CMap Qk(Bf.Q[p].row(k).data(), d_prev, d_l);
        product(A.at[m].leftCols(d_prev), Qk, s.z, s);  // [n, r] = (Q_k^T b_n)[r]
        const CMapMat P(s.p2.row(k).data(), nA, d_l);
        if (swap) {
            s.inner.row(k) += (s.z.array() * P.array()).rowwise().sum().matrix().transpose();
        } else {
            s.inner.col(k) += (s.z.array() * P.array()).rowwise().sum().matrix();
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
    if (d_m >= d_l) {  // P = G delta' over d_m, then sum over r with a o sigma'
        const Index rows = cross_rows(d_l, nB);
        for (Index n0 = 0; n0 < nA; n0 += rows) {
            const Index c = std::min(rows, nA - n0);
            cross_products(A, Bf, l, l + 1, d_l, d_m, n0, c, s);
            const auto ad = a.middleRows(n0, c).template cast<double>();
            for (Index k = 0; k < nB; ++k) {
                const CMapMat P(s.p2.row(k).data(), c, d_l);
                const auto spk = Bf.sp[l].row(k).template cast<double>().array();
                const auto t = ((P.array() * ad.array()).rowwise() * spk).rowwise().sum().matrix();
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
            const auto t = (s.p2.middleRows(n * d_m, d_m).array() * s.ct.array()).colwise().sum().matrix();
            if (swap) {
                s.inner.col(n0 + n) += t.transpose();
            } else {
                s.inner.row(n0 + n) += t;
            }
        }
    }
}

// Tt[l] = Tt[l+1] W_{l+1}, each sample's C rows scaled by sigma'(z_l) column-wise (T_l = T_{l+1} W_{l+1} D_l).
void propagate_t(const Model& model, BlockFeatures& F, Index l) {
    const Index C = F.C;
    F.Tt[l].noalias() = F.Tt[l + 1] * model.W[static_cast<size_t>(l)];
    for (Index n = 0; n < F.B; ++n) F.Tt[l].middleRows(n * C, C).array().rowwise() *= F.sp[l].row(n).array();
}

// u2 = squared row norms of V = D W^T S (A = S S^T):  u2_k = w s_k^2 (sum_i p_i W_ik^2 - (sum_i p_i W_ik)^2).
void squared_v_rows(const RowMat& W, BlockFeatures& F, Index l) {
    const RowMat pw = F.p * W;
    F.u2.noalias() = F.p * W.array().square().matrix();
    F.u2.array() -= pw.array().square();
    F.u2.array() *= F.sp[l].array().square();
    F.u2.array().colwise() *= F.w.col(0).array();
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
    F.Tt.assign(nL, RowMat());
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

    // Output: p = softmax(z_L), delta_L = w p - y, M_L = A = w (diag p - p p^T), w = sum(y) (= 1).
    const Index C = z.cols();
    const bool ggn_fast = opt.structured && !hessian;
    const bool lowrank = opt.structured && hessian && L >= 2;
    F.C = C;
    F.delta[L].resize(B, C);
    F.p.resize(B, C);
    F.w.resize(B, 1);
    M[L].resize(B, C * C);
    for (Index n = 0; n < B; ++n) {
        auto p = F.p.row(n);
        p = (z.row(n).array() - z.row(n).maxCoeff()).exp().matrix();
        p /= p.sum();
        const double w = Yb.row(n).sum();
        F.w(n, 0) = w;
        F.delta[L].row(n) = w * p - Yb.row(n);
        MapMat A(M[L].row(n).data(), C, C);
        A.noalias() = -w * p.transpose() * p;
        A.diagonal() += w * p.transpose();
    }
    if (ggn_fast) {
        // GGN through K_l = T_l T_l'^T (docs/structured.md); tr(G_ll) share = sum_n |a~_{l-1}|^2 tr(A T_l T_l^T).
        F.trace.assign(nL, 0.0);
        for (Index n = 0; n < B; ++n) {
            const auto p = F.p.row(n);
            F.trace[static_cast<size_t>(L)] += F.at[L].row(n).squaredNorm() * F.w(n, 0) * (p.sum() - p.squaredNorm());
        }
        if (L < 2) return;
        const RowMat& WL = model.W[static_cast<size_t>(L - 1)];
        squared_v_rows(WL, F, L - 1);
        for (Index n = 0; n < B; ++n) F.trace[static_cast<size_t>(L - 1)] += F.at[L - 1].row(n).squaredNorm() * F.u2.row(n).sum();
        if (L < 3) return;
        F.Tt[L - 1].resize(B * C, WL.cols());
        for (Index n = 0; n < B; ++n) F.Tt[L - 1].middleRows(n * C, C) = WL.array().rowwise() * F.sp[L - 1].row(n).array();
        for (Index l = L - 2; l >= 1; --l) {
            propagate_t(model, F, l);
            double t = 0.0;
            for (Index n = 0; n < B; ++n) {
                const auto T = F.Tt[l].middleRows(n * C, C);
                const auto p = F.p.row(n);
                t += F.at[l].row(n).squaredNorm() * F.w(n, 0) *
                     ((T.rowwise().squaredNorm().transpose().array() * p.array()).sum() - (p * T).squaredNorm());
            }
            F.trace[static_cast<size_t>(l)] = t;
        }
        F.Tt[L - 1] = RowMat();  // K_{L-1} comes from sigma'_{L-1} and W_L (Omega) instead
        return;
    }

    // Backward: delta_l and M_l = D W^T M_{l+1} W D + diag(sigma'' g)  (no diag for the GGN),
    // through G_{l,l+1} = D_l W_{l+1}^T M_{l+1} (kept: it is a feature), M_l = G_{l,l+1} W_{l+1} D_l + diag.
    RowMat g;
    for (Index l = L - 1; l >= 1; --l) {
        const RowMat& Wn = model.W[static_cast<size_t>(l)];  // W_{l+1}: (d_{l+1}, d_l)
        const Index d_l = Wn.cols(), d_n = Wn.rows();
        g.noalias() = F.delta[l + 1] * Wn;
        F.delta[l] = F.sp[l].cwiseProduct(g);
        if (lowrank && l == L - 1) {  // M_{L-1} = V V^T + diag(rho), V = D W^T S
            F.rho = spp[l].cwiseProduct(g);
            squared_v_rows(Wn, F, l);
            if (L == 2) continue;  // nothing below needs the dense d x d matrix
        }
        RowMat& Gl = F.G[F.pair(l, l + 1)];
        Gl.resize(B, d_l * d_n);
        M[l].resize(B, d_l * d_l);
        for (Index n = 0; n < B; ++n) {
            MapMat Gn(Gl.row(n).data(), d_l, d_n);
            Gn.noalias() = Wn.transpose() * CMapMat(M[l + 1].row(n).data(), d_n, d_n);
            Gn.array().colwise() *= F.sp[l].row(n).transpose().array();
            MapMat Ml(M[l].row(n).data(), d_l, d_l);
            Ml.noalias() = Gn * Wn;
            Ml.array().rowwise() *= F.sp[l].row(n).array();
            if (hessian) Ml.diagonal() += spp[l].row(n).cwiseProduct(g.row(n)).transpose();
        }
    }

    // tr(H) share: sum_n sum_l |a~_{l-1}|^2 tr(M_l).
    F.trace.assign(nL, 0.0);
    for (Index l = 1; l <= L; ++l) {
        const Index d = model.d(l);
        double t = 0.0;
        if (lowrank && l == L - 1) {  // M_{L-1} = V V^T + diag(rho): tr = |V|_F^2 + sum(rho)
            for (Index n = 0; n < B; ++n) t += F.at[l].row(n).squaredNorm() * (F.u2.row(n).sum() + F.rho.row(n).sum());
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
            if (l == m - 1 && F.G[F.pair(l, m)].size() > 0) continue;  // from the backward pass
            // One hidden layer through K_1: G_{1,2} is neither a feature nor needed for another
            // block (it was built only to be dropped below: B d_1 C values, more than the features).
            if (lowrank && L == 2) continue;
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
    if (lowrank) {  // the (L-1, L-1) and (L-1, L) blocks are contracted through K_{L-1} instead
        F.G[F.pair(L - 1, L - 1)] = RowMat();
        F.G[F.pair(L - 1, L)] = RowMat();
    }
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
}

namespace {

using RowArr = Eigen::Array<double, 1, Eigen::Dynamic>;

#if defined(__GNUC__) || defined(__clang__) || defined(_MSC_VER)
#define WSB_RESTRICT __restrict
#else
#define WSB_RESTRICT
#endif
#if defined(__GNUC__) && !defined(__clang__)
#define WSB_IVDEP _Pragma("GCC ivdep")
#else
#define WSB_IVDEP
#endif

// Omega = [W_i o W_j] for i <= j (i-major), so that (Omega o s_n) s_n'^T packs the C(C+1)/2
// distinct entries of K_{L-1} = W diag(s_n o s_n') W^T.
template <class M>
void make_omega(const RowMat& W, KBuffers<M>& k) {
    using T = typename M::Scalar;
    const Index C = W.rows();
    k.omega.resize(C * (C + 1) / 2, W.cols());
    Index r = 0;
    for (Index i = 0; i < C; ++i)
        for (Index j = i; j < C; ++j) k.omega.row(r++) = W.row(i).cwiseProduct(W.row(j)).template cast<T>();
    k.wl = W.template cast<T>();
}

// Rows of I whose K-route GEMMs run together (h output rows each over B' columns, from h left
// rows of width d): enough to amortise the packing of J's operand, few enough for the outputs
// and the left operand to stay within 131072 values each (16 left rows of 66 x 1024 took 8 MiB
// per thread, more than a block's features; the plan counts both, _cost.cpp_worker_doubles).
Index rows_per_gemm(Index h, Index Bp, Index d) {
    const Index by_output = 131072 / std::max<Index>(h * Bp, 1), by_left = 131072 / std::max<Index>(h * d, 1);
    return std::max<Index>(1, std::min<Index>({16, by_output, by_left}));
}

// For one sample n of I, the C x C matrices K of its pairs with every n' of J, stored as
// C*C rows over n' (row i C + j holds K_ij), and what the identity of docs/structured.md
// needs: kh = p_i p'_j K_ij, u = K p', v = K^T p, c = p^T K p'.  K = I is kept implicit.
struct KRows {
    bool identity = false;
    RowMat k, kh, u, v;
    RowArr c;

    // K from the packed upper triangle (C(C+1)/2 rows, i-major).
    void unpack_symmetric(const RowMat& packed, Index r0, Index C) {
        k.resize(C * C, packed.cols());
        for (Index i = 0; i < C; ++i)
            for (Index j = i; j < C; ++j) {
                k.row(i * C + j) = packed.row(r0++);
                if (j != i) k.row(j * C + i) = k.row(i * C + j);
            }
    }
    // p: the C probabilities of n; pt: p'^T, (C, B').
    void prepare(const double* p, const RowMat& pt, Index C) {
        const Index Bp = pt.cols();
        if (identity) {
            u = pt;
            v.resize(C, Bp);
            for (Index i = 0; i < C; ++i) v.row(i).setConstant(p[i]);
            c = (pt.array().colwise() * Eigen::Map<const Eigen::ArrayXd>(p, C)).colwise().sum();
            return;
        }
        kh.resize(C * C, Bp);
        u.setZero(C, Bp);
        v.setZero(C, Bp);
        for (Index i = 0; i < C; ++i)
            for (Index j = 0; j < C; ++j) {
                const auto kij = k.row(i * C + j).array();
                u.row(i).array() += kij * pt.row(j).array();
                v.row(j).array() += p[i] * kij;
                kh.row(i * C + j).array() = p[i] * kij * pt.row(j).array();
            }
        c = (u.array().colwise() * Eigen::Map<const Eigen::ArrayXd>(p, C)).colwise().sum();
    }
};

// tr(A K_a A' K_b^T) / (w w') for every n' (docs/structured.md):
// sum p_i p'_j Ka_ij Kb_ij - sum_i p_i ua_i ub_i - sum_j p'_j va_j vb_j + ca cb.
RowArr identity_term(const KRows& a, const KRows& b, const double* p, const RowMat& pt, Index C) {
    RowArr t = a.c * b.c;
    if (a.identity || b.identity) {  // only the diagonal of the other (kh of I is diag(p_i p'_i))
        for (Index i = 0; i < C; ++i) {
            if (b.identity) {
                t += a.identity ? (p[i] * pt.row(i).array()).eval() : a.kh.row(i * C + i).array().eval();
            } else {
                t += p[i] * pt.row(i).array() * b.k.row(i * C + i).array();
            }
        }
    } else {
        for (Index q = 0; q < C * C; ++q) t += a.kh.row(q).array() * b.k.row(q).array();
    }
    for (Index i = 0; i < C; ++i)
        t -= p[i] * a.u.row(i).array() * b.u.row(i).array() + pt.row(i).array() * a.v.row(i).array() * b.v.row(i).array();
    return t;
}

// One diagonal entry K_ii (row k) of the fused pass of symmetric_terms.
void diag_update(Index n, const double* WSB_RESTRICT k, const double* WSB_RESTRICT pti, double pi,
                 double* WSB_RESTRICT ui, double* WSB_RESTRICT vi, double* WSB_RESTRICT dg, double* WSB_RESTRICT s4) {
    WSB_IVDEP
    for (Index t = 0; t < n; ++t) {
        const double kk = k[t], w = pi * pti[t] * kk;
        ui[t] += kk * pti[t];
        vi[t] += pi * kk;
        dg[t] += w;
        s4[t] += w * kk;
    }
}

// One off-diagonal pair K_ij = K_ji (row k) of the fused pass of symmetric_terms.
void offdiag_update(Index n, const double* WSB_RESTRICT k, const double* WSB_RESTRICT pti,
                    const double* WSB_RESTRICT ptj, double pi, double pj, double* WSB_RESTRICT ui,
                    double* WSB_RESTRICT uj, double* WSB_RESTRICT vi, double* WSB_RESTRICT vj,
                    double* WSB_RESTRICT s4) {
    WSB_IVDEP
    for (Index t = 0; t < n; ++t) {
        const double kk = k[t];
        ui[t] += kk * ptj[t];
        uj[t] += kk * pti[t];
        vi[t] += pj * kk;
        vj[t] += pi * kk;
        s4[t] += (pi * ptj[t] + pj * pti[t]) * kk * kk;
    }
}

// For a symmetric K given by its packed rows (i <= j, i-major, from row r0 of packed), the
// two traces the one-hidden-layer-like blocks need, for every n':
//   t4 = tr(A K A' K) / (w w') and t2 = tr(A K A') / (w w')   (the identity with Kt = K, I),
// one fused pass over the packed rows (u = K p', v = K p, s4 = sum p_i p'_j K_ij^2,
// dg = sum p_i p'_i K_ii), then O(C) passes.  u, v: (C, B') scratch; pp = p . p'.
void symmetric_terms(const RowMat& packed, Index r0, const double* p, const RowMat& pt, Index C, RowMat& u,
                     RowMat& v, RowArr& t4, RowArr& t2, RowArr& pp) {
    const Index Bp = pt.cols();
    u.setZero(C, Bp);
    v.setZero(C, Bp);
    t4.setZero(Bp);
    t2.setZero(Bp);
    for (Index i = 0; i < C; ++i) {
        diag_update(Bp, packed.row(r0++).data(), pt.row(i).data(), p[i], u.row(i).data(), v.row(i).data(), t2.data(),
                    t4.data());
        for (Index j = i + 1; j < C; ++j)
            offdiag_update(Bp, packed.row(r0++).data(), pt.row(i).data(), pt.row(j).data(), p[i], p[j], u.row(i).data(),
                           u.row(j).data(), v.row(i).data(), v.row(j).data(), t4.data());
    }
    RowArr c = RowArr::Zero(Bp);
    pp.setZero(Bp);
    for (Index i = 0; i < C; ++i) {
        c += p[i] * u.row(i).array();
        pp += p[i] * pt.row(i).array();
    }
    for (Index i = 0; i < C; ++i) {
        t4 -= p[i] * u.row(i).array().square() + pt.row(i).array() * v.row(i).array().square();
        t2 -= p[i] * pt.row(i).array() * (u.row(i).array() + v.row(i).array());
    }
    t4 += c.square();
    t2 += c * pp;
}

// GGN (docs/structured.md): out[l,m] = sum_{n,n'} alpha_l alpha_m w w' tr(A K_l A' K_m^T),
// K_L = I, K_{L-1} from (Omega o s_n) s_n'^T, K_l = T_l T_l'^T (l <= L - 2).
template <class M>
void pair_sum_ggn(const Model& model, const FeaturesOf<M>& I, const FeaturesOf<M>& J, PairScratch& s, double* out) {
    const Index L = model.n_layers(), C = I.C, B = I.B, Bp = J.B;
    const auto nL = static_cast<size_t>(L + 1);
    s.alphas.resize(nL);
    for (Index l = 1; l <= L; ++l) product(I.at[l], J.at[l].transpose(), s.alphas[static_cast<size_t>(l)], s);
    KBuffers<M>& kb = s.template kbuf<M>();
    if (L >= 2) make_omega(model.W[static_cast<size_t>(L - 1)], kb);
    kb.tj.resize(nL);
    for (Index l = 1; l + 2 <= L; ++l) {  // class-major copy of J's T_l: row j B' + n'
        M& tj = kb.tj[static_cast<size_t>(l)];
        tj.resize(C * Bp, model.d(l));
        for (Index j = 0; j < C; ++j)
            for (Index k = 0; k < Bp; ++k) tj.row(j * Bp + k) = J.Tt[l].row(k * C + j);
    }
    s.pt = J.p.transpose();
    std::vector<KRows> lev(nL);
    lev[static_cast<size_t>(L)].identity = true;
    const Index R = C * (C + 1) / 2, step = rows_per_gemm(R, Bp, model.d(L - 1));
    s.kt.resize(nL);
    RowArr t4, t2, pp;
    for (Index n = 0; n < B; ++n) {
        const Index nl = n % step, rows = std::min(step, B - (n - nl));
        if (nl == 0) {  // the GEMMs for rows [n, n + rows) of I
            if (L >= 2) {
                kb.left.resize(rows * R, model.d(L - 1));
                for (Index r = 0; r < rows; ++r)
                    kb.left.middleRows(r * R, R) = kb.omega.array().rowwise() * I.sp[L - 1].row(n + r).array();
                product(kb.left, J.sp[L - 1].transpose(), s.k1, s);
            }
            for (Index l = 1; l + 2 <= L; ++l)  // (rows C, d_l) x (d_l, C B'): row r C + i, column j B' + n'
                product(I.Tt[l].middleRows(n * C, rows * C), kb.tj[static_cast<size_t>(l)].transpose(),
                        s.kt[static_cast<size_t>(l)], s);
        }
        const double* p = I.p.row(n).data();
        const RowArr ww = I.w(n, 0) * J.w.col(0).transpose().array();
        if (L == 2) {  // one hidden layer: K_1 symmetric and K_2 = I, the fused pass of symmetric_terms
            symmetric_terms(s.k1, nl * R, p, s.pt, C, s.u, s.v, t4, t2, pp);
            RowArr tii = pp + pp.square();  // tr(A A') / (w w')
            for (Index i = 0; i < C; ++i) tii -= p[i] * s.pt.row(i).array() * (s.pt.row(i).array() + p[i]);
            const auto a1 = s.alphas[1].row(n).array(), a2 = s.alphas[2].row(n).array();
            out[I.pair(1, 1)] += (a1 * a1 * ww * t4).sum();
            out[I.pair(1, 2)] += (a1 * a2 * ww * t2).sum();
            out[I.pair(2, 2)] += (a2 * a2 * ww * tii).sum();
            continue;
        }
        for (Index l = 1; l <= L; ++l) {
            KRows& K = lev[static_cast<size_t>(l)];
            if (l == L - 1) {
                K.unpack_symmetric(s.k1, nl * R, C);
            } else if (l + 2 <= L) {
                K.k = Eigen::Map<const RowMat>(s.kt[static_cast<size_t>(l)].row(nl * C).data(), C * C, Bp);
            }
            K.prepare(p, s.pt, C);
        }
        for (Index l = 1; l <= L; ++l) {
            const auto al = s.alphas[static_cast<size_t>(l)].row(n).array();
            for (Index m = l; m <= L; ++m)
                out[I.pair(l, m)] += (al * s.alphas[static_cast<size_t>(m)].row(n).array() * ww *
                                      identity_term(lev[static_cast<size_t>(l)], lev[static_cast<size_t>(m)], p, s.pt, C))
                                         .sum();
        }
    }
}

// Hessian, the blocks (L-1, L-1) and (L-1, L) through K = K_{L-1} (docs/structured.md);
// alpha is the Gram of a~_{L-2}.
template <class M>
void k_route_hessian(const Model& model, const FeaturesOf<M>& I, const FeaturesOf<M>& J, const RowMat& alpha,
                     PairScratch& s, double& out_ll, double& out_lm) {
    const Index L = model.n_layers(), C = I.C, B = I.B, d = model.d(L - 1), R = C * (C + 1) / 2;
    product(I.at[L], J.at[L].transpose(), s.beta, s);
    product(I.delta[L], J.delta[L].transpose(), s.gram, s);  // gamma
    product(I.u2, J.rho.transpose(), s.inner, s);
    product(I.rho, J.u2.transpose(), s.inner, s, true);
    product(I.rho, J.rho.transpose(), s.inner, s, true);
    KBuffers<M>& kb = s.template kbuf<M>();
    make_omega(model.W[static_cast<size_t>(L - 1)], kb);
    const M& sI = I.sp[L - 1];
    const M& sJ = J.sp[L - 1];
    kb.sa_j = sJ.cwiseProduct(J.at[L].leftCols(d));
    s.pt = J.p.transpose();
    s.dt = J.delta[L].transpose().template cast<double>();
    const RowArr wJ = J.w.col(0).transpose().array();
    RowArr t4, t2, pp;
    const Index H = 1 + R + C, step = rows_per_gemm(H, J.B, d);
    double ll = 0.0, lm = 0.0;
    for (Index n = 0; n < B; ++n) {
        const Index nl = n % step;
        if (nl == 0) {
            // per row r of I: s_r (-> s.s'), Omega o s_r (-> K packed), W o s_r o a_r (-> E), each against s';
            // then W o s_r against s' o a' (-> E')
            const Index rows = std::min(step, B - n);
            kb.left.resize(rows * H, d);
            kb.left2.resize(rows * C, d);
            for (Index r = 0; r < rows; ++r) {
                const auto sr = sI.row(n + r).array();
                kb.left.row(r * H) = sI.row(n + r);
                kb.left.middleRows(r * H + 1, R) = kb.omega.array().rowwise() * sr;
                kb.left.middleRows(r * H + 1 + R, C) = kb.wl.array().rowwise() * (sr * I.at[L].row(n + r).head(d).array());
                kb.left2.middleRows(r * C, C) = kb.wl.array().rowwise() * sr;
            }
            product(kb.left, sJ.transpose(), s.k1, s);
            product(kb.left2, kb.sa_j.transpose(), s.k2, s);
        }
        const Index base = nl * H;
        const double* p = I.p.row(n).data();
        const double w = I.w(n, 0);
        symmetric_terms(s.k1, base + 1, p, s.pt, C, s.u, s.v, t4, t2, pp);
        // cross terms: w sum_i p_i (delta'_i - p.delta') E_i and w' sum_i p'_i (delta_i - p'.delta) E'_i
        RowArr pd = RowArr::Zero(s.pt.cols()), pd2 = pd, c1 = pd, c2 = pd;
        for (Index i = 0; i < C; ++i) {
            const double di = static_cast<double>(I.delta[L](n, i));
            pd += p[i] * s.dt.row(i).array();
            pd2 += di * s.pt.row(i).array();
        }
        for (Index i = 0; i < C; ++i) {
            const double di = static_cast<double>(I.delta[L](n, i));
            c1 += p[i] * (s.dt.row(i).array() - pd) * s.k1.row(base + 1 + R + i).array();
            c2 += s.pt.row(i).array() * (di - pd2) * s.k2.row(nl * C + i).array();
        }
        const auto a = alpha.row(n).array();
        ll += (a * a * (w * wJ * t4 + s.inner.row(n).array())).sum();
        lm += (a * (s.beta.row(n).array() * w * wJ * t2 + s.gram.row(n).array() * s.k1.row(base).array() + w * c1 + wJ * c2)).sum();
    }
    out_ll = ll;
    out_lm = lm;
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
        if (lowrank && l == L - 1) {
            k_route_hessian(model, I, J, s.alpha, s, out[I.pair(l, l)], out[I.pair(l, L)]);
            continue;
        }
        for (Index m = l; m <= L; ++m) {
            const Index p = I.pair(l, m);
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
    cast_all(F.Tt, out.Tt);
    out.p = F.p;
    out.w = F.w;
    out.rho = F.rho.cast<float>();
    out.u2 = F.u2.cast<float>();
    F.rho = RowMat();
    F.u2 = RowMat();
    out.trace = F.trace;
}

}  // namespace wsb
