#include "relu_passes.h"

#include "bnorm/tensor.h"

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

// 16-bit elements. inf: the bits of +infinity (bf16 0x7F80, fp16 0x7C00); a magnitude above
// it is a NaN.
namespace {

BNORM_BENCH_CLONES
void relu16(uint16_t* __restrict__ y, size_t n, uint16_t inf) {
  for (size_t i = 0; i < n; ++i) {
    const uint16_t v = y[i];
    const uint16_t mag = v & 0x7FFFu;
    y[i] = (v & 0x8000u) && mag != 0 && mag <= inf ? uint16_t{0} : v;
  }
}

BNORM_BENCH_CLONES
void mask16(const uint16_t* __restrict__ dy, const uint16_t* __restrict__ y,
            uint16_t* __restrict__ g, size_t n, uint16_t inf) {
  for (size_t i = 0; i < n; ++i) {
    const uint16_t v = y[i];
    g[i] = (v & 0x8000u) == 0 && v != 0 && v <= inf ? dy[i] : uint16_t{0};
  }
}

BNORM_BENCH_CLONES
void add_relu_bf16(uint16_t* __restrict__ y, const uint16_t* __restrict__ z, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    float v = bnorm::to_float(bnorm::bfloat16{y[i]}) + bnorm::to_float(bnorm::bfloat16{z[i]});
    v = v < 0.0f ? 0.0f : v;
    y[i] = bnorm::to_bfloat16(v).bits;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// fp16 <-> fp32 with F16C (VCVTPH2PS is exact; VCVTPS2PH with round-to-nearest-even rounds as
// bnorm::to_float16 does), 8 at a time; the tail as scalars.
__attribute__((target("avx2,f16c"))) void add_relu_f16_f16c(uint16_t* y, const uint16_t* z,
                                                               size_t n) {
  size_t i = 0;
  const __m256 zero = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_add_ps(
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(y + i))),
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z + i))));
    v = _mm256_blendv_ps(v, zero, _mm256_cmp_ps(v, zero, _CMP_LT_OQ));  // NaN kept
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < n; ++i) {
    float v = bnorm::to_float(bnorm::float16{y[i]}) + bnorm::to_float(bnorm::float16{z[i]});
    y[i] = bnorm::to_float16(v < 0.0f ? 0.0f : v).bits;
  }
}
#endif

void add_relu_f16(uint16_t* y, const uint16_t* z, size_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2")) {
    add_relu_f16_f16c(y, z, n);
    return;
  }
#endif
  for (size_t i = 0; i < n; ++i) {
    float v = bnorm::to_float(bnorm::float16{y[i]}) + bnorm::to_float(bnorm::float16{z[i]});
    y[i] = bnorm::to_float16(v < 0.0f ? 0.0f : v).bits;
  }
}

}  // namespace

void relu_inplace16(uint16_t* y, size_t n, bool bf16) {
  relu16(y, n, bf16 ? 0x7F80u : 0x7C00u);
}

void add_relu_inplace16(uint16_t* y, const uint16_t* z, size_t n, bool bf16) {
  if (bf16) add_relu_bf16(y, z, n);
  else add_relu_f16(y, z, n);
}

void relu_mask16(const uint16_t* dy, const uint16_t* y, uint16_t* g, size_t n, bool bf16) {
  mask16(dy, y, g, n, bf16 ? 0x7F80u : 0x7C00u);
}

}  // namespace bench
