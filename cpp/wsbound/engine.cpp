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

void Model::validate() const {
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
    if (W.back().rows() < 2) throw std::invalid_argument("layers: the last layer needs at least 2 outputs");
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

Moments compute_moments(const Model& model, const InputView& X, const Labels& y, const Options& opt,
                        const std::atomic<bool>* cancel, std::atomic<std::int64_t>* pairs_done) {
    model.validate();
    if (X.rows < 1) throw std::invalid_argument("X: at least one sample is required");
    if (X.cols != model.d(0)) throw std::invalid_argument("X: width does not match layers[0]");
    if ((y.index == nullptr) == (y.soft == nullptr)) throw std::invalid_argument("y: give indices or soft rows");
    if (opt.batch < 1) throw std::invalid_argument("batch_size must be >= 1");
    if (opt.group < 1) throw std::invalid_argument("group must be >= 1");
    if (opt.threads < 1) throw std::invalid_argument("threads must be >= 1");

    const Index N = X.rows, B = opt.batch, C = model.d(model.n_layers());
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
            RowMat Xb, Yb;
            X.gather(lo, hi, Xb);
            y.gather(lo, hi, C, Yb);
            BlockFeatures& F = out[static_cast<size_t>(t)];
            block_features(model, Xb, Yb, opt, F);
            if (opt.f32) to_single(F, out_f[static_cast<size_t>(t)]);  // keeps F.trace, releases F's matrices
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

}  // namespace wsb
