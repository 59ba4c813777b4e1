// bf16 / fp16 tensors through fp32 copies: widening is exact and narrowing rounds to nearest
// even (bnorm/tensor.h), so a staged call gives the fp32 pass's results rounded once. The
// passes without a native 16-bit kernel run this way (batch_norm.cc, sync_batch_norm.cc).
#ifndef BNORM_SRC_UTIL_STAGING_H_
#define BNORM_SRC_UTIL_STAGING_H_

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "bnorm/tensor.h"

namespace bnorm::detail {

// out = the numel elements of t (bf16 or fp16) in fp32. May throw std::bad_alloc.
void widen_to_fp32(ConstTensorView t, int64_t numel, std::vector<float>* out);

// t's elements (bf16 or fp16) = in, rounded to nearest even.
void narrow_from_fp32(const std::vector<float>& in, TensorView t);

// An fp32 view of `data` with t's dims and layout.
inline TensorView fp32_view_like(ConstTensorView t, float* data) {
  std::array<int64_t, kMaxRank> dims{};
  for (int i = 0; i < t.rank() && i < kMaxRank; ++i) dims[i] = t.dim(i);
  return TensorView(data, std::span<const int64_t>(dims.data(), static_cast<size_t>(t.rank())),
                    t.layout());
}

}  // namespace bnorm::detail

#endif  // BNORM_SRC_UTIL_STAGING_H_
