// Binding of the streamed moments engine (cpp/wsbound/engine.hpp: compute_moments).
#include "bind_common.hpp"
#include "wsbound/engine.hpp"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace py = pybind11;

namespace {

py::tuple moments(const py::list& weights, const py::list& biases, const std::vector<int>& act_codes,
                  const std::vector<double>& act_params, const py::array& X, const py::array& labels, bool hessian,
                  bool structured, std::int64_t batch, std::int64_t group, int threads,
                  const py::object& progress, bool f32, int loss, const std::vector<int>& parts) {
    const wsb::Loss loss_kind = wsb_bind::make_loss(loss);
    const wsb::Model model = wsb_bind::make_model(weights, biases, act_codes, act_params, loss_kind);
    const wsb::InputView xv = wsb_bind::make_input(X);
    const wsb::Index C = model.d(model.n_layers());
    py::array held;  // keeps the label buffer alive
    const wsb::Labels y = wsb_bind::make_labels(labels, xv.rows, C, held);
    wsb::Options opt;
    opt.hessian = hessian;
    opt.structured = structured;
    opt.f32 = f32;
    opt.batch = batch;
    opt.group = group;
    opt.threads = threads;
    opt.loss = loss_kind;
    opt.parts = wsb_bind::make_parts(parts, model.n_layers());

    wsb::Moments result;
    wsb_bind::run_with_progress(
        [&](const std::atomic<bool>* cancel, std::atomic<std::int64_t>* done) {
            result = wsb::compute_moments(model, xv, y, opt, cancel, done);
        },
        progress, wsb::block_pairs(xv.rows, std::max<std::int64_t>(batch, 1)));
    // (trace per layer (L,), <H^{lm}, H^{lm}> summed over sample pairs (L, L), upper triangle,
    //  trace_abs (L,), norms (L, L) upper triangle): docs/numerics.md section 4 for the last two
    const auto L = static_cast<py::ssize_t>(result.L);
    py::array_t<double> trace(L), blocks({L, L}), trace_abs(L), norms({L, L});
    auto t = trace.mutable_unchecked<1>();
    auto q = blocks.mutable_unchecked<2>();
    auto ta = trace_abs.mutable_unchecked<1>();
    auto nu = norms.mutable_unchecked<2>();
    for (py::ssize_t l = 0; l < L; ++l) {
        t(l) = result.trace[static_cast<size_t>(l + 1)];
        ta(l) = result.trace_abs[static_cast<size_t>(l + 1)];
        for (py::ssize_t m = 0; m < L; ++m) {
            const auto at = static_cast<size_t>((l + 1) * (L + 1) + m + 1);
            q(l, m) = m >= l ? result.block_sq[at] : 0.0;
            nu(l, m) = m >= l ? result.norms[at] : 0.0;
        }
    }
    return py::make_tuple(trace, blocks, trace_abs, norms);
}

}  // namespace

void bind_moments(py::module_& m) {
    m.def("moments", &moments, py::arg("weights"), py::arg("biases"), py::arg("act_codes"), py::arg("act_params"),
          py::arg("X"), py::arg("labels"), py::arg("hessian"), py::arg("structured"), py::arg("batch"), py::arg("group"),
          py::arg("threads"), py::arg("progress") = py::none(), py::arg("f32") = false, py::arg("loss") = 0,
          py::arg("parts") = std::vector<int>(),
          R"doc(Unnormalised moments of the curvature per parameter block (layers 0..L-1):
(trace[l] = sum_n tr H_n^{ll}, blocks[l, m] = sum_{n,n'} <H_n^{lm}, H_n'^{lm}> for l <= m,
trace_abs[l] = sum_n |a~_{l-1}|^2 sum_k |(M_l)_kk|, norms[l, m] = sum_n nu_n^{lm} for l <= m:
the magnitudes of docs/numerics.md section 4 for the rounding allowances; for the Hessian of
mse and bce they include the rounding addition of section 5).

loss: 0 = softmax cross-entropy, 1 = squared error sum_k (z_k - y_k)^2, 2 = binary
cross-entropy with logits, each summed over samples (labels: class indices, one-hot, or
float64 rows (N, C): the probabilities or the targets y).

parts: empty (every parameter) or one code per layer: 0 all, 1 the weights only, 2 the bias
only, 3 none: the moments of the principal submatrix of those parameters.

Arguments are validated by wsbound_fast.bound(); this low-level entry point checks
shapes again and raises ValueError (TypeError for dtypes) on inconsistent input.)doc");
}
