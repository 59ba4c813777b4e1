// A parameter or buffer of a network, by the name PyTorch's state_dict gives it.
//
// The nn modules expose their state as a list of StateEntry (Module::state_dict()), and the
// checkpoint code (safetensors) reads and writes through that list. An entry does not own its
// memory: the pointers stay valid as long as the module that returned them.
#ifndef BNORM_NN_STATE_H_
#define BNORM_NN_STATE_H_

#include <cstdint>
#include <string>
#include <vector>

namespace bnorm::nn {

enum class DType : int { kF32 = 0, kI64 = 1 };

struct StateEntry {
  std::string name;            // "0.weight", "1.running_mean", "1.num_batches_tracked"
  DType dtype = DType::kF32;   // kI64 only for num_batches_tracked
  std::vector<int64_t> shape;  // PyTorch's shape: Linear weight [out, in], Conv2d [out, in, kh, kw],
                               // num_batches_tracked [] (a scalar)
  void* data = nullptr;        // float* for kF32, int64_t* for kI64; contiguous, row-major
  bool is_parameter = false;   // learnable (weight, bias); buffers (running stats) are not
  float* grad = nullptr;       // the gradient of a parameter (same shape), else null
  bool grad_is_global = false; // the gradient is already the global batch's, identical on every
                               // rank (synchronized batch norm): data-parallel training does
                               // not all-reduce it

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

}  // namespace bnorm::nn

#endif  // BNORM_NN_STATE_H_
