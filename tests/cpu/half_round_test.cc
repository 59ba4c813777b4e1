// The SIMD conversions of the 16-bit kernels (src/cpu/ops-inl.h: widen, narrow) against
// bnorm::to_float / to_bfloat16 / to_float16 on every compiled Highway target: every 16-bit
// pattern widened, and fp32 patterns narrowed (every upper half with several lower halves, the
// ties and their neighbours, and random ones).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "half_round_test.cc"
// clang-format off
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// clang-format on

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "bnorm/tensor.h"
#include "cpu/ops-inl.h"
#include "hwy/highway.h"
#include "hwy/tests/test_util-inl.h"

HWY_BEFORE_NAMESPACE();
namespace bnorm_test::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
namespace ops = bnorm::cpu::HWY_NAMESPACE;

// fp32 patterns: every upper half with lower halves 0, 1, 0x7FFF, 0x8000 (ties), 0x8001,
// 0xFFFF and one random; fp16 ties and neighbours (bit 12 patterns); random words.
std::vector<uint32_t> patterns() {
  std::vector<uint32_t> p;
  std::mt19937 rng(12345);
  for (uint32_t hi = 0; hi < 0x10000; ++hi)
    for (uint32_t lo : {0u, 1u, 0x7FFFu, 0x8000u, 0x8001u, 0xFFFFu, static_cast<uint32_t>(rng() & 0xFFFFu)})
      p.push_back(hi << 16 | lo);
  for (uint32_t hi = 0; hi < 0x10000; ++hi)
    for (uint32_t lo : {0x0FFFu, 0x1000u, 0x1001u, 0x3000u, 0x2FFFu, 0x3001u})
      p.push_back(hi << 16 | (lo ^ (hi & 1) << 13));
  for (int k = 0; k < 400000; ++k) p.push_back(static_cast<uint32_t>(rng()));
  return p;
}

template <class E>
uint16_t scalar_round(float f) {
  if constexpr (std::is_same_v<E, bnorm::bfloat16>) {
    return bnorm::to_bfloat16(f).bits;
  } else {
    return bnorm::to_float16(f).bits;
  }
}

template <class E>
void check_narrow(const std::vector<uint32_t>& p) {
  const hn::ScalableTag<float> df;
  const hn::Rebind<uint16_t, decltype(df)> d16;
  const size_t n = hn::Lanes(df);
  std::vector<float> in(n);
  std::vector<uint16_t> out(n);
  size_t bad = 0;
  for (size_t k = 0; k + n <= p.size(); k += n) {
    std::memcpy(in.data(), p.data() + k, n * sizeof(float));
    hn::StoreU(ops::narrow<E>(df, hn::LoadU(df, in.data())), d16, out.data());
    for (size_t i = 0; i < n; ++i) {
      const uint16_t want = scalar_round<E>(in[i]);
      if (out[i] != want && bad++ < 5)
        ADD_FAILURE() << hwy::TargetName(HWY_TARGET) << " narrow 0x" << std::hex << p[k + i]
                      << ": 0x" << out[i] << ", want 0x" << want;
    }
  }
  EXPECT_EQ(bad, 0u);
}

// Widening is exact; fp16 NaNs may come back quiet (F16C sets the quiet bit of a signalling
// NaN), which no output can tell: every operation on a NaN quiets it, and a NaN passed through
// (dz) rounds to the same fp16 pattern either way.
template <class E>
void check_widen() {
  const hn::ScalableTag<float> df;
  const hn::Rebind<uint16_t, decltype(df)> d16;
  const size_t n = hn::Lanes(df);
  std::vector<uint16_t> in(n);
  std::vector<float> out(n);
  size_t bad = 0;
  for (uint32_t k = 0; k < 0x10000; k += static_cast<uint32_t>(n)) {
    for (size_t i = 0; i < n; ++i) in[i] = static_cast<uint16_t>(k + i);
    hn::StoreU(ops::widen<E>(df, hn::LoadU(d16, in.data())), df, out.data());
    for (size_t i = 0; i < n; ++i) {
      const float want = bnorm::to_float(E{in[i]});
      uint32_t a, b;
      std::memcpy(&a, &out[i], 4);
      std::memcpy(&b, &want, 4);
      if (want != want) a |= 0x400000u, b |= 0x400000u;
      if (a != b && bad++ < 5)
        ADD_FAILURE() << hwy::TargetName(HWY_TARGET) << " widen 0x" << std::hex << in[i] << ": 0x"
                      << a << ", want 0x" << b;
      // The round trip is the identity (NaN quieted).
      if (want == want && scalar_round<E>(out[i]) != in[i] && bad++ < 5)
        ADD_FAILURE() << "round trip 0x" << std::hex << in[i];
    }
  }
  EXPECT_EQ(bad, 0u);
}

void TestConversions() {
  static const std::vector<uint32_t> p = patterns();
  check_narrow<bnorm::bfloat16>(p);
  check_narrow<bnorm::float16>(p);
  check_widen<bnorm::bfloat16>();
  check_widen<bnorm::float16>();
}

}  // namespace bnorm_test::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace bnorm_test {
HWY_BEFORE_TEST(HalfRoundTest);
HWY_EXPORT_AND_TEST_P(HalfRoundTest, TestConversions);
}  // namespace bnorm_test
#endif
