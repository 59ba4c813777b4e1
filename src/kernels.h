// Internal contract between the validating front end (batch_norm.cc) and the kernels.
//
// Everything here has been validated: dims > 0, no overflow, sizes match, pointers that must be
// set are set, eps and momentum are in range. Kernels below this line cannot fail, so a call
// either fails in validation (nothing written) or completes.
//
// An implementation provides each pass (stats, apply, backward_reduce, backward_apply; finalize
// is one function for all, below) and the three whole passes composed from them, so that callers
// which compose the passes themselves (sync batch norm, the kernel tester) take an
// implementation and never branch on its name. The list of implementations is in
// implementations.cc, reference last.
#ifndef BNORM_SRC_KERNELS_H_
#define BNORM_SRC_KERNELS_H_

#include <cstdint>
#include <exception>
#include <new>
#include <span>
#include <type_traits>

#include "bnorm/batch_norm.h"
#include "bnorm/tensor.h"

namespace bnorm::detail {

// x viewed as (N, C, S) channels-first or (N, S, C) channels-last.
struct Geometry {
  Layout layout = Layout::kChannelsFirst;
  int64_t n = 0;  // batch
  int64_t c = 0;  // channels
  int64_t s = 0;  // product of the spatial dims

  int64_t count() const { return n * s; }  // elements per channel
  int64_t numel() const { return n * c * s; }
  // Memory index of logical element (i, channel, j).
  int64_t index(int64_t i, int64_t channel, int64_t j) const {
    return layout == Layout::kChannelsFirst ? (i * c + channel) * s + j : (i * s + j) * c + channel;
  }
};

// The whole passes' calls, on tensors of element type E (float, bfloat16 or float16); the
// per-channel vectors are fp32 whatever E is.
template <class E>
struct TrainCallOf {
  Geometry g;
  const E* x = nullptr;
  const float* weight = nullptr;  // null: 1
  const float* bias = nullptr;    // null: 0
  float* running_mean = nullptr;  // both null or both set
  float* running_var = nullptr;
  double factor = 0;  // running-stat factor f (momentum or 1/num_batches_tracked)
  double eps = 0;
  E* y = nullptr;                // may equal x
  float* save_mean = nullptr;    // optional
  float* save_invstd = nullptr;  // optional
  // Fused activation: y = relu(bn(x) [+ z]). z (optional, only with relu) may equal y.
  bool relu = false;
  const E* z = nullptr;
};

template <class E>
struct EvalCallOf {
  Geometry g;
  const E* x = nullptr;
  const float* weight = nullptr;
  const float* bias = nullptr;
  const float* running_mean = nullptr;
  const float* running_var = nullptr;
  double eps = 0;
  E* y = nullptr;     // may equal x
  bool relu = false;  // fused activation, as TrainCall
  const E* z = nullptr;
};

template <class E>
struct BackwardCallOf {
  Geometry g;
  const E* dy = nullptr;
  const E* x = nullptr;
  const float* weight = nullptr;  // null: 1
  bool training = true;
  const float* save_mean = nullptr;     // set when training
  const float* save_invstd = nullptr;   // set when training
  const float* running_mean = nullptr;  // set when !training
  const float* running_var = nullptr;   // set when !training
  double eps = 0;
  E* dx = nullptr;           // may equal dy or x
  float* dweight = nullptr;  // optional
  float* dbias = nullptr;    // optional
  // Fused ReLU: y is the forward's output (dy is masked by y > 0; dx may equal y) and dz
  // (optional) receives the masked dy, the gradient of the added tensor; dz may equal dy and
  // overlaps nothing else.
  const E* y = nullptr;
  E* dz = nullptr;
};

using TrainCall = TrainCallOf<float>;
using EvalCall = EvalCallOf<float>;
using BackwardCall = BackwardCallOf<float>;

// finalize: invstd = 1 / sqrt(var + eps); when running_mean is not null, the running statistics
// move towards the batch ones by factor f, the variance with Bessel's correction n / (n - 1)
// (n = g.count()). Per channel, in fp64: one definition for every implementation.
void finalize(const Geometry& g, const double* mean, const double* var, double eps, double factor,
              double* invstd, float* running_mean, float* running_var);

// The passes of one implementation on fp32 data; each means what src/reference/reference.h
// says of the pass of the same name. Per-channel vectors are fp64; a null weight means 1 and a
// null bias 0.
struct Implementation {
  const char* name;
  // Per channel: mean and biased variance.
  void (*stats)(const Geometry& g, const float* x, double* mean, double* var);
  // y = weight * (x - mean) * invstd + bias. y may equal x.
  void (*apply)(const Geometry& g, const float* x, const double* mean, const double* invstd,
                const double* weight, const double* bias, float* y);
  // sum_dy = sum dy, sum_dy_xhat = sum dy * (x - mean) * invstd.
  void (*backward_reduce)(const Geometry& g, const float* dy, const float* x, const double* mean,
                          const double* invstd, double* sum_dy, double* sum_dy_xhat);
  // dx from the sums (count: their n, 0 for g.count()). dx may equal dy or x.
  void (*backward_apply)(const Geometry& g, const float* dy, const float* x, const double* mean,
                         const double* invstd, const double* weight, const double* sum_dy,
                         const double* sum_dy_xhat, bool training, float* dx, int64_t count);
  // The whole passes.
  void (*forward_train)(const TrainCall&);
  void (*forward_eval)(const EvalCall&);
  void (*backward)(const BackwardCall&);
  // The whole passes on bf16 and fp16 tensors, where the implementation has them (null: the
  // front end converts the tensors to fp32, runs the passes above and rounds the outputs, which
  // is what these must give bit for bit: every value is computed in fp32 as for fp32 data, and
  // rounded to nearest even once on output).
  void (*forward_train_bf16)(const TrainCallOf<bfloat16>&) = nullptr;
  void (*forward_eval_bf16)(const EvalCallOf<bfloat16>&) = nullptr;
  void (*backward_bf16)(const BackwardCallOf<bfloat16>&) = nullptr;
  void (*forward_train_f16)(const TrainCallOf<float16>&) = nullptr;
  void (*forward_eval_f16)(const EvalCallOf<float16>&) = nullptr;
  void (*backward_f16)(const BackwardCallOf<float16>&) = nullptr;
};

// The native pass of element type E, or null (the front end then stages through fp32).
template <class E>
auto native_forward_train(const Implementation& impl) {
  if constexpr (std::is_same_v<E, bfloat16>) return impl.forward_train_bf16;
  else return impl.forward_train_f16;
}
template <class E>
auto native_forward_eval(const Implementation& impl) {
  if constexpr (std::is_same_v<E, bfloat16>) return impl.forward_eval_bf16;
  else return impl.forward_eval_f16;
}
template <class E>
auto native_backward(const Implementation& impl) {
  if constexpr (std::is_same_v<E, bfloat16>) return impl.backward_bf16;
  else return impl.backward_f16;
}

// Runs a kernel pass: the kernels cannot fail, but may run out of memory (workspaces), which
// happens before their first write; that becomes a kInternal status.
template <class Fn>
Status run_kernels(Fn&& fn) {
  try {
    fn();
  } catch (const std::bad_alloc&) {
    return Status::internal("out of memory");
  } catch (const std::exception& e) {
    return Status::internal(e.what());
  }
  return Status();
}

// The implementation a call runs: the reference for Backend::kReference or when the
// environment variable BNORM_BACKEND=reference is set, else the first (fastest) in the list.
const Implementation& select_implementation(Backend backend);

// Every implementation, fastest first, the reference last (for tests).
std::span<const Implementation> implementations();

}  // namespace bnorm::detail

#endif  // BNORM_SRC_KERNELS_H_
