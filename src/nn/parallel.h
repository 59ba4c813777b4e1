// parallel_for for the nn layers' non-GEMM work and for splitting GEMMs (not installed), on the
// library's one thread pool (src/cpu/thread_pool.h): the caller's thread takes part, a call from
// inside a task or while another caller's job runs is serial, so nesting and concurrent use are
// safe. One thread count governs the kernels and the layers: bnorm::num_threads().
#ifndef BNORM_SRC_NN_PARALLEL_H_
#define BNORM_SRC_NN_PARALLEL_H_

#include <cstdint>
#include <functional>

namespace bnorm::nn::detail {

// Threads the nn layers use (>= 1): bnorm::num_threads().
int nn_threads();
// bnorm::set_num_threads(n) (n <= 0: the default, BNORM_NUM_THREADS or the cores).
void set_nn_threads(int n);

// Splits [0, n) into at most nn_threads() contiguous ranges of at least `grain` items and runs
// fn(begin, end) on each, concurrently; returns when all are done.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace bnorm::nn::detail

#endif  // BNORM_SRC_NN_PARALLEL_H_
