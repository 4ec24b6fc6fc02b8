// A small fork-join helper: run task(t, worker) for t in [0, n) on up to `threads` workers
// (the moments engine and the curvature-vector product share it).
#pragma once

#include "model.hpp"

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace wsb {

// Worker 0 is the caller.  Which worker runs which task varies; each task's result must
// depend only on t.  The first exception is rethrown; Cancelled once *cancel is set.
template <class Task>
void parallel_tasks(Index n, int threads, const std::atomic<bool>* cancel, Task&& task) {
    std::atomic<Index> next{0};
    std::exception_ptr error;
    std::mutex error_mutex;
    auto work = [&](int worker) {
        for (;;) {
            if (cancel != nullptr && cancel->load(std::memory_order_relaxed)) return;
            const Index t = next.fetch_add(1);
            if (t >= n) return;
            try {
                task(t, worker);
            } catch (...) {
                std::lock_guard<std::mutex> lock(error_mutex);
                if (!error) error = std::current_exception();
                next.store(n);
            }
        }
    };
    const int n_workers = static_cast<int>(std::min<Index>(std::max(threads, 1), std::max<Index>(n, 1)));
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(std::max(n_workers - 1, 0)));
    for (int w = 1; w < n_workers; ++w) pool.emplace_back(work, w);
    work(0);
    for (auto& th : pool) th.join();
    if (error) std::rethrow_exception(error);
    if (cancel != nullptr && cancel->load()) throw Cancelled();
}

}  // namespace wsb
