// The reduction skeleton of the stats and backward_reduce kernels: per channel of a block, the
// two sums  sum u  and  sum u * v  of terms (u, v) that a policy computes from the elements.
//
//   stats (stats.cc):            u = x - pivot, v = u      (sum d, sum d^2)
//   backward_reduce (backward_reduce.cc): u = dy, v = x - m  (sum dy, sum dy * (x - m))
//
// The walk is written once here: fp32 lanes flushed into fp64 every kFlushTerms terms
// (stats.cc gives the error bound), an fp64-lane variant (short channels, the last channels of a
// channels-last block), channels-first rows and channels-last tiles, the masked tail (AVX-512),
// the scalar tail, and the row prefetch. A policy `Terms` provides, for the element at memory
// index `at` and the channel's centre (pivot or m) `vc`:
//
//   static constexpr bool kWideForShortChannels;  // whole block in fp64 lanes when n*s is short
//   float centre32(c); double centre64(c);        // the centre of channel c
//   Vec centre32_vec(df, c); Vec centre64_vec(dd, c);  // centres of channels c.. (a vector)
//   void terms32(df, at, vc, &u, &v);             // fp32 lanes
//   void terms32_masked(df, mask, at, vc, &u, &v);// fp32 lanes, masked-off lanes give u = 0
//   void terms64(dd, at, vc, &u, &v);             // fp32 elements promoted to fp64 lanes
//   void terms_scalar(at, centre, &u, &v);        // one element in fp64
//   void prefetch(at, count);                     // the cache lines of count elements from at
//
// Included once per target by foreach_target.h (after ops-inl.h).
#if defined(BNORM_SRC_CPU_REDUCE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef BNORM_SRC_CPU_REDUCE_INL_H_
#undef BNORM_SRC_CPU_REDUCE_INL_H_
#else
#define BNORM_SRC_CPU_REDUCE_INL_H_
#endif

#include <cstdint>
#include <type_traits>

#include "cpu/internal.h"
#include "cpu/ops-inl.h"
#include "cpu/plan.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace bnorm::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// The fp64 kernel: every element promoted and summed in fp64 lanes. Writes the block's sums at
// out[c - b.c0] and out[stride + c - b.c0].
template <class Terms>
HWY_INLINE void reduce_block_wide(const Plan& p, const Terms& terms, const Block& b, double* out,
                                  int64_t stride) {
  const Terms t = terms;  // a local copy: its pointers stay in registers
  const hn::ScalableTag<double> dd;
  const int64_t nd = static_cast<int64_t>(hn::Lanes(dd));
  const int64_t width = b.c1 - b.c0;
  using VD = hn::Vec<decltype(dd)>;

  if (!p.channels_last) {
    const int64_t len = b.j1 - b.j0;
    for (int64_t c = b.c0; c < b.c1; ++c) {
      const double cc = t.centre64(c);
      const auto vc = hn::Set(dd, cc);
      auto s0a = hn::Zero(dd), s1a = hn::Zero(dd), s0b = hn::Zero(dd), s1b = hn::Zero(dd);
      double t0 = 0, t1 = 0;
      for (int64_t i = b.i0; i < b.i1; ++i) {
        const int64_t at = (i * p.c + c) * p.s + b.j0;
        int64_t k = 0;
        for (; k + 2 * nd <= len; k += 2 * nd) {
          VD u0, v0, u1, v1;
          t.terms64(dd, at + k, vc, &u0, &v0);
          t.terms64(dd, at + k + nd, vc, &u1, &v1);
          s0a = hn::Add(s0a, u0);
          s1a = hn::MulAdd(u0, v0, s1a);
          s0b = hn::Add(s0b, u1);
          s1b = hn::MulAdd(u1, v1, s1b);
        }
        for (; k + nd <= len; k += nd) {
          VD u0, v0;
          t.terms64(dd, at + k, vc, &u0, &v0);
          s0a = hn::Add(s0a, u0);
          s1a = hn::MulAdd(u0, v0, s1a);
        }
        for (; k < len; ++k) {
          double u, v;
          t.terms_scalar(at + k, cc, &u, &v);
          t0 += u;
          t1 += u * v;
        }
      }
      out[c - b.c0] = hn::GetLane(hn::SumOfLanes(dd, hn::Add(s0a, s0b))) + t0;
      out[stride + c - b.c0] = hn::GetLane(hn::SumOfLanes(dd, hn::Add(s1a, s1b))) + t1;
    }
    return;
  }

  // Channels-last: a tile of channels at a time, its accumulators in registers, down all rows
  // of the block (stride C). Accumulators in memory would cost a load and a store per vector and
  // stall on 4 KiB aliasing between those stores and the loads of the inputs.
  auto tile = [&](int64_t k0, auto lanes_tag) {
    constexpr int kVecs = decltype(lanes_tag)::value;
    VD vc[kVecs], s0[kVecs], s1[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      vc[v] = t.centre64_vec(dd, k0 + v * nd);
      s0[v] = hn::Zero(dd);
      s1[v] = hn::Zero(dd);
    }
    int64_t at = b.i0 * p.c + k0;
    for (int64_t r = b.i0; r < b.i1; ++r, at += p.c) {
      // The first tile pulls whole rows ahead into the cache: the tiles walk down rows with a
      // stride of C floats, which hardware prefetchers do not follow across 4 KiB pages.
      if (k0 == b.c0 && r + kPrefetchRows < b.i1) t.prefetch(at + kPrefetchRows * p.c, width);
      for (int v = 0; v < kVecs; ++v) {
        VD u, w;
        t.terms64(dd, at + v * nd, vc[v], &u, &w);
        s0[v] = hn::Add(s0[v], u);
        s1[v] = hn::MulAdd(u, w, s1[v]);
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
    const double cc = t.centre64(k);
    double t0 = 0, t1 = 0;
    for (int64_t r = b.i0; r < b.i1; ++r) {
      double u, v;
      t.terms_scalar(r * p.c + k, cc, &u, &v);
      t0 += u;
      t1 += u * v;
    }
    out[k - b.c0] = t0;
    out[stride + k - b.c0] = t1;
  }
}

// The block's two sums per channel into partials[b.slot + k] and partials[b.slot + width + k]
// (k = c - b.c0, width = b.c1 - b.c0): fp32 lanes for at most kFlushTerms terms, then fp64.
template <class Terms>
HWY_INLINE void reduce_block(const Plan& p, const Terms& terms, const Block& b, double* partials) {
  const Terms t = terms;
  const hn::ScalableTag<float> df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  const int64_t width = b.c1 - b.c0;
  using VF = hn::Vec<decltype(df)>;
  double* out = partials + b.slot;
  if (Terms::kWideForShortChannels && p.n * p.s < kMinFp32LaneCount) {
    reduce_block_wide(p, t, b, out, width);
    return;
  }

  if (!p.channels_last) {
    const int64_t len = b.j1 - b.j0;
    for (int64_t c = b.c0; c < b.c1; ++c) {
      const double cc = t.centre64(c);
      const auto vc = hn::Set(df, t.centre32(c));
      auto f0 = hn::Zero(df), f1 = hn::Zero(df), h0 = hn::Zero(df), h1 = hn::Zero(df);
      Wide<decltype(df)> a0, a1;
      a0.zero();
      a1.zero();
      int64_t count = 0;
      auto flush = [&] {
        a0.add(hn::Add(f0, h0));
        a1.add(hn::Add(f1, h1));
        f0 = f1 = h0 = h1 = hn::Zero(df);
        count = 0;
      };
      double t0 = 0, t1 = 0;
      for (int64_t i = b.i0; i < b.i1; ++i) {
        const int64_t at = (i * p.c + c) * p.s + b.j0;
        int64_t k = 0;
        for (; k + 2 * nf <= len; k += 2 * nf) {
          if (count == kFlushTerms) flush();
          ++count;
          VF u0, v0, u1, v1;
          t.terms32(df, at + k, vc, &u0, &v0);
          t.terms32(df, at + k + nf, vc, &u1, &v1);
          f0 = hn::Add(f0, u0);
          f1 = hn::MulAdd(u0, v0, f1);
          h0 = hn::Add(h0, u1);
          h1 = hn::MulAdd(u1, v1, h1);
        }
        if (k + nf <= len) {
          if (count == kFlushTerms) flush();
          ++count;
          VF u0, v0;
          t.terms32(df, at + k, vc, &u0, &v0);
          f0 = hn::Add(f0, u0);
          f1 = hn::MulAdd(u0, v0, f1);
          k += nf;
        }
#if BNORM_MASKED_TAIL
        if (k < len) {
          if (count == kFlushTerms) flush();
          ++count;
          const auto mk = hn::FirstN(df, static_cast<size_t>(len - k));
          VF u0, v0;
          t.terms32_masked(df, mk, at + k, vc, &u0, &v0);
          f0 = hn::Add(f0, u0);
          f1 = hn::MulAdd(u0, v0, f1);
          k = len;
        }
#endif
        for (; k < len; ++k) {
          double u, v;
          t.terms_scalar(at + k, cc, &u, &v);
          t0 += u;
          t1 += u * v;
        }
      }
      flush();
      out[c - b.c0] = a0.sum() + t0;
      out[width + c - b.c0] = a1.sum() + t1;
    }
    return;
  }

  // Channels-last: a tile of channels at a time down all rows of the block (stride C), its
  // fp32 accumulators and their fp64 totals in registers; the fp32 ones are flushed into the
  // fp64 ones every kFlushTerms rows (see reduce_block_wide).
  auto tile = [&](int64_t k0, auto lanes_tag) {
    constexpr int kVecs = decltype(lanes_tag)::value;
    VF vc[kVecs], s0[kVecs], s1[kVecs];
    Wide<decltype(df)> w0[kVecs], w1[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      vc[v] = t.centre32_vec(df, k0 + v * nf);
      s0[v] = hn::Zero(df);
      s1[v] = hn::Zero(df);
      w0[v].zero();
      w1[v].zero();
    }
    int64_t at = b.i0 * p.c + k0;
    int64_t count = 0;
    for (int64_t r = b.i0; r < b.i1; ++r, at += p.c) {
      if (k0 == b.c0 && r + kPrefetchRows < b.i1) t.prefetch(at + kPrefetchRows * p.c, width);
      if (count == kFlushTerms) {
        for (int v = 0; v < kVecs; ++v) {
          w0[v].add(s0[v]);
          w1[v].add(s1[v]);
          s0[v] = hn::Zero(df);
          s1[v] = hn::Zero(df);
        }
        count = 0;
      }
      ++count;
      for (int v = 0; v < kVecs; ++v) {
        VF u, w;
        t.terms32(df, at + v * nf, vc[v], &u, &w);
        s0[v] = hn::Add(s0[v], u);
        s1[v] = hn::MulAdd(u, w, s1[v]);
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
    reduce_block_wide(p, t, rest, out + (k - b.c0), width);
  }
}

}  // namespace bnorm::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // BNORM_SRC_CPU_REDUCE_INL_H_
