#include "util/staging.h"

#include "cpu/cpu.h"

namespace bnorm::detail {

void widen_to_fp32(ConstTensorView t, int64_t numel, Fp32Copy* out) {
  out->allocate(numel);
  cpu::widen_to_fp32(t.dtype(), t.raw(), out->data(), numel);
}

void narrow_from_fp32(const Fp32Copy& in, TensorView t) {
  cpu::narrow_from_fp32(t.dtype(), in.data(), t.raw(), in.size());
}

}  // namespace bnorm::detail
