// Forward passes (forward_train, forward_eval): hand-checked values, layouts, ranks, affine and
// tracking switches, in-place calls, constant channels and the saved statistics.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "bnorm/batch_norm.h"
#include "test_util.h"

namespace bnorm_test {
namespace {

using bnorm::Backend;
using bnorm::CallOptions;
using bnorm::ConstTensorView;
using bnorm::forward_eval;
using bnorm::forward_train;
using bnorm::ForwardEvalArgs;
using bnorm::ForwardTrainArgs;
using bnorm::TensorView;

constexpr double kEps = 1e-5;

// Tolerance of one fp32 output computed from exact inputs: the final rounding (u |y|) plus, for
// kernels that keep the statistics in fp32, their rounding seen through the normalization
// (|w| u (|mean| invstd + |xhat|)); times a safety factor of 16.
double YTol(double w, double xhat, double b, double mean, double invstd) {
  return 16 * kFloatU *
             (std::fabs(w) * (std::fabs(xhat) + std::fabs(mean) * invstd + 1) + std::fabs(b)) +
         std::fabs(w) * (std::fabs(xhat) * kVarRelTol / 2 + kMeanStdTol);
}

// Relative fp32 tolerance of a statistic.
double StatTol(double v) { return 16 * kFloatU * (std::fabs(v) + 1e-30); }

// ... of a mean, of the saved invstd and of a variance from the batch statistics (test_util.h).
double MeanTol(double m, double var) { return StatTol(m) + kMeanStdTol * std::sqrt(var); }
double InvTol(double inv) { return StatTol(inv) + inv * kVarRelTol / 2; }
double VarTol(double v) { return StatTol(v) + std::fabs(v) * kVarRelTol; }

// ------------------------------------------------------------------------------------------
// Hand-checked values.

// x is (N, C) = (4, 2), stored row by row (both layouts coincide for rank 2):
//   channel 0: [1, 2, 3, 4]     mean 2.5, biased var (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
//   channel 1: [10, 10, 10, 14] mean 11,  biased var (1 + 1 + 1 + 9) / 4 = 3
// invstd = 1 / sqrt(var + eps): 1 / sqrt(1.25001) = 0.8944236, 1 / sqrt(3.00001) = 0.5773493
// weight = [2, -1], bias = [0.5, 3]:
//   y0 = 2 * (x - 2.5) * 0.8944236 + 0.5  -> [-2.1832708, -0.3944236, 1.3944236, 3.1832708]
//   y1 = -(x - 11) * 0.5773493 + 3        -> [3.5773493, 3.5773493, 3.5773493, 1.2679521]
// Running stats, momentum 0.1, from (0, 1):
//   running_mean = 0.1 * [2.5, 11] = [0.25, 1.1]
//   running_var  = 0.9 * 1 + 0.1 * var * 4/3 = [0.9 + 0.1 * 1.6667, 0.9 + 0.1 * 4] =
//   [1.066667, 1.3]
TEST(ForwardHand, Rank2TrainValuesStatsAndRunningStats) {
  const std::vector<float> x = {1, 10, 2, 10, 3, 10, 4, 14};
  std::vector<float> y(8), weight = {2, -1}, bias = {0.5f, 3}, rm = {0, 0}, rv = {1, 1};
  std::vector<float> save_mean(2), save_invstd(2);
  int64_t nbt = 0;
  ForwardTrainArgs a;
  a.x = ConstTensorView(x.data(), {4, 2});
  a.y = TensorView(y.data(), {4, 2});
  a.weight = weight;
  a.bias = bias;
  a.running_mean = rm;
  a.running_var = rv;
  a.num_batches_tracked = &nbt;
  a.save_mean = save_mean;
  a.save_invstd = save_invstd;
  ASSERT_TRUE(IsOk(forward_train(a)));

  const double inv0 = 1.0 / std::sqrt(1.25 + kEps), inv1 = 1.0 / std::sqrt(3.0 + kEps);
  const double want[8] = {2 * (1 - 2.5) * inv0 + 0.5, -(10 - 11.0) * inv1 + 3,
                          2 * (2 - 2.5) * inv0 + 0.5, -(10 - 11.0) * inv1 + 3,
                          2 * (3 - 2.5) * inv0 + 0.5, -(10 - 11.0) * inv1 + 3,
                          2 * (4 - 2.5) * inv0 + 0.5, -(14 - 11.0) * inv1 + 3};
  EXPECT_NEAR(want[0], -2.1832708, 1e-6);  // the comment's numbers
  EXPECT_NEAR(want[7], 1.2679521, 1e-6);
  for (int k = 0; k < 8; ++k) EXPECT_NEAR(y[k], want[k], 1e-6) << "k = " << k;

  EXPECT_NEAR(save_mean[0], 2.5, 1e-7);
  EXPECT_NEAR(save_mean[1], 11.0, 1e-6);
  EXPECT_NEAR(save_invstd[0], inv0, 1e-7);
  EXPECT_NEAR(save_invstd[1], inv1, 1e-7);
  EXPECT_NEAR(save_invstd[0], 0.8944236, 1e-6);
  EXPECT_NEAR(save_invstd[1], 0.5773493, 1e-6);
  EXPECT_NEAR(rm[0], 0.25, 1e-7);
  EXPECT_NEAR(rm[1], 1.1, 1e-6);
  EXPECT_NEAR(rv[0], 0.9 + 0.1 * 1.25 * 4 / 3, 1e-6);
  EXPECT_NEAR(rv[1], 1.3, 1e-6);
  EXPECT_EQ(nbt, 1);
}

// x is (N, C, L) = (2, 1, 3) = [[1, 2, 3], [4, 5, 6]]: one channel of n = 6 values,
// mean 3.5, biased var (6.25 + 2.25 + 0.25 + 0.25 + 2.25 + 6.25) / 6 = 17.5 / 6 = 2.916667,
// invstd 1 / sqrt(2.916677) = 0.5855390; no affine: y = (x - 3.5) * invstd, e.g. y(1) = -1.4638476.
// Unbiased var for the running stats: 17.5 / 5 = 3.5 -> running_var = 0.9 + 0.35 = 1.25.
TEST(ForwardHand, Rank3SingleChannel) {
  const std::vector<float> x = {1, 2, 3, 4, 5, 6};
  std::vector<float> y(6), rm = {0}, rv = {1}, save_mean(1), save_invstd(1);
  ForwardTrainArgs a;
  a.x = ConstTensorView(x.data(), {2, 1, 3});
  a.y = TensorView(y.data(), {2, 1, 3});
  a.running_mean = rm;
  a.running_var = rv;
  a.save_mean = save_mean;
  a.save_invstd = save_invstd;
  ASSERT_TRUE(IsOk(forward_train(a)));
  const double inv = 1.0 / std::sqrt(17.5 / 6 + kEps);
  EXPECT_NEAR(inv, 0.5855390, 1e-6);
  EXPECT_NEAR(y[0], -1.4638476, 1e-6);
  for (int k = 0; k < 6; ++k) EXPECT_NEAR(y[k], (x[k] - 3.5) * inv, 1e-6) << "k = " << k;
  EXPECT_FLOAT_EQ(save_mean[0], 3.5f);
  EXPECT_NEAR(save_invstd[0], inv, 1e-7);
  EXPECT_NEAR(rm[0], 0.35, 1e-7);
  EXPECT_NEAR(rv[0], 1.25, 1e-6);
}

// x is (N, C, H, W) = (1, 2, 2, 2) in channels-last memory, pixel by pixel (ch0, ch1):
//   ch0 = [1, 2, 3, 4] (mean 2.5, var 1.25), ch1 = [-1, -1, -1, -5] (mean -2, var 3)
// memory = {1, -1, 2, -1, 3, -1, 4, -5}. No affine: y = (x - mean) * invstd, in the same places.
TEST(ForwardHand, ChannelsLastMemoryOrder) {
  const std::vector<float> x = {1, -1, 2, -1, 3, -1, 4, -5};
  std::vector<float> y(8), save_mean(2);
  ForwardTrainArgs a;
  a.x = ConstTensorView(x.data(), {1, 2, 2, 2}, Layout::kChannelsLast);
  a.y = TensorView(y.data(), {1, 2, 2, 2}, Layout::kChannelsLast);
  a.save_mean = save_mean;
  ASSERT_TRUE(IsOk(forward_train(a)));
  const double inv0 = 1.0 / std::sqrt(1.25 + kEps), inv1 = 1.0 / std::sqrt(3.0 + kEps);
  const double want[8] = {-1.5 * inv0, 1 * inv1, -0.5 * inv0, 1 * inv1,
                          0.5 * inv0,  1 * inv1, 1.5 * inv0,  -3 * inv1};
  for (int k = 0; k < 8; ++k) EXPECT_NEAR(y[k], want[k], 1e-6) << "k = " << k;
  EXPECT_FLOAT_EQ(save_mean[0], 2.5f);
  EXPECT_FLOAT_EQ(save_mean[1], -2.0f);
}

// Eval: y = a * x + b with a = w / sqrt(rv + eps), b = bias - rm * a.
// Channel 0: w = 2, bias = 1, rm = 0.5, rv = 4 -> a = 2 / sqrt(4.00001) = 0.99999875,
//   b = 1 - 0.5 * a = 0.50000062; x = 3 -> y = 3.4999969.
// Channel 1: w = -1, bias = 0, rm = -2, rv = 0.25 -> a = -1 / sqrt(0.25001) = -1.99996,
//   b = 0 - (-2) * a = -3.99992; x = 0 -> y = -3.99992.
TEST(ForwardHand, EvalIsAffineInX) {
  const std::vector<float> x = {3, 0, -1, 5};  // (2, 2): rows (3, 0), (-1, 5)
  std::vector<float> y(4), w = {2, -1}, b = {1, 0};
  const std::vector<float> rm = {0.5f, -2}, rv = {4, 0.25f};
  ForwardEvalArgs a;
  a.x = ConstTensorView(x.data(), {2, 2});
  a.y = TensorView(y.data(), {2, 2});
  a.weight = w;
  a.bias = b;
  a.running_mean = rm;
  a.running_var = rv;
  ASSERT_TRUE(IsOk(forward_eval(a)));
  const double a0 = 2 / std::sqrt(4 + kEps), b0 = 1 - 0.5 * a0;
  const double a1 = -1 / std::sqrt(0.25 + kEps), b1 = 0 - (-2) * a1;
  EXPECT_NEAR(a0 * 3 + b0, 3.4999969, 1e-6);
  EXPECT_NEAR(y[0], a0 * 3 + b0, 2e-6);
  EXPECT_NEAR(y[1], a1 * 0 + b1, 2e-6);
  EXPECT_NEAR(y[2], a0 * -1 + b0, 2e-6);
  EXPECT_NEAR(y[3], a1 * 5 + b1, 2e-6);
}

// ------------------------------------------------------------------------------------------
// Ranks 2..5, both layouts, against the naive fp64 oracle.

struct RankCase {
  std::vector<int64_t> dims;
};
void PrintTo(const RankCase& c, std::ostream* os) { *os << DimsString(c.dims); }

class ForwardRanks : public ::testing::TestWithParam<RankCase> {};

TEST_P(ForwardRanks, TrainMatchesOracleInBothLayoutsAndBackends) {
  const std::vector<int64_t> dims = GetParam().dims;
  BNORM_SEEDED_RNG(rng, 1000 + dims.size());
  const int64_t c = dims[1];
  const std::vector<float> offsets = ChannelOffsets(c, 5.0);
  const Tensor x_cf = RandomTensor(rng, dims, Layout::kChannelsFirst, offsets, 2.0);
  const std::vector<float> w = RandomVector(rng, c, -2, 2), b = RandomVector(rng, c, -1, 1);
  const ChannelStats st = BatchStats(x_cf);

  std::vector<Tensor> ys;
  for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast})
    for (Backend backend : {Backend::kAuto, Backend::kReference}) {
      SCOPED_TRACE(::testing::Message() << DimsString(dims) << " " << LayoutTag(layout)
                                        << " backend " << static_cast<int>(backend));
      const Tensor x = x_cf.ToLayout(layout);
      Tensor y(dims, layout);
      std::vector<float> rm(c, 0.0f), rv(c, 1.0f), sm(c), si(c);
      int64_t nbt = 3;
      ForwardTrainArgs a;
      a.x = x.cview();
      a.y = y.view();
      a.weight = w;
      a.bias = b;
      a.running_mean = rm;
      a.running_var = rv;
      a.num_batches_tracked = &nbt;
      a.save_mean = sm;
      a.save_invstd = si;
      CallOptions o;
      o.backend = backend;
      ASSERT_TRUE(IsOk(forward_train(a, o)));
      EXPECT_EQ(nbt, 4);
      const double n = static_cast<double>(x.count());
      for (int64_t ch = 0; ch < c; ++ch) {
        const double m = st.mean[ch], v = st.var[ch], inv = 1 / std::sqrt(v + kEps);
        EXPECT_TRUE(Near(sm[ch], m, MeanTol(m, v), "save_mean"));
        EXPECT_TRUE(Near(si[ch], inv, InvTol(inv), "save_invstd"));
        EXPECT_TRUE(Near(rm[ch], 0.1 * m, 0.1 * MeanTol(m, v) + 1e-8, "running_mean"));
        const double want_rv = 0.9 + 0.1 * v * n / (n - 1);
        EXPECT_TRUE(Near(rv[ch], want_rv, StatTol(want_rv) + VarTol(0.1 * v), "running_var"));
        for (int64_t i = 0; i < x.n(); ++i)
          for (int64_t j = 0; j < x.s(); ++j) {
            const double xhat = (x.at(i, ch, j) - m) * inv;
            const double want = w[ch] * xhat + b[ch];
            ASSERT_TRUE(Near(y.at(i, ch, j), want, YTol(w[ch], xhat, b[ch], m, inv), "y"))
                << "at (" << i << ", " << ch << ", " << j << ")";
          }
      }
      ys.push_back(y.ToLayout(Layout::kChannelsFirst));
    }
  // The same logical tensor in both layouts gives the same logical y, element by element.
  for (size_t r = 1; r < ys.size(); ++r)
    for (size_t k = 0; k < ys[0].data.size(); ++k)
      ASSERT_NEAR(ys[r].data[k], ys[0].data[k], 4 * kFloatU * (8 + std::fabs(ys[0].data[k])))
          << "run " << r << " logical element " << k;
}

TEST_P(ForwardRanks, EvalIsAXPlusBInBothLayouts) {
  const std::vector<int64_t> dims = GetParam().dims;
  BNORM_SEEDED_RNG(rng, 2000 + dims.size());
  const int64_t c = dims[1];
  const Tensor x_cf = RandomTensor(rng, dims, Layout::kChannelsFirst, ChannelOffsets(c, 3.0), 1.5);
  const std::vector<float> w = RandomVector(rng, c, -2, 2), b = RandomVector(rng, c, -1, 1);
  const std::vector<float> rm = RandomVector(rng, c, -3, 3), rv = RandomVector(rng, c, 0.2, 3);
  std::vector<Tensor> ys;
  for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast}) {
    SCOPED_TRACE(LayoutTag(layout));
    const Tensor x = x_cf.ToLayout(layout);
    Tensor y(dims, layout);
    ForwardEvalArgs a;
    a.x = x.cview();
    a.y = y.view();
    a.weight = w;
    a.bias = b;
    a.running_mean = rm;
    a.running_var = rv;
    ASSERT_TRUE(IsOk(forward_eval(a)));
    for (int64_t ch = 0; ch < c; ++ch) {
      const double inv = 1 / std::sqrt(static_cast<double>(rv[ch]) + kEps);
      const double aa = w[ch] * inv, bb = b[ch] - rm[ch] * aa;
      for (int64_t i = 0; i < x.n(); ++i)
        for (int64_t j = 0; j < x.s(); ++j) {
          const double xv = x.at(i, ch, j);
          const double tol =
              8 * kFloatU * (std::fabs(aa * xv) + std::fabs(bb) + std::fabs(b[ch]) + 1);
          ASSERT_TRUE(Near(y.at(i, ch, j), aa * xv + bb, tol, "y"));
        }
    }
    ys.push_back(y.ToLayout(Layout::kChannelsFirst));
  }
  for (size_t k = 0; k < ys[0].data.size(); ++k)
    ASSERT_NEAR(ys[1].data[k], ys[0].data[k], 4 * kFloatU * (8 + std::fabs(ys[0].data[k])));
}

INSTANTIATE_TEST_SUITE_P(Shapes, ForwardRanks,
                         ::testing::Values(RankCase{{7, 3}}, RankCase{{3, 4, 5}},
                                           RankCase{{2, 3, 4, 5}}, RankCase{{2, 3, 2, 3, 4}},
                                           RankCase{{1, 5, 3, 1, 2}}, RankCase{{2, 16}},
                                           RankCase{{4, 33, 7, 9}}),
                         [](const ::testing::TestParamInfo<RankCase>& info) {
                           std::string name = "rank" + std::to_string(info.param.dims.size());
                           for (int64_t d : info.param.dims) (name += '_') += std::to_string(d);
                           return name;
                         });

// Random shapes, layouts, affine and momentum settings: where vectorized kernels keep their
// remainder loops (odd channel counts, spatial sizes 1..6, batches of 1).
TEST(ForwardSweep, RandomConfigurationsMatchOracle) {
  BNORM_SEEDED_RNG(rng, 1500);
  for (int trial = 0; trial < 150; ++trial) {
    std::vector<int64_t> dims;
    const int rank = 2 + static_cast<int>(rng() % 4);
    dims.push_back(1 + static_cast<int64_t>(rng() % 5));
    dims.push_back(1 + static_cast<int64_t>(rng() % 37));
    for (int d = 2; d < rank; ++d) dims.push_back(1 + static_cast<int64_t>(rng() % 6));
    if (dims[0] * SpatialOf(dims) < 2) dims[0] = 2;
    const Layout layout = rng() % 2 ? Layout::kChannelsLast : Layout::kChannelsFirst;
    const bool has_w = rng() % 3 != 0, has_b = rng() % 3 != 0;
    const std::optional<double> momenta[4] = {0.1, std::nullopt, 0.0, 1.0};
    const std::optional<double> momentum = momenta[rng() % 4];
    SCOPED_TRACE(::testing::Message()
                 << "trial " << trial << ": " << DimsString(dims) << " " << LayoutTag(layout)
                 << " weight " << has_w << " bias " << has_b << " momentum "
                 << (momentum ? std::to_string(*momentum) : "none"));
    const int64_t c = dims[1];
    const Tensor x =
        RandomTensor(rng, dims, layout, RandomVector(rng, c, -10, 10), Uniform(rng, 0.1, 5));
    const std::vector<float> w = RandomVector(rng, c, -2, 2), b = RandomVector(rng, c, -1, 1);
    std::vector<float> rm = RandomVector(rng, c, -1, 1), rv = RandomVector(rng, c, 0.5, 2), sm(c),
                       si(c);
    const std::vector<float> rm0 = rm, rv0 = rv;
    int64_t nbt = static_cast<int64_t>(rng() % 3);
    const int64_t nbt0 = nbt;
    Tensor y(dims, layout);
    ForwardTrainArgs a;
    a.x = x.cview();
    a.y = y.view();
    if (has_w) a.weight = w;
    if (has_b) a.bias = b;
    a.running_mean = rm;
    a.running_var = rv;
    a.num_batches_tracked = &nbt;
    a.momentum = momentum;
    a.save_mean = sm;
    a.save_invstd = si;
    ASSERT_TRUE(IsOk(forward_train(a)));
    ASSERT_EQ(nbt, nbt0 + 1);
    const ChannelStats st = BatchStats(x);
    const double n = static_cast<double>(x.count());
    const double f = momentum ? *momentum : 1.0 / static_cast<double>(nbt0 + 1);
    for (int64_t ch = 0; ch < c; ++ch) {
      const double m = st.mean[ch], inv = 1 / std::sqrt(st.var[ch] + kEps);
      const double ww = has_w ? w[ch] : 1.0, bb = has_b ? b[ch] : 0.0;
      ASSERT_TRUE(Near(sm[ch], m, MeanTol(m, st.var[ch]), "save_mean"));
      ASSERT_TRUE(Near(si[ch], inv, InvTol(inv), "save_invstd"));
      const double want_rm = (1 - f) * rm0[ch] + f * m;
      const double want_rv = (1 - f) * rv0[ch] + f * st.var[ch] * n / (n - 1);
      ASSERT_TRUE(Near(rm[ch], want_rm,
                       StatTol(std::fabs(rm0[ch]) + std::fabs(m)) + f * MeanTol(m, st.var[ch]),
                       "running_mean"));
      ASSERT_TRUE(Near(rv[ch], want_rv, StatTol(want_rv) + f * VarTol(st.var[ch] * n / (n - 1)),
                       "running_var"));
      for (int64_t i = 0; i < x.n(); ++i)
        for (int64_t j = 0; j < x.s(); ++j) {
          const double xhat = (x.at(i, ch, j) - m) * inv;
          ASSERT_TRUE(Near(y.at(i, ch, j), ww * xhat + bb, YTol(ww, xhat, bb, m, inv), "y"))
              << "at (" << i << ", " << ch << ", " << j << ")";
        }
    }
    // Eval with the updated running statistics.
    ForwardEvalArgs e;
    e.x = x.cview();
    e.y = y.view();
    if (has_w) e.weight = w;
    if (has_b) e.bias = b;
    e.running_mean = rm;
    e.running_var = rv;
    ASSERT_TRUE(IsOk(forward_eval(e)));
    for (int64_t ch = 0; ch < c; ++ch) {
      const double inv = 1 / std::sqrt(static_cast<double>(rv[ch]) + kEps);
      const double aa = (has_w ? w[ch] : 1.0) * inv, bb = (has_b ? b[ch] : 0.0) - rm[ch] * aa;
      for (int64_t i = 0; i < x.n(); ++i)
        for (int64_t j = 0; j < x.s(); ++j) {
          const double xv = x.at(i, ch, j);
          const double tol =
              8 * kFloatU * (std::fabs(aa * xv) + std::fabs(bb) + std::fabs(rm[ch] * aa) + 1);
          ASSERT_TRUE(Near(y.at(i, ch, j), aa * xv + bb, tol, "eval y"));
        }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Affine and tracking switches.

class ForwardSwitches : public ::testing::TestWithParam<Layout> {};

TEST_P(ForwardSwitches, AffineOffMeansWeightOneBiasZero) {
  const Layout layout = GetParam();
  BNORM_SEEDED_RNG(rng, 31);
  const std::vector<int64_t> dims = {3, 4, 2, 3};
  const Tensor x = RandomTensor(rng, dims, layout, ChannelOffsets(4, 2.0));
  const std::vector<float> w = RandomVector(rng, 4, 0.5, 2), b = RandomVector(rng, 4, -1, 1);
  const std::vector<float> ones(4, 1.0f), zeros(4, 0.0f);
  auto run = [&](std::span<const float> weight, std::span<const float> bias) {
    Tensor y(dims, layout);
    ForwardTrainArgs a;
    a.x = x.cview();
    a.y = y.view();
    a.weight = weight;
    a.bias = bias;
    EXPECT_TRUE(IsOk(forward_train(a)));
    return y;
  };
  const Tensor none = run({}, {}), explicit_identity = run(ones, zeros);
  const Tensor w_only = run(w, {}), w_zero = run(w, zeros);
  const Tensor b_only = run({}, b), one_b = run(ones, b);
  const ChannelStats st = BatchStats(x);
  for (int64_t i = 0; i < x.n(); ++i)
    for (int64_t ch = 0; ch < x.c(); ++ch)
      for (int64_t j = 0; j < x.s(); ++j) {
        const double xhat = (x.at(i, ch, j) - st.mean[ch]) / std::sqrt(st.var[ch] + kEps);
        EXPECT_NEAR(none.at(i, ch, j), xhat, 1e-5);
        EXPECT_NEAR(w_only.at(i, ch, j), w[ch] * xhat, 2e-5);
        EXPECT_NEAR(b_only.at(i, ch, j), xhat + b[ch], 1e-5);
        // Absent weight/bias are exactly weight 1 / bias 0.
        EXPECT_NEAR(none.at(i, ch, j), explicit_identity.at(i, ch, j), 1e-6);
        EXPECT_NEAR(w_only.at(i, ch, j), w_zero.at(i, ch, j), 1e-6);
        EXPECT_NEAR(b_only.at(i, ch, j), one_b.at(i, ch, j), 1e-6);
      }
}

TEST_P(ForwardSwitches, EvalAffineOff) {
  const Layout layout = GetParam();
  BNORM_SEEDED_RNG(rng, 37);
  const std::vector<int64_t> dims = {2, 3, 5};
  const Tensor x = RandomTensor(rng, dims, layout);
  const std::vector<float> rm = RandomVector(rng, 3, -1, 1), rv = RandomVector(rng, 3, 0.5, 2);
  const std::vector<float> w = RandomVector(rng, 3, 0.5, 2);
  for (bool with_weight : {false, true}) {
    Tensor y(dims, layout);
    ForwardEvalArgs a;
    a.x = x.cview();
    a.y = y.view();
    if (with_weight) a.weight = w;
    a.running_mean = rm;
    a.running_var = rv;
    ASSERT_TRUE(IsOk(forward_eval(a)));
    for (int64_t i = 0; i < x.n(); ++i)
      for (int64_t ch = 0; ch < 3; ++ch)
        for (int64_t j = 0; j < x.s(); ++j) {
          const double ww = with_weight ? w[ch] : 1.0;
          EXPECT_NEAR(y.at(i, ch, j), ww * (x.at(i, ch, j) - rm[ch]) / std::sqrt(rv[ch] + kEps),
                      1e-5);
        }
  }
}

TEST_P(ForwardSwitches, TrackingOffTouchesNothing) {
  const Layout layout = GetParam();
  BNORM_SEEDED_RNG(rng, 41);
  const std::vector<int64_t> dims = {4, 3, 3};
  const Tensor x = RandomTensor(rng, dims, layout);
  Tensor y(dims, layout), y_tracked(dims, layout);
  std::vector<float> rm = {0.5f, 0.25f, -1}, rv = {2, 3, 4}, sm(3), si(3);
  int64_t nbt = 7;
  const Snapshot untouched = Snapshot()
                                 .Add("running_mean", rm)
                                 .Add("running_var", rv)
                                 .Add("num_batches_tracked", &nbt)
                                 .Add("x", x.data);
  for (std::optional<double> momentum : {std::optional<double>(0.1), std::optional<double>()}) {
    ForwardTrainArgs a;
    a.x = x.cview();
    a.y = y.view();
    a.num_batches_tracked = &nbt;  // without running stats: not incremented
    a.momentum = momentum;         // none needs no counter without tracking
    a.save_mean = sm;
    a.save_invstd = si;
    ASSERT_TRUE(IsOk(forward_train(a)));
    EXPECT_TRUE(untouched.Unchanged());
  }
  // y and the saved statistics are those of a tracked call.
  std::vector<float> rm2(3, 0.0f), rv2(3, 1.0f), sm2(3), si2(3);
  ForwardTrainArgs t;
  t.x = x.cview();
  t.y = y_tracked.view();
  t.running_mean = rm2;
  t.running_var = rv2;
  t.save_mean = sm2;
  t.save_invstd = si2;
  ASSERT_TRUE(IsOk(forward_train(t)));
  EXPECT_TRUE(BitIdentical(y.data, y_tracked.data));
  EXPECT_TRUE(BitIdentical(sm, sm2));
  EXPECT_TRUE(BitIdentical(si, si2));
}

// ------------------------------------------------------------------------------------------
// In-place.

TEST_P(ForwardSwitches, InPlaceIsBitIdenticalToOutOfPlace) {
  const Layout layout = GetParam();
  BNORM_SEEDED_RNG(rng, 43);
  for (const std::vector<int64_t>& dims :
       {std::vector<int64_t>{5, 3}, std::vector<int64_t>{3, 4, 7}, std::vector<int64_t>{2, 5, 3, 4},
        std::vector<int64_t>{2, 3, 2, 3, 2}}) {
    SCOPED_TRACE(DimsString(dims));
    const int64_t c = dims[1];
    const Tensor x = RandomTensor(rng, dims, layout, ChannelOffsets(c, 4.0), 1.5);
    const std::vector<float> w = RandomVector(rng, c, -2, 2), b = RandomVector(rng, c, -1, 1);
    // Training.
    {
      Tensor out(dims, layout), inplace = x;
      std::vector<float> rm1(c, 0.1f), rv1(c, 1.5f), rm2 = rm1, rv2 = rv1, sm1(c), si1(c), sm2(c),
                                                     si2(c);
      ForwardTrainArgs a;
      a.x = x.cview();
      a.y = out.view();
      a.weight = w;
      a.bias = b;
      a.running_mean = rm1;
      a.running_var = rv1;
      a.save_mean = sm1;
      a.save_invstd = si1;
      ASSERT_TRUE(IsOk(forward_train(a)));
      a.x = inplace.cview();
      a.y = inplace.view();
      a.running_mean = rm2;
      a.running_var = rv2;
      a.save_mean = sm2;
      a.save_invstd = si2;
      ASSERT_TRUE(IsOk(forward_train(a)));
      EXPECT_TRUE(BitIdentical(out.data, inplace.data));
      EXPECT_TRUE(BitIdentical(rm1, rm2));
      EXPECT_TRUE(BitIdentical(rv1, rv2));
      EXPECT_TRUE(BitIdentical(sm1, sm2));
      EXPECT_TRUE(BitIdentical(si1, si2));
    }
    // Eval.
    {
      Tensor out(dims, layout), inplace = x;
      const std::vector<float> rm = RandomVector(rng, c, -1, 1), rv = RandomVector(rng, c, 0.5, 2);
      ForwardEvalArgs a;
      a.x = x.cview();
      a.y = out.view();
      a.weight = w;
      a.bias = b;
      a.running_mean = rm;
      a.running_var = rv;
      ASSERT_TRUE(IsOk(forward_eval(a)));
      a.x = inplace.cview();
      a.y = inplace.view();
      ASSERT_TRUE(IsOk(forward_eval(a)));
      EXPECT_TRUE(BitIdentical(out.data, inplace.data));
    }
  }
}

// ------------------------------------------------------------------------------------------
// Constant channel: mean == the value exactly, var == 0, xhat == 0, so y == bias exactly.

TEST_P(ForwardSwitches, ConstantChannelGivesBiasExactly) {
  const Layout layout = GetParam();
  BNORM_SEEDED_RNG(rng, 47);
  for (const std::vector<int64_t>& dims :
       {std::vector<int64_t>{7, 3}, std::vector<int64_t>{3, 3, 5},
        std::vector<int64_t>{3, 3, 7, 3}}) {
    SCOPED_TRACE(DimsString(dims));
    Tensor x = RandomTensor(rng, dims, layout);
    // Channel 1 constant 0.1f, channel 2 constant -1234.567f: values whose sums are not exact in
    // fp32, so a kernel that lets rounding into the mean is caught.
    const float v1 = 0.1f, v2 = -1234.567f;
    for (int64_t i = 0; i < x.n(); ++i)
      for (int64_t j = 0; j < x.s(); ++j) {
        x.at(i, 1, j) = v1;
        x.at(i, 2, j) = v2;
      }
    const std::vector<float> w = {1.5f, -2.25f, 3.0f}, b = {0.25f, 0.7f, -0.3f};
    std::vector<float> rm = {0, 0, 0}, rv = {1, 1, 1}, sm(3), si(3);
    Tensor y(dims, layout);
    ForwardTrainArgs a;
    a.x = x.cview();
    a.y = y.view();
    a.weight = w;
    a.bias = b;
    a.running_mean = rm;
    a.running_var = rv;
    a.save_mean = sm;
    a.save_invstd = si;
    ASSERT_TRUE(IsOk(forward_train(a)));
    for (int64_t i = 0; i < x.n(); ++i)
      for (int64_t j = 0; j < x.s(); ++j) {
        ASSERT_EQ(y.at(i, 1, j), 0.7f) << "(" << i << ", 1, " << j << ")";
        ASSERT_EQ(y.at(i, 2, j), -0.3f) << "(" << i << ", 2, " << j << ")";
      }
    EXPECT_EQ(sm[1], v1);
    EXPECT_EQ(sm[2], v2);
    // The mean must be exact (else xhat != 0); the rest within a few ulps.
    EXPECT_FLOAT_EQ(si[1], static_cast<float>(1.0 / std::sqrt(kEps)));  // 316.2278
    EXPECT_FLOAT_EQ(si[2], static_cast<float>(1.0 / std::sqrt(kEps)));
    EXPECT_FLOAT_EQ(rv[1], 0.9f);  // 0.9 * 1 + 0.1 * 0
    EXPECT_FLOAT_EQ(rv[2], 0.9f);
    EXPECT_FLOAT_EQ(rm[1], static_cast<float>(0.1 * static_cast<double>(v1)));
    EXPECT_FLOAT_EQ(rm[2], static_cast<float>(0.1 * static_cast<double>(v2)));
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, ForwardSwitches,
                         ::testing::Values(Layout::kChannelsFirst, Layout::kChannelsLast),
                         [](const ::testing::TestParamInfo<Layout>& info) {
                           return std::string(LayoutTag(info.param));
                         });

// ------------------------------------------------------------------------------------------
// Saved statistics: optional outputs, the same with or without, and no effect on y.

TEST(ForwardSaved, SaveOutputsAreOptionalAndDoNotChangeY) {
  BNORM_SEEDED_RNG(rng, 53);
  const std::vector<int64_t> dims = {4, 3, 5};
  const Tensor x = RandomTensor(rng, dims, Layout::kChannelsFirst, ChannelOffsets(3, 10.0), 0.5);
  Tensor y1(dims, Layout::kChannelsFirst), y2(dims, Layout::kChannelsFirst),
      y3(dims, Layout::kChannelsFirst);
  std::vector<float> sm(3), si(3), sm_only(3), si_only(3);
  ForwardTrainArgs a;
  a.x = x.cview();
  a.y = y1.view();
  ASSERT_TRUE(IsOk(forward_train(a)));
  a.y = y2.view();
  a.save_mean = sm;
  a.save_invstd = si;
  ASSERT_TRUE(IsOk(forward_train(a)));
  a.y = y3.view();
  a.save_mean = sm_only;
  a.save_invstd = {};
  ASSERT_TRUE(IsOk(forward_train(a)));
  a.save_mean = {};
  a.save_invstd = si_only;
  ASSERT_TRUE(IsOk(forward_train(a)));
  EXPECT_TRUE(BitIdentical(y1.data, y2.data));
  EXPECT_TRUE(BitIdentical(y1.data, y3.data));
  EXPECT_TRUE(BitIdentical(sm, sm_only));
  EXPECT_TRUE(BitIdentical(si, si_only));
  // Mean near 10 with std 0.5: the saved values are the fp64 two-pass ones within the fast
  // kernels' accuracy.
  const ChannelStats st = BatchStats(x);
  for (int ch = 0; ch < 3; ++ch) {
    EXPECT_TRUE(Near(sm[ch], st.mean[ch], MeanTol(st.mean[ch], st.var[ch]), "save_mean"));
    const double inv = 1 / std::sqrt(st.var[ch] + kEps);
    EXPECT_TRUE(Near(si[ch], inv, InvTol(inv), "save_invstd"));
  }
}

// A large offset with a small spread: the variance must come from deviations (two-pass), not
// from E[x^2] - E[x]^2, which cancels to garbage in fp32 here.
TEST(ForwardSaved, LargeMeanSmallVariance) {
  BNORM_SEEDED_RNG(rng, 59);
  const std::vector<int64_t> dims = {8, 2, 16};
  const std::vector<float> offsets = {1000.0f, -30000.0f};
  const Tensor x = RandomTensor(rng, dims, Layout::kChannelsLast, offsets, 0.01);
  Tensor y(dims, Layout::kChannelsLast);
  std::vector<float> sm(2), si(2);
  ForwardTrainArgs a;
  a.x = x.cview();
  a.y = y.view();
  a.save_mean = sm;
  a.save_invstd = si;
  ASSERT_TRUE(IsOk(forward_train(a)));
  const ChannelStats st = BatchStats(x);
  for (int ch = 0; ch < 2; ++ch) {
    const double inv = 1 / std::sqrt(st.var[ch] + kEps);
    EXPECT_TRUE(Near(si[ch], inv, 1e-3 * inv, "save_invstd"));
  }
}

}  // namespace
}  // namespace bnorm_test
