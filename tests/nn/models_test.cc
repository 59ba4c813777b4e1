// Sequential and the presets: PyTorch's state_dict names and shapes, repr, architecture,
// gradients through a small network, determinism, and a short training run.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "bnorm/nn/layers.h"
#include "bnorm/nn/loss.h"
#include "bnorm/nn/models.h"
#include "bnorm/nn/optim.h"
#include "nn_test_util.h"

namespace bnorm::nn {
namespace {

using testing::check_gradients;
using testing::fails_with;
using testing::random_tensor;
using Shapes = std::vector<std::pair<std::string, std::vector<int64_t>>>;

Shapes names_and_shapes(Module& m) {
  Shapes out;
  for (const StateEntry& e : m.state_dict()) out.emplace_back(e.name, e.shape);
  return out;
}

// What torch.nn.Sequential(...).state_dict() gives for the same layers.
TEST(Presets, PaperMlpStateDictAsPyTorch) {
  Sequential plain = paper_mlp(false, 1);
  EXPECT_EQ(names_and_shapes(plain), (Shapes{{"0.weight", {100, 784}},
                                             {"0.bias", {100}},
                                             {"2.weight", {100, 100}},
                                             {"2.bias", {100}},
                                             {"4.weight", {100, 100}},
                                             {"4.bias", {100}},
                                             {"6.weight", {10, 100}},
                                             {"6.bias", {10}}}));
  Sequential bn = paper_mlp(true, 1);
  EXPECT_EQ(names_and_shapes(bn), (Shapes{{"0.weight", {100, 784}},
                                          {"0.bias", {100}},
                                          {"1.weight", {100}},
                                          {"1.bias", {100}},
                                          {"1.running_mean", {100}},
                                          {"1.running_var", {100}},
                                          {"1.num_batches_tracked", {}},
                                          {"3.weight", {100, 100}},
                                          {"3.bias", {100}},
                                          {"4.weight", {100}},
                                          {"4.bias", {100}},
                                          {"4.running_mean", {100}},
                                          {"4.running_var", {100}},
                                          {"4.num_batches_tracked", {}},
                                          {"6.weight", {100, 100}},
                                          {"6.bias", {100}},
                                          {"7.weight", {100}},
                                          {"7.bias", {100}},
                                          {"7.running_mean", {100}},
                                          {"7.running_var", {100}},
                                          {"7.num_batches_tracked", {}},
                                          {"9.weight", {10, 100}},
                                          {"9.bias", {10}}}));
  int params = 0;
  for (const StateEntry& e : bn.state_dict()) {
    const bool is_counter = e.name.ends_with("num_batches_tracked");
    EXPECT_EQ(e.dtype, is_counter ? DType::kI64 : DType::kF32) << e.name;
    const bool learnable = e.name.ends_with("weight") || e.name.ends_with(".bias");
    EXPECT_EQ(e.is_parameter, learnable) << e.name;
    EXPECT_EQ(e.grad != nullptr, learnable) << e.name;
    params += learnable;
  }
  EXPECT_EQ(params, 14);
  EXPECT_EQ(bn.parameters().size(), 14u);
}

TEST(Presets, CnnStateDictAsPyTorch) {
  Sequential plain = cnn(false, 1);
  EXPECT_EQ(names_and_shapes(plain), (Shapes{{"0.weight", {32, 1, 3, 3}},
                                             {"0.bias", {32}},
                                             {"3.weight", {64, 32, 3, 3}},
                                             {"3.bias", {64}},
                                             {"6.weight", {128, 64, 3, 3}},
                                             {"6.bias", {128}},
                                             {"9.weight", {256, 6272}},
                                             {"9.bias", {256}},
                                             {"11.weight", {10, 256}},
                                             {"11.bias", {10}}}));
  Sequential bn = cnn(true, 1);
  Shapes expected;
  auto block = [&](int conv, int64_t in, int64_t out) {
    const std::string c = std::to_string(conv), b = std::to_string(conv + 1);
    expected.push_back({c + ".weight", {out, in, 3, 3}});
    for (const char* n : {".weight", ".bias", ".running_mean", ".running_var"})
      expected.push_back({b + n, {out}});
    expected.push_back({b + ".num_batches_tracked", {}});
  };
  block(0, 1, 32);
  block(4, 32, 64);
  block(8, 64, 128);
  expected.push_back({"12.weight", {256, 6272}});  // no bias before BN
  for (const char* n : {".weight", ".bias", ".running_mean", ".running_var"})
    expected.push_back({std::string("13") + n, {256}});
  expected.push_back({"13.num_batches_tracked", {}});
  expected.push_back({"15.weight", {10, 256}});
  expected.push_back({"15.bias", {10}});
  EXPECT_EQ(names_and_shapes(bn), expected);
  EXPECT_EQ(bn.size(), 16u);
}

TEST(Presets, ReprAndArchitecture) {
  Sequential bn = paper_mlp(true, 1);
  const std::string repr = bn.repr();
  EXPECT_EQ(repr.substr(0, repr.find("(2)")),
            "Sequential(\n"
            "  (0): Linear(in_features=784, out_features=100, bias=True)\n"
            "  (1): BatchNorm1d(100, eps=1e-05, momentum=0.1, affine=True, "
            "track_running_stats=True)\n  ");
  EXPECT_NE(repr.find("  (2): Sigmoid()\n"), std::string::npos);
  EXPECT_TRUE(repr.ends_with("  (9): Linear(in_features=100, out_features=10, bias=True)\n)"));
  EXPECT_EQ(paper_mlp(false, 1).architecture(),
            "[{\"type\":\"Linear\",\"in\":784,\"out\":100,\"bias\":true},{\"type\":\"Sigmoid\"},"
            "{\"type\":\"Linear\",\"in\":100,\"out\":100,\"bias\":true},{\"type\":\"Sigmoid\"},"
            "{\"type\":\"Linear\",\"in\":100,\"out\":100,\"bias\":true},{\"type\":\"Sigmoid\"},"
            "{\"type\":\"Linear\",\"in\":100,\"out\":10,\"bias\":true}]");
  const std::string arch = cnn(true, 1).architecture();
  EXPECT_TRUE(arch.starts_with(
      "[{\"type\":\"Conv2d\",\"in\":1,\"out\":32,\"kernel\":3,\"stride\":1,\"padding\":1,"
      "\"bias\":false},{\"type\":\"BatchNorm2d\",\"num_features\":32,"));
  EXPECT_NE(arch.find("{\"type\":\"MaxPool2d\",\"kernel\":2,\"stride\":2},"), std::string::npos);
  EXPECT_NE(arch.find("{\"type\":\"Flatten\"},{\"type\":\"Linear\",\"in\":6272,\"out\":256,"
                      "\"bias\":false},{\"type\":\"BatchNorm1d\",\"num_features\":256,"),
            std::string::npos);
  EXPECT_TRUE(arch.ends_with("{\"type\":\"Linear\",\"in\":256,\"out\":10,\"bias\":true}]"));
  EXPECT_EQ(Sequential().repr(), "Sequential()");
}

TEST(Presets, DeterministicInSeedAndInit) {
  Sequential a = paper_mlp(true, 7), b = paper_mlp(true, 7), c = paper_mlp(true, 8);
  auto sa = a.state_dict(), sb = b.state_dict(), sc = c.state_dict();
  const float* wa = static_cast<float*>(sa[0].data);
  const float* wb = static_cast<float*>(sb[0].data);
  const float* wc = static_cast<float*>(sc[0].data);
  double sum = 0, sum_sq = 0;
  bool differs = false;
  for (int64_t i = 0; i < sa[0].numel(); ++i) {
    ASSERT_EQ(wa[i], wb[i]);
    differs |= wa[i] != wc[i];
    sum += wa[i];
    sum_sq += static_cast<double>(wa[i]) * wa[i];
  }
  EXPECT_TRUE(differs);
  const double n = static_cast<double>(sa[0].numel());
  // N(0, 0.1^2) over 78,400 draws: the mean within 5 standard errors, the std within 2 %.
  EXPECT_NEAR(sum / n, 0.0, 5 * kPaperMlpInitStd / std::sqrt(n));
  EXPECT_NEAR(std::sqrt(sum_sq / n), kPaperMlpInitStd, 0.02 * kPaperMlpInitStd);
  for (int64_t i = 0; i < sa[1].numel(); ++i) EXPECT_EQ(static_cast<float*>(sa[1].data)[i], 0.0f);
}

TEST(Sequential, GradientsThroughSmallNetwork) {
  Rng rng(21);
  Sequential seq;
  std::unique_ptr<Conv2d> conv;
  ASSERT_TRUE(Conv2d::create(2, 3, 3, 1, 1, false, rng, &conv).ok());
  ASSERT_TRUE(seq.add(std::move(conv)).ok());
  BatchNormOptions o;
  o.num_features = 3;
  std::unique_ptr<BatchNorm2d> bn;
  ASSERT_TRUE(BatchNorm2d::create(o, &bn).ok());
  ASSERT_TRUE(seq.add(std::move(bn)).ok());
  ASSERT_TRUE(seq.add(Sigmoid::create()).ok());
  ASSERT_TRUE(seq.add(Flatten::create()).ok());
  std::unique_ptr<Linear> lin;
  ASSERT_TRUE(Linear::create(3 * 4 * 4, 5, true, rng, &lin).ok());
  ASSERT_TRUE(seq.add(std::move(lin)).ok());
  check_gradients(seq, random_tensor({3, 2, 4, 4}, rng), 0.01, 22, 24);
  // output(i) is module i's output; the input of the sigmoid is output(1).
  Tensor x = random_tensor({3, 2, 4, 4}, rng), y;
  ASSERT_TRUE(seq.forward(x, &y).ok());
  EXPECT_EQ(seq.output(1).shape(), (std::vector<int64_t>{3, 3, 4, 4}));
  EXPECT_EQ(seq.output(4).shape(), (std::vector<int64_t>{3, 5}));
  for (int64_t i = 0; i < y.numel(); ++i) EXPECT_EQ(y[i], seq.output(4)[i]);
  // Modes propagate.
  seq.eval();
  EXPECT_FALSE(seq.at(1).is_training());
  seq.train();
  EXPECT_TRUE(seq.at(1).is_training());
}

TEST(Sequential, BadInputNamesTheModule) {
  Sequential net = paper_mlp(true, 1);
  Tensor x({60, 785}), y;
  EXPECT_TRUE(fails_with(net.forward(x, &y), {"0: Linear(in_features=784", "[60, 785]"}));
  Tensor dy({60, 10});
  EXPECT_TRUE(fails_with(net.backward(dy, nullptr), {"no successful forward"}));
  Tensor good({60, 784});
  ASSERT_TRUE(net.forward(good, &y).ok());
  Tensor bad_dy({60, 9});
  EXPECT_TRUE(fails_with(net.backward(bad_dy, nullptr), {"dy", "[60, 10]", "[60, 9]"}));
  Tensor one({1, 784});
  EXPECT_TRUE(fails_with(net.forward(one, &y), {"1: BatchNorm1d", "more than 1 value"}));
  EXPECT_TRUE(fails_with(net.add(nullptr), {"module 10", "null"}));
}

// A linearly separable problem: both presets' MLP must fit it quickly.
TEST(Presets, PaperMlpLearns) {
  for (bool batch_norm : {false, true}) {
    SCOPED_TRACE(batch_norm ? "with BN" : "without BN");
    Sequential net = paper_mlp(batch_norm, 3);
    Sgd sgd;
    SgdOptions o;
    o.lr = 0.5;
    o.momentum = 0.9;
    ASSERT_TRUE(Sgd::create(net.parameters(), o, &sgd).ok());
    Rng rng(4);
    Tensor x({60, 784}), y, dy;
    std::vector<int32_t> labels(60);
    // Class k lights up pixels [78k, 78k + 78).
    CrossEntropyResult first, last;
    for (int step = 0; step < 150; ++step) {
      x.zero();
      for (int i = 0; i < 60; ++i) {
        labels[i] = static_cast<int32_t>(rng.below(10));
        for (int p = 0; p < 784; ++p) x[i * 784 + p] = static_cast<float>(0.2 * rng.uniform());
        for (int p = 78 * labels[i]; p < 78 * labels[i] + 78; ++p) x[i * 784 + p] += 0.8f;
      }
      ASSERT_TRUE(net.forward(x, &y).ok());
      CrossEntropyResult r;
      ASSERT_TRUE(softmax_cross_entropy(y, labels, &r, &dy).ok());
      if (step == 0) first = r;
      last = r;
      sgd.zero_grad();
      ASSERT_TRUE(net.backward(dy, nullptr).ok());
      sgd.step();
    }
    EXPECT_GT(first.loss, 2.0);
    EXPECT_LT(last.loss, 0.3);
    EXPECT_GE(last.correct, 55);
  }
}

}  // namespace
// Sequential runs the cnn preset's BN + ReLU pairs fused (BatchNormNd::forward_relu): the
// output, every gradient and the running statistics are bitwise those of the unfused pairs, in
// training and eval, and the state_dict names are unchanged.
TEST(Models, CnnFusedBatchNormReluIsBitwiseTheUnfusedPairs) {
  Sequential fused = cnn(true, 5), plain = cnn(true, 5);
  plain.set_fuse_batch_norm_relu(false);
  EXPECT_TRUE(fused.fuse_batch_norm_relu());
  Rng rng(3);
  const Tensor x = random_tensor({3, 1, 28, 28}, rng);
  const Tensor dy = random_tensor({3, 10}, rng);
  for (bool training : {true, false}) {
    SCOPED_TRACE(training ? "train" : "eval");
    fused.train(training);
    plain.train(training);
    fused.zero_grad();
    plain.zero_grad();
    Tensor y1, y2, dx1, dx2;
    ASSERT_TRUE(fused.forward(x, &y1).ok());
    ASSERT_TRUE(plain.forward(x, &y2).ok());
    ASSERT_TRUE(fused.backward(dy, &dx1).ok());
    ASSERT_TRUE(plain.backward(dy, &dx2).ok());
    ASSERT_EQ(y1.numel(), y2.numel());
    EXPECT_EQ(0, std::memcmp(y1.data(), y2.data(), sizeof(float) * y1.numel()));
    EXPECT_EQ(0, std::memcmp(dx1.data(), dx2.data(), sizeof(float) * dx1.numel()));
    const auto s1 = fused.state_dict(), s2 = plain.state_dict();
    ASSERT_EQ(s1.size(), s2.size());
    for (size_t k = 0; k < s1.size(); ++k) {
      EXPECT_EQ(s1[k].name, s2[k].name);
      const size_t bytes = static_cast<size_t>(s1[k].numel()) *
                           (s1[k].dtype == DType::kI64 ? sizeof(int64_t) : sizeof(float));
      EXPECT_EQ(0, std::memcmp(s1[k].data, s2[k].data, bytes)) << s1[k].name;
      if (s1[k].grad != nullptr) {
        EXPECT_EQ(0, std::memcmp(s1[k].grad, s2[k].grad, bytes)) << s1[k].name << ".grad";
      }
    }
    // The fused batch norms have no output of their own; the others match.
    for (size_t i = 0; i < fused.size(); ++i)
      if (dynamic_cast<BatchNormNd*>(&fused.at(i)) != nullptr) {
        EXPECT_EQ(fused.output(i).numel(), 0) << i;
      } else {
        EXPECT_EQ(fused.output(i).shape(), plain.output(i).shape()) << i;
      }
  }
}

}  // namespace bnorm::nn
