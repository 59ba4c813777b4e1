// The nn layers: Linear, Conv2d, MaxPool2d, ReLU, Sigmoid, Flatten, BatchNorm1d, BatchNorm2d and
// the container Sequential, with PyTorch's semantics, shapes and state_dict names.
//
// Every layer follows the Module contract (bnorm/nn/module.h): forward remembers x and y by
// address for the next backward; backward accumulates parameter gradients and skips dx when
// dx == nullptr. Layers are built with a static create() that validates the arguments and
// returns a Status naming a bad one; parameters get PyTorch's default initialization from the
// Rng given (weights kaiming_uniform(a = sqrt(5)), biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
// BatchNorm weight 1 and bias 0).
//
// Linear and Conv2d run on OpenBLAS sgemm (Conv2d as im2col + one GEMM per chunk of images); the batch-norm
// layers call the public bnorm::BatchNorm layer and nothing below it.
//
// Thread safety: as Module. set_num_threads is process-wide.
#ifndef BNORM_NN_LAYERS_H_
#define BNORM_NN_LAYERS_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/nn/init.h"
#include "bnorm/nn/module.h"
#include "bnorm/nn/tensor.h"
#include "bnorm/status.h"

namespace bnorm::nn {

// Threads of the layers and of bnorm's kernels, which share one pool and one count
// (bnorm::set_num_threads): large GEMMs are split into blocks over it, and OpenBLAS itself is
// pinned to one thread, so the two never compete for the cores. n >= 1 sets the count; n <= 0
// restores the default (BNORM_NUM_THREADS, else the cores). Call it between steps, not during one.
void set_num_threads(int n);

// y = x W^T + b. x (N, in) -> y (N, out). weight [out, in], bias [out].
class Linear final : public Module {
 public:
  static Status create(int64_t in_features, int64_t out_features, bool bias, Rng& rng,
                       std::unique_ptr<Linear>* out);

  Status forward(const Tensor& x, Tensor* y) override;
  Status backward(const Tensor& dy, Tensor* dx) override;
  std::string repr() const override;
  std::string architecture() const override;
  void append_state(const std::string& prefix, std::vector<StateEntry>* out) override;
  void zero_grad() override;

  // PyTorch's default initialization (see the file comment).
  void reset_parameters(Rng& rng);

  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }
  bool has_bias() const { return !bias_.empty(); }
  std::span<float> weight() { return weight_; }  // [out, in], row-major
  std::span<float> bias() { return bias_; }      // [out]; empty without bias
  std::span<float> weight_grad() { return weight_grad_; }
  std::span<float> bias_grad() { return bias_grad_; }

 private:
  Linear() = default;
  int64_t in_ = 0, out_ = 0;
  std::vector<float> weight_, bias_, weight_grad_, bias_grad_;
  const Tensor* x_ = nullptr;  // the last forward's input
  int64_t last_n_ = -1;
};

// 2-D convolution, PyTorch's Conv2d with groups = 1, dilation = 1, zero padding.
// x (N, in, H, W) -> y (N, out, Ho, Wo), Ho = (H + 2p - k) / s + 1. weight [out, in, k, k],
// bias [out]. Square kernel, stride and padding.
class Conv2d final : public Module {
 public:
  // Requires in, out, kernel, stride >= 1 and 0 <= padding.
  static Status create(int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t stride,
                       int64_t padding, bool bias, Rng& rng, std::unique_ptr<Conv2d>* out);

  Status forward(const Tensor& x, Tensor* y) override;
  Status backward(const Tensor& dy, Tensor* dx) override;
  std::string repr() const override;
  std::string architecture() const override;
  void append_state(const std::string& prefix, std::vector<StateEntry>* out) override;
  void zero_grad() override;

  void reset_parameters(Rng& rng);

  int64_t in_channels() const { return in_; }
  int64_t out_channels() const { return out_; }
  int64_t kernel() const { return k_; }
  int64_t stride() const { return stride_; }
  int64_t padding() const { return pad_; }
  bool has_bias() const { return !bias_.empty(); }
  std::span<float> weight() { return weight_; }  // [out, in, k, k], row-major
  std::span<float> bias() { return bias_; }
  std::span<float> weight_grad() { return weight_grad_; }
  std::span<float> bias_grad() { return bias_grad_; }

 private:
  Conv2d() = default;
  int64_t in_ = 0, out_ = 0, k_ = 0, stride_ = 1, pad_ = 0;
  std::vector<float> weight_, bias_, weight_grad_, bias_grad_;
  std::vector<float> cols_, dcols_, dy_cat_;  // workspaces of a chunk of images, reused
  const Tensor* x_ = nullptr;
  std::vector<int64_t> out_shape_;
};

// Max pooling, PyTorch's MaxPool2d(kernel, stride) with padding 0, dilation 1, floor mode.
// The gradient goes to the first maximum of each window (PyTorch's choice on ties).
class MaxPool2d final : public Module {
 public:
  // stride 0 means stride = kernel (PyTorch's default). Requires kernel >= 1, stride >= 0.
  static Status create(int64_t kernel, int64_t stride, std::unique_ptr<MaxPool2d>* out);

  Status forward(const Tensor& x, Tensor* y) override;
  Status backward(const Tensor& dy, Tensor* dx) override;
  std::string repr() const override;
  std::string architecture() const override;
  void append_state(const std::string&, std::vector<StateEntry>*) override {}

  int64_t kernel() const { return k_; }
  int64_t stride() const { return stride_; }

 private:
  MaxPool2d() = default;
  int64_t k_ = 2, stride_ = 2;
  std::vector<int32_t> argmax_;  // per output: offset of the max in its (n, c) plane
  std::vector<int64_t> in_shape_, out_shape_;
};

// y = max(x, 0), any shape. The gradient at 0 is 0, as in PyTorch.
class ReLU final : public Module {
 public:
  static std::unique_ptr<ReLU> create();
  Status forward(const Tensor& x, Tensor* y) override;
  Status backward(const Tensor& dy, Tensor* dx) override;
  std::string repr() const override { return "ReLU()"; }
  std::string architecture() const override { return "{\"type\":\"ReLU\"}"; }
  void append_state(const std::string&, std::vector<StateEntry>*) override {}

 private:
  ReLU() = default;
  const Tensor* y_ = nullptr;
};

// y = 1 / (1 + exp(-x)), any shape; backward uses y: dx = dy * y * (1 - y).
class Sigmoid final : public Module {
 public:
  static std::unique_ptr<Sigmoid> create();
  Status forward(const Tensor& x, Tensor* y) override;
  Status backward(const Tensor& dy, Tensor* dx) override;
  std::string repr() const override { return "Sigmoid()"; }
  std::string architecture() const override { return "{\"type\":\"Sigmoid\"}"; }
  void append_state(const std::string&, std::vector<StateEntry>*) override {}

 private:
  Sigmoid() = default;
  const Tensor* y_ = nullptr;
};

// (N, d1, d2, ...) -> (N, d1 * d2 * ...), PyTorch's Flatten(start_dim=1). Requires rank >= 2.
class Flatten final : public Module {
 public:
  static std::unique_ptr<Flatten> create();
  Status forward(const Tensor& x, Tensor* y) override;
  Status backward(const Tensor& dy, Tensor* dx) override;
  std::string repr() const override { return "Flatten(start_dim=1, end_dim=-1)"; }
  std::string architecture() const override { return "{\"type\":\"Flatten\"}"; }
  void append_state(const std::string&, std::vector<StateEntry>*) override {}

 private:
  Flatten() = default;
  std::vector<int64_t> in_shape_;
  bool have_forward_ = false;
};

// Batch norm over (N, C) or (N, C, L) (BatchNorm1d) or (N, C, H, W) (BatchNorm2d), wrapping the
// public bnorm::BatchNorm layer with the given options (PyTorch's defaults: eps 1e-5, momentum
// 0.1, affine, track_running_stats). State: weight, bias, running_mean, running_var [C] and
// num_batches_tracked [] int64, PyTorch's names and order.
class BatchNormNd : public Module {
 public:
  Status forward(const Tensor& x, Tensor* y) override;
  Status backward(const Tensor& dy, Tensor* dx) override;
  std::string repr() const override;
  std::string architecture() const override;
  void append_state(const std::string& prefix, std::vector<StateEntry>* out) override;
  void zero_grad() override;
  void train(bool on = true) override;
  void set_sync(Communicator* comm, SyncMode mode) override { bn_.set_sync(comm, mode); }
  void set_sync_split(const std::vector<int64_t>& split) override { bn_.set_sync_split(split); }

  int64_t num_features() const { return bn_.num_features(); }
  // The wrapped layer (parameters, running statistics, gradients).
  bnorm::BatchNorm& layer() { return bn_; }
  const bnorm::BatchNorm& layer() const { return bn_; }
  // The counter as state_dict exposes it (the entry points here; kept in step with layer()).
  int64_t num_batches_tracked() const { return num_batches_tracked_; }

  // Batch norm and ReLU in one pass (bnorm::forward_train_relu / backward_relu): y = relu(bn(x)),
  // and the backward from the output y of that forward. What Sequential runs for a batch norm
  // followed by a ReLU. Not on a synchronized layer (fails).
  Status forward_relu(const Tensor& x, Tensor* y);
  Status backward_relu(const Tensor& dy, const Tensor& y, Tensor* dx);

 protected:
  BatchNormNd(const char* type_name, int min_rank, int max_rank)
      : type_name_(type_name), min_rank_(min_rank), max_rank_(max_rank) {}
  Status init(const BatchNormOptions& options);

 private:
  // forward and forward_relu: the shape checks, the counter and the bookkeeping around the
  // layer's pass (fused: forward_relu).
  Status run_forward(const Tensor& x, Tensor* y, bool fused);
  // backward and backward_relu: checks dy (and y, when given) against the forward; *target is
  // the tensor dx goes to (the caller's, or scratch), resized.
  Status backward_target(const Tensor& dy, const Tensor* y, Tensor* dx, Tensor** target);

  const char* type_name_;
  int min_rank_, max_rank_;
  bnorm::BatchNorm bn_;
  int64_t num_batches_tracked_ = 0;
  const Tensor* x_ = nullptr;
  std::vector<int64_t> out_shape_;
  Tensor scratch_;  // dx when the caller skips it (the layer computes it anyway)
};

class BatchNorm1d final : public BatchNormNd {
 public:
  // options.num_features is C. Accepts (N, C) and (N, C, L).
  static Status create(const BatchNormOptions& options, std::unique_ptr<BatchNorm1d>* out);

 private:
  BatchNorm1d() : BatchNormNd("BatchNorm1d", 2, 3) {}
};

class BatchNorm2d final : public BatchNormNd {
 public:
  // Accepts (N, C, H, W).
  static Status create(const BatchNormOptions& options, std::unique_ptr<BatchNorm2d>* out);

 private:
  BatchNorm2d() : BatchNormNd("BatchNorm2d", 4, 4) {}
};

// Runs its children in order; owns them. State names are "<index>.<name>".
class Sequential final : public Module {
 public:
  Sequential() = default;

  // Appends a module (takes ownership); fails on a null module.
  Status add(std::unique_ptr<Module> module);
  size_t size() const { return modules_.size(); }
  // Module i; requires i < size().
  Module& at(size_t i) { return *modules_[i]; }
  const Module& at(size_t i) const { return *modules_[i]; }

  // Runs every child; y receives a copy of the last child's output. An empty Sequential copies
  // x. Errors are prefixed with the child's index ("2: BatchNorm1d: ...").
  Status forward(const Tensor& x, Tensor* y) override;
  // Backward through every child, last to first; dx == nullptr skips the first child's dx.
  Status backward(const Tensor& dy, Tensor* dx) override;
  void train(bool on = true) override;
  void set_sync(Communicator* comm, SyncMode mode) override;
  void set_sync_split(const std::vector<int64_t>& split) override;
  std::string repr() const override;
  std::string architecture() const override;
  void append_state(const std::string& prefix, std::vector<StateEntry>* out) override;
  void zero_grad() override;

  // Module i's output from the last forward (e.g. the input of a sigmoid is output(i - 1));
  // requires i < size() and a forward having run. Valid until the next forward. A batch norm
  // fused with the ReLU after it (below) has no output of its own: empty.
  const Tensor& output(size_t i) const { return outputs_[i]; }

  // A BatchNorm1d/2d followed by a ReLU runs as one fused pass (BatchNormNd::forward_relu),
  // which saves a write and a read of the tensor each way; the modules, their state and the
  // results are the same (bitwise: the fused kernels round as the pair does). On by default;
  // never for a synchronized batch norm. Takes effect at the next forward.
  void set_fuse_batch_norm_relu(bool on) { fuse_bn_relu_ = on; }
  bool fuse_batch_norm_relu() const { return fuse_bn_relu_; }

 private:
  // Whether modules i (a batch norm) and i + 1 (a ReLU) run fused.
  bool fusable(size_t i) const;

  std::vector<std::unique_ptr<Module>> modules_;
  std::vector<Tensor> outputs_;  // outputs_[i]: module i's output
  std::vector<Tensor> grads_;    // grads_[i]: dL / d(input of module i), i >= 1
  const Tensor* x_ = nullptr;
  bool fuse_bn_relu_ = true;
  std::vector<char> fused_;  // fused_[i]: modules i and i + 1 ran fused in the last forward
};

}  // namespace bnorm::nn

#endif  // BNORM_NN_LAYERS_H_
