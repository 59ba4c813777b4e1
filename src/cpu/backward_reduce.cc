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

// The fp64 kernel: every element promoted. Writes the block's sums at out[c - b.c0] and
// out[stride + c - b.c0].
static void backward_reduce_block_wide(const Plan& p, const float* dy, const float* x,
                                       const Block& b, const float* m, double* out,
                                       int64_t stride) {
  const hn::ScalableTag<double> dd;
  const hn::Rebind<float, decltype(dd)> dh;
  const int64_t nd = static_cast<int64_t>(hn::Lanes(dd));
  const int64_t width = b.c1 - b.c0;

  if (!p.channels_last) {
    const int64_t len = b.j1 - b.j0;
    for (int64_t c = b.c0; c < b.c1; ++c) {
      const double mc = static_cast<double>(m[c]);
      const auto vm = hn::Set(dd, mc);
      auto s0a = hn::Zero(dd), s1a = hn::Zero(dd), s0b = hn::Zero(dd), s1b = hn::Zero(dd);
      double t0 = 0, t1 = 0;
      for (int64_t i = b.i0; i < b.i1; ++i) {
        const int64_t at = (i * p.c + c) * p.s + b.j0;
        const float* gr = dy + at;
        const float* xr = x + at;
        int64_t k = 0;
        for (; k + 2 * nd <= len; k += 2 * nd) {
          const auto g0 = hn::PromoteTo(dd, hn::LoadU(dh, gr + k));
          const auto g1 = hn::PromoteTo(dd, hn::LoadU(dh, gr + k + nd));
          const auto d0 = hn::Sub(hn::PromoteTo(dd, hn::LoadU(dh, xr + k)), vm);
          const auto d1 = hn::Sub(hn::PromoteTo(dd, hn::LoadU(dh, xr + k + nd)), vm);
          s0a = hn::Add(s0a, g0);
          s1a = hn::MulAdd(g0, d0, s1a);
          s0b = hn::Add(s0b, g1);
          s1b = hn::MulAdd(g1, d1, s1b);
        }
        for (; k + nd <= len; k += nd) {
          const auto g0 = hn::PromoteTo(dd, hn::LoadU(dh, gr + k));
          const auto d0 = hn::Sub(hn::PromoteTo(dd, hn::LoadU(dh, xr + k)), vm);
          s0a = hn::Add(s0a, g0);
          s1a = hn::MulAdd(g0, d0, s1a);
        }
        for (; k < len; ++k) {
          const double g0 = gr[k];
          t0 += g0;
          t1 += g0 * (static_cast<double>(xr[k]) - mc);
        }
      }
      out[c - b.c0] = hn::GetLane(hn::SumOfLanes(dd, hn::Add(s0a, s0b))) + t0;
      out[stride + c - b.c0] = hn::GetLane(hn::SumOfLanes(dd, hn::Add(s1a, s1b))) + t1;
    }
    return;
  }

  // Channels-last: a tile of channels at a time, accumulators in registers (see stats.cc).
  auto tile = [&](int64_t k0, auto lanes_tag) {
    constexpr int kVecs = decltype(lanes_tag)::value;
    hn::Vec<decltype(dd)> vm[kVecs], s0[kVecs], s1[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      vm[v] = hn::PromoteTo(dd, hn::LoadU(dh, m + k0 + v * nd));
      s0[v] = hn::Zero(dd);
      s1[v] = hn::Zero(dd);
    }
    const float* gr = dy + b.i0 * p.c + k0;
    const float* xr = x + b.i0 * p.c + k0;
    for (int64_t r = b.i0; r < b.i1; ++r, gr += p.c, xr += p.c) {
      if (k0 == b.c0 && r + kPrefetchRows < b.i1) {  // see stats.cc
        prefetch_row(gr + kPrefetchRows * p.c, width);
        prefetch_row(xr + kPrefetchRows * p.c, width);
      }
      for (int v = 0; v < kVecs; ++v) {
        const auto g = hn::PromoteTo(dd, hn::LoadU(dh, gr + v * nd));
        const auto d = hn::Sub(hn::PromoteTo(dd, hn::LoadU(dh, xr + v * nd)), vm[v]);
        s0[v] = hn::Add(s0[v], g);
        s1[v] = hn::MulAdd(g, d, s1[v]);
      }
    }
    for (int v = 0; v < kVecs; ++v) {
      hn::StoreU(s0[v], dd, out + (k0 - b.c0) + v * nd);
      hn::StoreU(s1[v], dd, out + stride + (k0 - b.c0) + v * nd);
    }
  };
  int64_t k = b.c0;
  for (; k + 4 * nd <= b.c1; k += 4 * nd) tile(k, std::integral_constant<int, 4>());
  for (; k + nd <= b.c1; k += nd) tile(k, std::integral_constant<int, 1>());
  for (; k < b.c1; ++k) {
    const double mc = m[k];
    double t0 = 0, t1 = 0;
    for (int64_t r = b.i0; r < b.i1; ++r) {
      const double g = dy[r * p.c + k];
      t0 += g;
      t1 += g * (static_cast<double>(x[r * p.c + k]) - mc);
    }
    out[k - b.c0] = t0;
    out[stride + k - b.c0] = t1;
  }
}


void backward_reduce_block(const Plan& p, const float* dy, const float* x, const Block& b,
                           const float* m, double* partials) {
  const hn::ScalableTag<float> df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  const int64_t width = b.c1 - b.c0;
  double* out = partials + b.slot;

  if (!p.channels_last) {
    const int64_t len = b.j1 - b.j0;
    for (int64_t c = b.c0; c < b.c1; ++c) {
      const double mc = static_cast<double>(m[c]);
      const auto vm = hn::Set(df, m[c]);
      auto f0 = hn::Zero(df), f1 = hn::Zero(df), h0 = hn::Zero(df), h1 = hn::Zero(df);
      Wide<decltype(df)> a0, a1;
      a0.zero();
      a1.zero();
      int64_t terms = 0;
      auto flush = [&] {
        a0.add(hn::Add(f0, h0));
        a1.add(hn::Add(f1, h1));
        f0 = f1 = h0 = h1 = hn::Zero(df);
        terms = 0;
      };
      double t0 = 0, t1 = 0;
      for (int64_t i = b.i0; i < b.i1; ++i) {
        const int64_t at = (i * p.c + c) * p.s + b.j0;
        const float* gr = dy + at;
        const float* xr = x + at;
        int64_t k = 0;
        for (; k + 2 * nf <= len; k += 2 * nf) {
          if (terms == kFlushTerms) flush();
          ++terms;
          const auto g0 = hn::LoadU(df, gr + k);
          const auto g1 = hn::LoadU(df, gr + k + nf);
          f0 = hn::Add(f0, g0);
          f1 = hn::MulAdd(g0, hn::Sub(hn::LoadU(df, xr + k), vm), f1);
          h0 = hn::Add(h0, g1);
          h1 = hn::MulAdd(g1, hn::Sub(hn::LoadU(df, xr + k + nf), vm), h1);
        }
        if (k + nf <= len) {
          if (terms == kFlushTerms) flush();
          ++terms;
          const auto g0 = hn::LoadU(df, gr + k);
          f0 = hn::Add(f0, g0);
          f1 = hn::MulAdd(g0, hn::Sub(hn::LoadU(df, xr + k), vm), f1);
          k += nf;
        }
#if BNORM_MASKED_TAIL
        if (k < len) {
          if (terms == kFlushTerms) flush();
          ++terms;
          // Masked-off lanes load 0 for dy, so they add nothing to either sum.
          const auto mk = hn::FirstN(df, static_cast<size_t>(len - k));
          const auto g0 = hn::MaskedLoad(mk, df, gr + k);
          f0 = hn::Add(f0, g0);
          f1 = hn::MulAdd(g0, hn::Sub(hn::MaskedLoad(mk, df, xr + k), vm), f1);
          k = len;
        }
#endif
        for (; k < len; ++k) {
          const double g0 = gr[k];
          t0 += g0;
          t1 += g0 * (static_cast<double>(xr[k]) - mc);
        }
      }
      flush();
      out[c - b.c0] = a0.sum() + t0;
      out[width + c - b.c0] = a1.sum() + t1;
    }
    return;
  }

  // Channels-last: a tile of channels at a time, fp32 accumulators and their fp64 totals in
  // registers, flushed every kFlushTerms rows (see stats.cc).
  auto tile = [&](int64_t k0, auto lanes_tag) {
    constexpr int kVecs = decltype(lanes_tag)::value;
    hn::Vec<decltype(df)> vm[kVecs], s0[kVecs], s1[kVecs];
    Wide<decltype(df)> w0[kVecs], w1[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      vm[v] = hn::LoadU(df, m + k0 + v * nf);
      s0[v] = hn::Zero(df);
      s1[v] = hn::Zero(df);
      w0[v].zero();
      w1[v].zero();
    }
    const float* gr = dy + b.i0 * p.c + k0;
    const float* xr = x + b.i0 * p.c + k0;
    int64_t terms = 0;
    for (int64_t r = b.i0; r < b.i1; ++r, gr += p.c, xr += p.c) {
      if (k0 == b.c0 && r + kPrefetchRows < b.i1) {  // see stats.cc
        prefetch_row(gr + kPrefetchRows * p.c, width);
        prefetch_row(xr + kPrefetchRows * p.c, width);
      }
      if (terms == kFlushTerms) {
        for (int v = 0; v < kVecs; ++v) {
          w0[v].add(s0[v]);
          w1[v].add(s1[v]);
          s0[v] = hn::Zero(df);
          s1[v] = hn::Zero(df);
        }
        terms = 0;
      }
      ++terms;
      for (int v = 0; v < kVecs; ++v) {
        const auto g = hn::LoadU(df, gr + v * nf);
        s0[v] = hn::Add(s0[v], g);
        s1[v] = hn::MulAdd(g, hn::Sub(hn::LoadU(df, xr + v * nf), vm[v]), s1[v]);
      }
    }
    for (int v = 0; v < kVecs; ++v) {
      w0[v].add(s0[v]);
      w1[v].add(s1[v]);
      w0[v].store(out + (k0 - b.c0) + v * nf);
      w1[v].store(out + width + (k0 - b.c0) + v * nf);
    }
  };
  int64_t k = b.c0;
  for (; k + 2 * nf <= b.c1; k += 2 * nf) tile(k, std::integral_constant<int, 2>());
  for (; k + nf <= b.c1; k += nf) tile(k, std::integral_constant<int, 1>());
  if (k < b.c1) {
    // The last channels (fewer than a vector): the fp64 kernel on a block of just them.
    Block rest = b;
    rest.c0 = k;
    backward_reduce_block_wide(p, dy, x, rest, m, out + (k - b.c0), width);
  }
}

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
    backward_reduce_block(p, job.dy, job.x, p.blocks[k], job.m, job.partials);
}

void merge_task(void* ctx, int t, int n) {
  const ReduceJob& job = *static_cast<const ReduceJob*>(ctx);
  int64_t begin, end;
  split_range(0, job.plan->c, t, n, &begin, &end);
  merge_backward_sums(*job.plan, job.dy, job.x, job.m, job.partials, begin, end, true, job.sum0,
                      job.sum1);
}

}  // namespace

void backward_reduce_pass(const Geometry& g, const float* dy, const float* x, const double* mean,
                          const double* invstd, double* sum_dy, double* sum_dy_xhat) {
  const std::shared_ptr<const Plan> plan = get_plan(g, 2);
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
