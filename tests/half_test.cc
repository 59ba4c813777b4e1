// bf16 and fp16 tensors through the public API: the conversions, every pass against the fp32
// pass on the same (widened) values rounded once, against an fp64 oracle within the format's
// unit roundoff, statistics at large offsets, determinism over thread counts, the layer, and the
// errors of mixed or unknown dtypes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <string>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/tensor.h"
#include "test_util.h"

namespace bnorm_test {
namespace {

using bnorm::bfloat16;
using bnorm::DType;
using bnorm::float16;

// What the tests need of each 16-bit format.
template <class E>
struct Format;
template <>
struct Format<bfloat16> {
  static constexpr DType kDType = DType::kBFloat16;
  static constexpr double kUnitRoundoff = 1.0 / 256;  // 2^-8
  static bfloat16 from(float f) { return bnorm::to_bfloat16(f); }
};
template <>
struct Format<float16> {
  static constexpr DType kDType = DType::kFloat16;
  static constexpr double kUnitRoundoff = 1.0 / 2048;  // 2^-11
  static float16 from(float f) { return bnorm::to_float16(f); }
};

template <class E>
std::vector<E> Narrow(const std::vector<float>& v) {
  std::vector<E> out(v.size());
  for (size_t k = 0; k < v.size(); ++k) out[k] = Format<E>::from(v[k]);
  return out;
}
template <class E>
std::vector<float> Widen(const std::vector<E>& v) {
  std::vector<float> out(v.size());
  for (size_t k = 0; k < v.size(); ++k) out[k] = bnorm::to_float(v[k]);
  return out;
}
template <class E>
::testing::AssertionResult SameBits(const std::vector<E>& a, const std::vector<E>& b) {
  for (size_t k = 0; k < a.size(); ++k)
    if (a[k].bits != b[k].bits)
      return ::testing::AssertionFailure()
             << "element " << k << ": 0x" << std::hex << a[k].bits << " vs 0x" << b[k].bits;
  return ::testing::AssertionSuccess();
}

// A 16-bit tensor and the same values in fp32 (exact).
template <class E>
struct Pair {
  Tensor f;            // fp32, the widened values
  std::vector<E> h;    // 16-bit
  bnorm::ConstTensorView hview() const { return bnorm::ConstTensorView(h.data(), f.dims, f.layout); }
  bnorm::TensorView hview() { return bnorm::TensorView(h.data(), f.dims, f.layout); }
};
template <class E>
Pair<E> RandomPair(std::mt19937_64& rng, std::vector<int64_t> dims, Layout layout,
                   double offset = 0.0, double scale = 1.0) {
  Pair<E> p;
  const std::vector<float> offsets(static_cast<size_t>(dims[1]), static_cast<float>(offset));
  Tensor t = RandomTensor(rng, std::move(dims), layout, offsets, scale);
  p.h = Narrow<E>(t.data);
  t.data = Widen(p.h);
  p.f = std::move(t);
  return p;
}

// ---------------------------------------------------------------------------------------------
// The conversions.

// The nearest representable value, ties to even, by brute force over the format's finite values.
template <class E>
double NearestBySearch(double v, const std::vector<double>& finite_sorted,
                       const std::vector<uint16_t>& bits_sorted, uint16_t* bits) {
  auto it = std::lower_bound(finite_sorted.begin(), finite_sorted.end(), v);
  size_t hi = static_cast<size_t>(it - finite_sorted.begin());
  if (hi == finite_sorted.size()) hi = finite_sorted.size() - 1;
  const size_t lo = hi == 0 ? 0 : hi - 1;
  const double dlo = std::fabs(v - finite_sorted[lo]), dhi = std::fabs(finite_sorted[hi] - v);
  size_t pick = dlo < dhi ? lo : hi;
  if (dlo == dhi) pick = (bits_sorted[lo] & 1) == 0 ? lo : hi;
  *bits = bits_sorted[pick];
  return finite_sorted[pick];
}

template <class E>
void CheckConversion() {
  // Every finite non-negative pattern, sorted by value (the patterns are monotonic).
  std::vector<double> values;
  std::vector<uint16_t> patterns;
  for (uint32_t b = 0; b < 0x8000; ++b) {
    const float f = bnorm::to_float(E{static_cast<uint16_t>(b)});
    if (!std::isfinite(f)) break;
    values.push_back(f);
    patterns.push_back(static_cast<uint16_t>(b));
    // Widening then narrowing is the identity, both signs.
    ASSERT_EQ(Format<E>::from(f).bits, b);
    ASSERT_EQ(Format<E>::from(-f).bits, b | 0x8000u);
  }
  const double max_finite = values.back();
  const double next_up = max_finite + (max_finite - values[values.size() - 2]);
  std::mt19937_64 rng(11);
  for (int k = 0; k < 200000; ++k) {
    uint32_t u = static_cast<uint32_t>(rng()) & 0x7FFFFFFFu;
    if (k % 4 == 0) u = (u & 0xFFFF0000u) | 0x8000u;  // exact ties
    float f;
    std::memcpy(&f, &u, sizeof f);
    if (std::isnan(f)) continue;
    const uint16_t got = Format<E>::from(f).bits;
    if (std::isinf(f) || static_cast<double>(f) >= (max_finite + next_up) / 2) {
      // Beyond the midpoint to the next power of two: infinity (the midpoint itself rounds to
      // the even neighbour, which is infinity's pattern).
      ASSERT_EQ(bnorm::to_float(E{got}), std::numeric_limits<float>::infinity()) << f;
      continue;
    }
    uint16_t want = 0;
    NearestBySearch<E>(f, values, patterns, &want);
    ASSERT_EQ(got, want) << "value " << f << " (bits 0x" << std::hex << u << ")";
  }
  // NaN stays NaN, quiet, with its sign, whatever its payload (the lowest bits included).
  for (uint32_t payload : {1u, 0x1FFFu, 0x400000u, 0x7FFFFFu, 0x10000u}) {
    for (uint32_t sign : {0u, 0x80000000u}) {
      const uint32_t u = sign | 0x7F800000u | payload;
      float f;
      std::memcpy(&f, &u, sizeof f);
      const E h = Format<E>::from(f);
      EXPECT_TRUE(std::isnan(bnorm::to_float(h))) << std::hex << u;
      EXPECT_EQ(std::signbit(bnorm::to_float(h)), sign != 0);
    }
  }
}

TEST(HalfConversion, Bfloat16RoundsToNearestEven) { CheckConversion<bfloat16>(); }
TEST(HalfConversion, Float16RoundsToNearestEven) { CheckConversion<float16>(); }

// ---------------------------------------------------------------------------------------------
// Every pass: the 16-bit call equals the fp32 call on the widened values, its tensor outputs
// rounded once to nearest even, and its fp32 outputs (statistics, gradients of the parameters)
// bit for bit.

struct Case {
  std::vector<int64_t> dims;
  Layout layout;
};

std::vector<Case> Cases() {
  return {{{4, 3}, Layout::kChannelsFirst},          {{7, 5, 9}, Layout::kChannelsFirst},
          {{3, 17, 7, 7}, Layout::kChannelsFirst},   {{3, 17, 7, 7}, Layout::kChannelsLast},
          {{2, 40, 5, 6}, Layout::kChannelsLast},    {{2, 3, 2, 3, 5}, Layout::kChannelsLast},
          {{5, 33, 3, 11}, Layout::kChannelsFirst},  {{64, 48}, Layout::kChannelsLast}};
}

template <class E>
void CheckPassesEqualFp32(bnorm::Backend backend) {
  BNORM_SEEDED_RNG(rng, 1601);
  bnorm::CallOptions options;
  options.backend = backend;
  for (const Case& cs : Cases()) {
    for (int variant = 0; variant < 4; ++variant) {  // plain, relu, relu + z, in-place
      SCOPED_TRACE(DimsString(cs.dims) + " " + LayoutTag(cs.layout) + " variant " +
                   std::to_string(variant));
      const bool relu = variant == 1 || variant == 2;
      const bool add = variant == 2;
      const bool in_place = variant == 3;
      Pair<E> x = RandomPair<E>(rng, cs.dims, cs.layout, 0.5, 2.0);
      Pair<E> z = RandomPair<E>(rng, cs.dims, cs.layout);
      const int64_t c = cs.dims[1];
      const std::vector<float> w = RandomVector(rng, c, 0.5, 1.5);
      const std::vector<float> b = RandomVector(rng, c, -1, 1);

      // Training forward.
      std::vector<float> rm16(c, 0.1f), rv16(c, 0.9f), rm32 = rm16, rv32 = rv16;
      std::vector<float> sm16(c), si16(c), sm32(c), si32(c);
      int64_t nbt16 = 3, nbt32 = 3;
      Pair<E> y;
      y.f = Tensor(cs.dims, cs.layout);
      y.h.assign(x.h.size(), E{0});
      std::vector<E> xh_in_place = x.h;
      bnorm::ForwardTrainArgs a16;
      a16.x = in_place ? bnorm::ConstTensorView(xh_in_place.data(), cs.dims, cs.layout) : x.hview();
      a16.weight = w;
      a16.bias = b;
      a16.running_mean = rm16;
      a16.running_var = rv16;
      a16.num_batches_tracked = &nbt16;
      a16.y = in_place ? bnorm::TensorView(xh_in_place.data(), cs.dims, cs.layout) : y.hview();
      a16.save_mean = sm16;
      a16.save_invstd = si16;
      bnorm::ForwardTrainArgs a32 = a16;
      a32.x = x.f.cview();
      a32.y = y.f.view();
      a32.running_mean = rm32;
      a32.running_var = rv32;
      a32.num_batches_tracked = &nbt32;
      a32.save_mean = sm32;
      a32.save_invstd = si32;
      if (relu) {
        ASSERT_TRUE(IsOk(bnorm::forward_train_relu(
            a16, add ? z.hview() : bnorm::ConstTensorView(), options)));
        ASSERT_TRUE(IsOk(bnorm::forward_train_relu(
            a32, add ? z.f.cview() : bnorm::ConstTensorView(), options)));
      } else {
        ASSERT_TRUE(IsOk(bnorm::forward_train(a16, options)));
        ASSERT_TRUE(IsOk(bnorm::forward_train(a32, options)));
      }
      const std::vector<E> want_y = Narrow<E>(y.f.data);
      EXPECT_TRUE(SameBits(in_place ? xh_in_place : y.h, want_y));
      EXPECT_TRUE(BitIdentical(sm16, sm32));
      EXPECT_TRUE(BitIdentical(si16, si32));
      EXPECT_TRUE(BitIdentical(rm16, rm32));
      EXPECT_TRUE(BitIdentical(rv16, rv32));
      EXPECT_EQ(nbt16, nbt32);

      // Eval forward.
      bnorm::ForwardEvalArgs e16;
      e16.x = x.hview();
      e16.weight = w;
      e16.bias = b;
      e16.running_mean = rm16;
      e16.running_var = rv16;
      std::vector<E> ye(x.h.size(), E{0});
      Tensor ye32(cs.dims, cs.layout);
      e16.y = bnorm::TensorView(ye.data(), cs.dims, cs.layout);
      bnorm::ForwardEvalArgs e32 = e16;
      e32.x = x.f.cview();
      e32.y = ye32.view();
      if (relu) {
        ASSERT_TRUE(IsOk(bnorm::forward_eval_relu(e16, add ? z.hview() : bnorm::ConstTensorView(),
                                                  options)));
        ASSERT_TRUE(IsOk(bnorm::forward_eval_relu(
            e32, add ? z.f.cview() : bnorm::ConstTensorView(), options)));
      } else {
        ASSERT_TRUE(IsOk(bnorm::forward_eval(e16, options)));
        ASSERT_TRUE(IsOk(bnorm::forward_eval(e32, options)));
      }
      EXPECT_TRUE(SameBits(ye, Narrow<E>(ye32.data)));

      // Backward, training and eval (relu: through the forward's y, with dz).
      Pair<E> dy = RandomPair<E>(rng, cs.dims, cs.layout);
      const std::vector<E> yh = in_place ? xh_in_place : y.h;
      const std::vector<float> yf = Widen(yh);
      for (bool training : {true, false}) {
        SCOPED_TRACE(training ? "training backward" : "eval backward");
        std::vector<E> dx16(x.h.size(), E{0}), dz16(x.h.size(), E{0});
        std::vector<E> dy_copy = dy.h;  // in place: dx over dy
        Tensor dx32(cs.dims, cs.layout), dz32(cs.dims, cs.layout);
        std::vector<float> dw16(c), db16(c), dw32(c), db32(c);
        bnorm::BackwardArgs g16;
        g16.dy = in_place ? bnorm::ConstTensorView(dy_copy.data(), cs.dims, cs.layout) : dy.hview();
        g16.x = x.hview();
        g16.weight = w;
        g16.training = training;
        g16.save_mean = sm16;
        g16.save_invstd = si16;
        g16.running_mean = rm16;
        g16.running_var = rv16;
        g16.dx = in_place ? bnorm::TensorView(dy_copy.data(), cs.dims, cs.layout)
                          : bnorm::TensorView(dx16.data(), cs.dims, cs.layout);
        g16.dweight = dw16;
        g16.dbias = db16;
        bnorm::BackwardArgs g32 = g16;
        g32.dy = dy.f.cview();
        g32.x = x.f.cview();
        g32.dx = dx32.view();
        g32.dweight = dw32;
        g32.dbias = db32;
        if (relu) {
          const bnorm::ConstTensorView y16(yh.data(), cs.dims, cs.layout);
          const bnorm::ConstTensorView y32(yf.data(), cs.dims, cs.layout);
          ASSERT_TRUE(IsOk(bnorm::backward_relu(
              g16, y16, bnorm::TensorView(dz16.data(), cs.dims, cs.layout), options)));
          ASSERT_TRUE(IsOk(bnorm::backward_relu(g32, y32, dz32.view(), options)));
          EXPECT_TRUE(SameBits(dz16, Narrow<E>(dz32.data)));
        } else {
          ASSERT_TRUE(IsOk(bnorm::backward(g16, options)));
          ASSERT_TRUE(IsOk(bnorm::backward(g32, options)));
        }
        EXPECT_TRUE(SameBits(in_place ? dy_copy : dx16, Narrow<E>(dx32.data)));
        EXPECT_TRUE(BitIdentical(dw16, dw32));
        EXPECT_TRUE(BitIdentical(db16, db32));
      }
    }
  }
}

TEST(HalfTensors, Bfloat16PassesAreTheFp32PassesRoundedOnce) {
  CheckPassesEqualFp32<bfloat16>(bnorm::Backend::kAuto);
}
TEST(HalfTensors, Float16PassesAreTheFp32PassesRoundedOnce) {
  CheckPassesEqualFp32<float16>(bnorm::Backend::kAuto);
}
TEST(HalfTensors, ReferenceBackendTakesThemToo) {
  CheckPassesEqualFp32<bfloat16>(bnorm::Backend::kReference);
}

// ---------------------------------------------------------------------------------------------
// Against an fp64 oracle on the same (rounded) inputs: the outputs are within the format's unit
// roundoff of the exact values (plus the fp32 computation's error, far smaller), and the
// statistics within fp32's.

template <class E>
void CheckAgainstFp64(double offset, double scale) {
  BNORM_SEEDED_RNG(rng, 1602);
  const double u = Format<E>::kUnitRoundoff;
  for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast}) {
    SCOPED_TRACE(std::string(LayoutTag(layout)) + " offset " + std::to_string(offset));
    const std::vector<int64_t> dims = {6, 9, 5, 7};
    Pair<E> x = RandomPair<E>(rng, dims, layout, offset, scale);
    Pair<E> dy = RandomPair<E>(rng, dims, layout);
    const int64_t c = dims[1];
    const std::vector<float> w = RandomVector(rng, c, 0.5, 1.5);
    const std::vector<float> b = RandomVector(rng, c, -1, 1);
    const double eps = 1e-5;
    std::vector<E> y(x.h.size()), dx(x.h.size());
    std::vector<float> sm(c), si(c), dw(c), db(c);
    bnorm::ForwardTrainArgs a;
    a.x = x.hview();
    a.weight = w;
    a.bias = b;
    a.eps = eps;
    a.y = bnorm::TensorView(y.data(), dims, layout);
    a.save_mean = sm;
    a.save_invstd = si;
    ASSERT_TRUE(IsOk(bnorm::forward_train(a)));
    bnorm::BackwardArgs g;
    g.dy = dy.hview();
    g.x = x.hview();
    g.weight = w;
    g.save_mean = sm;
    g.save_invstd = si;
    g.dx = bnorm::TensorView(dx.data(), dims, layout);
    g.dweight = dw;
    g.dbias = db;
    ASSERT_TRUE(IsOk(bnorm::backward(g)));

    const ChannelStats st = BatchStats(x.f);
    const double n = static_cast<double>(x.f.count());
    for (int64_t ch = 0; ch < c; ++ch) {
      const double m = st.mean[ch], v = st.var[ch];
      const double invstd = 1.0 / std::sqrt(v + eps);
      const double sd = std::sqrt(v);
      ASSERT_TRUE(Near(sm[ch], m, 2e-7 * std::fabs(m) + 1e-6 * sd, "mean"));
      ASSERT_TRUE(Near(si[ch], invstd, 1e-5 * invstd, "invstd"));
      double sum_dy = 0, sum_dy_xhat = 0;
      for (int64_t i = 0; i < x.f.n(); ++i)
        for (int64_t j = 0; j < x.f.s(); ++j) {
          sum_dy += dy.f.at(i, ch, j);
          sum_dy_xhat += dy.f.at(i, ch, j) * (x.f.at(i, ch, j) - m) * invstd;
        }
      ASSERT_TRUE(Near(db[ch], sum_dy, 1e-5 * (1 + std::fabs(sum_dy)) * std::sqrt(n), "dbias"));
      ASSERT_TRUE(
          Near(dw[ch], sum_dy_xhat, 1e-5 * (1 + std::fabs(sum_dy_xhat)) * std::sqrt(n), "dweight"));
      for (int64_t i = 0; i < x.f.n(); ++i)
        for (int64_t j = 0; j < x.f.s(); ++j) {
          const auto k = static_cast<size_t>(x.f.index(i, ch, j));
          const double xhat = (x.f.at(i, ch, j) - m) * invstd;
          const double want_y = w[ch] * xhat + b[ch];
          const double scale_y = std::fabs(w[ch] * xhat) + std::fabs(b[ch]);
          ASSERT_TRUE(Near(bnorm::to_float(y[k]), want_y, u * std::fabs(want_y) + 1e-5 * scale_y,
                           "y at " + std::to_string(k)));
          const double d = dy.f.at(i, ch, j);
          const double want_dx = w[ch] * invstd / n * (n * d - sum_dy - xhat * sum_dy_xhat);
          const double scale_dx = std::fabs(w[ch]) * invstd *
                                  (std::fabs(d) + std::fabs(sum_dy) / n +
                                   std::fabs(xhat * sum_dy_xhat) / n);
          ASSERT_TRUE(Near(bnorm::to_float(dx[k]), want_dx,
                           u * std::fabs(want_dx) + 1e-5 * scale_dx, "dx at " + std::to_string(k)));
        }
    }
  }
}

TEST(HalfTensors, Bfloat16WithinUnitRoundoffOfFp64) { CheckAgainstFp64<bfloat16>(0.0, 1.0); }
TEST(HalfTensors, Float16WithinUnitRoundoffOfFp64) { CheckAgainstFp64<float16>(0.0, 1.0); }
// Large offsets: bf16 holds about 3 digits, so the values at 1e6 lie on a grid of 4096 or 8192;
// the spread is set to span many grid steps. The statistics of those values stay exact to fp32's
// precision (the pivot shift makes x - pivot exact).
TEST(HalfTensors, Bfloat16StatisticsAtOffsetsUpTo1e6) {
  CheckAgainstFp64<bfloat16>(1e3, 30.0);
  CheckAgainstFp64<bfloat16>(1e5, 3000.0);
  CheckAgainstFp64<bfloat16>(1e6, 3e4);
  CheckAgainstFp64<bfloat16>(-1e6, 1e5);
}

// ---------------------------------------------------------------------------------------------

TEST(HalfTensors, BitwiseTheSameForAnyThreadCount) {
  BNORM_SEEDED_RNG(rng, 1603);
  for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast}) {
    const std::vector<int64_t> dims = {16, 24, 14, 14};
    Pair<bfloat16> x = RandomPair<bfloat16>(rng, dims, layout, 1.0, 3.0);
    Pair<bfloat16> dy = RandomPair<bfloat16>(rng, dims, layout);
    std::vector<bfloat16> first_y, first_dx;
    std::vector<float> first_sm;
    for (int threads : {1, 2, 3, 8}) {
      SCOPED_TRACE(std::string(LayoutTag(layout)) + " threads " + std::to_string(threads));
      bnorm::set_num_threads(threads);
      std::vector<bfloat16> y(x.h.size()), dx(x.h.size());
      std::vector<float> sm(dims[1]), si(dims[1]);
      bnorm::ForwardTrainArgs a;
      a.x = x.hview();
      a.y = bnorm::TensorView(y.data(), dims, layout);
      a.save_mean = sm;
      a.save_invstd = si;
      ASSERT_TRUE(IsOk(bnorm::forward_train(a)));
      bnorm::BackwardArgs g;
      g.dy = dy.hview();
      g.x = x.hview();
      g.save_mean = sm;
      g.save_invstd = si;
      g.dx = bnorm::TensorView(dx.data(), dims, layout);
      ASSERT_TRUE(IsOk(bnorm::backward(g)));
      if (threads == 1) {
        first_y = y;
        first_dx = dx;
        first_sm = sm;
      } else {
        EXPECT_TRUE(SameBits(y, first_y));
        EXPECT_TRUE(SameBits(dx, first_dx));
        EXPECT_TRUE(BitIdentical(sm, first_sm));
      }
    }
    bnorm::set_num_threads(0);
  }
}

// A call with an extension is staged through fp32 copies; a large tensor has its conversions
// split over the threads in chunks. Special values included (NaN, Inf, fp32 subnormals, ties).
template <class E>
void CheckLargeStagedCall() {
  BNORM_SEEDED_RNG(rng, 1606);
  const std::vector<int64_t> dims = {3, 40, 50, 51};  // 306,000 elements
  Pair<E> x = RandomPair<E>(rng, dims, Layout::kChannelsLast, 0.0, 2.0);
  // Channel 5 gets an Inf, channel 7 a NaN (their statistics and outputs go non-finite),
  // channel 9 values of a 1e-30 scale (fp32 subnormal outputs after a 1e-10 weight).
  x.h[5] = Format<E>::from(std::numeric_limits<float>::infinity());
  x.h[40 * 7 + 7] = E{static_cast<uint16_t>(std::is_same_v<E, bfloat16> ? 0x7FC1 : 0x7E01)};
  for (int64_t r = 0; r < 3 * 50 * 51; r += 3) x.h[static_cast<size_t>(r * 40 + 9)] = Format<E>::from(1e-3f * static_cast<float>(r % 7));
  x.f.data = Widen(x.h);
  std::vector<float> w(40, 1.0f), b(40, 0.0f);
  w[9] = 1e-36f;
  for (int threads : {1, 2}) {
    bnorm::set_num_threads(threads);
    std::vector<float> rm(40, 0.0f), rv(40, 1.0f), rm_out16(40), rv_out16(40), rm_out32(40),
        rv_out32(40);
    std::vector<E> y16(x.h.size());
    Tensor y32(dims, Layout::kChannelsLast);
    bnorm::ForwardTrainArgs a;
    a.x = x.hview();
    a.y = bnorm::TensorView(y16.data(), dims, Layout::kChannelsLast);
    a.weight = w;
    a.bias = b;
    a.running_mean = rm;
    a.running_var = rv;
    a.running_mean_out = rm_out16;
    a.running_var_out = rv_out16;
    ASSERT_TRUE(IsOk(bnorm::forward_train(a)));
    a.x = x.f.cview();
    a.y = y32.view();
    a.running_mean_out = rm_out32;
    a.running_var_out = rv_out32;
    ASSERT_TRUE(IsOk(bnorm::forward_train(a)));
    EXPECT_TRUE(SameBits(y16, Narrow<E>(y32.data)));
    EXPECT_EQ(0, std::memcmp(rm_out16.data(), rm_out32.data(), 40 * sizeof(float)));
    EXPECT_EQ(0, std::memcmp(rv_out16.data(), rv_out32.data(), 40 * sizeof(float)));
  }
  bnorm::set_num_threads(0);
}

TEST(HalfTensors, LargeStagedCallsRoundEveryElementOnce) {
  CheckLargeStagedCall<bfloat16>();
  CheckLargeStagedCall<float16>();
}

TEST(HalfTensors, LayerTakesThem) {
  BNORM_SEEDED_RNG(rng, 1604);
  const std::vector<int64_t> dims = {4, 6, 5, 5};
  Pair<bfloat16> x = RandomPair<bfloat16>(rng, dims, Layout::kChannelsLast, 2.0, 1.5);
  Pair<bfloat16> dy = RandomPair<bfloat16>(rng, dims, Layout::kChannelsLast);
  bnorm::BatchNormOptions opt;
  opt.num_features = 6;
  bnorm::BatchNorm l16, l32;
  ASSERT_TRUE(IsOk(bnorm::BatchNorm::create(opt, &l16)));
  ASSERT_TRUE(IsOk(bnorm::BatchNorm::create(opt, &l32)));
  std::vector<bfloat16> y(x.h.size()), dx(x.h.size());
  Tensor y32(dims, Layout::kChannelsLast), dx32(dims, Layout::kChannelsLast);
  ASSERT_TRUE(IsOk(l16.forward(x.hview(), bnorm::TensorView(y.data(), dims, Layout::kChannelsLast))));
  ASSERT_TRUE(IsOk(l32.forward(x.f.cview(), y32.view())));
  EXPECT_TRUE(SameBits(y, Narrow<bfloat16>(y32.data)));
  ASSERT_TRUE(IsOk(l16.backward(dy.hview(), x.hview(),
                                bnorm::TensorView(dx.data(), dims, Layout::kChannelsLast))));
  ASSERT_TRUE(IsOk(l32.backward(dy.f.cview(), x.f.cview(), dx32.view())));
  EXPECT_TRUE(SameBits(dx, Narrow<bfloat16>(dx32.data)));
  EXPECT_TRUE(BitIdentical(l16.running_var(), l32.running_var()));
  EXPECT_TRUE(BitIdentical(l16.weight_grad(), l32.weight_grad()));
  // Eval mode, in place.
  l16.eval();
  l32.eval();
  std::vector<bfloat16> xi = x.h;
  Tensor xi32 = x.f;
  ASSERT_TRUE(IsOk(l16.forward(bnorm::ConstTensorView(xi.data(), dims, Layout::kChannelsLast),
                               bnorm::TensorView(xi.data(), dims, Layout::kChannelsLast))));
  ASSERT_TRUE(IsOk(l32.forward(xi32.cview(), xi32.view())));
  EXPECT_TRUE(SameBits(xi, Narrow<bfloat16>(xi32.data)));
}

TEST(HalfTensors, MixedOrUnknownDtypesAreRefusedWithNothingWritten) {
  const std::vector<int64_t> dims = {4, 3, 5};
  std::vector<bfloat16> x(60, bnorm::to_bfloat16(1.5f)), y16(60, bnorm::to_bfloat16(-3.0f));
  std::vector<float> y32(60, -7.0f);
  std::vector<float> rm(3, 0.25f), rv(3, 2.0f);
  Snapshot snap;
  snap.Add("y32", y32).Add("running_mean", rm).Add("running_var", rv);
  const std::vector<bfloat16> y16_before = y16;

  bnorm::ForwardTrainArgs a;
  a.x = bnorm::ConstTensorView(x.data(), dims);
  a.y = bnorm::TensorView(y32.data(), dims);
  a.running_mean = rm;
  a.running_var = rv;
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(a), "y: dtype float32 must equal x's dtype bfloat16"));

  // An unknown dtype value.
  a.x = bnorm::ConstTensorView(static_cast<const void*>(x.data()), static_cast<DType>(3), dims);
  a.y = bnorm::TensorView(y16.data(), dims);
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(a), "x: dtype must be float32 (0), bfloat16 (1) or "
                                                 "float16 (2), got invalid(3)"));

  // y one bf16 element past x: a partial overlap, counted in 2-byte elements.
  std::vector<bfloat16> buf(61, bnorm::to_bfloat16(1.0f));
  buf[7] = bnorm::to_bfloat16(2.0f);
  const std::vector<bfloat16> buf_before = buf;
  a.x = bnorm::ConstTensorView(buf.data(), dims);
  a.y = bnorm::TensorView(buf.data() + 1, dims);
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(a), "y: partially overlaps x"));
  // 60 elements further on, the same buffers are disjoint (no false alarm from a 4-byte size).
  std::vector<bfloat16> big(120, bnorm::to_bfloat16(1.0f));
  big[3] = bnorm::to_bfloat16(2.0f);
  a.x = bnorm::ConstTensorView(big.data(), dims);
  a.y = bnorm::TensorView(big.data() + 60, dims);
  std::vector<float> rm2(3, 0.0f), rv2(3, 1.0f);
  a.running_mean = rm2;
  a.running_var = rv2;
  EXPECT_TRUE(IsOk(bnorm::forward_train(a)));

  EXPECT_TRUE(snap.Unchanged());
  EXPECT_TRUE(SameBits(y16, y16_before));
  EXPECT_TRUE(SameBits(buf, buf_before));

  // check_finite names a NaN of a bf16 tensor by its index.
  std::vector<bfloat16> xn(60, bnorm::to_bfloat16(1.0f));
  xn[13] = bnorm::bfloat16{0x7FC0};
  bnorm::ForwardEvalArgs e;
  e.x = bnorm::ConstTensorView(xn.data(), dims);
  e.y = bnorm::TensorView(y16.data(), dims);
  e.running_mean = rm;
  e.running_var = rv;
  bnorm::CallOptions check;
  check.check_finite = true;
  EXPECT_TRUE(StatusIs(bnorm::forward_eval(e, check), bnorm::StatusCode::kNonFinite,
                       "x: nan at index [0, 2, 3]"));
  EXPECT_TRUE(SameBits(y16, y16_before));
}

}  // namespace
}  // namespace bnorm_test
