// bnorm::nn::Module: the interface every layer implements, PyTorch's nn.Module in small.
//
// Contract of a training step (what Sequential does, and what a caller of a single layer does):
//   forward(x, &y)   computes y from x and remembers x and y (by address, not by copy) for the
//                    next backward: both must stay alive and unmodified until backward returns.
//   backward(dy, dx) computes dx = dL/dx from dy = dL/dy of that forward and ACCUMULATES the
//                    parameter gradients (as PyTorch accumulates .grad); zero_grad() clears them.
//                    dx == nullptr skips the input gradient (the first layer of a network: no one
//                    needs it, and skipping it saves a GEMM).
// y and dx are resized by the call (allocation reused) and must not be x or dy.
//
// Errors: forward rejects an input of the wrong rank/shape, backward a dy whose shape is not the
// last forward's output shape or a call with no forward before it; each returns a Status naming
// the argument and its value ("Linear(784 -> 100): x: expected shape [N, 784], got [60, 785]").
// On error the module's parameters and buffers are unchanged (y or dx may have been resized).
//
// Modes: a module starts in training mode; train(false) / eval() switches it to eval mode
// (BatchNorm then uses its running statistics). Sequential propagates train() to its children.
//
// Thread safety: a module is not safe for concurrent use; distinct modules are independent.
// Modules are movable, not copyable.
#ifndef BNORM_NN_MODULE_H_
#define BNORM_NN_MODULE_H_

#include <string>
#include <vector>

#include "bnorm/nn/state.h"
#include "bnorm/nn/tensor.h"
#include "bnorm/status.h"

namespace bnorm {
class Communicator;         // bnorm/comm.h
enum class SyncMode : int;  // bnorm/comm.h
}  // namespace bnorm

namespace bnorm::nn {

class Module {
 public:
  Module() = default;
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;
  Module(Module&&) = default;
  Module& operator=(Module&&) = default;

  virtual Status forward(const Tensor& x, Tensor* y) = 0;
  virtual Status backward(const Tensor& dy, Tensor* dx) = 0;

  // Training (true) or eval (false) mode of this module and, for containers, of its children.
  virtual void train(bool on = true) { training_ = on; }
  void eval() { train(false); }
  bool is_training() const { return training_; }

  // Parameters and buffers with PyTorch's state_dict names and shapes, in PyTorch's order
  // ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
  // "1.num_batches_tracked", ...). The entries point into the module (no copy): writing through
  // them (loading a checkpoint) changes the module. Valid as long as the module lives and its
  // structure is unchanged.
  std::vector<StateEntry> state_dict();
  // The learnable entries of state_dict() (is_parameter, with grad), same order.
  std::vector<StateEntry> parameters();
  // Sets every parameter gradient to zero (allocates nothing in the built-in modules).
  virtual void zero_grad();

  // Synchronized batch norm for every batch-norm layer in this module (PyTorch's
  // SyncBatchNorm.convert_sync_batchnorm): in training mode they normalize over the global batch
  // of comm's ranks, and their weight/bias gradients become the global batch's (state entries
  // marked grad_is_global). nullptr turns it off. Containers recurse; other modules ignore it.
  virtual void set_sync(Communicator* comm, SyncMode mode) { (void)comm, (void)mode; }
  // The per-rank sample counts of the coming forwards when every rank knows them (one exchange
  // per batch-norm forward instead of two); empty: exchanged. Containers recurse.
  virtual void set_sync_split(const std::vector<int64_t>& split) { (void)split; }

  // PyTorch-like text, e.g. "Linear(in_features=784, out_features=100, bias=True)"; Sequential
  // prints its children indented with their indices, as PyTorch does.
  virtual std::string repr() const = 0;
  // A JSON description from which the equivalent torch.nn module is built. A leaf gives an
  // object, e.g. {"type":"Linear","in":784,"out":100,"bias":true}; Sequential gives an array of
  // its children's descriptions (a nested Sequential is a nested array). Keys per type:
  //   Linear {in,out,bias}; Conv2d {in,out,kernel,stride,padding,bias};
  //   MaxPool2d {kernel,stride}; ReLU; Sigmoid; Flatten;
  //   BatchNorm1d / BatchNorm2d {num_features,eps,momentum (null: cumulative),affine,
  //   track_running_stats}.
  virtual std::string architecture() const = 0;

  // Appends this module's entries under prefix ("" or "3."); what state_dict() calls.
  // Implementations append their own entries, containers recurse with "<index>.".
  virtual void append_state(const std::string& prefix, std::vector<StateEntry>* out) = 0;

 protected:
  bool training_ = true;
};

}  // namespace bnorm::nn

#endif  // BNORM_NN_MODULE_H_
