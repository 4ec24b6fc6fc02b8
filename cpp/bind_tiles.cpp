// Binding of the engine's tiles (cpp/wsbound/engine.hpp: compute_pair_sums): the per-block
// values and the pair sums of a list of block pairs, for a caller that distributes the block
// pairs of compute_moments itself (e.g. over dask workers) and reduces them in its order.
#include "bind_common.hpp"
#include "wsbound/engine.hpp"

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// Runs make() and prefixes the message of its ValueError / TypeError with `where`.
template <class Make>
auto named(const std::string& where, Make&& make) {
    try {
        return make();
    } catch (const py::type_error& e) {
        throw py::type_error(where + e.what());
    } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(where + e.what());
    }
}

// An element of X_blocks / label_blocks: a NumPy array, as moments() takes X and y.
py::array as_array(py::handle obj) {
    if (!py::isinstance<py::array>(obj)) throw py::type_error("must be a NumPy array");
    return py::reinterpret_borrow<py::array>(obj);
}

// pairs: an integer array of shape (T, 2), T >= 1, as (i, j) with 0 <= i <= j < n_blocks.
std::vector<std::pair<wsb::Index, wsb::Index>> make_pairs(const py::array& pairs, wsb::Index n_blocks) {
    const char kind = pairs.dtype().kind();
    if (kind != 'i' && kind != 'u') throw py::type_error("pairs: must be an integer array (int64), shape (T, 2)");
    if (pairs.ndim() != 2 || pairs.shape(1) != 2) throw std::invalid_argument("pairs: must have shape (T, 2)");
    if (pairs.shape(0) < 1) throw std::invalid_argument("pairs: at least one block pair is required");
    // (unsigned values beyond int64 wrap to negative ones: out of range below)
    using Int64Array = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;
    const auto ij = Int64Array::ensure(pairs);
    if (!ij) throw py::type_error("pairs: could not be read as int64");
    auto v = ij.unchecked<2>();
    std::vector<std::pair<wsb::Index, wsb::Index>> out;
    out.reserve(static_cast<size_t>(v.shape(0)));
    for (py::ssize_t t = 0; t < v.shape(0); ++t) {
        const std::int64_t i = v(t, 0), j = v(t, 1);
        const std::string where = "pairs[" + std::to_string(t) + "] = (" + std::to_string(i) + ", " +
                                  std::to_string(j) + "): ";
        if (i < 0 || j < 0 || i >= n_blocks || j >= n_blocks)
            throw std::invalid_argument(where + "block index out of range [0, " + std::to_string(n_blocks) + ")");
        if (i > j) throw std::invalid_argument(where + "needs i <= j (the upper triangle of block pairs)");
        out.emplace_back(static_cast<wsb::Index>(i), static_cast<wsb::Index>(j));
    }
    return out;
}

py::tuple pair_sums(const py::list& weights, const py::list& biases, const std::vector<int>& act_codes,
                    const std::vector<double>& act_params, const py::list& X_blocks, const py::list& label_blocks,
                    const py::array& pairs, bool hessian, bool structured, int threads, const py::object& progress,
                    bool f32, int loss, const std::vector<int>& parts) {
    const wsb::Loss loss_kind = wsb_bind::make_loss(loss);
    const wsb::Model model = wsb_bind::make_model(weights, biases, act_codes, act_params, loss_kind);
    const wsb::Index C = model.d(model.n_layers());
    const auto n_blocks = static_cast<wsb::Index>(py::len(X_blocks));
    if (n_blocks < 1) throw std::invalid_argument("X_blocks: at least one block is required");
    if (static_cast<wsb::Index>(py::len(label_blocks)) != n_blocks)
        throw std::invalid_argument("label_blocks: one label array per block of X_blocks is required (" +
                                    std::to_string(n_blocks) + " blocks, " + std::to_string(py::len(label_blocks)) +
                                    " label arrays)");
    if (threads < 1) throw std::invalid_argument("threads must be >= 1");
    // The arrays (converted where they were not arrays) stay alive while the views are used.
    std::vector<py::array> held_x(static_cast<size_t>(n_blocks)), held_y(static_cast<size_t>(n_blocks));
    std::vector<wsb::BlockInput> blocks(static_cast<size_t>(n_blocks));
    for (wsb::Index k = 0; k < n_blocks; ++k) {
        const auto u = static_cast<size_t>(k);
        const std::string where = "X_blocks[" + std::to_string(k) + "]: ";
        held_x[u] = named(where, [&] { return as_array(X_blocks[u]); });
        wsb::BlockInput& b = blocks[u];
        b.X = named(where, [&] { return wsb_bind::make_input(held_x[u]); });
        if (b.X.rows < 1) throw std::invalid_argument(where + "at least one sample is required");
        if (b.X.cols != model.d(0))
            throw std::invalid_argument(where + "width " + std::to_string(b.X.cols) + " does not match layers[0] (" +
                                        std::to_string(model.d(0)) + ")");
        const std::string ywhere = "label_blocks[" + std::to_string(k) + "]: ";
        const auto labels = named(ywhere, [&] { return as_array(label_blocks[u]); });
        b.y = named(ywhere, [&] { return wsb_bind::make_labels(labels, b.X.rows, C, held_y[u]); });
    }
    const auto tasks = make_pairs(pairs, n_blocks);

    wsb::Options opt;
    opt.hessian = hessian;
    opt.structured = structured;
    opt.f32 = f32;
    opt.threads = threads;
    opt.loss = loss_kind;
    opt.parts = wsb_bind::make_parts(parts, model.n_layers());

    wsb::PairSums result;
    wsb_bind::run_with_progress(
        [&](const std::atomic<bool>* cancel, std::atomic<std::int64_t>* done) {
            result = wsb::compute_pair_sums(model, blocks, tasks, opt, cancel, done);
        },
        progress, static_cast<std::int64_t>(tasks.size()));

    // Layers 0..L-1 as _core.moments returns them; the lower triangles are zero.
    const auto L = static_cast<py::ssize_t>(result.L);
    const auto K = static_cast<py::ssize_t>(result.blocks.size());
    const auto T = static_cast<py::ssize_t>(tasks.size());
    const auto np_ = static_cast<size_t>((L + 1) * (L + 1));
    py::array_t<std::int64_t> used(K);
    py::array_t<double> trace({K, L}), trace_abs({K, L}), norms({K, L, L}), pair_out({T, L, L});
    auto u = used.mutable_unchecked<1>();
    auto t = trace.mutable_unchecked<2>();
    auto ta = trace_abs.mutable_unchecked<2>();
    auto nu = norms.mutable_unchecked<3>();
    auto po = pair_out.mutable_unchecked<3>();
    const auto upper = [&](const std::vector<double>& from, size_t base, py::ssize_t l, py::ssize_t m) {
        return m >= l ? from[base + static_cast<size_t>((l + 1) * (L + 1) + m + 1)] : 0.0;
    };
    for (py::ssize_t k = 0; k < K; ++k) {
        const size_t base = static_cast<size_t>(k) * np_;
        u(k) = static_cast<std::int64_t>(result.blocks[static_cast<size_t>(k)]);
        for (py::ssize_t l = 0; l < L; ++l) {
            t(k, l) = result.trace[base + static_cast<size_t>(l + 1)];
            ta(k, l) = result.trace_abs[base + static_cast<size_t>(l + 1)];
            for (py::ssize_t m = 0; m < L; ++m) nu(k, l, m) = upper(result.norms, base, l, m);
        }
    }
    for (py::ssize_t p = 0; p < T; ++p) {
        const size_t base = static_cast<size_t>(p) * np_;
        for (py::ssize_t l = 0; l < L; ++l)
            for (py::ssize_t m = 0; m < L; ++m) po(p, l, m) = upper(result.pairs, base, l, m);
    }
    return py::make_tuple(used, trace, trace_abs, norms, pair_out);
}

}  // namespace

void bind_tiles(py::module_& m) {
    m.def("pair_sums", &pair_sums, py::arg("weights"), py::arg("biases"), py::arg("act_codes"), py::arg("act_params"),
          py::arg("X_blocks"), py::arg("label_blocks"), py::arg("pairs"), py::arg("hessian"), py::arg("structured"),
          py::arg("threads"), py::arg("progress") = py::none(), py::arg("f32") = false, py::arg("loss") = 0,
          py::arg("parts") = std::vector<int>(),
          R"doc(The tiles of moments(): per-block values and the pair sums of listed block pairs.

X_blocks[k] (n_k, d_0) and label_blocks[k] ((n_k,) int64 indices or (n_k, C) float64 rows) are
block k's samples; pairs (T, 2) integer, rows (i, j) with 0 <= i <= j < len(X_blocks).  The
features of every block some pair references are computed once, then each pair's sum over
n in I, n' in J of kappa_lm(n, n'), on `threads` workers (with the GIL released; Ctrl-C
cancels; progress(done, T) as pairs finish).  Returns (blocks_used (K,) int64: the referenced
blocks, increasing; trace (K, L), trace_abs (K, L), norms (K, L, L): each referenced block's
share of moments()' trace, trace_abs and norms; pair_out (T, L, L): each pair's unweighted
share of blocks).  Layers 0..L-1 as moments(); lower triangles zero; unnormalised.

For blocks cut as moments() cuts X (batch samples each, the last one shorter) and the same
hessian, structured, f32, loss and threads, moments()' blocks are bitwise
sum_i [sum_{j >= i} w_ij pair_out(i, j)] (w_ii = 1, w_ij = 2 otherwise; i, then j increasing,
each sum started from 0.0), and its trace, trace_abs and norms the block-by-block sums.

Raises ValueError (TypeError for dtypes) on inconsistent input.)doc");
}
