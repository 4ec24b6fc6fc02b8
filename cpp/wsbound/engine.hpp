// The streamed engine: blocks of samples, block pairs I <= J on worker threads, and a
// reduction in a fixed order (bitwise identical results for any thread count).
#pragma once

#include "model.hpp"

#include <atomic>
#include <cstdint>

namespace wsb {

// Number of block pairs (I <= J) the engine contracts for n samples in blocks of `batch`.
std::int64_t block_pairs(Index n, Index batch);

// sum_n tr(H_n) and sum_{n,n'} <H_n, H_n'> over all samples (unnormalised), per parameter
// block.  Throws std::invalid_argument for inconsistent inputs and Cancelled once *cancel
// is set.  *pairs_done (if given) counts finished block pairs, for progress reports read
// by another thread.
Moments compute_moments(const Model& model, const InputView& X, const Labels& y, const Options& opt,
                        const std::atomic<bool>* cancel = nullptr, std::atomic<std::int64_t>* pairs_done = nullptr);

}  // namespace wsb
