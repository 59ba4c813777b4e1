// ReLU, Sigmoid and Flatten: element-wise or reshaping layers without parameters.
#include <cmath>
#include <cstring>

#include "bnorm/nn/layers.h"
#include "common.h"
#include "elementwise.h"
#include "parallel.h"

namespace bnorm::nn {
namespace {

Status check_backward(const char* who, const Tensor* y, const Tensor& dy, const Tensor* dx) {
  if (y == nullptr)
    return Status::invalid_argument(std::string(who) + ": backward: no forward before it");
  if (!dy.same_shape(*y))
    return detail::shape_error(who, "dy", "the forward's output shape " + y->size_string(), dy);
  if (dx == &dy) return Status::invalid_argument(std::string(who) + ": dx: must not be dy");
  return Status();
}

}  // namespace

std::unique_ptr<ReLU> ReLU::create() { return std::unique_ptr<ReLU>(new ReLU()); }

Status ReLU::forward(const Tensor& x, Tensor* y) {
  if (y == nullptr) return Status::invalid_argument("ReLU(): y: is null");
  if (y == &x) return Status::invalid_argument("ReLU(): y: must not be x");
  y->resize(x.shape());
  const float* xd = x.data();
  float* yd = y->data();
  detail::parallel_for(x.numel(), 1 << 16, [&](int64_t b, int64_t e) {
    detail::relu(xd + b, yd + b, e - b);
  });
  y_ = y;
  return Status();
}

Status ReLU::backward(const Tensor& dy, Tensor* dx) {
  BNORM_RETURN_IF_ERROR(check_backward("ReLU()", y_, dy, dx));
  if (dx == nullptr) return Status();
  dx->resize(dy.shape());
  const float* yd = y_->data();
  const float* g = dy.data();
  float* d = dx->data();
  detail::parallel_for(dy.numel(), 1 << 16, [&](int64_t b, int64_t e) {
    detail::relu_backward(yd + b, g + b, d + b, e - b);
  });
  return Status();
}

std::unique_ptr<Sigmoid> Sigmoid::create() { return std::unique_ptr<Sigmoid>(new Sigmoid()); }

Status Sigmoid::forward(const Tensor& x, Tensor* y) {
  if (y == nullptr) return Status::invalid_argument("Sigmoid(): y: is null");
  if (y == &x) return Status::invalid_argument("Sigmoid(): y: must not be x");
  y->resize(x.shape());
  detail::sigmoid(x.data(), y->data(), x.numel());
  y_ = y;
  return Status();
}

Status Sigmoid::backward(const Tensor& dy, Tensor* dx) {
  BNORM_RETURN_IF_ERROR(check_backward("Sigmoid()", y_, dy, dx));
  if (dx == nullptr) return Status();
  dx->resize(dy.shape());
  detail::sigmoid_backward(y_->data(), dy.data(), dx->data(), dy.numel());
  return Status();
}

std::unique_ptr<Flatten> Flatten::create() { return std::unique_ptr<Flatten>(new Flatten()); }

Status Flatten::forward(const Tensor& x, Tensor* y) {
  if (y == nullptr) return Status::invalid_argument("Flatten: y: is null");
  if (x.rank() < 2) return detail::shape_error("Flatten", "x", "rank >= 2", x);
  if (y == &x) return Status::invalid_argument("Flatten: y: must not be x");
  int64_t rest = 1;
  for (int i = 1; i < x.rank(); ++i) rest *= x.dim(i);
  y->resize({x.dim(0), rest});
  if (x.numel() > 0)
    std::memcpy(y->data(), x.data(), static_cast<size_t>(x.numel()) * sizeof(float));
  in_shape_ = x.shape();
  have_forward_ = true;
  return Status();
}

Status Flatten::backward(const Tensor& dy, Tensor* dx) {
  if (!have_forward_) return Status::invalid_argument("Flatten: backward: no forward before it");
  const int64_t n = in_shape_[0];
  int64_t rest = 1;
  for (size_t i = 1; i < in_shape_.size(); ++i) rest *= in_shape_[i];
  if (dy.rank() != 2 || dy.dim(0) != n || dy.dim(1) != rest)
    return detail::shape_error("Flatten", "dy",
                               "the forward's output shape [" + std::to_string(n) + ", " +
                                   std::to_string(rest) + "]",
                               dy);
  if (dx == nullptr) return Status();
  if (dx == &dy) return Status::invalid_argument("Flatten: dx: must not be dy");
  dx->resize(in_shape_);
  if (dy.numel() > 0)
    std::memcpy(dx->data(), dy.data(), static_cast<size_t>(dy.numel()) * sizeof(float));
  return Status();
}

}  // namespace bnorm::nn
