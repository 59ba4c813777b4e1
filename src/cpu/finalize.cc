// finalize (per channel, no SIMD: C values) and the fixed-order merges of block partials.
#include <algorithm>
#include <cmath>

#include "cpu/cpu.h"
#include "cpu/internal.h"

namespace bnorm::cpu {

void finalize(const Geometry& g, const double* mean, const double* var, double eps, double factor,
              double* invstd, float* running_mean, float* running_var) {
  const double n = static_cast<double>(g.count());
  for (int64_t c = 0; c < g.c; ++c) {
    invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    if (running_mean == nullptr) continue;
    const double unbiased_var = var[c] * n / (n - 1.0);  // Bessel, as PyTorch stores it
    running_mean[c] = static_cast<float>((1.0 - factor) * running_mean[c] + factor * mean[c]);
    running_var[c] = static_cast<float>((1.0 - factor) * running_var[c] + factor * unbiased_var);
  }
}

void merge_sums(const Plan& p, const double* partials, int64_t c0, int64_t c1, double* sum0,
                double* sum1) {
  for (int64_t c = c0; c < c1; ++c) sum0[c] = sum1[c] = 0;
  // Groups overlapping [c0, c1); within a group, blocks in order.
  for (int64_t group = c0 / p.group_channels; group * p.group_channels < c1; ++group) {
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

// sum (x - pivot) and sum (x - pivot)^2 of channel c in fp64, in memory order.
void channel_sums_fp64(const Plan& p, const float* x, int64_t c, double pivot, double* s1,
                       double* s2) {
  double t1 = 0, t2 = 0;
  if (p.channels_last) {
    for (int64_t r = 0; r < p.rows; ++r) {
      const double d = static_cast<double>(x[r * p.c + c]) - pivot;
      t1 += d;
      t2 += d * d;
    }
  } else {
    for (int64_t i = 0; i < p.n; ++i) {
      const float* row = x + (i * p.c + c) * p.s;
      for (int64_t j = 0; j < p.s; ++j) {
        const double d = static_cast<double>(row[j]) - pivot;
        t1 += d;
        t2 += d * d;
      }
    }
  }
  *s1 = t1;
  *s2 = t2;
}

}  // namespace

void merge_backward_sums(const Plan& p, const float* dy, const float* x, const float* m,
                         const double* partials, int64_t c0, int64_t c1, bool resum, double* sum0,
                         double* sum1) {
  merge_sums(p, partials, c0, c1, sum0, sum1);
  for (int64_t c = c0; resum && c < c1; ++c) {
    if (std::isfinite(sum0[c]) && std::isfinite(sum1[c])) continue;
    const double mc = static_cast<double>(m[c]);
    double t0 = 0, t1 = 0;
    auto add = [&](int64_t k) {
      const double g = dy[k];
      t0 += g;
      t1 += g * (static_cast<double>(x[k]) - mc);
    };
    if (p.channels_last) {
      for (int64_t r = 0; r < p.rows; ++r) add(r * p.c + c);
    } else {
      for (int64_t i = 0; i < p.n; ++i)
        for (int64_t j = 0; j < p.s; ++j) add((i * p.c + c) * p.s + j);
    }
    sum0[c] = t0;
    sum1[c] = t1;
  }
}

void merge_stats(const Plan& p, const float* x, const double* partials, int64_t c0, int64_t c1,
                 const double* pivot, double* mean, double* var) {
  merge_sums(p, partials, c0, c1, mean, var);
  const double n = static_cast<double>(p.n * p.s);
  // Channels to sum again, in batches: channels-last sums a batch in one pass over the rows,
  // so that many such channels cost a few passes over the tensor, not one strided pass each.
  constexpr int kBatch = 256;
  int64_t redo[kBatch];
  double centre[kBatch], t1[kBatch], t2[kBatch];
  int count = 0;
  auto finish = [&](int64_t c, double ctr, double s1, double s2) {
    const double d = s1 / n;
    double m2 = s2 - s1 * d;
    if (m2 < 0) m2 = 0;  // rounding; NaN passes through
    mean[c] = ctr + d;
    var[c] = m2 / n;
  };
  auto flush = [&] {
    for (int j = 0; j < count; ++j) t1[j] = t2[j] = 0;
    if (p.channels_last) {
      for (int64_t r = 0; r < p.rows; ++r) {
        const float* row = x + r * p.c;
        for (int j = 0; j < count; ++j) {
          const double d = static_cast<double>(row[redo[j]]) - centre[j];
          t1[j] += d;
          t2[j] += d * d;
        }
      }
    } else {
      for (int j = 0; j < count; ++j) channel_sums_fp64(p, x, redo[j], centre[j], &t1[j], &t2[j]);
    }
    for (int j = 0; j < count; ++j) finish(redo[j], centre[j], t1[j], t2[j]);
    count = 0;
  };
  for (int64_t c = c0; c < c1; ++c) {
    const double s1 = mean[c], s2 = var[c];
    const double d = s1 / n;
    const double m2 = s2 - s1 * d;
    const bool finite = std::isfinite(s1) && std::isfinite(s2);
    if (finite && !(d * d > kMaxPivotDistance * kMaxPivotDistance * (m2 / n))) {
      finish(c, pivot[c], s1, s2);
      continue;
    }
    // Sum again in fp64 about the estimated mean, when it is usable (NaN input stays NaN).
    redo[count] = c;
    centre[count] = finite ? pivot[c] + d : pivot[c];
    if (++count == kBatch) flush();
  }
  flush();
}

void set_apply_params(double mean, double invstd, double weight, double bias, int64_t c, float* mhi,
                      float* mlo, float* a, float* b) {
  const float hi = static_cast<float>(mean);
  mhi[c] = hi;
  mlo[c] = static_cast<float>(mean - static_cast<double>(hi));
  a[c] = static_cast<float>(weight * invstd);
  b[c] = static_cast<float>(bias);
}

}  // namespace bnorm::cpu
