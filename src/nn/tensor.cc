#include "bnorm/nn/tensor.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

namespace bnorm::nn {
namespace {

constexpr size_t kAlignment = 64;

int64_t product(std::span<const int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= std::max<int64_t>(d, 0);
  return n;
}

}  // namespace

void Tensor::FreeDeleter::operator()(float* p) const { std::free(p); }

Tensor::Tensor(std::span<const int64_t> shape) {
  resize(shape);
  zero();
}

Tensor::Tensor(const Tensor& other) {
  resize(other.shape_);
  if (numel_ > 0) std::memcpy(data(), other.data(), static_cast<size_t>(numel_) * sizeof(float));
}

Tensor& Tensor::operator=(const Tensor& other) {
  if (this == &other) return *this;
  resize(other.shape_);
  if (numel_ > 0) std::memcpy(data(), other.data(), static_cast<size_t>(numel_) * sizeof(float));
  return *this;
}

void Tensor::resize(std::span<const int64_t> shape) {
  shape_.assign(shape.begin(), shape.end());
  for (int64_t& d : shape_) d = std::max<int64_t>(d, 0);
  const int64_t n = product(shape_);
  if (n > capacity_) {
    // Round up to the alignment, as aligned_alloc requires a multiple of it.
    size_t bytes = static_cast<size_t>(n) * sizeof(float);
    bytes = (bytes + kAlignment - 1) / kAlignment * kAlignment;
    auto* p = static_cast<float*>(std::aligned_alloc(kAlignment, bytes));
    if (p == nullptr) throw std::bad_alloc();
    std::memset(p, 0, bytes);
    data_.reset(p);
    capacity_ = n;
  }
  numel_ = n;
}

Status Tensor::check_shape(std::span<const int64_t> shape, const std::string& name) {
  if (shape.size() > 8)
    return Status::invalid_argument(name + ": at most 8 dims, got " +
                                    std::to_string(shape.size()));
  int64_t n = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0)
      return Status::invalid_argument(name + ": dim " + std::to_string(i) + " must be >= 0, got " +
                                      shape_string(shape));
    if (shape[i] > 0 && n > std::numeric_limits<int64_t>::max() / shape[i])
      return Status::invalid_argument(name + ": numel overflows int64 for " + shape_string(shape));
    n *= shape[i];
  }
  return Status();
}

void Tensor::fill(float value) { std::fill_n(data(), numel_, value); }

std::string Tensor::size_string() const { return shape_string(shape_); }

ConstTensorView Tensor::view() const {
  return ConstTensorView(data(), std::span<const int64_t>(shape_));
}

TensorView Tensor::view() { return TensorView(data(), std::span<const int64_t>(shape_)); }

std::string shape_string(std::span<const int64_t> shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

}  // namespace bnorm::nn
