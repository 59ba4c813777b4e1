// The C API's synchronized batch norm (bnorm_sync_forward_train / bnorm_sync_backward) over a
// bnorm_comm whose callback all-reduces on an in-process group: bitwise the C++ sync path for
// both modes, layouts and uneven splits (empty ranks included), dweight/dbias local or global,
// callback failures and collective argument errors that write nothing, invalid communicators.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/c_api.h"
#include "bnorm/comm.h"

namespace {

using bnorm::Communicator;
using bnorm::InProcessGroup;
using bnorm::Layout;
using bnorm::Status;
using bnorm::SyncMode;

// A problem over the global batch: (n, c, s) in one layout.
struct Problem {
  int64_t n = 0, c = 0, s = 0;
  Layout layout = Layout::kChannelsFirst;
  std::vector<float> x, dy, weight, bias, running_mean, running_var;
  int64_t sample() const { return c * s; }
};

Problem MakeProblem(int64_t n, int64_t c, int64_t s, Layout layout, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  Problem p;
  p.n = n;
  p.c = c;
  p.s = s;
  p.layout = layout;
  for (int64_t i = 0; i < n * c * s; ++i) {
    p.x.push_back(static_cast<float>(-2.0 + 3.0 * normal(rng)));
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

// One rank's per-channel outputs; y and dx are gathered over the global batch.
struct RankOutputs {
  std::vector<float> save_mean, save_invstd, running_mean, running_var, dweight, dbias;
  int64_t num_batches_tracked = 0;
  std::vector<int64_t> split_out;
  int forward_rc = -1, backward_rc = -1;
  std::string error;
};

struct PassRun {
  std::vector<float> y, dx;
  std::vector<RankOutputs> ranks;
};

// The bnorm_comm callback: ctx is the rank's Communicator of an in-process group.
int AllreduceOnGroup(void* ctx, double* data, int64_t count) {
  auto* comm = static_cast<Communicator*>(ctx);
  return comm->allreduce_sum(std::span<double>(data, static_cast<size_t>(count))).ok() ? 0 : 1;
}

bnorm_comm CommOf(Communicator& comm) {
  bnorm_comm c;
  c.ctx = &comm;
  c.rank = comm.rank();
  c.size = comm.size();
  c.allreduce_sum_f64 = &AllreduceOnGroup;
  return c;
}

bnorm_layout CLayout(Layout l) {
  return l == Layout::kChannelsLast ? BNORM_CHANNELS_LAST : BNORM_CHANNELS_FIRST;
}

int64_t Offset(const std::vector<int64_t>& split, int r) {
  int64_t o = 0;
  for (int i = 0; i < r; ++i) o += split[static_cast<size_t>(i)];
  return o;
}

void Prepare(const Problem& p, RankOutputs* o) {
  const size_t c = static_cast<size_t>(p.c);
  o->save_mean.assign(c, -1.0f);
  o->save_invstd.assign(c, -1.0f);
  o->running_mean = p.running_mean;
  o->running_var = p.running_var;
  o->dweight.assign(c, -1.0f);
  o->dbias.assign(c, -1.0f);
}

// Forward and backward through the C API, rank r holding split[r] consecutive samples.
PassRun RunC(const Problem& p, const std::vector<int64_t>& split, int mode, bool give_split,
         bool local_grads) {
  const int k = static_cast<int>(split.size());
  std::unique_ptr<InProcessGroup> group;
  EXPECT_TRUE(InProcessGroup::create(k, &group, 20.0).ok());
  PassRun run;
  run.y.assign(p.x.size(), NAN);
  run.dx.assign(p.x.size(), NAN);
  run.ranks.resize(static_cast<size_t>(k));
  const Status s = group->run([&](Communicator& comm) -> Status {
    const int r = comm.rank();
    const int64_t n = split[static_cast<size_t>(r)];
    const int64_t begin = Offset(split, r) * p.sample();
    RankOutputs& o = run.ranks[static_cast<size_t>(r)];
    Prepare(p, &o);
    o.split_out.assign(static_cast<size_t>(k), -1);
    const bnorm_comm c = CommOf(comm);
    bnorm_sync_options options{};
    options.mode = mode;
    options.split = give_split ? split.data() : nullptr;
    options.split_out = o.split_out.data();
    const float* x = n > 0 ? p.x.data() + begin : nullptr;
    o.forward_rc = bnorm_sync_forward_train(
        &c, &options, CLayout(p.layout), n, p.c, p.s, x, p.weight.data(), p.bias.data(),
        o.running_mean.data(), o.running_var.data(), &o.num_batches_tracked, 0.1, 1e-5,
        n > 0 ? run.y.data() + begin : nullptr, o.save_mean.data(), o.save_invstd.data());
    if (o.forward_rc != BNORM_OK) {
      o.error = bnorm_last_error();
      return Status();
    }
    bnorm_sync_options back{};
    back.mode = mode;
    back.split = o.split_out.data();
    back.local_weight_grads = local_grads ? 1 : 0;
    o.backward_rc = bnorm_sync_backward(
        &c, &back, CLayout(p.layout), n, p.c, p.s, n > 0 ? p.dy.data() + begin : nullptr, x,
        p.weight.data(), o.save_mean.data(), o.save_invstd.data(),
        n > 0 ? run.dx.data() + begin : nullptr, o.dweight.data(), o.dbias.data());
    if (o.backward_rc != BNORM_OK) o.error = bnorm_last_error();
    return Status();
  });
  EXPECT_TRUE(s.ok()) << s.to_string();
  return run;
}

// The same through the C++ API (bnorm::sync_forward_train / sync_backward).
PassRun RunCpp(const Problem& p, const std::vector<int64_t>& split, SyncMode mode, bool local_grads) {
  const int k = static_cast<int>(split.size());
  std::unique_ptr<InProcessGroup> group;
  EXPECT_TRUE(InProcessGroup::create(k, &group, 20.0).ok());
  PassRun run;
  run.y.assign(p.x.size(), NAN);
  run.dx.assign(p.x.size(), NAN);
  run.ranks.resize(static_cast<size_t>(k));
  const Status s = group->run([&](Communicator& comm) -> Status {
    const int r = comm.rank();
    const int64_t n = split[static_cast<size_t>(r)];
    const int64_t begin = Offset(split, r) * p.sample();
    RankOutputs& o = run.ranks[static_cast<size_t>(r)];
    Prepare(p, &o);
    const std::vector<int64_t> dims =
        p.s == 1 ? std::vector<int64_t>{n, p.c} : std::vector<int64_t>{n, p.c, p.s};
    bnorm::ForwardTrainArgs f;
    f.x = bnorm::ConstTensorView(n > 0 ? p.x.data() + begin : nullptr, dims, p.layout);
    f.weight = p.weight;
    f.bias = p.bias;
    f.running_mean = o.running_mean;
    f.running_var = o.running_var;
    f.num_batches_tracked = &o.num_batches_tracked;
    f.momentum = 0.1;
    f.eps = 1e-5;
    f.y = bnorm::TensorView(n > 0 ? run.y.data() + begin : nullptr, dims, p.layout);
    f.save_mean = o.save_mean;
    f.save_invstd = o.save_invstd;
    bnorm::SyncOptions sync;
    sync.mode = mode;
    sync.split_out = &o.split_out;
    BNORM_RETURN_IF_ERROR(bnorm::sync_forward_train(comm, f, {}, sync));
    bnorm::BackwardArgs b;
    b.dy = bnorm::ConstTensorView(n > 0 ? p.dy.data() + begin : nullptr, dims, p.layout);
    b.x = f.x;
    b.weight = p.weight;
    b.save_mean = o.save_mean;
    b.save_invstd = o.save_invstd;
    b.dx = bnorm::TensorView(n > 0 ? run.dx.data() + begin : nullptr, dims, p.layout);
    b.dweight = o.dweight;
    b.dbias = o.dbias;
    bnorm::SyncOptions back;
    back.mode = mode;
    back.split = o.split_out;
    back.local_weight_grads = local_grads;
    return bnorm::sync_backward(comm, b, {}, back);
  });
  EXPECT_TRUE(s.ok()) << s.to_string();
  return run;
}

void ExpectBitwise(const std::vector<float>& a, const std::vector<float>& b,
                   const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i)
    ASSERT_EQ(std::memcmp(&a[i], &b[i], sizeof(float)), 0)
        << what << "[" << i << "]: " << a[i] << " vs " << b[i];
}

void ExpectRankBitwise(const RankOutputs& a, const RankOutputs& b, const std::string& what,
                       bool weight_grads = true) {
  ExpectBitwise(a.save_mean, b.save_mean, what + " save_mean");
  ExpectBitwise(a.save_invstd, b.save_invstd, what + " save_invstd");
  ExpectBitwise(a.running_mean, b.running_mean, what + " running_mean");
  ExpectBitwise(a.running_var, b.running_var, what + " running_var");
  if (weight_grads) {
    ExpectBitwise(a.dweight, b.dweight, what + " dweight");
    ExpectBitwise(a.dbias, b.dbias, what + " dbias");
  }
  EXPECT_EQ(a.num_batches_tracked, b.num_batches_tracked) << what;
}

std::string Name(const std::vector<int64_t>& split) {
  std::string s = "split {";
  for (int64_t n : split) s += " " + std::to_string(n);
  return s + " }";
}

struct Case {
  int64_t n, c, s;
  Layout layout;
};

class SyncCApiTest : public ::testing::TestWithParam<Case> {};

TEST_P(SyncCApiTest, EqualsTheCppSyncPathBitwise) {
  const Case& k = GetParam();
  const Problem p = MakeProblem(k.n, k.c, k.s, k.layout, 21);
  const std::vector<std::vector<int64_t>> splits = {
      {k.n}, {k.n / 2, k.n - k.n / 2}, {1, k.n - 3, 2}, {0, k.n - 1, 1}};
  for (int mode : {BNORM_SYNC_REPRODUCIBLE, BNORM_SYNC_PER_RANK}) {
    for (const auto& split : splits) {
      for (bool local : {false, true}) {
        const std::string name = Name(split) + (mode == 0 ? " reproducible" : " per-rank") +
                                 (local ? " local grads" : " global grads");
        SCOPED_TRACE(name);
        const PassRun cpp = RunCpp(p, split, static_cast<SyncMode>(mode), local);
        for (bool give : {false, true}) {
          const PassRun c = RunC(p, split, mode, give, local);
          for (size_t r = 0; r < split.size(); ++r) {
            ASSERT_EQ(c.ranks[r].forward_rc, BNORM_OK) << c.ranks[r].error;
            ASSERT_EQ(c.ranks[r].backward_rc, BNORM_OK) << c.ranks[r].error;
            EXPECT_EQ(c.ranks[r].split_out, split);
            ExpectRankBitwise(c.ranks[r], cpp.ranks[r], "rank " + std::to_string(r));
          }
          ExpectBitwise(c.y, cpp.y, "y");
          ExpectBitwise(c.dx, cpp.dx, "dx");
        }
      }
    }
  }
}

// Local parts: with one rank they are the global sums; the per-rank parts sum to the global
// sums; dx and everything else does not change; a rank without samples gets zeros.
TEST_P(SyncCApiTest, LocalWeightGradsArePartsOfTheGlobalSums) {
  const Case& k = GetParam();
  const Problem p = MakeProblem(k.n, k.c, k.s, k.layout, 33);
  const PassRun one_global = RunC(p, {k.n}, BNORM_SYNC_REPRODUCIBLE, false, false);
  const PassRun one_local = RunC(p, {k.n}, BNORM_SYNC_REPRODUCIBLE, false, true);
  ExpectRankBitwise(one_local.ranks[0], one_global.ranks[0], "one rank: local = global");
  for (int mode : {BNORM_SYNC_REPRODUCIBLE, BNORM_SYNC_PER_RANK}) {
    const std::vector<int64_t> split = {2, 0, k.n - 3, 1};
    SCOPED_TRACE(Name(split) + (mode == 0 ? " reproducible" : " per-rank"));
    const PassRun global = RunC(p, split, mode, true, false);
    const PassRun local = RunC(p, split, mode, true, true);
    ExpectBitwise(local.dx, global.dx, "dx with local grads");
    if (mode == BNORM_SYNC_REPRODUCIBLE) ExpectBitwise(local.dx, one_global.dx, "dx vs 1 rank");
    for (int64_t c = 0; c < p.c; ++c) {
      const size_t ci = static_cast<size_t>(c);
      // Each part against its fp64 sum over the rank's own samples, and the parts' sum against
      // the global value: float roundings of sums of sum|terms|, a few units of 2^-24 each.
      double sum_w = 0, sum_b = 0, scale_w = 0, scale_b = 0;
      for (size_t r = 0; r < split.size(); ++r) {
        const RankOutputs& o = local.ranks[r];
        ASSERT_EQ(o.backward_rc, BNORM_OK) << o.error;
        double w = 0, b = 0, sw = 0, sb = 0;
        const int64_t begin = Offset(split, static_cast<int>(r));
        for (int64_t i = begin; i < begin + split[r]; ++i)
          for (int64_t j = 0; j < p.s; ++j) {
            const size_t at = static_cast<size_t>(
                p.layout == Layout::kChannelsFirst ? (i * p.c + c) * p.s + j
                                                   : (i * p.s + j) * p.c + c);
            const double xhat = (static_cast<double>(p.x[at]) - o.save_mean[ci]) *
                                static_cast<double>(o.save_invstd[ci]);
            w += p.dy[at] * xhat;
            b += p.dy[at];
            sw += std::abs(p.dy[at] * xhat);
            sb += std::abs(p.dy[at]);
          }
        if (split[r] == 0) {
          EXPECT_EQ(o.dweight[ci], 0.0f) << "a rank without samples";
          EXPECT_EQ(o.dbias[ci], 0.0f) << "a rank without samples";
        }
        EXPECT_NEAR(o.dweight[ci], w, 1e-5 * (1 + sw)) << "rank " << r << " channel " << c;
        EXPECT_NEAR(o.dbias[ci], b, 1e-5 * (1 + sb)) << "rank " << r << " channel " << c;
        sum_w += o.dweight[ci];
        sum_b += o.dbias[ci];
        scale_w += sw;
        scale_b += sb;
      }
      const RankOutputs& g = global.ranks[0];
      EXPECT_NEAR(sum_w, g.dweight[ci], 1e-5 * (1 + scale_w)) << "channel " << c;
      EXPECT_NEAR(sum_b, g.dbias[ci], 1e-5 * (1 + scale_b)) << "channel " << c;
      // The local parts differ from rank to rank (else the option would do nothing).
      EXPECT_NE(local.ranks[0].dbias[ci], g.dbias[ci]) << "channel " << c;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, SyncCApiTest,
                         ::testing::Values(Case{7, 3, 1, Layout::kChannelsFirst},
                                           Case{9, 4, 6, Layout::kChannelsFirst},
                                           Case{9, 5, 6, Layout::kChannelsLast},
                                           Case{6, 16, 20, Layout::kChannelsLast}));

TEST(SyncCApi, OneRankWithoutCallbackNeedsNoExchange) {
  const Problem p = MakeProblem(5, 3, 4, Layout::kChannelsFirst, 5);
  const PassRun with = RunC(p, {5}, BNORM_SYNC_REPRODUCIBLE, false, false);
  RankOutputs o;
  Prepare(p, &o);
  std::vector<float> y(p.x.size()), dx(p.x.size());
  const bnorm_comm solo{nullptr, 0, 1, nullptr};
  ASSERT_EQ(bnorm_sync_forward_train(&solo, nullptr, BNORM_CHANNELS_FIRST, 5, 3, 4, p.x.data(),
                                     p.weight.data(), p.bias.data(), o.running_mean.data(),
                                     o.running_var.data(), &o.num_batches_tracked, 0.1, 1e-5,
                                     y.data(), o.save_mean.data(), o.save_invstd.data()),
            BNORM_OK)
      << bnorm_last_error();
  ASSERT_EQ(bnorm_sync_backward(&solo, nullptr, BNORM_CHANNELS_FIRST, 5, 3, 4, p.dy.data(),
                                p.x.data(), p.weight.data(), o.save_mean.data(),
                                o.save_invstd.data(), dx.data(), o.dweight.data(),
                                o.dbias.data()),
            BNORM_OK)
      << bnorm_last_error();
  ExpectRankBitwise(o, with.ranks[0], "no callback vs a 1-rank group");
  ExpectBitwise(y, with.y, "y");
  ExpectBitwise(dx, with.dx, "dx");
}

// A rank without samples may give either layout (an empty tensor has no memory order); the
// others must agree.
TEST(SyncCApi, AnEmptyRanksLayoutDoesNotMatter) {
  const Problem p = MakeProblem(6, 3, 4, Layout::kChannelsLast, 12);
  const PassRun want = RunC(p, {6}, BNORM_SYNC_REPRODUCIBLE, false, false);
  for (int mode : {BNORM_SYNC_REPRODUCIBLE, BNORM_SYNC_PER_RANK}) {
    std::unique_ptr<InProcessGroup> group;
    ASSERT_TRUE(InProcessGroup::create(2, &group, 20.0).ok());
    std::vector<float> y(p.x.size()), dx(p.x.size());
    std::vector<RankOutputs> out(2);
    const Status s = group->run([&](Communicator& comm) -> Status {
      const int r = comm.rank();
      RankOutputs& o = out[static_cast<size_t>(r)];
      Prepare(p, &o);
      const bnorm_comm c = CommOf(comm);
      bnorm_sync_options options{};
      options.mode = mode;
      const int64_t n = r == 0 ? 0 : 6;
      const bnorm_layout layout = r == 0 ? BNORM_CHANNELS_FIRST : BNORM_CHANNELS_LAST;
      const float* x = n ? p.x.data() : nullptr;
      if (bnorm_sync_forward_train(&c, &options, layout, n, p.c, p.s, x, p.weight.data(),
                                   p.bias.data(), o.running_mean.data(), o.running_var.data(),
                                   &o.num_batches_tracked, 0.1, 1e-5, n ? y.data() : nullptr,
                                   o.save_mean.data(), o.save_invstd.data()) != BNORM_OK)
        return Status::internal(bnorm_last_error());
      if (bnorm_sync_backward(&c, &options, layout, n, p.c, p.s, n ? p.dy.data() : nullptr, x,
                              p.weight.data(), o.save_mean.data(), o.save_invstd.data(),
                              n ? dx.data() : nullptr, o.dweight.data(), o.dbias.data()) !=
          BNORM_OK)
        return Status::internal(bnorm_last_error());
      return Status();
    });
    ASSERT_TRUE(s.ok()) << s.to_string();
    if (mode == BNORM_SYNC_REPRODUCIBLE) {
      ExpectRankBitwise(out[0], want.ranks[0], "empty rank 0");
      ExpectRankBitwise(out[1], want.ranks[0], "rank 1");
      ExpectBitwise(y, want.y, "y");
      ExpectBitwise(dx, want.dx, "dx");
    }
  }
}

TEST(SyncCApi, InvalidCommunicatorIsRefusedLocally) {
  float x[4] = {1, 2, 3, 4}, y[4] = {7, 7, 7, 7};
  auto fn = [](void*, double*, int64_t) { return 0; };
  struct Bad {
    bnorm_comm comm;
    const char* says;
  };
  for (const Bad& bad : {Bad{{nullptr, 0, 0, fn}, "size must be >= 1, got 0"},
                         Bad{{nullptr, 2, 2, fn}, "rank must be in [0, 2), got 2"},
                         Bad{{nullptr, -1, 2, fn}, "rank must be in [0, 2), got -1"},
                         Bad{{nullptr, 0, 2, nullptr}, "allreduce_sum_f64 is NULL"}}) {
    EXPECT_EQ(bnorm_sync_forward_train(&bad.comm, nullptr, BNORM_CHANNELS_FIRST, 2, 2, 1, x,
                                       nullptr, nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5, y,
                                       nullptr, nullptr),
              BNORM_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(bnorm_last_error()).find(bad.says), std::string::npos)
        << bnorm_last_error();
  }
  EXPECT_EQ(bnorm_sync_backward(nullptr, nullptr, BNORM_CHANNELS_FIRST, 2, 2, 1, x, x, nullptr,
                                x, x, y, nullptr, nullptr),
            BNORM_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(bnorm_last_error()).find("comm: is NULL"), std::string::npos);
  for (float v : y) EXPECT_EQ(v, 7.0f) << "nothing written";
}

// What each rank saw of a run where something went wrong.
struct Outcome {
  int rc = 0;
  std::string error;
  bool untouched = false;
};

// A forward and (when the forward succeeds everywhere) a backward on 3 ranks, where fault(r,
// pass) may change rank r's callback or arguments; every output checked untouched on failure.
struct Faults {
  bool (*callback_fails)(int rank, const char* pass) = nullptr;
  int bad_rank = -1;
  std::string bad_argument;  // "n", "x", "c", "save_mean", "dtype" (3, fp64, in the forward)
};

struct FailingCtx {
  Communicator* comm;
  bool fail;
};

int MaybeFailingAllreduce(void* ctx, double* data, int64_t count) {
  auto* f = static_cast<FailingCtx*>(ctx);
  if (f->fail) {
    // An engine whose collective fails on one rank fails it on the others too (gloo at a dead
    // peer or a timeout): abort the group so that they do not wait.
    f->comm->abort("injected callback failure", 1);
    return 7;
  }
  return AllreduceOnGroup(f->comm, data, count);
}

std::vector<Outcome> RunFaulty(const Problem& p, const std::vector<int64_t>& split,
                               const Faults& faults, bool give_split, const char* failing_pass) {
  const int k = static_cast<int>(split.size());
  std::unique_ptr<InProcessGroup> group;
  EXPECT_TRUE(InProcessGroup::create(k, &group, 20.0).ok());
  std::vector<Outcome> out(static_cast<size_t>(k));
  std::vector<float> y(p.x.size(), 42.0f), dx(p.x.size(), 43.0f);
  (void)group->run([&](Communicator& comm) -> Status {
    const int r = comm.rank();
    const int64_t n = split[static_cast<size_t>(r)];
    const int64_t begin = Offset(split, r) * p.sample();
    RankOutputs o;
    Prepare(p, &o);
    FailingCtx ctx{&comm, false};
    const bnorm_comm c{&ctx, r, k, &MaybeFailingAllreduce};
    const bool bad = r == faults.bad_rank;
    bnorm_sync_options options{};
    options.split = give_split ? split.data() : nullptr;
    std::vector<int64_t> used(static_cast<size_t>(k), -1);
    options.split_out = used.data();
    const bnorm_layout layout = CLayout(p.layout);
    // (A layout outside the enum is bad_input_test's: loading one is undefined in C++.)
    const int64_t local_n = bad && faults.bad_argument == "n" ? -2 : n;
    const float* x = n > 0 ? p.x.data() + begin : nullptr;
    const int64_t channels = bad && faults.bad_argument == "c" ? -3 : p.c;
    Outcome& mine = out[static_cast<size_t>(r)];
    ctx.fail = std::strcmp(failing_pass, "forward") == 0 && bad;
    const int dtype = bad && faults.bad_argument == "dtype" ? 3 : BNORM_FLOAT32;
    mine.rc = bnorm_sync_forward_train_dt(
        &c, &options, layout, dtype, local_n, channels, p.s,
        bad && faults.bad_argument == "x" ? nullptr : x, p.weight.data(), p.bias.data(),
        o.running_mean.data(), o.running_var.data(), &o.num_batches_tracked, 0.1, 1e-5,
        n > 0 ? y.data() + begin : nullptr, o.save_mean.data(), o.save_invstd.data());
    if (mine.rc != BNORM_OK) {
      mine.error = bnorm_last_error();
      mine.untouched = o.num_batches_tracked == 0 && o.running_mean == p.running_mean &&
                       o.running_var == p.running_var && o.save_mean[0] == -1.0f &&
                       used[0] == -1;
      for (int64_t i = begin; i < begin + n * p.sample(); ++i)
        mine.untouched = mine.untouched && y[static_cast<size_t>(i)] == 42.0f;
      return Status();
    }
    ctx.fail = std::strcmp(failing_pass, "backward") == 0 && bad;
    bnorm_sync_options back{};
    back.split = give_split ? used.data() : nullptr;
    back.local_weight_grads = 1;
    mine.rc = bnorm_sync_backward(
        &c, &back, layout, n, p.c, p.s, n > 0 ? p.dy.data() + begin : nullptr, x, p.weight.data(),
        bad && faults.bad_argument == "save_mean" ? nullptr : o.save_mean.data(),
        o.save_invstd.data(), n > 0 ? dx.data() + begin : nullptr, o.dweight.data(),
        o.dbias.data());
    if (mine.rc != BNORM_OK) {
      mine.error = bnorm_last_error();
      mine.untouched = o.dweight[0] == -1.0f && o.dbias[0] == -1.0f;
      for (int64_t i = begin; i < begin + n * p.sample(); ++i)
        mine.untouched = mine.untouched && dx[static_cast<size_t>(i)] == 43.0f;
    }
    return Status();
  });
  return out;
}

TEST(SyncCApi, FailingCallbackFailsTheCallAndWritesNothing) {
  const Problem p = MakeProblem(8, 3, 5, Layout::kChannelsLast, 8);
  for (const char* pass : {"forward", "backward"}) {
    for (bool give : {false, true}) {
      SCOPED_TRACE(std::string(pass) + (give ? ", split given" : ", split exchanged"));
      Faults faults;
      faults.bad_rank = 1;
      const std::vector<Outcome> out = RunFaulty(p, {3, 2, 3}, faults, give, pass);
      for (size_t r = 0; r < out.size(); ++r) {
        SCOPED_TRACE("rank " + std::to_string(r));
        ASSERT_NE(out[r].rc, BNORM_OK);
        EXPECT_TRUE(out[r].untouched);
        if (r == 1) {
          EXPECT_EQ(out[r].rc, BNORM_ERROR_INTERNAL);
          EXPECT_NE(out[r].error.find("allreduce_sum_f64 callback failed (returned 7)"),
                    std::string::npos)
              << out[r].error;
          EXPECT_NE(out[r].error.find("rank 1 of 3"), std::string::npos) << out[r].error;
        }
      }
    }
  }
}

TEST(SyncCApi, BadArgumentsOnOneRankFailEveryRankAndWriteNothing) {
  const Problem p = MakeProblem(8, 3, 5, Layout::kChannelsFirst, 9);
  struct Fault {
    const char* argument;
    const char* bad_rank_says;
  };
  for (const Fault& f : {Fault{"n", "n: must be >= 0, got -2"},
                         Fault{"x", "x: data is null"}, Fault{"c", "c: must be > 0, got -3"},
                         Fault{"save_mean", "save_mean: is NULL"},
                         Fault{"dtype", "dtype 3 is not one of float32 (0), bfloat16 (1), "
                                        "float16 (2); float64 tensors are not supported"}}) {
    for (bool give : {false, true}) {
      SCOPED_TRACE(std::string(f.argument) + (give ? ", split given" : ", split exchanged"));
      Faults faults;
      faults.bad_rank = 2;
      faults.bad_argument = f.argument;
      const std::vector<Outcome> out = RunFaulty(p, {3, 2, 3}, faults, give, "");
      for (size_t r = 0; r < out.size(); ++r) {
        SCOPED_TRACE("rank " + std::to_string(r));
        ASSERT_NE(out[r].rc, BNORM_OK);
        EXPECT_TRUE(out[r].untouched);
        // A bad c with the split given: the bad rank cannot size the fused exchange, which
        // then fails on every rank as a mismatch of the all-reduce's lengths.
        const bool mismatch = give && std::string(f.argument) == "c";
        const std::string expected = mismatch ? "callback failed"
                                     : r == 2 ? f.bad_rank_says
                                              : "rank 2 failed";
        EXPECT_NE(out[r].error.find(expected), std::string::npos) << out[r].error;
      }
    }
  }
}

// bf16 and fp16 tensors through bnorm_sync_forward_train_dt / bnorm_sync_backward_dt: bitwise
// the C++ sync path on views of the same 16-bit data, for several splits and both modes.
struct Run16 {
  std::vector<uint16_t> y, dx;
  std::vector<RankOutputs> ranks;
};

Run16 Run16Bit(const Problem& p, const std::vector<uint16_t>& x, const std::vector<uint16_t>& dy,
               int dtype, const std::vector<int64_t>& split, int mode, bool through_c) {
  const int k = static_cast<int>(split.size());
  std::unique_ptr<InProcessGroup> group;
  EXPECT_TRUE(InProcessGroup::create(k, &group, 20.0).ok());
  Run16 run;
  run.y.assign(x.size(), 0xABCD);
  run.dx.assign(x.size(), 0xABCD);
  run.ranks.resize(static_cast<size_t>(k));
  const auto dt = static_cast<bnorm::DType>(dtype);
  const Status s = group->run([&](Communicator& comm) -> Status {
    const int r = comm.rank();
    const int64_t n = split[static_cast<size_t>(r)];
    const size_t begin = static_cast<size_t>(Offset(split, r) * p.sample());
    RankOutputs& o = run.ranks[static_cast<size_t>(r)];
    Prepare(p, &o);
    const uint16_t* xr = n > 0 ? x.data() + begin : nullptr;
    const uint16_t* dyr = n > 0 ? dy.data() + begin : nullptr;
    uint16_t* yr = n > 0 ? run.y.data() + begin : nullptr;
    uint16_t* dxr = n > 0 ? run.dx.data() + begin : nullptr;
    o.split_out.assign(static_cast<size_t>(k), -1);
    if (through_c) {
      const bnorm_comm c = CommOf(comm);
      bnorm_sync_options options{};
      options.mode = mode;
      options.split_out = o.split_out.data();
      o.forward_rc = bnorm_sync_forward_train_dt(
          &c, &options, CLayout(p.layout), dtype, n, p.c, p.s, xr, p.weight.data(),
          p.bias.data(), o.running_mean.data(), o.running_var.data(), &o.num_batches_tracked,
          0.1, 1e-5, yr, o.save_mean.data(), o.save_invstd.data());
      if (o.forward_rc != BNORM_OK) {
        o.error = bnorm_last_error();
        return Status();
      }
      bnorm_sync_options back{};
      back.mode = mode;
      back.split = o.split_out.data();
      o.backward_rc = bnorm_sync_backward_dt(&c, &back, CLayout(p.layout), dtype, n, p.c, p.s,
                                             dyr, xr, p.weight.data(), o.save_mean.data(),
                                             o.save_invstd.data(), dxr, o.dweight.data(),
                                             o.dbias.data());
      if (o.backward_rc != BNORM_OK) o.error = bnorm_last_error();
      return Status();
    }
    const std::vector<int64_t> dims =
        p.s == 1 ? std::vector<int64_t>{n, p.c} : std::vector<int64_t>{n, p.c, p.s};
    bnorm::ForwardTrainArgs f;
    f.x = bnorm::ConstTensorView(xr, dt, dims, p.layout);
    f.weight = p.weight;
    f.bias = p.bias;
    f.running_mean = o.running_mean;
    f.running_var = o.running_var;
    f.num_batches_tracked = &o.num_batches_tracked;
    f.momentum = 0.1;
    f.eps = 1e-5;
    f.y = bnorm::TensorView(yr, dt, dims, p.layout);
    f.save_mean = o.save_mean;
    f.save_invstd = o.save_invstd;
    bnorm::SyncOptions sync;
    sync.mode = static_cast<SyncMode>(mode);
    sync.split_out = &o.split_out;
    BNORM_RETURN_IF_ERROR(bnorm::sync_forward_train(comm, f, {}, sync));
    o.forward_rc = BNORM_OK;
    bnorm::BackwardArgs b;
    b.dy = bnorm::ConstTensorView(dyr, dt, dims, p.layout);
    b.x = f.x;
    b.weight = p.weight;
    b.save_mean = o.save_mean;
    b.save_invstd = o.save_invstd;
    b.dx = bnorm::TensorView(dxr, dt, dims, p.layout);
    b.dweight = o.dweight;
    b.dbias = o.dbias;
    bnorm::SyncOptions back;
    back.mode = static_cast<SyncMode>(mode);
    back.split = o.split_out;
    BNORM_RETURN_IF_ERROR(bnorm::sync_backward(comm, b, {}, back));
    o.backward_rc = BNORM_OK;
    return Status();
  });
  EXPECT_TRUE(s.ok()) << s.to_string();
  return run;
}

TEST(SyncCApiDtype, Bf16AndFp16EqualTheCppSyncPathBitwise) {
  for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast}) {
    const Problem p = MakeProblem(9, 5, 6, layout, 41);
    for (int dtype : {BNORM_BFLOAT16, BNORM_FLOAT16}) {
      std::vector<uint16_t> x, dy;
      for (float v : p.x)
        x.push_back(dtype == BNORM_BFLOAT16 ? bnorm::to_bfloat16(v).bits
                                            : bnorm::to_float16(v).bits);
      for (float v : p.dy)
        dy.push_back(dtype == BNORM_BFLOAT16 ? bnorm::to_bfloat16(v).bits
                                             : bnorm::to_float16(v).bits);
      for (int mode : {BNORM_SYNC_REPRODUCIBLE, BNORM_SYNC_PER_RANK}) {
        for (const std::vector<int64_t>& split :
             {std::vector<int64_t>{9}, std::vector<int64_t>{4, 5}, std::vector<int64_t>{2, 0, 7}}) {
          SCOPED_TRACE(Name(split) + (dtype == BNORM_BFLOAT16 ? " bf16" : " fp16") +
                       (mode == 0 ? " reproducible" : " per-rank") +
                       (layout == Layout::kChannelsLast ? " channels_last" : " channels_first"));
          const Run16 c = Run16Bit(p, x, dy, dtype, split, mode, true);
          const Run16 cpp = Run16Bit(p, x, dy, dtype, split, mode, false);
          for (size_t r = 0; r < split.size(); ++r) {
            ASSERT_EQ(c.ranks[r].forward_rc, BNORM_OK) << c.ranks[r].error;
            ASSERT_EQ(c.ranks[r].backward_rc, BNORM_OK) << c.ranks[r].error;
            ExpectRankBitwise(c.ranks[r], cpp.ranks[r], "rank " + std::to_string(r));
          }
          EXPECT_EQ(c.y, cpp.y) << "y";
          EXPECT_EQ(c.dx, cpp.dx) << "dx";
          for (uint16_t v : c.dx) ASSERT_NE(v, 0xABCD) << "dx written everywhere";
        }
      }
    }
  }
}

}  // namespace
