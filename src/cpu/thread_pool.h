// A small persistent thread pool for the CPU kernels (Highway 1.0.3 has none).
//
// One job at a time: run(threads, slots, task, ctx) calls task(ctx, t, slots) once for every slot
// t = 0..slots-1 on up to `threads` threads (the caller and threads - 1 workers) and returns when
// all have returned. Threads claim slots one by one, so with more slots than threads the work
// balances itself when a thread is slow (a busy or oversubscribed machine), and a worker slow to
// wake delays nothing: the caller takes the slots it has not claimed. Tasks therefore must not wait
// for each other (no barriers inside a task); the kernels split a pass into several jobs instead.
// Workers are created the first time a job needs them and live until the process exits; between
// jobs they spin briefly (back-to-back jobs start without a wakeup) and then sleep.
//
// With use_openmp(true), jobs run on the host's OpenMP threads instead (below).
//
// Thread safety: run() may be called from any thread. When the pool is busy with another
// caller's job, or n <= 1, the caller runs every slot itself. Results never depend on which
// thread runs a slot.
#ifndef BNORM_SRC_CPU_THREAD_POOL_H_
#define BNORM_SRC_CPU_THREAD_POOL_H_

#include <atomic>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace bnorm::cpu {

class ThreadPool {
 public:
  using Task = void (*)(void* ctx, int slot, int slot_count);

  // The process-wide pool the kernels use.
  static ThreadPool& instance();

  ThreadPool() = default;
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Runs task for slots 0..slots-1 on at most `threads` threads (see above); both are clamped
  // to [1, 1024].
  void run(int threads, int slots, Task task, void* ctx);
  void run(int n, Task task, void* ctx) { run(n, n, task, ctx); }

  // Worker threads created so far (for tests).
  int worker_count() const;

  // Process-wide: on, jobs of more than one thread run on the OpenMP runtime (libgomp) that is
  // already loaded in the process, e.g. by PyTorch, instead of this pool's workers: its idle
  // threads, which spin between the host's parallel regions, take the slots, instead of
  // competing for the cores with ours. Returns whether that runtime is in use now: false when
  // off, or when no libgomp is loaded (then the pool's own workers run the jobs). bnorm never
  // loads or links OpenMP itself.
  static bool use_openmp(bool on);
  static bool using_openmp();

 private:
  void worker_main(int index);
  // Claims the next unclaimed slot of job `job` (job counter in the high bits); -1 when none.
  int claim(uint64_t job, int n);

  std::mutex busy_;                   // held for a whole job
  std::vector<std::thread> workers_;  // guarded by busy_
  std::atomic<int> worker_count_{0};
  // The current job: task_ and ctx_ are published by the release store to job_, whose low 16
  // bits hold the slot count and the rest a job counter; workers with an index >= threads_ stay
  // out of it. claim_ holds (job counter, next slot),
  // so a worker that wakes after its job ended can never claim a slot of a later job.
  Task task_ = nullptr;
  void* ctx_ = nullptr;
  std::atomic<uint64_t> job_{0};
  std::atomic<int> threads_{0};
  std::atomic<uint64_t> claim_{0};
  std::atomic<int> done_{0};  // slots finished in the current job
  std::atomic<bool> stop_{false};
};

}  // namespace bnorm::cpu

#endif  // BNORM_SRC_CPU_THREAD_POOL_H_
