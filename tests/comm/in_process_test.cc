// InProcessGroup: K simulated ranks on K threads. Sums are the rank-order sum bit for bit and
// identical on every rank, a single contributor's value is gathered exactly, barriers hold,
// mismatched lengths, a missing rank and an abort fail every rank with a message naming the
// cause, and the counters count. Clean under ThreadSanitizer (ctest label comm).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "bnorm/comm.h"

namespace {

using bnorm::Communicator;
using bnorm::InProcessGroup;
using bnorm::Status;

std::unique_ptr<InProcessGroup> make_group(int k, double timeout_seconds = 60.0) {
  std::unique_ptr<InProcessGroup> g;
  const Status s = InProcessGroup::create(k, &g, timeout_seconds);
  EXPECT_TRUE(s.ok()) << s.to_string();
  return g;
}

// Rank r's values: magnitudes from 1e-8 to 1e8 and both signs, so that the order of the
// additions shows in the last bits.
template <typename T>
std::vector<T> rank_data(int rank, size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed * 1000003 + rank);
  std::uniform_real_distribution<double> mantissa(-1.0, 1.0);
  std::uniform_int_distribution<int> exponent(-8, 8);
  std::vector<T> v(n);
  for (size_t i = 0; i < n; ++i)
    v[i] = static_cast<T>(mantissa(rng) * std::pow(10.0, exponent(rng)));
  return v;
}

// The expected result, written independently: ((x0 + x1) + x2) + ... in T.
template <typename T>
std::vector<T> rank_order_sum(int k, size_t n, uint64_t seed) {
  std::vector<T> sum = rank_data<T>(0, n, seed);
  for (int r = 1; r < k; ++r) {
    const std::vector<T> x = rank_data<T>(r, n, seed);
    for (size_t i = 0; i < n; ++i) sum[i] = sum[i] + x[i];
  }
  return sum;
}

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

TEST(InProcessGroup, CreateValidatesItsArguments) {
  std::unique_ptr<InProcessGroup> g;
  EXPECT_EQ(InProcessGroup::create(0, &g).message(), "size: must be in [1, 1024], got 0");
  EXPECT_EQ(InProcessGroup::create(1025, &g).message(), "size: must be in [1, 1024], got 1025");
  EXPECT_EQ(InProcessGroup::create(2, &g, 0.0).message(),
            "timeout_seconds: must be finite and > 0, got 0");
  EXPECT_FALSE(InProcessGroup::create(2, &g, std::nan("")).ok());
  EXPECT_FALSE(InProcessGroup::create(2, nullptr).ok());
  EXPECT_EQ(g, nullptr);
  ASSERT_TRUE(InProcessGroup::create(3, &g).ok());
  EXPECT_EQ(g->size(), 3);
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(g->rank(r).rank(), r);
    EXPECT_EQ(g->rank(r).size(), 3);
    EXPECT_EQ(g->rank(r).kind(), "in-process");
  }
}

template <typename T>
void check_sums(int k, size_t n, uint64_t seed) {
  auto g = make_group(k);
  std::vector<std::vector<T>> results(k);
  const Status s = g->run([&](Communicator& c) {
    std::vector<T> v = rank_data<T>(c.rank(), n, seed);
    BNORM_RETURN_IF_ERROR(c.allreduce_sum(std::span<T>(v)));
    results[c.rank()] = std::move(v);
    return Status();
  });
  ASSERT_TRUE(s.ok()) << s.to_string();
  const std::vector<T> expected = rank_order_sum<T>(k, n, seed);
  for (int r = 0; r < k; ++r) {
    EXPECT_TRUE(same_bits(results[r], expected)) << "k " << k << " n " << n << " rank " << r;
  }
}

TEST(InProcessGroup, DoubleSumIsTheRankOrderSumOnEveryRank) {
  for (int k = 1; k <= 4; ++k) {
    for (size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{1000}}) check_sums<double>(k, n, 1);
  }
}

TEST(InProcessGroup, FloatSumIsTheRankOrderSumOnEveryRank) {
  for (int k = 1; k <= 4; ++k) {
    for (size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{1000}}) check_sums<float>(k, n, 2);
  }
}

// Values where the association shows: (((1e16 + 1) - 1e16) + 1) is 1 in rank order, 2 or 0
// in others.
TEST(InProcessGroup, SumsInRankOrderNotAnother) {
  auto g = make_group(4);
  const double x[4] = {1e16, 1.0, -1e16, 1.0};
  std::vector<double> got(4);
  ASSERT_TRUE(g->run([&](Communicator& c) {
                 double v = x[c.rank()];
                 BNORM_RETURN_IF_ERROR(c.allreduce_sum(std::span<double>(&v, 1)));
                 got[c.rank()] = v;
                 return Status();
               }).ok());
  for (int r = 0; r < 4; ++r) EXPECT_EQ(got[r], 1.0) << "rank " << r;
}

// One contributor per element: rank r writes slot r, the others 0. Every finite value,
// subnormals and infinities arrive exactly (x + 0 == x). The one exception is -0.0: in
// round-to-nearest, -0.0 + +0.0 = +0.0, so with K > 1 a contributed -0.0 arrives as +0.0
// (equal to it, sign lost) unless every rank contributes -0.0. With K = 1 it stays -0.0.
TEST(InProcessGroup, OneContributorIsGatheredExactly) {
  const double specials[] = {1.0 / 3.0, -7.25e-300, std::numeric_limits<double>::denorm_min(),
                             std::numeric_limits<double>::max(),
                             -std::numeric_limits<double>::infinity()};
  for (int k = 1; k <= 4; ++k) {
    auto g = make_group(k);
    const int per_rank = 5;
    std::vector<std::vector<double>> got_d(k);
    std::vector<std::vector<float>> got_f(k);
    ASSERT_TRUE(g->run([&](Communicator& c) {
                   std::vector<double> d(k * per_rank, 0.0);
                   std::vector<float> f(k * per_rank, 0.0f);
                   for (int j = 0; j < per_rank; ++j) {
                     d[c.rank() * per_rank + j] = specials[j] * (c.rank() + 1);
                     f[c.rank() * per_rank + j] = static_cast<float>(1.0 / (3 + j + c.rank()));
                   }
                   BNORM_RETURN_IF_ERROR(c.allreduce_sum(std::span<double>(d)));
                   BNORM_RETURN_IF_ERROR(c.allreduce_sum(std::span<float>(f)));
                   got_d[c.rank()] = d;
                   got_f[c.rank()] = f;
                   return Status();
                 }).ok());
    for (int r = 0; r < k; ++r) {
      for (int src = 0; src < k; ++src) {
        for (int j = 0; j < per_rank; ++j) {
          const double want_d = specials[j] * (src + 1);
          const float want_f = static_cast<float>(1.0 / (3 + j + src));
          EXPECT_EQ(std::memcmp(&got_d[r][src * per_rank + j], &want_d, sizeof want_d), 0)
              << "k " << k << " rank " << r << " slot " << src << "." << j;
          EXPECT_EQ(std::memcmp(&got_f[r][src * per_rank + j], &want_f, sizeof want_f), 0);
        }
      }
    }
  }
}

TEST(InProcessGroup, NegativeZeroFollowsIeeeAddition) {
  for (int k = 1; k <= 3; ++k) {
    auto g = make_group(k);
    std::vector<std::vector<double>> got(k);
    ASSERT_TRUE(g->run([&](Communicator& c) {
                   // [0]: only rank 0 gives -0.0; [1]: only the last rank; [2]: every rank.
                   std::vector<double> v = {c.rank() == 0 ? -0.0 : 0.0,
                                            c.rank() == k - 1 ? -0.0 : 0.0, -0.0};
                   BNORM_RETURN_IF_ERROR(c.allreduce_sum(std::span<double>(v)));
                   got[c.rank()] = v;
                   return Status();
                 }).ok());
    for (int r = 0; r < k; ++r) {
      EXPECT_EQ(std::signbit(got[r][0]), k == 1) << "k " << k << " rank " << r;
      EXPECT_EQ(std::signbit(got[r][1]), k == 1) << "k " << k << " rank " << r;
      EXPECT_TRUE(std::signbit(got[r][2])) << "k " << k << " rank " << r;
      for (double x : got[r]) EXPECT_EQ(x, 0.0);
    }
  }
}

TEST(InProcessGroup, BarrierWaitsForEveryRank) {
  const int k = 4;
  const int rounds = 200;
  auto g = make_group(k);
  std::vector<std::atomic<int>> before(rounds);
  for (auto& b : before) b.store(0);
  std::atomic<int> violations{0};
  ASSERT_TRUE(g->run([&](Communicator& c) {
                 for (int i = 0; i < rounds; ++i) {
                   // A late rank now and then, so that the others really wait.
                   if (i % 50 == 0 && c.rank() == i / 50 % k) {
                     std::this_thread::sleep_for(std::chrono::milliseconds(20));
                   }
                   before[i].fetch_add(1);
                   BNORM_RETURN_IF_ERROR(c.barrier());
                   if (before[i].load() != k) violations.fetch_add(1);
                 }
                 return Status();
               }).ok());
  EXPECT_EQ(violations.load(), 0);
}

// Many rounds of every kind back to back: no round overwrites a result still being copied.
TEST(InProcessGroup, BackToBackRoundsOfEveryKind) {
  const int k = 4;
  auto g = make_group(k);
  std::atomic<int> wrong{0};
  ASSERT_TRUE(g->run([&](Communicator& c) {
                 for (int i = 0; i < 2000; ++i) {
                   const size_t n = 1 + i % 13;
                   if (i % 3 == 0) {
                     std::vector<double> v(n, c.rank() + i);
                     BNORM_RETURN_IF_ERROR(c.allreduce_sum(std::span<double>(v)));
                     for (double x : v) wrong += x != k * i + k * (k - 1) / 2;
                   } else if (i % 3 == 1) {
                     std::vector<float> v(n, static_cast<float>(c.rank()));
                     BNORM_RETURN_IF_ERROR(c.allreduce_sum(std::span<float>(v)));
                     for (float x : v) wrong += x != k * (k - 1) / 2;
                   } else {
                     BNORM_RETURN_IF_ERROR(c.barrier());
                   }
                 }
                 return Status();
               }).ok());
  EXPECT_EQ(wrong.load(), 0);
}

TEST(InProcessGroup, MismatchedLengthsFailEveryRankAndWriteNothing) {
  const int k = 3;
  auto g = make_group(k);
  std::vector<Status> got(k);
  std::vector<std::vector<double>> after(k);
  const Status s = g->run([&](Communicator& c) {
    std::vector<double> v(c.rank() == 1 ? 5 : 4, 1.0 + c.rank());
    got[c.rank()] = c.allreduce_sum(std::span<double>(v));
    after[c.rank()] = v;
    return got[c.rank()];
  });
  const std::string want =
      "allreduce_sum(double): the ranks passed different lengths: rank 0 4, rank 1 5, rank 2 4";
  EXPECT_EQ(s.message(), "rank 0: " + want);
  EXPECT_EQ(s.code(), bnorm::StatusCode::kInvalidArgument);
  for (int r = 0; r < k; ++r) {
    EXPECT_EQ(got[r].message(), want) << "rank " << r;
    for (double x : after[r]) EXPECT_EQ(x, 1.0 + r);
  }
  // Every rank saw the mismatch: the group goes on.
  ASSERT_TRUE(g->run([&](Communicator& c) {
                 float v = 1.0f;
                 BNORM_RETURN_IF_ERROR(c.allreduce_sum(std::span<float>(&v, 1)));
                 return v == 3.0f ? Status() : Status::internal("wrong sum");
               }).ok());
}

TEST(InProcessGroup, MismatchedCollectivesFailEveryRank) {
  auto g = make_group(2);
  const Status s = g->run([&](Communicator& c) {
    if (c.rank() == 0) return c.barrier();
    float v = 1.0f;
    return c.allreduce_sum(std::span<float>(&v, 1));
  });
  EXPECT_EQ(s.message(),
            "rank 0: collective mismatch: the ranks called different collectives: rank 0 "
            "barrier, rank 1 allreduce_sum(float)");
}

TEST(InProcessGroup, MissingRankTimesOutOnEveryWaitingRank) {
  const int k = 3;
  auto g = make_group(k, 0.2);
  std::vector<Status> got(k);
  std::vector<double> waited(k, 0.0);
  Status late;
  const Status s = g->run([&](Communicator& c) {
    if (c.rank() == 2) {
      // Never takes part in the round; a later call finds the group failed.
      std::this_thread::sleep_for(std::chrono::milliseconds(1000));
      double v = 1.0;
      late = c.allreduce_sum(std::span<double>(&v, 1));
      return Status();
    }
    const auto start = std::chrono::steady_clock::now();
    double v = 1.0;
    got[c.rank()] = c.allreduce_sum(std::span<double>(&v, 1));
    waited[c.rank()] =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return got[c.rank()];
  });
  const std::string want = "all-reduce: rank(s) 2 did not arrive within 0.2 s";
  EXPECT_EQ(s.message(), "rank 0: " + want);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(got[r].message(), want) << "rank " << r;
    EXPECT_GE(waited[r], 0.19) << "rank " << r;
    EXPECT_LT(waited[r], 10.0) << "rank " << r;
  }
  EXPECT_EQ(late.message(), want);
  EXPECT_EQ(g->run([](Communicator& c) { return c.barrier(); }).message(), "rank 0: " + want);
}

TEST(InProcessGroup, BarrierTimeoutNamesEveryMissingRank) {
  auto g = make_group(4, 0.2);
  const Status s =
      g->run([](Communicator& c) { return c.rank() % 2 == 0 ? c.barrier() : Status(); });
  EXPECT_EQ(s.message(), "rank 0: barrier: rank(s) 1, 3 did not arrive within 0.2 s");
}

TEST(InProcessGroup, AbortFailsEveryRanksPendingAndFutureCollectives) {
  const int k = 3;
  auto g = make_group(k);  // 60 s: the abort, not the timeout, must end the wait
  std::vector<Status> got(k);
  testing::internal::CaptureStderr();
  const auto start = std::chrono::steady_clock::now();
  const Status s = g->run([&](Communicator& c) {
    if (c.rank() == 1) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));  // let the others wait
      c.abort("out of memory", 3);
      double v = 1.0;
      got[1] = c.allreduce_sum(std::span<double>(&v, 1));
      return Status();
    }
    double v = 1.0;
    got[c.rank()] = c.allreduce_sum(std::span<double>(&v, 1));
    return got[c.rank()];
  });
  const double took =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("bnorm: rank 1: out of memory\n"), std::string::npos) << err;
  const std::string want = "rank 1 aborted: out of memory";
  EXPECT_EQ(s.message(), "rank 0: " + want);
  for (int r = 0; r < k; ++r) EXPECT_EQ(got[r].message(), want) << "rank " << r;
  EXPECT_LT(took, 10.0);
}

TEST(InProcessGroup, RunReturnsTheLowestFailingRankWithItsCode) {
  auto g = make_group(4);
  const Status s = g->run([](Communicator& c) {
    if (c.rank() == 1) return Status::non_finite("x: NaN at 3");
    if (c.rank() == 3) return Status::invalid_argument("eps: bad");
    return Status();
  });
  EXPECT_EQ(s.code(), bnorm::StatusCode::kNonFinite);
  EXPECT_EQ(s.message(), "rank 1: x: NaN at 3");
  EXPECT_TRUE(g->run([](Communicator&) { return Status(); }).ok());
}

TEST(InProcessGroup, ExceptionBecomesAnErrorAndReleasesTheOtherRanks) {
  auto g = make_group(2);
  testing::internal::CaptureStderr();
  const Status s = g->run([](Communicator& c) -> Status {
    if (c.rank() == 0) throw std::runtime_error("boom");
    return c.barrier();
  });
  testing::internal::GetCapturedStderr();
  EXPECT_EQ(s.message(), "rank 0: exception: boom");
  EXPECT_EQ(s.code(), bnorm::StatusCode::kInternal);
}

TEST(InProcessGroup, CountersCountEveryAllReduce) {
  auto g = make_group(2);
  ASSERT_TRUE(g->run([](Communicator& c) {
                 std::vector<double> d(10, 1.0);
                 std::vector<float> f(6, 1.0f);
                 for (int i = 0; i < 3; ++i)
                   BNORM_RETURN_IF_ERROR(c.allreduce_sum(std::span<double>(d)));
                 for (int i = 0; i < 2; ++i)
                   BNORM_RETURN_IF_ERROR(c.allreduce_sum(std::span<float>(f)));
                 BNORM_RETURN_IF_ERROR(c.barrier());  // not an all-reduce: not counted
                 return Status();
               }).ok());
  for (int r = 0; r < 2; ++r) {
    const bnorm::CommCounters& n = g->rank(r).counters();
    EXPECT_EQ(n.allreduce_calls, 5);
    EXPECT_EQ(n.allreduce_bytes, 3 * 10 * 8 + 2 * 6 * 4);
    EXPECT_GE(n.allreduce_seconds, 0.0);
    EXPECT_LT(n.allreduce_seconds, 10.0);
    g->rank(r).reset_counters();
    EXPECT_EQ(g->rank(r).counters().allreduce_calls, 0);
    EXPECT_EQ(g->rank(r).counters().allreduce_bytes, 0);
    EXPECT_EQ(g->rank(r).counters().allreduce_seconds, 0.0);
  }
}

}  // namespace
