#include "util/staging.h"

namespace bnorm::detail {

void widen_to_fp32(ConstTensorView t, int64_t numel, std::vector<float>* out) {
  out->resize(static_cast<size_t>(numel));
  float* o = out->data();
  if (t.dtype() == DType::kBFloat16) {
    const bfloat16* in = t.data_as<bfloat16>();
    for (int64_t k = 0; k < numel; ++k) o[k] = to_float(in[k]);
  } else {
    const float16* in = t.data_as<float16>();
    for (int64_t k = 0; k < numel; ++k) o[k] = to_float(in[k]);
  }
}

void narrow_from_fp32(const std::vector<float>& in, TensorView t) {
  const float* p = in.data();
  const auto numel = static_cast<int64_t>(in.size());
  if (t.dtype() == DType::kBFloat16) {
    bfloat16* out = t.data_as<bfloat16>();
    for (int64_t k = 0; k < numel; ++k) out[k] = to_bfloat16(p[k]);
  } else {
    float16* out = t.data_as<float16>();
    for (int64_t k = 0; k < numel; ++k) out[k] = to_float16(p[k]);
  }
}

}  // namespace bnorm::detail
