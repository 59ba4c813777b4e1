// Data-parallel training in process: nn::DataParallel and nn::train_loop over the in-process
// communicator (K ranks as threads), against one process on the whole global batch. K = 1, 2, 3
// ranks of the paper MLP with synchronized batch norm follow one process (what is bitwise and
// what is within rounding, below); the replicas stay bit for bit identical; the sharding covers
// every sample once; agreement, the replica check, create()'s layout check and the distributed
// evaluation fail on every rank when one rank is at fault.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "bnorm/comm.h"
#include "bnorm/nn/data_parallel.h"
#include "bnorm/nn/init.h"
#include "bnorm/nn/layers.h"
#include "bnorm/nn/models.h"
#include "bnorm/nn/optim.h"
#include "bnorm/nn/train_loop.h"

namespace bnorm::nn {
namespace {

constexpr int64_t kFeatures = 784;
constexpr int kClasses = 10;

std::unique_ptr<InProcessGroup> make_group(int k) {
  std::unique_ptr<InProcessGroup> g;
  const Status s = InProcessGroup::create(k, &g, 30.0);
  EXPECT_TRUE(s.ok()) << s.to_string();
  return g;
}

// One thread per rank already: the layers run serially inside each (and the one-process
// reference the same way), so a failure never depends on the pool's scheduling.
class DataParallelTest : public ::testing::Test {
 protected:
  void SetUp() override { set_num_threads(1); }
  void TearDown() override { set_num_threads(0); }
};

// Synthetic Fashion-MNIST-shaped samples: pixels in [0, 1), labels from a fixed random linear
// map of the pixels (so the network has something to learn and the logits move).
struct Synthetic {
  std::vector<float> x;
  std::vector<int32_t> y;
  ClassificationData data() const {
    return ClassificationData{x.data(), std::span<const int32_t>(y), {kFeatures}};
  }
};

Synthetic make_data(int64_t n, uint64_t seed) {
  Rng rng(seed);
  Synthetic s;
  s.x.resize(static_cast<size_t>(n * kFeatures));
  uniform_(s.x, 0.0, 1.0, rng);
  std::vector<float> w(static_cast<size_t>(kClasses * kFeatures));
  normal_(w, 0.0, 1.0, rng);
  for (int64_t i = 0; i < n; ++i) {
    int best = 0;
    double best_v = -1e300;
    for (int c = 0; c < kClasses; ++c) {
      double v = 0;
      for (int64_t j = 0; j < kFeatures; ++j)
        v += static_cast<double>(w[static_cast<size_t>(c * kFeatures + j)]) *
             s.x[static_cast<size_t>(i * kFeatures + j)];
      if (v > best_v) best_v = v, best = c;
    }
    s.y.push_back(best);
  }
  return s;
}

struct RunSetup {
  int64_t global_batch = 16;
  int64_t steps = 6;
  int64_t eval_every = 0;
  bool sync_bn = true;
  SyncMode mode = SyncMode::kReproducible;
  double lr = 0.1;
  double momentum = 0.9;
  double weight_decay = 1e-4;
  uint64_t seed = 7;
};

// What a rank ends with.
struct Outcome {
  Status status;
  std::vector<std::string> names;
  std::vector<std::vector<unsigned char>> state;  // every entry's bytes, state_dict order
  std::vector<double> losses;                     // every step's global mean loss
  std::vector<int64_t> correct;
  TrainLoopResult loop;
  EvalResult eval;
  int64_t replica_checks = 0;
  float gradient_scale = 0;
};

Status train_run(Communicator* comm, const RunSetup& setup, const Synthetic& data, Outcome* out) {
  Sequential model = paper_mlp(true, setup.seed);
  DataParallel dp;
  BNORM_RETURN_IF_ERROR(DataParallel::create(
      comm, &model,
      DataParallelOptions{.global_batch = setup.global_batch,
                          .sync_batch_norm = setup.sync_bn,
                          .sync_mode = setup.mode},
      &dp));
  out->gradient_scale = dp.gradient_scale();
  Sgd sgd;
  BNORM_RETURN_IF_ERROR(Sgd::create(
      model.parameters(),
      SgdOptions{.lr = setup.lr, .momentum = setup.momentum, .weight_decay = setup.weight_decay},
      &sgd));
  LrSchedule schedule;
  BNORM_RETURN_IF_ERROR(LrSchedule::create(
      LrScheduleOptions{.kind = LrScheduleKind::kCosine, .base_lr = setup.lr,
                        .total_steps = setup.steps + 1},
      &schedule));
  const int64_t n = data.data().count();
  TrainLoopHooks hooks;
  // Step s's global batch: samples [s * B, (s + 1) * B) mod n; this rank takes its shard.
  hooks.batch = [&](int64_t step, Tensor* x, std::vector<int32_t>* labels) {
    x->resize({dp.shard_size(), kFeatures});
    labels->clear();
    for (int64_t i = 0; i < dp.shard_size(); ++i) {
      const int64_t sample = (step * setup.global_batch + dp.shard_begin() + i) % n;
      std::copy_n(data.x.data() + sample * kFeatures, kFeatures, x->data() + i * kFeatures);
      labels->push_back(data.y[static_cast<size_t>(sample)]);
    }
    return Status();
  };
  hooks.step = [&](const TrainStep& s) {
    out->losses.push_back(s.loss);
    out->correct.push_back(s.correct);
  };
  BNORM_RETURN_IF_ERROR(train_loop(&dp, &sgd, schedule,
                                   TrainLoopOptions{.steps = setup.steps, .eval_every = setup.eval_every},
                                   hooks, &out->loop));
  model.train(false);
  BNORM_RETURN_IF_ERROR(dp.evaluate(data.data(), 7, &out->eval));
  BNORM_RETURN_IF_ERROR(dp.check_replicas(setup.steps));
  out->replica_checks = dp.replica_checks_passed();
  for (const StateEntry& e : model.state_dict()) {
    const auto* p = static_cast<const unsigned char*>(e.data);
    out->names.push_back(e.name);
    out->state.emplace_back(p, p + e.numel() * (e.dtype == DType::kI64 ? 8 : 4));
  }
  return Status();
}

Outcome one_process(const RunSetup& setup, const Synthetic& data) {
  Outcome o;
  o.status = train_run(nullptr, setup, data, &o);
  EXPECT_TRUE(o.status.ok()) << o.status.to_string();
  return o;
}

std::vector<Outcome> k_ranks(int k, const RunSetup& setup, const Synthetic& data) {
  std::unique_ptr<InProcessGroup> group = make_group(k);
  std::vector<Outcome> out(static_cast<size_t>(k));
  const Status s = group->run([&](Communicator& c) {
    Outcome& o = out[static_cast<size_t>(c.rank())];
    o.status = train_run(&c, setup, data, &o);
    return o.status;
  });
  EXPECT_TRUE(s.ok()) << s.to_string();
  return out;
}

float float_at(const std::vector<unsigned char>& bytes, size_t i) {
  float v;
  std::memcpy(&v, bytes.data() + 4 * i, 4);
  return v;
}

bool is_running_stat(const std::string& name) {
  return name.ends_with("running_mean") || name.ends_with("running_var");
}

// Largest |a - b| over the float entries (parameters or running statistics) of two outcomes,
// and the number of values that are not bitwise equal.
struct Difference {
  double largest = 0;
  int64_t differing = 0;
  std::string where;
};

Difference compare(const Outcome& a, const Outcome& b, bool running_stats) {
  Difference d;
  for (size_t i = 0; i < a.state.size(); ++i) {
    const std::string& name = a.names[i];
    if (name.ends_with("num_batches_tracked") || is_running_stat(name) != running_stats) continue;
    const size_t n = a.state[i].size() / 4;
    for (size_t j = 0; j < n; ++j) {
      const float x = float_at(a.state[i], j), y = float_at(b.state[i], j);
      if (std::memcmp(&x, &y, 4) != 0) ++d.differing;
      const double diff = std::fabs(static_cast<double>(x) - y);
      if (diff > d.largest) d.largest = diff, d.where = name + "[" + std::to_string(j) + "]";
    }
  }
  return d;
}

// --- K ranks against one process ------------------------------------------------------------

// Largest |a - b| / max(1, |b|) over the step losses.
double loss_difference(const Outcome& a, const Outcome& b) {
  double d = 0;
  for (size_t s = 0; s < a.losses.size(); ++s)
    d = std::max(d, std::fabs(a.losses[s] - b.losses[s]) / std::max(1.0, std::fabs(b.losses[s])));
  return d;
}

// What is bitwise one process (no communicator, plain batch norm): a group of one rank without
// synchronized batch norm (no exchange is made, the step is the same arithmetic), and one rank
// with synchronized batch norm in the per-rank mode (its one partial is the plain kernel's
// statistics, and merging one partial is the identity). In the reproducible mode one rank's
// statistics come from the per-sample tree instead: within rounding (the next test).
TEST_F(DataParallelTest, OneRankIsOneProcessBitwise) {
  const Synthetic data = make_data(96, 11);
  for (bool sync : {false, true}) {
    RunSetup setup;
    setup.sync_bn = sync;
    setup.mode = SyncMode::kPerRank;
    const Outcome ref = one_process(setup, data);
    const std::vector<Outcome> one = k_ranks(1, setup, data);
    ASSERT_TRUE(one[0].status.ok());
    EXPECT_TRUE(one[0].state == ref.state) << "sync " << sync << ": parameters or buffers differ";
    EXPECT_EQ(one[0].losses, ref.losses);
    EXPECT_EQ(one[0].correct, ref.correct);
    EXPECT_EQ(one[0].eval.loss, ref.eval.loss);
    EXPECT_EQ(one[0].eval.accuracy, ref.eval.accuracy);
    EXPECT_EQ(one[0].replica_checks, 0) << "one rank checks nothing";
  }
}

// K = 1, 2 and 3 ranks (uneven shards: 16 = 8 + 8 = 6 + 5 + 5) with synchronized batch norm in
// both modes, 6 steps of SGD with momentum, weight decay and a cosine schedule, against one
// process (no communicator, plain batch norm: `bnorm train` without mpirun) and against one
// rank with synchronized batch norm (the same batch-norm arithmetic).
//
// Not bitwise, from the first step on. Synchronized batch norm is bitwise the same for any split
// of the same input (tests/comm), but its input is not the same: OpenBLAS's sgemm rounds an
// output row differently depending on how many rows the call has (its kernels block M), so a
// Linear layer's output for a sample depends on its shard's size, and after one step ~200 of
// the 600 running statistics differ from one rank's by an ulp. The Linear gradients are sums over
// the batch, split over the shards and then added in rank order: rounded differently again.
// What is bitwise: every rank's replica (asserted below), and one rank as one process (above).
//
// Tolerance. The runs differ only in rounding, so each step may round each parameter and running
// statistic differently by a few ulps of its magnitude, and nothing in 6 steps amplifies that
// measurably (the network is far from a saddle, lr is 0.1): we allow 4 ulps per step,
// |a - b| <= 4 * steps * eps * max(1, |b|) (2.9e-6 here; the largest difference measured, printed,
// is one ulp, 1.2e-7). The step losses within the same relative bound; the counts correct and the
// evaluation's accuracy equal (no arg-max is a near tie on this data).
TEST_F(DataParallelTest, KRanksFollowOneProcessWithinRounding) {
  const Synthetic data = make_data(96, 13);
  for (SyncMode mode : {SyncMode::kReproducible, SyncMode::kPerRank}) {
    RunSetup setup;
    setup.mode = mode;
    const double tolerance = 4.0 * static_cast<double>(setup.steps) *
                             std::numeric_limits<float>::epsilon();
    const Outcome plain = one_process(setup, data);
    const Outcome one_rank = k_ranks(1, setup, data)[0];
    ASSERT_TRUE(one_rank.status.ok());
    const char* mode_name = mode == SyncMode::kReproducible ? "reproducible" : "per-rank";
    for (int k : {1, 2, 3}) {
      const std::vector<Outcome> ranks = k_ranks(k, setup, data);
      for (int r = 0; r < k; ++r) {
        const Outcome& o = ranks[static_cast<size_t>(r)];
        ASSERT_TRUE(o.status.ok()) << o.status.to_string();
        // The replicas are bit for bit identical (and create() and the last check counted them).
        EXPECT_TRUE(o.state == ranks[0].state) << k << " ranks: rank " << r << " differs from rank 0";
        EXPECT_EQ(o.losses, ranks[0].losses);
        EXPECT_EQ(o.replica_checks, k > 1 ? 2 : 0);
        EXPECT_FLOAT_EQ(o.gradient_scale,
                        static_cast<float>(shard_sizes(16, k)[static_cast<size_t>(r)]) / 16.0f);
      }
      for (const Outcome* ref : {&plain, &one_rank}) {
        const char* against = ref == &plain ? "one process" : "one rank with sync BN";
        const Difference params = compare(ranks[0], *ref, false);
        const Difference stats = compare(ranks[0], *ref, true);
        const double loss = loss_difference(ranks[0], *ref);
        std::printf("%d ranks (%s) against %s: %lld parameter values differ, largest %.3g (%s); "
                    "running statistics %lld, largest %.3g; step losses %.3g relative\n",
                    k, mode_name, against, static_cast<long long>(params.differing),
                    params.largest, params.where.c_str(), static_cast<long long>(stats.differing),
                    stats.largest, loss);
        EXPECT_LE(params.largest, tolerance) << k << " ranks, " << mode_name << ", against "
                                             << against << ", at " << params.where;
        EXPECT_LE(stats.largest, tolerance) << k << " ranks, " << mode_name << ", against "
                                            << against << ", at " << stats.where;
        EXPECT_LE(loss, tolerance) << k << " ranks, " << mode_name << ", against " << against;
        EXPECT_EQ(ranks[0].correct, ref->correct) << k << " ranks against " << against;
        EXPECT_NEAR(ranks[0].eval.loss, ref->eval.loss, tolerance * ref->eval.loss);
        EXPECT_EQ(ranks[0].eval.accuracy, ref->eval.accuracy);
        for (size_t i = 0; i < ref->names.size(); ++i)  // num_batches_tracked: the steps
          if (ref->names[i].ends_with("num_batches_tracked")) {
            EXPECT_TRUE(ranks[0].state[i] == ref->state[i]) << ref->names[i];
          }
      }
    }
  }
}

// Without synchronized batch norm each rank normalizes its own shard (so the run is not one
// process's), but the replicas stay identical: every rank adopts rank 0's running statistics
// after each step.
TEST_F(DataParallelTest, LocalBatchNormKeepsReplicasIdentical) {
  const Synthetic data = make_data(96, 14);
  RunSetup setup;
  setup.sync_bn = false;
  const std::vector<Outcome> ranks = k_ranks(3, setup, data);
  for (int r = 0; r < 3; ++r) {
    ASSERT_TRUE(ranks[static_cast<size_t>(r)].status.ok());
    EXPECT_TRUE(ranks[static_cast<size_t>(r)].state == ranks[0].state) << "rank " << r;
  }
  const Outcome ref = one_process(setup, data);
  EXPECT_GT(compare(ranks[0], ref, true).largest, 1e-3) << "local statistics are not global ones";
}

// --- Sharding --------------------------------------------------------------------------------

TEST(DataParallelShards, EverySampleOnceForUnevenSplits) {
  for (int64_t n = 0; n <= 70; ++n) {
    for (int k = 1; k <= 9; ++k) {
      std::vector<int> seen(static_cast<size_t>(n), 0);
      const std::vector<int64_t> sizes = shard_sizes(n, k);
      ASSERT_EQ(sizes.size(), static_cast<size_t>(k));
      int64_t total = 0;
      for (int r = 0; r < k; ++r) {
        const int64_t b = shard_begin(n, k, r), e = shard_begin(n, k, r + 1);
        ASSERT_EQ(b, total) << "n " << n << " k " << k << " rank " << r << ": not contiguous";
        ASSERT_EQ(e - b, sizes[static_cast<size_t>(r)]);
        // As even as possible: the first n % k ranks get one more.
        ASSERT_EQ(e - b, n / k + (r < n % k ? 1 : 0)) << "n " << n << " k " << k << " rank " << r;
        for (int64_t i = b; i < e; ++i) ++seen[static_cast<size_t>(i)];
        total = e;
      }
      ASSERT_EQ(total, n);
      for (int64_t i = 0; i < n; ++i)
        ASSERT_EQ(seen[static_cast<size_t>(i)], 1) << "n " << n << " k " << k << " sample " << i;
    }
  }
}

// --- Agreement --------------------------------------------------------------------------------

TEST(DataParallelAgree, OneRanksFailureIsEveryRanks) {
  EXPECT_TRUE(agree(nullptr, Status(), "setup").ok());
  EXPECT_EQ(agree(nullptr, Status::invalid_argument("bad file"), "setup").message(), "bad file");
  for (int k : {1, 2, 3}) {
    for (int bad : {-1, 0, k - 1}) {
      std::unique_ptr<InProcessGroup> group = make_group(k);
      std::vector<Status> got(static_cast<size_t>(k));
      ASSERT_TRUE(group
                      ->run([&](Communicator& c) {
                        const Status mine = c.rank() == bad || (bad == 0 && c.rank() == 2)
                                                ? Status::invalid_argument("rank's own problem")
                                                : Status();
                        got[static_cast<size_t>(c.rank())] = agree(&c, mine, "setup");
                        return Status();
                      })
                      .ok());
      for (int r = 0; r < k; ++r) {
        const Status& s = got[static_cast<size_t>(r)];
        const bool failed_here = r == bad || (bad == 0 && r == 2);
        if (bad < 0) {
          EXPECT_TRUE(s.ok()) << s.to_string();
        } else if (failed_here) {
          EXPECT_EQ(s.message(), "rank's own problem") << "k " << k << " rank " << r;
        } else {
          // The lowest failed rank is named.
          EXPECT_EQ(s.message(), "setup: rank " + std::to_string(bad) +
                                     " failed (see its message); every rank stops")
              << "k " << k << " rank " << r;
        }
      }
    }
  }
}

// --- Replica checks and create()'s checks ------------------------------------------------------

// Runs fn on every rank of a k-group and returns every rank's status.
std::vector<Status> on_ranks(int k, const std::function<Status(Communicator&)>& fn) {
  std::unique_ptr<InProcessGroup> group = make_group(k);
  std::vector<Status> got(static_cast<size_t>(k));
  const Status s = group->run([&](Communicator& c) {
    got[static_cast<size_t>(c.rank())] = fn(c);
    return Status();
  });
  EXPECT_TRUE(s.ok()) << s.to_string();
  return got;
}

float* entry(Sequential& model, const std::string& name) {
  for (const StateEntry& e : model.state_dict())
    if (e.name == name) return static_cast<float*>(e.data);
  ADD_FAILURE() << "no entry " << name;
  return nullptr;
}

TEST_F(DataParallelTest, ReplicaCheckDetectsAPerturbedReplica) {
  for (const char* name : {"3.weight", "7.running_var", "9.bias"}) {
    const std::vector<Status> got = on_ranks(3, [&](Communicator& c) {
      Sequential model = paper_mlp(true, 5);
      DataParallel dp;
      BNORM_RETURN_IF_ERROR(DataParallel::create(
          &c, &model, DataParallelOptions{.global_batch = 12, .sync_batch_norm = true}, &dp));
      BNORM_RETURN_IF_ERROR(dp.check_replicas(4));  // identical: passes
      if (c.rank() == 2) {
        float* v = entry(model, name) + 7;
        *v = std::nextafter(*v, 2.0f);  // one ulp up
      }
      return dp.check_replicas(5);
    });
    for (int r = 0; r < 3; ++r) {
      EXPECT_EQ(got[static_cast<size_t>(r)].code(), StatusCode::kInternal) << name << " rank " << r;
      EXPECT_EQ(got[static_cast<size_t>(r)].message(),
                "rank 2's parameters or buffers differ from rank 0's after step 5 (replicas "
                "diverged)")
          << name << " rank " << r;
    }
  }
}

TEST_F(DataParallelTest, CreateFailsOnEveryRankForDifferentReplicasLayoutsOrOptions) {
  // Replicas that do not start equal (another seed on rank 1).
  std::vector<Status> got = on_ranks(2, [&](Communicator& c) {
    Sequential model = paper_mlp(true, c.rank() == 1 ? 6 : 5);
    DataParallel dp;
    return DataParallel::create(&c, &model, DataParallelOptions{.global_batch = 8}, &dp);
  });
  for (const Status& s : got)
    EXPECT_EQ(s.message(), "rank 1's parameters or buffers differ from rank 0's at the start: the "
                           "replicas must start equal (build them from the same seed)");
  // Another model on rank 2: its fused gradient buffer would have another length, which MPI
  // could not detect in the all-reduce; create() rejects it on every rank.
  got = on_ranks(3, [&](Communicator& c) {
    Sequential model = paper_mlp(c.rank() != 2, 5);
    DataParallel dp;
    return DataParallel::create(&c, &model, DataParallelOptions{.global_batch = 8}, &dp);
  });
  for (const Status& s : got) {
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(s.message(), "rank 2's model has another layout than rank 0's (entry names, "
                           "shapes, dtypes or flags): the ranks must build the same model");
  }
  // Synchronized batch norm on rank 1 only: the same mismatch of what is all-reduced.
  got = on_ranks(2, [&](Communicator& c) {
    Sequential model = paper_mlp(true, 5);
    DataParallel dp;
    return DataParallel::create(
        &c, &model, DataParallelOptions{.global_batch = 8, .sync_batch_norm = c.rank() == 1}, &dp);
  });
  for (const Status& s : got) EXPECT_NE(s.message().find("rank 1's data-parallel options differ"), std::string::npos) << s.message();
  // Another global batch on rank 1.
  got = on_ranks(2, [&](Communicator& c) {
    Sequential model = paper_mlp(true, 5);
    DataParallel dp;
    return DataParallel::create(
        &c, &model, DataParallelOptions{.global_batch = c.rank() == 1 ? 9 : 8}, &dp);
  });
  for (const Status& s : got)
    EXPECT_EQ(s.message(), "rank 1's data-parallel options differ from rank 0's (global_batch, "
                           "sync_batch_norm or sync_mode): every rank must pass the same");
  // A global batch too small on rank 0 only: its own message there, the others name it.
  got = on_ranks(3, [&](Communicator& c) {
    Sequential model = paper_mlp(true, 5);
    DataParallel dp;
    return DataParallel::create(
        &c, &model, DataParallelOptions{.global_batch = c.rank() == 0 ? 2 : 8}, &dp);
  });
  EXPECT_EQ(got[0].message(),
            "DataParallel::create: global_batch: 2 is smaller than the 3 ranks (each needs a "
            "sample)");
  for (int r = 1; r < 3; ++r)
    EXPECT_EQ(got[static_cast<size_t>(r)].message(),
              "DataParallel::create: rank 0 failed (see its message); every rank stops");
}

// The step's all-reduce carries every gradient except the synchronized batch norms' (they are
// the global batch's already) plus rank 0's buffers without sync BN, and the loss and count.
TEST_F(DataParallelTest, TheStepIsOneAllReduceOfTheRightSize) {
  for (bool sync : {true, false}) {
    std::vector<int64_t> calls(2), bytes(2);
    const std::vector<Status> got = on_ranks(2, [&](Communicator& c) {
      Sequential model = paper_mlp(true, 5);
      DataParallel dp;
      BNORM_RETURN_IF_ERROR(DataParallel::create(
          &c, &model, DataParallelOptions{.global_batch = 10, .sync_batch_norm = sync}, &dp));
      Sgd sgd;
      BNORM_RETURN_IF_ERROR(Sgd::create(model.parameters(), SgdOptions{.lr = 0.1}, &sgd));
      Tensor x({5, kFeatures});
      std::vector<int32_t> labels = {0, 1, 2, 3, 4};
      c.reset_counters();
      StepResult r;
      BNORM_RETURN_IF_ERROR(dp.train_step(x, labels, &sgd, &r));
      calls[static_cast<size_t>(c.rank())] = c.counters().allreduce_calls;
      bytes[static_cast<size_t>(c.rank())] = c.counters().allreduce_bytes;
      return Status();
    });
    for (const Status& s : got) ASSERT_TRUE(s.ok()) << s.to_string();
    // paper_mlp with BN: Linear weights and biases 784*100 + 100 + 2 * (100*100 + 100) + 100*10
    // + 10; the three BatchNorm1d: 3 * 2 * 100 parameters and 3 * 2 * 100 running statistics.
    const int64_t linear = 784 * 100 + 100 + 2 * (100 * 100 + 100) + 100 * 10 + 10;
    const int64_t bn = 3 * 2 * 100;
    // Synchronized: the three BatchNorm1d forwards and backwards exchange too (6 calls).
    const int64_t fused = 4 * (sync ? linear + 2 : linear + bn + bn + 2);
    if (sync) {
      EXPECT_EQ(calls[0], 7);
    } else {
      EXPECT_EQ(calls[0], 1);
      EXPECT_EQ(bytes[0], fused);
    }
    EXPECT_EQ(calls[0], calls[1]);
    EXPECT_EQ(bytes[0], bytes[1]);
  }
}

// --- Distributed evaluation -------------------------------------------------------------------

TEST_F(DataParallelTest, EvaluationShardsAndFailsOnEveryRank) {
  const Synthetic data = make_data(53, 15);  // 53 = 18 + 18 + 17, in batches of 7
  Sequential ref_model = paper_mlp(true, 5);
  ref_model.train(false);
  EvalResult ref;
  ASSERT_TRUE(evaluate_classifier(ref_model, data.data(), 7, &ref).ok());
  std::vector<EvalResult> results(3);
  std::vector<Status> got = on_ranks(3, [&](Communicator& c) {
    Sequential model = paper_mlp(true, 5);
    DataParallel dp;
    BNORM_RETURN_IF_ERROR(DataParallel::create(&c, &model, DataParallelOptions{.global_batch = 9}, &dp));
    model.train(false);
    return dp.evaluate(data.data(), 7, &results[static_cast<size_t>(c.rank())]);
  });
  for (int r = 0; r < 3; ++r) {
    ASSERT_TRUE(got[static_cast<size_t>(r)].ok()) << got[static_cast<size_t>(r)].to_string();
    // The count correct is exact. The loss is within float rounding: a shard's batches hold
    // other rows than one process's, and sgemm's rounding of a row depends on its call's rows.
    EXPECT_EQ(results[static_cast<size_t>(r)].accuracy, ref.accuracy);
    EXPECT_NEAR(results[static_cast<size_t>(r)].loss, ref.loss, 1e-6 * ref.loss);
    EXPECT_EQ(results[static_cast<size_t>(r)].loss, results[0].loss) << "the same on every rank";
  }
  // Rank 1's evaluation fails (its model was left in training mode): every rank fails.
  got = on_ranks(3, [&](Communicator& c) {
    Sequential model = paper_mlp(true, 5);
    DataParallel dp;
    BNORM_RETURN_IF_ERROR(DataParallel::create(&c, &model, DataParallelOptions{.global_batch = 9}, &dp));
    model.train(c.rank() == 1);
    EvalResult r;
    return dp.evaluate(data.data(), 7, &r);
  });
  EXPECT_EQ(got[1].message(), "DataParallel::evaluate: the model is in training mode: evaluate in "
                              "eval mode (train(false))");
  for (int r : {0, 2})
    EXPECT_EQ(got[static_cast<size_t>(r)].message(),
              "evaluation: a rank failed (see its message); every rank stops");
}

// --- The step and the loop --------------------------------------------------------------------

TEST_F(DataParallelTest, TrainStepRejectsAShardOfTheWrongSize) {
  Sequential model = paper_mlp(true, 5);
  DataParallel dp;
  ASSERT_TRUE(DataParallel::create(nullptr, &model, DataParallelOptions{.global_batch = 6}, &dp).ok());
  Sgd sgd;
  ASSERT_TRUE(Sgd::create(model.parameters(), SgdOptions{.lr = 0.1}, &sgd).ok());
  Tensor x({5, kFeatures});
  std::vector<int32_t> labels(5, 0);
  StepResult r;
  const Status s = dp.train_step(x, labels, &sgd, &r);
  EXPECT_EQ(s.message(), "DataParallel::train_step: rank 0 expected its shard of 6 samples (of "
                         "the global batch 6), got x [5, 784] and 5 labels");
  EXPECT_FALSE(DataParallel::create(nullptr, &model, DataParallelOptions{.global_batch = 0}, &dp).ok());
  EXPECT_FALSE(DataParallel::create(nullptr, nullptr, DataParallelOptions{.global_batch = 6}, &dp).ok());
}

// Intervals: the hook runs at step 0 and after every eval_every steps and the last, with the
// mean of the interval's step losses; a non-finite loss stops the loop without an update.
TEST_F(DataParallelTest, LoopIntervalsAndDivergence) {
  const Synthetic data = make_data(64, 16);
  for (int k : {1, 2}) {
    std::vector<std::vector<TrainInterval>> intervals(static_cast<size_t>(k));
    std::vector<Outcome> outcomes(static_cast<size_t>(k));
    const std::vector<Status> got = on_ranks(k, [&](Communicator& c) {
      Outcome& o = outcomes[static_cast<size_t>(c.rank())];
      Sequential model = paper_mlp(true, 5);
      DataParallel dp;
      BNORM_RETURN_IF_ERROR(DataParallel::create(
          &c, &model, DataParallelOptions{.global_batch = 8, .sync_batch_norm = true}, &dp));
      Sgd sgd;
      BNORM_RETURN_IF_ERROR(Sgd::create(model.parameters(), SgdOptions{.lr = 0.1}, &sgd));
      LrSchedule schedule;
      BNORM_RETURN_IF_ERROR(LrSchedule::create(LrScheduleOptions{.base_lr = 0.1}, &schedule));
      TrainLoopHooks hooks;
      hooks.batch = [&](int64_t step, Tensor* x, std::vector<int32_t>* labels) {
        x->resize({dp.shard_size(), kFeatures});
        labels->assign(static_cast<size_t>(dp.shard_size()), 0);
        const int64_t first = (step * 8 + dp.shard_begin()) % 64;
        std::copy_n(data.x.data() + first * kFeatures, dp.shard_size() * kFeatures, x->data());
        std::copy_n(data.y.data() + first, dp.shard_size(), labels->data());
        return Status();
      };
      hooks.step = [&](const TrainStep& s) { o.losses.push_back(s.loss); };
      hooks.interval = [&](const TrainInterval& at) {
        intervals[static_cast<size_t>(c.rank())].push_back(at);
        return Status();
      };
      return train_loop(&dp, &sgd, schedule, TrainLoopOptions{.steps = 7, .eval_every = 3}, hooks,
                        &o.loop);
    });
    for (const Status& s : got) ASSERT_TRUE(s.ok()) << s.to_string();
    const std::vector<TrainInterval>& at = intervals[0];
    ASSERT_EQ(at.size(), 4u);
    const std::vector<int64_t> steps = {at[0].step, at[1].step, at[2].step, at[3].step};
    EXPECT_EQ(steps, (std::vector<int64_t>{0, 3, 6, 7}));
    EXPECT_TRUE(std::isnan(at[0].train_loss));
    const std::vector<double>& l = outcomes[0].losses;
    ASSERT_EQ(l.size(), 7u);
    EXPECT_DOUBLE_EQ(at[1].train_loss, (l[0] + l[1] + l[2]) / 3);
    EXPECT_DOUBLE_EQ(at[3].train_loss, l[6]);
    EXPECT_EQ(outcomes[0].loop.steps_done, 7);
    EXPECT_FALSE(outcomes[0].loop.diverged);
    EXPECT_EQ(outcomes[0].loop.final_train_loss, at[3].train_loss);
    EXPECT_GE(outcomes[0].loop.train_seconds, 0.0);
  }

  // Divergence: weight decay 1e10 blows the weights up within a few steps; every rank stops at
  // the same step, and the parameters are those before that step (no update with a NaN).
  std::vector<TrainLoopResult> loops(2);
  std::vector<std::vector<unsigned char>> states(2);
  const std::vector<Status> got = on_ranks(2, [&](Communicator& c) {
    Sequential model = paper_mlp(true, 5);
    DataParallel dp;
    BNORM_RETURN_IF_ERROR(DataParallel::create(
        &c, &model, DataParallelOptions{.global_batch = 8, .sync_batch_norm = true}, &dp));
    Sgd sgd;
    BNORM_RETURN_IF_ERROR(
        Sgd::create(model.parameters(), SgdOptions{.lr = 0.1, .weight_decay = 1e10}, &sgd));
    LrSchedule schedule;
    BNORM_RETURN_IF_ERROR(LrSchedule::create(LrScheduleOptions{.base_lr = 0.1}, &schedule));
    TrainLoopHooks hooks;
    hooks.batch = [&](int64_t, Tensor* x, std::vector<int32_t>* labels) {
      x->resize({dp.shard_size(), kFeatures});
      std::copy_n(data.x.data(), dp.shard_size() * kFeatures, x->data());
      labels->assign(static_cast<size_t>(dp.shard_size()), 1);
      return Status();
    };
    BNORM_RETURN_IF_ERROR(train_loop(&dp, &sgd, schedule, TrainLoopOptions{.steps = 50}, hooks,
                                     &loops[static_cast<size_t>(c.rank())]));
    const StateEntry w = model.parameters()[0];
    const auto* p = static_cast<const unsigned char*>(w.data);
    states[static_cast<size_t>(c.rank())].assign(p, p + 4 * w.numel());
    return dp.check_replicas(loops[static_cast<size_t>(c.rank())].steps_done);
  });
  for (const Status& s : got) ASSERT_TRUE(s.ok()) << s.to_string();
  EXPECT_TRUE(loops[0].diverged);
  EXPECT_LT(loops[0].steps_done, 50);
  EXPECT_EQ(loops[1].steps_done, loops[0].steps_done);
  EXPECT_TRUE(states[0] == states[1]);
}

}  // namespace
}  // namespace bnorm::nn
