// The only file that includes pybind11: converts and checks arguments with the GIL held,
// then releases it for the pure C++ engine, polling for Ctrl-C while it runs.
#include "wsbound/engine.hpp"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

wsb::Model make_model(const py::list& weights, const py::list& biases, const std::vector<int>& act_codes,
                      const std::vector<double>& act_params) {
    if (py::len(weights) != py::len(biases)) throw std::invalid_argument("layers: one bias entry per weight");
    if (act_codes.size() != act_params.size()) throw std::invalid_argument("activation: codes and params differ in length");
    wsb::Model model;
    for (size_t l = 0; l < py::len(weights); ++l) {
        // Weights are small (O(P)); they are copied once into float64 row-major storage.
        const auto W = weights[l].cast<DoubleArray>();
        if (W.ndim() != 2) throw std::invalid_argument("layers[" + std::to_string(l) + "]: W must be 2-D");
        model.W.emplace_back(Eigen::Map<const wsb::RowMat>(W.data(), W.shape(0), W.shape(1)));
        if (biases[l].is_none()) {
            model.b.emplace_back();
            model.has_bias.push_back(false);
        } else {
            const auto b = biases[l].cast<DoubleArray>();
            if (b.ndim() != 1) throw std::invalid_argument("layers[" + std::to_string(l) + "]: b must be 1-D");
            model.b.emplace_back(Eigen::Map<const wsb::Vec>(b.data(), b.shape(0)));
            model.has_bias.push_back(true);
        }
    }
    for (size_t i = 0; i < act_codes.size(); ++i) {
        if (act_codes[i] < 0 || act_codes[i] > static_cast<int>(wsb::Act::LeakyRelu))
            throw std::invalid_argument("activation: unknown code " + std::to_string(act_codes[i]));
        model.act.push_back({static_cast<wsb::Act>(act_codes[i]), act_params[i]});
    }
    model.validate();
    return model;
}

// X is read in place (float32 or float64, any strides): no copy at the boundary.
wsb::InputView make_input(const py::array& X) {
    if (X.ndim() != 2) throw std::invalid_argument("X must be 2-D");
    wsb::InputView v;
    if (X.dtype().is(py::dtype::of<double>())) {
        v.is_float32 = false;
    } else if (X.dtype().is(py::dtype::of<float>())) {
        v.is_float32 = true;
    } else {
        throw py::type_error("X must be a float32 or float64 array");
    }
    const auto item = static_cast<py::ssize_t>(X.itemsize());
    if (X.strides(0) % item != 0 || X.strides(1) % item != 0)
        throw std::invalid_argument("X: strides must be whole elements");
    v.data = X.data();
    v.rows = X.shape(0);
    v.cols = X.shape(1);
    v.row_stride = X.strides(0) / item;
    v.col_stride = X.strides(1) / item;
    return v;
}

py::tuple moments(const py::list& weights, const py::list& biases, const std::vector<int>& act_codes,
                  const std::vector<double>& act_params, const py::array& X, const py::array& labels, bool hessian,
                  bool structured, std::int64_t batch, std::int64_t group, int threads,
                  const py::object& progress) {
    const wsb::Model model = make_model(weights, biases, act_codes, act_params);
    const wsb::InputView xv = make_input(X);
    const wsb::Index C = model.d(model.n_layers());
    wsb::Labels y;
    py::array held;  // keeps the label buffer alive
    if (labels.ndim() == 1) {
        if (!labels.dtype().is(py::dtype::of<std::int64_t>()) || !(labels.flags() & py::array::c_style))
            throw py::type_error("y: class indices must be a contiguous int64 array");
        if (labels.shape(0) != xv.rows) throw std::invalid_argument("y: one label per sample is required");
        held = labels;
        y.index = static_cast<const std::int64_t*>(held.data());
    } else if (labels.ndim() == 2) {
        if (!labels.dtype().is(py::dtype::of<double>()) || !(labels.flags() & py::array::c_style))
            throw py::type_error("y: soft labels must be a contiguous float64 array");
        if (labels.shape(0) != xv.rows || labels.shape(1) != C)
            throw std::invalid_argument("y: soft labels must have shape (N, C)");
        held = labels;
        y.soft = static_cast<const double*>(held.data());
    } else {
        throw std::invalid_argument("y must be 1-D (indices) or 2-D (probability rows)");
    }
    wsb::Options opt;
    opt.hessian = hessian;
    opt.structured = structured;
    opt.batch = batch;
    opt.group = group;
    opt.threads = threads;

    std::atomic<bool> cancel{false};
    std::atomic<std::int64_t> pairs_done{0};
    const std::int64_t total_pairs = wsb::block_pairs(xv.rows, std::max<std::int64_t>(batch, 1));
    std::int64_t reported = -1;
    bool interrupted = false;
    wsb::Moments result;
    std::exception_ptr error;
    {
        py::gil_scoped_release release;
        std::mutex mutex;
        std::condition_variable cv;
        bool done = false;
        std::thread runner([&] {
            try {
                result = wsb::compute_moments(model, xv, y, opt, &cancel, &pairs_done);
            } catch (...) {
                error = std::current_exception();
            }
            std::lock_guard<std::mutex> lock(mutex);
            done = true;
            cv.notify_one();
        });
        std::unique_lock<std::mutex> lock(mutex);
        while (!cv.wait_for(lock, std::chrono::milliseconds(100), [&] { return done; })) {
            if (interrupted) continue;
            lock.unlock();
            {
                py::gil_scoped_acquire acquire;
                bool stop = PyErr_CheckSignals() != 0;  // Ctrl-C: the error stays set for this thread
                const std::int64_t now = pairs_done.load(std::memory_order_relaxed);
                if (!stop && !progress.is_none() && now != reported) {
                    reported = now;
                    try {
                        progress(now, total_pairs);
                    } catch (py::error_already_set& e) {
                        e.restore();  // the callback's exception is re-raised below
                        stop = true;
                    }
                }
                if (stop) {
                    interrupted = true;
                    cancel.store(true);
                }
            }
            lock.lock();
        }
        lock.unlock();
        runner.join();
    }
    if (interrupted) throw py::error_already_set();
    if (error) std::rethrow_exception(error);
    if (!progress.is_none() && reported != total_pairs) progress(total_pairs, total_pairs);
    // (trace per layer (L,), <H^{lm}, H^{lm}> summed over sample pairs (L, L), upper triangle)
    const auto L = static_cast<py::ssize_t>(result.L);
    py::array_t<double> trace(L), blocks({L, L});
    auto t = trace.mutable_unchecked<1>();
    auto q = blocks.mutable_unchecked<2>();
    for (py::ssize_t l = 0; l < L; ++l) {
        t(l) = result.trace[static_cast<size_t>(l + 1)];
        for (py::ssize_t m = 0; m < L; ++m)
            q(l, m) = m >= l ? result.block_sq[static_cast<size_t>((l + 1) * (L + 1) + m + 1)] : 0.0;
    }
    return py::make_tuple(trace, blocks);
}

}  // namespace

#ifndef WSB_MODULE_NAME
#define WSB_MODULE_NAME _core
#endif

PYBIND11_MODULE(WSB_MODULE_NAME, m) {
    m.doc() = "wsbound_fast compiled core: exact tr(H) and tr(H^2) of MLP cross-entropy curvature";
    py::register_exception<wsb::Cancelled>(m, "Cancelled", PyExc_KeyboardInterrupt);
    m.def("moments", &moments, py::arg("weights"), py::arg("biases"), py::arg("act_codes"), py::arg("act_params"),
          py::arg("X"), py::arg("labels"), py::arg("hessian"), py::arg("structured"), py::arg("batch"), py::arg("group"), py::arg("threads"),
          py::arg("progress") = py::none(),
          R"doc(Unnormalised moments of the curvature per parameter block (layers 0..L-1):
(trace[l] = sum_n tr H_n^{ll}, blocks[l, m] = sum_{n,n'} <H_n^{lm}, H_n'^{lm}> for l <= m).

Arguments are validated by wsbound_fast.bound(); this low-level entry point checks
shapes again and raises ValueError (TypeError for dtypes) on inconsistent input.)doc");
}
