// stats: per-channel mean and biased variance (block kernel and the standalone pass).
//
// Numerics: each element is shifted by the channel's pivot (its first element, so a constant
// channel sums exact zeros) and the shifted values d and d^2 are summed in fp32 vector lanes for
// at most K = kFlushTerms terms per lane, then added into fp64 accumulators. A lane's fp32 sum
// of K terms errs by at most (K + 1) 2^-24 of the sum of their magnitudes, so with
// r = |mean - pivot| / std the variance errs by at most (K + 3) 2^-24 (1 + 2r + 3r^2) of itself
// (docs/design.md derives it). merge_stats (finalize.cc) accepts a channel
// only when r <= kMaxPivotDistance and its sums are finite; any other channel (an outlier
// pivot, or |x| so large that d^2 overflows fp32) is summed again in fp64 about its estimated
// mean, so the bound holds for every input. Block sums are added in block order.
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


// The fp64 kernel: every element promoted and summed in fp64 lanes. Writes the block's sums at
// out[c - b.c0] and out[stride + c - b.c0].
static void stats_block_wide(const Plan& p, const float* x, const Block& b, const double* pivot,
                             double* out, int64_t stride) {
  const hn::ScalableTag<double> dd;
  const hn::Rebind<float, decltype(dd)> dh;  // half-width floats, promoted to fp64
  const int64_t nd = static_cast<int64_t>(hn::Lanes(dd));
  const int64_t width = b.c1 - b.c0;

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
      out[stride + c - b.c0] = s2;
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
      hn::StoreU(s2[v], dd, out + stride + (k0 - b.c0) + v * nd);
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
    out[stride + k - b.c0] = t2;
  }
}

void stats_block(const Plan& p, const float* x, const Block& b, const double* pivot,
                 double* partials) {
  const hn::ScalableTag<float> df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  const int64_t width = b.c1 - b.c0;
  double* out = partials + b.slot;
  if (p.n * p.s < kMinFp32LaneCount) {
    stats_block_wide(p, x, b, pivot, out, width);
    return;
  }

  if (!p.channels_last) {
    const int64_t len = b.j1 - b.j0;
    for (int64_t c = b.c0; c < b.c1; ++c) {
      const double pv = pivot[c];
      const auto vp = hn::Set(df, static_cast<float>(pv));  // exact: the pivot is an element
      auto f1 = hn::Zero(df), f2 = hn::Zero(df), g1 = hn::Zero(df), g2 = hn::Zero(df);
      Wide<decltype(df)> a1, a2;
      a1.zero();
      a2.zero();
      int64_t terms = 0;
      auto flush = [&] {
        a1.add(hn::Add(f1, g1));
        a2.add(hn::Add(f2, g2));
        f1 = f2 = g1 = g2 = hn::Zero(df);
        terms = 0;
      };
      double t1 = 0, t2 = 0;
      for (int64_t i = b.i0; i < b.i1; ++i) {
        const float* row = x + (i * p.c + c) * p.s + b.j0;
        int64_t k = 0;
        for (; k + 2 * nf <= len; k += 2 * nf) {
          if (terms == kFlushTerms) flush();
          ++terms;
          const auto d0 = hn::Sub(hn::LoadU(df, row + k), vp);
          const auto d1 = hn::Sub(hn::LoadU(df, row + k + nf), vp);
          f1 = hn::Add(f1, d0);
          f2 = hn::MulAdd(d0, d0, f2);
          g1 = hn::Add(g1, d1);
          g2 = hn::MulAdd(d1, d1, g2);
        }
        if (k + nf <= len) {
          if (terms == kFlushTerms) flush();
          ++terms;
          const auto d0 = hn::Sub(hn::LoadU(df, row + k), vp);
          f1 = hn::Add(f1, d0);
          f2 = hn::MulAdd(d0, d0, f2);
          k += nf;
        }
#if BNORM_MASKED_TAIL
        if (k < len) {
          if (terms == kFlushTerms) flush();
          ++terms;
          const auto mk = hn::FirstN(df, static_cast<size_t>(len - k));
          const auto d0 = hn::IfThenElseZero(mk, hn::Sub(hn::MaskedLoad(mk, df, row + k), vp));
          f1 = hn::Add(f1, d0);
          f2 = hn::MulAdd(d0, d0, f2);
          k = len;
        }
#endif
        for (; k < len; ++k) {
          const double d = static_cast<double>(row[k]) - pv;
          t1 += d;
          t2 += d * d;
        }
      }
      flush();
      out[c - b.c0] = a1.sum() + t1;
      out[width + c - b.c0] = a2.sum() + t2;
    }
    return;
  }

  // Channels-last: a tile of channels at a time down all rows of the block (stride C), its
  // fp32 accumulators and their fp64 totals in registers; the fp32 ones are flushed into the
  // fp64 ones every kFlushTerms rows. Accumulators in memory would cost a load and a store per
  // vector and stall on 4 KiB aliasing between those stores and the loads of x.
  auto tile = [&](int64_t k0, auto lanes_tag) {
    constexpr int kVecs = decltype(lanes_tag)::value;
    hn::Vec<decltype(df)> vp[kVecs], s1[kVecs], s2[kVecs];
    Wide<decltype(df)> w1[kVecs], w2[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      // The pivots are elements of x, so the fp32 conversion is exact.
      vp[v] = hn::LoadU(df, x + k0 + v * nf);
      s1[v] = hn::Zero(df);
      s2[v] = hn::Zero(df);
      w1[v].zero();
      w2[v].zero();
    }
    const float* row = x + b.i0 * p.c + k0;
    int64_t terms = 0;
    for (int64_t r = b.i0; r < b.i1; ++r, row += p.c) {
      // The first tile pulls whole rows ahead into the cache: the tiles walk down rows with a
      // stride of C floats, which hardware prefetchers do not follow across 4 KiB pages.
      if (k0 == b.c0 && r + kPrefetchRows < b.i1) prefetch_row(row + kPrefetchRows * p.c, width);
      if (terms == kFlushTerms) {
        for (int v = 0; v < kVecs; ++v) {
          w1[v].add(s1[v]);
          w2[v].add(s2[v]);
          s1[v] = hn::Zero(df);
          s2[v] = hn::Zero(df);
        }
        terms = 0;
      }
      ++terms;
      for (int v = 0; v < kVecs; ++v) {
        const auto d = hn::Sub(hn::LoadU(df, row + v * nf), vp[v]);
        s1[v] = hn::Add(s1[v], d);
        s2[v] = hn::MulAdd(d, d, s2[v]);
      }
    }
    for (int v = 0; v < kVecs; ++v) {
      w1[v].add(s1[v]);
      w2[v].add(s2[v]);
      w1[v].store(out + (k0 - b.c0) + v * nf);
      w2[v].store(out + width + (k0 - b.c0) + v * nf);
    }
  };
  int64_t k = b.c0;
  for (; k + 2 * nf <= b.c1; k += 2 * nf) tile(k, std::integral_constant<int, 2>());
  for (; k + nf <= b.c1; k += nf) tile(k, std::integral_constant<int, 1>());
  if (k < b.c1) {
    // The last channels (fewer than a vector): the fp64 kernel on a block of just them.
    Block rest = b;
    rest.c0 = k;
    stats_block_wide(p, x, rest, pivot, out + (k - b.c0), width);
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
  merge_stats(*job.plan, job.x, job.partials, begin, end, job.pivot, job.mean, job.var);
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
