// bnorm::nn::Tensor: an owning, contiguous, row-major fp32 tensor for the nn layers.
//
// Images are NCHW, feature batches (N, C). Data is 64-byte aligned. resize() reuses the
// allocation when it is large enough, so a training loop that keeps its tensors allocates
// nothing after the first step. A Tensor is a value type (copyable and movable).
//
// Thread safety: none; a Tensor is not safe for concurrent mutation.
#ifndef BNORM_NN_TENSOR_H_
#define BNORM_NN_TENSOR_H_

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "bnorm/status.h"
#include "bnorm/tensor.h"

namespace bnorm::nn {

class Tensor {
 public:
  // An empty tensor: rank 0, numel 0, data() == nullptr.
  Tensor() = default;
  // A zero-filled tensor of the given shape. Requires every dim >= 0 (negative dims are clamped
  // to 0; use check_shape first for untrusted input).
  explicit Tensor(std::span<const int64_t> shape);
  Tensor(std::initializer_list<int64_t> shape)
      : Tensor(std::span<const int64_t>(shape.begin(), shape.size())) {}

  Tensor(const Tensor& other);
  Tensor& operator=(const Tensor& other);
  Tensor(Tensor&& other) noexcept = default;
  Tensor& operator=(Tensor&& other) noexcept = default;

  // Changes the shape. Keeps the allocation when its capacity suffices (never shrinks it);
  // otherwise reallocates. Contents after a resize are unspecified (old values or zeros).
  // Same contract as the constructor for negative dims.
  void resize(std::span<const int64_t> shape);
  void resize(std::initializer_list<int64_t> shape) {
    resize(std::span<const int64_t>(shape.begin(), shape.size()));
  }

  // Validates a shape: at most 8 dims, each >= 0, numel without int64 overflow. name is used in
  // the message ("x: ...").
  static Status check_shape(std::span<const int64_t> shape, const std::string& name);

  const std::vector<int64_t>& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  // Dim i; requires 0 <= i < rank().
  int64_t dim(int i) const { return shape_[static_cast<size_t>(i)]; }
  int64_t numel() const { return numel_; }
  bool empty() const { return numel_ == 0; }

  float* data() { return data_.get(); }
  const float* data() const { return data_.get(); }
  std::span<float> span() { return {data_.get(), static_cast<size_t>(numel_)}; }
  std::span<const float> span() const { return {data_.get(), static_cast<size_t>(numel_)}; }
  float& operator[](int64_t i) { return data_.get()[i]; }
  float operator[](int64_t i) const { return data_.get()[i]; }

  void fill(float value);
  void zero() { fill(0.0f); }

  // True when the shapes are equal.
  bool same_shape(const Tensor& other) const { return shape_ == other.shape_; }
  // "[60, 100]", as bnorm prints sizes.
  std::string size_string() const;

  // bnorm views of this tensor (channels-first) for the batch-norm API; valid while the tensor
  // is neither resized nor destroyed.
  ConstTensorView view() const;
  TensorView view();

 private:
  struct FreeDeleter {
    void operator()(float* p) const;
  };
  std::vector<int64_t> shape_;
  int64_t numel_ = 0;
  int64_t capacity_ = 0;
  std::unique_ptr<float[], FreeDeleter> data_;
};

// "[60, 100]" for any shape vector.
std::string shape_string(std::span<const int64_t> shape);

}  // namespace bnorm::nn

#endif  // BNORM_NN_TENSOR_H_
