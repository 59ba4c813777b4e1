// Forward values and finite-difference gradients of every layer, and their bad inputs.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "bnorm/nn/layers.h"
#include "nn_test_util.h"

namespace bnorm::nn {
namespace {

using testing::check_gradients;
using testing::fails_with;
using testing::random_tensor;

std::unique_ptr<Linear> make_linear(int64_t in, int64_t out, bool bias, uint64_t seed = 1) {
  Rng rng(seed);
  std::unique_ptr<Linear> m;
  EXPECT_TRUE(Linear::create(in, out, bias, rng, &m).ok());
  return m;
}

std::unique_ptr<Conv2d> make_conv(int64_t in, int64_t out, int64_t k, int64_t s, int64_t p,
                                  bool bias, uint64_t seed = 2) {
  Rng rng(seed);
  std::unique_ptr<Conv2d> m;
  Status st = Conv2d::create(in, out, k, s, p, bias, rng, &m);
  EXPECT_TRUE(st.ok()) << st.to_string();
  return m;
}

TEST(Linear, ForwardByHand) {
  auto m = make_linear(3, 2, true);
  const float w[] = {1, 2, 3, -1, 0, 1};
  std::copy(w, w + 6, m->weight().begin());
  m->bias()[0] = 0.5f;
  m->bias()[1] = -1.0f;
  Tensor x({2, 3});
  const float xv[] = {1, 1, 1, 2, 0, -1};
  std::copy(xv, xv + 6, x.data());
  Tensor y;
  ASSERT_TRUE(m->forward(x, &y).ok());
  ASSERT_EQ(y.shape(), (std::vector<int64_t>{2, 2}));
  EXPECT_FLOAT_EQ(y[0], 6.5f);   // 1+2+3 + 0.5
  EXPECT_FLOAT_EQ(y[1], -1.0f);  // -1+0+1 - 1
  EXPECT_FLOAT_EQ(y[2], -0.5f);  // 2-3 + 0.5
  EXPECT_FLOAT_EQ(y[3], -4.0f);  // -2-1 - 1
}

TEST(Linear, DefaultInitBounds) {
  auto m = make_linear(50, 20, true);
  const float bound = 1.0f / std::sqrt(50.0f);
  for (float v : m->weight()) EXPECT_LE(std::fabs(v), bound);
  for (float v : m->bias()) EXPECT_LE(std::fabs(v), bound);
}

TEST(Linear, Gradients) {
  for (bool bias : {true, false}) {
    auto m = make_linear(7, 5, bias);
    Rng rng(3);
    // Linear in x and in the parameters: no truncation error, so a large step.
    check_gradients(*m, random_tensor({4, 7}, rng), 0.25, 11);
  }
}

TEST(Linear, BadInput) {
  auto m = make_linear(784, 100, true);
  Tensor x({60, 785}), y;
  EXPECT_TRUE(fails_with(m->forward(x, &y),
                         {"Linear(in_features=784, out_features=100, bias=True)", "x",
                          "[N >= 1, 784]", "[60, 785]"}));
  Tensor x3({2, 784, 1});
  EXPECT_TRUE(fails_with(m->forward(x3, &y), {"[2, 784, 1]"}));
  EXPECT_TRUE(fails_with(m->forward(x, nullptr), {"y", "null"}));
  Tensor dy({60, 100});
  EXPECT_TRUE(fails_with(m->backward(dy, nullptr), {"no forward"}));
  Tensor good({60, 784});
  ASSERT_TRUE(m->forward(good, &y).ok());
  Tensor bad_dy({59, 100});
  EXPECT_TRUE(fails_with(m->backward(bad_dy, nullptr), {"dy", "[60, 100]", "[59, 100]"}));
  Rng rng(1);
  std::unique_ptr<Linear> out;
  EXPECT_TRUE(fails_with(Linear::create(0, 3, true, rng, &out), {"in_features", "0"}));
  EXPECT_TRUE(fails_with(Linear::create(3, -2, true, rng, &out), {"out_features", "-2"}));
}

// Direct convolution in double: the oracle for im2col + GEMM.
std::vector<double> naive_conv(const Tensor& x, Conv2d& m, int64_t ho, int64_t wo) {
  const int64_t n = x.dim(0), ci = x.dim(1), h = x.dim(2), w = x.dim(3);
  const int64_t co = m.out_channels(), k = m.kernel(), s = m.stride(), p = m.padding();
  std::vector<double> y(static_cast<size_t>(n * co * ho * wo));
  for (int64_t b = 0; b < n; ++b)
    for (int64_t o = 0; o < co; ++o)
      for (int64_t i = 0; i < ho; ++i)
        for (int64_t j = 0; j < wo; ++j) {
          double acc = m.has_bias() ? m.bias()[o] : 0.0;
          for (int64_t c = 0; c < ci; ++c)
            for (int64_t a = 0; a < k; ++a)
              for (int64_t bb = 0; bb < k; ++bb) {
                const int64_t ih = i * s - p + a, iw = j * s - p + bb;
                if (ih < 0 || ih >= h || iw < 0 || iw >= w) continue;
                acc += static_cast<double>(m.weight()[((o * ci + c) * k + a) * k + bb]) *
                       x[((b * ci + c) * h + ih) * w + iw];
              }
          y[static_cast<size_t>(((b * co + o) * ho + i) * wo + j)] = acc;
        }
  return y;
}

struct ConvCase {
  int64_t in, out, k, s, p, h, w;
  bool bias;
};

TEST(Conv2d, ForwardMatchesDirectConvolutionAndGradients) {
  const ConvCase cases[] = {
      {2, 3, 3, 1, 1, 5, 6, true},  {3, 2, 3, 2, 0, 7, 5, false}, {2, 4, 1, 1, 0, 3, 4, true},
      {1, 2, 2, 2, 1, 5, 5, true},  {2, 2, 3, 1, 2, 3, 3, false}, {1, 1, 5, 3, 2, 9, 8, true},
  };
  int seed = 0;
  for (const ConvCase& c : cases) {
    SCOPED_TRACE(::testing::Message() << "in " << c.in << " out " << c.out << " k " << c.k
                                      << " s " << c.s << " p " << c.p << " " << c.h << "x"
                                      << c.w);
    auto m = make_conv(c.in, c.out, c.k, c.s, c.p, c.bias, 10 + seed);
    Rng rng(20 + seed++);
    normal_(m->bias(), 0.0, 1.0, rng);
    Tensor x = random_tensor({2, c.in, c.h, c.w}, rng);
    Tensor y;
    ASSERT_TRUE(m->forward(x, &y).ok());
    const int64_t ho = (c.h + 2 * c.p - c.k) / c.s + 1, wo = (c.w + 2 * c.p - c.k) / c.s + 1;
    ASSERT_EQ(y.shape(), (std::vector<int64_t>{2, c.out, ho, wo}));
    std::vector<double> ref = naive_conv(x, *m, ho, wo);
    // Each output sums in * k * k products of magnitude <= max|w|: a few ulps of that sum.
    const double tol = 8 * std::numeric_limits<float>::epsilon() * (c.in * c.k * c.k + 1);
    for (int64_t i = 0; i < y.numel(); ++i)
      ASSERT_NEAR(y[i], ref[static_cast<size_t>(i)], tol) << "index " << i;
    check_gradients(*m, x, 0.25, 30 + seed);
  }
}

TEST(Conv2d, SeveralChunksOfImages) {
  // 16 * 9 rows of 64 * 64 columns exceed the per-GEMM workspace: one image per chunk.
  auto m = make_conv(16, 2, 3, 1, 1, true, 40);
  Rng rng(41);
  Tensor x = random_tensor({3, 16, 64, 64}, rng), y;
  ASSERT_TRUE(m->forward(x, &y).ok());
  std::vector<double> ref = naive_conv(x, *m, 64, 64);
  const double tol = 8 * std::numeric_limits<float>::epsilon() * (16 * 9 + 1);
  for (int64_t i = 0; i < y.numel(); ++i)
    ASSERT_NEAR(y[i], ref[static_cast<size_t>(i)], tol) << "index " << i;
  // Backward per chunk equals backward of each image alone (the gradients add up).
  Tensor dy = random_tensor({3, 2, 64, 64}, rng), dx;
  m->zero_grad();
  ASSERT_TRUE(m->backward(dy, &dx).ok());
  const std::vector<float> dw_all(m->weight_grad().begin(), m->weight_grad().end());
  m->zero_grad();
  for (int64_t i = 0; i < 3; ++i) {
    Tensor xi({1, 16, 64, 64}), dyi({1, 2, 64, 64}), yi, dxi;
    std::copy(x.data() + i * xi.numel(), x.data() + (i + 1) * xi.numel(), xi.data());
    std::copy(dy.data() + i * dyi.numel(), dy.data() + (i + 1) * dyi.numel(), dyi.data());
    ASSERT_TRUE(m->forward(xi, &yi).ok());
    ASSERT_TRUE(m->backward(dyi, &dxi).ok());
    for (int64_t j = 0; j < dxi.numel(); ++j) ASSERT_EQ(dxi[j], dx[i * dxi.numel() + j]);
  }
  for (size_t j = 0; j < dw_all.size(); ++j)
    EXPECT_NEAR(m->weight_grad()[j], dw_all[j], 1e-4 * (1.0 + std::fabs(dw_all[j])));
}

TEST(Conv2d, ReprAndBadInput) {
  auto m = make_conv(1, 32, 3, 1, 1, false);
  EXPECT_EQ(m->repr(),
            "Conv2d(1, 32, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)");
  EXPECT_EQ(make_conv(2, 3, 3, 2, 0, true)->repr(),
            "Conv2d(2, 3, kernel_size=(3, 3), stride=(2, 2))");
  Tensor x({2, 2, 28, 28}), y;
  EXPECT_TRUE(fails_with(m->forward(x, &y), {"x", "[N >= 1, 1, H, W]", "[2, 2, 28, 28]"}));
  Tensor x3({2, 28, 28});
  EXPECT_TRUE(fails_with(m->forward(x3, &y), {"[2, 28, 28]"}));
  auto big = make_conv(1, 1, 5, 1, 0, true);
  Tensor small({1, 1, 4, 9});
  EXPECT_TRUE(fails_with(big->forward(small, &y), {"kernel (5)", "[1, 1, 4, 9]"}));
  Rng rng(1);
  std::unique_ptr<Conv2d> out;
  EXPECT_TRUE(fails_with(Conv2d::create(1, 1, 0, 1, 0, true, rng, &out), {"kernel", "0"}));
  EXPECT_TRUE(fails_with(Conv2d::create(1, 1, 3, 0, 0, true, rng, &out), {"stride", "0"}));
  EXPECT_TRUE(fails_with(Conv2d::create(1, 1, 3, 1, -1, true, rng, &out), {"padding", "-1"}));
  EXPECT_TRUE(fails_with(Conv2d::create(0, 1, 3, 1, 0, true, rng, &out), {"in_channels", "0"}));
}

TEST(MaxPool2d, ForwardBackwardByHand) {
  std::unique_ptr<MaxPool2d> m;
  ASSERT_TRUE(MaxPool2d::create(2, 0, &m).ok());
  EXPECT_EQ(m->repr(), "MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)");
  // One 4x5 plane (floor mode drops the last column).
  Tensor x({1, 1, 4, 5});
  const float v[] = {1, 5, 2, 0, 9,  //
                     3, 4, 8, 8, 9,  //
                     0, 0, 1, 2, 9,  //
                     7, 0, 3, 1, 9};
  std::copy(v, v + 20, x.data());
  Tensor y;
  ASSERT_TRUE(m->forward(x, &y).ok());
  ASSERT_EQ(y.shape(), (std::vector<int64_t>{1, 1, 2, 2}));
  EXPECT_EQ(y[0], 5);
  EXPECT_EQ(y[1], 8);  // tie: the first 8 (row 1, col 2) takes the gradient
  EXPECT_EQ(y[2], 7);
  EXPECT_EQ(y[3], 3);
  Tensor dy({1, 1, 2, 2});
  dy[0] = 1;
  dy[1] = 2;
  dy[2] = 3;
  dy[3] = 4;
  Tensor dx;
  ASSERT_TRUE(m->backward(dy, &dx).ok());
  const float expected[] = {0, 1, 0, 0, 0,  //
                            0, 0, 2, 0, 0,  //
                            0, 0, 0, 0, 0,  //
                            3, 0, 4, 0, 0};
  for (int i = 0; i < 20; ++i) EXPECT_EQ(dx[i], expected[i]) << i;
}

TEST(MaxPool2d, Gradients) {
  std::unique_ptr<MaxPool2d> m;
  ASSERT_TRUE(MaxPool2d::create(3, 2, &m).ok());
  // Distinct values at least 0.05 apart so that a step of 0.01 never changes a window's max.
  Tensor x({2, 2, 7, 6});
  Rng rng(5);
  for (int64_t i = 0; i < x.numel(); ++i) x[i] = 0.05f * static_cast<float>(i);
  for (int64_t i = x.numel() - 1; i > 0; --i)
    std::swap(x[i], x[static_cast<int64_t>(rng.below(static_cast<uint64_t>(i + 1)))]);
  check_gradients(*m, x, 0.01, 6);
}

TEST(MaxPool2d, BadInput) {
  std::unique_ptr<MaxPool2d> m;
  ASSERT_TRUE(MaxPool2d::create(2, 2, &m).ok());
  Tensor x({1, 1, 1, 5}), y;
  EXPECT_TRUE(fails_with(m->forward(x, &y), {"H >= 2", "[1, 1, 1, 5]"}));
  EXPECT_TRUE(fails_with(MaxPool2d::create(0, 1, &m), {"kernel", "0"}));
}

TEST(Activations, ReluAndSigmoidGradients) {
  Rng rng(7);
  // Keep ReLU's inputs away from its kink: |x| >= 0.1 > 2h.
  Tensor x = random_tensor({3, 4, 5}, rng, 0.1, 2.0);
  for (int64_t i = 0; i < x.numel(); i += 2) x[i] = -x[i];
  auto relu = ReLU::create();
  check_gradients(*relu, x, 0.01, 8);
  auto sigmoid = Sigmoid::create();
  check_gradients(*sigmoid, random_tensor({3, 7}, rng, -4.0, 4.0), 0.01, 9);
}

TEST(Activations, SigmoidAccuracyAndExtremes) {
  auto m = Sigmoid::create();
  Tensor x({1, 20001}), y;
  for (int64_t i = 0; i < x.numel(); ++i) x[i] = -50.0f + 0.005f * static_cast<float>(i);
  ASSERT_TRUE(m->forward(x, &y).ok());
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double ref = 1.0 / (1.0 + std::exp(-static_cast<double>(x[i])));
    // A few ulps of the result: exp's polynomial, the division and t * s each round once.
    ASSERT_NEAR(y[i], ref, 4 * std::numeric_limits<float>::epsilon() * ref) << "x = " << x[i];
  }
  Tensor e({1, 5});
  e[0] = -1000.0f;
  e[1] = 1000.0f;
  e[2] = std::numeric_limits<float>::quiet_NaN();
  e[3] = 0.0f;
  e[4] = -std::numeric_limits<float>::infinity();
  ASSERT_TRUE(m->forward(e, &y).ok());
  EXPECT_LT(y[0], 1e-37f);
  EXPECT_GE(y[0], 0.0f);
  EXPECT_EQ(y[1], 1.0f);
  EXPECT_TRUE(std::isnan(y[2]));
  EXPECT_EQ(y[3], 0.5f);
  EXPECT_LT(y[4], 1e-37f);
  auto relu = ReLU::create();
  ASSERT_TRUE(relu->forward(e, &y).ok());
  EXPECT_EQ(y[0], 0.0f);
  EXPECT_EQ(y[1], 1000.0f);
  EXPECT_TRUE(std::isnan(y[2]));
}

TEST(Flatten, ShapesAndRoundTrip) {
  auto m = Flatten::create();
  Rng rng(1);
  Tensor x = random_tensor({2, 3, 4, 5}, rng), y, dx;
  ASSERT_TRUE(m->forward(x, &y).ok());
  EXPECT_EQ(y.shape(), (std::vector<int64_t>{2, 60}));
  for (int64_t i = 0; i < x.numel(); ++i) EXPECT_EQ(y[i], x[i]);
  ASSERT_TRUE(m->backward(y, &dx).ok());
  EXPECT_EQ(dx.shape(), x.shape());
  Tensor bad({2, 59});
  EXPECT_TRUE(fails_with(m->backward(bad, &dx), {"dy", "[2, 60]", "[2, 59]"}));
  Tensor one({5});
  EXPECT_TRUE(fails_with(m->forward(one, &y), {"rank >= 2", "[5]"}));
}

BatchNormOptions bn_options(int64_t c) {
  BatchNormOptions o;
  o.num_features = c;
  return o;
}

TEST(BatchNorm1d, TrainAndEvalGradients) {
  std::unique_ptr<BatchNorm1d> m;
  ASSERT_TRUE(BatchNorm1d::create(bn_options(4), &m).ok());
  Rng rng(12);
  normal_(m->layer().weight(), 1.0, 0.5, rng);
  normal_(m->layer().bias(), 0.0, 0.5, rng);
  // (N, C) and (N, C, L), in training mode (through the batch statistics) and in eval mode.
  check_gradients(*m, random_tensor({6, 4}, rng, -2.0, 2.0), 0.01, 13);
  check_gradients(*m, random_tensor({3, 4, 5}, rng, -2.0, 2.0), 0.01, 14);
  m->eval();
  normal_(m->layer().running_mean(), 0.0, 0.5, rng);
  uniform_(m->layer().running_var(), 0.5, 2.0, rng);
  check_gradients(*m, random_tensor({6, 4}, rng, -2.0, 2.0), 0.01, 15);
}

TEST(BatchNorm2d, TrainAndEvalGradients) {
  std::unique_ptr<BatchNorm2d> m;
  ASSERT_TRUE(BatchNorm2d::create(bn_options(3), &m).ok());
  Rng rng(16);
  normal_(m->layer().weight(), 1.0, 0.5, rng);
  normal_(m->layer().bias(), 0.0, 0.5, rng);
  check_gradients(*m, random_tensor({2, 3, 3, 4}, rng, -2.0, 2.0), 0.01, 17);
  m->train(false);
  check_gradients(*m, random_tensor({2, 3, 3, 4}, rng, -2.0, 2.0), 0.01, 18);
}

// The extensions (issue 15) through the nn layers, against the finite differences of
// check_gradients: every freeze combination, ghost chunks (even and uneven), and batch renorm
// where every channel's r and d sit on their clips (there they are locally constant, so the
// treated-as-constant backward is the true gradient).
TEST(BatchNorm2d, ExtensionGradients) {
  Rng rng(31);
  for (int combo = 0; combo < 8; ++combo) {
    SCOPED_TRACE("freeze combination " + std::to_string(combo));
    BatchNormOptions o = bn_options(3);
    o.normalize_with_running_stats = combo & 1;
    o.freeze_running_stats = combo & 2;
    o.freeze_affine = combo & 4;
    std::unique_ptr<BatchNorm2d> m;
    ASSERT_TRUE(BatchNorm2d::create(o, &m).ok());
    normal_(m->layer().weight(), 1.0, 0.5, rng);
    normal_(m->layer().running_mean(), 0.0, 0.5, rng);
    uniform_(m->layer().running_var(), 0.5, 2.0, rng);
    EXPECT_EQ(m->parameters().size(), o.freeze_affine ? 0u : 2u);
    if (!o.normalize_with_running_stats || o.freeze_running_stats)  // output constant per x
      check_gradients(*m, random_tensor({4, 3, 2, 3}, rng, -2.0, 2.0), 0.01, 32 + combo);
  }
  for (int64_t ghost : {2, 3}) {
    BatchNormOptions o = bn_options(3);
    o.ghost_batch = ghost;
    std::unique_ptr<BatchNorm2d> m;
    ASSERT_TRUE(BatchNorm2d::create(o, &m).ok());
    EXPECT_NE(m->repr().find("ghost_batch=" + std::to_string(ghost)), std::string::npos);
    normal_(m->layer().weight(), 1.0, 0.5, rng);
    check_gradients(*m, random_tensor({7, 3, 2, 2}, rng, -2.0, 2.0), 0.01, 40 + ghost);
  }
  BatchNormOptions o = bn_options(3);
  o.batch_renorm = true;
  o.renorm_rmax = 1.5;
  o.renorm_dmax = 0.25;
  o.freeze_running_stats = true;  // mu and sigma fixed across the finite differences
  std::unique_ptr<BatchNorm2d> m;
  ASSERT_TRUE(BatchNorm2d::create(o, &m).ok());
  EXPECT_NE(m->repr().find("batch_renorm=True, rmax=1.5, dmax=0.25"), std::string::npos);
  EXPECT_NE(m->architecture().find("\"batch_renorm\":true"), std::string::npos);
  normal_(m->layer().weight(), 1.0, 0.5, rng);
  // x in [-2, 2]: sigma_B ~ 1.15, so sigma = 10 and 0.1 put r on 1 / rmax and rmax, and
  // mu = +-5 puts d on -dmax and dmax.
  const float mu[] = {5, -5, 5}, var[] = {100, 0.01f, 0.01f};
  std::copy(mu, mu + 3, m->layer().running_mean().begin());
  std::copy(var, var + 3, m->layer().running_var().begin());
  check_gradients(*m, random_tensor({4, 3, 2, 3}, rng, -2.0, 2.0), 0.01, 45);
  // A plain layer prints and serializes as before.
  ASSERT_TRUE(BatchNorm2d::create(bn_options(3), &m).ok());
  EXPECT_EQ(m->repr(),
            "BatchNorm2d(3, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)");
}

TEST(BatchNorm1d, TrainingUpdatesRunningStatsAndEvalUsesThem) {
  std::unique_ptr<BatchNorm1d> m;
  ASSERT_TRUE(BatchNorm1d::create(bn_options(2), &m).ok());
  Tensor x({4, 2}), y;
  const float v[] = {1, 10, 2, 20, 3, 30, 4, 40};
  std::copy(v, v + 8, x.data());
  ASSERT_TRUE(m->forward(x, &y).ok());
  // Channel 0: mean 2.5, biased var 1.25, unbiased 5/3.
  EXPECT_NEAR(y[0], (1 - 2.5) / std::sqrt(1.25 + 1e-5), 1e-5);
  EXPECT_NEAR(m->layer().running_mean()[0], 0.25, 1e-6);
  EXPECT_NEAR(m->layer().running_var()[0], 0.9 + 0.1 * 5.0 / 3.0, 1e-6);
  EXPECT_NEAR(m->layer().running_mean()[1], 2.5, 1e-5);
  EXPECT_EQ(m->num_batches_tracked(), 1);
  // num_batches_tracked through state_dict: a checkpoint writes it, the next forward counts on.
  for (const StateEntry& e : m->state_dict()) {
    if (e.name == "num_batches_tracked") {
      ASSERT_EQ(e.dtype, DType::kI64);
      EXPECT_TRUE(e.shape.empty());
      EXPECT_EQ(*static_cast<int64_t*>(e.data), 1);
      *static_cast<int64_t*>(e.data) = 41;
    }
  }
  ASSERT_TRUE(m->forward(x, &y).ok());
  EXPECT_EQ(m->num_batches_tracked(), 42);
  m->eval();
  EXPECT_FALSE(m->is_training());
  const float rm = m->layer().running_mean()[0], rv = m->layer().running_var()[0];
  ASSERT_TRUE(m->forward(x, &y).ok());
  EXPECT_NEAR(y[0], (1 - rm) / std::sqrt(rv + 1e-5), 1e-5);
  EXPECT_EQ(m->num_batches_tracked(), 42);  // eval does not count
}

TEST(BatchNorm, ReprArchitectureAndBadInput) {
  std::unique_ptr<BatchNorm1d> m;
  ASSERT_TRUE(BatchNorm1d::create(bn_options(100), &m).ok());
  EXPECT_EQ(m->repr(),
            "BatchNorm1d(100, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)");
  EXPECT_EQ(m->architecture(),
            "{\"type\":\"BatchNorm1d\",\"num_features\":100,\"eps\":1e-05,\"momentum\":0.1,"
            "\"affine\":true,\"track_running_stats\":true}");
  Tensor x({60, 99}), y;
  EXPECT_TRUE(fails_with(m->forward(x, &y), {"BatchNorm1d(100", "C = 100", "[60, 99]"}));
  Tensor x4({2, 100, 3, 3});
  EXPECT_TRUE(fails_with(m->forward(x4, &y), {"[N, C] or [N, C, L]", "[2, 100, 3, 3]"}));
  Tensor one({1, 100});
  EXPECT_TRUE(fails_with(m->forward(one, &y), {"more than 1 value per channel"}));
  std::unique_ptr<BatchNorm2d> m2;
  ASSERT_TRUE(BatchNorm2d::create(bn_options(3), &m2).ok());
  Tensor x2({4, 3}), dy({4, 3});
  EXPECT_TRUE(fails_with(m2->forward(x2, &y), {"BatchNorm2d", "[N, C, H, W]", "[4, 3]"}));
  EXPECT_TRUE(fails_with(m2->backward(dy, nullptr), {"no forward"}));
  BatchNormOptions bad = bn_options(0);
  EXPECT_TRUE(fails_with(BatchNorm2d::create(bad, &m2), {"num_features", "0"}));
  bad = bn_options(3);
  bad.eps = -1;
  EXPECT_TRUE(fails_with(BatchNorm2d::create(bad, &m2), {"eps"}));
}

// The layer keeps the library's code: NaN in the input is NonFinite (with the user's 4-D index),
// not InvalidArgument, so a caller can tell bad data from a bad argument.
TEST(BatchNorm, KeepsTheLibrarysStatusCode) {
  BatchNormOptions o = bn_options(3);
  o.check_finite = true;
  std::unique_ptr<BatchNorm2d> m;
  ASSERT_TRUE(BatchNorm2d::create(o, &m).ok());
  Tensor x({2, 3, 2, 2}), y;
  for (int64_t k = 0; k < x.numel(); ++k) x.data()[k] = static_cast<float>(k % 5);
  x.data()[1 * 12 + 2 * 4 + 1 * 2 + 0] = std::numeric_limits<float>::quiet_NaN();
  Status s = m->forward(x, &y);
  EXPECT_EQ(s.code(), StatusCode::kNonFinite) << s.to_string();
  for (const char* part : {"BatchNorm2d(3", "x: nan at index [1, 2, 1, 0]", "(channel 2)"})
    EXPECT_NE(s.message().find(part), std::string::npos) << part << " not in " << s.message();
  m->train(false);
  s = m->forward(x, &y);
  EXPECT_EQ(s.code(), StatusCode::kNonFinite) << s.to_string();
  Tensor x1({2, 3, 2, 2}), dy({2, 3, 2, 2});
  for (int64_t k = 0; k < x1.numel(); ++k) x1.data()[k] = static_cast<float>(k % 7);
  m->train(true);
  ASSERT_TRUE(m->forward(x1, &y).ok());
  dy.data()[5] = std::numeric_limits<float>::infinity();
  s = m->backward(dy, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kNonFinite) << s.to_string();
}

TEST(BatchNorm, NoAffineNoTrackingState) {
  BatchNormOptions o = bn_options(3);
  o.affine = false;
  o.track_running_stats = false;
  o.momentum = std::nullopt;
  std::unique_ptr<BatchNorm2d> m;
  ASSERT_TRUE(BatchNorm2d::create(o, &m).ok());
  EXPECT_TRUE(m->state_dict().empty());
  EXPECT_EQ(m->repr(),
            "BatchNorm2d(3, eps=1e-05, momentum=None, affine=False, track_running_stats=False)");
  EXPECT_NE(m->architecture().find("\"momentum\":null"), std::string::npos);
  Rng rng(3);
  check_gradients(*m, random_tensor({2, 3, 2, 2}, rng, -2.0, 2.0), 0.01, 19);
}

}  // namespace
}  // namespace bnorm::nn
