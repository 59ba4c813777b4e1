// The separate ReLU passes of the "bnorm unfused" rows: what a user runs after bnorm's plain
// batch norm when not using the fused calls. Plain loops the compiler vectorizes (-O3, cloned
// for AVX-512, AVX2 and the baseline; relu_passes.cc), split over a small persistent team of
// threads, so the pair runs on as many threads as the fused call.
#ifndef BNORM_BENCH_RELU_PASSES_H_
#define BNORM_BENCH_RELU_PASSES_H_

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace bench {

// y = relu(y), NaN kept (as torch.relu and bnorm's fused calls).
void relu_inplace(float* y, size_t n);
// y = relu(y + z).
void add_relu_inplace(float* y, const float* z, size_t n);
// g = dy * (y > 0): the ReLU's backward from its output, as bnorm's backward_relu masks.
void relu_mask(const float* dy, const float* y, float* g, size_t n);

// The same passes on 16-bit elements (bit patterns of bf16 when bf16 is true, else IEEE fp16),
// for the 16-bit unfused rows. relu and the mask work on the bits (a negative, non-NaN value
// becomes +0; y > 0 is a clear sign bit and a nonzero, non-NaN magnitude); the add widens both
// to fp32 (exact), adds, and rounds once to nearest even, as a 16-bit tensor add does.
void relu_inplace16(uint16_t* y, size_t n, bool bf16);
void add_relu_inplace16(uint16_t* y, const uint16_t* z, size_t n, bool bf16);
void relu_mask16(const uint16_t* dy, const uint16_t* y, uint16_t* g, size_t n, bool bf16);

// Runs body(begin, end) over [0, n) split in `threads` contiguous 64-byte aligned parts, the
// caller taking part 0; below 2 x kGrain elements the caller runs it alone (PyTorch's
// parallel_for grain: waking a thread costs more than such a pass). Workers spin briefly
// between jobs (back-to-back calls start without a wakeup) and then sleep, so an idle team does
// not take a core from the timed kernels.
class WorkerTeam {
 public:
  explicit WorkerTeam(int threads) : threads_(std::max(1, threads)) {
    for (int t = 1; t < threads_; ++t) workers_.emplace_back([this, t] { work(t); });
  }
  ~WorkerTeam() {
    stop_.store(true, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_acq_rel);
    generation_.notify_all();
    for (auto& w : workers_) w.join();
  }
  WorkerTeam(const WorkerTeam&) = delete;
  WorkerTeam& operator=(const WorkerTeam&) = delete;

  static constexpr size_t kGrain = 32768;

  void run(size_t n, const std::function<void(size_t, size_t)>& body) {
    if (threads_ == 1 || n < 2 * kGrain) {
      body(0, n);
      return;
    }
    n_ = n;
    body_ = &body;
    pending_.store(threads_ - 1, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_acq_rel);
    generation_.notify_all();
    part(0);
    for (int i = 0; pending_.load(std::memory_order_acquire) != 0; ++i) pause(i);
  }

 private:
  static void pause(int i) {
#if defined(__x86_64__)
    if (i < 4096) {
      _mm_pause();
      return;
    }
#endif
    std::this_thread::yield();
  }
  void part(int t) {
    const size_t chunk = (n_ / threads_ + 15) / 16 * 16;  // floats, 64-byte multiples
    const size_t begin = std::min(n_, chunk * t), end = std::min(n_, begin + chunk);
    if (t == threads_ - 1) (*body_)(begin, n_);
    else if (begin < end) (*body_)(begin, end);
  }
  void work(int t) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t g = generation_.load(std::memory_order_acquire);
      for (int i = 0; g == seen && i < 4000; ++i) {  // some tens of microseconds
#if defined(__x86_64__)
        _mm_pause();
#endif
        g = generation_.load(std::memory_order_acquire);
      }
      if (g == seen) {
        generation_.wait(seen, std::memory_order_acquire);
        continue;
      }
      seen = g;
      if (stop_.load(std::memory_order_acquire)) return;
      part(t);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  const int threads_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  size_t n_ = 0;
  const std::function<void(size_t, size_t)>* body_ = nullptr;
};

}  // namespace bench

#endif  // BNORM_BENCH_RELU_PASSES_H_
