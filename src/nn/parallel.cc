#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BNORM_NN_PAUSE() _mm_pause()
#else
#define BNORM_NN_PAUSE() ((void)0)
#endif

namespace bnorm::nn::detail {
namespace {

thread_local bool t_in_task = false;

// Work is handed out in chunks claimed from one atomic word, so a participant that is late (a
// worker still waking up, or descheduled by another process) simply gets fewer chunks; the caller
// never waits for a worker that has not started. next_ packs (generation:32, chunks:16, next:16):
// a claim succeeds only for the current generation and below the chunk count, and only after a
// successful claim does a worker read the job, which stays valid until every claimed chunk is done.
class Pool {
 public:
  explicit Pool(int threads) : threads_(std::max(1, threads)) {
    // Each worker starts from generation 0, the one the pool has now, not from the one it finds
    // when its thread first runs: under load a thread may start after the pool has moved on or
    // even been told to stop, and would then wait for a generation that never comes.
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this] { loop(0); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      stop_.store(true, std::memory_order_release);
      gen_.fetch_add(1, std::memory_order_seq_cst);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int threads() const { return threads_; }

  static constexpr int kMaxChunks = 0xffff;

  // Requires busy_ held by the caller and 1 <= chunks <= kMaxChunks.
  void run(int chunks, const std::function<void(int)>& fn) {
    job_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    const uint32_t g = static_cast<uint32_t>(gen_.load(std::memory_order_relaxed)) + 1;
    next_.store((uint64_t{g} << 32) | (uint64_t(chunks) << 16), std::memory_order_release);
    gen_.store(g, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lock(sleep_mutex_); }
      wake_.notify_all();
    }
    const bool was_in_task = t_in_task;
    t_in_task = true;
    work(g);
    t_in_task = was_in_task;
    for (int spins = 0; done_.load(std::memory_order_acquire) != chunks; ++spins) {
      if (spins < 20000) {
        BNORM_NN_PAUSE();
      } else {
        std::this_thread::yield();
      }
    }
  }

  std::mutex busy_;

 private:
  // Claims and runs chunks of generation g until none is left.
  void work(uint32_t g) {
    uint64_t v = next_.load(std::memory_order_acquire);
    for (;;) {
      if ((v >> 32) != g) return;
      const uint64_t idx = v & 0xffff, total = (v >> 16) & 0xffff;
      if (idx >= total) return;
      if (!next_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel,
                                       std::memory_order_acquire))
        continue;
      (*job_)(static_cast<int>(idx));
      done_.fetch_add(1, std::memory_order_acq_rel);
      v = next_.load(std::memory_order_acquire);
    }
  }

  void loop(uint32_t seen) {
    t_in_task = true;
    for (;;) {
      // Spin briefly (the next parallel region usually follows within microseconds), then sleep.
      uint32_t g = gen_.load(std::memory_order_acquire);
      for (int spins = 0; g == seen && spins < 4000; ++spins) {
        BNORM_NN_PAUSE();
        g = gen_.load(std::memory_order_acquire);
      }
      if (g == seen) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        wake_.wait(lock, [&] { return gen_.load(std::memory_order_seq_cst) != seen; });
        sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        continue;
      }
      seen = g;
      if (stop_.load(std::memory_order_acquire)) return;
      work(g);
    }
  }

  const int threads_;
  std::vector<std::thread> workers_;
  std::atomic<uint32_t> gen_{0};
  std::atomic<uint64_t> next_{0};
  std::atomic<int> done_{0};
  std::atomic<int> sleepers_{0};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<bool> stop_{false};
  const std::function<void(int)>* job_ = nullptr;
};

std::mutex g_config_mutex;
std::shared_ptr<Pool> g_pool;  // guarded by g_config_mutex
std::atomic<int> g_threads{0};

int hardware_threads() { return std::max(1, static_cast<int>(std::thread::hardware_concurrency())); }

std::shared_ptr<Pool> current_pool() {
  std::lock_guard<std::mutex> lock(g_config_mutex);
  if (!g_pool) {
    int n = g_threads.load();
    if (n <= 0) n = hardware_threads();
    g_threads.store(n);
    g_pool = std::make_shared<Pool>(n);
  }
  return g_pool;
}

}  // namespace

int nn_threads() {
  const int n = g_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : current_pool()->threads();
}

void set_nn_threads(int n) {
  if (n <= 0) n = hardware_threads();
  std::shared_ptr<Pool> old;
  {
    std::lock_guard<std::mutex> lock(g_config_mutex);
    if (g_pool && g_pool->threads() == n) return;
    old = std::move(g_pool);
    g_threads.store(n);
    g_pool = std::make_shared<Pool>(n);
  }
  // A call still running on the old pool keeps it alive through its shared_ptr; the last owner
  // joins its workers.
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int threads = nn_threads();
  // A few chunks per thread balance the load when a core is busy with something else.
  const int64_t chunks =
      std::min<int64_t>({int64_t{4} * threads, (n + grain - 1) / grain, Pool::kMaxChunks});
  if (threads <= 1 || chunks <= 1 || t_in_task) {
    fn(0, n);
    return;
  }
  std::shared_ptr<Pool> pool = current_pool();
  std::unique_lock<std::mutex> lock(pool->busy_, std::try_to_lock);
  if (!lock.owns_lock()) {
    fn(0, n);
    return;
  }
  const int c = static_cast<int>(chunks);
  pool->run(c, [&](int i) {
    const int64_t b = n * i / c, e = n * (i + 1) / c;
    if (b < e) fn(b, e);
  });
}

}  // namespace bnorm::nn::detail
