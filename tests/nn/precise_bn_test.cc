// update_bn_stats (precise batch statistics): the running statistics equal the fp64 aggregation
// of the batch statistics computed directly from each layer's inputs, both aggregations; only
// the running statistics change; every error leaves the model unchanged; K in-process ranks give
// one process's result on the union of their batches (unsynchronized layers) or on the global
// batches (synchronized), identical on every rank.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bnorm/comm.h"
#include "bnorm/nn/layers.h"
#include "bnorm/nn/models.h"
#include "bnorm/nn/precise_bn.h"
#include "nn_test_util.h"

namespace bnorm::nn {
namespace {

using testing::fails_with;

// Batch k of a fixed sequence: rows of 784 values, a different offset per batch so that the
// batch means differ.
Tensor batch(int64_t k, int64_t rows, uint64_t seed = 1) {
  Rng rng(seed * 1000 + static_cast<uint64_t>(k));
  Tensor x({rows, 784});
  uniform_(x.span(), -1.0 + 0.3 * static_cast<double>(k), 1.0 + 0.3 * static_cast<double>(k), rng);
  return x;
}

std::vector<std::vector<unsigned char>> state_bytes(Sequential& m) {
  std::vector<std::vector<unsigned char>> out;
  for (const StateEntry& e : m.state_dict()) {
    const size_t n = static_cast<size_t>(e.numel()) * (e.dtype == DType::kF32 ? 4 : 8);
    const auto* p = static_cast<const unsigned char*>(e.data);
    out.emplace_back(p, p + n);
  }
  return out;
}

// The oracle: each layer's inputs of a training-mode forward (an identical model), their fp64
// mean and unbiased variance per channel, aggregated by the documented formulas.
struct Expected {
  std::vector<std::vector<double>> mean, var;  // [layer][channel]
};
Expected oracle(const std::vector<Tensor>& batches, PreciseBnAggregation how, uint64_t seed) {
  Sequential m = paper_mlp(true, seed);
  m.train(true);
  const size_t layers = 3, bn_index[3] = {1, 4, 7};
  std::vector<std::vector<double>> sum_m(layers, std::vector<double>(100)), sum_u = sum_m,
                                   s0 = sum_m, s1 = sum_m, s1sq = sum_m;
  std::vector<std::vector<std::vector<double>>> per(layers);  // per layer: batches' (n, m, u)
  Expected e;
  e.mean.assign(layers, std::vector<double>(100));
  e.var = e.mean;
  std::vector<std::vector<std::vector<double>>> ms(layers), us(layers), ns(layers);
  for (const Tensor& x : batches) {
    Tensor y;
    EXPECT_TRUE(m.forward(x, &y).ok());
    for (size_t l = 0; l < layers; ++l) {
      const Tensor& in = m.output(bn_index[l] - 1);
      const int64_t n = in.dim(0);
      std::vector<double> mean(100), var(100);
      for (int64_t c = 0; c < 100; ++c) {
        double s = 0;
        for (int64_t r = 0; r < n; ++r) s += in.data()[r * 100 + c];
        mean[c] = s / n;
        double q = 0;
        for (int64_t r = 0; r < n; ++r) {
          const double d = in.data()[r * 100 + c] - mean[c];
          q += d * d;
        }
        var[c] = q / (n - 1);
      }
      ms[l].push_back(mean);
      us[l].push_back(var);
      ns[l].push_back(std::vector<double>(100, static_cast<double>(n)));
    }
  }
  const double k = static_cast<double>(batches.size());
  for (size_t l = 0; l < layers; ++l)
    for (size_t c = 0; c < 100; ++c) {
      if (how == PreciseBnAggregation::kMeanOfBatches) {
        double a = 0, b = 0;
        for (size_t j = 0; j < batches.size(); ++j) a += ms[l][j][c], b += us[l][j][c];
        e.mean[l][c] = a / k;
        e.var[l][c] = b / k;
      } else {
        double n = 0, s = 0;
        for (size_t j = 0; j < batches.size(); ++j) n += ns[l][j][c], s += ns[l][j][c] * ms[l][j][c];
        const double mean = s / n;
        double q = 0;
        for (size_t j = 0; j < batches.size(); ++j) {
          const double d = ms[l][j][c] - mean;
          q += (ns[l][j][c] - 1) * us[l][j][c] + ns[l][j][c] * d * d;
        }
        e.mean[l][c] = mean;
        e.var[l][c] = q / (n - 1);
      }
    }
  return e;
}

void expect_running_stats(Sequential& m, const Expected& e, double tol) {
  const size_t bn_index[3] = {1, 4, 7};
  for (size_t l = 0; l < 3; ++l) {
    auto& layer = dynamic_cast<BatchNormNd&>(m.at(bn_index[l])).layer();
    for (size_t c = 0; c < 100; ++c) {
      EXPECT_NEAR(layer.running_mean()[c], e.mean[l][c], tol * (1 + std::abs(e.mean[l][c])))
          << "layer " << l << " channel " << c;
      EXPECT_NEAR(layer.running_var()[c], e.var[l][c], tol * e.var[l][c])
          << "layer " << l << " channel " << c;
    }
  }
}

TEST(PreciseBn, BothAggregationsMatchTheFp64OracleAndOnlyRunningStatsChange) {
  const std::vector<Tensor> batches = {batch(0, 16), batch(1, 24), batch(2, 9)};
  for (auto how : {PreciseBnAggregation::kMeanOfBatches, PreciseBnAggregation::kPopulation}) {
    Sequential m = paper_mlp(true, 5);
    m.eval();
    const auto before = state_bytes(m);
    PreciseBnOptions o;
    o.batches = 3;
    o.aggregation = how;
    PreciseBnReport report;
    ASSERT_TRUE(update_bn_stats(m, [&](int64_t k, Tensor* x) {
                  *x = batches[static_cast<size_t>(k)];
                  return Status();
                }, o, &report).ok());
    EXPECT_EQ(report.layers, 3);
    EXPECT_EQ(report.samples, 16 + 24 + 9);
    // fp32 batch statistics (the kernels' exact-to-rounding ones), aggregated in fp64.
    expect_running_stats(m, oracle(batches, how, 5), 2e-6);
    // Everything else as before: mode, momentum, counters, parameters.
    EXPECT_FALSE(m.is_training());
    const auto after = state_bytes(m);
    const auto entries = m.state_dict();
    for (size_t i = 0; i < entries.size(); ++i) {
      const bool running = entries[i].name.find("running_") != std::string::npos;
      EXPECT_EQ(before[i] == after[i], !running) << entries[i].name;
    }
    for (size_t i : {1, 4, 7}) {
      auto& bn = dynamic_cast<BatchNormNd&>(m.at(i));
      EXPECT_FALSE(bn.is_training());
      EXPECT_EQ(bn.layer().options().momentum, std::optional<double>(0.1));
      EXPECT_EQ(bn.num_batches_tracked(), 0);
    }
  }
}

// Ghost batches are turned off for the K forwards (the whole batch's statistics) and restored;
// a layer with frozen running statistics keeps them.
TEST(PreciseBn, GhostOffDuringTheForwardsFrozenLayersKept) {
  const std::vector<Tensor> batches = {batch(0, 16), batch(1, 16)};
  Sequential m = paper_mlp(true, 5);
  auto& bn1 = dynamic_cast<BatchNormNd&>(m.at(1)).layer();
  auto& bn7 = dynamic_cast<BatchNormNd&>(m.at(7)).layer();
  ASSERT_TRUE(bn1.set_ghost_batch(4).ok());
  ASSERT_TRUE(bn7.set_freeze(false, true, false).ok());
  const std::vector<float> frozen_var(bn7.running_var().begin(), bn7.running_var().end());
  PreciseBnOptions o;
  o.batches = 2;
  PreciseBnReport report;
  ASSERT_TRUE(update_bn_stats(m, [&](int64_t k, Tensor* x) {
                *x = batches[static_cast<size_t>(k)];
                return Status();
              }, o, &report).ok());
  EXPECT_EQ(report.layers, 2);
  EXPECT_EQ(bn1.options().ghost_batch, 4);
  EXPECT_TRUE(bn7.options().freeze_running_stats);
  EXPECT_EQ(std::vector<float>(bn7.running_var().begin(), bn7.running_var().end()), frozen_var);
  // Layers 1 and 4 as the plain model's (the oracle has no ghost batches and no frozen layer; a
  // frozen layer 7 normalizes with batch statistics like the oracle's, so the inputs agree).
  const Expected want = oracle(batches, PreciseBnAggregation::kMeanOfBatches, 5);
  const size_t idx[2] = {1, 4};
  for (size_t l = 0; l < 2; ++l) {
    auto& layer = dynamic_cast<BatchNormNd&>(m.at(idx[l])).layer();
    for (size_t c = 0; c < 100; ++c)
      EXPECT_NEAR(layer.running_var()[c], want.var[l][c], 2e-6 * want.var[l][c]) << l << " " << c;
  }
  Sequential all_frozen = paper_mlp(true, 5);
  for (size_t i : {1, 4, 7})
    ASSERT_TRUE(dynamic_cast<BatchNormNd&>(all_frozen.at(i)).layer().set_freeze(false, true, false).ok());
  EXPECT_TRUE(fails_with(update_bn_stats(all_frozen, [&](int64_t k, Tensor* x) {
                           *x = batches[static_cast<size_t>(k)];
                           return Status();
                         }, o),
                         {"every batch-norm layer has frozen running statistics"}));
}

TEST(PreciseBn, TheTwoAggregationsDifferWhenBatchMeansMove) {
  // Batches with shifted inputs: the population variance includes the spread of the batch means,
  // the mean of batch variances does not.
  const std::vector<Tensor> batches = {batch(0, 16), batch(5, 16)};
  const Expected a = oracle(batches, PreciseBnAggregation::kMeanOfBatches, 2);
  const Expected b = oracle(batches, PreciseBnAggregation::kPopulation, 2);
  int larger = 0;
  for (size_t c = 0; c < 100; ++c) larger += b.var[0][c] > a.var[0][c];
  EXPECT_GT(larger, 90);
}

TEST(PreciseBn, ErrorsLeaveTheModelUnchanged) {
  Sequential m = paper_mlp(true, 3);
  m.train(true);
  const auto before = state_bytes(m);
  auto good = [](int64_t k, Tensor* x) {
    *x = batch(k, 8);
    return Status();
  };
  PreciseBnOptions o;
  o.batches = 0;
  EXPECT_TRUE(fails_with(update_bn_stats(m, good, o), {"batches: must be >= 1, got 0"}));
  o.batches = 3;
  o.aggregation = static_cast<PreciseBnAggregation>(7);
  EXPECT_TRUE(fails_with(update_bn_stats(m, good, o), {"aggregation: unknown value 7"}));
  o.aggregation = PreciseBnAggregation::kPopulation;
  EXPECT_TRUE(fails_with(update_bn_stats(m, nullptr, o), {"next_batch: is empty"}));
  // A failing batch source and a batch of the wrong shape, after batches that ran.
  EXPECT_TRUE(fails_with(update_bn_stats(m, [](int64_t k, Tensor* x) {
                           if (k == 2) return Status::invalid_argument("no more data");
                           *x = batch(k, 8);
                           return Status();
                         }, o),
                         {"update_bn_stats: batch 2: no more data"}));
  EXPECT_TRUE(fails_with(update_bn_stats(m, [](int64_t k, Tensor* x) {
                           *x = k == 1 ? Tensor({8, 785}) : batch(k, 8);
                           return Status();
                         }, o),
                         {"update_bn_stats: batch 1: 0: Linear(", "got [8, 785]"}));
  EXPECT_EQ(state_bytes(m), before);
  EXPECT_TRUE(m.is_training());
  EXPECT_EQ(dynamic_cast<BatchNormNd&>(m.at(1)).layer().options().momentum,
            std::optional<double>(0.1));

  Sequential plain = paper_mlp(false, 3);
  EXPECT_TRUE(fails_with(update_bn_stats(plain, good, o), {"the model has no batch-norm layer"}));
  BatchNormOptions bo;
  bo.num_features = 784;
  bo.track_running_stats = false;
  std::unique_ptr<BatchNorm1d> bn;
  ASSERT_TRUE(BatchNorm1d::create(bo, &bn).ok());
  Sequential untracked;
  ASSERT_TRUE(untracked.add(std::move(bn)).ok());
  EXPECT_TRUE(fails_with(update_bn_stats(untracked, good, o),
                         {"module 0 (BatchNorm1d): keeps no running statistics"}));
}

// K in-process ranks, each with its own batches (unsynchronized layers): one process on all
// ranks' batches, each a batch of its own. Synchronized layers: rank r holds a slice of each
// global batch, and the result is one process's on the global batches.
TEST(PreciseBn, InProcessRanksPoolTheirBatches) {
  const int ranks = 2;
  const int64_t k = 2;
  for (bool sync : {false, true}) {
    for (auto how : {PreciseBnAggregation::kMeanOfBatches, PreciseBnAggregation::kPopulation}) {
      std::vector<Tensor> reference_batches;
      if (sync) {
        for (int64_t j = 0; j < k; ++j) reference_batches.push_back(batch(j, 12 * ranks, 9));
      } else {
        for (int r = 0; r < ranks; ++r)
          for (int64_t j = 0; j < k; ++j) reference_batches.push_back(batch(r * k + j, 12, 9));
      }
      const Expected want = oracle(reference_batches, how, 4);
      std::unique_ptr<InProcessGroup> group;
      ASSERT_TRUE(InProcessGroup::create(ranks, &group).ok());
      std::vector<Sequential> models;
      for (int r = 0; r < ranks; ++r) models.push_back(paper_mlp(true, 4));
      std::vector<PreciseBnReport> reports(ranks);
      const Status st = group->run([&](Communicator& comm) -> Status {
        const int r = comm.rank();
        Sequential& m = models[static_cast<size_t>(r)];
        if (sync) m.set_sync(&comm, SyncMode::kReproducible);
        PreciseBnOptions o;
        o.batches = k;
        o.aggregation = how;
        o.comm = &comm;
        return update_bn_stats(m, [&](int64_t j, Tensor* x) {
          if (!sync) {
            *x = batch(r * k + j, 12, 9);
          } else {  // rows [12 r, 12 (r + 1)) of global batch j
            const Tensor& g = reference_batches[static_cast<size_t>(j)];
            *x = Tensor({12, 784});
            std::memcpy(x->data(), g.data() + 12 * r * 784, 12 * 784 * sizeof(float));
          }
          return Status();
        }, o, &reports[static_cast<size_t>(r)]);
      });
      ASSERT_TRUE(st.ok()) << st.to_string();
      for (int r = 0; r < ranks; ++r) {
        EXPECT_EQ(reports[static_cast<size_t>(r)].samples, 12 * ranks * k);
        expect_running_stats(models[static_cast<size_t>(r)], want, 2e-6);
      }
      // Every rank has the same statistics, bit for bit.
      const auto a = state_bytes(models[0]), b = state_bytes(models[1]);
      EXPECT_EQ(a, b) << "sync " << sync;
    }
  }
}

}  // namespace
}  // namespace bnorm::nn
