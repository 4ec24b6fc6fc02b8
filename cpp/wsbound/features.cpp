#include "features.hpp"

#include "activations.hpp"
#include "softmax.hpp"

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

// The scale of unscaled (float64) features.
const Eigen::VectorXd& no_scale() {
    static const Eigen::VectorXd none;
    return none;
}

// Row n's power-of-two factor of a float32 feature (FeaturesOf::delta_scale etc.; 1 when unscaled).
inline double row_scale(const Eigen::VectorXd& v, Index n) { return v.size() > 0 ? v[n] : 1.0; }

// out(n, n') *= a[n] b[n'] for a product of two row-scaled float32 features (no-op when unscaled).
void unscale(RowMat& out, const Eigen::VectorXd& a, const Eigen::VectorXd& b) {
    if (a.size() == 0 && b.size() == 0) return;
    for (Index n = 0; n < out.rows(); ++n) {
        const double an = row_scale(a, n);
        for (Index k = 0; k < out.cols(); ++k) out(n, k) = (out(n, k) * an) * row_scale(b, k);
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

// Tt[l] = Tt[l+1] W_{l+1}, each sample's C rows scaled by sigma'(z_l) column-wise (T_l = T_{l+1} W_{l+1} D_l).
void propagate_t(const Model& model, BlockFeatures& F, Index l) {
    const Index C = F.C;
    F.Tt[l].noalias() = F.Tt[l + 1] * model.W[static_cast<size_t>(l)];
    for (Index n = 0; n < F.B; ++n) F.Tt[l].middleRows(n * C, C).array().rowwise() *= F.sp[l].row(n).array();
}

// u2 = squared row norms of V = D W^T S (A = S S^T):  u2_k = s_k^2 W_k^T A W_k (W_k column k of W),
// the quadratic form in the shifted non-negative form (docs/numerics.md section 2).
void squared_v_rows(const RowMat& W, BlockFeatures& F, Index l) {
    F.u2.resize(F.B, W.cols());
    RowArray xb, xh, out;
    for (Index n = 0; n < F.B; ++n) {
        quadratic_rows(W, F.p.row(n).data(), F.ref(n), xb, xh, out);
        F.u2.row(n) = (F.w(n, 0) * out * F.sp[l].row(n).array().square()).matrix();
    }
}

// Dense Q_{l,m} = D_{m-1} W_{m-1} Q_{l,m-1} for m >= l + 2, from Q_{l,l+1} = D_l.
void dense_q(const Model& model, BlockFeatures& F) {
    const Index L = F.L, B = F.B;
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

// norms[pair(l,m)] = sum_n nu_n^{lm} (docs/numerics.md section 4): for the Hessian
// nu = |a~_{l-1}| (g_lm |a~_{m-1}| + [l < m] |delta_m| |Q_lm|_F) with |Q_{l,l+1}|_F = |sigma'_l|;
// for the GGN nu = |a~_{l-1}| |a~_{m-1}| (tau_l tau_m)^{1/2}.  Summed over the block in order.
void magnitudes(BlockFeatures& F, const RowMat& dabs, const RowMat& gnorm, bool hessian) {
    const Index L = F.L;
    for (Index n = 0; n < F.B; ++n)
        for (Index l = 1; l <= L; ++l) {
            const double al = F.at[l].row(n).norm();
            for (Index m = l; m <= L; ++m) {
                const double am = F.at[m].row(n).norm();
                double nu;
                if (!hessian) {
                    nu = (al * std::sqrt(dabs(n, l))) * (am * std::sqrt(dabs(n, m)));
                } else {
                    double cross = 0.0;
                    if (m == l + 1) {
                        cross = F.delta[m].row(n).norm() * F.sp[l].row(n).norm();
                    } else if (m > l + 1) {
                        cross = F.delta[m].row(n).norm() * F.Q[F.pair(l, m)].row(n).norm();
                    }
                    nu = al * (gnorm(n, F.pair(l, m)) * am + cross);
                }
                F.norms[static_cast<size_t>(F.pair(l, m))] += nu;
            }
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

    // Output (docs/numerics.md sections 1-2): reference class r, p = softmax(z_L), q = 1 - p_r,
    // delta_L = w p - y with delta_r = -sum_{k != r} delta_k, M_L = A = w (diag p - p p^T) with
    // A_rr = w p_r q; w = sum(y) (= 1 for hard labels).
    const Index C = z.cols();
    const bool ggn_fast = opt.structured && !hessian;
    const bool lowrank = opt.structured && hessian && L >= 2;
    F.C = C;
    F.delta[L].resize(B, C);
    F.p.resize(B, C);
    F.w.resize(B, 1);
    F.ref.resize(B);
    F.q.resize(B);
    std::vector<double> tau_a(static_cast<size_t>(B));  // tr(A) per sample
    if (!ggn_fast) M[L].resize(B, C * C);
    for (Index n = 0; n < B; ++n) {
        double* p = F.p.row(n).data();
        double q = 0.0;
        const int r = stable_softmax(z.row(n).data(), C, p, q);
        F.ref(n) = r;
        F.q(n) = q;
        const double w = Yb.row(n).sum();
        F.w(n, 0) = w;
        stable_delta(p, Yb.row(n).data(), w, r, C, F.delta[L].row(n).data());
        tau_a[static_cast<size_t>(n)] = w * trace_a(p, r, q, C);
        if (ggn_fast) continue;
        MapMat A(M[L].row(n).data(), C, C);
        const auto pr = F.p.row(n);
        A.noalias() = -w * pr.transpose() * pr;
        for (Index i = 0; i < C; ++i) A(i, i) = w * p[i] * one_minus_p(p, r, q, i);
    }
    F.trace.assign(nL, 0.0);
    F.trace_abs.assign(nL, 0.0);
    F.norms.assign(nL * nL, 0.0);
    if (ggn_fast) {
        // GGN through K_l = T_l T_l'^T (docs/structured.md); tr(G_ll) share = sum_n |a~_{l-1}|^2 tau_l
        // with tau_l = tr(T_l^T A T_l) >= 0 (the shifted quadratic forms); nu_n^{lm} = |a~_{l-1}| |a~_{m-1}|
        // (tau_l tau_m)^{1/2} (docs/numerics.md section 4).
        RowMat tau(B, L + 1);  // tau(n, l)
        tau.setZero();
        for (Index n = 0; n < B; ++n) tau(n, L) = tau_a[static_cast<size_t>(n)];
        if (L >= 2) {
            const RowMat& WL = model.W[static_cast<size_t>(L - 1)];
            squared_v_rows(WL, F, L - 1);
            for (Index n = 0; n < B; ++n) tau(n, L - 1) = F.u2.row(n).sum();
        }
        if (L >= 3) {
            const RowMat& WL = model.W[static_cast<size_t>(L - 1)];
            F.Tt[L - 1].resize(B * C, WL.cols());
            for (Index n = 0; n < B; ++n) F.Tt[L - 1].middleRows(n * C, C) = WL.array().rowwise() * F.sp[L - 1].row(n).array();
            RowArray xb, xh, qf;
            for (Index l = L - 2; l >= 1; --l) {
                propagate_t(model, F, l);
                for (Index n = 0; n < B; ++n) {
                    quadratic_rows(F.Tt[l].middleRows(n * C, C), F.p.row(n).data(), F.ref(n), xb, xh, qf);
                    tau(n, l) = F.w(n, 0) * qf.sum();
                }
            }
            F.Tt[L - 1] = RowMat();  // K_{L-1} comes from sigma'_{L-1} and W_L (Omega) instead
        }
        for (Index n = 0; n < B; ++n) {
            for (Index l = 1; l <= L; ++l) {
                const double a2 = F.at[l].row(n).squaredNorm();
                F.trace[static_cast<size_t>(l)] += a2 * tau(n, l);
                F.trace_abs[static_cast<size_t>(l)] += a2 * tau(n, l);
                const double gl = std::sqrt(a2) * std::sqrt(tau(n, l));
                for (Index m = l; m <= L; ++m)
                    F.norms[static_cast<size_t>(F.pair(l, m))] +=
                        gl * (F.at[m].row(n).norm() * std::sqrt(tau(n, m)));
            }
        }
        F.u2 = RowMat();  // only the trace shares and the magnitudes use it
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

    // tr(H) share: sum_n sum_l |a~_{l-1}|^2 tr(M_l), and its magnitude with sum_k |(M_l)_kk|
    // (dabs(n, l); for the GGN that is tau_l = tr(T_l^T A T_l) of docs/numerics.md section 4).
    RowMat dabs = RowMat::Zero(B, L + 1);
    for (Index l = 1; l <= L; ++l) {
        const Index d = model.d(l);
        double t = 0.0, ta = 0.0;
        for (Index n = 0; n < B; ++n) {
            const double a2 = F.at[l].row(n).squaredNorm();
            double tn;
            if (lowrank && l == L - 1) {  // M_{L-1} = V V^T + diag(rho): tr = |V|_F^2 + sum(rho)
                tn = F.u2.row(n).sum() + F.rho.row(n).sum();
                dabs(n, l) = (F.u2.row(n) + F.rho.row(n)).cwiseAbs().sum();
            } else {
                const auto diag = CMapMat(M[l].row(n).data(), d, d).diagonal();
                tn = diag.sum();
                dabs(n, l) = diag.cwiseAbs().sum();
            }
            t += a2 * tn;
            ta += a2 * dabs(n, l);
        }
        F.trace[static_cast<size_t>(l)] = t;
        F.trace_abs[static_cast<size_t>(l)] = ta;
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
    // g_lm >= |G_lm|_F per sample (docs/numerics.md section 4): the norm of G_lm where the pair
    // phase contracts it, the bounds of the K route for its two blocks.
    const auto np = static_cast<Index>(nL * nL);
    RowMat gnorm = RowMat::Zero(B, np);
    if (hessian) {
        for (Index l = 1; l <= L; ++l)
            for (Index m = l; m <= L; ++m) {
                const RowMat& G = F.G[F.pair(l, m)];
                if (G.size() == 0) continue;
                for (Index n = 0; n < B; ++n) gnorm(n, F.pair(l, m)) = G.row(n).norm();
            }
        if (lowrank)
            for (Index n = 0; n < B; ++n) {
                const double su = F.u2.row(n).sum();
                gnorm(n, F.pair(L - 1, L - 1)) = su + F.rho.row(n).norm();
                gnorm(n, F.pair(L - 1, L)) = std::sqrt(su) * std::sqrt(tau_a[static_cast<size_t>(n)]);
            }
    }
    if (lowrank) {  // the (L-1, L-1) and (L-1, L) blocks are contracted through K_{L-1} instead
        F.G[F.pair(L - 1, L - 1)] = RowMat();
        F.G[F.pair(L - 1, L)] = RowMat();
    }
    if (hessian) dense_q(model, F);
    magnitudes(F, dabs, gnorm, hessian);
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

// Row of K_ij (i, j in either order) in the packed upper triangle (i <= j, i-major).
inline Index packed_index(Index i, Index j, Index C) {
    if (i > j) std::swap(i, j);
    return i * C - i * (i - 1) / 2 + (j - i);
}

// The reference-class shift of docs/numerics.md section 3 for sample n (reference r) and every
// n' of J (references rj): dc_i[t] = K_{i r'_t} - K_{r r'_t} (C, B'), so that
//   S_ij = (K_ij - K_rj) - dc_i
// has an exactly zero row r and an exactly zero column r'_t (the same roundings cancel).
// K_ij over n' is the row base + at(i, j) * B'.
template <class At>
void shift_columns(const double* base, At at, int r, const int* rj, Index C, Index Bp, RowMat& dc) {
    thread_local std::vector<Index> off;  // off[i C + c]: offset of the row K_ic
    off.resize(static_cast<size_t>(C * C));
    for (Index i = 0; i < C; ++i)
        for (Index c = 0; c < C; ++c) off[static_cast<size_t>(i * C + c)] = at(i, c) * Bp;
    dc.resize(C, Bp);
    double* krr = dc.row(r).data();  // K_{r r'} first, zero at the end
    const Index* orr = off.data() + r * C;
    for (Index t = 0; t < Bp; ++t) krr[t] = base[orr[rj[t]] + t];
    for (Index i = 0; i < C; ++i) {
        if (i == r) continue;
        const Index* oi = off.data() + i * C;
        double* d = dc.row(i).data();
        for (Index t = 0; t < Bp; ++t) d[t] = base[oi[rj[t]] + t] - krr[t];
    }
    dc.row(r).setZero();
}

// For one sample n of I, the C x C matrices S = Z_r K Z_{r'}^T of its pairs with every n' of J,
// stored as C*C rows over n' (row i C + j holds S_ij), and what the identity of
// docs/structured.md needs: kh = p_i p'_j S_ij, u = S p', v = S^T p, c = p^T S p'.  K = I is
// kept implicit (tr(A S A' I) = tr(A S A' S_I^T), and with S's zero row r and column r' every
// term of that identity is of size q q': see identity_term).
struct KRows {
    bool identity = false;
    RowMat k, kh, u, v;
    RowArr c;

    // S from K's rows base + at(i, j) * B', and kh, u, v, c for it (p: the C probabilities of n;
    // pt: p'^T, (C, B')), in one pass.
    template <class At>
    void shift_prepare(const double* base, At at, int r, const int* rj, const double* p, const RowMat& pt, Index C,
                       RowMat& dc) {
        const Index Bp = pt.cols();
        shift_columns(base, at, r, rj, C, Bp, dc);
        k.resize(C * C, Bp);
        kh.resize(C * C, Bp);
        u.setZero(C, Bp);
        v.setZero(C, Bp);
        for (Index i = 0; i < C; ++i) {
            if (i == r) {  // S's row r is zero
                k.middleRows(i * C, C).setZero();
                kh.middleRows(i * C, C).setZero();
                continue;
            }
            const double* WSB_RESTRICT dci = dc.row(i).data();
            double* WSB_RESTRICT ui = u.row(i).data();
            const double pi = p[i];
            for (Index j = 0; j < C; ++j) {
                const double* WSB_RESTRICT kij = base + at(i, j) * Bp;
                const double* WSB_RESTRICT krj = base + at(r, j) * Bp;
                const double* WSB_RESTRICT ptj = pt.row(j).data();
                double* WSB_RESTRICT sk = k.row(i * C + j).data();
                double* WSB_RESTRICT sh = kh.row(i * C + j).data();
                double* WSB_RESTRICT vj = v.row(j).data();
                WSB_IVDEP
                for (Index t = 0; t < Bp; ++t) {
                    const double sij = (kij[t] - krj[t]) - dci[t];
                    sk[t] = sij;
                    ui[t] += sij * ptj[t];
                    vj[t] += pi * sij;
                    sh[t] = pi * sij * ptj[t];
                }
            }
        }
        c = (u.array().colwise() * Eigen::Map<const Eigen::ArrayXd>(p, C)).colwise().sum();
    }
    // K = I (p: the C probabilities of n; pt: p'^T, (C, B')).
    void prepare_identity(const double* p, const RowMat& pt, Index C) {
        const Index Bp = pt.cols();
        u = pt;
        v.resize(C, Bp);
        for (Index i = 0; i < C; ++i) v.row(i).setConstant(p[i]);
        c = (pt.array().colwise() * Eigen::Map<const Eigen::ArrayXd>(p, C)).colwise().sum();
    }
};

// tr(A S_a A' S_b^T) / (w w') for every n' (docs/structured.md, docs/numerics.md section 3):
// sum p_i p'_j Sa_ij Sb_ij - sum_i p_i ua_i ub_i - sum_j p'_j va_j vb_j + ca cb, for S_a shifted
// and S_b shifted or b the identity.  With b = I the terms are sum_i p_i p'_i Sa_ii,
// sum_i p_i p'_i ua_i, sum_j p_j p'_j va_j and ca (p . p'): S_a's zero row r and column r' make
// ua_r = va_r' = Sa_rr = Sa_r'r' = 0, so p_r and p'_r' only ever multiply exact zeros.
RowArr identity_term(const KRows& a, const KRows& b, const double* p, const RowMat& pt, Index C) {
    RowArr t = a.c * b.c;
    if (b.identity) {  // only the diagonal of S_a
        for (Index i = 0; i < C; ++i) t += a.kh.row(i * C + i).array();
    } else {
        for (Index q = 0; q < C * C; ++q) t += a.kh.row(q).array() * b.k.row(q).array();
    }
    for (Index i = 0; i < C; ++i)
        t -= p[i] * a.u.row(i).array() * b.u.row(i).array() + pt.row(i).array() * a.v.row(i).array() * b.v.row(i).array();
    return t;
}

// tr(A A') / (w w') for every n' as a sum of non-negative terms (docs/numerics.md section 3):
// sum_i a_i a'_i + sum_{i != j} x_i x_j with a = diag(A)/w (1 - p_r = q), x_i = p_i p'_i, and
// sum_{i != j} x_i x_j = 2 sum_i x_i sum_{j < i} x_j.  at: diag(A')/w' of J, (C, B').
RowArr trace_aa(const double* p, int r, double q, const RowMat& pt, const RowMat& at, Index C) {
    const Index Bp = pt.cols();
    RowArr t = RowArr::Zero(Bp), pre = RowArr::Zero(Bp);
    for (Index i = 0; i < C; ++i) {
        const double ai = p[i] * one_minus_p(p, r, q, i);
        const auto x = p[i] * pt.row(i).array();
        t += ai * at.row(i).array() + 2.0 * x * pre;
        pre += x;
    }
    return t;
}

// diag(A')/w' of every sample of J, transposed: (C, B').
template <class M>
void diag_a_columns(const FeaturesOf<M>& J, RowMat& at) {
    const Index C = J.C, Bp = J.B;
    at.resize(C, Bp);
    for (Index t = 0; t < Bp; ++t) {
        const double* p = J.p.row(t).data();
        for (Index i = 0; i < C; ++i) at(i, t) = p[i] * one_minus_p(p, J.ref(t), J.q(t), i);
    }
}

// One entry S_ij = (K_ij - K_rj) - dc_i (i != r) of the fused pass of shifted_terms: u_i += S_ij p'_j,
// v_j += p_i S_ij, s4 += p_i p'_j S_ij^2 (and dg += p_i p'_i S_ii on the diagonal).
template <bool Diag>
void shifted_update(Index n, const double* WSB_RESTRICT kij, const double* WSB_RESTRICT krj,
                    const double* WSB_RESTRICT dci, const double* WSB_RESTRICT ptj, double pi,
                    double* WSB_RESTRICT ui, double* WSB_RESTRICT vj, double* WSB_RESTRICT s4,
                    double* WSB_RESTRICT dg) {
    WSB_IVDEP
    for (Index t = 0; t < n; ++t) {
        const double sij = (kij[t] - krj[t]) - dci[t], w = pi * ptj[t] * sij;
        ui[t] += sij * ptj[t];
        vj[t] += pi * sij;
        s4[t] += w * sij;
        if constexpr (Diag) dg[t] += w;
    }
}

// For a symmetric K given by its packed rows (i <= j, i-major, from row r0 of packed), the
// two traces the one-hidden-layer-like blocks need, for sample n (probabilities p, reference
// r) and every n' of J (pt = p'^T, references rj):
//   t4 = tr(A K A' K) / (w w') and t2 = tr(A K A') / (w w'),
// both through S = Z_r K Z_{r'}^T (docs/numerics.md section 3): one fused pass over the C (C - 1)
// entries of S outside its zero row r (u = S p', v = S^T p, s4 = sum p_i p'_j S_ij^2,
// dg = sum p_i p'_i S_ii), then O(C) passes.  u, v, dc: (C, B') scratch; pp = p . p'.
void shifted_terms(const RowMat& packed, Index r0, const double* p, int r, const RowMat& pt, const int* rj, Index C,
                   RowMat& u, RowMat& v, RowMat& dc, RowArr& t4, RowArr& t2, RowArr& pp) {
    const Index Bp = pt.cols();
    const double* base = packed.row(r0).data();
    const auto at = [C](Index i, Index j) { return packed_index(i, j, C); };
    shift_columns(base, at, r, rj, C, Bp, dc);
    u.setZero(C, Bp);
    v.setZero(C, Bp);
    t4.setZero(Bp);
    t2.setZero(Bp);
    // in tiles of n' so that the rows of u, v, p' and K_r. in use stay in the L1 cache
    constexpr Index tile = 64;
    for (Index t0 = 0; t0 < Bp; t0 += tile) {
        const Index nt = std::min(tile, Bp - t0);
        for (Index i = 0; i < C; ++i) {
            if (i == r) continue;  // S's row r is zero
            for (Index j = 0; j < C; ++j) {
                const double* kij = base + at(i, j) * Bp + t0;
                const double* krj = base + at(r, j) * Bp + t0;
                if (i == j) {
                    shifted_update<true>(nt, kij, krj, dc.row(i).data() + t0, pt.row(j).data() + t0, p[i],
                                         u.row(i).data() + t0, v.row(j).data() + t0, t4.data() + t0, t2.data() + t0);
                } else {
                    shifted_update<false>(nt, kij, krj, dc.row(i).data() + t0, pt.row(j).data() + t0, p[i],
                                          u.row(i).data() + t0, v.row(j).data() + t0, t4.data() + t0, nullptr);
                }
            }
        }
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
// K_L = I, K_{L-1} from (Omega o s_n) s_n'^T, K_l = T_l T_l'^T (l <= L - 2), every K shifted to
// the reference classes (docs/numerics.md section 3).
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
    diag_a_columns(J, s.at);
    const int* rj = J.ref.data();
    std::vector<KRows> lev(nL);
    lev[static_cast<size_t>(L)].identity = true;
    const Index R = C * (C + 1) / 2, step = rows_per_gemm(R, Bp, model.d(L - 1));
    s.kt.resize(nL);
    RowArr t4, t2, pp;
    const auto packed_at = [C](Index i, Index j) { return packed_index(i, j, C); };
    const auto dense_at = [C](Index i, Index j) { return i * C + j; };
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
        const int r = I.ref(n);
        const RowArr ww = I.w(n, 0) * J.w.col(0).transpose().array();
        const RowArr tii = trace_aa(p, r, I.q(n), s.pt, s.at, C);  // tr(A A') / (w w')
        if (L == 1) {
            const auto a1 = s.alphas[1].row(n).array();
            out[I.pair(1, 1)] += (a1 * a1 * ww * tii).sum();
            continue;
        }
        if (L == 2) {  // one hidden layer: K_1 from its packed triangle and K_2 = I, the fused pass
            shifted_terms(s.k1, nl * R, p, r, s.pt, rj, C, s.u, s.v, s.dc, t4, t2, pp);
            const auto a1 = s.alphas[1].row(n).array(), a2 = s.alphas[2].row(n).array();
            out[I.pair(1, 1)] += (a1 * a1 * ww * t4).sum();
            out[I.pair(1, 2)] += (a1 * a2 * ww * t2).sum();
            out[I.pair(2, 2)] += (a2 * a2 * ww * tii).sum();
            continue;
        }
        for (Index l = 1; l <= L; ++l) {
            KRows& K = lev[static_cast<size_t>(l)];
            if (l == L) {
                K.prepare_identity(p, s.pt, C);
            } else if (l == L - 1) {
                K.shift_prepare(s.k1.row(nl * R).data(), packed_at, r, rj, p, s.pt, C, s.dc);
            } else {
                K.shift_prepare(s.kt[static_cast<size_t>(l)].row(nl * C).data(), dense_at, r, rj, p, s.pt, C, s.dc);
            }
        }
        for (Index l = 1; l <= L; ++l) {
            const auto al = s.alphas[static_cast<size_t>(l)].row(n).array();
            for (Index m = l; m <= L; ++m) {
                const auto am = s.alphas[static_cast<size_t>(m)].row(n).array();
                if (l == L) {
                    out[I.pair(l, m)] += (al * am * ww * tii).sum();
                } else {
                    out[I.pair(l, m)] += (al * am * ww *
                                          identity_term(lev[static_cast<size_t>(l)], lev[static_cast<size_t>(m)], p, s.pt, C))
                                             .sum();
                }
            }
        }
    }
}

// Hessian, the blocks (L-1, L-1) and (L-1, L) through K = K_{L-1} (docs/structured.md), shifted
// to the reference classes (docs/numerics.md section 3); alpha is the Gram of a~_{L-2}.
template <class M>
void k_route_hessian(const Model& model, const FeaturesOf<M>& I, const FeaturesOf<M>& J, const RowMat& alpha,
                     PairScratch& s, double& out_ll, double& out_lm) {
    const Index L = model.n_layers(), C = I.C, B = I.B, Bp = J.B, d = model.d(L - 1), R = C * (C + 1) / 2;
    product(I.at[L], J.at[L].transpose(), s.beta, s);
    product(I.delta[L], J.delta[L].transpose(), s.gram, s);  // gamma
    product(I.u2, J.rho.transpose(), s.inner, s);
    product(I.rho, J.u2.transpose(), s.inner, s, true);
    product(I.rho, J.rho.transpose(), s.inner, s, true);
    const bool scaled = !I.delta_scale.empty();
    if (scaled) {
        unscale(s.gram, I.delta_scale[static_cast<size_t>(L)], J.delta_scale[static_cast<size_t>(L)]);
        unscale(s.inner, I.ru_scale, J.ru_scale);
    }
    KBuffers<M>& kb = s.template kbuf<M>();
    make_omega(model.W[static_cast<size_t>(L - 1)], kb);
    const M& sI = I.sp[L - 1];
    const M& sJ = J.sp[L - 1];
    kb.sa_j = sJ.cwiseProduct(J.at[L].leftCols(d));
    s.pt = J.p.transpose();
    s.dt = J.delta[L].transpose().template cast<double>();
    if (scaled) s.dt = s.dt * J.delta_scale[static_cast<size_t>(L)].asDiagonal();
    const int* rj = J.ref.data();
    const RowArr wJ = J.w.col(0).transpose().array();
    RowArr t4, t2, pp, db(Bp), dbp(Bp), drp(Bp), c1(Bp), c2(Bp);
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
        const int r = I.ref(n);
        const double w = I.w(n, 0);
        shifted_terms(s.k1, base + 1, p, r, s.pt, rj, C, s.u, s.v, s.dc, t4, t2, pp);
        // Cross terms (docs/numerics.md section 2): (A delta') . E / w = sum_i p_i (D_i - Db) E_i with
        // D = delta' - delta'_r 1, Db = sum_{i != r} p_i D_i; and (A' delta) . E' / w' likewise with
        // D' = delta - delta_{r'} 1, Db' = sum_{i != r'} p'_i D'_i.
        const auto dr = s.dt.row(r).array();
        db.setZero();
        for (Index i = 0; i < C; ++i)
            if (i != r) db += p[i] * (s.dt.row(i).array() - dr);
        c1 = -p[r] * db * s.k1.row(base + 1 + R + r).array();
        for (Index i = 0; i < C; ++i)
            if (i != r) c1 += p[i] * ((s.dt.row(i).array() - dr) - db) * s.k1.row(base + 1 + R + i).array();
        const Eigen::RowVectorXd dn = I.delta[L].row(n).template cast<double>() *
                                      (scaled ? I.delta_scale[static_cast<size_t>(L)][n] : 1.0);
        for (Index t = 0; t < Bp; ++t) drp(t) = dn(rj[t]);
        dbp.setZero();
        for (Index i = 0; i < C; ++i) dbp += s.pt.row(i).array() * (dn(i) - drp);  // 0 at i = r'
        c2.setZero();
        for (Index i = 0; i < C; ++i)
            c2 += s.pt.row(i).array() * ((dn(i) - drp) - dbp) * s.k2.row(nl * C + i).array();
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

void to_single(BlockFeatures& F, BlockFeaturesF& out) {
    auto cast_all = [](std::vector<RowMat>& from, std::vector<RowMatF>& to) {
        to.resize(from.size());
        for (size_t i = 0; i < from.size(); ++i) {
            to[i] = from[i].cast<float>();
            from[i] = RowMat();
        }
    };
    // rows divided by a power of two (exact) so that their largest entry is in [1/2, 1): no underflow
    auto scale_of = [](const RowMat& a, const RowMat* b, Index n) {
        double mx = a.cols() > 0 ? a.row(n).cwiseAbs().maxCoeff() : 0.0;
        if (b != nullptr && b->cols() > 0) mx = std::max(mx, b->row(n).cwiseAbs().maxCoeff());
        if (!(mx > 0.0) || !std::isfinite(mx)) return 0;  // zeros, NaN, inf: as they are
        int e = 0;
        std::frexp(mx, &e);
        return e;
    };
    auto cast_scaled = [&](std::vector<RowMat>& from, std::vector<RowMatF>& to, std::vector<Eigen::VectorXd>& sc) {
        to.resize(from.size());
        sc.resize(from.size());
        for (size_t i = 0; i < from.size(); ++i) {
            RowMat& a = from[i];
            sc[i].setOnes(a.rows());
            for (Index n = 0; n < a.rows() && a.cols() > 0; ++n) {
                const int e = scale_of(a, nullptr, n);
                a.row(n) *= std::ldexp(1.0, -e);
                sc[i][n] = std::ldexp(1.0, e);
            }
            to[i] = a.cast<float>();
            a = RowMat();
        }
    };
    out.B = F.B;
    out.L = F.L;
    out.C = F.C;
    cast_all(F.at, out.at);
    cast_scaled(F.delta, out.delta, out.delta_scale);
    cast_all(F.sp, out.sp);
    cast_scaled(F.G, out.G, out.G_scale);
    cast_all(F.Q, out.Q);
    cast_all(F.Tt, out.Tt);
    out.p = F.p;
    out.w = F.w;
    out.ref = F.ref;
    out.q = F.q;
    out.ru_scale.setOnes(F.rho.rows());
    for (Index n = 0; n < F.rho.rows(); ++n) {  // rho and u2 share a factor: their products are summed
        const int e = scale_of(F.rho, &F.u2, n);
        F.rho.row(n) *= std::ldexp(1.0, -e);
        F.u2.row(n) *= std::ldexp(1.0, -e);
        out.ru_scale[n] = std::ldexp(1.0, e);
    }
    out.rho = F.rho.cast<float>();
    out.u2 = F.u2.cast<float>();
    F.rho = RowMat();
    F.u2 = RowMat();
    out.trace = F.trace;
    out.trace_abs = F.trace_abs;
    out.norms = F.norms;
}

}  // namespace wsb
