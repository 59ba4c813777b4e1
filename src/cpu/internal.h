// Shared, SIMD-free pieces of the CPU kernels: per-channel parameter sets of the apply kernels
// and the fixed-order merges of block partials (merge.cc).
#ifndef BNORM_SRC_CPU_INTERNAL_H_
#define BNORM_SRC_CPU_INTERNAL_H_

#include <cstdint>
#include <type_traits>

#include "bnorm/tensor.h"
#include "cpu/plan.h"
#include "hwy/cache_control.h"

namespace bnorm::cpu {

// The tensors' element types (float, bfloat16, float16): exact widening to fp32, and the
// narrowing of an fp32 result, round to nearest even (bnorm/tensor.h), which every native
// 16-bit kernel applies once per output element, as the staged path does.
inline float to_f32(float v) { return v; }
inline float to_f32(bfloat16 v) { return to_float(v); }
inline float to_f32(float16 v) { return to_float(v); }
template <class E>
inline E from_f32(float v) {
  if constexpr (std::is_same_v<E, float>) {
    return v;
  } else if constexpr (std::is_same_v<E, bfloat16>) {
    return to_bfloat16(v);
  } else {
    static_assert(std::is_same_v<E, float16>);
    return to_float16(v);
  }
}

// y = ((x - mhi) - mlo) * a + b per channel. mhi + mlo is the fp64 mean split into two floats,
// so x - mean keeps its fp64 accuracy, and a constant channel (x == mhi, mlo == 0) gives exactly
// y = b. Eval passes the running mean as mhi, mlo = 0.
// Fused activation (`relu`): y = max(((x - mhi) - mlo) * a + b [+ z], 0), z null for none.
// E: the tensors' element type (the per-channel vectors are fp32 whatever E is).
template <class E>
struct ApplyParamsOf {
  const float* mhi;
  const float* mlo;
  const float* a;
  const float* b;
  const E* z = nullptr;
  bool relu = false;
  bool mlo_zero = false;  // every mlo is 0 (eval): the kernels may skip it
};
using ApplyParams = ApplyParamsOf<float>;

// dx = alpha * dy + (beta * (x - m) + gamma) per channel (eval: beta = gamma = 0). With `y`
// (the fused ReLU's output) dy is replaced by g = dy * (y > 0), and g is written to dz when
// dz is set.
template <class E>
struct BackwardParamsOf {
  const float* m;
  const float* alpha;
  const float* beta;
  const float* gamma;
  const E* y = nullptr;
  E* dz = nullptr;
};
using BackwardParams = BackwardParamsOf<float>;

// The channel's pivot: its first element. Every block shifts by it, so the merge needs no
// fp32 cancellation and a constant channel sums exact zeros.
template <class E>
inline double channel_pivot(const Plan& p, const E* x, int64_t c) {
  return static_cast<double>(to_f32(p.channels_last ? x[c] : x[c * p.s]));
}

// The two per-channel sums of channels [c0, c1) from the block partials, added in block order
// (the same order for every thread count).
void merge_sums(const Plan& p, const double* partials, int64_t c0, int64_t c1, double* sum0,
                double* sum1);

// merge_sums of the backward_reduce partials (sum dy, sum dy * (x - m); with y not null, dy
// masked by y > 0, the fused ReLU's gradient); with `resum`, a
// channel whose sums are not finite is summed again from dy and x in fp64 (scalar, batched as
// merge_stats batches), so fp32 overflow of dy * (x - m) cannot make a finite result infinite. `resum`
// must be false when dx may already have overwritten dy or x.
template <class E>
void merge_backward_sums(const Plan& p, const E* dy, const E* x, const E* y, const float* m,
                         const double* partials, int64_t c0, int64_t c1, bool resum, double* sum0,
                         double* sum1);

// Channels-last apply kernels walk tiles of channels down the rows, their parameters in
// registers, up to this many channels; wider rows go row by row with the parameters loaded
// per vector (measured: tiles were faster at C = 64, slower at C = 512 and 2048, where rows
// 2-8 KiB apart alias in the L1 and scatter the streaming stores).
inline constexpr int64_t kTileApplyMaxChannels = 128;
// The backward's row-by-row kernel takes this many rows at a time, so that each parameter vector
// loaded serves as many vectors of data (backward_apply.cc).
inline constexpr int64_t kRowsLast = 4;

// Channels-last reductions prefetch this many rows ahead (see stats.cc).
inline constexpr int64_t kPrefetchRows = 16;

// Prefetches the cache lines of `count` elements from `row`.
template <class E>
inline void prefetch_row(const E* row, int64_t count) {
  constexpr int64_t kPerLine = 64 / static_cast<int64_t>(sizeof(E));
  for (int64_t k = 0; k < count; k += kPerLine) hwy::Prefetch(row + k);
}

// The stats kernel sums x - pivot and its square in fp32 lanes for at most this many terms per
// lane, then in fp64 (stats.cc).
inline constexpr int64_t kFlushTerms = 8;

// merge_stats accepts a channel's fp32-lane sums only when |mean - pivot| <= this many standard
// deviations: the variance's error bound grows with the square of that distance (stats.cc).
inline constexpr double kMaxPivotDistance = 3.0;

// Channels with fewer values than this are summed in fp64 lanes throughout: for so few values a
// sequential fp32 two-pass sum (PyTorch's error model, tests/torch/conformance.py) is more
// accurate than shifted fp32 sums whose pivot may lie sqrt(n - 1) std from the mean, and the
// cost of fp64 does not matter.
inline constexpr int64_t kMinFp32LaneCount = 32;

// Mean and biased variance of channels [c0, c1) from the stats partials, whose sums are
// s1 = sum (x - pivot) and s2 = sum (x - pivot)^2: mean = pivot + s1 / n,
// var = (s2 - s1^2 / n) / n. A channel whose sums are not finite, or whose mean lies more than
// kMaxPivotDistance standard deviations from its pivot, is summed again from x in fp64 about
// its estimated mean (scalar; channels-last batches up to 256 such channels in one pass over the
// rows; rare, and the same for any thread count). Uses mean and var as scratch for the sums.
template <class E>
void merge_stats(const Plan& p, const E* x, const double* partials, int64_t c0, int64_t c1,
                 const double* pivot, double* mean, double* var);

// Writes mhi, mlo, a, b of channel c for y = weight * (x - mean) * invstd + bias.
void set_apply_params(double mean, double invstd, double weight, double bias, int64_t c, float* mhi,
                      float* mlo, float* a, float* b);

}  // namespace bnorm::cpu

#endif  // BNORM_SRC_CPU_INTERNAL_H_
