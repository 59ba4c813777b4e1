// Softmax cross-entropy, SGD, learning-rate schedules and the Rng.
#include <gtest/gtest.h>

#include <cmath>
#include <numbers>
#include <vector>

#include "bnorm/nn/init.h"
#include "bnorm/nn/loss.h"
#include "bnorm/nn/optim.h"
#include "nn_test_util.h"

namespace bnorm::nn {
namespace {

using testing::fails_with;

TEST(SoftmaxCrossEntropy, ByHand) {
  Tensor z({2, 3});
  const float v[] = {1, 2, 3, 0, 0, 0};
  std::copy(v, v + 6, z.data());
  const std::vector<int32_t> labels = {2, 1};
  CrossEntropyResult r;
  Tensor d;
  ASSERT_TRUE(softmax_cross_entropy(z, labels, &r, &d).ok());
  const double lse0 = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0));
  const double expected = ((lse0 - 3.0) + std::log(3.0)) / 2.0;
  EXPECT_NEAR(r.loss, expected, 1e-12);
  EXPECT_EQ(r.correct, 1);  // row 1 is a tie: argmax is the first, 0, not 1
  EXPECT_NEAR(d[0], std::exp(1.0 - lse0) / 2, 1e-7);
  EXPECT_NEAR(d[2], (std::exp(3.0 - lse0) - 1) / 2, 1e-7);
  EXPECT_NEAR(d[4], (1.0 / 3 - 1) / 2, 1e-7);
  EXPECT_NEAR(d[5], (1.0 / 3) / 2, 1e-7);
}

TEST(SoftmaxCrossEntropy, GradientByFiniteDifferences) {
  Rng rng(1);
  Tensor z({4, 5});
  normal_(z.span(), 0.0, 2.0, rng);
  const std::vector<uint8_t> labels = {0, 4, 2, 2};
  CrossEntropyResult r;
  Tensor d;
  ASSERT_TRUE(softmax_cross_entropy(z, labels, &r, &d).ok());
  // The loss is computed in double from fp32 logits: a step of 1e-2 changes the fp32 logit
  // exactly by the rounded step, which we divide by; truncation ~ h^2 * |f'''| <= 1e-4 / N.
  for (int64_t i = 0; i < z.numel(); ++i) {
    const float saved = z[i];
    z[i] = saved + 0.01f;
    const double hp = static_cast<double>(z[i]) - saved;
    CrossEntropyResult p, m;
    ASSERT_TRUE(softmax_cross_entropy(z, labels, &p).ok());
    z[i] = saved - 0.01f;
    const double hm = saved - static_cast<double>(z[i]);
    ASSERT_TRUE(softmax_cross_entropy(z, labels, &m).ok());
    z[i] = saved;
    EXPECT_NEAR(d[i], (p.loss - m.loss) / (hp + hm), 1e-5) << i;
  }
}

TEST(SoftmaxCrossEntropy, StableForHugeLogits) {
  Tensor z({1, 3});
  z[0] = 1000;
  z[1] = -1000;
  z[2] = 999;
  const std::vector<int32_t> labels = {2};
  CrossEntropyResult r;
  Tensor d;
  ASSERT_TRUE(softmax_cross_entropy(z, labels, &r, &d).ok());
  EXPECT_NEAR(r.loss, 1.0 + std::log1p(std::exp(-1.0)), 1e-12);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(std::isfinite(d[i]));
}

TEST(SoftmaxCrossEntropy, BadInput) {
  Tensor z({2, 3});
  CrossEntropyResult r;
  const std::vector<int32_t> few = {1};
  EXPECT_TRUE(fails_with(softmax_cross_entropy(z, few, &r), {"labels", "expected 2", "got 1"}));
  const std::vector<int32_t> out_of_range = {1, 3};
  EXPECT_TRUE(
      fails_with(softmax_cross_entropy(z, out_of_range, &r), {"labels[1]", "[0, 3)", "got 3"}));
  const std::vector<int32_t> negative = {-1, 0};
  EXPECT_TRUE(fails_with(softmax_cross_entropy(z, negative, &r), {"labels[0]", "got -1"}));
  Tensor z3({2, 3, 1});
  const std::vector<int32_t> ok = {0, 1};
  EXPECT_TRUE(fails_with(softmax_cross_entropy(z3, ok, &r), {"logits", "[2, 3, 1]"}));
  EXPECT_EQ(count_correct(z, std::vector<uint8_t>{0, 0}), 2);
}

TEST(Sgd, MomentumAndWeightDecayByHand) {
  std::vector<float> p = {1.0f, -2.0f}, g = {0.5f, 0.25f};
  StateEntry e;
  e.name = "w";
  e.shape = {2};
  e.data = p.data();
  e.is_parameter = true;
  e.grad = g.data();
  Sgd sgd;
  SgdOptions o;
  o.lr = 0.1;
  o.momentum = 0.9;
  o.weight_decay = 0.01;
  ASSERT_TRUE(Sgd::create({e}, o, &sgd).ok());
  // Step 1: d = g + 0.01 p = (0.51, 0.23); buf = d; p -= 0.1 buf -> (0.949, -2.023).
  sgd.step();
  EXPECT_NEAR(p[0], 0.949, 1e-6);
  EXPECT_NEAR(p[1], -2.023, 1e-6);
  // Step 2 with the same g: d = (0.5 + 0.00949, 0.25 - 0.02023) = (0.50949, 0.22977);
  // buf = 0.9 * (0.51, 0.23) + d = (0.96849, 0.43677); p -= 0.1 buf.
  sgd.step();
  EXPECT_NEAR(p[0], 0.949 - 0.096849, 1e-6);
  EXPECT_NEAR(p[1], -2.023 - 0.043677, 1e-6);
  sgd.zero_grad();
  EXPECT_EQ(g[0], 0.0f);
  // Plain SGD.
  std::vector<float> q = {1.0f};
  std::vector<float> gq = {2.0f};
  e.shape = {1};
  e.data = q.data();
  e.grad = gq.data();
  SgdOptions plain;
  plain.lr = 0.5;
  ASSERT_TRUE(Sgd::create({e}, plain, &sgd).ok());
  sgd.step();
  EXPECT_FLOAT_EQ(q[0], 0.0f);
  sgd.set_lr(0.25);
  sgd.step();
  EXPECT_FLOAT_EQ(q[0], -0.5f);
}

TEST(Sgd, SetParamsKeepsTheMomentumOfThoseThatStay) {
  std::vector<float> a = {1.0f}, ga = {1.0f}, b = {1.0f}, gb = {1.0f};
  auto entry = [](const char* name, float* p, float* g) {
    StateEntry e;
    e.name = name;
    e.shape = {1};
    e.data = p;
    e.is_parameter = true;
    e.grad = g;
    return e;
  };
  Sgd sgd;
  SgdOptions o;
  o.lr = 0.1;
  o.momentum = 0.5;
  o.weight_decay = 0.1;
  ASSERT_TRUE(Sgd::create({entry("a", a.data(), ga.data()), entry("b", b.data(), gb.data())}, o,
                          &sgd).ok());
  sgd.step();  // d = 1 + 0.1 = 1.1 for both; buf = 1.1; p = 1 - 0.11 = 0.89
  EXPECT_NEAR(a[0], 0.89, 1e-6);
  // b is dropped (a frozen parameter): neither its momentum nor weight decay moves it again.
  ASSERT_TRUE(sgd.set_params({entry("a", a.data(), ga.data())}).ok());
  ga[0] = 0.0f;
  gb[0] = 0.0f;
  sgd.step();  // a: d = 0.089; buf = 0.55 + 0.089 = 0.639; a = 0.89 - 0.0639
  EXPECT_NEAR(a[0], 0.89 - 0.0639, 1e-6);
  EXPECT_NEAR(b[0], 0.89, 1e-6);
  // b back: its buffer starts at 0 (d = 0.089 -> b -= 0.0089).
  const float a_before = a[0];
  ASSERT_TRUE(sgd.set_params({entry("b", b.data(), gb.data()), entry("a", a.data(), ga.data())}).ok());
  sgd.step();
  EXPECT_NEAR(b[0], 0.89 - 0.0089, 1e-6);
  EXPECT_NEAR(a[0], a_before - 0.1 * (0.5 * 0.639 + 0.1 * a_before), 1e-6);
  StateEntry buffer = entry("1.running_mean", b.data(), nullptr);
  buffer.is_parameter = false;
  EXPECT_TRUE(fails_with(sgd.set_params({buffer}), {"1.running_mean"}));
  const float b_before = b[0];
  sgd.step();  // still a and b
  EXPECT_LT(b[0], b_before);
}

TEST(Sgd, BadInput) {
  Sgd sgd;
  SgdOptions o;
  o.lr = -1;
  EXPECT_TRUE(fails_with(Sgd::create({}, o, &sgd), {"lr", "-1"}));
  o.lr = 0.1;
  o.momentum = 1.0;
  EXPECT_TRUE(fails_with(Sgd::create({}, o, &sgd), {"momentum", "[0, 1)", "1"}));
  o.momentum = 0;
  o.weight_decay = std::nan("");
  EXPECT_TRUE(fails_with(Sgd::create({}, o, &sgd), {"weight_decay", "nan"}));
  StateEntry buffer;
  buffer.name = "1.running_mean";
  buffer.shape = {3};
  float data[3] = {};
  buffer.data = data;
  EXPECT_TRUE(fails_with(Sgd::create({buffer}, SgdOptions(), &sgd), {"1.running_mean"}));
}

TEST(LrSchedule, Values) {
  LrSchedule s;
  LrScheduleOptions o;
  o.base_lr = 1.0;
  ASSERT_TRUE(LrSchedule::create(o, &s).ok());
  EXPECT_EQ(s.lr_at(0), 1.0);
  EXPECT_EQ(s.lr_at(1000), 1.0);
  o.kind = LrScheduleKind::kStep;
  o.step_size = 10;
  o.gamma = 0.5;
  ASSERT_TRUE(LrSchedule::create(o, &s).ok());
  EXPECT_EQ(s.lr_at(9), 1.0);
  EXPECT_EQ(s.lr_at(10), 0.5);
  EXPECT_EQ(s.lr_at(25), 0.25);
  o.kind = LrScheduleKind::kCosine;
  o.total_steps = 110;
  o.warmup_steps = 10;
  o.min_lr = 0.1;
  ASSERT_TRUE(LrSchedule::create(o, &s).ok());
  EXPECT_DOUBLE_EQ(s.lr_at(0), 0.1);  // warm-up: (s + 1) / 10
  EXPECT_DOUBLE_EQ(s.lr_at(4), 0.5);
  EXPECT_DOUBLE_EQ(s.lr_at(10), 1.0);
  EXPECT_NEAR(s.lr_at(60), 0.55, 1e-12);
  EXPECT_DOUBLE_EQ(s.lr_at(110), 0.1);
  EXPECT_DOUBLE_EQ(s.lr_at(500), 0.1);
  o.total_steps = 10;
  EXPECT_TRUE(fails_with(LrSchedule::create(o, &s), {"total_steps", "10"}));
  LrScheduleKind k;
  ASSERT_TRUE(LrSchedule::parse_kind("cosine", &k).ok());
  EXPECT_EQ(k, LrScheduleKind::kCosine);
  EXPECT_TRUE(fails_with(LrSchedule::parse_kind("linear", &k), {"\"linear\""}));
}

TEST(Rng, DeterministicAndDistributed) {
  Rng a(123), b(123);
  for (int i = 0; i < 100; ++i) ASSERT_EQ(a.next_u64(), b.next_u64());
  // Golden values: the generator is ours, so these hold on every platform.
  Rng g(0);
  EXPECT_EQ(g.next_u64(), 11091344671253066420ULL);
  EXPECT_EQ(g.next_u64(), 13793997310169335082ULL);
  EXPECT_NE(Rng(1).next_u64(), 11091344671253066420ULL);
  Rng r(5);
  double sum = 0, sum_sq = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    const double v = r.normal();
    sum += v;
    sum_sq += v * v;
  }
  EXPECT_NEAR(sum / n, 0.0, 5.0 / std::sqrt(n));
  EXPECT_NEAR(sum_sq / n, 1.0, 0.02);
  for (int i = 0; i < 1000; ++i) {
    const double u = r.uniform();
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    ASSERT_LT(r.below(7), 7u);
  }
}

TEST(Init, KaimingBounds) {
  Rng rng(1);
  std::vector<float> w(10000);
  kaiming_uniform_(w, 50, std::sqrt(5.0), rng);
  for (float v : w) ASSERT_LE(std::fabs(v), 1.0 / std::sqrt(50.0) + 1e-7);
  kaiming_normal_(w, 288, 0.0, rng);
  double sq = 0;
  for (float v : w) sq += static_cast<double>(v) * v;
  EXPECT_NEAR(std::sqrt(sq / w.size()), std::sqrt(2.0 / 288), 0.03 * std::sqrt(2.0 / 288));
}

}  // namespace
}  // namespace bnorm::nn
