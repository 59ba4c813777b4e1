#include <cmath>
#include <string>

#include "bnorm/nn/layers.h"
#include "common.h"

namespace bnorm::nn {

Status Linear::create(int64_t in_features, int64_t out_features, bool bias, Rng& rng,
                      std::unique_ptr<Linear>* out) {
  if (out == nullptr) return Status::invalid_argument("Linear: out: is null");
  if (in_features <= 0)
    return Status::invalid_argument("Linear: in_features: must be > 0, got " +
                                    std::to_string(in_features));
  if (out_features <= 0)
    return Status::invalid_argument("Linear: out_features: must be > 0, got " +
                                    std::to_string(out_features));
  if (in_features > (int64_t{1} << 31) / out_features)
    return Status::invalid_argument("Linear: in_features * out_features: too large, got " +
                                    std::to_string(in_features) + " * " +
                                    std::to_string(out_features));
  std::unique_ptr<Linear> m(new Linear());
  m->in_ = in_features;
  m->out_ = out_features;
  const auto w = static_cast<size_t>(in_features * out_features);
  m->weight_.resize(w);
  m->weight_grad_.assign(w, 0.0f);
  if (bias) {
    m->bias_.resize(static_cast<size_t>(out_features));
    m->bias_grad_.assign(static_cast<size_t>(out_features), 0.0f);
  }
  m->reset_parameters(rng);
  *out = std::move(m);
  return Status();
}

void Linear::reset_parameters(Rng& rng) {
  kaiming_uniform_(weight_, in_, std::sqrt(5.0), rng);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_));
  uniform_(bias_, -bound, bound, rng);
}

Status Linear::forward(const Tensor& x, Tensor* y) {
  if (y == nullptr) return Status::invalid_argument(repr() + ": y: is null");
  if (x.rank() != 2 || x.dim(1) != in_ || x.dim(0) < 1)
    return detail::shape_error(repr(), "x", "shape [N >= 1, " + std::to_string(in_) + "]", x);
  if (y == &x) return Status::invalid_argument(repr() + ": y: must not be x");
  const int64_t n = x.dim(0);
  y->resize({n, out_});
  float* yd = y->data();
  // Bias fused into the GEMM: y starts as the bias rows and the GEMM adds x W^T (beta = 1).
  float beta = 0.0f;
  if (!bias_.empty()) {
    for (int64_t i = 0; i < n; ++i) std::copy(bias_.begin(), bias_.end(), yd + i * out_);
    beta = 1.0f;
  }
  detail::sgemm(false, true, n, out_, in_, 1.0f, x.data(), in_, weight_.data(), in_, beta, yd,
                out_);
  x_ = &x;
  last_n_ = n;
  return Status();
}

Status Linear::backward(const Tensor& dy, Tensor* dx) {
  if (x_ == nullptr) return Status::invalid_argument(repr() + ": backward: no forward before it");
  if (dy.rank() != 2 || dy.dim(0) != last_n_ || dy.dim(1) != out_)
    return detail::shape_error(
        repr(), "dy", "the forward's output shape [" + std::to_string(last_n_) + ", " +
                          std::to_string(out_) + "]",
        dy);
  if (dx == &dy) return Status::invalid_argument(repr() + ": dx: must not be dy");
  const int64_t n = last_n_;
  // dW[out, in] += dy^T[out, N] x[N, in]
  detail::sgemm(true, false, out_, in_, n, 1.0f, dy.data(), out_, x_->data(), in_, 1.0f,
                weight_grad_.data(), in_);
  if (!bias_grad_.empty()) {
    float* db = bias_grad_.data();
    const float* g = dy.data();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < out_; ++j) db[j] += g[i * out_ + j];
  }
  if (dx != nullptr) {
    dx->resize({n, in_});
    // dx[N, in] = dy[N, out] W[out, in]
    detail::sgemm(false, false, n, in_, out_, 1.0f, dy.data(), out_, weight_.data(), in_, 0.0f,
                  dx->data(), in_);
  }
  return Status();
}

void Linear::zero_grad() {
  std::fill(weight_grad_.begin(), weight_grad_.end(), 0.0f);
  std::fill(bias_grad_.begin(), bias_grad_.end(), 0.0f);
}

std::string Linear::repr() const {
  return "Linear(in_features=" + std::to_string(in_) + ", out_features=" + std::to_string(out_) +
         ", bias=" + (bias_.empty() ? "False" : "True") + ")";
}

std::string Linear::architecture() const {
  return "{\"type\":\"Linear\",\"in\":" + std::to_string(in_) + ",\"out\":" +
         std::to_string(out_) + ",\"bias\":" + (bias_.empty() ? "false" : "true") + "}";
}

void Linear::append_state(const std::string& prefix, std::vector<StateEntry>* out) {
  StateEntry w;
  w.name = prefix + "weight";
  w.shape = {out_, in_};
  w.data = weight_.data();
  w.is_parameter = true;
  w.grad = weight_grad_.data();
  out->push_back(std::move(w));
  if (!bias_.empty()) {
    StateEntry b;
    b.name = prefix + "bias";
    b.shape = {out_};
    b.data = bias_.data();
    b.is_parameter = true;
    b.grad = bias_grad_.data();
    out->push_back(std::move(b));
  }
}

}  // namespace bnorm::nn
