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

#include <array>
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

// The fused activations after y = ((x - mhi) - mlo) * a + b: none, ReLU, add z then ReLU.
// ReLU is max(v, 0) with NaN kept (v <= 0 gives +0), as torch.relu.
enum Act : int { kNone = 0, kRelu = 1, kAddRelu = 2 };

// z[k] is read only for kAddRelu (z is null otherwise). E: the tensors' element type.
template <int kAct, class DF, class V, class E>
HWY_INLINE V activate(DF df, V v, const E* z, int64_t k) {
  if constexpr (kAct == kNone) {
    return v;
  } else {
    if constexpr (kAct == kAddRelu) v = hn::Add(v, load_e(df, z + k));
    return hn::IfThenZeroElse(hn::Le(v, hn::Zero(df)), v);
  }
}

template <int kAct, class DF, class M, class V, class E>
HWY_INLINE V activate_masked(DF df, M mk, V v, const E* z, int64_t k) {
  if constexpr (kAct == kNone) {
    return v;
  } else {
    if constexpr (kAct == kAddRelu) v = hn::Add(v, masked_load_e(df, mk, z + k));
    return hn::IfThenZeroElse(hn::Le(v, hn::Zero(df)), v);
  }
}

// y = ((x - mhi) - mlo) * a + b on vectors: the formula of apply_one (below), for x loaded whole
// or masked.
template <class V>
HWY_INLINE V affine(V x, V mhi, V mlo, V a, V b) {
  return hn::MulAdd(hn::Sub(hn::Sub(x, mhi), mlo), a, b);
}

template <int kAct, class E>
inline float apply_one(float x, float mhi, float mlo, float a, float b, const E* z, int64_t k) {
  float v = std::fma((x - mhi) - mlo, a, b);
  if constexpr (kAct == kNone) {
    return v;
  } else {
    if constexpr (kAct == kAddRelu) v += to_f32(z[k]);
    return v <= 0.0f ? 0.0f : v;
  }
}

// One contiguous run of one channel (z: the same run of the added tensor).
template <int kAct, class E>
void apply_row(const E* x, const E* z, E* y, int64_t len, float mhi, float mlo,
               float a, float b, bool stream) {
  const hn::ScalableTag<float> df;
  const auto vh = hn::Set(df, mhi), vl = hn::Set(df, mlo), va = hn::Set(df, a), vb = hn::Set(df, b);
  write_row(
      df, y, len, stream,
      [&](int64_t k) {
        return activate<kAct>(df, affine(load_e(df, x + k), vh, vl, va, vb), z, k);
      },
      [&](auto mk, int64_t k) {
        return activate_masked<kAct>(df, mk, affine(masked_load_e(df, mk, x + k), vh, vl, va, vb),
                                     z, k);
      },
      [&](int64_t k) { return apply_one<kAct>(to_f32(x[k]), mhi, mlo, a, b, z, k); });
}

// Channels-first blocks of whole rows: each batch item's channels [c0, c1) as one run.
template <int kAct, class E>
void apply_runs(const Plan& p, const E* x, const Block& b, const ApplyParamsOf<E>& q, E* y,
                bool stream) {
  const hn::ScalableTag<float> df;
  using V = hn::Vec<decltype(df)>;
  using P = std::array<V, 4>;
  // Locals, not q's members: the stores to y could alias q as far as the compiler knows.
  const float* const mhi = q.mhi + b.c0;
  const float* const mlo = q.mlo + b.c0;
  const float* const qa = q.a + b.c0;
  const float* const qb = q.b + b.c0;
  const int64_t s = p.s;
  for (int64_t i = b.i0; i < b.i1; ++i) {
    const int64_t at = (i * p.c + b.c0) * s;
    const E* xr = x + at;
    const E* zr = kAct == kAddRelu ? q.z + at : nullptr;
    write_run<4>(
        df, y + at, b.c1 - b.c0, s, stream,
        [&](int64_t ch) {
          return P{hn::Set(df, mhi[ch]), hn::Set(df, mlo[ch]), hn::Set(df, qa[ch]),
                   hn::Set(df, qb[ch])};
        },
        [&](const P& v, int64_t k) {
          return activate<kAct>(df, affine(load_e(df, xr + k), v[0], v[1], v[2], v[3]), zr, k);
        },
        [&](const P& v, auto mk, int64_t k) {
          return activate_masked<kAct>(
              df, mk, affine(masked_load_e(df, mk, xr + k), v[0], v[1], v[2], v[3]), zr, k);
        },
        [&](int64_t ch, int64_t k) {
          return apply_one<kAct>(to_f32(xr[k]), mhi[ch], mlo[ch], qa[ch], qb[ch], zr, k);
        });
  }
}

// Channels-last, row by row: the parameters loaded per vector; without mlo when it is zero
// (inference: (x - mhi) - 0 is x - mhi, bit for bit, so the load is skipped). A streamed row
// whose output is not vector-aligned starts with one masked vector up to the alignment
// (BNORM_MASKED_TAIL targets; elsewhere such rows are not streamed), so that a tensor allocated
// with 16-byte alignment streams as one allocated with 64.
template <int kAct, bool kLo, class E>
void apply_rows_last(const Plan& p, const E* x, const Block& b, const ApplyParamsOf<E>& q, E* y,
                     bool stream) {
  const hn::ScalableTag<float> df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  const size_t align = static_cast<size_t>(nf) * sizeof(E);
  // Locals, not q's members: the stores to y could alias q as far as the compiler knows.
  const float* const mhi = q.mhi;
  const float* const mlo = q.mlo;
  const float* const qa = q.a;
  const float* const qb = q.b;
  const E* const z = q.z;
  for (int64_t r = b.i0; r < b.i1; ++r) {
    const E* xr = x + r * p.c;
    const E* zr = kAct == kAddRelu ? z + r * p.c : nullptr;
    E* yr = y + r * p.c;
    auto vec = [&](int64_t k) {
      auto t = hn::Sub(load_e(df, xr + k), hn::LoadU(df, mhi + k));
      if constexpr (kLo) t = hn::Sub(t, hn::LoadU(df, mlo + k));
      return activate<kAct>(df, hn::MulAdd(t, hn::LoadU(df, qa + k), hn::LoadU(df, qb + k)), zr, k);
    };
    int64_t k = b.c0;
    if (stream && b.c1 - b.c0 >= 4 * nf) {
#if BNORM_MASKED_TAIL
      const int64_t head = static_cast<int64_t>(
          (align - reinterpret_cast<uintptr_t>(yr + k) % align) % align / sizeof(E));
      if (head > 0) {
        const auto mk = hn::FirstN(df, static_cast<size_t>(head));
        auto t = hn::Sub(masked_load_e(df, mk, xr + k), hn::MaskedLoad(mk, df, mhi + k));
        if constexpr (kLo) t = hn::Sub(t, hn::MaskedLoad(mk, df, mlo + k));
        const auto v =
            hn::MulAdd(t, hn::MaskedLoad(mk, df, qa + k), hn::MaskedLoad(mk, df, qb + k));
        blended_store_e(df, mk, activate_masked<kAct>(df, mk, v, zr, k), yr + k);
        k += head;
      }
#endif
      if (reinterpret_cast<uintptr_t>(yr + k) % align == 0)
        for (; k + nf <= b.c1; k += nf) stream_e(df, vec(k), yr + k);
    }
    for (; k + nf <= b.c1; k += nf) store_e(df, vec(k), yr + k);
    for (; k < b.c1; ++k)
      yr[k] = from_f32<E>(apply_one<kAct>(to_f32(xr[k]), mhi[k], mlo[k], qa[k], qb[k], zr, k));
  }
}

template <int kAct, class E>
void apply_rows_last(const Plan& p, const E* x, const Block& b, const ApplyParamsOf<E>& q, E* y,
                     bool stream) {
  if (q.mlo_zero) {
    apply_rows_last<kAct, false>(p, x, b, q, y, stream);
  } else {
    apply_rows_last<kAct, true>(p, x, b, q, y, stream);
  }
}

template <int kAct, class E>
void apply_block_act(const Plan& p, const E* x, const Block& b, const ApplyParamsOf<E>& q, E* y,
                     bool stream) {
  if (use_runs(p, b)) {
    apply_runs<kAct>(p, x, b, q, y, stream);
    return;
  }
  if (!p.channels_last) {
    const int64_t len = b.j1 - b.j0;
    for (int64_t c = b.c0; c < b.c1; ++c)
      for (int64_t i = b.i0; i < b.i1; ++i) {
        const int64_t at = (i * p.c + c) * p.s + b.j0;
        apply_row<kAct>(x + at, kAct == kAddRelu ? q.z + at : nullptr, y + at, len, q.mhi[c],
                        q.mlo[c], q.a[c], q.b[c], stream);
      }
    return;
  }
  if (p.c > kTileApplyMaxChannels) {
    apply_rows_last<kAct>(p, x, b, q, y, stream);
    return;
  }
  // Channels-last: a tile of channels at a time down the block's rows, its parameters in
  // registers (four parameter loads per vector would bound the loop by the load ports); the
  // first tile prefetches whole rows ahead, as the reductions do (stats.cc).
  const hn::ScalableTag<float> df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  const int64_t width = b.c1 - b.c0;
  const size_t align = static_cast<size_t>(nf) * sizeof(E);
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
      const E* xr = x + r * p.c + k0;
      const E* zr = kAct == kAddRelu ? q.z + r * p.c + k0 : nullptr;
      E* yr = y + r * p.c + k0;
      if (k0 == b.c0 && r + kPrefetchRows < b.i1) {
        prefetch_row(xr + kPrefetchRows * p.c, width);
        if constexpr (kAct == kAddRelu) prefetch_row(zr + kPrefetchRows * p.c, width);
      }
      const bool nt = stream && reinterpret_cast<uintptr_t>(yr) % align == 0;
      for (int v = 0; v < kVecs; ++v) {
        const auto t = hn::Sub(hn::Sub(load_e(df, xr + v * nf), vh[v]), vl[v]);
        const auto out = activate<kAct>(df, hn::MulAdd(t, va[v], vb[v]), zr, v * nf);
        if (nt) {
          stream_e(df, out, yr + v * nf);
        } else {
          store_e(df, out, yr + v * nf);
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
    apply_rows_last<kAct>(p, x, rest, q, y, stream);
  }
}

}  // namespace

template <class E>
void apply_block(const Plan& p, const E* x, const Block& b, const ApplyParamsOf<E>& q, E* y,
                 bool stream) {
  if (!q.relu) {
    apply_block_act<kNone>(p, x, b, q, y, stream);
  } else if (q.z == nullptr) {
    apply_block_act<kRelu>(p, x, b, q, y, stream);
  } else {
    apply_block_act<kAddRelu>(p, x, b, q, y, stream);
  }
}

namespace {

template <class E>
struct ApplyJob {
  const Plan* plan;
  const E* x;
  ApplyParamsOf<E> q;
  E* y;
  bool stream;
};

template <class E>
void apply_task(void* ctx, int t, int n) {
  const ApplyJob<E>& job = *static_cast<const ApplyJob<E>*>(ctx);
  const Plan& p = *job.plan;
  int64_t begin, end;
  split_range(0, static_cast<int64_t>(p.blocks.size()), t, n, &begin, &end);
  for (int64_t k = begin; k < end; ++k)
    apply_block(p, job.x, p.blocks[k], job.q, job.y, job.stream);
  if (job.stream) hwy::FlushStream();
}

}  // namespace

// Runs y = ((x - mhi) - mlo) * a + b on the pool (also forward_eval's whole pass).
template <class E>
void apply_with_params(const Geometry& g, const E* x, const ApplyParamsOf<E>& q, E* y) {
  const std::shared_ptr<const Plan> plan = get_plan(g, 1);
  ApplyJob<E> job{plan.get(), x, q, y,
                  g.numel() * 4 >= kStreamMinBytes};
  const int threads = call_threads(*plan);
  ThreadPool::instance().run(threads,
                             block_slots(static_cast<int64_t>(plan->blocks.size()), threads),
                             &apply_task<E>, &job);
}

#define BNORM_INSTANTIATE(E)                                                                 \
  template void apply_block<E>(const Plan&, const E*, const Block&, const ApplyParamsOf<E>&, \
                               E*, bool);                                                    \
  template void apply_with_params<E>(const Geometry&, const E*, const ApplyParamsOf<E>&, E*);
BNORM_INSTANTIATE(float)
BNORM_INSTANTIATE(bfloat16)
BNORM_INSTANTIATE(float16)
#undef BNORM_INSTANTIATE

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
