// backward_reduce: per channel sum dy and sum dy * xhat (block kernel and the standalone pass).
//
// The block sums are sum dy and sum dy * (x - m), summed as the stats kernel does (stats.cc):
// in fp32 lanes for at most kFlushTerms terms, then in fp64, so each errs by about
// (kFlushTerms + 3) 2^-24 of the sum of its terms' magnitudes, as any fp32 implementation's
// would at best. invstd multiplies the merged sum once. A channel whose fp32 sums overflow
// (|dy (x - m)| beyond fp32's range) is summed again in fp64 (merge_backward_sums).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/backward_reduce.cc"
// clang-format off
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// clang-format on

#include "cpu/cpu.h"
#include "cpu/internal.h"
#include "cpu/ops-inl.h"
#include "cpu/reduce-inl.h"
#include "cpu/thread_pool.h"
#include "hwy/cache_control.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace bnorm::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// The terms of the backward sums: u = dy, v = x - m (reduce-inl.h walks the block). Masked-off
// lanes load 0 for dy, so they add nothing to either sum. E: the element type of dy and x.
template <class E>
struct BackwardReduceTerms {
  static constexpr bool kWideForShortChannels = false;
  const E* dy;
  const E* x;
  const float* m;

  float centre32(int64_t c) const { return m[c]; }
  double centre64(int64_t c) const { return static_cast<double>(m[c]); }
  template <class DF>
  hn::Vec<DF> centre32_vec(DF df, int64_t c) const {
    return hn::LoadU(df, m + c);
  }
  template <class DD>
  hn::Vec<DD> centre64_vec(DD dd, int64_t c) const {
    const hn::Rebind<float, DD> dh;
    return hn::PromoteTo(dd, hn::LoadU(dh, m + c));
  }
  template <class DF, class V>
  void terms32(DF df, int64_t at, V vc, V* u, V* v) const {
    *u = load_e(df, dy + at);
    *v = hn::Sub(load_e(df, x + at), vc);
  }
  template <class DF, class M, class V>
  void terms32_masked(DF df, M mk, int64_t at, V vc, V* u, V* v) const {
    *u = masked_load_e(df, mk, dy + at);
    *v = hn::Sub(masked_load_e(df, mk, x + at), vc);
  }
  template <class DD, class V>
  void terms64(DD dd, int64_t at, V vc, V* u, V* v) const {
    const hn::Rebind<float, DD> dh;
    *u = hn::PromoteTo(dd, load_e(dh, dy + at));
    *v = hn::Sub(hn::PromoteTo(dd, load_e(dh, x + at)), vc);
  }
  void terms_scalar(int64_t at, double centre, double* u, double* v) const {
    *u = static_cast<double>(to_f32(dy[at]));
    *v = static_cast<double>(to_f32(x[at])) - centre;
  }
  void prefetch(int64_t at, int64_t count) const {
    prefetch_row(dy + at, count);
    prefetch_row(x + at, count);
  }
};

// The fused ReLU's terms: u = dy * (y > 0), v = x - m. Masked-off lanes load y = 0.
template <class E>
struct BackwardReduceReluTerms : BackwardReduceTerms<E> {
  using BackwardReduceTerms<E>::dy;
  using BackwardReduceTerms<E>::x;
  const E* y;

  template <class DF, class V>
  void terms32(DF df, int64_t at, V vc, V* u, V* v) const {
    *u = relu_grad(df, load_e(df, y + at), load_e(df, dy + at));
    *v = hn::Sub(load_e(df, x + at), vc);
  }
  template <class DF, class M, class V>
  void terms32_masked(DF df, M mk, int64_t at, V vc, V* u, V* v) const {
    *u = relu_grad(df, masked_load_e(df, mk, y + at), masked_load_e(df, mk, dy + at));
    *v = hn::Sub(masked_load_e(df, mk, x + at), vc);
  }
  template <class DD, class V>
  void terms64(DD dd, int64_t at, V vc, V* u, V* v) const {
    const hn::Rebind<float, DD> dh;
    const auto g = relu_grad(dh, load_e(dh, y + at), load_e(dh, dy + at));
    *u = hn::PromoteTo(dd, g);
    *v = hn::Sub(hn::PromoteTo(dd, load_e(dh, x + at)), vc);
  }
  void terms_scalar(int64_t at, double centre, double* u, double* v) const {
    *u = to_f32(y[at]) > 0 ? static_cast<double>(to_f32(dy[at])) : 0.0;
    *v = static_cast<double>(to_f32(x[at])) - centre;
  }
  void prefetch(int64_t at, int64_t count) const {
    BackwardReduceTerms<E>::prefetch(at, count);
    prefetch_row(y + at, count);
  }
};

template <class E>
void backward_reduce_block(const Plan& p, const E* dy, const E* x, const E* y, const Block& b,
                           const float* m, double* partials) {
  if (y != nullptr) {
    reduce_block(p, BackwardReduceReluTerms<E>{{dy, x, m}, y}, b, partials);
  } else {
    reduce_block(p, BackwardReduceTerms<E>{dy, x, m}, b, partials);
  }
}
#define BNORM_INSTANTIATE(E)                                                              \
  template void backward_reduce_block<E>(const Plan&, const E*, const E*, const E*,       \
                                         const Block&, const float*, double*);
BNORM_INSTANTIATE(float)
BNORM_INSTANTIATE(bfloat16)
BNORM_INSTANTIATE(float16)
#undef BNORM_INSTANTIATE

namespace {

struct ReduceJob {
  const Plan* plan;
  const float* dy;
  const float* x;
  const float* m;
  double* partials;
  double* sum0;
  double* sum1;
};

void reduce_task(void* ctx, int t, int n) {
  const ReduceJob& job = *static_cast<const ReduceJob*>(ctx);
  const Plan& p = *job.plan;
  int64_t begin, end;
  split_range(0, static_cast<int64_t>(p.blocks.size()), t, n, &begin, &end);
  for (int64_t k = begin; k < end; ++k)
    backward_reduce_block<float>(p, job.dy, job.x, nullptr, p.blocks[k], job.m, job.partials);
}

void merge_task(void* ctx, int t, int n) {
  const ReduceJob& job = *static_cast<const ReduceJob*>(ctx);
  int64_t begin, end;
  split_range(0, job.plan->c, t, n, &begin, &end);
  merge_backward_sums<float>(*job.plan, job.dy, job.x, nullptr, job.m, job.partials, begin, end, true,
                      job.sum0, job.sum1);
}

}  // namespace

void backward_reduce_pass(const Geometry& g, const float* dy, const float* x, const double* mean,
                          const double* invstd, double* sum_dy, double* sum_dy_xhat) {
  const std::shared_ptr<const Plan> plan = get_plan(g, 2, true);
  Workspace& ws = thread_workspace();
  double* partials = ws.partial_data(plan->partial_doubles);
  // The kernels shift by an fp32 mean; the fp64 remainder is a per-channel constant whose
  // contribution, sum dy * (m32 - mean), is added after the merge.
  float* m = ws.param_data(g.c);
  for (int64_t c = 0; c < g.c; ++c) m[c] = static_cast<float>(mean[c]);
  ReduceJob job{plan.get(), dy, x, m, partials, sum_dy, sum_dy_xhat};
  const int threads = call_threads(*plan);
  ThreadPool::instance().run(
      threads, block_slots(static_cast<int64_t>(plan->blocks.size()), threads), &reduce_task, &job);
  ThreadPool::instance().run(threads, &merge_task, &job);
  for (int64_t c = 0; c < g.c; ++c)
    sum_dy_xhat[c] =
        (sum_dy_xhat[c] + sum_dy[c] * (static_cast<double>(m[c]) - mean[c])) * invstd[c];
}

}  // namespace bnorm::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace bnorm::cpu {

HWY_EXPORT(backward_reduce_pass);

void backward_reduce(const Geometry& g, const float* dy, const float* x, const double* mean,
                     const double* invstd, double* sum_dy, double* sum_dy_xhat) {
  HWY_DYNAMIC_DISPATCH(backward_reduce_pass)(g, dy, x, mean, invstd, sum_dy, sum_dy_xhat);
}

}  // namespace bnorm::cpu
#endif  // HWY_ONCE
