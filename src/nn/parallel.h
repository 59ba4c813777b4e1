// A tiny persistent thread helper for the nn layers' non-GEMM work and for splitting GEMMs
// (not installed). No OpenMP: one process-wide pool of (threads - 1) workers; the caller's thread
// always takes the first share. A call made while the pool is busy (another thread's call, or a
// call from inside a task) simply runs serially, so nesting and concurrent use are safe.
#ifndef BNORM_SRC_NN_PARALLEL_H_
#define BNORM_SRC_NN_PARALLEL_H_

#include <cstdint>
#include <functional>

namespace bnorm::nn::detail {

// Threads the nn layers use (>= 1).
int nn_threads();
// Sets them (n <= 0: the hardware's count). Starts or stops workers as needed.
void set_nn_threads(int n);

// Splits [0, n) into at most nn_threads() contiguous ranges of at least `grain` items and runs
// fn(begin, end) on each, concurrently; returns when all are done.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace bnorm::nn::detail

#endif  // BNORM_SRC_NN_PARALLEL_H_
