#include "elementwise.h"

#include <bit>
#include <cmath>

// Not under the sanitizers: the loader runs an ifunc resolver before their runtimes start, and
// an instrumented resolver crashes the program at load (seen with ThreadSanitizer).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define BNORM_NN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BNORM_NN_CLONES
#endif

namespace bnorm::nn::detail {
namespace {

// exp(x) for x in [-87.3, 0]: x = k ln2 + r, |r| <= ln2 / 2, exp(r) by its degree-7 Taylor
// polynomial (truncation error < 5e-9 relative), times 2^k built from the exponent bits.
inline float exp_core(float x) {
  x = x < -87.3f ? -87.3f : x;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // exact in 10 bits, so k * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float k = (x * kLog2e + kRound) - kRound;
  const float r = (x - k * kLn2Hi) - k * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = std::bit_cast<float>((static_cast<int32_t>(k) + 127) << 23);
  return p * scale;
}

}  // namespace

float exp_nonpositive(float x) { return exp_core(x); }

BNORM_NN_CLONES
void sigmoid(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float t = exp_core(-std::fabs(v));  // in (0, 1]
    const float s = 1.0f / (1.0f + t);
    // x >= 0: 1 / (1 + e^-x); x < 0: e^x / (1 + e^x) = t * s. NaN: v != v, keep it.
    y[i] = v != v ? v : (v >= 0.0f ? s : t * s);
  }
}

BNORM_NN_CLONES
void sigmoid_backward(const float* __restrict__ y, const float* __restrict__ dy,
                      float* __restrict__ dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] * (y[i] * (1.0f - y[i]));
}

BNORM_NN_CLONES
void relu(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] <= 0.0f ? 0.0f : x[i];
}

BNORM_NN_CLONES
void relu_backward(const float* __restrict__ y, const float* __restrict__ dy,
                   float* __restrict__ dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

BNORM_NN_CLONES
void sgd_update(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ buf,
                int64_t n, float lr, float mu, float wd) {
  if (buf == nullptr) {
    for (int64_t i = 0; i < n; ++i) p[i] -= lr * (g[i] + wd * p[i]);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float d = g[i] + wd * p[i];
    buf[i] = mu * buf[i] + d;
    p[i] -= lr * buf[i];
  }
}

}  // namespace bnorm::nn::detail
