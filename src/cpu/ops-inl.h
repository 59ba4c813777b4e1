// Per-target declarations of the block kernels (defined in stats.cc, apply.cc,
// backward_reduce.cc, backward_apply.cc), so that passes.cc composes them within one target:
// one dynamic dispatch per call. Included once per target by foreach_target.h.
#if defined(BNORM_SRC_CPU_OPS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef BNORM_SRC_CPU_OPS_INL_H_
#undef BNORM_SRC_CPU_OPS_INL_H_
#else
#define BNORM_SRC_CPU_OPS_INL_H_
#endif

#include <array>
#include <cstddef>
#include <cstdint>

#include "cpu/internal.h"
#include "cpu/plan.h"
#include "hwy/highway.h"
#include "kernels.h"

HWY_BEFORE_NAMESPACE();
namespace bnorm::cpu::HWY_NAMESPACE {

using detail::Geometry;
namespace hn = hwy::HWY_NAMESPACE;

// Whether the target has masked loads and stores that never touch masked-off lanes (AVX-512):
// the row kernels then finish a row with one masked vector instead of a scalar loop.
#undef BNORM_MASKED_TAIL
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
#define BNORM_MASKED_TAIL 1
#else
#define BNORM_MASKED_TAIL 0
#endif

// The fused ReLU's gradient: dy where y > 0, else 0 (NaN y gives 0, as y > 0 is false).
// dy is loaded on its own and passed through an empty asm, so that the compiler cannot fold the
// select into a load of dy masked by the compare: such a load waits for y's data before it can
// issue, and the fused backward stalled on it (32x2048x7x7 channels-first: 1.56x slower).
template <class DF>
HWY_INLINE hn::Vec<DF> relu_grad(DF df, hn::Vec<DF> y, hn::Vec<DF> dy) {
#if HWY_ARCH_X86 && HWY_TARGET != HWY_SCALAR && HWY_TARGET != HWY_EMU128 && \
    (HWY_COMPILER_GCC || HWY_COMPILER_CLANG)
  asm("" : "+v"(dy.raw));
#endif
  return hn::IfThenElseZero(hn::Gt(y, hn::Zero(df)), dy);
}

// The reductions sum in fp32 lanes and flush into fp64 (stats.cc).
// The fp64 totals of one fp32 vector's lanes, in registers: two fp64 vectors (one on the
// scalar target).
template <class DF>
struct Wide {
#if HWY_TARGET == HWY_SCALAR
  using DD = hn::Rebind<double, DF>;
#else
  using DD = hn::Rebind<double, hn::Half<DF>>;
#endif
  hn::Vec<DD> lo, hi;
  void zero() { lo = hi = hn::Zero(DD()); }
  void add(hn::Vec<DF> f) {
#if HWY_TARGET == HWY_SCALAR
    lo = hn::Add(lo, hn::PromoteTo(DD(), f));
#else
    const hn::Half<DF> dh;
    lo = hn::Add(lo, hn::PromoteTo(DD(), hn::LowerHalf(dh, f)));
    hi = hn::Add(hi, hn::PromoteTo(DD(), hn::UpperHalf(dh, f)));
#endif
  }
  double sum() const { return hn::GetLane(hn::SumOfLanes(DD(), hn::Add(lo, hi))); }
  void store(double* out) const {
    const DD dd;
    hn::StoreU(lo, dd, out);
#if HWY_TARGET != HWY_SCALAR
    hn::StoreU(hi, dd, out + hn::Lanes(dd));
#endif
  }
};

// The row helper of the apply kernels: writes out[k] for k in [0, len) of one contiguous row,
// vec(k) giving the full vector at k, masked(mask, k) the last partial one (targets with
// BNORM_MASKED_TAIL) and one(k) a single element. With `stream` and a row of at least four
// vectors, the body uses streaming stores after a scalar prologue up to the first aligned output.
// Each element is read before it is written, so out may equal the inputs.
template <class DF, class VecAt, class MaskedAt, class OneAt>
HWY_INLINE void write_row(DF df, float* out, int64_t len, bool stream, const VecAt& vec,
                          const MaskedAt& masked, const OneAt& one) {
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  int64_t k = 0;
  if (stream && len >= 4 * nf) {
    const size_t align = static_cast<size_t>(nf) * sizeof(float);
    for (; k < len && reinterpret_cast<uintptr_t>(out + k) % align != 0; ++k) out[k] = one(k);
    for (; k + nf <= len; k += nf) hn::Stream(vec(k), df, out + k);
  }
  for (; k + nf <= len; k += nf) hn::StoreU(vec(k), df, out + k);
#if BNORM_MASKED_TAIL
  if (k < len) {
    const auto mk = hn::FirstN(df, static_cast<size_t>(len - k));
    hn::BlendedStore(masked(mk, k), mk, df, out + k);
    return;
  }
#else
  (void)masked;
#endif
  for (; k < len; ++k) out[k] = one(k);
}

// Whether a block's apply runs through write_run (below): channels-first blocks of whole rows
// with Lanes <= s < kRunMaxS, on targets with a native FMA. Elsewhere hn::MulAdd rounds twice
// and the scalar one() (std::fma) once, so moving elements between the two (row tails become
// vector lanes) would change bits of the legacy SSE targets. Above kRunMaxS a row's prologue and
// tail are a small share of it and the row path is kept (runs measured 1.2-1.3x faster at 7x7,
// 1.1-1.3x at 14x14, within noise at 28x28, and not faster at 56x56 and 112x112).
inline constexpr int64_t kRunMaxS = 1024;
inline bool use_runs(const Plan& p, const Block& b) {
#if HWY_NATIVE_FMA
  return !p.channels_last && b.j0 == 0 && b.j1 == p.s && p.s < kRunMaxS &&
         p.s >= static_cast<int64_t>(hn::Lanes(hn::ScalableTag<float>()));
#else
  (void)p;
  (void)b;
  return false;
#endif
}

// The channels-first run helper of the apply kernels: writes out[k] for k in [0, channels * s),
// one batch item's rows of `channels` consecutive channels, each s contiguous floats. Per-row
// loops cost a misaligned head, a partial tail and the parameter broadcasts for every s floats,
// which dominates for small s (7x7: s = 49, three vectors); this walks the run as one row, and a
// vector that straddles two channels takes each lane's parameters from its own channel. Needs
// s >= Lanes(df), so that a vector spans two channels at most.
//   load(ch) gives the kN parameter vectors of channel ch (relative to the run's first), each
//       broadcast; vec(P, k) the full vector at k with per-lane parameters P (an array of kN
//       vectors); masked(P, mask, k) the last partial one (BNORM_MASKED_TAIL targets);
//       one(ch, k) a single element of channel ch.
// Every element gets the same operations on its own channel's parameters as in a row of its
// own, so the values are those of write_row. Streaming stores as write_row.
template <size_t kN, class DF, class LoadAt, class VecAt, class MaskedAt, class OneAt>
HWY_INLINE void write_run(DF df, float* out, int64_t channels, int64_t s, bool stream,
                          const LoadAt& load, const VecAt& vec, const MaskedAt& masked,
                          const OneAt& one) {
  using V = hn::Vec<DF>;
  using P = std::array<V, kN>;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  const int64_t len = channels * s;
  int64_t k = 0;
  int64_t ch = 0;   // the channel of element k
  int64_t end = s;  // one past the last element of channel ch
  P cur = load(int64_t{0});
  const bool nt = stream && len >= 4 * nf;
  // A head up to the first aligned output (fewer than nf <= s elements, so in channel 0): the
  // vectors after it neither split cache lines on the stores nor, when x is aligned as out is,
  // on the loads.
  const size_t align = static_cast<size_t>(nf) * sizeof(float);
  const int64_t head = static_cast<int64_t>(
      (align - reinterpret_cast<uintptr_t>(out) % align) % align / sizeof(float));
  if (len >= 4 * nf && head > 0) {
#if BNORM_MASKED_TAIL
    const auto mk = hn::FirstN(df, static_cast<size_t>(head));
    hn::BlendedStore(masked(cur, mk, int64_t{0}), mk, df, out);
    k = head;
#else
    for (; k < head; ++k) out[k] = one(int64_t{0}, k);
#endif
  }
  auto body = [&](auto store) {
    for (;;) {
      {  // the full vectors of channel ch, a tight loop as write_row's
        const P c = cur;
        for (; k + nf <= end; k += nf) store(vec(c, k), out + k);
      }
      if (k == end) {
        if (k == len) return;
        ++ch;
        end += s;
        cur = load(ch);
        continue;
      }
      if (k + nf > len) return;  // the tail, in channel ch
      // Lanes [0, end - k) are channel ch's, the others channel ch + 1's.
      const P next = load(ch + 1);
      const auto first = hn::FirstN(df, static_cast<size_t>(end - k));
      P mixed;
      for (size_t v = 0; v < kN; ++v) mixed[v] = hn::IfThenElse(first, cur[v], next[v]);
      store(vec(mixed, k), out + k);
      k += nf;
      ++ch;
      end += s;
      cur = next;
    }
  };
  if (nt) {
    body([&](V v, float* at) { hn::Stream(v, df, at); });
  } else {
    body([&](V v, float* at) { hn::StoreU(v, df, at); });
  }
  // The rest, fewer than nf <= s elements, lies in the last channel (ch).
#if BNORM_MASKED_TAIL
  if (k < len) {
    const auto mk = hn::FirstN(df, static_cast<size_t>(len - k));
    hn::BlendedStore(masked(cur, mk, k), mk, df, out + k);
    return;
  }
#else
  (void)masked;
#endif
  for (; k < len; ++k) out[k] = one(ch, k);
}

// Per channel of the block: sum (x - pivot[c]) and sum (x - pivot[c])^2, into
// partials[slot + k] and partials[slot + width + k] (k = c - c0, width = c1 - c0), summed in
// fp32 lanes for kFlushTerms terms at most, then in fp64 (stats.cc). pivot[c] must be an fp32
// value.
void stats_block(const Plan& p, const float* x, const Block& b, const double* pivot,
                 double* partials);

// y = ((x - mhi) - mlo) * a + b over the block (fused: q.relu, q.z); streaming stores when
// `stream`.
void apply_block(const Plan& p, const float* x, const Block& b, const ApplyParams& q, float* y,
                 bool stream);

// The apply kernel over the whole tensor on the pool (forward_eval's pass).
void apply_with_params(const Geometry& g, const float* x, const ApplyParams& q, float* y);

// Per channel of the block: sum dy and sum dy * (x - m[c]) into the partial slots, summed as
// stats_block sums. With y not null (the fused ReLU's output), dy masked by y > 0.
void backward_reduce_block(const Plan& p, const float* dy, const float* x, const float* y,
                           const Block& b, const float* m, double* partials);

// dx = alpha * dy + beta * (x - m) + gamma over the block; streaming stores when `stream`.
// Eval (`training` false): dx = alpha * dy, x unread. With q.y, dy masked by y > 0 (and written
// to q.dz when set).
void backward_apply_block(const Plan& p, const float* dy, const float* x, const Block& b,
                          const BackwardParams& q, bool training, float* dx, bool stream);

// The backward apply kernel over the whole tensor on the pool.
void backward_apply_with_params(const Geometry& g, const float* dy, const float* x,
                                const BackwardParams& q, bool training, float* dx);

}  // namespace bnorm::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // BNORM_SRC_CPU_OPS_INL_H_
