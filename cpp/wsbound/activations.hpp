// Activation functions with first and second derivatives, elementwise.
// Mirrors the Python engine (python/wsbound_fast/_engine/activations.py).
#pragma once

#include "model.hpp"

#include <algorithm>
#include <cmath>

namespace wsb {

namespace detail {
inline double sigmoid(double z) {
    // exp of a non-positive argument only: no overflow for any finite z
    const double e = std::exp(-std::abs(z));
    return z >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
}
// sigma(z) (1 - sigma(z)) = e / (1 + e)^2 with e = exp(-|z|): no 1 - s, accurate when saturated.
inline double logistic_slope(double z) {
    const double e = std::exp(-std::abs(z));
    return e / ((1.0 + e) * (1.0 + e));
}
// 1 - tanh(x)^2 = 4 e / (1 + e)^2 with e = exp(-2|x|): no 1 - t^2, accurate when saturated.
inline double sech2(double x) { return 4.0 * logistic_slope(2.0 * x); }
}  // namespace detail

// Every derivative is evaluated without subtracting from 1 a number that tends to 1 (1 - t^2,
// 1 - s, 1 + erf): saturated hidden units keep their relative accuracy (docs/numerics.md).

// Evaluates f, f', f'' at z.
inline void activate(const Activation& a, double z, double& f, double& d1, double& d2) {
    constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2/pi)
    constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1/sqrt(2 pi)
    constexpr double kInvSqrt2 = 0.70710678118654752440;
    constexpr double kC = 0.044715;
    switch (a.kind) {
        case Act::Identity:
            f = z, d1 = 1.0, d2 = 0.0;
            return;
        case Act::Tanh: {
            const double t = std::tanh(z);
            f = t, d1 = detail::sech2(z), d2 = -2.0 * t * d1;
            return;
        }
        case Act::Sigmoid: {
            const double s = detail::sigmoid(z);
            f = s, d1 = detail::logistic_slope(z), d2 = -d1 * std::tanh(0.5 * z);  // 1 - 2 s = -tanh(z/2)
            return;
        }
        case Act::Softplus: {
            const double s = detail::sigmoid(z);
            f = std::max(z, 0.0) + std::log1p(std::exp(-std::abs(z)));
            d1 = s, d2 = detail::logistic_slope(z);
            return;
        }
        case Act::Gelu: {
            const double phi = kInvSqrt2Pi * std::exp(-0.5 * z * z);
            const double cdf = 0.5 * std::erfc(-z * kInvSqrt2);
            f = z * cdf, d1 = cdf + z * phi, d2 = phi * (2.0 - z * z);
            return;
        }
        case Act::GeluTanh: {
            const double u = kSqrt2OverPi * (z + kC * z * z * z);
            const double du = kSqrt2OverPi * (1.0 + 3.0 * kC * z * z);
            const double ddu = kSqrt2OverPi * 6.0 * kC * z;
            const double t = std::tanh(u);
            const double sech2 = detail::sech2(u);
            const double half = detail::sigmoid(2.0 * u);  // (1 + tanh u) / 2
            f = z * half;
            d1 = half + 0.5 * z * sech2 * du;
            d2 = sech2 * (du + 0.5 * z * (ddu - 2.0 * t * du * du));
            return;
        }
        case Act::Silu: {
            const double s = detail::sigmoid(z);
            const double d = detail::logistic_slope(z);
            f = z * s, d1 = s + z * d, d2 = d * (2.0 - z * std::tanh(0.5 * z));
            return;
        }
        case Act::Relu:
            f = z > 0 ? z : 0.0, d1 = z > 0 ? 1.0 : 0.0, d2 = 0.0;
            return;
        case Act::LeakyRelu:
            f = z > 0 ? z : a.param * z, d1 = z > 0 ? 1.0 : a.param, d2 = 0.0;
            return;
    }
    throw std::invalid_argument("wsbound_fast: unknown activation code");
}

}  // namespace wsb
