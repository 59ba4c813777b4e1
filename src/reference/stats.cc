#include "reference/reference.h"

namespace bnorm::ref {

template <class T>
void stats(const Geometry& g, const T* x, double* mean, double* var) {
  const double n = static_cast<double>(g.count());
  for (int64_t c = 0; c < g.c; ++c) {
    // Pass 1: the mean.
    double sum = 0;
    for (int64_t i = 0; i < g.n; ++i)
      for (int64_t j = 0; j < g.s; ++j) sum += static_cast<double>(x[g.index(i, c, j)]);
    const double m = sum / n;
    // Pass 2: squared deviations from it. Never E[x^2] - E[x]^2, which cancels catastrophically
    // when |mean| >> std. For a constant channel every deviation is exactly 0.
    double sum_sq = 0;
    for (int64_t i = 0; i < g.n; ++i)
      for (int64_t j = 0; j < g.s; ++j) {
        const double d = static_cast<double>(x[g.index(i, c, j)]) - m;
        sum_sq += d * d;
      }
    mean[c] = m;
    var[c] = sum_sq / n;  // biased: this is what normalizes
  }
}

template void stats<float>(const Geometry&, const float*, double*, double*);
template void stats<double>(const Geometry&, const double*, double*, double*);

}  // namespace bnorm::ref
