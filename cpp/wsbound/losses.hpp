// The per-sample output quantities of the diagonal losses (docs/numerics.md section 5), shared
// by the moments' features (features.cpp), the K route (kroute.cpp) and the curvature-vector
// product (hvp.cpp).  Cross-entropy's are in softmax.hpp.
//
// Sum form per sample, z = z_L (C logits), y the target row:
//   Loss::Mse  l = sum_k (z_k - y_k)^2,             delta = 2 (z - y),     h_k = 2
//   Loss::Bce  l = sum_k softplus(z_k) - y_k z_k,   delta = sigma(z) - y,  h_k = sigma(z_k) sigma(-z_k)
// and A = d^2 l / dz^2 = diag(h), h >= 0.
#pragma once

#include "model.hpp"

#include <algorithm>
#include <cmath>

namespace wsb {

using RowArray = Eigen::Array<double, 1, Eigen::Dynamic>;

// Mse and Bce: A = diag(h) per sample (no softmax, no reference class, no label weight w).
inline bool diagonal_loss(Loss loss) { return loss != Loss::CrossEntropy; }

// delta (C) and h (C) of one sample.  Bce with t = exp(-|z_k|) <= 1 (no overflow for any finite
// z): sigma(-|z|) = t / (1 + t), h = t / (1 + t)^2 (never 1 - something), and sigma(z) - y as
// (1 - y) - t/(1+t) for z >= 0 or t/(1+t) - y for z < 0, so that a saturated logit with its
// hard target (y = 1 at z >> 0, y = 0 at z << 0) gives delta of size t without cancellation.
inline void diagonal_output(Loss loss, const double* z, const double* y, Index C, double* delta, double* h) {
    if (loss == Loss::Mse) {
        for (Index k = 0; k < C; ++k) {
            delta[k] = 2.0 * (z[k] - y[k]);
            h[k] = 2.0;
        }
        return;
    }
    for (Index k = 0; k < C; ++k) {
        const double t = std::exp(-std::abs(z[k]));
        const double s = t / (1.0 + t);  // sigma(-|z|)
        h[k] = t / ((1.0 + t) * (1.0 + t));
        delta[k] = z[k] >= 0 ? (1.0 - y[k]) - s : s - y[k];  // NaN z: the second form, NaN propagates
    }
}

// out_k = x_k^T A x_k = sum_i h_i X_ik^2 for every column k of X (C rows): a sum of non-negative
// terms (u_k of the K route, the GGN trace shares tr(T^T A T)).
template <class Rows>
void diagonal_quadratic_rows(const Rows& X, const double* h, RowArray& out) {
    out.setZero(X.cols());
    for (Index i = 0; i < X.rows(); ++i) out += h[i] * X.row(i).array().square();
}

// The rounding addition of docs/numerics.md section 5 (Hessian only): e_L = |d|_2, a bound on the
// absolute error of delta_L of one sample, from E (C), a bound on the absolute error of z_L:
//   Mse: d_k = 2 E_k + 4 u (|z_k| + |y_k|)
//   Bce: d_k = h_k E_k + 4 u (|1 - y_k| + t/(1+t))  (z_k >= 0),   h_k E_k + 4 u (t/(1+t) + |y_k|)  (z_k < 0)
inline double delta_error(Loss loss, const double* z, const double* y, const double* h, const double* E, Index C) {
    constexpr double u = 0x1p-53;
    double mx = 0.0, ss = 0.0;  // |d|_2 as mx (sum (d_k / mx)^2)^{1/2}: no underflow of the squares
    for (int pass = 0; pass < 2; ++pass)
        for (Index k = 0; k < C; ++k) {
            double d;
            if (loss == Loss::Mse) {
                d = 2.0 * E[k] + 4.0 * u * (std::abs(z[k]) + std::abs(y[k]));
            } else {
                const double t = std::exp(-std::abs(z[k])), s = t / (1.0 + t);
                d = h[k] * E[k] + 4.0 * u * (z[k] >= 0 ? std::abs(1.0 - y[k]) + s : s + std::abs(y[k]));
            }
            if (std::isnan(d)) return d;
            if (pass == 0) {
                mx = std::max(mx, d);
            } else if (mx > 0.0) {
                ss += (d / mx) * (d / mx);
            }
        }
    return mx > 0.0 ? mx * std::sqrt(ss) : mx;
}

}  // namespace wsb
