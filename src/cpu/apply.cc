// apply: y = weight * (x - mean) * invstd + bias, run as y = ((x - mhi) - mlo) * a + b in fp32
// (block kernel and the standalone pass). Training and inference share it.
//
// Large outputs are written with streaming (non-temporal) stores: they would only evict the
// input the next wave still needs, and the consumer reads them from DRAM anyway.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/apply.cc"
// clang-format off
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// clang-format on

#include <cmath>
#include <cstdint>
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

namespace {

inline float apply_one(float x, float mhi, float mlo, float a, float b) {
  return std::fma((x - mhi) - mlo, a, b);
}

// One contiguous run of one channel.
void apply_row(const float* x, float* y, int64_t len, float mhi, float mlo, float a, float b,
               bool stream) {
  const hn::ScalableTag<float> df;
  const auto vh = hn::Set(df, mhi), vl = hn::Set(df, mlo), va = hn::Set(df, a), vb = hn::Set(df, b);
  write_row(
      df, y, len, stream,
      [&](int64_t k) { return hn::MulAdd(hn::Sub(hn::Sub(hn::LoadU(df, x + k), vh), vl), va, vb); },
      [&](auto mk, int64_t k) {
        return hn::MulAdd(hn::Sub(hn::Sub(hn::MaskedLoad(mk, df, x + k), vh), vl), va, vb);
      },
      [&](int64_t k) { return apply_one(x[k], mhi, mlo, a, b); });
}

// Channels-last, row by row: the parameters loaded per vector.
void apply_rows_last(const Plan& p, const float* x, const Block& b, const ApplyParams& q,
                     float* y, bool stream) {
  const hn::ScalableTag<float> df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  const int64_t vec_end = b.c0 + (b.c1 - b.c0) / nf * nf;
  const size_t align = static_cast<size_t>(nf) * sizeof(float);
  // Locals, not q's members: the stores to y could alias q as far as the compiler knows.
  const float* const mhi = q.mhi;
  const float* const mlo = q.mlo;
  const float* const qa = q.a;
  const float* const qb = q.b;
  for (int64_t r = b.i0; r < b.i1; ++r) {
    const float* xr = x + r * p.c;
    float* yr = y + r * p.c;
    int64_t k = b.c0;
    if (stream && reinterpret_cast<uintptr_t>(yr + k) % align == 0) {
      for (; k < vec_end; k += nf) {
        const auto t =
            hn::Sub(hn::Sub(hn::LoadU(df, xr + k), hn::LoadU(df, mhi + k)), hn::LoadU(df, mlo + k));
        hn::Stream(hn::MulAdd(t, hn::LoadU(df, qa + k), hn::LoadU(df, qb + k)), df, yr + k);
      }
    }
    for (; k < vec_end; k += nf) {
      const auto t =
          hn::Sub(hn::Sub(hn::LoadU(df, xr + k), hn::LoadU(df, mhi + k)), hn::LoadU(df, mlo + k));
      hn::StoreU(hn::MulAdd(t, hn::LoadU(df, qa + k), hn::LoadU(df, qb + k)), df, yr + k);
    }
    for (; k < b.c1; ++k) yr[k] = apply_one(xr[k], mhi[k], mlo[k], qa[k], qb[k]);
  }
}

}  // namespace

void apply_block(const Plan& p, const float* x, const Block& b, const ApplyParams& q, float* y,
                 bool stream) {
  if (!p.channels_last) {
    const int64_t len = b.j1 - b.j0;
    for (int64_t c = b.c0; c < b.c1; ++c)
      for (int64_t i = b.i0; i < b.i1; ++i) {
        const int64_t at = (i * p.c + c) * p.s + b.j0;
        apply_row(x + at, y + at, len, q.mhi[c], q.mlo[c], q.a[c], q.b[c], stream);
      }
    return;
  }
  if (p.c > kTileApplyMaxChannels) {
    apply_rows_last(p, x, b, q, y, stream);
    return;
  }
  // Channels-last: a tile of channels at a time down the block's rows, its parameters in
  // registers (four parameter loads per vector would bound the loop by the load ports); the
  // first tile prefetches whole rows ahead, as the reductions do (stats.cc).
  const hn::ScalableTag<float> df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  const int64_t width = b.c1 - b.c0;
  const size_t align = static_cast<size_t>(nf) * sizeof(float);
  auto tile = [&](int64_t k0, auto lanes_tag) {
    constexpr int kVecs = decltype(lanes_tag)::value;
    hn::Vec<decltype(df)> vh[kVecs], vl[kVecs], va[kVecs], vb[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      vh[v] = hn::LoadU(df, q.mhi + k0 + v * nf);
      vl[v] = hn::LoadU(df, q.mlo + k0 + v * nf);
      va[v] = hn::LoadU(df, q.a + k0 + v * nf);
      vb[v] = hn::LoadU(df, q.b + k0 + v * nf);
    }
    for (int64_t r = b.i0; r < b.i1; ++r) {
      const float* xr = x + r * p.c + k0;
      float* yr = y + r * p.c + k0;
      if (k0 == b.c0 && r + kPrefetchRows < b.i1) prefetch_row(xr + kPrefetchRows * p.c, width);
      const bool nt = stream && reinterpret_cast<uintptr_t>(yr) % align == 0;
      for (int v = 0; v < kVecs; ++v) {
        const auto t = hn::Sub(hn::Sub(hn::LoadU(df, xr + v * nf), vh[v]), vl[v]);
        const auto out = hn::MulAdd(t, va[v], vb[v]);
        if (nt) {
          hn::Stream(out, df, yr + v * nf);
        } else {
          hn::StoreU(out, df, yr + v * nf);
        }
      }
    }
  };
  int64_t k = b.c0;
  for (; k + 2 * nf <= b.c1; k += 2 * nf) tile(k, std::integral_constant<int, 2>());
  for (; k + nf <= b.c1; k += nf) tile(k, std::integral_constant<int, 1>());
  if (k < b.c1) {  // the last channels, fewer than a vector
    Block rest = b;
    rest.c0 = k;
    apply_rows_last(p, x, rest, q, y, stream);
  }
}

namespace {

struct ApplyJob {
  const Plan* plan;
  const float* x;
  ApplyParams q;
  float* y;
  bool stream;
};

void apply_task(void* ctx, int t, int n) {
  const ApplyJob& job = *static_cast<const ApplyJob*>(ctx);
  const Plan& p = *job.plan;
  int64_t begin, end;
  split_range(0, static_cast<int64_t>(p.blocks.size()), t, n, &begin, &end);
  for (int64_t k = begin; k < end; ++k)
    apply_block(p, job.x, p.blocks[k], job.q, job.y, job.stream);
  if (job.stream) hwy::FlushStream();
}

}  // namespace

// Runs y = ((x - mhi) - mlo) * a + b on the pool (also forward_eval's whole pass).
void apply_with_params(const Geometry& g, const float* x, const ApplyParams& q, float* y) {
  const std::shared_ptr<const Plan> plan = get_plan(g, 1);
  ApplyJob job{plan.get(), x, q, y, g.numel() * 4 >= kStreamMinBytes};
  const int threads = call_threads(*plan);
  ThreadPool::instance().run(
      threads, block_slots(static_cast<int64_t>(plan->blocks.size()), threads), &apply_task, &job);
}

void apply_pass(const Geometry& g, const float* x, const double* mean, const double* invstd,
                const double* weight, const double* bias, float* y) {
  float* params = thread_workspace().param_data(4 * g.c);
  float *mhi = params, *mlo = params + g.c, *a = params + 2 * g.c, *b = params + 3 * g.c;
  for (int64_t c = 0; c < g.c; ++c)
    set_apply_params(mean[c], invstd[c], weight ? weight[c] : 1.0, bias ? bias[c] : 0.0, c, mhi,
                     mlo, a, b);
  apply_with_params(g, x, ApplyParams{mhi, mlo, a, b}, y);
}

}  // namespace bnorm::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace bnorm::cpu {

HWY_EXPORT(apply_pass);

void apply(const Geometry& g, const float* x, const double* mean, const double* invstd,
           const double* weight, const double* bias, float* y) {
  HWY_DYNAMIC_DISPATCH(apply_pass)(g, x, mean, invstd, weight, bias, y);
}

}  // namespace bnorm::cpu
#endif  // HWY_ONCE
