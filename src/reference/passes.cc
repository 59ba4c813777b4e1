// The reference's three whole passes: the kernels of reference.h in order, on fp64 per-channel
// vectors, so that nothing is rounded to fp32 before it is stored.
#include <algorithm>
#include <cmath>
#include <vector>

#include "reference/reference.h"

namespace bnorm::ref {
namespace {

std::vector<double> widen(const float* v, int64_t c) {
  if (v == nullptr) return {};
  return std::vector<double>(v, v + c);
}

const double* data_or_null(const std::vector<double>& v) { return v.empty() ? nullptr : v.data(); }

// invstd from the running variance: the statistics eval mode holds constant.
std::vector<double> running_invstd(const float* running_var, int64_t c, double eps) {
  std::vector<double> invstd(c);
  for (int64_t i = 0; i < c; ++i) invstd[i] = 1.0 / std::sqrt(running_var[i] + eps);
  return invstd;
}

void store(const std::vector<double>& from, float* to) {
  if (to == nullptr) return;
  for (size_t c = 0; c < from.size(); ++c) to[c] = static_cast<float>(from[c]);
}

}  // namespace

void forward_train(const detail::TrainCall& call) {
  const Geometry& g = call.g;
  std::vector<double> mean(g.c), var(g.c), invstd(g.c);
  const std::vector<double> weight = widen(call.weight, g.c), bias = widen(call.bias, g.c);
  stats(g, call.x, mean.data(), var.data());
  finalize(g, mean.data(), var.data(), call.eps, call.factor, invstd.data(), call.running_mean,
           call.running_var);
  if (call.relu) {
    apply_relu(g, call.x, mean.data(), invstd.data(), data_or_null(weight), data_or_null(bias),
               call.z, call.y);
  } else {
    apply(g, call.x, mean.data(), invstd.data(), data_or_null(weight), data_or_null(bias), call.y);
  }
  store(mean, call.save_mean);
  store(invstd, call.save_invstd);
}

void forward_eval(const detail::EvalCall& call) {
  const Geometry& g = call.g;
  const std::vector<double> mean = widen(call.running_mean, g.c);
  const std::vector<double> weight = widen(call.weight, g.c), bias = widen(call.bias, g.c);
  const std::vector<double> invstd = running_invstd(call.running_var, g.c, call.eps);
  if (call.relu) {
    apply_relu(g, call.x, mean.data(), invstd.data(), data_or_null(weight), data_or_null(bias),
               call.z, call.y);
  } else {
    apply(g, call.x, mean.data(), invstd.data(), data_or_null(weight), data_or_null(bias), call.y);
  }
}

void backward(const detail::BackwardCall& call) {
  const Geometry& g = call.g;
  std::vector<double> mean, invstd;
  if (call.training) {
    mean = widen(call.save_mean, g.c);
    invstd = widen(call.save_invstd, g.c);
  } else {
    mean = widen(call.running_mean, g.c);
    invstd = running_invstd(call.running_var, g.c, call.eps);
  }
  const std::vector<double> weight = widen(call.weight, g.c);
  std::vector<double> sum_dy(g.c), sum_dy_xhat(g.c);
  // The fused ReLU: the batch norm's gradient is dy masked by y > 0 (a copy, so that dx and dz
  // may alias the inputs).
  std::vector<float> masked;
  const float* dy = call.dy;
  if (call.y != nullptr) {
    masked.resize(static_cast<size_t>(g.numel()));
    relu_mask(g, call.dy, call.y, masked.data());
    dy = masked.data();
  }
  backward_reduce(g, dy, call.x, mean.data(), invstd.data(), sum_dy.data(), sum_dy_xhat.data());
  // The reductions read all of x and dy before dx is written, so dx may alias either.
  backward_apply(g, dy, call.x, mean.data(), invstd.data(), data_or_null(weight), sum_dy.data(),
                 sum_dy_xhat.data(), call.training, call.dx);
  if (call.dz != nullptr) std::copy(masked.begin(), masked.end(), call.dz);
  store(sum_dy_xhat, call.dweight);
  store(sum_dy, call.dbias);
}

}  // namespace bnorm::ref
