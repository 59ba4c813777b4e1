// BatchNorm1d / BatchNorm2d on the public bnorm::BatchNorm layer.
#include <string>

#include "bnorm/nn/layers.h"
#include "common.h"

namespace bnorm::nn {
namespace {

// s with `context: ` before its message, keeping its code (a NaN stays NonFinite, a failed
// collective Internal, so callers can tell bad data from a bad argument).
Status with_context(const std::string& context, const Status& s) {
  const std::string message = context + ": " + s.message();
  switch (s.code()) {
    case StatusCode::kOk: return s;
    case StatusCode::kNonFinite: return Status::non_finite(message);
    case StatusCode::kInternal: return Status::internal(message);
    case StatusCode::kInvalidArgument: break;
  }
  return Status::invalid_argument(message);
}

}  // namespace

Status BatchNormNd::init(const BatchNormOptions& options) {
  Status s = bnorm::BatchNorm::create(options, &bn_);
  if (!s.ok()) return with_context(type_name_, s);
  num_batches_tracked_ = 0;
  return Status();
}

Status BatchNorm1d::create(const BatchNormOptions& options, std::unique_ptr<BatchNorm1d>* out) {
  if (out == nullptr) return Status::invalid_argument("BatchNorm1d: out: is null");
  std::unique_ptr<BatchNorm1d> m(new BatchNorm1d());
  BNORM_RETURN_IF_ERROR(m->init(options));
  *out = std::move(m);
  return Status();
}

Status BatchNorm2d::create(const BatchNormOptions& options, std::unique_ptr<BatchNorm2d>* out) {
  if (out == nullptr) return Status::invalid_argument("BatchNorm2d: out: is null");
  std::unique_ptr<BatchNorm2d> m(new BatchNorm2d());
  BNORM_RETURN_IF_ERROR(m->init(options));
  *out = std::move(m);
  return Status();
}

void BatchNormNd::train(bool on) {
  training_ = on;
  bn_.train(on);
}

Status BatchNormNd::run_forward(const Tensor& x, Tensor* y, bool fused) {
  if (y == nullptr) return Status::invalid_argument(repr() + ": y: is null");
  if (x.rank() < min_rank_ || x.rank() > max_rank_ || x.dim(1) != bn_.num_features()) {
    std::string expected = min_rank_ == 4 ? "[N, C, H, W]" : "[N, C] or [N, C, L]";
    return detail::shape_error(repr(), "x",
                               expected + " with C = " + std::to_string(bn_.num_features()), x);
  }
  if (y == &x) return Status::invalid_argument(repr() + ": y: must not be x");
  y->resize(x.shape());
  // The counter lives here so that state_dict can point at it; keep the layer's copy in step
  // (a checkpoint may have written ours).
  bn_.set_num_batches_tracked(num_batches_tracked_);
  Status s = fused ? bn_.forward_relu(x.view(), y->view()) : bn_.forward(x.view(), y->view());
  if (!s.ok()) return with_context(repr(), s);
  num_batches_tracked_ = bn_.num_batches_tracked();
  x_ = &x;
  out_shape_ = x.shape();
  return Status();
}

Status BatchNormNd::forward(const Tensor& x, Tensor* y) { return run_forward(x, y, false); }

Status BatchNormNd::forward_relu(const Tensor& x, Tensor* y) { return run_forward(x, y, true); }

Status BatchNormNd::backward_target(const Tensor& dy, const Tensor* y, Tensor* dx,
                                    Tensor** target) {
  if (x_ == nullptr) return Status::invalid_argument(repr() + ": backward: no forward before it");
  if (dy.shape() != out_shape_)
    return detail::shape_error(repr(), "dy",
                               "the forward's output shape " + shape_string(out_shape_), dy);
  if (y != nullptr && y->shape() != out_shape_)
    return detail::shape_error(repr(), "y",
                               "the forward's output shape " + shape_string(out_shape_), *y);
  if (dx == &dy) return Status::invalid_argument(repr() + ": dx: must not be dy");
  // The layer always writes dx; without a caller's dx it goes to a scratch tensor.
  *target = dx != nullptr ? dx : &scratch_;
  (*target)->resize(out_shape_);
  return Status();
}

Status BatchNormNd::backward(const Tensor& dy, Tensor* dx) {
  Tensor* target = nullptr;
  BNORM_RETURN_IF_ERROR(backward_target(dy, nullptr, dx, &target));
  Status s = bn_.backward(dy.view(), x_->view(), target->view());
  if (!s.ok()) return with_context(repr(), s);
  return Status();
}

Status BatchNormNd::backward_relu(const Tensor& dy, const Tensor& y, Tensor* dx) {
  Tensor* target = nullptr;
  BNORM_RETURN_IF_ERROR(backward_target(dy, &y, dx, &target));
  Status s = bn_.backward_relu(dy.view(), x_->view(), y.view(), target->view());
  if (!s.ok()) return with_context(repr(), s);
  return Status();
}

void BatchNormNd::zero_grad() { bn_.zero_grad(); }

namespace {

// The extensions' options, only those away from PyTorch's behaviour (so a plain layer prints
// and serializes as before): ", name=value" (repr) or ",\"name\":value" (JSON).
std::string extension_fields(const BatchNormOptions& o, bool json) {
  std::string out;
  auto add = [&](const char* name, const std::string& value) {
    out += json ? std::string(",\"") + name + "\":" + value : std::string(", ") + name + "=" + value;
  };
  const std::string yes = json ? "true" : "True";
  if (o.normalize_with_running_stats) add("normalize_with_running_stats", yes);
  if (o.freeze_running_stats) add("freeze_running_stats", yes);
  if (o.freeze_affine) add("freeze_affine", yes);
  if (o.batch_renorm) {
    add("batch_renorm", yes);
    add("rmax", detail::format_double(o.renorm_rmax));
    add("dmax", detail::format_double(o.renorm_dmax));
  }
  if (o.ghost_batch != 0) add("ghost_batch", std::to_string(o.ghost_batch));
  return out;
}

}  // namespace

std::string BatchNormNd::repr() const {
  const BatchNormOptions& o = bn_.options();
  return std::string(type_name_) + "(" + std::to_string(o.num_features) +
         ", eps=" + detail::format_double(o.eps) +
         ", momentum=" + (o.momentum ? detail::format_double(*o.momentum) : "None") +
         ", affine=" + (o.affine ? "True" : "False") +
         ", track_running_stats=" + (o.track_running_stats ? "True" : "False") +
         extension_fields(o, false) + ")";
}

std::string BatchNormNd::architecture() const {
  const BatchNormOptions& o = bn_.options();
  return std::string("{\"type\":\"") + type_name_ + "\",\"num_features\":" +
         std::to_string(o.num_features) + ",\"eps\":" + detail::format_double(o.eps) +
         ",\"momentum\":" + (o.momentum ? detail::format_double(*o.momentum) : "null") +
         ",\"affine\":" + (o.affine ? "true" : "false") +
         ",\"track_running_stats\":" + (o.track_running_stats ? "true" : "false") +
         extension_fields(o, true) + "}";
}

void BatchNormNd::append_state(const std::string& prefix, std::vector<StateEntry>* out) {
  const int64_t c = bn_.num_features();
  auto add = [&](const char* name, float* data, float* grad) {
    StateEntry e;
    e.name = prefix + name;
    e.shape = {c};
    e.data = data;
    // freeze_affine: weight and bias are state, not parameters (no gradient, no optimizer step).
    if (bn_.options().freeze_affine) grad = nullptr;
    e.is_parameter = grad != nullptr;
    e.grad = grad;
    e.grad_is_global = grad != nullptr && bn_.sync_communicator() != nullptr;
    out->push_back(std::move(e));
  };
  if (bn_.options().affine) {
    add("weight", bn_.weight().data(), bn_.weight_grad().data());
    add("bias", bn_.bias().data(), bn_.bias_grad().data());
  }
  if (bn_.options().track_running_stats) {
    add("running_mean", bn_.running_mean().data(), nullptr);
    add("running_var", bn_.running_var().data(), nullptr);
    StateEntry e;
    e.name = prefix + "num_batches_tracked";
    e.dtype = DType::kI64;
    e.shape = {};
    e.data = &num_batches_tracked_;
    out->push_back(std::move(e));
  }
}

}  // namespace bnorm::nn
