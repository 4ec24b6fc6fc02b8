#include "features.hpp"

#include "activations.hpp"
#include "losses.hpp"
#include "softmax.hpp"

#include <algorithm>
#include <cmath>
#include <utility>

namespace wsb {
namespace {

// Tt[l] = Tt[l+1] W_{l+1}, each sample's C rows scaled by sigma'(z_l) column-wise (T_l = T_{l+1} W_{l+1} D_l).
void propagate_t(const Model& model, BlockFeatures& F, Index l) {
    const Index C = F.C;
    F.Tt[l].noalias() = F.Tt[l + 1] * model.W[static_cast<size_t>(l)];
    for (Index n = 0; n < F.B; ++n) F.Tt[l].middleRows(n * C, C).array().rowwise() *= F.sp[l].row(n).array();
}

// u2 = squared row norms of V = D W^T S (A = S S^T):  u2_k = s_k^2 W_k^T A W_k (W_k column k of W),
// the quadratic form in the shifted non-negative form (docs/numerics.md section 2), or for the
// diagonal losses s_k^2 sum_i h_i W_ik^2 (docs/numerics.md section 5).
void squared_v_rows(const RowMat& W, BlockFeatures& F, Index l) {
    F.u2.resize(F.B, W.cols());
    RowArray xb, xh, out;
    if (F.h.size() > 0) {
        for (Index n = 0; n < F.B; ++n) {
            diagonal_quadratic_rows(W, F.h.row(n).data(), out);
            F.u2.row(n) = (out * F.sp[l].row(n).array().square()).matrix();
        }
        return;
    }
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
// extra (B, (L+1)^2; diagonal losses, Hessian; else null) is added to each nu_n^{lm}: the rounding
// addition dnu^{lm} / u of docs/numerics.md section 5.
// ea (B, L+1): ea(n, l) >= |error of a~_{l-1}|_2 (activation_errors); each nu also gets
// fold * dnu (Fold::pair), dnu = nu with |a~| + ea in place of |a~|, less nu (docs/numerics.md section 4).
void magnitudes(BlockFeatures& F, const RowMat& dabs, const RowMat& gnorm, bool hessian, const RowMat* extra,
                const RowMat& ea, double fold) {
    const Index L = F.L;
    for (Index n = 0; n < F.B; ++n)
        for (Index l = 1; l <= L; ++l) {
            const double al = F.at[l].row(n).stableNorm();
            const double el = ea(n, l);
            for (Index m = l; m <= L; ++m) {
                const double am = F.at[m].row(n).stableNorm();
                const double em = ea(n, m);
                double nu, dnu;
                if (!hessian) {
                    const double s = std::sqrt(dabs(n, l)) * std::sqrt(dabs(n, m));
                    nu = (al * std::sqrt(dabs(n, l))) * (am * std::sqrt(dabs(n, m)));
                    dnu = el * (s * am) + (al + el) * (s * em);
                } else {
                    double cross = 0.0;
                    if (m == l + 1) {
                        cross = F.delta[m].row(n).stableNorm() * F.sp[l].row(n).stableNorm();
                    } else if (m > l + 1) {
                        cross = F.delta[m].row(n).stableNorm() * F.Q[F.pair(l, m)].row(n).stableNorm();
                    }
                    const double g = gnorm(n, F.pair(l, m));
                    nu = al * (g * am + cross);
                    dnu = el * (g * am + cross) + (al + el) * (g * em);
                }
                if (extra != nullptr) nu += (*extra)(n, F.pair(l, m));
                nu += fold * dnu;
                F.norms[static_cast<size_t>(F.pair(l, m))] += nu;
            }
        }
}

// ea(n, l) >= |error of a~_{l-1}|_2 per sample (docs/numerics.md section 4; 0 for l = 1: x is exact),
// by a recursion with the rows' norms r_i = |W_l[i, :]|_2 (no |W| copy): z_l[i] is in error by at most
// E = gam(d_{l-1} + 2) (r_i |a_{l-1}| + |b_i|) + r_i ea(n, l), and a_l[i] = sigma(z_l[i]) by
// |sigma'_l[i]| E + 8 u |a_l[i]|.  Relative to |a~_{l-1}| it is unbounded where z_{l-1} cancels (a
// hidden unit near its zero), which the relative error chain of section 4 cannot cover.
void activation_errors(const Model& model, const BlockFeatures& F, RowMat& ea) {
    constexpr double u = 0x1p-53;
    const Index L = F.L, B = F.B;
    ea.setZero(B, L + 1);
    for (Index l = 1; l < L; ++l) {
        const auto li = static_cast<size_t>(l - 1);
        const RowMat& W = model.W[li];
        const Index d_in = W.cols(), d_out = W.rows();
        const double g = static_cast<double>(d_in + 2) * u / (1.0 - static_cast<double>(d_in + 2) * u);
        const Vec r = W.rowwise().norm();
        Vec err(d_out);
        for (Index n = 0; n < B; ++n) {
            const double na = F.at[l].row(n).head(d_in).stableNorm(), e_in = ea(n, l);
            for (Index i = 0; i < d_out; ++i) {
                const double bi = model.has_bias[li] ? std::abs(model.b[li](i)) : 0.0;
                const double E = g * (r(i) * na + bi) + r(i) * e_in;
                err(i) = std::abs(F.sp[l](n, i)) * E + 8.0 * u * std::abs(F.at[l + 1](n, i));
            }
            ea(n, l + 1) = err.stableNorm();  // without underflow, as every other norm of the magnitudes
        }
    }
}

// The forward error bound E_L of z_L (docs/numerics.md section 5): E_1 = gam(d_0 + 2) m_1,
// E_l = gam(d_{l-1} + 2) m_l + (|sigma'_{l-1}| o E_{l-1} + 8 u |a_{l-1}|) |W_l|^T, m_l = |a~_{l-1}| |W~_l|^T.
void output_forward_error(const Model& model, const BlockFeatures& F, RowMat& E) {
    constexpr double u = 0x1p-53;
    const auto gam = [](double k) { return k * u / (1.0 - k * u); };
    RowMat m, err;
    for (Index l = 1; l <= F.L; ++l) {
        const auto li = static_cast<size_t>(l - 1);
        const RowMat absW = model.W[li].cwiseAbs();
        const Index d_in = absW.cols();
        m.noalias() = F.at[l].leftCols(d_in).cwiseAbs() * absW.transpose();
        if (model.has_bias[li]) m.rowwise() += model.b[li].cwiseAbs().transpose();
        if (l == 1) {
            E = gam(static_cast<double>(d_in + 2)) * m;
        } else {
            err = F.sp[l - 1].cwiseAbs().cwiseProduct(E) + (8.0 * u) * F.at[l].leftCols(d_in).cwiseAbs();
            E = gam(static_cast<double>(d_in + 2)) * m;
            E.noalias() += err * absW.transpose();
        }
    }
}

// The factors of the activation errors' addition (docs/numerics.md section 4): pair * dnu joins nu,
// trace * (2 |a~| ea + ea^2) |M| joins trace_abs.  Each is 1 over a lower bound of its gamma in the
// error model: gamma_pair >= max(u K0, 3 gamma_{d_max + 1} in the pair phase's precision) and
// gamma_trace >= u K0, with K0 = sum_l 3 (d_{l-1} + d_l + 1) the forward chain's share of k_chain and
// d_max the widest layer input (the features are float64 here, f32 or not).
struct Fold {
    double pair, trace;
};

Fold activation_fold(const Model& model, bool f32) {
    constexpr double u = 0x1p-53;
    double k0 = 0.0, d_max = 0.0;
    for (const auto& W : model.W) {
        k0 += 3.0 * static_cast<double>(W.cols() + W.rows() + 1);
        d_max = std::max(d_max, static_cast<double>(W.cols()));
    }
    const double u_pair = f32 ? 0x1p-24 : u;
    return {1.0 / std::max(u * k0, 3.0 * u_pair * (d_max + 1.0)), 1.0 / (u * k0)};
}

// Parameter subset (Options::parts: 0 all, 1 the weights, 2 the bias, 3 none): |a~_{l-1}|^2 over
// the columns in the set, for the trace shares.
template <class Row>
double selected_squared_norm(const Model& model, const std::vector<int>& parts, const Row& at, Index l) {
    const auto li = static_cast<size_t>(l - 1);
    const Index d_in = model.W[li].cols();
    const bool bias = model.has_bias[li];
    switch (parts[li]) {
        case 1: return at.head(d_in).squaredNorm();
        case 2: return bias ? at(d_in) * at(d_in) : 0.0;
        case 3: return 0.0;
        default: return at.squaredNorm();
    }
}

// Parameter subset, once the features and their magnitudes are done: zero the columns of a~_{l-1}
// outside the set (the bias column for code 1, the weight columns for 2, all for 3) and, for the
// Hessian, delta_l of a layer whose weights are out of it (its delta . Q terms are none of the
// submatrix's).
void select_parts(const Model& model, const std::vector<int>& parts, bool hessian, BlockFeatures& F) {
    for (Index l = 1; l <= F.L; ++l) {
        const auto li = static_cast<size_t>(l - 1);
        const int part = parts[li];
        const Index d_in = model.W[li].cols();
        RowMat& at = F.at[l];
        if (part == 2 || part == 3) at.leftCols(d_in).setZero();
        if ((part == 1 || part == 3) && model.has_bias[li]) at.col(d_in).setZero();
        if (hessian && part >= 2) F.delta[l].setZero();
    }
}

// The rounding addition of docs/numerics.md section 5 (diagonal losses, Hessian): delta_L carries an
// absolute error that is not relative to |delta| (z_L is inexact by ~u |W| |a|, and z - y cancels
// near a fit).  Per sample: the forward error bound E_l of z_l, e_L = |error of delta_L|_2, the
// backward scalar recursion for the errors e_l of delta_l and dM_l of M_l (Frobenius), and
//   dnu(n, pair(l, m)) = |a~_{l-1}| (tau_{m,l} dM_m |a~_{m-1}| + [l < m] e_m qn_{l,m}) / u
//   dtr(n, l)          = sqrt(d_l) dM_l / u      (trace_abs[l] adds |a~_{l-1}|^2 dtr)
// z: z_L of the block (B, C); Yb the targets; spp: sigma''(z_l); E: E_L (output_forward_error).
void rounding_addition(const Model& model, const BlockFeatures& F, const std::vector<RowMat>& spp, const RowMat& z,
                       const RowMat& Yb, Loss loss, const RowMat& E, RowMat& dnu, RowMat& dtr) {
    constexpr double u = 0x1p-53;
    const Index L = F.L, B = F.B, C = F.C;
    const auto nL = static_cast<size_t>(L + 1);
    // 1. E = E_L, the forward error bound of z_L (output_forward_error).
    std::vector<double> wn(nL, 0.0);  // wn[l] = |W_l|_F (no bias)
    for (Index l = 1; l <= L; ++l) wn[static_cast<size_t>(l)] = model.W[static_cast<size_t>(l - 1)].norm();
    dnu.setZero(B, (L + 1) * (L + 1));
    dtr.setZero(B, L + 1);
    std::vector<double> e(nL), dM(nL), s1(nL), s2(nL), an(nL);
    RowMat tau(L + 1, L + 1);  // tau(m, l) >= |T_{m,l}|_2, m >= l
    for (Index n = 0; n < B; ++n) {
        const auto Ls = static_cast<size_t>(L);
        // 2. e_L from the forward error of z_L.
        e[Ls] = delta_error(loss, z.row(n).data(), Yb.row(n).data(), F.h.row(n).data(), E.row(n).data(), C);
        // 3. Backward: dM_L = 0; dg = wn_{l+1} e_{l+1}, e_l = s1_l dg, dM_l = (s1_l wn_{l+1})^2 dM_{l+1} + s2_l dg.
        dM[Ls] = 0.0;
        for (Index l = L - 1; l >= 1; --l) {
            const auto lz = static_cast<size_t>(l);
            s1[lz] = F.sp[l].row(n).cwiseAbs().maxCoeff();
            s2[lz] = spp[lz].row(n).cwiseAbs().maxCoeff();
            const double dg = wn[lz + 1] * e[lz + 1];
            e[lz] = s1[lz] * dg;
            const double g = s1[lz] * wn[lz + 1];
            dM[lz] = g * g * dM[lz + 1] + s2[lz] * dg;
        }
        for (Index l = 1; l <= L; ++l) {
            an[static_cast<size_t>(l)] = F.at[l].row(n).stableNorm();
            tau(l, l) = 1.0;
            for (Index mm = l + 1; mm <= L; ++mm)
                tau(mm, l) = wn[static_cast<size_t>(mm)] * s1[static_cast<size_t>(mm - 1)] * tau(mm - 1, l);
        }
        // 4. dnu and the trace's share.
        for (Index l = 1; l <= L; ++l) {
            const auto lz = static_cast<size_t>(l);
            const double d_l = static_cast<double>(model.d(l));
            dtr(n, l) = std::sqrt(d_l) * dM[lz] / u;
            for (Index mm = l; mm <= L; ++mm) {
                const auto mz = static_cast<size_t>(mm);
                double cross = 0.0;
                if (mm == l + 1) {
                    cross = e[mz] * F.sp[l].row(n).stableNorm();  // qn_{l,l+1} = |sigma'_l|_2
                } else if (mm > l + 1) {
                    cross = e[mz] * (std::sqrt(d_l) * s1[mz - 1] * tau(mm - 1, l));  // qn_{l,m} >= |Q_lm|_F
                }
                dnu(n, F.pair(l, mm)) = an[lz] * (tau(mm, l) * dM[mz] * an[mz] + cross) / u;
            }
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
    // A_rr = w p_r q; w = sum(y) (= 1 for hard labels).  The diagonal losses (mse, bce): delta_L and
    // M_L = A = diag(h) from losses.hpp (docs/numerics.md section 5), no p, w, r or q.
    const Index C = z.cols();
    const bool kroute_ggn = opt.structured && !hessian;
    const bool kroute_hessian = opt.structured && hessian && L >= 2;
    const bool diagonal = diagonal_loss(opt.loss);
    F.C = C;
    // Parameter subset (docs/design.md, "Parameter subsets"): the traces (selected_sq) and, once
    // the features are done, the pair sums see only the columns of a~_{l-1} in the set; the
    // magnitudes stay the whole model's, which bound the submatrix's blocks too and which the
    // product (run over the whole model) needs.
    const auto selected_sq = [&](Index l, Index n) {
        return opt.parts.empty() ? F.at[l].row(n).squaredNorm()
                                 : selected_squared_norm(model, opt.parts, F.at[l].row(n), l);
    };
    F.delta[L].resize(B, C);
    std::vector<double> tau_a(static_cast<size_t>(B));  // tr(A) per sample
    if (!kroute_ggn) M[L].resize(B, C * C);
    if (diagonal) {  // mse, bce (docs/numerics.md section 5): delta_L and A = diag(h)
        F.h.resize(B, C);
        F.p.resize(0, 0);
        F.w.resize(0, 1);
        F.ref.resize(0);
        F.q.resize(0);
        for (Index n = 0; n < B; ++n) {
            diagonal_output(opt.loss, z.row(n).data(), Yb.row(n).data(), C, F.delta[L].row(n).data(), F.h.row(n).data());
            tau_a[static_cast<size_t>(n)] = F.h.row(n).sum();
            if (kroute_ggn) continue;
            MapMat A(M[L].row(n).data(), C, C);
            A.setZero();
            A.diagonal() = F.h.row(n).transpose();
        }
    } else {
        F.h.resize(0, 0);
        F.p.resize(B, C);
        F.w.resize(B, 1);
        F.ref.resize(B);
        F.q.resize(B);
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
            if (kroute_ggn) continue;
            MapMat A(M[L].row(n).data(), C, C);
            const auto pr = F.p.row(n);
            A.noalias() = -w * pr.transpose() * pr;
            for (Index i = 0; i < C; ++i) A(i, i) = w * p[i] * one_minus_p(p, r, q, i);
        }
    }
    F.trace.assign(nL, 0.0);
    F.trace_abs.assign(nL, 0.0);
    F.norms.assign(nL * nL, 0.0);
    // The activations' errors (docs/numerics.md section 4), and for the diagonal losses' Hessian the
    // forward error of z_L too (section 5).
    const bool addition = diagonal && hessian;
    RowMat ea;
    activation_errors(model, F, ea);
    const Fold fold = activation_fold(model, opt.f32);
    if (kroute_ggn) {
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
                    if (diagonal) {
                        diagonal_quadratic_rows(F.Tt[l].middleRows(n * C, C), F.h.row(n).data(), qf);
                        tau(n, l) = qf.sum();
                        continue;
                    }
                    quadratic_rows(F.Tt[l].middleRows(n * C, C), F.p.row(n).data(), F.ref(n), xb, xh, qf);
                    tau(n, l) = F.w(n, 0) * qf.sum();
                }
            }
            F.Tt[L - 1] = RowMat();  // K_{L-1} comes from sigma'_{L-1} and W_L (Omega) instead
        }
        for (Index n = 0; n < B; ++n) {
            for (Index l = 1; l <= L; ++l) {
                const double a2 = F.at[l].row(n).squaredNorm();
                const double el = ea(n, l);
                F.trace[static_cast<size_t>(l)] += selected_sq(l, n) * tau(n, l);
                F.trace_abs[static_cast<size_t>(l)] += a2 * tau(n, l) + fold.trace * ((2.0 * std::sqrt(a2) + el) * el) * tau(n, l);
                const double gl = std::sqrt(a2) * std::sqrt(tau(n, l));
                for (Index m = l; m <= L; ++m) {
                    const double am = F.at[m].row(n).stableNorm(), s = std::sqrt(tau(n, l)) * std::sqrt(tau(n, m));
                    const double dnu = el * (s * am) + (std::sqrt(a2) + el) * (s * ea(n, m));
                    F.norms[static_cast<size_t>(F.pair(l, m))] += gl * (am * std::sqrt(tau(n, m))) + fold.pair * dnu;
                }
            }
        }
        F.u2 = RowMat();  // only the trace shares and the magnitudes use it
        if (!opt.parts.empty()) select_parts(model, opt.parts, false, F);
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
        if (kroute_hessian && l == L - 1) {  // M_{L-1} = V V^T + diag(rho), V = D W^T S
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
    // Diagonal losses, Hessian: the rounding addition (docs/numerics.md section 5) joins trace_abs
    // and, below, the norms.
    RowMat dnu, dtr;
    if (addition) {
        RowMat E;
        output_forward_error(model, F, E);
        rounding_addition(model, F, spp, z, Yb, opt.loss, E, dnu, dtr);
    }
    RowMat dabs = RowMat::Zero(B, L + 1);
    for (Index l = 1; l <= L; ++l) {
        const Index d = model.d(l);
        double t = 0.0, ta = 0.0;
        for (Index n = 0; n < B; ++n) {
            const double a2 = F.at[l].row(n).squaredNorm();
            double tn;
            if (kroute_hessian && l == L - 1) {  // M_{L-1} = V V^T + diag(rho): tr = |V|_F^2 + sum(rho)
                tn = F.u2.row(n).sum() + F.rho.row(n).sum();
                dabs(n, l) = (F.u2.row(n) + F.rho.row(n)).cwiseAbs().sum();
            } else {
                const auto diag = CMapMat(M[l].row(n).data(), d, d).diagonal();
                tn = diag.sum();
                dabs(n, l) = diag.cwiseAbs().sum();
            }
            t += selected_sq(l, n) * tn;
            ta += a2 * (addition ? dabs(n, l) + dtr(n, l) : dabs(n, l));
            const double el = ea(n, l);
            ta += fold.trace * ((2.0 * std::sqrt(a2) + el) * el) * dabs(n, l);
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
            if (kroute_hessian && L == 2) continue;
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
                for (Index n = 0; n < B; ++n) gnorm(n, F.pair(l, m)) = G.row(n).stableNorm();
            }
        if (kroute_hessian)
            for (Index n = 0; n < B; ++n) {
                const double su = F.u2.row(n).sum();
                gnorm(n, F.pair(L - 1, L - 1)) = su + F.rho.row(n).stableNorm();
                gnorm(n, F.pair(L - 1, L)) = std::sqrt(su) * std::sqrt(tau_a[static_cast<size_t>(n)]);
            }
    }
    if (kroute_hessian) {  // the (L-1, L-1) and (L-1, L) blocks are contracted through K_{L-1} instead
        F.G[F.pair(L - 1, L - 1)] = RowMat();
        F.G[F.pair(L - 1, L)] = RowMat();
    }
    if (hessian) dense_q(model, F);
    magnitudes(F, dabs, gnorm, hessian, addition ? &dnu : nullptr, ea, fold.pair);
    if (!opt.parts.empty()) select_parts(model, opt.parts, hessian, F);
}

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
    out.h = F.h;
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
