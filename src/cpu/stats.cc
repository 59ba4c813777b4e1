// stats: per-channel mean and biased variance (block kernel and the standalone pass).
//
// Numerics: each element is shifted by the channel's pivot (its first element) and the shifted
// values d and d^2 are summed in fp64 lanes, so squares of |x| up to fp32's maximum cannot
// overflow and a constant channel sums exact zeros. Block sums are added in block order
// (finalize.cc: merge_stats).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/stats.cc"
// clang-format off
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// clang-format on

#include <type_traits>

#include "cpu/cpu.h"
#include "cpu/internal.h"
#include "cpu/ops-inl.h"
#include "cpu/thread_pool.h"
#include "hwy/cache_control.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace bnorm::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

void stats_block(const Plan& p, const float* x, const Block& b, const double* pivot,
                 double* partials) {
  const hn::ScalableTag<double> dd;
  const hn::Rebind<float, decltype(dd)> dh;  // half-width floats, promoted to fp64
  const int64_t nd = static_cast<int64_t>(hn::Lanes(dd));
  const int64_t width = b.c1 - b.c0;
  double* out = partials + b.slot;

  if (!p.channels_last) {
    const int64_t len = b.j1 - b.j0;
    for (int64_t c = b.c0; c < b.c1; ++c) {
      const double pv = pivot[c];
      const auto vp = hn::Set(dd, pv);
      auto s1a = hn::Zero(dd), s2a = hn::Zero(dd), s1b = hn::Zero(dd), s2b = hn::Zero(dd);
      double t1 = 0, t2 = 0;
      for (int64_t i = b.i0; i < b.i1; ++i) {
        const float* row = x + (i * p.c + c) * p.s + b.j0;
        int64_t k = 0;
        for (; k + 2 * nd <= len; k += 2 * nd) {
          const auto d0 = hn::Sub(hn::PromoteTo(dd, hn::LoadU(dh, row + k)), vp);
          const auto d1 = hn::Sub(hn::PromoteTo(dd, hn::LoadU(dh, row + k + nd)), vp);
          s1a = hn::Add(s1a, d0);
          s2a = hn::MulAdd(d0, d0, s2a);
          s1b = hn::Add(s1b, d1);
          s2b = hn::MulAdd(d1, d1, s2b);
        }
        for (; k + nd <= len; k += nd) {
          const auto d0 = hn::Sub(hn::PromoteTo(dd, hn::LoadU(dh, row + k)), vp);
          s1a = hn::Add(s1a, d0);
          s2a = hn::MulAdd(d0, d0, s2a);
        }
        for (; k < len; ++k) {
          const double d = static_cast<double>(row[k]) - pv;
          t1 += d;
          t2 += d * d;
        }
      }
      const double s1 = hn::GetLane(hn::SumOfLanes(dd, hn::Add(s1a, s1b))) + t1;
      const double s2 = hn::GetLane(hn::SumOfLanes(dd, hn::Add(s2a, s2b))) + t2;
      out[c - b.c0] = s1;
      out[width + c - b.c0] = s2;
    }
    return;
  }

  // Channels-last: a tile of channels at a time, its accumulators in registers, down all rows
  // of the block (stride C). Accumulators in memory would cost a load and a store per vector and
  // stall on 4 KiB aliasing between those stores and the loads of x.
  auto tile = [&](int64_t k0, auto lanes_tag) {
    constexpr int kVecs = decltype(lanes_tag)::value;
    hn::Vec<decltype(dd)> vp[kVecs], s1[kVecs], s2[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      vp[v] = hn::LoadU(dd, pivot + k0 + v * nd);
      s1[v] = hn::Zero(dd);
      s2[v] = hn::Zero(dd);
    }
    const float* row = x + b.i0 * p.c + k0;
    for (int64_t r = b.i0; r < b.i1; ++r, row += p.c) {
      // The first tile pulls whole rows ahead into the cache: the tiles walk down rows with a
      // stride of C floats, which hardware prefetchers do not follow across 4 KiB pages.
      if (k0 == b.c0 && r + kPrefetchRows < b.i1) prefetch_row(row + kPrefetchRows * p.c, width);
      for (int v = 0; v < kVecs; ++v) {
        const auto d = hn::Sub(hn::PromoteTo(dd, hn::LoadU(dh, row + v * nd)), vp[v]);
        s1[v] = hn::Add(s1[v], d);
        s2[v] = hn::MulAdd(d, d, s2[v]);
      }
    }
    for (int v = 0; v < kVecs; ++v) {
      hn::StoreU(s1[v], dd, out + (k0 - b.c0) + v * nd);
      hn::StoreU(s2[v], dd, out + width + (k0 - b.c0) + v * nd);
    }
  };
  int64_t k = b.c0;
  for (; k + 4 * nd <= b.c1; k += 4 * nd) tile(k, std::integral_constant<int, 4>());
  for (; k + nd <= b.c1; k += nd) tile(k, std::integral_constant<int, 1>());
  for (; k < b.c1; ++k) {
    const double pv = pivot[k];
    double t1 = 0, t2 = 0;
    for (int64_t r = b.i0; r < b.i1; ++r) {
      const double d = static_cast<double>(x[r * p.c + k]) - pv;
      t1 += d;
      t2 += d * d;
    }
    out[k - b.c0] = t1;
    out[width + k - b.c0] = t2;
  }
}

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
  merge_stats(*job.plan, job.partials, begin, end, job.pivot, job.mean, job.var);
}

}  // namespace

void stats_pass(const Geometry& g, const float* x, double* mean, double* var) {
  const std::shared_ptr<const Plan> plan = get_plan(g, 1);
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
