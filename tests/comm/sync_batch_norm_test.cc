// Synchronized batch norm over K in-process ranks against batch norm on the global batch: every
// output (y, saved statistics, running statistics, dx, dweight, dbias) for even and uneven
// splits, single-sample and empty ranks, both layouts and both backends; bitwise equality across
// splits in the reproducible mode; collective errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/comm.h"

namespace {

using bnorm::Backend;
using bnorm::Communicator;
using bnorm::InProcessGroup;
using bnorm::Layout;
using bnorm::Status;
using bnorm::SyncMode;

struct Problem {
  std::vector<int64_t> dims;  // global (N, C, spatial...)
  Layout layout = Layout::kChannelsFirst;
  std::vector<float> x, dy, weight, bias, running_mean, running_var;
  int64_t c() const { return dims[1]; }
  int64_t sample() const {  // values per sample
    int64_t s = 1;
    for (size_t i = 1; i < dims.size(); ++i) s *= dims[i];
    return s;
  }
};

Problem MakeProblem(std::vector<int64_t> dims, Layout layout, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  Problem p;
  p.dims = std::move(dims);
  p.layout = layout;
  const int64_t n = p.dims[0] * p.sample(), c = p.c();
  for (int64_t i = 0; i < n; ++i) {
    p.x.push_back(static_cast<float>(3.0 + 2.0 * normal(rng)));
    p.dy.push_back(static_cast<float>(normal(rng)));
  }
  for (int64_t i = 0; i < c; ++i) {
    p.weight.push_back(static_cast<float>(1.0 + 0.5 * normal(rng)));
    p.bias.push_back(static_cast<float>(normal(rng)));
    p.running_mean.push_back(static_cast<float>(0.1 * normal(rng)));
    p.running_var.push_back(static_cast<float>(1.0 + 0.1 * std::abs(normal(rng))));
  }
  return p;
}

// What one forward + backward produced: the tensors over the global batch and the per-channel
// outputs (which every rank must produce bit for bit).
struct Outputs {
  std::vector<float> y, dx;
  std::vector<float> save_mean, save_invstd, running_mean, running_var, dweight, dbias;
  int64_t num_batches_tracked = 0;
};

void ExpectBitwiseEqual(const std::vector<float>& a, const std::vector<float>& b,
                        const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i)
    ASSERT_EQ(std::memcmp(&a[i], &b[i], sizeof(float)), 0)
        << what << "[" << i << "]: " << a[i] << " vs " << b[i];
}

void ExpectBitwiseEqual(const Outputs& a, const Outputs& b, const std::string& what) {
  ExpectBitwiseEqual(a.y, b.y, what + " y");
  ExpectBitwiseEqual(a.dx, b.dx, what + " dx");
  ExpectBitwiseEqual(a.save_mean, b.save_mean, what + " save_mean");
  ExpectBitwiseEqual(a.save_invstd, b.save_invstd, what + " save_invstd");
  ExpectBitwiseEqual(a.running_mean, b.running_mean, what + " running_mean");
  ExpectBitwiseEqual(a.running_var, b.running_var, what + " running_var");
  ExpectBitwiseEqual(a.dweight, b.dweight, what + " dweight");
  ExpectBitwiseEqual(a.dbias, b.dbias, what + " dbias");
  EXPECT_EQ(a.num_batches_tracked, b.num_batches_tracked) << what;
}

std::vector<int64_t> WithBatch(std::vector<int64_t> dims, int64_t n) {
  dims[0] = n;
  return dims;
}

// Batch norm on the whole batch in one process.
Outputs RunPlain(const Problem& p, Backend backend, std::optional<double> momentum = 0.1) {
  Outputs o;
  const size_t c = static_cast<size_t>(p.c());
  o.y.resize(p.x.size());
  o.dx.resize(p.x.size());
  o.save_mean.resize(c);
  o.save_invstd.resize(c);
  o.running_mean = p.running_mean;
  o.running_var = p.running_var;
  o.dweight.resize(c);
  o.dbias.resize(c);
  bnorm::ForwardTrainArgs f;
  f.x = bnorm::ConstTensorView(p.x.data(), p.dims, p.layout);
  f.weight = p.weight;
  f.bias = p.bias;
  f.running_mean = o.running_mean;
  f.running_var = o.running_var;
  f.num_batches_tracked = &o.num_batches_tracked;
  f.momentum = momentum;
  f.y = bnorm::TensorView(o.y.data(), p.dims, p.layout);
  f.save_mean = o.save_mean;
  f.save_invstd = o.save_invstd;
  bnorm::CallOptions options;
  options.backend = backend;
  EXPECT_TRUE(bnorm::forward_train(f, options).ok());
  bnorm::BackwardArgs b;
  b.dy = bnorm::ConstTensorView(p.dy.data(), p.dims, p.layout);
  b.x = f.x;
  b.weight = p.weight;
  b.save_mean = o.save_mean;
  b.save_invstd = o.save_invstd;
  b.dx = bnorm::TensorView(o.dx.data(), p.dims, p.layout);
  b.dweight = o.dweight;
  b.dbias = o.dbias;
  EXPECT_TRUE(bnorm::backward(b, options).ok());
  return o;
}

// Sync batch norm with rank r holding split[r] consecutive samples. Checks that every rank's
// per-channel outputs are bitwise identical and returns rank 0's with the gathered tensors.
Outputs RunSync(const Problem& p, const std::vector<int64_t>& split, SyncMode mode,
                Backend backend, bool give_split = false, std::optional<double> momentum = 0.1) {
  const int k = static_cast<int>(split.size());
  std::unique_ptr<InProcessGroup> group;
  EXPECT_TRUE(InProcessGroup::create(k, &group).ok());
  Outputs global;
  global.y.assign(p.x.size(), NAN);
  global.dx.assign(p.x.size(), NAN);
  std::vector<Outputs> per_rank(static_cast<size_t>(k));
  const Status s = group->run([&](Communicator& comm) -> Status {
    const int r = comm.rank();
    int64_t offset = 0;
    for (int i = 0; i < r; ++i) offset += split[static_cast<size_t>(i)];
    const std::vector<int64_t> dims = WithBatch(p.dims, split[static_cast<size_t>(r)]);
    const int64_t begin = offset * p.sample();
    Outputs& o = per_rank[static_cast<size_t>(r)];
    const size_t c = static_cast<size_t>(p.c());
    o.save_mean.resize(c);
    o.save_invstd.resize(c);
    o.running_mean = p.running_mean;
    o.running_var = p.running_var;
    o.dweight.resize(c);
    o.dbias.resize(c);
    bnorm::ForwardTrainArgs f;
    f.x = bnorm::ConstTensorView(p.x.data() + begin, dims, p.layout);
    f.weight = p.weight;
    f.bias = p.bias;
    f.running_mean = o.running_mean;
    f.running_var = o.running_var;
    f.num_batches_tracked = &o.num_batches_tracked;
    f.momentum = momentum;
    f.y = bnorm::TensorView(global.y.data() + begin, dims, p.layout);
    f.save_mean = o.save_mean;
    f.save_invstd = o.save_invstd;
    bnorm::CallOptions options;
    options.backend = backend;
    bnorm::SyncOptions sync;
    sync.mode = mode;
    std::vector<int64_t> used;
    if (give_split) sync.split = split;
    sync.split_out = &used;
    BNORM_RETURN_IF_ERROR(bnorm::sync_forward_train(comm, f, options, sync));
    if (used != split) return Status::internal("split_out differs from the split");
    bnorm::BackwardArgs b;
    b.dy = bnorm::ConstTensorView(p.dy.data() + begin, dims, p.layout);
    b.x = f.x;
    b.weight = p.weight;
    b.save_mean = o.save_mean;
    b.save_invstd = o.save_invstd;
    b.dx = bnorm::TensorView(global.dx.data() + begin, dims, p.layout);
    b.dweight = o.dweight;
    b.dbias = o.dbias;
    bnorm::SyncOptions back;
    back.mode = mode;
    back.split = used;
    return bnorm::sync_backward(comm, b, options, back);
  });
  EXPECT_TRUE(s.ok()) << s.to_string();
  for (int r = 1; r < k; ++r) {
    Outputs a = per_rank[0], b = per_rank[static_cast<size_t>(r)];
    a.y = b.y = a.dx = b.dx = {};
    ExpectBitwiseEqual(a, b, "rank 0 vs rank " + std::to_string(r));
  }
  Outputs o = per_rank[0];
  o.y = global.y;
  o.dx = global.dx;
  return o;
}

// |a - b| <= tol * (1 + |b|), elementwise.
void ExpectClose(const std::vector<float>& a, const std::vector<float>& b, double tol,
                 const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double e = std::abs(static_cast<double>(a[i]) - b[i]) / (1.0 + std::abs(b[i]));
    if (!(e <= worst)) {
      worst = e;
      at = i;
    }
  }
  EXPECT_LE(worst, tol) << what << ": worst at [" << at << "]: " << a[at] << " vs " << b[at];
}

void ExpectClose(const Outputs& a, const Outputs& b, double tol, const std::string& what) {
  ExpectClose(a.y, b.y, tol, what + " y");
  ExpectClose(a.dx, b.dx, tol, what + " dx");
  ExpectClose(a.save_mean, b.save_mean, tol, what + " save_mean");
  ExpectClose(a.save_invstd, b.save_invstd, tol, what + " save_invstd");
  ExpectClose(a.running_mean, b.running_mean, tol, what + " running_mean");
  ExpectClose(a.running_var, b.running_var, tol, what + " running_var");
  // The gradient sums grow with the count: compare relative to their scale.
  ExpectClose(a.dweight, b.dweight, tol * 10, what + " dweight");
  ExpectClose(a.dbias, b.dbias, tol * 10, what + " dbias");
  EXPECT_EQ(a.num_batches_tracked, b.num_batches_tracked) << what;
}

struct Shape {
  std::vector<int64_t> dims;
  Layout layout;
};

std::vector<std::vector<int64_t>> SplitsOf(int64_t n) {
  std::vector<std::vector<int64_t>> out = {{n}};
  out.push_back({n / 2, n - n / 2});
  out.push_back({n / 3, n / 3, n - 2 * (n / 3)});
  out.push_back({1, n - 1});
  out.push_back({0, n});
  out.push_back({n - 1, 0, 1});
  out.push_back({1, 1, 1, n - 3});
  out.push_back({2, 0, n - 3, 1});
  return out;
}

class SyncBatchNormTest : public ::testing::TestWithParam<Shape> {};

TEST_P(SyncBatchNormTest, ReproducibleIsBitwiseIdenticalForEverySplitAndMatchesTheGlobalBatch) {
  const Shape& shape = GetParam();
  const Problem p = MakeProblem(shape.dims, shape.layout, 7);
  const Outputs reference = RunPlain(p, Backend::kReference);
  const Outputs fast = RunPlain(p, Backend::kAuto);
  for (Backend backend : {Backend::kAuto, Backend::kReference}) {
    SCOPED_TRACE(backend == Backend::kAuto ? "fast kernels" : "reference kernels");
    Outputs first;
    bool have_first = false;
    for (const std::vector<int64_t>& split : SplitsOf(shape.dims[0])) {
      for (bool give_split : {false, true}) {
        std::string name = "split {";
        for (int64_t n : split) name += std::to_string(n) + " ";
        name += give_split ? "} given" : "} exchanged";
        SCOPED_TRACE(name);
        const Outputs o = RunSync(p, split, SyncMode::kReproducible, backend, give_split);
        ExpectClose(o, reference, 2e-5, name + " vs the fp64 reference");
        ExpectClose(o, fast, 2e-5, name + " vs the fast kernels on the global batch");
        if (!have_first) {
          first = o;
          have_first = true;
        } else {
          ExpectBitwiseEqual(o, first, name + " vs the 1-rank run");
        }
      }
    }
  }
}

TEST_P(SyncBatchNormTest, PerRankModeMatchesTheGlobalBatchAndIsDeterministic) {
  const Shape& shape = GetParam();
  const Problem p = MakeProblem(shape.dims, shape.layout, 11);
  const Outputs reference = RunPlain(p, Backend::kReference);
  for (const std::vector<int64_t>& split : SplitsOf(shape.dims[0])) {
    const Outputs a = RunSync(p, split, SyncMode::kPerRank, Backend::kAuto);
    const Outputs b = RunSync(p, split, SyncMode::kPerRank, Backend::kAuto);
    ExpectClose(a, reference, 2e-5, "per-rank vs the fp64 reference");
    ExpectBitwiseEqual(a, b, "per-rank, same split twice");
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SyncBatchNormTest,
    ::testing::Values(Shape{{12, 5, 3, 4}, Layout::kChannelsFirst},
                      Shape{{12, 5, 3, 4}, Layout::kChannelsLast},
                      Shape{{10, 7}, Layout::kChannelsFirst},
                      Shape{{9, 3, 17}, Layout::kChannelsFirst},
                      Shape{{8, 40, 6, 6}, Layout::kChannelsLast},
                      Shape{{6, 3, 40, 3}, Layout::kChannelsFirst}));

TEST(SyncBatchNorm, RunningVarianceUsesTheGlobalCountsBesselFactor) {
  // Two samples of one value per channel, one on each rank: local counts of 1 have no unbiased
  // variance, the global count of 2 does.
  Problem p = MakeProblem({2, 3}, Layout::kChannelsFirst, 3);
  const Outputs o = RunSync(p, {1, 1}, SyncMode::kReproducible, Backend::kAuto, false, 1.0);
  for (int64_t c = 0; c < 3; ++c) {
    const double a = p.x[static_cast<size_t>(c)], b = p.x[static_cast<size_t>(3 + c)];
    const double unbiased = (a - b) * (a - b) / 2.0;  // sum of squares / (n - 1), n = 2
    EXPECT_NEAR(o.running_var[static_cast<size_t>(c)], unbiased, 1e-6 * (1 + unbiased));
    EXPECT_NEAR(o.running_mean[static_cast<size_t>(c)], (a + b) / 2, 1e-6);
  }
}

TEST(SyncBatchNorm, CumulativeAverageMatchesTheGlobalBatch) {
  const Problem p = MakeProblem({7, 4, 5}, Layout::kChannelsFirst, 5);
  const Outputs reference = RunPlain(p, Backend::kReference, std::nullopt);
  const Outputs o = RunSync(p, {2, 5}, SyncMode::kReproducible, Backend::kAuto, false, std::nullopt);
  ExpectClose(o, reference, 2e-5, "momentum none");
  EXPECT_EQ(o.num_batches_tracked, 1);
}

// Runs fn on k ranks and returns every rank's status.
std::vector<Status> RunEach(int k, const std::function<Status(Communicator&)>& fn) {
  std::unique_ptr<InProcessGroup> group;
  EXPECT_TRUE(InProcessGroup::create(k, &group, 10.0).ok());
  std::vector<Status> out(static_cast<size_t>(k));
  std::mutex mu;
  (void)group->run([&](Communicator& comm) {
    Status s = fn(comm);
    std::lock_guard<std::mutex> lock(mu);
    out[static_cast<size_t>(comm.rank())] = s;
    return Status();
  });
  return out;
}

TEST(SyncBatchNorm, BadInputOnOneRankFailsEveryRankAndWritesNothing) {
  const Problem p = MakeProblem({6, 3, 4}, Layout::kChannelsFirst, 9);
  struct Fault {
    const char* what;
    const char* bad_rank_says;
    const char* others_say;
  };
  for (const Fault& fault :
       {Fault{"eps", "eps", "rank 1 failed"}, Fault{"channels", "differs between ranks", ""},
        Fault{"running_var", "hash of the running statistics", ""},
        Fault{"nan", "nan at index", "rank 1 failed"}, Fault{"momentum", "momentum", ""}}) {
    SCOPED_TRACE(fault.what);
    std::vector<std::vector<float>> ys(3), rms(3), rvs(3);
    const std::vector<Status> statuses = RunEach(3, [&](Communicator& comm) {
      const int r = comm.rank();
      const bool bad = r == 1;
      std::vector<float> x(p.x.begin() + r * 2 * 12, p.x.begin() + (r + 1) * 2 * 12);
      std::vector<int64_t> dims = {2, 3, 4};
      if (bad && std::string(fault.what) == "channels") dims = {2, 2, 6};
      if (bad && std::string(fault.what) == "nan") x[5] = NAN;
      ys[r].assign(x.size(), 42.0f);
      rms[r] = p.running_mean;
      rvs[r] = p.running_var;
      if (bad && std::string(fault.what) == "running_var") rvs[r][0] += 1.0f;
      const std::vector<float> rv_before = rvs[r];
      bnorm::ForwardTrainArgs f;
      f.x = bnorm::ConstTensorView(x.data(), dims);
      std::vector<float> weight(static_cast<size_t>(dims[1]), 1.0f);
      std::vector<float> rm(rms[r].begin(), rms[r].begin() + dims[1]);
      std::vector<float> rv(rvs[r].begin(), rvs[r].begin() + dims[1]);
      f.weight = weight;
      f.running_mean = rm;
      f.running_var = rv;
      f.eps = bad && std::string(fault.what) == "eps" ? -1.0 : 1e-5;
      f.momentum = bad && std::string(fault.what) == "momentum" ? 0.2 : 0.1;
      f.y = bnorm::TensorView(ys[r].data(), dims);
      bnorm::CallOptions options;
      options.check_finite = true;
      Status s = bnorm::sync_forward_train(comm, f, options);
      if (!s.ok()) {
        for (float v : ys[r])
          if (v != 42.0f) return Status::internal("y was written by a failed call");
        for (size_t c = 0; c < rv.size(); ++c)
          if (rv[c] != rv_before[c] || rm[c] != rms[r][c])
            return Status::internal("running statistics were written by a failed call");
      }
      return s;
    });
    for (int r = 0; r < 3; ++r) {
      const Status& s = statuses[static_cast<size_t>(r)];
      ASSERT_FALSE(s.ok()) << "rank " << r;
      EXPECT_EQ(s.message().find("written by a failed call"), std::string::npos) << s.message();
      const char* expected = r == 1 ? fault.bad_rank_says : fault.others_say;
      EXPECT_NE(s.message().find(expected), std::string::npos)
          << "rank " << r << ": " << s.message();
    }
  }
}

TEST(SyncBatchNorm, OneValuePerChannelOverAllRanksIsAnError) {
  const std::vector<Status> statuses = RunEach(2, [&](Communicator& comm) {
    std::vector<float> x = {1, 2, 3}, y(3);
    const int64_t n = comm.rank() == 0 ? 1 : 0;
    bnorm::ForwardTrainArgs f;
    f.x = bnorm::ConstTensorView(n ? x.data() : nullptr, {n, 3});
    f.y = bnorm::TensorView(n ? y.data() : nullptr, {n, 3});
    return bnorm::sync_forward_train(comm, f);
  });
  for (const Status& s : statuses) {
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.message().find("Expected more than 1 value per channel"), std::string::npos)
        << s.message();
  }
}

// The extensions (ghost batch norm, batch renorm, the stateless update) are not implemented in
// synchronized batch norm: refused on every rank, naming the extension, nothing written.
TEST(SyncBatchNorm, ExtensionsAreRefused) {
  for (int which = 0; which < 4; ++which) {
    SCOPED_TRACE("extension " + std::to_string(which));
    const char* names[] = {"ghost_batch", "batch_renorm", "running_mean_out", "renorm_r"};
    const std::vector<Status> statuses = RunEach(2, [&](Communicator& comm) -> Status {
      std::vector<float> x = {1, 2, 3, 4, 5, 6, 7, 8}, y(8, -1.0f), rm(2, 0.0f), rv(2, 1.0f);
      std::vector<float> out_m(2, -1.0f), out_v(2, -1.0f), sm(2, 0.0f), si(2, 1.0f);
      const std::vector<float> y0 = y, rm0 = rm;
      Status s;
      if (which < 3) {
        bnorm::ForwardTrainArgs f;
        f.x = bnorm::ConstTensorView(x.data(), {4, 2});
        f.y = bnorm::TensorView(y.data(), {4, 2});
        f.running_mean = rm;
        f.running_var = rv;
        if (which == 0) f.ghost_batch = 2;
        if (which == 1) f.batch_renorm = true;
        if (which == 2) {
          f.running_mean_out = out_m;
          f.running_var_out = out_v;
        }
        s = bnorm::sync_forward_train(comm, f);
      } else {
        bnorm::BackwardArgs b;
        b.dy = bnorm::ConstTensorView(x.data(), {4, 2});
        b.x = bnorm::ConstTensorView(x.data(), {4, 2});
        b.save_mean = sm;
        b.save_invstd = si;
        b.renorm_r = si;
        b.renorm_d = sm;
        b.dx = bnorm::TensorView(y.data(), {4, 2});
        s = bnorm::sync_backward(comm, b);
      }
      if (y != y0 || rm != rm0 || out_m[0] != -1.0f) return Status::internal("something written");
      return s;
    });
    for (const Status& s : statuses) {
      ASSERT_FALSE(s.ok());
      EXPECT_NE(s.message().find("something written"), 0u) << s.message();
      EXPECT_NE(s.message().find(names[which]), std::string::npos) << s.message();
      EXPECT_NE(s.message().find("not supported by synchronized batch norm"), std::string::npos)
          << s.message();
    }
  }
}

TEST(SyncBatchNorm, EvalModeBackwardIsRejected) {
  const std::vector<Status> statuses = RunEach(2, [&](Communicator& comm) {
    std::vector<float> x(6, 1.0f), dy(6, 1.0f), dx(6), rm(3, 0.0f), rv(3, 1.0f);
    bnorm::BackwardArgs b;
    b.dy = bnorm::ConstTensorView(dy.data(), {2, 3});
    b.x = bnorm::ConstTensorView(x.data(), {2, 3});
    b.training = false;
    b.running_mean = rm;
    b.running_var = rv;
    b.dx = bnorm::TensorView(dx.data(), {2, 3});
    return bnorm::sync_backward(comm, b);
  });
  for (const Status& s : statuses) EXPECT_FALSE(s.ok());
  EXPECT_NE(statuses[0].message().find("training"), std::string::npos) << statuses[0].message();
}

// The layer: K ranks' layers with set_sync follow one layer on the global batch over several
// steps, with gradients of the global batch accumulated identically on every rank.
TEST(SyncBatchNorm, LayerFollowsTheGlobalBatch) {
  const std::vector<int64_t> dims = {9, 4, 5, 5};
  const int64_t sample = 4 * 25;
  const std::vector<int64_t> split = {4, 1, 4};
  constexpr int kSteps = 3;
  std::vector<Problem> problems;
  for (int step = 0; step < kSteps; ++step)
    problems.push_back(MakeProblem(dims, Layout::kChannelsLast, 100 + step));

  bnorm::BatchNormOptions options;
  options.num_features = 4;
  bnorm::BatchNorm single;
  ASSERT_TRUE(bnorm::BatchNorm::create(options, &single).ok());
  std::vector<float> y_single(problems[0].x.size()), dx_single(problems[0].x.size());
  for (const Problem& p : problems) {
    ASSERT_TRUE(single.forward(bnorm::ConstTensorView(p.x.data(), dims, p.layout),
                               bnorm::TensorView(y_single.data(), dims, p.layout))
                    .ok());
    ASSERT_TRUE(single.backward(bnorm::ConstTensorView(p.dy.data(), dims, p.layout),
                                bnorm::ConstTensorView(p.x.data(), dims, p.layout),
                                bnorm::TensorView(dx_single.data(), dims, p.layout))
                    .ok());
  }

  for (bool give_split : {false, true}) {
  SCOPED_TRACE(give_split ? "split given" : "split exchanged");
  std::unique_ptr<InProcessGroup> group;
  ASSERT_TRUE(InProcessGroup::create(3, &group).ok());
  std::vector<float> y(problems[0].x.size()), dx(problems[0].x.size());
  std::vector<std::vector<float>> state(3);
  const Status s = group->run([&](Communicator& comm) -> Status {
    const int r = comm.rank();
    int64_t offset = 0;
    for (int i = 0; i < r; ++i) offset += split[static_cast<size_t>(i)];
    const std::vector<int64_t> local = WithBatch(dims, split[static_cast<size_t>(r)]);
    bnorm::BatchNorm layer;
    BNORM_RETURN_IF_ERROR(bnorm::BatchNorm::create(options, &layer));
    layer.set_sync(&comm, SyncMode::kReproducible);
    if (give_split) layer.set_sync_split(split);  // every rank, or none
    for (const Problem& p : problems) {
      const float* x = p.x.data() + offset * sample;
      BNORM_RETURN_IF_ERROR(layer.forward(bnorm::ConstTensorView(x, local, p.layout),
                                          bnorm::TensorView(y.data() + offset * sample, local,
                                                            p.layout)));
      BNORM_RETURN_IF_ERROR(layer.backward(
          bnorm::ConstTensorView(p.dy.data() + offset * sample, local, p.layout),
          bnorm::ConstTensorView(x, local, p.layout),
          bnorm::TensorView(dx.data() + offset * sample, local, p.layout)));
    }
    std::vector<float>& out = state[static_cast<size_t>(r)];
    for (auto span : {layer.weight_grad(), layer.bias_grad(), layer.running_mean(),
                      layer.running_var()})
      out.insert(out.end(), span.begin(), span.end());
    out.push_back(static_cast<float>(layer.num_batches_tracked()));
    return Status();
  });
  ASSERT_TRUE(s.ok()) << s.to_string();
  ExpectBitwiseEqual(state[0], state[1], "rank 0 vs 1 layer state");
  ExpectBitwiseEqual(state[0], state[2], "rank 0 vs 2 layer state");
  std::vector<float> expected;
  for (auto span : {single.weight_grad(), single.bias_grad(), single.running_mean(),
                    single.running_var()})
    expected.insert(expected.end(), span.begin(), span.end());
  expected.push_back(static_cast<float>(single.num_batches_tracked()));
  ExpectClose(state[0], expected, 1e-4, "layer state vs one layer on the global batch");
  ExpectClose(y, y_single, 2e-5, "last y");
  ExpectClose(dx, dx_single, 2e-5, "last dx");
  }
}

}  // namespace

namespace {

// bf16 parts: every output is the fp32 synchronized pass's on the widened values, the tensors
// rounded once to nearest even (the partials are fp64 whatever the dtype).
TEST(SyncBatchNorm, Bfloat16PartsGiveTheFp32PassRoundedOnce) {
  const std::vector<int64_t> dims = {9, 6, 4, 5};
  const int64_t sample = 6 * 20;
  const std::vector<int64_t> split = {4, 0, 5};
  for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast}) {
    SCOPED_TRACE(layout == Layout::kChannelsFirst ? "channels_first" : "channels_last");
    Problem p = MakeProblem(dims, layout, 1605);
    std::vector<bnorm::bfloat16> x16(p.x.size()), dy16(p.dy.size());
    for (size_t k = 0; k < p.x.size(); ++k) {
      x16[k] = bnorm::to_bfloat16(p.x[k]);
      p.x[k] = bnorm::to_float(x16[k]);
      dy16[k] = bnorm::to_bfloat16(p.dy[k]);
      p.dy[k] = bnorm::to_float(dy16[k]);
    }
    std::vector<bnorm::bfloat16> y16(p.x.size()), dx16(p.x.size());
    std::vector<float> y32(p.x.size()), dx32(p.x.size());
    std::vector<std::vector<float>> out16(3), out32(3);
    for (bool half : {true, false}) {
      std::unique_ptr<InProcessGroup> group;
      ASSERT_TRUE(InProcessGroup::create(3, &group).ok());
      const Status s = group->run([&](Communicator& comm) -> Status {
        const int r = comm.rank();
        int64_t offset = 0;
        for (int i = 0; i < r; ++i) offset += split[static_cast<size_t>(i)];
        const std::vector<int64_t> local = WithBatch(dims, split[static_cast<size_t>(r)]);
        const int64_t at = offset * sample;
        std::vector<float> rm = p.running_mean, rv = p.running_var, sm(6), si(6), dw(6), db(6);
        bnorm::ForwardTrainArgs a;
        a.weight = p.weight;
        a.bias = p.bias;
        a.running_mean = rm;
        a.running_var = rv;
        a.save_mean = sm;
        a.save_invstd = si;
        bnorm::BackwardArgs g;
        g.weight = p.weight;
        g.save_mean = sm;
        g.save_invstd = si;
        g.dweight = dw;
        g.dbias = db;
        if (half) {
          a.x = bnorm::ConstTensorView(x16.data() + at, local, layout);
          a.y = bnorm::TensorView(y16.data() + at, local, layout);
          g.dy = bnorm::ConstTensorView(dy16.data() + at, local, layout);
          g.x = a.x;
          g.dx = bnorm::TensorView(dx16.data() + at, local, layout);
        } else {
          a.x = bnorm::ConstTensorView(p.x.data() + at, local, layout);
          a.y = bnorm::TensorView(y32.data() + at, local, layout);
          g.dy = bnorm::ConstTensorView(p.dy.data() + at, local, layout);
          g.x = a.x;
          g.dx = bnorm::TensorView(dx32.data() + at, local, layout);
        }
        BNORM_RETURN_IF_ERROR(bnorm::sync_forward_train(comm, a));
        BNORM_RETURN_IF_ERROR(bnorm::sync_backward(comm, g));
        std::vector<float>& out = (half ? out16 : out32)[static_cast<size_t>(r)];
        for (const auto* v : {&rm, &rv, &sm, &si, &dw, &db}) out.insert(out.end(), v->begin(), v->end());
        return Status();
      });
      ASSERT_TRUE(s.ok()) << s.to_string();
    }
    for (size_t k = 0; k < y16.size(); ++k) {
      ASSERT_EQ(y16[k].bits, bnorm::to_bfloat16(y32[k]).bits) << "y at " << k;
      ASSERT_EQ(dx16[k].bits, bnorm::to_bfloat16(dx32[k]).bits) << "dx at " << k;
    }
    for (size_t r = 0; r < 3; ++r)
      ASSERT_EQ(0, std::memcmp(out16[r].data(), out32[r].data(), out16[r].size() * sizeof(float)))
          << "statistics or parameter gradients of rank " << r;
  }
}

}  // namespace
