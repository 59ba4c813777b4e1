// The fixed-order merges of block partials and the apply parameters (per channel, no SIMD).
#include <algorithm>
#include <cmath>

#include "cpu/cpu.h"
#include "cpu/internal.h"

namespace bnorm::cpu {

void merge_sums(const Plan& p, const double* partials, int64_t c0, int64_t c1, double* sum0,
                double* sum1) {
  for (int64_t c = c0; c < c1; ++c) sum0[c] = sum1[c] = 0;
  // Groups overlapping [c0, c1); within a group, blocks in order.
  for (int64_t group = p.group_of(c0); p.group_first_channel[group] < c1; ++group) {
    for (int64_t k = p.group_first_block[group]; k < p.group_first_block[group + 1]; ++k) {
      const Block& b = p.blocks[k];
      const int64_t lo = std::max(b.c0, c0), hi = std::min(b.c1, c1);
      const double* s0 = partials + b.slot - b.c0;
      const double* s1 = s0 + (b.c1 - b.c0);
      for (int64_t c = lo; c < hi; ++c) {
        sum0[c] += s0[c];
        sum1[c] += s1[c];
      }
    }
  }
}

namespace {

// Channels summed again in fp64, in batches: channels-last sums a batch in one pass over the
// rows, so that many such channels cost a few passes over the tensor, not one strided pass
// each; channels-first sums each channel's rows. Either way a channel's elements are added in
// memory order, so the sums depend on the data only.
constexpr int kResumBatch = 256;

// Calls add(j, k) for every element index k of channel channels[j], j < count.
template <class Add>
void for_each_element(const Plan& p, const int64_t* channels, int count, const Add& add) {
  if (p.channels_last) {
    for (int64_t r = 0; r < p.rows; ++r)
      for (int j = 0; j < count; ++j) add(j, r * p.c + channels[j]);
  } else {
    for (int j = 0; j < count; ++j)
      for (int64_t i = 0; i < p.n; ++i)
        for (int64_t k = 0; k < p.s; ++k) add(j, (i * p.c + channels[j]) * p.s + k);
  }
}

// For each channel c of [c0, c1) in order, select(j, c) says whether c is summed again (and then
// prepares slot j of the batch); a batch at a time, for_each_element calls add and then
// done(j, c) for each of its channels.
template <class Select, class Add, class Done>
void resum_channels(const Plan& p, int64_t c0, int64_t c1, const Select& select, const Add& add,
                    const Done& done) {
  int64_t channels[kResumBatch];
  int count = 0;
  auto flush = [&] {
    for_each_element(p, channels, count, add);
    for (int j = 0; j < count; ++j) done(j, channels[j]);
    count = 0;
  };
  for (int64_t c = c0; c < c1; ++c) {
    if (!select(count, c)) continue;
    channels[count] = c;
    if (++count == kResumBatch) flush();
  }
  flush();
}

}  // namespace

template <class E>
void merge_backward_sums(const Plan& p, const E* dy, const E* x, const E* y, const float* m,
                         const double* partials, int64_t c0, int64_t c1, bool resum, double* sum0,
                         double* sum1) {
  merge_sums(p, partials, c0, c1, sum0, sum1);
  if (!resum) return;
  double mc[kResumBatch], t0[kResumBatch], t1[kResumBatch];
  resum_channels(
      p, c0, c1,
      [&](int j, int64_t c) {
        if (std::isfinite(sum0[c]) && std::isfinite(sum1[c])) return false;
        mc[j] = static_cast<double>(m[c]);
        t0[j] = t1[j] = 0;
        return true;
      },
      [&](int j, int64_t k) {
        const double g =
            (y == nullptr || to_f32(y[k]) > 0) ? static_cast<double>(to_f32(dy[k])) : 0.0;
        t0[j] += g;
        t1[j] += g * (static_cast<double>(to_f32(x[k])) - mc[j]);
      },
      [&](int j, int64_t c) {
        sum0[c] = t0[j];
        sum1[c] = t1[j];
      });
}

template <class E>
void merge_stats(const Plan& p, const E* x, const double* partials, int64_t c0, int64_t c1,
                 const double* pivot, double* mean, double* var) {
  merge_sums(p, partials, c0, c1, mean, var);
  const double n = static_cast<double>(p.n * p.s);
  // Mean and variance from the sums about `centre`, in place of the sums.
  auto finish = [&](int64_t c, double centre, double s1, double s2) {
    const double d = s1 / n;
    double m2 = s2 - s1 * d;
    if (m2 < 0) m2 = 0;  // rounding; NaN passes through
    mean[c] = centre + d;
    var[c] = m2 / n;
  };
  double centre[kResumBatch], t1[kResumBatch], t2[kResumBatch];
  resum_channels(
      p, c0, c1,
      [&](int j, int64_t c) {
        const double s1 = mean[c], s2 = var[c];
        const double d = s1 / n;
        const bool finite = std::isfinite(s1) && std::isfinite(s2);
        if (finite && !(d * d > kMaxPivotDistance * kMaxPivotDistance * ((s2 - s1 * d) / n))) {
          finish(c, pivot[c], s1, s2);
          return false;
        }
        // Summed again in fp64 about the estimated mean, when it is usable (NaN input stays
        // NaN).
        centre[j] = finite ? pivot[c] + d : pivot[c];
        t1[j] = t2[j] = 0;
        return true;
      },
      [&](int j, int64_t k) {
        const double d = static_cast<double>(to_f32(x[k])) - centre[j];
        t1[j] += d;
        t2[j] += d * d;
      },
      [&](int j, int64_t c) { finish(c, centre[j], t1[j], t2[j]); });
}

#define BNORM_MERGE_INSTANTIATE(E)                                                              \
  template void merge_backward_sums<E>(const Plan&, const E*, const E*, const E*, const float*,  \
                                       const double*, int64_t, int64_t, bool, double*, double*); \
  template void merge_stats<E>(const Plan&, const E*, const double*, int64_t, int64_t,          \
                               const double*, double*, double*);
BNORM_MERGE_INSTANTIATE(float)
BNORM_MERGE_INSTANTIATE(bfloat16)
BNORM_MERGE_INSTANTIATE(float16)
#undef BNORM_MERGE_INSTANTIATE

void set_apply_params(double mean, double invstd, double weight, double bias, int64_t c, float* mhi,
                      float* mlo, float* a, float* b) {
  const float hi = static_cast<float>(mean);
  mhi[c] = hi;
  mlo[c] = static_cast<float>(mean - static_cast<double>(hi));
  a[c] = static_cast<float>(weight * invstd);
  b[c] = static_cast<float>(bias);
}

}  // namespace bnorm::cpu
