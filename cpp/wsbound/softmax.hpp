// Saturation-stable softmax quantities (docs/numerics.md sections 1-2), shared by the
// moments' features (features.cpp), the K route (kroute.cpp) and the curvature-vector
// product (hvp.cpp).
//
// r = argmax z (the first one on ties) is the reference class; e_k = exp(z_k - z_r) <= 1,
// p_k = e_k / E, and q = 1 - p_r = (sum_{k != r} e_k) / E is a sum of non-negative terms.
// Nothing of size q is ever formed as a difference of two O(1) numbers.
#pragma once

#include "model.hpp"

#include <cmath>

namespace wsb {

using RowArray = Eigen::Array<double, 1, Eigen::Dynamic>;

// p (C values) = softmax(z); returns r and sets q = 1 - p_r.  Logits whose margins exceed
// ~745 give exact zeros (p_k = 0 for k != r, q = 0), never an exception.
inline int stable_softmax(const double* z, Index C, double* p, double& q) {
    int r = 0;
    for (Index k = 1; k < C; ++k)
        if (z[k] > z[r]) r = static_cast<int>(k);
    const double zr = z[r];
    double rest = 0.0;
    for (Index k = 0; k < C; ++k) {
        const double e = std::exp(z[k] - zr);  // 1 at k = r (NaN for an infinite z_r: it propagates)
        p[k] = e;
        if (k != r) rest += e;
    }
    const double E = p[r] + rest;
    for (Index k = 0; k < C; ++k) p[k] /= E;
    q = rest / E;
    return r;
}

// delta = w p - y with delta_r = -sum_{k != r} delta_k (sum_k delta_k = 0 exactly), so that a
// correct confident label gives delta_r = -w q without cancellation.
inline void stable_delta(const double* p, const double* y, double w, int r, Index C, double* delta) {
    double s = 0.0;
    for (Index k = 0; k < C; ++k) {
        if (k == r) continue;
        delta[k] = w * p[k] - y[k];
        s += delta[k];
    }
    delta[r] = -s;
}

// 1 - p_i, with 1 - p_r = q (for i != r the subtraction is harmless: 1 - p_i >= 1/2).
inline double one_minus_p(const double* p, int r, double q, Index i) { return i == r ? q : 1.0 - p[i]; }

// tr(A) / w = sum_i p_i (1 - p_i).
inline double trace_a(const double* p, int r, double q, Index C) {
    double t = 0.0;
    for (Index i = 0; i < C; ++i) t += p[i] * one_minus_p(p, r, q, i);
    return t;
}

// out[k] = x_k^T A x_k / w for every column k of X (C rows, d columns), in the shifted
// non-negative form  sum_{i != r} p_i (xh_i - xb)^2 + p_r xb^2,  xh = x - x_r 1,
// xb = sum_{i != r} p_i xh_i.  xb and xh are (d) scratch arrays.
template <class Rows>
void quadratic_rows(const Rows& X, const double* p, int r, RowArray& xb, RowArray& xh, RowArray& out) {
    const Index C = X.rows();
    const auto xr = X.row(r).array();
    xb.setZero(X.cols());
    for (Index i = 0; i < C; ++i)
        if (i != r) xb += p[i] * (X.row(i).array() - xr);
    out = p[r] * xb.square();
    for (Index i = 0; i < C; ++i) {
        if (i == r) continue;
        xh = (X.row(i).array() - xr) - xb;
        out += p[i] * xh.square();
    }
}

}  // namespace wsb
