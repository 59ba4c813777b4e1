// finalize, the one per-channel step every implementation shares (C values, no SIMD).
#include <cmath>

#include "kernels.h"

namespace bnorm::detail {

void finalize(const Geometry& g, const double* mean, const double* var, double eps, double factor,
              double* invstd, float* running_mean, float* running_var) {
  const double n = static_cast<double>(g.count());
  for (int64_t c = 0; c < g.c; ++c) {
    invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    if (running_mean == nullptr) continue;
    // The stored variance is the unbiased estimate (Bessel's correction), as PyTorch stores it.
    const double unbiased_var = var[c] * n / (n - 1.0);
    running_mean[c] = static_cast<float>((1.0 - factor) * running_mean[c] + factor * mean[c]);
    running_var[c] = static_cast<float>((1.0 - factor) * running_var[c] + factor * unbiased_var);
  }
}

}  // namespace bnorm::detail
