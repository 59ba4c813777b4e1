// The stateful layer bnorm::BatchNorm: creation, defaults, modes, resets, state names, and the
// accumulating backward.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/comm.h"
#include "test_util.h"

namespace bnorm_test {
namespace {

using bnorm::BatchNorm;
using bnorm::BatchNormOptions;
using bnorm::ConstTensorView;
using bnorm::TensorView;

BatchNorm MakeLayer(BatchNormOptions o) {
  BatchNorm layer;
  const bnorm::Status st = BatchNorm::create(o, &layer);
  EXPECT_TRUE(IsOk(st));
  return layer;
}

BatchNormOptions Opts(int64_t c) {
  BatchNormOptions o;
  o.num_features = c;
  return o;
}

// ------------------------------------------------------------------------------------------
// Create.

TEST(LayerCreate, RejectsBadOptionsAndLeavesOutUnchanged) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  struct Case {
    BatchNormOptions o;
    std::string text;
  };
  std::vector<Case> cases;
  auto with = [](auto mutate) {
    BatchNormOptions o = Opts(3);
    mutate(o);
    return o;
  };
  cases.push_back({with([](auto& o) { o.num_features = 0; }), "num_features: must be > 0, got 0"});
  cases.push_back(
      {with([](auto& o) { o.num_features = -4; }), "num_features: must be > 0, got -4"});
  cases.push_back({with([](auto& o) { o.eps = 0; }), "eps: must be finite and > 0, got 0"});
  cases.push_back(
      {with([](auto& o) { o.eps = -1e-5; }), "eps: must be finite and > 0, got -1e-05"});
  cases.push_back({with([&](auto& o) { o.eps = nan; }), "eps: must be finite and > 0, got nan"});
  cases.push_back({with([&](auto& o) { o.eps = inf; }), "eps: must be finite and > 0, got inf"});
  cases.push_back({with([](auto& o) { o.momentum = -0.1; }),
                   "momentum: must be in [0, 1] or none (cumulative average), got -0.1"});
  cases.push_back({with([](auto& o) { o.momentum = 1.5; }),
                   "momentum: must be in [0, 1] or none (cumulative average), got 1.5"});
  cases.push_back({with([&](auto& o) { o.momentum = nan; }),
                   "momentum: must be in [0, 1] or none (cumulative average), got nan"});
  for (const Case& cs : cases) {
    SCOPED_TRACE(cs.text);
    BatchNorm layer = MakeLayer(Opts(2));
    layer.weight()[0] = 5;
    EXPECT_TRUE(IsInvalid(BatchNorm::create(cs.o, &layer), cs.text));
    EXPECT_EQ(layer.num_features(), 2);  // *out untouched
    EXPECT_EQ(layer.weight()[0], 5.0f);
  }
  EXPECT_TRUE(IsInvalid(BatchNorm::create(Opts(3), nullptr), "out: is null"));
}

// Create returns a Status for every failure; an allocation that cannot be made is one
// (kInternal "out of memory" or kInvalidArgument), not an exception escaping the API.
// 2^62 floats exceed std::vector's max_size, so nothing is actually allocated.
TEST(LayerCreateRobustness, HugeNumFeaturesIsAStatusNotAnException) {
  BatchNorm layer = MakeLayer(Opts(2));
  bnorm::Status st;
  EXPECT_NO_THROW(st = BatchNorm::create(Opts(int64_t{1} << 62), &layer));
  EXPECT_FALSE(st.ok());
  EXPECT_TRUE(st.code() == bnorm::StatusCode::kInternal ||
              st.code() == bnorm::StatusCode::kInvalidArgument)
      << st.to_string();
  EXPECT_EQ(layer.num_features(), 2);
}

TEST(LayerCreate, AcceptsBoundaryOptions) {
  for (std::optional<double> m :
       {std::optional<double>(0.0), std::optional<double>(1.0), std::optional<double>()}) {
    BatchNormOptions o = Opts(1);
    o.momentum = m;
    o.eps = 1e-30;
    BatchNorm layer;
    EXPECT_TRUE(IsOk(BatchNorm::create(o, &layer)));
  }
}

TEST(LayerCreate, DefaultsArePyTorchs) {
  const BatchNormOptions o;
  EXPECT_EQ(o.eps, 1e-5);
  ASSERT_TRUE(o.momentum.has_value());
  EXPECT_EQ(*o.momentum, 0.1);
  EXPECT_TRUE(o.affine);
  EXPECT_TRUE(o.track_running_stats);
  EXPECT_FALSE(o.check_finite);

  BatchNorm layer = MakeLayer(Opts(4));
  EXPECT_EQ(layer.num_features(), 4);
  EXPECT_TRUE(layer.is_training());
  EXPECT_EQ(layer.options().eps, 1e-5);
  EXPECT_EQ(layer.options().momentum, std::optional<double>(0.1));
  ASSERT_EQ(layer.weight().size(), 4u);
  ASSERT_EQ(layer.bias().size(), 4u);
  ASSERT_EQ(layer.running_mean().size(), 4u);
  ASSERT_EQ(layer.running_var().size(), 4u);
  ASSERT_EQ(layer.weight_grad().size(), 4u);
  ASSERT_EQ(layer.bias_grad().size(), 4u);
  for (int c = 0; c < 4; ++c) {
    EXPECT_EQ(layer.weight()[c], 1.0f);
    EXPECT_EQ(layer.bias()[c], 0.0f);
    EXPECT_EQ(layer.running_mean()[c], 0.0f);
    EXPECT_EQ(layer.running_var()[c], 1.0f);
    EXPECT_EQ(layer.weight_grad()[c], 0.0f);
    EXPECT_EQ(layer.bias_grad()[c], 0.0f);
  }
  EXPECT_EQ(layer.num_batches_tracked(), 0);

  BatchNormOptions bare = Opts(3);
  bare.affine = false;
  bare.track_running_stats = false;
  BatchNorm plain = MakeLayer(bare);
  EXPECT_TRUE(plain.weight().empty());
  EXPECT_TRUE(plain.bias().empty());
  EXPECT_TRUE(plain.weight_grad().empty());
  EXPECT_TRUE(plain.running_mean().empty());
  EXPECT_TRUE(plain.running_var().empty());
}

TEST(LayerCreate, DefaultConstructedLayerRefusesForward) {
  BatchNorm layer;
  std::vector<float> x(4, 1.0f), y(4);
  FillSentinel(y);
  const Snapshot snap = Snapshot().Add("y", y);
  EXPECT_TRUE(
      IsInvalid(layer.forward(ConstTensorView(x.data(), {2, 2}), TensorView(y.data(), {2, 2})),
                "BatchNorm: layer was not created with BatchNorm::create"));
  EXPECT_TRUE(snap.Unchanged());
}

// ------------------------------------------------------------------------------------------
// train() / eval().

TEST(LayerModes, TrainUpdatesRunningStatsEvalUsesThem) {
  BNORM_SEEDED_RNG(rng, 101);
  const std::vector<int64_t> dims = {4, 3, 2, 2};
  BatchNorm layer = MakeLayer(Opts(3));
  EXPECT_TRUE(layer.is_training());
  const Tensor x = RandomTensor(rng, dims, Layout::kChannelsLast, ChannelOffsets(3, 2.0), 1.5);
  Tensor y(dims, Layout::kChannelsLast);
  ASSERT_TRUE(IsOk(layer.forward(x.cview(), y.view())));
  EXPECT_EQ(layer.num_batches_tracked(), 1);
  const ChannelStats st = BatchStats(x);
  const double n = static_cast<double>(x.count());
  for (int c = 0; c < 3; ++c) {
    EXPECT_NEAR(layer.running_mean()[c], 0.1 * st.mean[c], 1e-6);
    EXPECT_NEAR(layer.running_var()[c], 0.9 + 0.1 * st.var[c] * n / (n - 1), 1e-6);
    EXPECT_NEAR(layer.saved_mean()[c], st.mean[c], 1e-5);
    EXPECT_NEAR(layer.saved_invstd()[c], 1 / std::sqrt(st.var[c] + 1e-5), 1e-5);
  }

  layer.eval();
  EXPECT_FALSE(layer.is_training());
  std::vector<float> rm(layer.running_mean().begin(), layer.running_mean().end());
  std::vector<float> rv(layer.running_var().begin(), layer.running_var().end());
  const Snapshot state =
      Snapshot().Add("running_mean", layer.running_mean()).Add("running_var", layer.running_var());
  const int64_t nbt = layer.num_batches_tracked();
  layer.weight()[1] = 2.0f;
  layer.bias()[2] = -0.5f;
  ASSERT_TRUE(IsOk(layer.forward(x.cview(), y.view())));
  EXPECT_TRUE(state.Unchanged());
  EXPECT_EQ(layer.num_batches_tracked(), nbt);
  for (int64_t i = 0; i < x.n(); ++i)
    for (int c = 0; c < 3; ++c)
      for (int64_t j = 0; j < x.s(); ++j) {
        const double want =
            layer.weight()[c] * (x.at(i, c, j) - rm[c]) / std::sqrt(rv[c] + 1e-5) + layer.bias()[c];
        EXPECT_NEAR(y.at(i, c, j), want, 2e-5);
      }

  layer.train();
  EXPECT_TRUE(layer.is_training());
  layer.train(false);
  EXPECT_FALSE(layer.is_training());
  layer.train(true);
  ASSERT_TRUE(IsOk(layer.forward(x.cview(), y.view())));
  EXPECT_EQ(layer.num_batches_tracked(), 2);
}

// PyTorch: with track_running_stats=False, eval mode still normalizes with batch statistics.
TEST(LayerModes, EvalWithoutTrackingUsesBatchStatistics) {
  BNORM_SEEDED_RNG(rng, 103);
  const std::vector<int64_t> dims = {3, 2, 5};
  BatchNormOptions o = Opts(2);
  o.track_running_stats = false;
  BatchNorm layer = MakeLayer(o);
  layer.weight()[0] = 1.5f;
  layer.bias()[1] = 0.25f;
  layer.eval();
  const Tensor x = RandomTensor(rng, dims, Layout::kChannelsFirst, ChannelOffsets(2, 3.0));
  Tensor y(dims, Layout::kChannelsFirst), y_train(dims, Layout::kChannelsFirst);
  ASSERT_TRUE(IsOk(layer.forward(x.cview(), y.view())));
  bnorm::ForwardTrainArgs a;
  a.x = x.cview();
  a.y = y_train.view();
  a.weight = layer.weight();
  a.bias = layer.bias();
  ASSERT_TRUE(IsOk(bnorm::forward_train(a)));
  EXPECT_TRUE(BitIdentical(y.data, y_train.data));
  const ChannelStats st = BatchStats(x);
  for (int c = 0; c < 2; ++c) EXPECT_NEAR(layer.saved_mean()[c], st.mean[c], 1e-5);
  // Batch statistics need more than one value per channel, in eval too (as PyTorch).
  const std::vector<float> one = {1, 2};
  std::vector<float> out(2);
  EXPECT_TRUE(
      IsInvalid(layer.forward(ConstTensorView(one.data(), {1, 2}), TensorView(out.data(), {1, 2})),
                "Expected more than 1 value per channel when training, got input size [1, 2]"));
}

// Eval mode with tracking accepts a single value per channel (no batch statistics needed).
TEST(LayerModes, EvalWithTrackingAcceptsBatchOfOne) {
  BatchNorm layer = MakeLayer(Opts(2));
  layer.eval();
  const std::vector<float> x = {3, -1};
  std::vector<float> y(2);
  ASSERT_TRUE(IsOk(layer.forward(ConstTensorView(x.data(), {1, 2}), TensorView(y.data(), {1, 2}))));
  EXPECT_NEAR(y[0], 3 / std::sqrt(1 + 1e-5), 1e-6);
  EXPECT_NEAR(y[1], -1 / std::sqrt(1 + 1e-5), 1e-6);
}

TEST(LayerModes, CumulativeMomentumNone) {
  BatchNormOptions o = Opts(1);
  o.momentum = std::nullopt;
  BatchNorm layer = MakeLayer(o);
  const double ms[4] = {1, 2, 6, -1};
  double sum = 0;
  for (int k = 0; k < 4; ++k) {
    const std::vector<float> x = {static_cast<float>(ms[k] - 1), static_cast<float>(ms[k] + 1)};
    std::vector<float> y(2);
    ASSERT_TRUE(
        IsOk(layer.forward(ConstTensorView(x.data(), {2, 1}), TensorView(y.data(), {2, 1}))));
    sum += ms[k];
    EXPECT_FLOAT_EQ(layer.running_mean()[0], static_cast<float>(sum / (k + 1)));
    EXPECT_FLOAT_EQ(layer.running_var()[0], 2.0f);  // every unbiased variance is 2
    EXPECT_EQ(layer.num_batches_tracked(), k + 1);
  }
}

TEST(LayerModes, FailedForwardChangesNoState) {
  BNORM_SEEDED_RNG(rng, 107);
  BatchNorm layer = MakeLayer(Opts(3));
  const Tensor good = RandomTensor(rng, {2, 3, 2}, Layout::kChannelsFirst);
  Tensor y(good.dims, Layout::kChannelsFirst);
  ASSERT_TRUE(IsOk(layer.forward(good.cview(), y.view())));
  const Tensor bad = RandomTensor(rng, {2, 4, 2}, Layout::kChannelsFirst);  // C = 4 != 3
  Tensor ybad(bad.dims, Layout::kChannelsFirst);
  FillSentinel(ybad.data);
  const int64_t nbt = layer.num_batches_tracked();
  const Snapshot snap = Snapshot()
                            .Add("running_mean", layer.running_mean())
                            .Add("running_var", layer.running_var())
                            .Add("weight", layer.weight())
                            .Add("bias", layer.bias())
                            .Add("saved_mean", layer.saved_mean())
                            .Add("saved_invstd", layer.saved_invstd())
                            .Add("y", ybad.data);
  const bnorm::Status st = layer.forward(bad.cview(), ybad.view());
  EXPECT_TRUE(IsInvalid(st, "C = 4")) << st.message();
  EXPECT_TRUE(snap.Unchanged());
  EXPECT_EQ(layer.num_batches_tracked(), nbt);
  // The earlier forward still backs a backward of its shape.
  Tensor dy = RandomTensor(rng, good.dims, Layout::kChannelsFirst),
         dx(good.dims, Layout::kChannelsFirst);
  EXPECT_TRUE(IsOk(layer.backward(dy.cview(), good.cview(), dx.view())));
}

// ------------------------------------------------------------------------------------------
// Resets and names.

TEST(LayerState, ResetParametersAndRunningStats) {
  BatchNorm layer = MakeLayer(Opts(2));
  auto scribble = [&] {
    layer.weight()[0] = 3;
    layer.bias()[1] = -2;
    layer.running_mean()[0] = 5;
    layer.running_var()[1] = 0.25f;
    layer.set_num_batches_tracked(9);
  };
  scribble();
  layer.reset_running_stats();
  EXPECT_EQ(layer.weight()[0], 3.0f);  // parameters kept
  EXPECT_EQ(layer.bias()[1], -2.0f);
  EXPECT_EQ(layer.running_mean()[0], 0.0f);
  EXPECT_EQ(layer.running_var()[1], 1.0f);
  EXPECT_EQ(layer.num_batches_tracked(), 0);

  scribble();
  layer.reset_parameters();
  EXPECT_EQ(layer.weight()[0], 1.0f);
  EXPECT_EQ(layer.bias()[1], 0.0f);
  EXPECT_EQ(layer.running_mean()[0], 0.0f);
  EXPECT_EQ(layer.running_var()[1], 1.0f);
  EXPECT_EQ(layer.num_batches_tracked(), 0);
}

TEST(LayerState, NamedTensorsNamesAndOrder) {
  struct Case {
    bool affine, track;
    std::vector<std::string> names;
  };
  for (const Case& cs :
       {Case{true, true, {"weight", "bias", "running_mean", "running_var"}},
        Case{true, false, {"weight", "bias"}}, Case{false, true, {"running_mean", "running_var"}},
        Case{false, false, {}}}) {
    SCOPED_TRACE(::testing::Message() << "affine " << cs.affine << " track " << cs.track);
    BatchNormOptions o = Opts(3);
    o.affine = cs.affine;
    o.track_running_stats = cs.track;
    BatchNorm layer = MakeLayer(o);
    auto named = layer.named_tensors();
    ASSERT_EQ(named.size(), cs.names.size());
    for (size_t k = 0; k < named.size(); ++k) {
      EXPECT_EQ(named[k].first, cs.names[k]);
      EXPECT_EQ(named[k].second.size(), 3u);
    }
    // The spans are the layer's own storage: writing through them is loading a state_dict.
    for (auto& [name, t] : named) {
      const std::span<float> own = name == "weight"         ? layer.weight()
                                   : name == "bias"         ? layer.bias()
                                   : name == "running_mean" ? layer.running_mean()
                                                            : layer.running_var();
      EXPECT_EQ(t.data(), own.data()) << name;
      t[2] = 42.0f;
      EXPECT_EQ(own[2], 42.0f) << name;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Backward.

TEST(LayerBackward, AccumulatesGradientsAndZeroGrad) {
  BNORM_SEEDED_RNG(rng, 109);
  const std::vector<int64_t> dims = {3, 2, 4};
  BatchNorm layer = MakeLayer(Opts(2));
  layer.weight()[0] = 0.5f;
  layer.weight()[1] = -1.5f;
  const Tensor x = RandomTensor(rng, dims, Layout::kChannelsLast, ChannelOffsets(2, 1.0));
  const Tensor dy1 = RandomTensor(rng, dims, Layout::kChannelsLast);
  const Tensor dy2 = RandomTensor(rng, dims, Layout::kChannelsLast);
  Tensor y(dims, Layout::kChannelsLast), dx(dims, Layout::kChannelsLast);
  ASSERT_TRUE(IsOk(layer.forward(x.cview(), y.view())));

  // What one backward gives, from the functional API on the layer's saved statistics.
  auto functional = [&](const Tensor& dy, std::vector<float>* dw, std::vector<float>* db,
                        Tensor* dxo) {
    dw->assign(2, 0.0f);
    db->assign(2, 0.0f);
    bnorm::BackwardArgs a;
    a.dy = dy.cview();
    a.x = x.cview();
    a.weight = layer.weight();
    a.save_mean = layer.saved_mean();
    a.save_invstd = layer.saved_invstd();
    a.dx = dxo->view();
    a.dweight = *dw;
    a.dbias = *db;
    ASSERT_TRUE(IsOk(bnorm::backward(a)));
  };
  std::vector<float> dw1, db1, dw2, db2;
  Tensor dx1(dims, Layout::kChannelsLast), dx2(dims, Layout::kChannelsLast);
  functional(dy1, &dw1, &db1, &dx1);
  functional(dy2, &dw2, &db2, &dx2);

  ASSERT_TRUE(IsOk(layer.backward(dy1.cview(), x.cview(), dx.view())));
  EXPECT_TRUE(BitIdentical(dx.data, dx1.data));
  EXPECT_TRUE(BitIdentical(layer.weight_grad(), dw1));
  EXPECT_TRUE(BitIdentical(layer.bias_grad(), db1));
  ASSERT_TRUE(IsOk(layer.backward(dy2.cview(), x.cview(), dx.view())));
  EXPECT_TRUE(BitIdentical(dx.data, dx2.data));
  for (int c = 0; c < 2; ++c) {
    EXPECT_EQ(layer.weight_grad()[c], dw1[c] + dw2[c]);
    EXPECT_EQ(layer.bias_grad()[c], db1[c] + db2[c]);
  }
  layer.zero_grad();
  for (int c = 0; c < 2; ++c) {
    EXPECT_EQ(layer.weight_grad()[c], 0.0f);
    EXPECT_EQ(layer.bias_grad()[c], 0.0f);
  }
  ASSERT_TRUE(IsOk(layer.backward(dy2.cview(), x.cview(), dx.view())));
  EXPECT_TRUE(BitIdentical(layer.weight_grad(), dw2));
  EXPECT_TRUE(BitIdentical(layer.bias_grad(), db2));
}

// Eval mode with tracking: statistics are constants, dx = dy * weight / sqrt(running_var + eps).
TEST(LayerBackward, EvalModeTreatsRunningStatsAsConstants) {
  BNORM_SEEDED_RNG(rng, 113);
  const std::vector<int64_t> dims = {2, 2, 3};
  BatchNorm layer = MakeLayer(Opts(2));
  layer.weight()[0] = 2;
  layer.weight()[1] = -0.5f;
  layer.running_mean()[0] = 0.5f;
  layer.running_var()[0] = 4;
  layer.running_var()[1] = 0.25f;
  layer.eval();
  const Tensor x = RandomTensor(rng, dims, Layout::kChannelsFirst);
  const Tensor dy = RandomTensor(rng, dims, Layout::kChannelsFirst);
  Tensor y(dims, Layout::kChannelsFirst), dx(dims, Layout::kChannelsFirst);
  ASSERT_TRUE(IsOk(layer.forward(x.cview(), y.view())));
  ASSERT_TRUE(IsOk(layer.backward(dy.cview(), x.cview(), dx.view())));
  for (int64_t i = 0; i < 2; ++i)
    for (int c = 0; c < 2; ++c)
      for (int64_t j = 0; j < 3; ++j) {
        const double a = layer.weight()[c] / std::sqrt(layer.running_var()[c] + 1e-5);
        EXPECT_NEAR(dx.at(i, c, j), dy.at(i, c, j) * a, 1e-6);
      }
  for (int c = 0; c < 2; ++c) {
    double db = 0, dw = 0;
    for (int64_t i = 0; i < 2; ++i)
      for (int64_t j = 0; j < 3; ++j) {
        db += dy.at(i, c, j);
        dw += dy.at(i, c, j) * (x.at(i, c, j) - layer.running_mean()[c]) /
              std::sqrt(layer.running_var()[c] + 1e-5);
      }
    EXPECT_NEAR(layer.bias_grad()[c], db, 1e-5);
    EXPECT_NEAR(layer.weight_grad()[c], dw, 1e-5);
  }
}

TEST(LayerBackward, WithoutAffineHasNoGradients) {
  BNORM_SEEDED_RNG(rng, 127);
  BatchNormOptions o = Opts(2);
  o.affine = false;
  BatchNorm layer = MakeLayer(o);
  const Tensor x = RandomTensor(rng, {4, 2}, Layout::kChannelsFirst);
  const Tensor dy = RandomTensor(rng, {4, 2}, Layout::kChannelsFirst);
  Tensor y({4, 2}, Layout::kChannelsFirst), dx({4, 2}, Layout::kChannelsFirst);
  ASSERT_TRUE(IsOk(layer.forward(x.cview(), y.view())));
  ASSERT_TRUE(IsOk(layer.backward(dy.cview(), x.cview(), dx.view())));
  EXPECT_TRUE(layer.weight_grad().empty());
  double sum = 0, sum_abs = 0;
  for (float v : dx.data) sum += v, sum_abs += std::fabs(v);
  EXPECT_GT(sum_abs, 0.0);
  EXPECT_NEAR(sum, 0.0, 1e-5 * sum_abs);  // gradients through the batch mean sum to zero
}

TEST(LayerBackward, BeforeForwardFails) {
  BatchNorm layer = MakeLayer(Opts(2));
  std::vector<float> x = {1, 2, 3, 4}, dy = {1, 1, 1, 1}, dx(4);
  FillSentinel(dx);
  const Snapshot snap = Snapshot()
                            .Add("dx", dx)
                            .Add("weight_grad", layer.weight_grad())
                            .Add("bias_grad", layer.bias_grad());
  EXPECT_TRUE(
      IsInvalid(layer.backward(ConstTensorView(dy.data(), {2, 2}),
                               ConstTensorView(x.data(), {2, 2}), TensorView(dx.data(), {2, 2})),
                "backward: no forward has run on this layer"));
  EXPECT_TRUE(snap.Unchanged());
}

TEST(LayerBackward, DifferentShapeOrLayoutFails) {
  BNORM_SEEDED_RNG(rng, 131);
  BatchNorm layer = MakeLayer(Opts(2));
  const Tensor x = RandomTensor(rng, {2, 2, 3}, Layout::kChannelsFirst);
  Tensor y(x.dims, Layout::kChannelsFirst);
  ASSERT_TRUE(IsOk(layer.forward(x.cview(), y.view())));
  layer.weight_grad()[0] = 0.125f;  // accumulated earlier
  struct Case {
    std::vector<int64_t> dims;
    Layout layout;
    std::string text;
  };
  for (const Case& cs :
       {Case{{2, 2, 4},
             Layout::kChannelsFirst,
             "x: size [2, 2, 4] (channels_first) differs from the last forward's input"},
        Case{{3, 2, 3},
             Layout::kChannelsFirst,
             "x: size [3, 2, 3] (channels_first) differs from the last forward's input"},
        Case{{2, 2, 3, 1},
             Layout::kChannelsFirst,
             "x: size [2, 2, 3, 1] (channels_first) differs from the last forward's input"},
        Case{{2, 2, 3},
             Layout::kChannelsLast,
             "x: size [2, 2, 3] (channels_last) differs from the last forward's input"}}) {
    SCOPED_TRACE(cs.text);
    const Tensor x2 = RandomTensor(rng, cs.dims, cs.layout),
                 dy = RandomTensor(rng, cs.dims, cs.layout);
    Tensor dx(cs.dims, cs.layout);
    FillSentinel(dx.data);
    const Snapshot snap = Snapshot()
                              .Add("dx", dx.data)
                              .Add("weight_grad", layer.weight_grad())
                              .Add("bias_grad", layer.bias_grad());
    EXPECT_TRUE(IsInvalid(layer.backward(dy.cview(), x2.cview(), dx.view()), cs.text));
    EXPECT_TRUE(snap.Unchanged());
  }
}

// check_finite travels from the layer options to the calls.
TEST(LayerOptions, CheckFiniteIsHonoured) {
  BatchNormOptions o = Opts(2);
  o.check_finite = true;
  BatchNorm layer = MakeLayer(o);
  std::vector<float> x = {1, 2, std::numeric_limits<float>::quiet_NaN(), 4}, y(4);
  FillSentinel(y);
  const int64_t nbt = layer.num_batches_tracked();
  const Snapshot snap = Snapshot()
                            .Add("y", y)
                            .Add("running_mean", layer.running_mean())
                            .Add("running_var", layer.running_var());
  EXPECT_TRUE(
      StatusIs(layer.forward(ConstTensorView(x.data(), {2, 2}), TensorView(y.data(), {2, 2})),
               bnorm::StatusCode::kNonFinite, "x: nan at index [1, 0] (channel 0)"));
  EXPECT_TRUE(snap.Unchanged());
  EXPECT_EQ(layer.num_batches_tracked(), nbt);
}

// The layer's fused forms are the functional ones on the layer's state: bitwise, training and
// eval, gradients accumulated; a synchronized layer refuses them with nothing written.
TEST(LayerFused, ForwardReluAndBackwardReluAreTheFunctionalPasses) {
  BNORM_SEEDED_RNG(rng, 91);
  const std::vector<int64_t> dims{4, 3, 5};
  const Tensor x = RandomTensor(rng, dims, Layout::kChannelsLast);
  const Tensor z = RandomTensor(rng, dims, Layout::kChannelsLast);
  const Tensor dy = RandomTensor(rng, dims, Layout::kChannelsLast);
  BatchNormOptions o;
  o.num_features = 3;
  BatchNorm layer;
  ASSERT_TRUE(IsOk(BatchNorm::create(o, &layer)));
  for (float& v : layer.weight()) v = 0.5f + static_cast<float>(Uniform(rng, 0, 1));
  for (bool training : {true, false}) {
    SCOPED_TRACE(training ? "train" : "eval");
    layer.train(training);
    const std::vector<float> rm(layer.running_mean().begin(), layer.running_mean().end());
    const std::vector<float> rv(layer.running_var().begin(), layer.running_var().end());
    Tensor y(dims, Layout::kChannelsLast), want(dims, Layout::kChannelsLast);
    ASSERT_TRUE(IsOk(layer.forward_relu(x.cview(), y.view(), z.cview())));
    std::vector<float> sm(3), si(3), rm2 = rm, rv2 = rv;
    if (training) {
      bnorm::ForwardTrainArgs a;
      a.x = x.cview();
      a.weight = layer.weight();
      a.bias = layer.bias();
      a.running_mean = rm2;
      a.running_var = rv2;
      a.y = want.view();
      a.save_mean = sm;
      a.save_invstd = si;
      ASSERT_TRUE(IsOk(bnorm::forward_train_relu(a, z.cview())));
      EXPECT_TRUE(BitIdentical(layer.running_mean(), rm2));
    } else {
      bnorm::ForwardEvalArgs a;
      a.x = x.cview();
      a.weight = layer.weight();
      a.bias = layer.bias();
      a.running_mean = rm;
      a.running_var = rv;
      a.y = want.view();
      ASSERT_TRUE(IsOk(bnorm::forward_eval_relu(a, z.cview())));
    }
    EXPECT_TRUE(BitIdentical(y.data, want.data));
    layer.zero_grad();
    Tensor dx(dims, Layout::kChannelsLast), dz(dims, Layout::kChannelsLast);
    Tensor dx2(dims, Layout::kChannelsLast), dz2(dims, Layout::kChannelsLast);
    ASSERT_TRUE(IsOk(layer.backward_relu(dy.cview(), x.cview(), y.cview(), dx.view(), dz.view())));
    ASSERT_TRUE(IsOk(layer.backward_relu(dy.cview(), x.cview(), y.cview(), dx2.view(), dz2.view())));
    bnorm::BackwardArgs b;
    b.dy = dy.cview();
    b.x = x.cview();
    b.weight = layer.weight();
    b.training = training;
    b.save_mean = layer.saved_mean();
    b.save_invstd = layer.saved_invstd();
    b.running_mean = rm;
    b.running_var = rv;
    Tensor dx3(dims, Layout::kChannelsLast), dz3(dims, Layout::kChannelsLast);
    std::vector<float> dw(3), db(3);
    b.dx = dx3.view();
    b.dweight = dw;
    b.dbias = db;
    ASSERT_TRUE(IsOk(bnorm::backward_relu(b, y.cview(), dz3.view())));
    EXPECT_TRUE(BitIdentical(dx.data, dx3.data));
    EXPECT_TRUE(BitIdentical(dz.data, dz3.data));
    for (int c = 0; c < 3; ++c) {  // accumulated twice
      EXPECT_EQ(layer.weight_grad()[c], dw[c] + dw[c]);
      EXPECT_EQ(layer.bias_grad()[c], db[c] + db[c]);
    }
  }
  // The plain backward after a fused forward still works (the fused state is per call).
  Tensor dx(dims, Layout::kChannelsLast);
  EXPECT_TRUE(IsOk(layer.backward(dy.cview(), x.cview(), dx.view())));
}

TEST(LayerFused, SynchronizedLayerRefusesTheFusedForms) {
  std::unique_ptr<bnorm::InProcessGroup> group;
  ASSERT_TRUE(IsOk(bnorm::InProcessGroup::create(1, &group)));
  BatchNormOptions o;
  o.num_features = 2;
  BatchNorm layer;
  ASSERT_TRUE(IsOk(BatchNorm::create(o, &layer)));
  layer.set_sync(&group->rank(0), bnorm::SyncMode::kReproducible);
  Tensor x({3, 2}, Layout::kChannelsFirst, 1.0f), y({3, 2}, Layout::kChannelsFirst);
  x.data[0] = 2.0f;
  FillSentinel(y.data);
  Snapshot s;
  s.Add("y", y.data).Add("running_mean", std::span<const float>(layer.running_mean()));
  EXPECT_TRUE(IsInvalid(layer.forward_relu(x.cview(), y.view()), "synchronized"));
  EXPECT_TRUE(s.Unchanged());
  EXPECT_EQ(layer.num_batches_tracked(), 0);
}

}  // namespace
}  // namespace bnorm_test
