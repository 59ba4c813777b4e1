#include "relu_passes.h"

// One clone per instruction set, picked at load time (as src/nn/elementwise.cc does), so the
// plain loops below run as wide as bnorm's dispatched kernels.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define BNORM_BENCH_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BNORM_BENCH_CLONES
#endif

namespace bench {

BNORM_BENCH_CLONES
void relu_inplace(float* __restrict__ y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] = y[i] < 0.0f ? 0.0f : y[i];
}

BNORM_BENCH_CLONES
void add_relu_inplace(float* __restrict__ y, const float* __restrict__ z, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const float v = y[i] + z[i];
    y[i] = v < 0.0f ? 0.0f : v;
  }
}

BNORM_BENCH_CLONES
void relu_mask(const float* __restrict__ dy, const float* __restrict__ y, float* __restrict__ g,
               size_t n) {
  for (size_t i = 0; i < n; ++i) g[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

}  // namespace bench
