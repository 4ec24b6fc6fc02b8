// The streamed engine: blocks of samples, block pairs I <= J on worker threads, and a
// reduction in a fixed order (bitwise identical results for any thread count); and its tiles
// (compute_pair_sums) for a caller that distributes the block pairs itself.
#pragma once

#include "model.hpp"

#include <atomic>
#include <cstdint>
#include <utility>
#include <vector>

namespace wsb {

// Number of block pairs (I <= J) the engine contracts for n samples in blocks of `batch`.
std::int64_t block_pairs(Index n, Index batch);

// sum_n tr(H_n) and sum_{n,n'} <H_n, H_n'> over all samples (unnormalised), per parameter
// block.  Throws std::invalid_argument for inconsistent inputs and Cancelled once *cancel
// is set.  *pairs_done (if given) counts finished block pairs, for progress reports read
// by another thread.
Moments compute_moments(const Model& model, const InputView& X, const Labels& y, const Options& opt,
                        const std::atomic<bool>* cancel = nullptr, std::atomic<std::int64_t>* pairs_done = nullptr);

// One block of samples for compute_pair_sums: its own input rows and label rows (the labels
// hold X.rows entries: class indices or probability rows).
struct BlockInput {
    InputView X;
    Labels y;
};

// Per referenced block and per block pair, the values compute_moments reduces; np = (L+1)^2 and
// the layout of Moments (layers 1..L, pair(l, m) = l (L + 1) + m; index 0 and l > m are 0).
struct PairSums {
    Index L = 0;
    std::vector<Index> blocks;       // the blocks some pair references, increasing: k-th entry = block blocks[k]
    std::vector<double> trace;       // [k][np]: the block's share of Moments::trace (first L + 1 entries)
    std::vector<double> trace_abs;   // [k][np]: its share of Moments::trace_abs (first L + 1 entries)
    std::vector<double> norms;       // [k][np]: its share of Moments::norms
    std::vector<double> pairs;       // [t][np]: pair t's sum over n in I, n' in J of kappa (unweighted)
};

// The tiles of the engine, for distributed execution: the features of every block that some
// pair (i, j) (i <= j, indices into `blocks`) references, computed once and held at once, then
// each pair's pair sum, both on opt.threads workers.  For blocks cut as compute_moments cuts X
// (opt.batch samples each, the last one shorter), the same Options (hessian, structured, f32;
// batch and group are unused) give bitwise the numbers compute_moments adds:
//   Moments::block_sq = sum over rows i (in order) of [sum over j >= i (in order) of w_ij pairs(i, j)],
//   w_ij = 1 for i == j and 2 otherwise, and trace, trace_abs, norms summed block by block.
// Throws std::invalid_argument for inconsistent inputs and Cancelled once *cancel is set;
// *pairs_done (if given) counts finished pairs.
PairSums compute_pair_sums(const Model& model, const std::vector<BlockInput>& blocks,
                           const std::vector<std::pair<Index, Index>>& pairs, const Options& opt,
                           const std::atomic<bool>* cancel = nullptr, std::atomic<std::int64_t>* pairs_done = nullptr);

}  // namespace wsb
