#include "cpu/thread_pool.h"

#include <dlfcn.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace bnorm::cpu {
namespace {

// libgomp's entry point of `#pragma omp parallel` (its ABI since GCC 4.9): runs fn(data) on a
// team of num_threads threads, the caller included, and returns when all have returned.
using GompParallel = void (*)(void (*fn)(void*), void* data, unsigned num_threads,
                              unsigned flags);
std::atomic<GompParallel> g_gomp_parallel{nullptr};

// The libgomp already in the process, or null: RTLD_NOLOAD never loads it.
GompParallel loaded_gomp_parallel() {
  void* handle = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr) return nullptr;
  auto fn = reinterpret_cast<GompParallel>(dlsym(handle, "GOMP_parallel"));
  // The handle stays open: the runtime must outlive every job that uses it.
  return fn;
}

struct OpenmpJob {
  ThreadPool::Task task;
  void* ctx;
  int slots;
  std::atomic<int> next{0};
};

void openmp_body(void* data) {
  auto* job = static_cast<OpenmpJob*>(data);
  for (int t; (t = job->next.fetch_add(1, std::memory_order_relaxed)) < job->slots;)
    job->task(job->ctx, t, job->slots);
}

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

bool ThreadPool::use_openmp(bool on) {
  g_gomp_parallel.store(on ? loaded_gomp_parallel() : nullptr, std::memory_order_release);
  return using_openmp();
}

bool ThreadPool::using_openmp() {
  return g_gomp_parallel.load(std::memory_order_acquire) != nullptr;
}

void ThreadPool::run(int threads, int n, Task task, void* ctx) {
  n = n < 1 ? 1 : (n > kMaxSlots ? kMaxSlots : n);
  threads = threads < 1 ? 1 : (threads > n ? n : threads);
  if (threads > 1) {
    if (GompParallel gomp = g_gomp_parallel.load(std::memory_order_acquire)) {
      // Slots are claimed as in the pool, so a slow team member delays nothing it has not
      // claimed; which thread runs a slot never changes the results.
      OpenmpJob job{task, ctx, n};
      gomp(&openmp_body, &job, static_cast<unsigned>(threads), 0);
      return;
    }
  }
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
