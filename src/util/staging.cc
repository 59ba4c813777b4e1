#include "util/staging.h"

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#include "cpu/cpu.h"

namespace bnorm::detail {

namespace {

struct Cached {
  float* data;
  size_t capacity;  // floats
};

struct Cache {
  std::mutex mutex;
  std::vector<Cached> buffers;  // at most kCachedBuffers
  size_t bytes = 0;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: staged calls may run during exit
  return *c;
}

}  // namespace

Fp32Copy::~Fp32Copy() {
  if (data_ == nullptr) return;
  Cache& c = cache();
  const size_t bytes = capacity_ * sizeof(float);
  std::lock_guard<std::mutex> lock(c.mutex);
  if (bytes <= kCachedBytes) {
    c.buffers.push_back({data_, capacity_});
    c.bytes += bytes;
    data_ = nullptr;
    // Over the limits: free the smallest first.
    std::sort(c.buffers.begin(), c.buffers.end(),
              [](const Cached& x, const Cached& y) { return x.capacity > y.capacity; });
    while (static_cast<int>(c.buffers.size()) > kCachedBuffers || c.bytes > kCachedBytes) {
      c.bytes -= c.buffers.back().capacity * sizeof(float);
      std::free(c.buffers.back().data);
      c.buffers.pop_back();
    }
  }
  std::free(data_);
}

void Fp32Copy::allocate(int64_t n) {
  const auto want = static_cast<size_t>(n > 0 ? n : 1);
  if (data_ != nullptr && capacity_ >= want) {
    size_ = n;
    return;
  }
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    // The smallest cached buffer that holds n floats (sorted largest first).
    for (size_t k = c.buffers.size(); k-- > 0;) {
      if (c.buffers[k].capacity < want) continue;
      std::free(data_);
      data_ = c.buffers[k].data;
      capacity_ = c.buffers[k].capacity;
      c.bytes -= capacity_ * sizeof(float);
      c.buffers.erase(c.buffers.begin() + static_cast<std::ptrdiff_t>(k));
      size_ = n;
      return;
    }
  }
  void* p = std::malloc(want * sizeof(float));
  if (p == nullptr) throw std::bad_alloc();
  std::free(data_);
  data_ = static_cast<float*>(p);
  capacity_ = want;
  size_ = n;
}

void widen_to_fp32(ConstTensorView t, int64_t numel, Fp32Copy* out) {
  out->allocate(numel);
  cpu::widen_to_fp32(t.dtype(), t.raw(), out->data(), numel);
}

void narrow_from_fp32(const Fp32Copy& in, TensorView t) {
  cpu::narrow_from_fp32(t.dtype(), in.data(), t.raw(), in.size());
}

}  // namespace bnorm::detail
