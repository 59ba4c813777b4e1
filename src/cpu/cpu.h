// The fast CPU kernels: Highway SIMD (one dynamic dispatch per call) on our own thread pool.
//
// Same passes and signatures as the reference (src/reference/reference.h, namespace bnorm::ref)
// for float data, so the tests compare them one to one. Every entry point dispatches once to the
// best target the CPU supports (hwy::SetSupportedTargetsForTest narrows it in tests) and runs on
// bnorm::num_threads() threads. Results are bitwise identical for every thread count: the
// reductions are split into blocks that depend on the shape only (plan.h) and merged in a fixed
// order. docs/design.md describes partitioning, numerics and memory traffic.
//
// No SIMD type appears here; the per-target code lives in the .cc files.
#ifndef BNORM_SRC_CPU_CPU_H_
#define BNORM_SRC_CPU_CPU_H_

#include <cstdint>

#include "kernels.h"

namespace bnorm::cpu {

using detail::Geometry;

// stats: per channel, mean and biased variance, from sums of x - pivot and (x - pivot)^2 (the
// pivot is the channel's first element) in short fp32 runs then fp64, per block, added in block
// order; a channel outside the proven error bound is summed again in fp64 (stats.cc).
void stats(const Geometry& g, const float* x, double* mean, double* var);

// finalize: one function for every implementation (kernels.h).
using detail::finalize;

// apply: y = weight * (x - mean) * invstd + bias, in fp32 as y = (x - m) * a + b. y may equal x.
void apply(const Geometry& g, const float* x, const double* mean, const double* invstd,
           const double* weight, const double* bias, float* y);

// backward_reduce: sum_dy = sum dy, sum_dy_xhat = sum dy * (x - mean) * invstd (short fp32 runs
// summed in fp64, as stats).
void backward_reduce(const Geometry& g, const float* dy, const float* x, const double* mean,
                     const double* invstd, double* sum_dy, double* sum_dy_xhat);

// backward_apply: as the reference. dx may equal dy or x. count: the n of the sums (0: g.count();
// sync batch norm passes the global batch's).
void backward_apply(const Geometry& g, const float* dy, const float* x, const double* mean,
                    const double* invstd, const double* weight, const double* sum_dy,
                    const double* sum_dy_xhat, bool training, float* dx, int64_t count = 0);

// The three whole passes (the Implementation listed first in implementations.cc).
void forward_train(const detail::TrainCall& call);
void forward_eval(const detail::EvalCall& call);
void backward(const detail::BackwardCall& call);

// The whole passes on bf16 and fp16 tensors (native: the elements are read and written in 16
// bits, widened to fp32 exactly, computed as the fp32 passes compute them and rounded to nearest
// even once on output), bit for bit the fp32 passes on the widened tensors with rounded outputs.
void forward_train_bf16(const detail::TrainCallOf<bfloat16>& call);
void forward_eval_bf16(const detail::EvalCallOf<bfloat16>& call);
void backward_bf16(const detail::BackwardCallOf<bfloat16>& call);
void forward_train_f16(const detail::TrainCallOf<float16>& call);
void forward_eval_f16(const detail::EvalCallOf<float16>& call);
void backward_f16(const detail::BackwardCallOf<float16>& call);

// The staged 16-bit calls' conversions (util/staging.h), on the pool: out = the n elements of
// in (dtype bf16 or fp16) widened to fp32, exactly; and out (dtype) = in rounded to nearest even.
void widen_to_fp32(DType dtype, const void* in, float* out, int64_t n);
void narrow_from_fp32(DType dtype, const float* in, void* out, int64_t n);

}  // namespace bnorm::cpu

#endif  // BNORM_SRC_CPU_CPU_H_
