#include "cpu/thread_pool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace bnorm::cpu {
namespace {

constexpr int kMaxSlots = 1024;  // fits the 16 low bits of job_ and claim_
// Pause iterations a worker spins before it sleeps: some tens of microseconds, so a caller
// running kernels back to back finds it awake, without starving other threads for long.
constexpr int kSpinsBeforeSleep = 2000;

inline void cpu_pause() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// Spins, then yields the core (the thread we wait for may need it).
inline void wait_pause(int iteration) {
  if (iteration < 64) {
    cpu_pause();
  } else {
    std::this_thread::yield();
  }
}

}  // namespace

ThreadPool& ThreadPool::instance() {
  static ThreadPool pool;
  return pool;
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(busy_);
    stop_.store(true, std::memory_order_release);
    job_.fetch_add(uint64_t{1} << 16, std::memory_order_acq_rel);
    job_.notify_all();
  }
  for (std::thread& t : workers_) t.join();
}

int ThreadPool::worker_count() const { return worker_count_.load(std::memory_order_acquire); }

int ThreadPool::claim(uint64_t job, int n) {
  uint64_t word = claim_.load(std::memory_order_relaxed);
  for (;;) {
    if ((word >> 16) != job) return -1;
    const int slot = static_cast<int>(word & 0xffff);
    if (slot >= n) return -1;
    if (claim_.compare_exchange_weak(word, word + 1, std::memory_order_acq_rel,
                                     std::memory_order_relaxed))
      return slot;
  }
}

void ThreadPool::run(int threads, int n, Task task, void* ctx) {
  n = n < 1 ? 1 : (n > kMaxSlots ? kMaxSlots : n);
  threads = threads < 1 ? 1 : (threads > n ? n : threads);
  std::unique_lock<std::mutex> lock(busy_, std::defer_lock);
  if (threads <= 1 || !lock.try_lock()) {
    for (int t = 0; t < n; ++t) task(ctx, t, n);
    return;
  }
  while (static_cast<int>(workers_.size()) < threads - 1) {
    const int index = static_cast<int>(workers_.size()) + 1;
    workers_.emplace_back([this, index] { worker_main(index); });
    worker_count_.store(static_cast<int>(workers_.size()), std::memory_order_release);
  }
  task_ = task;
  ctx_ = ctx;
  threads_.store(threads, std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  const uint64_t job = (job_.load(std::memory_order_relaxed) >> 16) + 1;
  claim_.store((job << 16) | 1, std::memory_order_release);  // slot 0 is the caller's
  job_.store((job << 16) | static_cast<uint64_t>(n), std::memory_order_release);
  job_.notify_all();
  task(ctx, 0, n);
  int finished = 1;
  for (int t; (t = claim(job, n)) >= 0; ++finished) task(ctx, t, n);
  // Slots claimed by workers: wait for them.
  for (int i = 0; done_.load(std::memory_order_acquire) + finished < n; ++i) wait_pause(i);
}

void ThreadPool::worker_main(int index) {
  uint64_t seen = 0;
  for (;;) {
    uint64_t now = job_.load(std::memory_order_acquire);
    for (int i = 0; now == seen && i < kSpinsBeforeSleep; ++i) {
      cpu_pause();
      now = job_.load(std::memory_order_acquire);
    }
    while (now == seen) {
      job_.wait(seen, std::memory_order_acquire);
      now = job_.load(std::memory_order_acquire);
    }
    seen = now;
    if (stop_.load(std::memory_order_acquire)) return;
    // threads_ was stored before the release store of job_ we acquired; a newer job may have
    // changed it since, but then claim() fails for this job anyway.
    if (index >= threads_.load(std::memory_order_relaxed)) continue;
    const uint64_t job = now >> 16;
    const int n = static_cast<int>(now & 0xffff);
    for (int t; (t = claim(job, n)) >= 0;) {
      task_(ctx_, t, n);
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }
}

}  // namespace bnorm::cpu
