#include "engine.hpp"

#include "features.hpp"
#include "pairs.hpp"
#include "parallel.hpp"

#include <algorithm>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace wsb {

void Model::validate(Loss loss) const {
    if (W.empty()) throw std::invalid_argument("layers: at least one layer is required");
    if (b.size() != W.size() || has_bias.size() != W.size())
        throw std::invalid_argument("layers: one bias entry per layer is required");
    if (act.size() + 1 != W.size())
        throw std::invalid_argument("activation: one activation per hidden layer is required");
    for (size_t l = 0; l < W.size(); ++l) {
        if (W[l].rows() < 1 || W[l].cols() < 1)
            throw std::invalid_argument("layers[" + std::to_string(l) + "]: W must be non-empty");
        if (l > 0 && W[l].cols() != W[l - 1].rows())
            throw std::invalid_argument("layers: shapes do not chain at layer " + std::to_string(l));
        if (has_bias[l] && b[l].size() != W[l].rows())
            throw std::invalid_argument("layers[" + std::to_string(l) + "]: bias has the wrong length");
    }
    if (loss == Loss::CrossEntropy && W.back().rows() < 2) throw std::invalid_argument("layers: the last layer needs at least 2 outputs");
}

// The caller's arrays may sit at any byte offset (a NumPy view need not be aligned to its
// element size), so every element is read through memcpy, never through a typed pointer.
template <class T>
inline T load(const void* base, std::int64_t index) {
    T v;
    std::memcpy(&v, static_cast<const char*>(base) + index * static_cast<std::int64_t>(sizeof(T)), sizeof(T));
    return v;
}

void InputView::gather(Index lo, Index hi, RowMat& out) const {
    out.resize(hi - lo, cols);
    for (Index i = lo; i < hi; ++i) {
        const std::int64_t base = static_cast<std::int64_t>(i) * row_stride;
        double* dst = out.row(i - lo).data();
        if (is_float32) {
            for (Index j = 0; j < cols; ++j) dst[j] = static_cast<double>(load<float>(data, base + j * col_stride));
        } else if (col_stride == 1) {
            std::memcpy(dst, static_cast<const char*>(data) + base * static_cast<std::int64_t>(sizeof(double)),
                        static_cast<size_t>(cols) * sizeof(double));
        } else {
            for (Index j = 0; j < cols; ++j) dst[j] = load<double>(data, base + j * col_stride);
        }
    }
}

void Labels::gather(Index lo, Index hi, Index n_classes, RowMat& out) const {
    if (soft != nullptr) {  // contiguous rows, possibly unaligned
        out.resize(hi - lo, n_classes);
        std::memcpy(out.data(), reinterpret_cast<const char*>(soft) + lo * n_classes * static_cast<Index>(sizeof(double)),
                    static_cast<size_t>((hi - lo) * n_classes) * sizeof(double));
        return;
    }
    out.setZero(hi - lo, n_classes);
    for (Index i = lo; i < hi; ++i) {
        const auto k = load<std::int64_t>(index, i);
        if (k < 0 || k >= n_classes) throw std::invalid_argument("y: class index out of range");
        out(i - lo, static_cast<Index>(k)) = 1.0;
    }
}


std::int64_t block_pairs(Index n, Index batch) {
    const std::int64_t nb = (n + batch - 1) / batch;
    return nb * (nb + 1) / 2;
}

namespace {

// Features of the samples [lo, hi) of (X, y) into F, and with opt.f32 their float32 copy into *Ff
// (to_single keeps F.trace, F.trace_abs and F.norms and releases F's matrices).  One code path
// for compute_moments and compute_pair_sums, so that both see the same features.
void features_of(const Model& model, const InputView& X, const Labels& y, Index lo, Index hi, const Options& opt,
                 BlockFeatures& F, BlockFeaturesF* Ff) {
    RowMat Xb, Yb;
    X.gather(lo, hi, Xb);
    y.gather(lo, hi, model.d(model.n_layers()), Yb);
    block_features(model, Xb, Yb, opt, F);
    if (opt.f32) to_single(F, *Ff);
}

void check_block(const Model& model, const InputView& X, const Labels& y, const std::string& where) {
    if (X.rows < 1) throw std::invalid_argument(where + "X: at least one sample is required");
    if (X.cols != model.d(0)) throw std::invalid_argument(where + "X: width does not match layers[0]");
    if ((y.index == nullptr) == (y.soft == nullptr)) throw std::invalid_argument(where + "y: give indices or soft rows");
}

}  // namespace

Moments compute_moments(const Model& model, const InputView& X, const Labels& y, const Options& opt,
                        const std::atomic<bool>* cancel, std::atomic<std::int64_t>* pairs_done) {
    model.validate(opt.loss);
    check_block(model, X, y, "");
    if (opt.batch < 1) throw std::invalid_argument("batch_size must be >= 1");
    if (opt.group < 1) throw std::invalid_argument("group must be >= 1");
    if (opt.threads < 1) throw std::invalid_argument("threads must be >= 1");

    const Index N = X.rows, B = opt.batch;
    const Index nb = (N + B - 1) / B;
    const Index group = std::min(opt.group, nb);
    const int threads = opt.threads;

    const Index L = model.n_layers();
    const auto np_ = static_cast<size_t>((L + 1) * (L + 1));
    std::vector<double> block_trace(static_cast<size_t>(nb) * np_, 0.0);  // [block][l]
    std::vector<double> block_abs(static_cast<size_t>(nb) * np_, 0.0);    // [block][l]: trace_abs
    std::vector<double> block_norms(static_cast<size_t>(nb) * np_, 0.0);  // [block][pair(l,m)]: norms
    std::vector<double> row_sum(static_cast<size_t>(nb) * np_, 0.0);      // [block row][pair(l,m)]
    std::vector<PairScratch> scratch(static_cast<size_t>(threads));
    // Features of the blocks held at once (float32 copies of the Gram operands with opt.f32).
    std::vector<BlockFeatures> rows(static_cast<size_t>(group)), cols(static_cast<size_t>(group));
    std::vector<BlockFeaturesF> rows_f(opt.f32 ? static_cast<size_t>(group) : 0), cols_f(rows_f.size());

    auto features = [&](Index first, Index count, std::vector<BlockFeatures>& out, std::vector<BlockFeaturesF>& out_f) {
        parallel_tasks(count, threads, cancel, [&](Index t, int) {
            const Index k = first + t;
            const Index lo = k * B, hi = std::min(lo + B, N);
            features_of(model, X, y, lo, hi, opt, out[static_cast<size_t>(t)],
                        opt.f32 ? &out_f[static_cast<size_t>(t)] : nullptr);
        });
    };

    std::vector<std::pair<Index, Index>> tasks;
    std::vector<double> results;
    for (Index g0 = 0; g0 < nb; g0 += group) {
        const Index ng = std::min(group, nb - g0);
        features(g0, ng, rows, rows_f);
        for (Index i = 0; i < ng; ++i) {
            const BlockFeatures& F = rows[static_cast<size_t>(i)];
            const auto at = static_cast<std::ptrdiff_t>(static_cast<size_t>(g0 + i) * np_);
            std::copy(F.trace.begin(), F.trace.end(), block_trace.begin() + at);
            std::copy(F.trace_abs.begin(), F.trace_abs.end(), block_abs.begin() + at);
            std::copy(F.norms.begin(), F.norms.end(), block_norms.begin() + at);
        }
        for (Index h0 = g0; h0 < nb; h0 += group) {
            const Index nh = std::min(group, nb - h0);
            const bool same = h0 == g0;
            if (!same) features(h0, nh, cols, cols_f);
            const std::vector<BlockFeatures>& right = same ? rows : cols;
            const std::vector<BlockFeaturesF>& right_f = same ? rows_f : cols_f;
            tasks.clear();
            for (Index i = 0; i < ng; ++i)
                for (Index j = same ? i : 0; j < nh; ++j) tasks.emplace_back(i, j);
            results.assign(tasks.size() * np_, 0.0);
            parallel_tasks(static_cast<Index>(tasks.size()), threads, cancel, [&](Index t, int worker) {
                const auto [i, j] = tasks[static_cast<size_t>(t)];
                PairScratch& sc = scratch[static_cast<size_t>(worker)];
                double* out = results.data() + static_cast<size_t>(t) * np_;
                if (opt.f32) {
                    pair_sum(model, rows_f[static_cast<size_t>(i)], right_f[static_cast<size_t>(j)], opt, sc, out);
                } else {
                    pair_sum(model, rows[static_cast<size_t>(i)], right[static_cast<size_t>(j)], opt, sc, out);
                }
                if (pairs_done != nullptr) pairs_done->fetch_add(1, std::memory_order_relaxed);
            });
            // Fixed order: row by row, columns increasing (the same for any group size or thread
            // count).  kappa is symmetric in (n, n'), so an off-diagonal block pair counts twice.
            for (size_t t = 0; t < tasks.size(); ++t) {
                const Index gi = g0 + tasks[t].first, gj = h0 + tasks[t].second;
                const double w = gi == gj ? 1.0 : 2.0;
                double* row = row_sum.data() + static_cast<size_t>(gi) * np_;
                const double* r = results.data() + t * np_;
                for (size_t q = 0; q < np_; ++q) row[q] += w * r[q];
            }
        }
    }
    Moments out;
    out.L = L;
    out.trace.assign(static_cast<size_t>(L + 1), 0.0);
    out.block_sq.assign(np_, 0.0);
    out.trace_abs.assign(static_cast<size_t>(L + 1), 0.0);
    out.norms.assign(np_, 0.0);
    for (Index k = 0; k < nb; ++k) {  // fixed order: block by block
        const size_t at = static_cast<size_t>(k) * np_;
        for (size_t l = 0; l <= static_cast<size_t>(L); ++l) {
            out.trace[l] += block_trace[at + l];
            out.trace_abs[l] += block_abs[at + l];
        }
        for (size_t q = 0; q < np_; ++q) {
            out.block_sq[q] += row_sum[at + q];
            out.norms[q] += block_norms[at + q];
        }
    }
    return out;
}

PairSums compute_pair_sums(const Model& model, const std::vector<BlockInput>& blocks,
                           const std::vector<std::pair<Index, Index>>& pairs, const Options& opt,
                           const std::atomic<bool>* cancel, std::atomic<std::int64_t>* pairs_done) {
    model.validate(opt.loss);
    if (blocks.empty()) throw std::invalid_argument("blocks: at least one block is required");
    if (pairs.empty()) throw std::invalid_argument("pairs: at least one block pair is required");
    if (opt.threads < 1) throw std::invalid_argument("threads must be >= 1");
    const auto n_blocks = static_cast<Index>(blocks.size());
    std::vector<Index> slot(blocks.size(), -1);  // block -> its place among the referenced blocks
    for (size_t t = 0; t < pairs.size(); ++t) {
        const auto [i, j] = pairs[t];
        if (i < 0 || j < 0 || i >= n_blocks || j >= n_blocks)
            throw std::invalid_argument("pairs[" + std::to_string(t) + "]: block index out of range");
        if (i > j) throw std::invalid_argument("pairs[" + std::to_string(t) + "]: needs i <= j");
        slot[static_cast<size_t>(i)] = slot[static_cast<size_t>(j)] = 0;
    }
    PairSums out;
    out.L = model.n_layers();
    for (Index k = 0; k < n_blocks; ++k) {
        if (slot[static_cast<size_t>(k)] < 0) continue;
        const BlockInput& b = blocks[static_cast<size_t>(k)];
        check_block(model, b.X, b.y, "blocks[" + std::to_string(k) + "]: ");
        slot[static_cast<size_t>(k)] = static_cast<Index>(out.blocks.size());
        out.blocks.push_back(k);
    }
    const int threads = opt.threads;
    const auto np_ = static_cast<size_t>((out.L + 1) * (out.L + 1));
    const size_t K = out.blocks.size();

    // Every referenced block's features, held at once.
    std::vector<BlockFeatures> F(K);
    std::vector<BlockFeaturesF> Ff(opt.f32 ? K : 0);
    parallel_tasks(static_cast<Index>(K), threads, cancel, [&](Index t, int) {
        const BlockInput& b = blocks[static_cast<size_t>(out.blocks[static_cast<size_t>(t)])];
        features_of(model, b.X, b.y, 0, b.X.rows, opt, F[static_cast<size_t>(t)],
                    opt.f32 ? &Ff[static_cast<size_t>(t)] : nullptr);
    });
    out.trace.assign(K * np_, 0.0);
    out.trace_abs.assign(K * np_, 0.0);
    out.norms.assign(K * np_, 0.0);
    for (size_t k = 0; k < K; ++k) {
        const auto at = static_cast<std::ptrdiff_t>(k * np_);
        std::copy(F[k].trace.begin(), F[k].trace.end(), out.trace.begin() + at);
        std::copy(F[k].trace_abs.begin(), F[k].trace_abs.end(), out.trace_abs.begin() + at);
        std::copy(F[k].norms.begin(), F[k].norms.end(), out.norms.begin() + at);
    }

    // Every pair's sum, each into its own zeroed slot (as compute_moments' results).
    out.pairs.assign(pairs.size() * np_, 0.0);
    std::vector<PairScratch> scratch(static_cast<size_t>(threads));
    parallel_tasks(static_cast<Index>(pairs.size()), threads, cancel, [&](Index t, int worker) {
        const auto i = static_cast<size_t>(slot[static_cast<size_t>(pairs[static_cast<size_t>(t)].first)]);
        const auto j = static_cast<size_t>(slot[static_cast<size_t>(pairs[static_cast<size_t>(t)].second)]);
        PairScratch& sc = scratch[static_cast<size_t>(worker)];
        double* res = out.pairs.data() + static_cast<size_t>(t) * np_;
        if (opt.f32) {
            pair_sum(model, Ff[i], Ff[j], opt, sc, res);
        } else {
            pair_sum(model, F[i], F[j], opt, sc, res);
        }
        if (pairs_done != nullptr) pairs_done->fetch_add(1, std::memory_order_relaxed);
    });
    return out;
}

}  // namespace wsb
