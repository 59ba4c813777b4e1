#include <atomic>
#include <cstdlib>
#include <thread>

#include "bnorm/batch_norm.h"
#include "cpu/thread_pool.h"

namespace bnorm {
namespace {

std::atomic<int> g_requested{0};  // 0: the default

int default_threads() {
  if (const char* env = std::getenv("BNORM_NUM_THREADS")) {
    char* end = nullptr;
    long v = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && v > 0 && v <= 1024) return static_cast<int>(v);
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

}  // namespace

void set_num_threads(int n) { g_requested.store(n > 0 ? n : 0, std::memory_order_relaxed); }

bool use_openmp_threads(bool on) { return cpu::ThreadPool::use_openmp(on); }

int num_threads() {
  int n = g_requested.load(std::memory_order_relaxed);
  return n > 0 ? n : default_threads();
}

}  // namespace bnorm
