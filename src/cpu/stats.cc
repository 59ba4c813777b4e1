// stats: per-channel mean and biased variance (block kernel and the standalone pass).
//
// Numerics: each element is shifted by the channel's pivot (its first element, so a constant
// channel sums exact zeros) and the shifted values d and d^2 are summed in fp32 vector lanes for
// at most K = kFlushTerms terms per lane, then added into fp64 accumulators. A lane's fp32 sum
// of K terms errs by at most (K + 1) 2^-24 of the sum of their magnitudes, so with
// r = |mean - pivot| / std the variance errs by at most (K + 3) 2^-24 (1 + 2r + 3r^2) of itself
// (docs/design.md derives it). merge_stats (merge.cc) accepts a channel
// only when r <= kMaxPivotDistance and its sums are finite; any other channel (an outlier
// pivot, or |x| so large that d^2 overflows fp32) is summed again in fp64 about its estimated
// mean, so the bound holds for every input. Block sums are added in block order.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/stats.cc"
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


// The terms of the statistics: u = v = x - pivot (reduce-inl.h walks the block). E: the
// element type of x (load_e widens it exactly).
template <class E>
struct StatsTerms {
  static constexpr bool kWideForShortChannels = true;
  const E* x;
  const double* pivot;

  // The pivots are elements of x, so their fp32 conversion is exact.
  float centre32(int64_t c) const { return static_cast<float>(pivot[c]); }
  double centre64(int64_t c) const { return pivot[c]; }
  // Channels-last: the pivots are the first row of x.
  template <class DF>
  hn::Vec<DF> centre32_vec(DF df, int64_t c) const {
    return load_e(df, x + c);
  }
  template <class DD>
  hn::Vec<DD> centre64_vec(DD dd, int64_t c) const {
    return hn::LoadU(dd, pivot + c);
  }
  template <class DF, class V>
  void terms32(DF df, int64_t at, V vc, V* u, V* v) const {
    *u = *v = hn::Sub(load_e(df, x + at), vc);
  }
  template <class DF, class M, class V>
  void terms32_masked(DF df, M mk, int64_t at, V vc, V* u, V* v) const {
    *u = *v = hn::IfThenElseZero(mk, hn::Sub(masked_load_e(df, mk, x + at), vc));
  }
  template <class DD, class V>
  void terms64(DD dd, int64_t at, V vc, V* u, V* v) const {
    const hn::Rebind<float, DD> dh;
    *u = *v = hn::Sub(hn::PromoteTo(dd, load_e(dh, x + at)), vc);
  }
  void terms_scalar(int64_t at, double centre, double* u, double* v) const {
    *u = *v = static_cast<double>(to_f32(x[at])) - centre;
  }
  void prefetch(int64_t at, int64_t count) const { prefetch_row(x + at, count); }
};

template <class E>
void stats_block(const Plan& p, const E* x, const Block& b, const double* pivot,
                 double* partials) {
  reduce_block(p, StatsTerms<E>{x, pivot}, b, partials);
}
template void stats_block<float>(const Plan&, const float*, const Block&, const double*, double*);
template void stats_block<bfloat16>(const Plan&, const bfloat16*, const Block&, const double*,
                                    double*);
template void stats_block<float16>(const Plan&, const float16*, const Block&, const double*,
                                   double*);

namespace {

struct StatsJob {
  const Plan* plan;
  const float* x;
  const double* pivot;
  double* partials;
  double* mean;
  double* var;
};

void stats_task(void* ctx, int t, int n) {
  const StatsJob& job = *static_cast<const StatsJob*>(ctx);
  const Plan& p = *job.plan;
  int64_t begin, end;
  split_range(0, static_cast<int64_t>(p.blocks.size()), t, n, &begin, &end);
  for (int64_t k = begin; k < end; ++k) stats_block(p, job.x, p.blocks[k], job.pivot, job.partials);
}

void merge_task(void* ctx, int t, int n) {
  const StatsJob& job = *static_cast<const StatsJob*>(ctx);
  int64_t begin, end;
  split_range(0, job.plan->c, t, n, &begin, &end);
  merge_stats(*job.plan, job.x, job.partials, begin, end, job.pivot, job.mean, job.var);
}

}  // namespace

void stats_pass(const Geometry& g, const float* x, double* mean, double* var) {
  const std::shared_ptr<const Plan> plan = get_plan(g, 1, true);
  Workspace& ws = thread_workspace();
  double* pivot = ws.channel_data(g.c);
  for (int64_t c = 0; c < g.c; ++c) pivot[c] = channel_pivot(*plan, x, c);
  StatsJob job{plan.get(), x, pivot, ws.partial_data(plan->partial_doubles), mean, var};
  const int threads = call_threads(*plan);
  ThreadPool::instance().run(
      threads, block_slots(static_cast<int64_t>(plan->blocks.size()), threads), &stats_task, &job);
  ThreadPool::instance().run(threads, &merge_task, &job);
}

}  // namespace bnorm::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace bnorm::cpu {

HWY_EXPORT(stats_pass);

void stats(const Geometry& g, const float* x, double* mean, double* var) {
  HWY_DYNAMIC_DISPATCH(stats_pass)(g, x, mean, var);
}

}  // namespace bnorm::cpu
#endif  // HWY_ONCE
