// Helpers shared by the binding files (bind_moments.cpp, bind_hvp.cpp, ...): conversion of the
// Python arguments into core types, and running core work with the GIL released while
// the calling thread polls for Ctrl-C.
#pragma once

#include "wsbound/model.hpp"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace wsb_bind {

namespace py = pybind11;

using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

// The loss code of the trailing `loss` argument (wsb::Loss; python/wsbound_fast/_problem/losses.py).
inline wsb::Loss make_loss(int code) {
    if (code < 0 || code > static_cast<int>(wsb::Loss::Bce))
        throw std::invalid_argument("loss: unknown code " + std::to_string(code) + " (0 = cross_entropy, 1 = mse, 2 = bce)");
    return static_cast<wsb::Loss>(code);
}

// Parameter-subset codes (Options::parts): empty, or one of 0..3 per layer.
inline std::vector<int> make_parts(const std::vector<int>& parts, wsb::Index n_layers) {
    if (parts.empty()) return parts;
    if (static_cast<wsb::Index>(parts.size()) != n_layers)
        throw std::invalid_argument("parts: one code per layer (" + std::to_string(n_layers) + "); got " +
                                    std::to_string(parts.size()));
    for (int p : parts)
        if (p < 0 || p > 3) throw std::invalid_argument("parts: codes are 0 (all), 1 (weights), 2 (bias), 3 (none)");
    return parts;
}

// The model, validated for its loss (cross-entropy needs C >= 2 classes).
inline wsb::Model make_model(const py::list& weights, const py::list& biases, const std::vector<int>& act_codes,
                             const std::vector<double>& act_params, wsb::Loss loss = wsb::Loss::CrossEntropy) {
    if (py::len(weights) != py::len(biases)) throw std::invalid_argument("layers: one bias entry per weight");
    if (act_codes.size() != act_params.size()) throw std::invalid_argument("activation: codes and params differ in length");
    wsb::Model model;
    for (size_t l = 0; l < py::len(weights); ++l) {
        // Weights are small (O(P)); they are copied once into float64 row-major storage.
        const auto W = weights[l].cast<DoubleArray>();
        if (W.ndim() != 2) throw std::invalid_argument("layers[" + std::to_string(l) + "]: W must be 2-D");
        // (copied bytewise: the array may sit at an address that is no multiple of 8)
        model.W.emplace_back(W.shape(0), W.shape(1));
        std::memcpy(model.W.back().data(), W.data(), static_cast<size_t>(W.size()) * sizeof(double));
        if (biases[l].is_none()) {
            model.b.emplace_back();
            model.has_bias.push_back(false);
        } else {
            const auto b = biases[l].cast<DoubleArray>();
            if (b.ndim() != 1) throw std::invalid_argument("layers[" + std::to_string(l) + "]: b must be 1-D");
            model.b.emplace_back(b.shape(0));
            std::memcpy(model.b.back().data(), b.data(), static_cast<size_t>(b.size()) * sizeof(double));
            model.has_bias.push_back(true);
        }
    }
    for (size_t i = 0; i < act_codes.size(); ++i) {
        if (act_codes[i] < 0 || act_codes[i] > static_cast<int>(wsb::Act::LeakyRelu))
            throw std::invalid_argument("activation: unknown code " + std::to_string(act_codes[i]));
        model.act.push_back({static_cast<wsb::Act>(act_codes[i]), act_params[i]});
    }
    model.validate(loss);
    return model;
}

// X is read in place (float32 or float64, any strides): no copy at the boundary.
inline wsb::InputView make_input(const py::array& X) {
    if (X.ndim() != 2) throw std::invalid_argument("X must be 2-D");
    wsb::InputView v;
    if (X.dtype().equal(py::dtype::of<double>())) {
        v.is_float32 = false;
    } else if (X.dtype().equal(py::dtype::of<float>())) {
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

// Labels as class indices (contiguous int64, (N,)) or probability rows (contiguous float64,
// (N, C)).  `held` keeps the label buffer alive while the view is used.
inline wsb::Labels make_labels(const py::array& labels, wsb::Index n_samples, wsb::Index n_classes, py::array& held) {
    wsb::Labels y;
    if (labels.ndim() == 1) {
        if (!labels.dtype().equal(py::dtype::of<std::int64_t>()) || !(labels.flags() & py::array::c_style))
            throw py::type_error("y: class indices must be a contiguous int64 array");
        if (labels.shape(0) != n_samples) throw std::invalid_argument("y: one label per sample is required");
        held = labels;
        y.index = static_cast<const std::int64_t*>(held.data());
    } else if (labels.ndim() == 2) {
        if (!labels.dtype().equal(py::dtype::of<double>()) || !(labels.flags() & py::array::c_style))
            throw py::type_error("y: soft labels must be a contiguous float64 array");
        if (labels.shape(0) != n_samples || labels.shape(1) != n_classes)
            throw std::invalid_argument("y: soft labels must have shape (N, C)");
        held = labels;
        y.soft = static_cast<const double*>(held.data());
    } else {
        throw std::invalid_argument("y must be 1-D (indices) or 2-D (probability rows)");
    }
    return y;
}

// Runs work(cancel) on a worker thread with the GIL released; the calling thread polls for
// signals every 100 ms and, on Ctrl-C, raises the cancel flag (the core stops between
// blocks) and then re-raises KeyboardInterrupt.  Exceptions of the work are rethrown.
// poll() (GIL held) runs at each poll too, e.g. to report progress; if it throws a Python
// exception, the work is cancelled and that exception propagates.  Call with the GIL held.
struct NoPoll {
    void operator()() const {}
};

template <class Work, class Poll = NoPoll>
void run_released(Work&& work, Poll&& poll = Poll()) {
    std::atomic<bool> cancel{false};
    bool interrupted = false;
    std::exception_ptr error;
    {
        py::gil_scoped_release release;
        std::mutex mutex;
        std::condition_variable cv;
        bool done = false;
        std::thread runner([&] {
            try {
                work(&cancel);
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
                if (!stop) {
                    try {
                        poll();
                    } catch (py::error_already_set& e) {
                        e.restore();  // re-raised below, once the work has stopped
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
}

// run_released for work(cancel, done) that counts finished block pairs in *done:
// progress(done, total) (unless None) from the polling thread whenever the count moved, and
// once at the end with the final count.
template <class Work>
void run_with_progress(Work&& work, const py::object& progress, std::int64_t total) {
    std::atomic<std::int64_t> done{0};
    std::int64_t reported = -1;
    auto report = [&] {
        const std::int64_t now = done.load(std::memory_order_relaxed);
        if (!progress.is_none() && now != reported) {
            reported = now;
            progress(now, total);
        }
    };
    run_released([&](const std::atomic<bool>* cancel) { work(cancel, &done); }, report);
    report();
}

}  // namespace wsb_bind
