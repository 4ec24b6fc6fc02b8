// Internal to the pair phase (pairs.cpp, kroute.cpp): products in the operands' precision
// widened to float64, and the power-of-two row scales of float32 features (to_single).
#pragma once

#include "pairs.hpp"

#include <type_traits>

namespace wsb {

// out (=|+=) a * b, computed in the operands' precision and widened to float64.
template <class A, class Bx>
inline void product(const A& a, const Bx& b, RowMat& out, PairScratch& s, bool add = false) {
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
inline const Eigen::VectorXd& no_scale() {
    static const Eigen::VectorXd none;
    return none;
}

// Row n's power-of-two factor of a float32 feature (FeaturesOf::delta_scale etc.; 1 when unscaled).
inline double row_scale(const Eigen::VectorXd& v, Index n) { return v.size() > 0 ? v[n] : 1.0; }

// out(n, n') *= a[n] b[n'] for a product of two row-scaled float32 features (no-op when unscaled).
inline void unscale(RowMat& out, const Eigen::VectorXd& a, const Eigen::VectorXd& b) {
    if (a.size() == 0 && b.size() == 0) return;
    for (Index n = 0; n < out.rows(); ++n) {
        const double an = row_scale(a, n);
        for (Index k = 0; k < out.cols(); ++k) out(n, k) = (out(n, k) * an) * row_scale(b, k);
    }
}

}  // namespace wsb
