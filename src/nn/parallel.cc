// nn's parallel_for on the library's one thread pool (src/cpu/thread_pool.h), so that the kernels
// and the layers share one set of workers and one thread count (bnorm::num_threads(), which
// BNORM_NUM_THREADS sets). The pool runs a job from inside another job, or while another
// caller's job runs, on the calling thread alone: nesting and concurrent use stay serial and safe.
#include "parallel.h"

#include <algorithm>

#include "bnorm/batch_norm.h"
#include "cpu/thread_pool.h"

namespace bnorm::nn::detail {
namespace {

struct RangeJob {
  const std::function<void(int64_t, int64_t)>* fn;
  int64_t n;
};

void run_range(void* ctx, int chunk, int chunks) {
  const auto* job = static_cast<const RangeJob*>(ctx);
  const int64_t b = job->n * chunk / chunks, e = job->n * (chunk + 1) / chunks;
  if (b < e) (*job->fn)(b, e);
}

}  // namespace

int nn_threads() { return bnorm::num_threads(); }

void set_nn_threads(int n) { bnorm::set_num_threads(n); }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int threads = nn_threads();
  // A few chunks per thread balance the load when a core is busy with something else; the pool
  // hands them out one by one.
  const int64_t chunks = std::min<int64_t>({int64_t{4} * threads, (n + grain - 1) / grain, 1024});
  if (threads <= 1 || chunks <= 1) {
    fn(0, n);
    return;
  }
  RangeJob job{&fn, n};
  cpu::ThreadPool::instance().run(threads, static_cast<int>(chunks), &run_range, &job);
}

}  // namespace bnorm::nn::detail
