// The thread pool: every slot runs exactly once, results are visible to the caller, concurrent
// callers and back-to-back jobs work. Clean under ThreadSanitizer (BNORM_TSAN=ON).
#include "cpu/thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <thread>
#include <vector>

#include "bnorm/batch_norm.h"

namespace bnorm::cpu {
namespace {

struct Counts {
  std::vector<int> hits;  // plain ints: each slot writes its own, the caller reads after run()
  std::vector<int> seen_n;
};

void count_task(void* ctx, int slot, int n) {
  auto* c = static_cast<Counts*>(ctx);
  c->hits[slot] += 1;
  c->seen_n[slot] = n;
}

TEST(ThreadPool, EverySlotOnceForEverySize) {
  ThreadPool pool;
  for (int n = 1; n <= 9; ++n) {
    Counts c{std::vector<int>(n, 0), std::vector<int>(n, 0)};
    pool.run(n, &count_task, &c);
    for (int t = 0; t < n; ++t) {
      EXPECT_EQ(c.hits[t], 1) << "n " << n << " slot " << t;
      EXPECT_EQ(c.seen_n[t], n);
    }
  }
  EXPECT_EQ(pool.worker_count(), 8);  // grows to the largest n - 1, never per call
}

TEST(ThreadPool, ManyBackToBackJobs) {
  ThreadPool pool;
  Counts c{std::vector<int>(3, 0), std::vector<int>(3, 0)};
  for (int k = 0; k < 5000; ++k) pool.run(3, &count_task, &c);
  for (int t = 0; t < 3; ++t) EXPECT_EQ(c.hits[t], 5000);
  EXPECT_EQ(pool.worker_count(), 2);
}

struct SumJob {
  const std::vector<int>* data;
  std::vector<long> partial;  // one per slot
};

void sum_task(void* ctx, int slot, int n) {
  auto* j = static_cast<SumJob*>(ctx);
  const size_t len = j->data->size();
  long s = 0;
  for (size_t k = len * slot / n; k < len * (slot + 1) / n; ++k) s += (*j->data)[k];
  j->partial[slot] = s;
}

TEST(ThreadPool, ConcurrentCallersShareThePool) {
  ThreadPool pool;
  std::vector<int> data(10000);
  for (size_t k = 0; k < data.size(); ++k) data[k] = static_cast<int>(k % 97);
  long want = 0;
  for (int v : data) want += v;
  std::atomic<int> failures{0};
  std::vector<std::thread> callers;
  for (int t = 0; t < 4; ++t)
    callers.emplace_back([&] {
      for (int k = 0; k < 300; ++k) {
        SumJob j{&data, std::vector<long>(4, 0)};
        pool.run(4, &sum_task, &j);  // runs on the pool, or alone when another caller has it
        long got = 0;
        for (long p : j.partial) got += p;
        if (got != want) failures.fetch_add(1);
      }
    });
  for (std::thread& t : callers) t.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST(ThreadPool, IdleWorkersThenWork) {
  ThreadPool pool;
  Counts c{std::vector<int>(2, 0), std::vector<int>(2, 0)};
  pool.run(2, &count_task, &c);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the worker goes to sleep
  pool.run(2, &count_task, &c);
  EXPECT_EQ(c.hits[0], 2);
  EXPECT_EQ(c.hits[1], 2);
}

TEST(ThreadPool, NumThreadsSetting) {
  bnorm::set_num_threads(3);
  EXPECT_EQ(bnorm::num_threads(), 3);
  setenv("BNORM_NUM_THREADS", "5", 1);
  EXPECT_EQ(bnorm::num_threads(), 3);  // the API setting wins
  bnorm::set_num_threads(0);
  EXPECT_EQ(bnorm::num_threads(), 5);  // the environment
  unsetenv("BNORM_NUM_THREADS");
  EXPECT_GE(bnorm::num_threads(), 1);  // the cores
}

}  // namespace
}  // namespace bnorm::cpu
