// fold_batch_norm: the folded model equals the original in eval mode (paper MLP, cnn, nested),
// its weights are the fp64 formula rounded once, its architecture is the preset's without batch
// norm, and every unfoldable case is refused with the model and the output untouched.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "bnorm/nn/fold.h"
#include "bnorm/nn/layers.h"
#include "bnorm/nn/models.h"
#include "nn_test_util.h"

namespace bnorm::nn {
namespace {

using testing::fails_with;
using testing::random_tensor;

// Gives every batch-norm layer of `model` non-trivial parameters and running statistics.
void randomize_batch_norms(Sequential& model, Rng& rng) {
  for (size_t i = 0; i < model.size(); ++i) {
    if (auto* seq = dynamic_cast<Sequential*>(&model.at(i))) randomize_batch_norms(*seq, rng);
    auto* bn = dynamic_cast<BatchNormNd*>(&model.at(i));
    if (bn == nullptr) continue;
    bnorm::BatchNorm& l = bn->layer();
    uniform_(l.running_mean(), -2.0, 2.0, rng);
    uniform_(l.running_var(), 0.05, 4.0, rng);
    if (!l.weight().empty()) uniform_(l.weight(), -1.5, 1.5, rng);
    if (!l.bias().empty()) uniform_(l.bias(), -1.0, 1.0, rng);
  }
}


// Largest |a - b| relative to the largest |a|.
double max_relative_difference(const Tensor& a, const Tensor& b) {
  double diff = 0, scale = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(a.data()[i]) - b.data()[i]));
    scale = std::max(scale, std::abs(static_cast<double>(a.data()[i])));
  }
  return diff / scale;
}

TEST(Fold, PaperMlpEqualsTheOriginalInEvalModeWithThePlainArchitecture) {
  Rng rng(7);
  Sequential model = paper_mlp(true, 3);
  randomize_batch_norms(model, rng);
  model.eval();
  Sequential folded;
  FoldReport report;
  ASSERT_TRUE(fold_batch_norm(model, &folded, &report).ok());
  EXPECT_EQ(folded.architecture(), paper_mlp(false, 3).architecture());
  EXPECT_FALSE(folded.is_training());
  ASSERT_EQ(report.folded.size(), 3u);
  EXPECT_EQ(report.folded[0].batch_norm_index, 1u);
  EXPECT_EQ(report.folded[0].into_index, 0u);
  EXPECT_EQ(report.folded[2].batch_norm_index, 7u);
  EXPECT_EQ(report.folded[1].into, "Linear");
  EXPECT_FALSE(report.folded[0].added_bias);  // the paper MLP's Linear keeps its bias

  const Tensor x = random_tensor({16, 784}, rng);
  Tensor y, y_folded;
  ASSERT_TRUE(model.forward(x, &y).ok());
  ASSERT_TRUE(folded.forward(x, &y_folded).ok());
  // fp32 rounding of the folded weights and of the two orders of evaluation, through 4 layers.
  EXPECT_LT(max_relative_difference(y, y_folded), 1e-5);
}

TEST(Fold, CnnEqualsTheOriginalInEvalModeWithThePlainArchitecture) {
  Rng rng(11);
  Sequential model = cnn(true, 5);
  randomize_batch_norms(model, rng);
  model.eval();
  Sequential folded;
  FoldReport report;
  ASSERT_TRUE(fold_batch_norm(model, &folded, &report).ok());
  EXPECT_EQ(folded.architecture(), cnn(false, 5).architecture());
  ASSERT_EQ(report.folded.size(), 4u);
  EXPECT_EQ(report.folded[0].into, "Conv2d");
  EXPECT_TRUE(report.folded[0].added_bias);  // the cnn's convolutions have no bias before BN
  EXPECT_EQ(report.folded[3].into, "Linear");
  // Its state_dict has the plain preset's names and shapes.
  std::vector<std::string> names, plain_names;
  for (const StateEntry& e : folded.state_dict()) names.push_back(e.name);
  Sequential plain = cnn(false, 5);
  for (const StateEntry& e : plain.state_dict()) plain_names.push_back(e.name);
  EXPECT_EQ(names, plain_names);

  const Tensor x = random_tensor({3, 1, 28, 28}, rng);
  Tensor y, y_folded;
  ASSERT_TRUE(model.forward(x, &y).ok());
  ASSERT_TRUE(folded.forward(x, &y_folded).ok());
  EXPECT_LT(max_relative_difference(y, y_folded), 1e-5);
}

// The folded weights are the fp64 formula rounded once to fp32.
TEST(Fold, WeightsAreTheFp64FormulaRoundedOnce) {
  Rng rng(1);
  std::unique_ptr<Conv2d> conv;
  ASSERT_TRUE(Conv2d::create(2, 3, 3, 1, 1, /*bias=*/false, rng, &conv).ok());
  const std::vector<float> w = {conv->weight().begin(), conv->weight().end()};
  BatchNormOptions o;
  o.num_features = 3;
  o.eps = 1e-3;
  std::unique_ptr<BatchNorm2d> bn;
  ASSERT_TRUE(BatchNorm2d::create(o, &bn).ok());
  const float mean[3] = {0.5f, -1.25f, 3.0f}, var[3] = {0.1f, 2.0f, 7.5f};
  const float gamma[3] = {1.5f, -0.75f, 0.3f}, beta[3] = {0.2f, 0.0f, -4.0f};
  for (int c = 0; c < 3; ++c) {
    bn->layer().running_mean()[c] = mean[c];
    bn->layer().running_var()[c] = var[c];
    bn->layer().weight()[c] = gamma[c];
    bn->layer().bias()[c] = beta[c];
  }
  Sequential model;
  ASSERT_TRUE(model.add(std::move(conv)).ok());
  ASSERT_TRUE(model.add(std::move(bn)).ok());
  Sequential folded;
  ASSERT_TRUE(fold_batch_norm(model, &folded).ok());
  ASSERT_EQ(folded.size(), 1u);
  auto* out = dynamic_cast<Conv2d*>(&folded.at(0));
  ASSERT_NE(out, nullptr);
  ASSERT_TRUE(out->has_bias());
  for (int c = 0; c < 3; ++c) {
    const double a = static_cast<double>(gamma[c]) / std::sqrt(static_cast<double>(var[c]) + 1e-3);
    for (int j = 0; j < 18; ++j)
      EXPECT_EQ(out->weight()[c * 18 + j], static_cast<float>(a * w[c * 18 + j])) << c << " " << j;
    EXPECT_EQ(out->bias()[c], static_cast<float>(beta[c] - mean[c] * a)) << c;
  }
}

TEST(Fold, WithoutAffineAndNestedSequential) {
  Rng rng(2);
  std::unique_ptr<Linear> lin;
  ASSERT_TRUE(Linear::create(5, 4, true, rng, &lin).ok());
  BatchNormOptions o;
  o.num_features = 4;
  o.affine = false;
  std::unique_ptr<BatchNorm1d> bn;
  ASSERT_TRUE(BatchNorm1d::create(o, &bn).ok());
  auto inner = std::make_unique<Sequential>();
  ASSERT_TRUE(inner->add(std::move(lin)).ok());
  ASSERT_TRUE(inner->add(std::move(bn)).ok());
  ASSERT_TRUE(inner->add(Sigmoid::create()).ok());
  Sequential model;
  ASSERT_TRUE(model.add(std::move(inner)).ok());
  ASSERT_TRUE(model.add(ReLU::create()).ok());
  randomize_batch_norms(model, rng);
  model.eval();
  Sequential folded;
  FoldReport report;
  ASSERT_TRUE(fold_batch_norm(model, &folded, &report).ok());
  ASSERT_EQ(report.folded.size(), 1u);
  EXPECT_EQ(folded.architecture(),
            "[[{\"type\":\"Linear\",\"in\":5,\"out\":4,\"bias\":true},{\"type\":\"Sigmoid\"}],"
            "{\"type\":\"ReLU\"}]");
  const Tensor x = random_tensor({6, 5}, rng);
  Tensor y, y_folded;
  ASSERT_TRUE(model.forward(x, &y).ok());
  ASSERT_TRUE(folded.forward(x, &y_folded).ok());
  EXPECT_LT(max_relative_difference(y, y_folded), 1e-6);
}

TEST(Fold, NoBatchNormIsACopy) {
  Sequential model = paper_mlp(false, 4);
  Sequential folded;
  FoldReport report;
  ASSERT_TRUE(fold_batch_norm(model, &folded, &report).ok());
  EXPECT_TRUE(report.folded.empty());
  EXPECT_EQ(folded.architecture(), model.architecture());
  auto a = model.state_dict(), b = folded.state_dict();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const auto* pa = static_cast<const float*>(a[i].data);
    const auto* pb = static_cast<const float*>(b[i].data);
    EXPECT_EQ(std::vector<float>(pa, pa + a[i].numel()), std::vector<float>(pb, pb + b[i].numel()));
  }
}

// Each refusal leaves the model and *out as they were.
void expect_refused(Sequential& model, std::initializer_list<const char*> pieces) {
  const std::string before = model.architecture();
  std::vector<std::vector<float>> state;
  for (const StateEntry& e : model.state_dict())
    if (e.dtype == DType::kF32) {
      const auto* p = static_cast<const float*>(e.data);
      state.emplace_back(p, p + e.numel());
    }
  Sequential out = paper_mlp(false, 9);
  const std::string out_before = out.architecture();
  const float out_w0 = static_cast<const float*>(out.state_dict()[0].data)[0];
  EXPECT_TRUE(fails_with(fold_batch_norm(model, &out), pieces));
  EXPECT_EQ(model.architecture(), before);
  size_t k = 0;
  for (const StateEntry& e : model.state_dict())
    if (e.dtype == DType::kF32) {
      const auto* p = static_cast<const float*>(e.data);
      const std::vector<float> now(p, p + e.numel());
      // memcmp-like: NaN planted by a test compares by bits
      EXPECT_EQ(0, std::memcmp(now.data(), state[k].data(), now.size() * sizeof(float))) << e.name;
      ++k;
    }
  EXPECT_EQ(out.architecture(), out_before);
  EXPECT_EQ(static_cast<const float*>(out.state_dict()[0].data)[0], out_w0);
}

std::unique_ptr<BatchNorm1d> bn1d(int64_t c, bool track = true) {
  BatchNormOptions o;
  o.num_features = c;
  o.track_running_stats = track;
  std::unique_ptr<BatchNorm1d> bn;
  EXPECT_TRUE(BatchNorm1d::create(o, &bn).ok());
  return bn;
}

std::unique_ptr<Linear> linear(int64_t in, int64_t out) {
  Rng rng(3);
  std::unique_ptr<Linear> lin;
  EXPECT_TRUE(Linear::create(in, out, true, rng, &lin).ok());
  return lin;
}

TEST(Fold, RefusesWhatCannotBeFolded) {
  {
    Sequential m;  // batch norm first
    ASSERT_TRUE(m.add(bn1d(4)).ok());
    ASSERT_TRUE(m.add(linear(4, 2)).ok());
    expect_refused(m, {"module 0 (BatchNorm1d): is the first module"});
  }
  {
    Sequential m;  // a nonlinearity in between
    ASSERT_TRUE(m.add(linear(4, 3)).ok());
    ASSERT_TRUE(m.add(ReLU::create()).ok());
    ASSERT_TRUE(m.add(bn1d(3)).ok());
    expect_refused(m, {"module 2 (BatchNorm1d): follows ReLU (module 1), not a Linear or Conv2d"});
  }
  {
    Sequential m;  // pooling in between, inside a nested Sequential
    Rng rng(4);
    std::unique_ptr<Conv2d> conv;
    ASSERT_TRUE(Conv2d::create(1, 2, 3, 1, 1, false, rng, &conv).ok());
    std::unique_ptr<MaxPool2d> pool;
    ASSERT_TRUE(MaxPool2d::create(2, 0, &pool).ok());
    BatchNormOptions o;
    o.num_features = 2;
    std::unique_ptr<BatchNorm2d> bn;
    ASSERT_TRUE(BatchNorm2d::create(o, &bn).ok());
    auto inner = std::make_unique<Sequential>();
    ASSERT_TRUE(inner->add(std::move(conv)).ok());
    ASSERT_TRUE(inner->add(std::move(pool)).ok());
    ASSERT_TRUE(inner->add(std::move(bn)).ok());
    ASSERT_TRUE(m.add(ReLU::create()).ok());
    ASSERT_TRUE(m.add(std::move(inner)).ok());
    expect_refused(m, {"module 1.2 (BatchNorm2d): follows MaxPool2d (module 1.1)"});
  }
  {
    Sequential m;  // a BatchNorm1d after a Conv2d
    Rng rng(5);
    std::unique_ptr<Conv2d> conv;
    ASSERT_TRUE(Conv2d::create(1, 2, 3, 1, 1, false, rng, &conv).ok());
    ASSERT_TRUE(m.add(std::move(conv)).ok());
    ASSERT_TRUE(m.add(bn1d(2)).ok());
    expect_refused(m, {"module 1 (BatchNorm1d): follows a Conv2d"});
  }
  {
    Sequential m;  // channel counts differ
    ASSERT_TRUE(m.add(linear(4, 3)).ok());
    ASSERT_TRUE(m.add(bn1d(5)).ok());
    expect_refused(m, {"module 1 (BatchNorm1d): 5 features after a Linear with 3 outputs"});
  }
  {
    Sequential m;  // no running statistics
    ASSERT_TRUE(m.add(linear(4, 3)).ok());
    ASSERT_TRUE(m.add(bn1d(3, /*track=*/false)).ok());
    expect_refused(m, {"module 1 (BatchNorm1d): keeps no running statistics"});
  }
  {
    Sequential m;  // running_var + eps <= 0, and a NaN mean
    ASSERT_TRUE(m.add(linear(4, 3)).ok());
    ASSERT_TRUE(m.add(bn1d(3)).ok());
    auto* bn = dynamic_cast<BatchNorm1d*>(&m.at(1));
    bn->layer().running_var()[2] = -1.0f;
    expect_refused(m, {"module 1 (BatchNorm1d): channel 2 cannot be folded", "running_var -1"});
    bn->layer().running_var()[2] = 1.0f;
    bn->layer().running_mean()[0] = std::numeric_limits<float>::quiet_NaN();
    expect_refused(m, {"channel 0 cannot be folded (running_mean nan"});
  }
  Sequential m = paper_mlp(true, 1);
  EXPECT_TRUE(fails_with(fold_batch_norm(m, nullptr), {"out: is null"}));
  EXPECT_TRUE(fails_with(fold_batch_norm(m, &m), {"out: must not be model"}));
}

}  // namespace
}  // namespace bnorm::nn
