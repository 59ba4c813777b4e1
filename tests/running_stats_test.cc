// Running statistics over several training steps: momentum 0.1, 0, 1 and none (cumulative
// average), Bessel's correction with n = N * S, and num_batches_tracked. The expected values are
// computed here, in fp64, from the batches themselves.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/c_api.h"
#include "test_util.h"

namespace bnorm_test {
namespace {

using bnorm::ConstTensorView;
using bnorm::forward_train;
using bnorm::ForwardTrainArgs;
using bnorm::TensorView;

constexpr int kSteps = 6;

struct MomentumCase {
  std::optional<double> momentum;
  std::string name;
};

struct StatsCase {
  MomentumCase m;
  std::vector<int64_t> dims;
  Layout layout;
};

void PrintTo(const StatsCase& c, std::ostream* os) {
  *os << "momentum " << c.m.name << " " << DimsString(c.dims) << " " << LayoutTag(c.layout);
}

class RunningStats : public ::testing::TestWithParam<StatsCase> {};

TEST_P(RunningStats, MatchesIndependentFp64Recurrence) {
  const StatsCase& p = GetParam();
  BNORM_SEEDED_RNG(rng, 500 + p.dims.size() * 10 + static_cast<int>(p.layout));
  const int64_t c = p.dims[1];
  // Start away from the defaults so that the momentum's (1 - f) * old term is visible; for the
  // cumulative average the start must NOT matter (PyTorch's first factor is 1 / 1).
  std::vector<float> rm = RandomVector(rng, c, -0.5, 0.5), rv = RandomVector(rng, c, 0.5, 2.0);
  const std::vector<float> rm0 = rm, rv0 = rv;
  int64_t nbt = 0;
  std::vector<double> want_rm(rm.begin(), rm.end()), want_rv(rv.begin(), rv.end());
  std::vector<std::vector<double>> means, unbiased_vars;  // per step, per channel
  double scale = 1;

  for (int step = 1; step <= kSteps; ++step) {
    SCOPED_TRACE(::testing::Message() << "step " << step);
    // Each step has different channel offsets and spreads, so the batch statistics move.
    std::vector<float> offsets = RandomVector(rng, c, -4, 4);
    const Tensor x = RandomTensor(rng, p.dims, p.layout, offsets, Uniform(rng, 0.5, 3.0));
    Tensor y(p.dims, p.layout);
    ForwardTrainArgs a;
    a.x = x.cview();
    a.y = y.view();
    a.running_mean = rm;
    a.running_var = rv;
    a.num_batches_tracked = &nbt;
    a.momentum = p.m.momentum;
    ASSERT_TRUE(IsOk(forward_train(a)));
    EXPECT_EQ(nbt, step);

    const ChannelStats st = BatchStats(x);
    const double n = static_cast<double>(x.count());  // N * S values per channel
    std::vector<double> uv(c);
    for (int64_t ch = 0; ch < c; ++ch) {
      uv[ch] = st.var[ch] * n / (n - 1);
      scale = std::max({scale, std::fabs(st.mean[ch]), uv[ch]});
    }
    means.push_back(st.mean);
    unbiased_vars.push_back(uv);

    for (int64_t ch = 0; ch < c; ++ch) {
      if (p.m.momentum) {
        const double f = *p.m.momentum;
        want_rm[ch] = (1 - f) * want_rm[ch] + f * st.mean[ch];
        want_rv[ch] = (1 - f) * want_rv[ch] + f * uv[ch];
      } else {
        // Plain average of the batch statistics seen so far; the initial values do not count.
        double sm = 0, sv = 0;
        for (int k = 0; k < step; ++k) {
          sm += means[k][ch];
          sv += unbiased_vars[k][ch];
        }
        want_rm[ch] = sm / step;
        want_rv[ch] = sv / step;
      }
      // Each step rounds the stored state to fp32 once (u relative) and that error is carried
      // on with a factor <= 1: after `step` steps at most step * u * scale, times 8 for safety.
      // The batch statistics themselves are within the fast kernels' accuracy (test_util.h).
      const double tol = 8 * step * kFloatU * scale;
      EXPECT_TRUE(Near(rm[ch], want_rm[ch], tol + kMeanStdTol * std::sqrt(scale),
                       "running_mean[" + std::to_string(ch) + "]"));
      EXPECT_TRUE(Near(rv[ch], want_rv[ch], tol + kVarRelTol * scale,
                       "running_var[" + std::to_string(ch) + "]"));
    }
  }
  if (p.m.momentum && *p.m.momentum == 0.0) {
    // Momentum 0: (1 - 0) * old + 0 * batch == old, bit for bit.
    EXPECT_TRUE(BitIdentical(rm, rm0));
    EXPECT_TRUE(BitIdentical(rv, rv0));
  }
  if (p.m.momentum && *p.m.momentum == 1.0) {
    // Momentum 1: the last batch's statistics only.
    for (int64_t ch = 0; ch < c; ++ch) {
      const double uv = unbiased_vars.back()[ch];
      EXPECT_TRUE(Near(rm[ch], means.back()[ch],
                       2 * kFloatU * std::fabs(means.back()[ch]) + kMeanStdTol * std::sqrt(uv),
                       "running_mean"));
      EXPECT_TRUE(Near(rv[ch], uv, (2 * kFloatU + kVarRelTol) * uv, "running_var"));
    }
  }
}

std::vector<StatsCase> AllStatsCases() {
  const std::vector<MomentumCase> momenta = {
      {0.1, "m0_1"}, {0.0, "m0"}, {1.0, "m1"}, {std::nullopt, "none"}};
  const std::vector<std::vector<int64_t>> shapes = {
      {5, 3}, {2, 4, 3}, {3, 2, 2, 3}, {1, 3, 2, 2, 2}};
  std::vector<StatsCase> out;
  for (const MomentumCase& m : momenta)
    for (const auto& dims : shapes)
      for (Layout l : {Layout::kChannelsFirst, Layout::kChannelsLast})
        if (dims.size() > 2 || l == Layout::kChannelsFirst) out.push_back({m, dims, l});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Steps, RunningStats, ::testing::ValuesIn(AllStatsCases()),
                         [](const ::testing::TestParamInfo<StatsCase>& info) {
                           std::string name = info.param.m.name + "_rank" +
                                              std::to_string(info.param.dims.size()) + "_" +
                                              LayoutTag(info.param.layout);
                           return name;
                         });

// Bessel's correction uses n = N * S, the number of values per channel, not N.
// Every case holds the values [1, 2, 3, 4] in channel 0 (and [2, 4, 6, 8] in channel 1):
// biased var 1.25 (5.0), unbiased 1.25 * 4 / 3 = 5 / 3 (20 / 3). Momentum 1 stores exactly it.
TEST(RunningStatsHand, UnbiasedFactorUsesAllValuesPerChannel) {
  struct Case {
    std::vector<int64_t> dims;
    Layout layout;
  };
  for (const Case& cs :
       {Case{{4, 2}, Layout::kChannelsFirst}, Case{{1, 2, 4}, Layout::kChannelsFirst},
        Case{{2, 2, 2}, Layout::kChannelsLast}, Case{{1, 2, 2, 2}, Layout::kChannelsFirst},
        Case{{1, 2, 1, 2, 2}, Layout::kChannelsLast},
        Case{{2, 2, 1, 1, 2}, Layout::kChannelsFirst}}) {
    SCOPED_TRACE(DimsString(cs.dims) + " " + LayoutTag(cs.layout));
    Tensor x(cs.dims, cs.layout);
    float v = 1;
    for (int64_t i = 0; i < x.n(); ++i)
      for (int64_t j = 0; j < x.s(); ++j, v += 1) {
        x.at(i, 0, j) = v;
        x.at(i, 1, j) = 2 * v;
      }
    Tensor y(cs.dims, cs.layout);
    std::vector<float> rm = {7, 7}, rv = {7, 7};
    int64_t nbt = 0;
    ForwardTrainArgs a;
    a.x = x.cview();
    a.y = y.view();
    a.running_mean = rm;
    a.running_var = rv;
    a.num_batches_tracked = &nbt;
    a.momentum = 1.0;
    ASSERT_TRUE(IsOk(forward_train(a)));
    EXPECT_EQ(rm[0], 2.5f);
    EXPECT_EQ(rm[1], 5.0f);
    EXPECT_FLOAT_EQ(rv[0], static_cast<float>(5.0 / 3.0));
    EXPECT_FLOAT_EQ(rv[1], static_cast<float>(20.0 / 3.0));
    EXPECT_EQ(nbt, 1);
  }
}

// Two values per channel (the smallest legal batch): n / (n - 1) = 2.
// x = (2, 1) = [3, 5]: mean 4, biased var 1, unbiased 2; momentum 0.1 from (0, 1):
// running_mean = 0.4, running_var = 0.9 + 0.2 = 1.1.
TEST(RunningStatsHand, TwoValuesPerChannel) {
  const std::vector<float> x = {3, 5};
  std::vector<float> y(2), rm = {0}, rv = {1};
  int64_t nbt = 0;
  ForwardTrainArgs a;
  a.x = ConstTensorView(x.data(), {2, 1});
  a.y = TensorView(y.data(), {2, 1});
  a.running_mean = rm;
  a.running_var = rv;
  a.num_batches_tracked = &nbt;
  ASSERT_TRUE(IsOk(forward_train(a)));
  EXPECT_FLOAT_EQ(rm[0], 0.4f);
  EXPECT_FLOAT_EQ(rv[0], 1.1f);
  EXPECT_EQ(nbt, 1);
}

// Cumulative average by hand: batch means 1, 3, 8 -> running_mean 1, 2, 4;
// unbiased variances 2, 8, 0.5 -> running_var 2, 5, 3.5. The initial (0, 1) never counts.
// Batches of x = (2, 1): [m - d, m + d], biased var d^2, unbiased 2 d^2.
TEST(RunningStatsHand, CumulativeAverageByHand) {
  const double ms[3] = {1, 3, 8}, ds[3] = {1, 2, 0.5};
  const float want_rm[3] = {1, 2, 4}, want_rv[3] = {2, 5, 3.5f};
  std::vector<float> rm = {0}, rv = {1}, y(2);
  int64_t nbt = 0;
  for (int k = 0; k < 3; ++k) {
    const std::vector<float> x = {static_cast<float>(ms[k] - ds[k]),
                                  static_cast<float>(ms[k] + ds[k])};
    ForwardTrainArgs a;
    a.x = ConstTensorView(x.data(), {2, 1});
    a.y = TensorView(y.data(), {2, 1});
    a.running_mean = rm;
    a.running_var = rv;
    a.num_batches_tracked = &nbt;
    a.momentum = std::nullopt;
    ASSERT_TRUE(IsOk(forward_train(a)));
    EXPECT_EQ(nbt, k + 1);
    EXPECT_FLOAT_EQ(rm[0], want_rm[k]) << "batch " << k + 1;
    EXPECT_FLOAT_EQ(rv[0], want_rv[k]) << "batch " << k + 1;
  }
}

// A counter that does not start at 0 (resumed training): the factor is 1 / (count + 1).
// num_batches_tracked = 4, running_mean = 10, batch mean 0 -> 10 * 4/5 = 8.
TEST(RunningStatsHand, CumulativeAverageResumesFromCounter) {
  const std::vector<float> x = {-1, 1};
  std::vector<float> y(2), rm = {10}, rv = {3};
  int64_t nbt = 4;
  ForwardTrainArgs a;
  a.x = ConstTensorView(x.data(), {2, 1});
  a.y = TensorView(y.data(), {2, 1});
  a.running_mean = rm;
  a.running_var = rv;
  a.num_batches_tracked = &nbt;
  a.momentum = std::nullopt;
  ASSERT_TRUE(IsOk(forward_train(a)));
  EXPECT_EQ(nbt, 5);
  EXPECT_FLOAT_EQ(rm[0], 8.0f);
  EXPECT_FLOAT_EQ(rv[0], 0.8f * 3 + 0.2f * 2);  // unbiased var of [-1, 1] is 2
}

// num_batches_tracked counts with a momentum too, and may be absent then.
TEST(RunningStatsHand, CounterWithMomentumAndOptionalCounter) {
  BNORM_SEEDED_RNG(rng, 77);
  const std::vector<int64_t> dims = {3, 2, 4};
  std::vector<float> rm1 = {0, 0}, rv1 = {1, 1}, rm2 = rm1, rv2 = rv1;
  int64_t nbt = 0;
  for (int step = 1; step <= 4; ++step) {
    const Tensor x = RandomTensor(rng, dims, Layout::kChannelsLast);
    Tensor y(dims, Layout::kChannelsLast);
    ForwardTrainArgs a;
    a.x = x.cview();
    a.y = y.view();
    a.running_mean = rm1;
    a.running_var = rv1;
    a.num_batches_tracked = &nbt;
    a.momentum = 0.3;
    ASSERT_TRUE(IsOk(forward_train(a)));
    EXPECT_EQ(nbt, step);
    a.running_mean = rm2;
    a.running_var = rv2;
    a.num_batches_tracked = nullptr;
    ASSERT_TRUE(IsOk(forward_train(a)));
  }
  EXPECT_TRUE(BitIdentical(rm1, rm2));
  EXPECT_TRUE(BitIdentical(rv1, rv2));
}

// num_batches_tracked = INT64_MAX cannot be incremented. The library computes batches + 1 in
// int64 (signed overflow, undefined behaviour). Expected: the call is rejected up front, naming
// num_batches_tracked, with nothing written (for momentum none the factor 1 / (count + 1) has no
// meaning either). With a momentum, wrapping as PyTorch's int64 add_ does is also accepted.
TEST(RunningStatsCounterOverflow, MaxCounterIsRejectedOrWraps) {
  const std::vector<float> x = {1, 2, 3, 4};
  for (std::optional<double> momentum : {std::optional<double>(), std::optional<double>(0.1)}) {
    SCOPED_TRACE(momentum ? "momentum 0.1" : "momentum none");
    std::vector<float> y(4), rm = {0.5f, 0.5f}, rv = {2, 2};
    FillSentinel(y);
    int64_t nbt = std::numeric_limits<int64_t>::max();
    const Snapshot snap = Snapshot()
                              .Add("y", y)
                              .Add("running_mean", rm)
                              .Add("running_var", rv)
                              .Add("num_batches_tracked", &nbt);
    ForwardTrainArgs a;
    a.x = ConstTensorView(x.data(), {2, 2});
    a.y = TensorView(y.data(), {2, 2});
    a.running_mean = rm;
    a.running_var = rv;
    a.num_batches_tracked = &nbt;
    a.momentum = momentum;
    const bnorm::Status st = forward_train(a);
    if (st.ok() && momentum) {
      EXPECT_EQ(nbt, std::numeric_limits<int64_t>::min());  // PyTorch's wrap-around
      continue;
    }
    EXPECT_TRUE(IsInvalid(st, "num_batches_tracked"));
    EXPECT_TRUE(snap.Unchanged());
  }
}

// The C API: momentum < 0 means none (cumulative average).
TEST(RunningStatsCApi, NegativeMomentumIsCumulativeAverage) {
  const double ms[2] = {2, 6};
  float rm = 0, rv = 1, y[2], sm, si;
  int64_t nbt = 0;
  for (int k = 0; k < 2; ++k) {
    const float x[2] = {static_cast<float>(ms[k] - 1), static_cast<float>(ms[k] + 1)};
    ASSERT_EQ(bnorm_forward_train(BNORM_CHANNELS_FIRST, 2, 1, 1, x, nullptr, nullptr, &rm, &rv,
                                  &nbt, -1.0, 1e-5, y, &sm, &si),
              BNORM_OK)
        << bnorm_last_error();
  }
  EXPECT_EQ(nbt, 2);
  EXPECT_FLOAT_EQ(rm, 4.0f);  // (2 + 6) / 2
  EXPECT_FLOAT_EQ(rv, 2.0f);  // (2 + 2) / 2
}

}  // namespace
}  // namespace bnorm_test
