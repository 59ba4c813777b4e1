// Internal contract between the validating front end (batch_norm.cc) and the kernels.
//
// Everything here has been validated: dims > 0, no overflow, sizes match, pointers that must be
// set are set, eps and momentum are in range. Kernels below this line cannot fail, so a call
// either fails in validation (nothing written) or completes.
//
// An implementation provides the three whole passes; how it splits them into stats / finalize /
// apply / backward_reduce / backward_apply is its own business. The list of implementations is
// in implementations.cc, reference last.
#ifndef BNORM_SRC_KERNELS_H_
#define BNORM_SRC_KERNELS_H_

#include <cstdint>
#include <exception>
#include <new>

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

struct TrainCall {
  Geometry g;
  const float* x = nullptr;
  const float* weight = nullptr;  // null: 1
  const float* bias = nullptr;    // null: 0
  float* running_mean = nullptr;  // both null or both set
  float* running_var = nullptr;
  double factor = 0;  // running-stat factor f (momentum or 1/num_batches_tracked)
  double eps = 0;
  float* y = nullptr;            // may equal x
  float* save_mean = nullptr;    // optional
  float* save_invstd = nullptr;  // optional
};

struct EvalCall {
  Geometry g;
  const float* x = nullptr;
  const float* weight = nullptr;
  const float* bias = nullptr;
  const float* running_mean = nullptr;
  const float* running_var = nullptr;
  double eps = 0;
  float* y = nullptr;  // may equal x
};

struct BackwardCall {
  Geometry g;
  const float* dy = nullptr;
  const float* x = nullptr;
  const float* weight = nullptr;  // null: 1
  bool training = true;
  const float* save_mean = nullptr;     // set when training
  const float* save_invstd = nullptr;   // set when training
  const float* running_mean = nullptr;  // set when !training
  const float* running_var = nullptr;   // set when !training
  double eps = 0;
  float* dx = nullptr;       // may equal dy or x
  float* dweight = nullptr;  // optional
  float* dbias = nullptr;    // optional
};

struct Implementation {
  const char* name;
  void (*forward_train)(const TrainCall&);
  void (*forward_eval)(const EvalCall&);
  void (*backward)(const BackwardCall&);
};

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

}  // namespace bnorm::detail

#endif  // BNORM_SRC_KERNELS_H_
