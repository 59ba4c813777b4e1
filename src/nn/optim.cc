#include "bnorm/nn/optim.h"

#include <cmath>
#include <numbers>
#include <string>

#include "common.h"
#include "elementwise.h"

namespace bnorm::nn {
namespace {

bool finite_nonneg(double v) { return std::isfinite(v) && v >= 0.0; }

Status check_params(const std::vector<StateEntry>& params) {
  for (const StateEntry& e : params) {
    if (e.dtype != DType::kF32 || !e.is_parameter || e.data == nullptr || e.grad == nullptr)
      return Status::invalid_argument("Sgd: params: entry \"" + e.name +
                                      "\" is not an fp32 parameter with a gradient");
  }
  return Status();
}

}  // namespace

Status Sgd::create(std::vector<StateEntry> params, const SgdOptions& options, Sgd* out) {
  if (out == nullptr) return Status::invalid_argument("Sgd: out: is null");
  if (!finite_nonneg(options.lr))
    return Status::invalid_argument("Sgd: lr: must be finite and >= 0, got " +
                                    detail::format_double(options.lr));
  if (!(options.momentum >= 0.0 && options.momentum < 1.0))
    return Status::invalid_argument("Sgd: momentum: must be in [0, 1), got " +
                                    detail::format_double(options.momentum));
  if (!finite_nonneg(options.weight_decay))
    return Status::invalid_argument("Sgd: weight_decay: must be finite and >= 0, got " +
                                    detail::format_double(options.weight_decay));
  BNORM_RETURN_IF_ERROR(check_params(params));
  Sgd sgd;
  sgd.options_ = options;
  if (options.momentum > 0.0) {
    sgd.buffers_.resize(params.size());
    for (size_t i = 0; i < params.size(); ++i)
      sgd.buffers_[i].assign(static_cast<size_t>(params[i].numel()), 0.0f);
  }
  sgd.params_ = std::move(params);
  *out = std::move(sgd);
  return Status();
}

Status Sgd::set_params(std::vector<StateEntry> params) {
  BNORM_RETURN_IF_ERROR(check_params(params));
  if (!buffers_.empty()) {
    std::vector<std::vector<float>> buffers(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      for (size_t k = 0; k < params_.size(); ++k)
        if (params_[k].data == params[i].data && params_[k].numel() == params[i].numel())
          buffers[i] = std::move(buffers_[k]);
      if (buffers[i].empty()) buffers[i].assign(static_cast<size_t>(params[i].numel()), 0.0f);
    }
    buffers_ = std::move(buffers);
  }
  params_ = std::move(params);
  return Status();
}

void Sgd::step() {
  const auto lr = static_cast<float>(options_.lr);
  const auto wd = static_cast<float>(options_.weight_decay);
  const auto mu = static_cast<float>(options_.momentum);
  const bool momentum = !buffers_.empty() && mu > 0.0f;
  for (size_t k = 0; k < params_.size(); ++k)
    detail::sgd_update(static_cast<float*>(params_[k].data), params_[k].grad,
                       momentum ? buffers_[k].data() : nullptr, params_[k].numel(), lr, mu, wd);
}

void Sgd::zero_grad() {
  for (const StateEntry& e : params_) std::fill_n(e.grad, e.numel(), 0.0f);
}

Status LrSchedule::create(const LrScheduleOptions& o, LrSchedule* out) {
  if (out == nullptr) return Status::invalid_argument("LrSchedule: out: is null");
  if (!finite_nonneg(o.base_lr))
    return Status::invalid_argument("LrSchedule: base_lr: must be finite and >= 0, got " +
                                    detail::format_double(o.base_lr));
  if (o.warmup_steps < 0)
    return Status::invalid_argument("LrSchedule: warmup_steps: must be >= 0, got " +
                                    std::to_string(o.warmup_steps));
  switch (o.kind) {
    case LrScheduleKind::kConstant:
      break;
    case LrScheduleKind::kStep:
      if (o.step_size < 1)
        return Status::invalid_argument("LrSchedule: step_size: must be >= 1, got " +
                                        std::to_string(o.step_size));
      if (!(std::isfinite(o.gamma) && o.gamma > 0.0))
        return Status::invalid_argument("LrSchedule: gamma: must be finite and > 0, got " +
                                        detail::format_double(o.gamma));
      break;
    case LrScheduleKind::kCosine:
      if (o.total_steps <= o.warmup_steps)
        return Status::invalid_argument("LrSchedule: total_steps: must be > warmup_steps (" +
                                        std::to_string(o.warmup_steps) + ") for cosine, got " +
                                        std::to_string(o.total_steps));
      if (!finite_nonneg(o.min_lr))
        return Status::invalid_argument("LrSchedule: min_lr: must be finite and >= 0, got " +
                                        detail::format_double(o.min_lr));
      break;
    default:
      return Status::invalid_argument("LrSchedule: kind: unknown value " +
                                      std::to_string(static_cast<int>(o.kind)));
  }
  out->options_ = o;
  return Status();
}

double LrSchedule::lr_at(int64_t step) const {
  const LrScheduleOptions& o = options_;
  if (step < 0) step = 0;
  if (step < o.warmup_steps)
    return o.base_lr * static_cast<double>(step + 1) / static_cast<double>(o.warmup_steps);
  const int64_t t = step - o.warmup_steps;
  switch (o.kind) {
    case LrScheduleKind::kStep:
      return o.base_lr * std::pow(o.gamma, static_cast<double>(t / o.step_size));
    case LrScheduleKind::kCosine: {
      const int64_t span = o.total_steps - o.warmup_steps;
      if (t >= span) return o.min_lr;
      const double c = std::cos(std::numbers::pi * static_cast<double>(t) /
                                static_cast<double>(span));
      return o.min_lr + (o.base_lr - o.min_lr) * 0.5 * (1.0 + c);
    }
    default:
      return o.base_lr;
  }
}

const char* LrSchedule::kind_name(LrScheduleKind kind) {
  switch (kind) {
    case LrScheduleKind::kConstant:
      return "constant";
    case LrScheduleKind::kStep:
      return "step";
    case LrScheduleKind::kCosine:
      return "cosine";
  }
  return "unknown";
}

Status LrSchedule::parse_kind(const std::string& name, LrScheduleKind* out) {
  if (out == nullptr) return Status::invalid_argument("LrSchedule::parse_kind: out: is null");
  for (LrScheduleKind k :
       {LrScheduleKind::kConstant, LrScheduleKind::kStep, LrScheduleKind::kCosine}) {
    if (name == kind_name(k)) {
      *out = k;
      return Status();
    }
  }
  return Status::invalid_argument("lr schedule: unknown name \"" + name +
                                  "\" (expected constant, step or cosine)");
}

}  // namespace bnorm::nn
