// The streamed engine: blocks of samples, block pairs I <= J on worker threads, and a
// reduction in a fixed order (bitwise identical results for any thread count).
#pragma once

#include "model.hpp"

#include <atomic>
#include <functional>

namespace wsb {

// Called after each finished group of block pairs with (pairs done, pairs in all).
using ProgressFn = std::function<void(std::int64_t, std::int64_t)>;

// sum_n tr(H_n) and sum_{n,n'} <H_n, H_n'> over all samples (unnormalised).  Throws
// std::invalid_argument for inconsistent inputs and Cancelled once *cancel is set.
Moments compute_moments(const Model& model, const InputView& X, const Labels& y, const Options& opt,
                        const std::atomic<bool>* cancel = nullptr, const ProgressFn& progress = nullptr);

}  // namespace wsb
