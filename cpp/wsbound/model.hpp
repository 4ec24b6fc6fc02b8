// wsbound_fast core: model, inputs and options.  Pure C++ (Eigen only), no Python.
#pragma once

#include <Eigen/Core>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace wsb {

using RowMat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Vec = Eigen::VectorXd;
using Index = Eigen::Index;

// Codes shared with python/wsbound_fast/_problem/activations.py (ACTIVATIONS).
enum class Act : int {
    Identity = 0,
    Tanh = 1,
    Sigmoid = 2,
    Softplus = 3,
    Gelu = 4,
    GeluTanh = 5,
    Silu = 6,
    Relu = 7,
    LeakyRelu = 8,
};

// Loss codes, shared with python/wsbound_fast/_problem/losses.py (LOSS_CODES); appended, never
// renumbered.  Per sample (sum form): softmax cross-entropy, squared error sum_k (z_k - y_k)^2,
// binary cross-entropy with logits sum_k softplus(z_k) - y_k z_k.  Mse and Bce are the
// diagonal losses: A = d^2 l / dz_L^2 = diag(h) (cpp/wsbound/losses.hpp, docs/numerics.md section 5).
enum class Loss : int {
    CrossEntropy = 0,
    Mse = 1,
    Bce = 2,
};

struct Activation {
    Act kind = Act::Identity;
    double param = 0.0;  // negative slope of LeakyRelu; unused otherwise
};

// An MLP: z_l = W_l a_{l-1} + b_l, a_l = act_l(z_l) for l < L, logits z_L.
// Layers are stored 0-based here (W[0] is W_1 of docs/design.md).
struct Model {
    std::vector<RowMat> W;          // W[l]: (d_{l+1}, d_l)
    std::vector<Vec> b;             // b[l]: (d_{l+1}) or empty when !has_bias[l]
    std::vector<bool> has_bias;
    std::vector<Activation> act;    // one per hidden layer: W.size() - 1

    Index n_layers() const { return static_cast<Index>(W.size()); }
    // d(0) = input width, d(L) = number of classes.
    Index d(Index l) const { return l == 0 ? W.front().cols() : W[static_cast<size_t>(l - 1)].rows(); }

    // Throws std::invalid_argument when the shapes do not chain (or, for cross-entropy, the
    // last layer has fewer than 2 outputs; the diagonal losses allow C = 1).
    void validate(Loss loss = Loss::CrossEntropy) const;
};

// A read-only view of the inputs X (N, d_0): float32 or float64, any element strides.
struct InputView {
    const void* data = nullptr;
    bool is_float32 = false;
    Index rows = 0, cols = 0;
    std::int64_t row_stride = 0, col_stride = 0;  // in elements; may be negative

    // Copies rows [lo, hi) into out as float64.
    void gather(Index lo, Index hi, RowMat& out) const;
};

// Labels: class indices (N) or probability rows (N, C) row-major; exactly one is set.
struct Labels {
    const std::int64_t* index = nullptr;
    const double* soft = nullptr;

    // Rows [lo, hi) as (hi - lo, C) label rows (one-hot for indices).
    void gather(Index lo, Index hi, Index n_classes, RowMat& out) const;
};

struct Options {
    bool hessian = true;     // full Hessian; false: generalized Gauss-Newton
    // Structure-aware contraction (same result, other flop count): the GGN through C x C
    // Gram blocks of V_l = T_{L,l}^T S; for the Hessian, M_{L-1} as C-rank plus diagonal.
    bool structured = false;
    // float32 Gram products (features computed in float64, rounded once per block; every
    // product widened to float64 before elementwise products and sums).
    bool f32 = false;
    Index batch = 256;       // samples per block
    Index group = 1;         // blocks whose features are held at once (per side)
    int threads = 1;         // worker threads over blocks and block pairs
    Loss loss = Loss::CrossEntropy;  // the per-sample loss of the logits (delta_L and A)
    // Parameter subset, one code per layer (python/wsbound_fast/_problem/problem.py PART_*):
    // 0 all, 1 the weights only, 2 the bias only, 3 none; empty: every parameter.  The moments
    // are then those of the principal submatrix of the selected parameters.
    std::vector<int> parts;
};

// Unnormalised moments per parameter block (layers 1..L; index 0 unused):
//   trace[l]            = sum_n tr(H_n^{ll})
//   block_sq[l(L+1)+m]  = sum_{n,n'} <H_n^{lm}, H_n'^{lm}>   for l <= m (0 elsewhere)
// so that sum_n tr(H_n) = sum_l trace[l] and the full
// sum_{n,n'} <H_n, H_n'> = sum_l block_sq[l,l] + 2 sum_{l<m} block_sq[l,m].
// And the magnitudes of the rounding allowances (docs/numerics.md section 4; for the Hessian of the
// diagonal losses both include the rounding addition of section 5):
//   trace_abs[l]        = sum_n |a~_{l-1}|^2 sum_k |(M_l)_kk|
//   norms[l(L+1)+m]     = sum_n nu_n^{lm}  (nu_n^{lm} >= |H_n^{lm}|_F)   for l <= m (0 elsewhere)
struct Moments {
    Index L = 0;
    std::vector<double> trace;
    std::vector<double> block_sq;
    std::vector<double> trace_abs;
    std::vector<double> norms;
};

// Thrown by the engine when the caller's cancel flag was raised.
struct Cancelled : std::runtime_error {
    Cancelled() : std::runtime_error("wsbound_fast: computation cancelled") {}
};

}  // namespace wsb
