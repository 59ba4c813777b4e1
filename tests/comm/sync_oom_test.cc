// Synchronized batch norm when memory runs out: the k-th allocation of a call fails, for every k
// until the call succeeds. Each failing call returns an error (no exception escapes) and leaves
// every output and state buffer bit for bit as it was: the running statistics are written only
// after the apply pass, whose first plan for a shape allocates. This binary replaces the global
// operator new with one that can be told to fail.
#include <gtest/gtest.h>

#include <functional>

#include "bnorm/comm.h"
#include "replaced_new.h"
#include "test_util.h"

namespace bnorm_test {
namespace {

// One rank: the exchange is the identity, so every allocation of the pass is the pass's own.
class SoloCommunicator final : public bnorm::Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string kind() const override { return "solo"; }
  bnorm::Status allreduce_sum(std::span<double>) override { return bnorm::Status(); }
  bnorm::Status allreduce_sum(std::span<float>) override { return bnorm::Status(); }
  bnorm::Status barrier() override { return bnorm::Status(); }
  void abort(const std::string&, int) override {}
};

template <class Call>
int sweep(const char* what, Call&& call, const std::function<bool()>& unchanged) {
  int failures = 0;
  for (long k = 1; k < 10000; ++k) {
    bnorm_test::alloc::fail_in.store(k);
    bnorm::Status s;
    bool threw = false;
    try {
      s = call();
    } catch (...) {
      threw = true;
    }
    const bool fired = bnorm_test::alloc::fail_in.load() <= 0;
    bnorm_test::alloc::fail_in.store(0);
    EXPECT_FALSE(threw) << what << ": an exception escaped at allocation " << k;
    if (!fired) {
      EXPECT_TRUE(s.ok()) << what << ": " << s.to_string();
      return failures;
    }
    ++failures;
    EXPECT_EQ(s.code(), bnorm::StatusCode::kInternal) << what << " at allocation " << k << ": "
                                                      << s.to_string();
    EXPECT_TRUE(unchanged()) << what << ": buffers written by a call that failed at allocation "
                             << k;
    if (::testing::Test::HasFailure()) return failures;
  }
  ADD_FAILURE() << what << ": still failing after 10000 allocations";
  return failures;
}

TEST(SyncBatchNormOutOfMemory, NothingWrittenForAnyFailedAllocation) {
  bnorm::set_num_threads(1);
  SoloCommunicator comm;
  for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast}) {
    // A shape no other call of this process has planned.
    const std::vector<int64_t> dims = {3, 5 + static_cast<int64_t>(layout), 7, 11};
    BNORM_SEEDED_RNG(rng, 5);
    const Tensor x = RandomTensor(rng, dims, layout), dy = RandomTensor(rng, dims, layout);
    const int64_t c = dims[1];
    std::vector<float> w = RandomVector(rng, c, 0.5, 1.5), b = RandomVector(rng, c, -1, 1);
    std::vector<float> rm(c, 0.25f), rv(c, 2.0f), sm(c, -7.0f), si(c, -7.0f), dw(c, -7.0f),
        db(c, -7.0f);
    int64_t batches = 4;
    Tensor y(dims, layout), dx(dims, layout);
    FillSentinel(y.data);
    FillSentinel(dx.data);
    const auto rm0 = rm, rv0 = rv, sm0 = sm, si0 = si, dw0 = dw, db0 = db;
    const auto y0 = y.data, dx0 = dx.data;

    bnorm::ForwardTrainArgs f;
    f.x = x.cview();
    f.y = y.view();
    f.weight = w;
    f.bias = b;
    f.running_mean = rm;
    f.running_var = rv;
    f.num_batches_tracked = &batches;
    f.save_mean = sm;
    f.save_invstd = si;
    const int forward_failures = sweep(
        "sync_forward_train", [&] { return bnorm::sync_forward_train(comm, f); },
        [&] {
          return BitIdentical(rm, rm0) && BitIdentical(rv, rv0) && BitIdentical(sm, sm0) &&
                 BitIdentical(si, si0) && BitIdentical(y.data, y0) && batches == 4;
        });
    EXPECT_GT(forward_failures, 0) << "the forward allocated nothing: the sweep tested nothing";
    EXPECT_EQ(batches, 5);

    bnorm::BackwardArgs k;
    k.dy = dy.cview();
    k.x = x.cview();
    k.weight = w;
    k.training = true;
    k.save_mean = sm;
    k.save_invstd = si;
    k.dx = dx.view();
    k.dweight = dw;
    k.dbias = db;
    const int backward_failures = sweep(
        "sync_backward", [&] { return bnorm::sync_backward(comm, k); },
        [&] { return BitIdentical(dx.data, dx0) && BitIdentical(dw, dw0) && BitIdentical(db, db0); });
    EXPECT_GT(backward_failures, 0) << "the backward allocated nothing: the sweep tested nothing";
  }
  bnorm::set_num_threads(0);
}

}  // namespace
}  // namespace bnorm_test
