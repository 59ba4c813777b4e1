// nn's parallel_for on the library's one pool: every index exactly once for any size and thread
// count, nested calls (serial) and concurrent callers correct, and one thread count for the
// layers and the kernels (nn::set_num_threads, bnorm::set_num_threads and BNORM_NUM_THREADS).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <thread>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/nn/layers.h"
#include "nn/parallel.h"

namespace {

using bnorm::nn::detail::nn_threads;
using bnorm::nn::detail::parallel_for;

std::vector<int> cover(int64_t n, int64_t grain) {
  std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
  parallel_for(n, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)].fetch_add(1);
  });
  std::vector<int> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = hits[static_cast<size_t>(i)].load();
  return out;
}

TEST(NnParallel, EveryIndexOnceForEverySizeAndThreadCount) {
  for (int threads : {1, 2, 3, 8}) {
    bnorm::nn::set_num_threads(threads);
    ASSERT_EQ(nn_threads(), threads);
    ASSERT_EQ(bnorm::num_threads(), threads) << "the layers and the kernels share one count";
    for (int64_t n : {1, 2, 3, 7, 64, 1000, 100003}) {
      for (int64_t grain : {1, 16, 4096}) {
        const std::vector<int> hits = cover(n, grain);
        for (int64_t i = 0; i < n; ++i)
          ASSERT_EQ(hits[static_cast<size_t>(i)], 1)
              << threads << " threads, n " << n << ", grain " << grain << ", index " << i;
      }
    }
  }
  bnorm::nn::set_num_threads(0);
}

TEST(NnParallel, NestedAndConcurrentCalls) {
  bnorm::nn::set_num_threads(2);
  // Nested: the inner call runs on the calling thread (the pool is busy with the outer job).
  std::vector<std::atomic<int>> hits(64 * 50);
  parallel_for(64, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      parallel_for(50, 1, [&](int64_t bb, int64_t ee) {
        for (int64_t j = bb; j < ee; ++j) hits[static_cast<size_t>(i * 50 + j)].fetch_add(1);
      });
  });
  for (size_t k = 0; k < hits.size(); ++k) ASSERT_EQ(hits[k].load(), 1) << "nested, index " << k;
  // Two callers at once, on a thread of their own each, so that a hang fails instead of blocking.
  std::promise<void> finished;
  std::future<void> done = finished.get_future();
  std::atomic<int> bad{0};
  std::thread([&] {
    auto work = [&] {
      for (int rep = 0; rep < 200; ++rep) {
        const std::vector<int> h = cover(5000, 8);
        for (int v : h) bad.fetch_add(v != 1);
      }
    };
    std::thread a(work), b(work);
    a.join();
    b.join();
    finished.set_value();
  }).detach();
  ASSERT_EQ(done.wait_for(std::chrono::seconds(60)), std::future_status::ready)
      << "concurrent parallel_for calls hung";
  EXPECT_EQ(bad.load(), 0);
  bnorm::nn::set_num_threads(0);
}

TEST(NnParallel, DefaultIsTheLibrarysDefault) {
  bnorm::nn::set_num_threads(0);
  bnorm::set_num_threads(0);
  EXPECT_EQ(nn_threads(), bnorm::num_threads());
  bnorm::set_num_threads(3);  // the kernels' setter governs the layers too
  EXPECT_EQ(nn_threads(), 3);
  bnorm::set_num_threads(0);
}

}  // namespace
