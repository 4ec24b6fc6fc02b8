// Exact curvature-vector products H v (or GGN v) over a data set, streamed over blocks of
// samples: forward pass, forward R-propagation, backward pass with the second-order terms
// (Pearlmutter 1994).  Pure C++ (Eigen only), no Python.
#pragma once

#include "model.hpp"

#include <atomic>

namespace wsb {

// out (k x P, row-major) = sum over all samples n of H_n v_j for the k rows v_j of V
// (k x P, row-major), unnormalised ("sum" reduction: divide by N for "mean").  P is the
// number of parameters, ordered layer by layer, W_l row-major then b_l.
//
// Blocks of opt.batch samples are processed on opt.threads workers, `threads` blocks at a
// time, each into its own buffer; the buffers are added to out in block order, so the
// result is bitwise identical for any thread count at a fixed batch size.  opt.group is
// unused.  Throws std::invalid_argument for inconsistent inputs and Cancelled once *cancel
// is set (checked between blocks and between the vectors of a block).
void hvp(const Model& model, const InputView& X, const Labels& y, const double* V, Index k, double* out,
         const Options& opt, const std::atomic<bool>* cancel = nullptr);

// Number of parameters of the model (the length of one vector v).
Index n_params(const Model& model);

}  // namespace wsb
