// Binding of the exact curvature-vector product (cpp/wsbound/hvp.hpp).
#include "bind_common.hpp"
#include "wsbound/hvp.hpp"

namespace py = pybind11;

namespace {

py::array_t<double> hvp(const py::list& weights, const py::list& biases, const std::vector<int>& act_codes,
                        const std::vector<double>& act_params, const py::array& X, const py::array& labels,
                        const py::array& V, bool hessian, std::int64_t batch, int threads, int loss) {
    const wsb::Loss loss_kind = wsb_bind::make_loss(loss);
    const wsb::Model model = wsb_bind::make_model(weights, biases, act_codes, act_params, loss_kind);
    const wsb::InputView xv = wsb_bind::make_input(X);
    py::array held;
    const wsb::Labels y = wsb_bind::make_labels(labels, xv.rows, model.d(model.n_layers()), held);
    if (!V.dtype().equal(py::dtype::of<double>()) || !(V.flags() & py::array::c_style))
        throw py::type_error("v: must be a C-contiguous float64 array");
    if (V.ndim() != 2) throw std::invalid_argument("v: must be 2-D (k, P)");
    const wsb::Index P = wsb::n_params(model);
    if (V.shape(1) != P) throw std::invalid_argument("v: rows must have length P = " + std::to_string(P));
    const wsb::Index k = V.shape(0);
    if (k < 1) throw std::invalid_argument("v: at least one vector is required");
    py::array_t<double> out({static_cast<py::ssize_t>(k), static_cast<py::ssize_t>(P)});
    const double* vin = static_cast<const double*>(V.data());
    double* vout = out.mutable_data();
    wsb::Options opt;
    opt.hessian = hessian;
    opt.batch = batch;
    opt.threads = threads;
    opt.loss = loss_kind;
    wsb_bind::run_released([&](const std::atomic<bool>* cancel) { wsb::hvp(model, xv, y, vin, k, vout, opt, cancel); });
    return out;
}

}  // namespace

void bind_hvp(py::module_& m) {
    m.def("hvp", &hvp, py::arg("weights"), py::arg("biases"), py::arg("act_codes"), py::arg("act_params"), py::arg("X"),
          py::arg("labels"), py::arg("V"), py::arg("hessian"), py::arg("batch"), py::arg("threads"), py::arg("loss") = 0,
          R"doc(Unnormalised curvature-vector products: out[j] = sum_n H_n V[j] (or the GGN), V of shape (k, P).

loss: 0 = softmax cross-entropy, 1 = mse, 2 = bce with logits (sum form), as in moments().

Arguments are validated by wsbound_fast.hvp(); this low-level entry point checks shapes
again and raises ValueError (TypeError for dtypes) on inconsistent input.)doc");
}
