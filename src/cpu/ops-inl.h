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
#include <type_traits>

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

// The tensors' elements in fp32 lanes: E is float, bfloat16 or float16 (bnorm/tensor.h). A
// vector of Lanes(df) elements is loaded and widened exactly to fp32, and fp32 lanes are
// narrowed on store rounding to nearest even as bnorm::to_bfloat16 / to_float16 round, so a
// 16-bit kernel computes exactly what the fp32 kernel computes on the widened data and rounds
// each output once. For float these are the plain loads and stores.
//
// fp16 conversions use F16C (VCVTPH2PS: exact, but a signalling NaN comes back quiet, which no
// output can tell: any operation on it quiets it, and passed through (dz) it rounds to the same
// fp16 pattern; VCVTPS2PH with the default MXCSR: round to
// nearest even, fp32 subnormals handled, NaN quieted keeping its top payload bits, overflow to
// Inf, as to_float16) on AVX2 and above. Highway's fp16 conversions of the older targets
// truncate and turn NaN into Inf, so there each lane goes through bnorm's scalar functions.
// bfloat16 is integer arithmetic on every target (Highway's x86 bf16 demotion truncates).
#undef BNORM_F16C
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2 && !defined(HWY_DISABLE_F16C)
#define BNORM_F16C 1
#else
#define BNORM_F16C 0
#endif

// Streamed outputs (write_row, write_run) begin with the elements up to the first output
// aligned to Lanes(df) * sizeof(E) bytes: for a 16-bit tensor aligned to Lanes(df) elements,
// the same elements as for an fp32 tensor aligned to Lanes(df) floats. On the FMA-less targets
// those elements are computed by the scalar code, whose bits differ (see use_runs), so the
// 16-bit passes stream on the fp32 geometry (numel * 4 >= kStreamMinBytes) to give the fp32
// passes' bits.

template <class E>
HWY_INLINE const uint16_t* bits_of(const E* p) {
  return reinterpret_cast<const uint16_t*>(p);
}
template <class E>
HWY_INLINE uint16_t* bits_of(E* p) {
  return reinterpret_cast<uint16_t*>(p);
}

// The 16-bit patterns of Lanes(df) elements, widened to fp32 lanes (exact).
template <class E, class DF>
HWY_INLINE hn::Vec<DF> widen(DF df, hn::Vec<hn::Rebind<uint16_t, DF>> v) {
  if constexpr (std::is_same_v<E, bfloat16>) {
    const hn::RebindToUnsigned<DF> du;
    return hn::BitCast(df, hn::ShiftLeft<16>(hn::PromoteTo(du, v)));
  } else {
    static_assert(std::is_same_v<E, float16>);
#if BNORM_F16C
    const hn::Rebind<hwy::float16_t, DF> dh;
    return hn::PromoteTo(df, hn::BitCast(dh, v));
#else
    const hn::Rebind<uint16_t, DF> d16;
    HWY_ALIGN uint16_t in[HWY_MAX_BYTES / sizeof(float)];
    HWY_ALIGN float out[HWY_MAX_BYTES / sizeof(float)];
    hn::Store(v, d16, in);
    for (size_t i = 0; i < hn::Lanes(df); ++i) out[i] = to_float(float16{in[i]});
    return hn::Load(df, out);
#endif
  }
}

// fp32 lanes rounded to nearest even to the 16-bit patterns of E (NaN kept quiet): the vector
// form of bnorm::to_bfloat16 / to_float16.
template <class E, class DF>
HWY_INLINE hn::Vec<hn::Rebind<uint16_t, DF>> narrow(DF df, hn::Vec<DF> v) {
  const hn::Rebind<uint16_t, DF> d16;
  if constexpr (std::is_same_v<E, bfloat16>) {
    const hn::RebindToUnsigned<DF> du;
    const hn::RebindToSigned<DF> di;
    const auto bits = hn::BitCast(du, v);
    const auto high = hn::ShiftRight<16>(bits);
    // NaN: the high half with the quiet bit set. Else bits + 0x7FFF + (bit 16), the high half:
    // no overflow, the largest non-NaN pattern being 0xFF800000 (-Inf).
    const auto rounded = hn::ShiftRight<16>(
        hn::Add(bits, hn::Add(hn::Set(du, 0x7FFFu), hn::And(high, hn::Set(du, 1u)))));
    const auto quiet = hn::Or(high, hn::Set(du, 0x40u));
    const auto r = hn::IfThenElse(hn::RebindMask(du, hn::IsNaN(v)), quiet, rounded);
    // Every lane is below 2^16, so the saturating demotion is a truncation.
    return hn::DemoteTo(d16, hn::BitCast(di, r));
  } else {
    static_assert(std::is_same_v<E, float16>);
#if BNORM_F16C
    const hn::Rebind<hwy::float16_t, DF> dh;
    return hn::BitCast(d16, hn::DemoteTo(dh, v));
#else
    HWY_ALIGN float in[HWY_MAX_BYTES / sizeof(float)];
    HWY_ALIGN uint16_t out[HWY_MAX_BYTES / sizeof(float)];
    hn::Store(v, df, in);
    for (size_t i = 0; i < hn::Lanes(df); ++i) out[i] = to_float16(in[i]).bits;
    return hn::Load(d16, out);
#endif
  }
}

template <class DF, class E>
HWY_INLINE hn::Vec<DF> load_e(DF df, const E* p) {
  if constexpr (std::is_same_v<E, float>) {
    return hn::LoadU(df, p);
  } else {
    return widen<E>(df, hn::LoadU(hn::Rebind<uint16_t, DF>(), bits_of(p)));
  }
}

// Masked-off lanes load +0. mk is a FirstN mask (the masked heads and tails).
template <class DF, class M, class E>
HWY_INLINE hn::Vec<DF> masked_load_e(DF df, M mk, const E* p) {
  if constexpr (std::is_same_v<E, float>) {
    return hn::MaskedLoad(mk, df, p);
  } else {
    const hn::Rebind<uint16_t, DF> d16;
    return widen<E>(df, hn::MaskedLoad(hn::FirstN(d16, hn::CountTrue(df, mk)), d16, bits_of(p)));
  }
}

template <class DF, class E>
HWY_INLINE void store_e(DF df, hn::Vec<DF> v, E* p) {
  if constexpr (std::is_same_v<E, float>) {
    hn::StoreU(v, df, p);
  } else {
    hn::StoreU(narrow<E>(df, v), hn::Rebind<uint16_t, DF>(), bits_of(p));
  }
}

// p aligned to Lanes(df) * sizeof(E) bytes. On SSE4 and SSSE3 a 16-bit vector is half a
// register, and Highway's Stream of a partial vector writes 16 bytes: a plain store there.
template <class DF, class E>
HWY_INLINE void stream_e(DF df, hn::Vec<DF> v, E* p) {
  if constexpr (std::is_same_v<E, float>) {
    hn::Stream(v, df, p);
  } else {
#if HWY_TARGET == HWY_SSE4 || HWY_TARGET == HWY_SSSE3
    hn::StoreU(narrow<E>(df, v), hn::Rebind<uint16_t, DF>(), bits_of(p));
#else
    hn::Stream(narrow<E>(df, v), hn::Rebind<uint16_t, DF>(), bits_of(p));
#endif
  }
}

template <class DF, class M, class E>
HWY_INLINE void blended_store_e(DF df, M mk, hn::Vec<DF> v, E* p) {
  if constexpr (std::is_same_v<E, float>) {
    hn::BlendedStore(v, mk, df, p);
  } else {
    const hn::Rebind<uint16_t, DF> d16;
    hn::BlendedStore(narrow<E>(df, v), hn::FirstN(d16, hn::CountTrue(df, mk)), d16, bits_of(p));
  }
}

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
// out's elements are E: the fp32 results are rounded on store (see load_e).
template <class DF, class E, class VecAt, class MaskedAt, class OneAt>
HWY_INLINE void write_row(DF df, E* out, int64_t len, bool stream, const VecAt& vec,
                          const MaskedAt& masked, const OneAt& one) {
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  int64_t k = 0;
  if (stream && len >= 4 * nf) {
    const size_t align = static_cast<size_t>(nf) * sizeof(E);
    for (; k < len && reinterpret_cast<uintptr_t>(out + k) % align != 0; ++k)
      out[k] = from_f32<E>(one(k));
    for (; k + nf <= len; k += nf) stream_e(df, vec(k), out + k);
  }
  for (; k + nf <= len; k += nf) store_e(df, vec(k), out + k);
#if BNORM_MASKED_TAIL
  if (k < len) {
    const auto mk = hn::FirstN(df, static_cast<size_t>(len - k));
    blended_store_e(df, mk, masked(mk, k), out + k);
    return;
  }
#else
  (void)masked;
#endif
  for (; k < len; ++k) out[k] = from_f32<E>(one(k));
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
template <size_t kN, class DF, class E, class LoadAt, class VecAt, class MaskedAt, class OneAt>
HWY_INLINE void write_run(DF df, E* out, int64_t channels, int64_t s, bool stream,
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
  const size_t align = static_cast<size_t>(nf) * sizeof(E);
  const int64_t head = static_cast<int64_t>(
      (align - reinterpret_cast<uintptr_t>(out) % align) % align / sizeof(E));
  if (len >= 4 * nf && head > 0) {
#if BNORM_MASKED_TAIL
    const auto mk = hn::FirstN(df, static_cast<size_t>(head));
    blended_store_e(df, mk, masked(cur, mk, int64_t{0}), out);
    k = head;
#else
    for (; k < head; ++k) out[k] = from_f32<E>(one(int64_t{0}, k));
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
    body([&](V v, E* at) { stream_e(df, v, at); });
  } else {
    body([&](V v, E* at) { store_e(df, v, at); });
  }
  // The rest, fewer than nf <= s elements, lies in the last channel (ch).
#if BNORM_MASKED_TAIL
  if (k < len) {
    const auto mk = hn::FirstN(df, static_cast<size_t>(len - k));
    blended_store_e(df, mk, masked(cur, mk, k), out + k);
    return;
  }
#else
  (void)masked;
#endif
  for (; k < len; ++k) out[k] = from_f32<E>(one(ch, k));
}

// The block kernels, for E = float, bfloat16 and float16 (the tensors' element type; explicit
// instantiations in their .cc files). The 16-bit ones widen each element exactly to fp32,
// compute what the fp32 ones compute and round each output to nearest even (load_e).

// Per channel of the block: sum (x - pivot[c]) and sum (x - pivot[c])^2, into
// partials[slot + k] and partials[slot + width + k] (k = c - c0, width = c1 - c0), summed in
// fp32 lanes for kFlushTerms terms at most, then in fp64 (stats.cc). pivot[c] must be an fp32
// value.
template <class E>
void stats_block(const Plan& p, const E* x, const Block& b, const double* pivot,
                 double* partials);

// y = ((x - mhi) - mlo) * a + b over the block (fused: q.relu, q.z); streaming stores when
// `stream`.
template <class E>
void apply_block(const Plan& p, const E* x, const Block& b, const ApplyParamsOf<E>& q, E* y,
                 bool stream);

// The apply kernel over the whole tensor on the pool (forward_eval's pass).
template <class E>
void apply_with_params(const Geometry& g, const E* x, const ApplyParamsOf<E>& q, E* y);

// Per channel of the block: sum dy and sum dy * (x - m[c]) into the partial slots, summed as
// stats_block sums. With y not null (the fused ReLU's output), dy masked by y > 0.
template <class E>
void backward_reduce_block(const Plan& p, const E* dy, const E* x, const E* y, const Block& b,
                           const float* m, double* partials);

// dx = alpha * dy + beta * (x - m) + gamma over the block; streaming stores when `stream`.
// Eval (`training` false): dx = alpha * dy, x unread. With q.y, dy masked by y > 0 (and written
// to q.dz when set).
template <class E>
void backward_apply_block(const Plan& p, const E* dy, const E* x, const Block& b,
                          const BackwardParamsOf<E>& q, bool training, E* dx, bool stream);

// The backward apply kernel over the whole tensor on the pool.
template <class E>
void backward_apply_with_params(const Geometry& g, const E* dy, const E* x,
                                const BackwardParamsOf<E>& q, bool training, E* dx);

}  // namespace bnorm::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // BNORM_SRC_CPU_OPS_INL_H_
