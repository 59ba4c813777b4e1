// The scalar reference kernels: the definition of "correct".
//
// Written for the reader, never optimized: one loop per math step, fp64 accumulation and
// two-pass statistics. The element type T is float (what the library runs) or double (what the
// tests use for finite differences in fp64). Per-channel vectors are fp64; a null weight means
// 1 and a null bias 0.
#ifndef BNORM_SRC_REFERENCE_REFERENCE_H_
#define BNORM_SRC_REFERENCE_REFERENCE_H_

#include <cstdint>

#include "kernels.h"

namespace bnorm::ref {

using detail::Geometry;

// stats: per channel, mean = (1/n) sum x and the biased variance var = (1/n) sum (x - mean)^2,
// the second sum taken around the mean of the first pass (two-pass).
template <class T>
void stats(const Geometry& g, const T* x, double* mean, double* var);

// finalize: one function for every implementation (kernels.h).
using detail::finalize;

// apply: y = weight * (x - mean) * invstd + bias. y may equal x.
template <class T>
void apply(const Geometry& g, const T* x, const double* mean, const double* invstd,
           const double* weight, const double* bias, T* y);

// apply_relu: the fused activation, y = max(weight * (x - mean) * invstd + bias [+ z], 0) in
// fp64, rounded once (z null: no add; NaN is kept, as torch.relu). y may equal x or z.
template <class T>
void apply_relu(const Geometry& g, const T* x, const double* mean, const double* invstd,
                const double* weight, const double* bias, const T* z, T* y);

// relu_mask: the gradient through the fused ReLU, out = dy where y > 0, else 0 (exact). out may
// equal dy.
template <class T>
void relu_mask(const Geometry& g, const T* dy, const T* y, T* out);

// backward_reduce: sum_dy = sum dy, sum_dy_xhat = sum dy * (x - mean) * invstd.
template <class T>
void backward_reduce(const Geometry& g, const T* dy, const T* x, const double* mean,
                     const double* invstd, double* sum_dy, double* sum_dy_xhat);

// backward_apply: training: dx = weight * invstd / n * (n * dy - sum_dy - xhat * sum_dy_xhat);
// eval (statistics constant): dx = dy * weight * invstd. dx may equal dy or x. count: the n of
// the sums (0: g.count(); sync batch norm passes the global batch's).
template <class T>
void backward_apply(const Geometry& g, const T* dy, const T* x, const double* mean,
                    const double* invstd, const double* weight, const double* sum_dy,
                    const double* sum_dy_xhat, bool training, T* dx, int64_t count = 0);

// The three whole passes on fp32 buffers, composed from the kernels above.
void forward_train(const detail::TrainCall& call);
void forward_eval(const detail::EvalCall& call);
void backward(const detail::BackwardCall& call);

}  // namespace bnorm::ref

#endif  // BNORM_SRC_REFERENCE_REFERENCE_H_
