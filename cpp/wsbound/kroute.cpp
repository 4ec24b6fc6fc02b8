#include "kroute.hpp"

#include "precision.hpp"
#include "softmax.hpp"

#include <algorithm>
#include <utility>
#include <vector>

namespace wsb {
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
// per thread, more than a block's features; the plan counts both: cpp_worker_doubles in
// python/wsbound_fast/_planning/cost.py).
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

// The GGN K route's operands that do not depend on the row of I (docs/structured.md): the Grams
// alpha_l of the layer inputs, Omega, and J's T_l stacked class-major (row j B' + n').
template <class M>
void ggn_setup(const Model& model, const FeaturesOf<M>& I, const FeaturesOf<M>& J, PairScratch& s) {
    const Index L = model.n_layers(), C = I.C, Bp = J.B;
    const auto nL = static_cast<size_t>(L + 1);
    s.alphas.resize(nL);
    for (Index l = 1; l <= L; ++l) product(I.at[l], J.at[l].transpose(), s.alphas[static_cast<size_t>(l)], s);
    KBuffers<M>& kb = s.template kbuf<M>();
    if (L >= 2) make_omega(model.W[static_cast<size_t>(L - 1)], kb);
    kb.tj.resize(nL);
    for (Index l = 1; l + 2 <= L; ++l) {
        M& tj = kb.tj[static_cast<size_t>(l)];
        tj.resize(C * Bp, model.d(l));
        for (Index j = 0; j < C; ++j)
            for (Index k = 0; k < Bp; ++k) tj.row(j * Bp + k) = J.Tt[l].row(k * C + j);
    }
    s.kt.resize(nL);
}

// The GGN K route's GEMMs for the rows [n, n + rows) of I: K_{L-1} packed into s.k1 (R rows per
// sample, over n'), K_l for l <= L - 2 into s.kt[l] (row r C + i, column j B' + n').
template <class M>
void ggn_gemms(const Model& model, const FeaturesOf<M>& I, const FeaturesOf<M>& J, Index n, Index rows, Index R,
               PairScratch& s) {
    const Index L = model.n_layers(), C = I.C;
    KBuffers<M>& kb = s.template kbuf<M>();
    if (L >= 2) {
        kb.left.resize(rows * R, model.d(L - 1));
        for (Index r = 0; r < rows; ++r)
            kb.left.middleRows(r * R, R) = kb.omega.array().rowwise() * I.sp[L - 1].row(n + r).array();
        product(kb.left, J.sp[L - 1].transpose(), s.k1, s);
    }
    for (Index l = 1; l + 2 <= L; ++l)
        product(I.Tt[l].middleRows(n * C, rows * C), kb.tj[static_cast<size_t>(l)].transpose(),
                s.kt[static_cast<size_t>(l)], s);
}

// The Hessian K route's GEMMs for the rows [n, n + rows) of I (docs/structured.md): per row r of I,
// s_r (-> s.s'), Omega o s_r (-> K packed), W o s_r o a_r (-> E), each against s' (into s.k1, H rows
// per sample); then W o s_r against s' o a' (-> E', into s.k2, C rows per sample).
template <class M>
void hessian_gemms(const FeaturesOf<M>& I, const FeaturesOf<M>& J, Index L, Index n, Index rows, Index H, Index R,
                   Index d, PairScratch& s) {
    const Index C = I.C;
    KBuffers<M>& kb = s.template kbuf<M>();
    const M& sI = I.sp[L - 1];
    kb.left.resize(rows * H, d);
    kb.left2.resize(rows * C, d);
    for (Index r = 0; r < rows; ++r) {
        const auto sr = sI.row(n + r).array();
        kb.left.row(r * H) = sI.row(n + r);
        kb.left.middleRows(r * H + 1, R) = kb.omega.array().rowwise() * sr;
        kb.left.middleRows(r * H + 1 + R, C) = kb.wl.array().rowwise() * (sr * I.at[L].row(n + r).head(d).array());
        kb.left2.middleRows(r * C, C) = kb.wl.array().rowwise() * sr;
    }
    product(kb.left, J.sp[L - 1].transpose(), s.k1, s);
    product(kb.left2, kb.sa_j.transpose(), s.k2, s);
}

// The diagonal losses' traces of a symmetric K given by its packed rows (i <= j, i-major, from row
// r0 of packed), for sample n (h) and every n' of J (ht = h'^T, (C, B')), docs/numerics.md section 5:
//   t4 = tr(A K A' K) = sum_ij h_i h'_j K_ij^2   (non-negative terms)
//   t2 = tr(A K A')   = sum_i h_i h'_i K_ii
void diagonal_packed_terms(const RowMat& packed, Index r0, const double* h, const RowMat& ht, Index C, RowArr& t4,
                           RowArr& t2) {
    const Index Bp = ht.cols();
    const double* base = packed.row(r0).data();
    t4.setZero(Bp);
    t2.setZero(Bp);
    for (Index i = 0; i < C; ++i) {
        const Eigen::Map<const RowArr> kii(base + packed_index(i, i, C) * Bp, Bp);
        const auto x = h[i] * ht.row(i).array();
        t2 += x * kii;
        t4 += x * kii.square();
        for (Index j = i + 1; j < C; ++j) {
            const Eigen::Map<const RowArr> kij(base + packed_index(i, j, C) * Bp, Bp);
            t4 += (h[i] * ht.row(j).array() + h[j] * ht.row(i).array()) * kij.square();
        }
    }
}

}  // namespace

template <class M>
void pair_sum_ggn(const Model& model, const FeaturesOf<M>& I, const FeaturesOf<M>& J, PairScratch& s, double* out) {
    const Index L = model.n_layers(), C = I.C, B = I.B;
    const auto nL = static_cast<size_t>(L + 1);
    ggn_setup(model, I, J, s);
    s.pt = J.p.transpose();
    diag_a_columns(J, s.at);
    const int* rj = J.ref.data();
    std::vector<KRows> lev(nL);
    lev[static_cast<size_t>(L)].identity = true;
    const Index R = C * (C + 1) / 2, step = rows_per_gemm(R, J.B, model.d(L - 1));
    RowArr t4, t2, pp;
    const auto packed_at = [C](Index i, Index j) { return packed_index(i, j, C); };
    const auto dense_at = [C](Index i, Index j) { return i * C + j; };
    for (Index n = 0; n < B; ++n) {
        const Index nl = n % step, rows = std::min(step, B - (n - nl));
        if (nl == 0) ggn_gemms(model, I, J, n, rows, R, s);  // the GEMMs for rows [n, n + rows) of I
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

// The Hessian K route's operands that do not depend on the row of I: beta (s.beta), gamma (s.gram),
// u.rho' + rho.u' + rho.rho' (s.inner), Omega and W_L, s' o a' of J (kb.sa_j), delta'^T of J (s.dt),
// all unscaled.  Returns whether the features are row-scaled float32 ones.
template <class M>
bool hessian_setup(const Model& model, const FeaturesOf<M>& I, const FeaturesOf<M>& J, PairScratch& s) {
    const Index L = model.n_layers(), d = model.d(L - 1);
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
    kb.sa_j = J.sp[L - 1].cwiseProduct(J.at[L].leftCols(d));
    s.dt = J.delta[L].transpose().template cast<double>();
    if (scaled) s.dt = s.dt * J.delta_scale[static_cast<size_t>(L)].asDiagonal();
    return scaled;
}

template <class M>
void k_route_hessian(const Model& model, const FeaturesOf<M>& I, const FeaturesOf<M>& J, const RowMat& alpha,
                     PairScratch& s, double& out_ll, double& out_lm) {
    const Index L = model.n_layers(), C = I.C, B = I.B, Bp = J.B, d = model.d(L - 1), R = C * (C + 1) / 2;
    const bool scaled = hessian_setup(model, I, J, s);
    s.pt = J.p.transpose();
    const int* rj = J.ref.data();
    const RowArr wJ = J.w.col(0).transpose().array();
    RowArr t4, t2, pp, db(Bp), dbp(Bp), drp(Bp), c1(Bp), c2(Bp);
    const Index H = 1 + R + C, step = rows_per_gemm(H, J.B, d);
    double ll = 0.0, lm = 0.0;
    for (Index n = 0; n < B; ++n) {
        const Index nl = n % step;
        if (nl == 0) hessian_gemms(I, J, L, n, std::min(step, B - n), H, R, d, s);
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

// The diagonal losses (docs/numerics.md section 5): A = diag(h), so
//   tr(A K_l A' K_m^T) = sum_ij h_i h'_j (K_l)_ij (K_m)_ij,   K_L = I,
// with no reference-class shift, no label weight and no rank-one terms.  Per level l < L the
// products kh_l = h_i (K_l)_ij h'_j are formed once (s.kh[l], row i C + j over n'); then each
// (l, m) is one pass over C^2 entries (C for m = L, and h . h' for l = m = L).
template <class M>
void pair_sum_ggn_diagonal(const Model& model, const FeaturesOf<M>& I, const FeaturesOf<M>& J, PairScratch& s,
                           double* out) {
    const Index L = model.n_layers(), C = I.C, B = I.B, Bp = J.B;
    const auto nL = static_cast<size_t>(L + 1);
    ggn_setup(model, I, J, s);
    s.pt = J.h.transpose();  // h'^T, (C, B')
    const Index R = C * (C + 1) / 2, step = rows_per_gemm(R, Bp, model.d(L - 1));
    s.kh.resize(nL);
    std::vector<const double*> kbase(nL);  // level l's K: row kbase[l] + at(l, i, j) * B'
    const auto at = [L, C](Index l, Index i, Index j) { return l == L - 1 ? packed_index(i, j, C) : i * C + j; };
    RowArr t4, t2, tll;
    for (Index n = 0; n < B; ++n) {
        const Index nl = n % step, rows = std::min(step, B - (n - nl));
        if (nl == 0) ggn_gemms(model, I, J, n, rows, R, s);
        const double* h = I.h.row(n).data();
        tll = (s.pt.array().colwise() * Eigen::Map<const Eigen::ArrayXd>(h, C)).colwise().sum();  // tr(A A')
        if (L == 1) {
            const auto a1 = s.alphas[1].row(n).array();
            out[I.pair(1, 1)] += (a1 * a1 * tll).sum();
            continue;
        }
        if (L == 2) {  // one hidden layer: K_1 from its packed triangle, K_2 = I
            diagonal_packed_terms(s.k1, nl * R, h, s.pt, C, t4, t2);
            const auto a1 = s.alphas[1].row(n).array(), a2 = s.alphas[2].row(n).array();
            out[I.pair(1, 1)] += (a1 * a1 * t4).sum();
            out[I.pair(1, 2)] += (a1 * a2 * t2).sum();
            out[I.pair(2, 2)] += (a2 * a2 * tll).sum();
            continue;
        }
        for (Index l = 1; l < L; ++l) {
            const auto lz = static_cast<size_t>(l);
            kbase[lz] = l == L - 1 ? s.k1.row(nl * R).data() : s.kt[lz].row(nl * C).data();
            RowMat& kh = s.kh[lz];
            kh.resize(C * C, Bp);
            for (Index i = 0; i < C; ++i)
                for (Index j = 0; j < C; ++j)
                    kh.row(i * C + j) =
                        h[i] * Eigen::Map<const RowArr>(kbase[lz] + at(l, i, j) * Bp, Bp) * s.pt.row(j).array();
        }
        for (Index l = 1; l <= L; ++l) {
            const auto lz = static_cast<size_t>(l);
            const auto al = s.alphas[lz].row(n).array();
            for (Index m = l; m <= L; ++m) {
                const auto am = s.alphas[static_cast<size_t>(m)].row(n).array();
                if (l == L) {
                    out[I.pair(l, m)] += (al * am * tll).sum();
                    continue;
                }
                t2.setZero(Bp);
                if (m == L) {  // K_L = I: the diagonal of kh_l
                    for (Index i = 0; i < C; ++i) t2 += s.kh[lz].row(i * C + i).array();
                } else {
                    const double* km = kbase[static_cast<size_t>(m)];
                    for (Index i = 0; i < C; ++i)
                        for (Index j = 0; j < C; ++j)
                            t2 += s.kh[lz].row(i * C + j).array() * Eigen::Map<const RowArr>(km + at(m, i, j) * Bp, Bp);
                }
                out[I.pair(l, m)] += (al * am * t2).sum();
            }
        }
    }
}

// The diagonal losses' (L-1, L-1) and (L-1, L) blocks (docs/numerics.md section 5), K = K_{L-1}:
//   <M, M'> = sum_ij h_i h'_j K_ij^2 + u.rho' + rho.u' + rho.rho',   <G, G'> = sum_i h_i h'_i K_ii,
// and the cross terms (A delta') . E = sum_i h_i delta'_i E_i, (A' delta) . E' = sum_i h'_i delta_i E'_i
// (E_i = sum_k W_ik a_k s_k s'_k, E'_i = sum_k W_ik a'_k s_k s'_k; docs/structured.md).
template <class M>
void k_route_hessian_diagonal(const Model& model, const FeaturesOf<M>& I, const FeaturesOf<M>& J, const RowMat& alpha,
                              PairScratch& s, double& out_ll, double& out_lm) {
    const Index L = model.n_layers(), C = I.C, B = I.B, Bp = J.B, d = model.d(L - 1), R = C * (C + 1) / 2;
    const bool scaled = hessian_setup(model, I, J, s);
    s.pt = J.h.transpose();  // h'^T, (C, B')
    RowArr t4, t2, c1(Bp), c2(Bp);
    const Index H = 1 + R + C, step = rows_per_gemm(H, Bp, d);
    double ll = 0.0, lm = 0.0;
    for (Index n = 0; n < B; ++n) {
        const Index nl = n % step;
        if (nl == 0) hessian_gemms(I, J, L, n, std::min(step, B - n), H, R, d, s);
        const Index base = nl * H;
        const double* h = I.h.row(n).data();
        diagonal_packed_terms(s.k1, base + 1, h, s.pt, C, t4, t2);
        const Eigen::RowVectorXd dn = I.delta[L].row(n).template cast<double>() *
                                      (scaled ? I.delta_scale[static_cast<size_t>(L)][n] : 1.0);
        c1.setZero();
        c2.setZero();
        for (Index i = 0; i < C; ++i) {
            c1 += h[i] * s.dt.row(i).array() * s.k1.row(base + 1 + R + i).array();
            c2 += dn(i) * s.pt.row(i).array() * s.k2.row(nl * C + i).array();
        }
        const auto a = alpha.row(n).array();
        ll += (a * a * (t4 + s.inner.row(n).array())).sum();
        lm += (a * (s.beta.row(n).array() * t2 + s.gram.row(n).array() * s.k1.row(base).array() + c1 + c2)).sum();
    }
    out_ll = ll;
    out_lm = lm;
}

template void pair_sum_ggn<RowMat>(const Model&, const BlockFeatures&, const BlockFeatures&, PairScratch&, double*);
template void pair_sum_ggn<RowMatF>(const Model&, const BlockFeaturesF&, const BlockFeaturesF&, PairScratch&, double*);
template void k_route_hessian<RowMat>(const Model&, const BlockFeatures&, const BlockFeatures&, const RowMat&,
                                      PairScratch&, double&, double&);
template void k_route_hessian<RowMatF>(const Model&, const BlockFeaturesF&, const BlockFeaturesF&, const RowMat&,
                                       PairScratch&, double&, double&);
template void pair_sum_ggn_diagonal<RowMat>(const Model&, const BlockFeatures&, const BlockFeatures&, PairScratch&,
                                            double*);
template void pair_sum_ggn_diagonal<RowMatF>(const Model&, const BlockFeaturesF&, const BlockFeaturesF&, PairScratch&,
                                             double*);
template void k_route_hessian_diagonal<RowMat>(const Model&, const BlockFeatures&, const BlockFeatures&, const RowMat&,
                                               PairScratch&, double&, double&);
template void k_route_hessian_diagonal<RowMatF>(const Model&, const BlockFeaturesF&, const BlockFeaturesF&,
                                                const RowMat&, PairScratch&, double&, double&);

}  // namespace wsb
