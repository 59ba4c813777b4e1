// bf16 / fp16 tensors through fp32 copies: widening is exact and narrowing rounds to nearest
// even (bnorm/tensor.h), so a staged call gives the fp32 pass's results rounded once. The
// passes without a native 16-bit kernel run this way (batch_norm.cc, sync_batch_norm.cc).
#ifndef BNORM_SRC_UTIL_STAGING_H_
#define BNORM_SRC_UTIL_STAGING_H_

#include <array>
#include <cstdint>
#include <memory>
#include <span>

#include "bnorm/tensor.h"

namespace bnorm::detail {

// An fp32 buffer that the conversion fills, allocated without being written first. Buffers are
// reused: a fresh one's first writes fault in every 4 KiB page, which cost twice the conversion
// itself on this project's VMs (a 100 MB staged call spent 70 % of its time there), so a
// released buffer goes to a small process-wide cache (at most kCachedBuffers, kCachedBytes in
// all; the largest are kept) that the next staged call of that size or smaller takes.
inline constexpr int kCachedBuffers = 4;
inline constexpr size_t kCachedBytes = size_t{2} << 30;

class Fp32Copy {
 public:
  Fp32Copy() = default;
  Fp32Copy(const Fp32Copy&) = delete;
  Fp32Copy& operator=(const Fp32Copy&) = delete;
  ~Fp32Copy();
  float* data() const { return data_; }
  int64_t size() const { return size_; }
  void allocate(int64_t n);  // may throw std::bad_alloc

 private:
  float* data_ = nullptr;
  int64_t size_ = 0;
  size_t capacity_ = 0;  // floats
};

// out = the numel elements of t (bf16 or fp16) in fp32, on the kernels' threads. May throw
// std::bad_alloc.
void widen_to_fp32(ConstTensorView t, int64_t numel, Fp32Copy* out);

// t's elements (bf16 or fp16) = in, rounded to nearest even, on the kernels' threads.
void narrow_from_fp32(const Fp32Copy& in, TensorView t);

// An fp32 view of `data` with t's dims and layout.
inline TensorView fp32_view_like(ConstTensorView t, float* data) {
  std::array<int64_t, kMaxRank> dims{};
  for (int i = 0; i < t.rank() && i < kMaxRank; ++i) dims[i] = t.dim(i);
  return TensorView(data, std::span<const int64_t>(dims.data(), static_cast<size_t>(t.rank())),
                    t.layout());
}

}  // namespace bnorm::detail

#endif  // BNORM_SRC_UTIL_STAGING_H_
