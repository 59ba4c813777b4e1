// backward_apply: dx (block kernel and the standalone pass).
//
// Training: dx = weight * invstd / n * (n * dy - sum_dy - xhat * sum_dy_xhat), regrouped as
// dx = alpha * dy + (beta * (x - m) + gamma) with per-channel fp32 alpha, beta, gamma computed in
// fp64. Eval (statistics constant): dx = alpha * dy.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/backward_apply.cc"
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

inline float dx_one(float g, float x, float m, float alpha, float beta, float gamma) {
  return std::fma(alpha, g, std::fma(beta, x - m, gamma));
}

// dx_one on vectors. x is loaded by the caller before g is formed, which may store to dz.
template <class V>
HWY_INLINE V dx_vec(V g, V x, V m, V alpha, V beta, V gamma) {
  return hn::MulAdd(alpha, g, hn::MulAdd(beta, hn::Sub(x, m), gamma));
}

// The gradient the batch norm sees at element k: dy, or with the fused ReLU g = dy * (y > 0),
// then also stored to dz when dz is set (dz may be dy: g is formed before it is stored).
// E: the tensors' element type (dz rounded on store: g is a widened dy or 0, so exactly).
template <bool kRelu, class DF, class E>
HWY_INLINE hn::Vec<DF> grad(DF df, const E* dy, const E* y, E* dz, int64_t k) {
  auto g = load_e(df, dy + k);
  if constexpr (kRelu) {
    g = relu_grad(df, load_e(df, y + k), g);
    if (dz != nullptr) store_e(df, g, dz + k);
  }
  return g;
}

template <bool kRelu, class DF, class M, class E>
HWY_INLINE hn::Vec<DF> grad_masked(DF df, M mk, const E* dy, const E* y, E* dz, int64_t k) {
  auto g = masked_load_e(df, mk, dy + k);
  if constexpr (kRelu) {
    g = relu_grad(df, masked_load_e(df, mk, y + k), g);
    if (dz != nullptr) blended_store_e(df, mk, g, dz + k);
  }
  return g;
}

template <bool kRelu, class E>
inline float grad_one(const E* dy, const E* y, E* dz, int64_t k) {
  float g = to_f32(dy[k]);
  if constexpr (kRelu) {
    g = to_f32(y[k]) > 0.0f ? g : 0.0f;
    if (dz != nullptr) dz[k] = from_f32<E>(g);
  }
  return g;
}

// One contiguous run of one channel (y, dz: the same run of the fused ReLU's output and of dz).
template <bool kRelu, class E>
void backward_apply_row(const E* dy, const E* x, const E* y, E* dz, E* dx, int64_t len, float m, float alpha, float beta, float gamma, bool training,
                        bool stream) {
  const hn::ScalableTag<float> df;
  const auto vm = hn::Set(df, m), va = hn::Set(df, alpha), vb = hn::Set(df, beta),
             vg = hn::Set(df, gamma);
  if (!training) {
    write_row(
        df, dx, len, stream,
        [&](int64_t k) { return hn::Mul(va, grad<kRelu>(df, dy, y, dz, k)); },
        [&](auto mk, int64_t k) { return hn::Mul(va, grad_masked<kRelu>(df, mk, dy, y, dz, k)); },
        [&](int64_t k) { return alpha * grad_one<kRelu>(dy, y, dz, k); });
    return;
  }
  write_row(
      df, dx, len, stream,
      [&](int64_t k) {
        const auto xv = load_e(df, x + k);
        return dx_vec(grad<kRelu>(df, dy, y, dz, k), xv, vm, va, vb, vg);
      },
      [&](auto mk, int64_t k) {
        const auto xv = masked_load_e(df, mk, x + k);
        return dx_vec(grad_masked<kRelu>(df, mk, dy, y, dz, k), xv, vm, va, vb, vg);
      },
      [&](int64_t k) {
        const float g = grad_one<kRelu>(dy, y, dz, k);
        return dx_one(g, to_f32(x[k]), m, alpha, beta, gamma);
      });
}

// Channels-first blocks of whole rows: each batch item's channels [c0, c1) as one run.
template <bool kRelu, class E>
void backward_apply_runs(const Plan& p, const E* dy, const E* x, const Block& b,
                         const BackwardParamsOf<E>& q, bool training, E* dx, bool stream) {
  const hn::ScalableTag<float> df;
  using V = hn::Vec<decltype(df)>;
  using P = std::array<V, 4>;
  // Locals, not q's members: the stores to dx could alias q as far as the compiler knows.
  const float* const qm = q.m + b.c0;
  const float* const qalpha = q.alpha + b.c0;
  const float* const qbeta = q.beta + b.c0;
  const float* const qgamma = q.gamma + b.c0;
  const int64_t s = p.s;
  const int64_t channels = b.c1 - b.c0;
  for (int64_t i = b.i0; i < b.i1; ++i) {
    const int64_t at = (i * p.c + b.c0) * s;
    const E* gr = dy + at;
    const E* xr = x + at;
    const E* yr = kRelu ? q.y + at : nullptr;
    E* zr = kRelu && q.dz != nullptr ? q.dz + at : nullptr;
    E* out = dx + at;
    auto load = [&](int64_t ch) {
      return P{hn::Set(df, qm[ch]), hn::Set(df, qalpha[ch]), hn::Set(df, qbeta[ch]),
               hn::Set(df, qgamma[ch])};
    };
    if (!training) {
      write_run<4>(
          df, out, channels, s, stream, load,
          [&](const P& v, int64_t k) { return hn::Mul(v[1], grad<kRelu>(df, gr, yr, zr, k)); },
          [&](const P& v, auto mk, int64_t k) {
            return hn::Mul(v[1], grad_masked<kRelu>(df, mk, gr, yr, zr, k));
          },
          [&](int64_t ch, int64_t k) { return qalpha[ch] * grad_one<kRelu>(gr, yr, zr, k); });
      continue;
    }
    write_run<4>(
        df, out, channels, s, stream, load,
        [&](const P& v, int64_t k) {
          const auto xv = load_e(df, xr + k);
          return dx_vec(grad<kRelu>(df, gr, yr, zr, k), xv, v[0], v[1], v[2], v[3]);
        },
        [&](const P& v, auto mk, int64_t k) {
          const auto xv = masked_load_e(df, mk, xr + k);
          return dx_vec(grad_masked<kRelu>(df, mk, gr, yr, zr, k), xv, v[0], v[1], v[2], v[3]);
        },
        [&](int64_t ch, int64_t k) {
          const float g = grad_one<kRelu>(gr, yr, zr, k);
          return dx_one(g, to_f32(xr[k]), qm[ch], qalpha[ch], qbeta[ch], qgamma[ch]);
        });
  }
}

// Channels-last, row by row: the parameters loaded per vector.
template <bool kRelu, class E>
void backward_apply_rows_last(const Plan& p, const E* dy, const E* x, const Block& b,
                              const BackwardParamsOf<E>& q, bool training, E* dx, bool stream) {
  const hn::ScalableTag<float> df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  const int64_t vec_end = b.c0 + (b.c1 - b.c0) / nf * nf;
  const size_t align = static_cast<size_t>(nf) * sizeof(E);
  // Locals, not q's members: the stores to dx could alias q as far as the compiler knows.
  const float* const qm = q.m;
  const float* const qalpha = q.alpha;
  const float* const qbeta = q.beta;
  const float* const qgamma = q.gamma;
  const E* const qy = q.y;
  E* const qdz = q.dz;
  int64_t r = b.i0;
  // kRowsLast rows at a time share each parameter load: one row loads 4 parameter vectors per
  // vector of dy (and of x), which bounds it by the loads (1.2-1.3x on 32x2048x7x7 and 4096x512
  // channels-last, 2 threads). Not with streaming stores: interleaved over several rows they ran
  // 1.6x slower (measured on the inference apply, 28x28, C = 512), so outputs above
  // kStreamMinBytes keep the row loop. C a multiple of Lanes keeps every row's vectors aligned
  // alike. (The same change made the inference apply slower, 0.7-0.9x, so it keeps its row loop.)
  if (!stream && p.c % nf == 0) {
    for (; r + kRowsLast <= b.i1; r += kRowsLast) {
      const int64_t o0 = r * p.c;
      for (int64_t k = b.c0; k < vec_end; k += nf) {
        const auto va = hn::LoadU(df, qalpha + k);
        if (!training) {
          // Every row's inputs before any store: rows 4 KiB apart would otherwise wait on the
          // store to the row before (4 KiB aliasing).
          hn::Vec<decltype(df)> g[kRowsLast];
          for (int64_t j = 0; j < kRowsLast; ++j) {
            const int64_t o = o0 + j * p.c;
            g[j] = grad<kRelu>(df, dy + o, kRelu ? qy + o : nullptr,
                               kRelu && qdz != nullptr ? qdz + o : nullptr, k);
          }
          for (int64_t j = 0; j < kRowsLast; ++j) store_e(df, hn::Mul(va, g[j]), dx + o0 + j * p.c + k);
          continue;
        }
        const auto vm = hn::LoadU(df, qm + k), vb = hn::LoadU(df, qbeta + k);
        const auto vg = hn::LoadU(df, qgamma + k);
        hn::Vec<decltype(df)> xv[kRowsLast], g[kRowsLast];
        for (int64_t j = 0; j < kRowsLast; ++j) {
          const int64_t o = o0 + j * p.c;
          xv[j] = load_e(df, x + o + k);
          g[j] = grad<kRelu>(df, dy + o, kRelu ? qy + o : nullptr,
                             kRelu && qdz != nullptr ? qdz + o : nullptr, k);
        }
        for (int64_t j = 0; j < kRowsLast; ++j)
          store_e(df, dx_vec(g[j], xv[j], vm, va, vb, vg), dx + o0 + j * p.c + k);
      }
      for (int64_t j = 0; j < kRowsLast; ++j) {
        const int64_t o = o0 + j * p.c;
        const E* gr = dy + o;
        const E* yr = kRelu ? qy + o : nullptr;
        E* zr = kRelu && qdz != nullptr ? qdz + o : nullptr;
        for (int64_t k = vec_end; k < b.c1; ++k) {
          const float g = grad_one<kRelu>(gr, yr, zr, k);
          dx[o + k] = from_f32<E>(
              training ? dx_one(g, to_f32(x[o + k]), qm[k], qalpha[k], qbeta[k], qgamma[k])
                       : qalpha[k] * g);
        }
      }
    }
  }
  for (; r < b.i1; ++r) {
    const E* gr = dy + r * p.c;
    const E* xr = x + r * p.c;
    const E* yr = kRelu ? qy + r * p.c : nullptr;
    E* zr = kRelu && qdz != nullptr ? qdz + r * p.c : nullptr;
    E* out = dx + r * p.c;
    int64_t k = b.c0;
#if BNORM_MASKED_TAIL
    // A streamed row whose output is not aligned starts with one masked vector up to the
    // alignment (as the inference apply's rows, apply.cc).
    if (stream && b.c1 - b.c0 >= 4 * nf) {
      const int64_t head = static_cast<int64_t>(
          (align - reinterpret_cast<uintptr_t>(out + k) % align) % align / sizeof(E));
      if (head > 0) {
        const auto mk = hn::FirstN(df, static_cast<size_t>(head));
        const auto g = grad_masked<kRelu>(df, mk, gr, yr, zr, k);
        const auto va = hn::MaskedLoad(mk, df, qalpha + k);
        hn::Vec<decltype(df)> v;
        if (training) {
          const auto xv = masked_load_e(df, mk, xr + k);
          v = dx_vec(g, xv, hn::MaskedLoad(mk, df, qm + k), va, hn::MaskedLoad(mk, df, qbeta + k),
                     hn::MaskedLoad(mk, df, qgamma + k));
        } else {
          v = hn::Mul(va, g);
        }
        blended_store_e(df, mk, v, out + k);
        k += head;
      }
    }
#endif
    const int64_t vend = k + (b.c1 - k) / nf * nf;
    const bool nt = stream && reinterpret_cast<uintptr_t>(out + k) % align == 0;
    if (!training) {
      for (; k < vend; k += nf) {
        const auto v = hn::Mul(hn::LoadU(df, qalpha + k), grad<kRelu>(df, gr, yr, zr, k));
        if (nt) {
          stream_e(df, v, out + k);
        } else {
          store_e(df, v, out + k);
        }
      }
      for (; k < b.c1; ++k) out[k] = from_f32<E>(qalpha[k] * grad_one<kRelu>(gr, yr, zr, k));
      continue;
    }
    for (; k < vend; k += nf) {
      const auto t = hn::MulAdd(hn::LoadU(df, qbeta + k),
                                hn::Sub(load_e(df, xr + k), hn::LoadU(df, qm + k)),
                                hn::LoadU(df, qgamma + k));
      const auto v = hn::MulAdd(hn::LoadU(df, qalpha + k), grad<kRelu>(df, gr, yr, zr, k), t);
      if (nt) {
        stream_e(df, v, out + k);
      } else {
        store_e(df, v, out + k);
      }
    }
    for (; k < b.c1; ++k) {
      const float g = grad_one<kRelu>(gr, yr, zr, k);
      out[k] = from_f32<E>(dx_one(g, to_f32(xr[k]), qm[k], qalpha[k], qbeta[k], qgamma[k]));
    }
  }
}

template <bool kRelu, class E>
void backward_apply_block_act(const Plan& p, const E* dy, const E* x, const Block& b,
                              const BackwardParamsOf<E>& q, bool training, E* dx, bool stream) {
  if (use_runs(p, b)) {
    backward_apply_runs<kRelu>(p, dy, x, b, q, training, dx, stream);
    return;
  }
  if (!p.channels_last) {
    const int64_t len = b.j1 - b.j0;
    for (int64_t c = b.c0; c < b.c1; ++c)
      for (int64_t i = b.i0; i < b.i1; ++i) {
        const int64_t at = (i * p.c + c) * p.s + b.j0;
        backward_apply_row<kRelu>(dy + at, x + at, kRelu ? q.y + at : nullptr,
                                  kRelu && q.dz != nullptr ? q.dz + at : nullptr, dx + at, len,
                                  q.m[c], q.alpha[c], q.beta[c], q.gamma[c], training, stream);
      }
    return;
  }
  if (p.c > kTileApplyMaxChannels) {
    backward_apply_rows_last<kRelu>(p, dy, x, b, q, training, dx, stream);
    return;
  }
  // Channels-last: a tile of channels at a time down the block's rows, its parameters in
  // registers (see apply.cc).
  const hn::ScalableTag<float> df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  const int64_t width = b.c1 - b.c0;
  const size_t align = static_cast<size_t>(nf) * sizeof(E);
  auto tile = [&](int64_t k0, auto lanes_tag) {
    constexpr int kVecs = decltype(lanes_tag)::value;
    hn::Vec<decltype(df)> vm[kVecs], va[kVecs], vb[kVecs], vg[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      vm[v] = hn::LoadU(df, q.m + k0 + v * nf);
      va[v] = hn::LoadU(df, q.alpha + k0 + v * nf);
      vb[v] = hn::LoadU(df, q.beta + k0 + v * nf);
      vg[v] = hn::LoadU(df, q.gamma + k0 + v * nf);
    }
    for (int64_t r = b.i0; r < b.i1; ++r) {
      const E* gr = dy + r * p.c + k0;
      const E* xr = x + r * p.c + k0;
      const E* yr = kRelu ? q.y + r * p.c + k0 : nullptr;
      E* zr = kRelu && q.dz != nullptr ? q.dz + r * p.c + k0 : nullptr;
      E* out = dx + r * p.c + k0;
      if (k0 == b.c0 && r + kPrefetchRows < b.i1) {
        prefetch_row(gr + kPrefetchRows * p.c, width);
        if (training) prefetch_row(xr + kPrefetchRows * p.c, width);
        if constexpr (kRelu) prefetch_row(yr + kPrefetchRows * p.c, width);
      }
      const bool nt = stream && reinterpret_cast<uintptr_t>(out) % align == 0;
      for (int v = 0; v < kVecs; ++v) {
        hn::Vec<decltype(df)> d;
        if (training) {
          const auto t = hn::MulAdd(vb[v], hn::Sub(load_e(df, xr + v * nf), vm[v]), vg[v]);
          d = hn::MulAdd(va[v], grad<kRelu>(df, gr, yr, zr, v * nf), t);
        } else {
          d = hn::Mul(va[v], grad<kRelu>(df, gr, yr, zr, v * nf));
        }
        if (nt) {
          stream_e(df, d, out + v * nf);
        } else {
          store_e(df, d, out + v * nf);
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
    backward_apply_rows_last<kRelu>(p, dy, x, rest, q, training, dx, stream);
  }
}

}  // namespace

template <class E>
void backward_apply_block(const Plan& p, const E* dy, const E* x, const Block& b,
                          const BackwardParamsOf<E>& q, bool training, E* dx, bool stream) {
  if (q.y != nullptr) {
    backward_apply_block_act<true>(p, dy, x, b, q, training, dx, stream);
  } else {
    backward_apply_block_act<false>(p, dy, x, b, q, training, dx, stream);
  }
}

namespace {

template <class E>
struct BackwardApplyJob {
  const Plan* plan;
  const E* dy;
  const E* x;
  BackwardParamsOf<E> q;
  bool training;
  E* dx;
  bool stream;
};

template <class E>
void backward_apply_task(void* ctx, int t, int n) {
  const BackwardApplyJob<E>& job = *static_cast<const BackwardApplyJob<E>*>(ctx);
  const Plan& p = *job.plan;
  int64_t begin, end;
  split_range(0, static_cast<int64_t>(p.blocks.size()), t, n, &begin, &end);
  for (int64_t k = begin; k < end; ++k)
    backward_apply_block(p, job.dy, job.x, p.blocks[k], job.q, job.training, job.dx, job.stream);
  if (job.stream) hwy::FlushStream();
}

}  // namespace

template <class E>
void backward_apply_with_params(const Geometry& g, const E* dy, const E* x,
                                const BackwardParamsOf<E>& q, bool training, E* dx) {
  const std::shared_ptr<const Plan> plan = get_plan(g, 2);
  BackwardApplyJob<E> job{plan.get(), dy, x, q, training, dx,
                          g.numel() * 4 >= kStreamMinBytes};
  const int threads = call_threads(*plan);
  ThreadPool::instance().run(threads,
                             block_slots(static_cast<int64_t>(plan->blocks.size()), threads),
                             &backward_apply_task<E>, &job);
}

#define BNORM_INSTANTIATE(E)                                                                  \
  template void backward_apply_block<E>(const Plan&, const E*, const E*, const Block&,        \
                                        const BackwardParamsOf<E>&, bool, E*, bool);          \
  template void backward_apply_with_params<E>(const Geometry&, const E*, const E*,            \
                                              const BackwardParamsOf<E>&, bool, E*);
BNORM_INSTANTIATE(float)
BNORM_INSTANTIATE(bfloat16)
BNORM_INSTANTIATE(float16)
#undef BNORM_INSTANTIATE

void backward_apply_pass(const Geometry& g, const float* dy, const float* x, const double* mean,
                         const double* invstd, const double* weight, const double* sum_dy,
                         const double* sum_dy_xhat, bool training, float* dx, int64_t count) {
  float* params = thread_workspace().param_data(4 * g.c);
  float *m = params, *alpha = params + g.c, *beta = params + 2 * g.c, *gamma = params + 3 * g.c;
  const double n = static_cast<double>(count > 0 ? count : g.count());
  for (int64_t c = 0; c < g.c; ++c) {
    const double w = weight ? weight[c] : 1.0;
    m[c] = static_cast<float>(mean[c]);
    alpha[c] = static_cast<float>(w * invstd[c]);
    if (training) {
      const double b = -w * invstd[c] * invstd[c] * sum_dy_xhat[c] / n;
      beta[c] = static_cast<float>(b);
      gamma[c] = static_cast<float>(-w * invstd[c] * sum_dy[c] / n +
                                    b * (static_cast<double>(m[c]) - mean[c]));
    } else {
      beta[c] = 0;
      gamma[c] = 0;
    }
  }
  backward_apply_with_params(g, dy, x, BackwardParams{m, alpha, beta, gamma}, training, dx);
}

}  // namespace bnorm::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace bnorm::cpu {

HWY_EXPORT(backward_apply_pass);

void backward_apply(const Geometry& g, const float* dy, const float* x, const double* mean,
                    const double* invstd, const double* weight, const double* sum_dy,
                    const double* sum_dy_xhat, bool training, float* dx, int64_t count) {
  HWY_DYNAMIC_DISPATCH(backward_apply_pass)
  (g, dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, training, dx, count);
}

}  // namespace bnorm::cpu
#endif  // HWY_ONCE
