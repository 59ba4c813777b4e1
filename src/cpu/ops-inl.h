// Per-target declarations of the block kernels (defined in stats.cc, apply.cc,
// backward_reduce.cc, backward_apply.cc), so that passes.cc composes them within one target:
// one dynamic dispatch per call. Included once per target by foreach_target.h.
#if defined(BNORM_SRC_CPU_OPS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef BNORM_SRC_CPU_OPS_INL_H_
#undef BNORM_SRC_CPU_OPS_INL_H_
#else
#define BNORM_SRC_CPU_OPS_INL_H_
#endif

#include "cpu/internal.h"
#include "cpu/plan.h"
#include "hwy/highway.h"
#include "kernels.h"

HWY_BEFORE_NAMESPACE();
namespace bnorm::cpu::HWY_NAMESPACE {

using detail::Geometry;

// Per channel of the block: sum (x - pivot[c]) and sum (x - pivot[c])^2 in fp64, into
// partials[slot + k] and partials[slot + width + k] (k = c - c0, width = c1 - c0).
// Sums in fp32 lanes, kFlushTerms terms at most, then in fp64 (stats.cc).
void stats_block(const Plan& p, const float* x, const Block& b, const double* pivot,
                 double* partials);

// y = ((x - mhi) - mlo) * a + b over the block; streaming stores when `stream`.
void apply_block(const Plan& p, const float* x, const Block& b, const ApplyParams& q, float* y,
                 bool stream);

// The apply kernel over the whole tensor on the pool (forward_eval's pass).
void apply_with_params(const Geometry& g, const float* x, const ApplyParams& q, float* y);

// Per channel of the block: sum dy and sum dy * (x - m[c]) in fp64, into the partial slots.
void backward_reduce_block(const Plan& p, const float* dy, const float* x, const Block& b,
                           const float* m, double* partials);

// dx = alpha * dy + beta * (x - m) + gamma over the block; streaming stores when `stream`.
// Eval (`training` false): dx = alpha * dy, x unread.
void backward_apply_block(const Plan& p, const float* dy, const float* x, const Block& b,
                          const BackwardParams& q, bool training, float* dx, bool stream);

// The backward apply kernel over the whole tensor on the pool.
void backward_apply_with_params(const Geometry& g, const float* dy, const float* x,
                                const BackwardParams& q, bool training, float* dx);

}  // namespace bnorm::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // BNORM_SRC_CPU_OPS_INL_H_
