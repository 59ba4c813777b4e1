// The functional passes: validate every argument, then run the selected implementation.
// Nothing is written before the last check has passed.
#include "bnorm/batch_norm.h"

#include <exception>
#include <limits>
#include <new>

#include "kernels.h"
#include "util/check.h"

namespace bnorm {

using detail::Geometry;

#ifndef BNORM_VERSION_STRING
#define BNORM_VERSION_STRING "0.0.0"
#endif

const char* version() { return BNORM_VERSION_STRING; }

std::string layout_name(Layout layout) {
  switch (layout) {
    case Layout::kChannelsFirst:
      return "channels_first";
    case Layout::kChannelsLast:
      return "channels_last";
  }
  return "invalid(" + std::to_string(static_cast<int>(layout)) + ")";
}

namespace {


// What both forwards check first: x, y (same shape, y == x or disjoint), weight and bias.
template <class Args>
Status check_forward_common(const Args& a, Geometry* g) {
  BNORM_RETURN_IF_ERROR(detail::check_tensor("x", a.x, g));
  BNORM_RETURN_IF_ERROR(detail::check_same_shape("y", a.y, "x", a.x));
  BNORM_RETURN_IF_ERROR(
      detail::check_no_partial_overlap("y", a.y.data(), "x", a.x.data(), g->numel()));
  BNORM_RETURN_IF_ERROR(detail::check_channel_vector("weight", a.weight.size(), g->c, false, a.x));
  BNORM_RETURN_IF_ERROR(detail::check_channel_vector("bias", a.bias.size(), g->c, false, a.x));
  return Status();
}

}  // namespace

Status forward_train(const ForwardTrainArgs& a, const CallOptions& options) {
  Geometry g;
  BNORM_RETURN_IF_ERROR(check_forward_common(a, &g));
  const bool tracking = !a.running_mean.empty() || !a.running_var.empty();
  double factor = 0;
  int64_t batches = 0;
  BNORM_RETURN_IF_ERROR(detail::check_train_args(a, g, &factor, &batches));
  BNORM_RETURN_IF_ERROR(detail::check_more_than_one_value_per_channel(a.x, g));
  if (options.check_finite) BNORM_RETURN_IF_ERROR(detail::check_finite("x", a.x, g));

  detail::TrainCall call;
  call.g = g;
  call.x = a.x.data();
  call.weight = a.weight.empty() ? nullptr : a.weight.data();
  call.bias = a.bias.empty() ? nullptr : a.bias.data();
  call.running_mean = tracking ? a.running_mean.data() : nullptr;
  call.running_var = tracking ? a.running_var.data() : nullptr;
  call.factor = factor;
  call.eps = a.eps;
  call.y = a.y.data();
  call.save_mean = a.save_mean.empty() ? nullptr : a.save_mean.data();
  call.save_invstd = a.save_invstd.empty() ? nullptr : a.save_invstd.data();
  const detail::Implementation& impl = detail::select_implementation(options.backend);
  BNORM_RETURN_IF_ERROR(detail::run_kernels([&] { impl.forward_train(call); }));
  if (tracking && a.num_batches_tracked != nullptr) *a.num_batches_tracked = batches + 1;
  return Status();
}

Status forward_eval(const ForwardEvalArgs& a, const CallOptions& options) {
  Geometry g;
  BNORM_RETURN_IF_ERROR(check_forward_common(a, &g));
  BNORM_RETURN_IF_ERROR(
      detail::check_channel_vector("running_mean", a.running_mean.size(), g.c, true, a.x));
  BNORM_RETURN_IF_ERROR(
      detail::check_channel_vector("running_var", a.running_var.size(), g.c, true, a.x));
  BNORM_RETURN_IF_ERROR(detail::check_eps(a.eps));
  if (options.check_finite) BNORM_RETURN_IF_ERROR(detail::check_finite("x", a.x, g));

  detail::EvalCall call;
  call.g = g;
  call.x = a.x.data();
  call.weight = a.weight.empty() ? nullptr : a.weight.data();
  call.bias = a.bias.empty() ? nullptr : a.bias.data();
  call.running_mean = a.running_mean.data();
  call.running_var = a.running_var.data();
  call.eps = a.eps;
  call.y = a.y.data();
  const detail::Implementation& impl = detail::select_implementation(options.backend);
  return detail::run_kernels([&] { impl.forward_eval(call); });
}

Status backward(const BackwardArgs& a, const CallOptions& options) {
  Geometry g;
  BNORM_RETURN_IF_ERROR(detail::check_tensor("x", a.x, &g));
  BNORM_RETURN_IF_ERROR(detail::check_same_shape("dy", a.dy, "x", a.x));
  BNORM_RETURN_IF_ERROR(detail::check_same_shape("dx", a.dx, "x", a.x));
  BNORM_RETURN_IF_ERROR(
      detail::check_no_partial_overlap("dx", a.dx.data(), "dy", a.dy.data(), g.numel()));
  BNORM_RETURN_IF_ERROR(
      detail::check_no_partial_overlap("dx", a.dx.data(), "x", a.x.data(), g.numel()));
  BNORM_RETURN_IF_ERROR(detail::check_backward_args(a, g));
  if (options.check_finite) {
    BNORM_RETURN_IF_ERROR(detail::check_finite("dy", a.dy, g));
    BNORM_RETURN_IF_ERROR(detail::check_finite("x", a.x, g));
  }

  detail::BackwardCall call;
  call.g = g;
  call.dy = a.dy.data();
  call.x = a.x.data();
  call.weight = a.weight.empty() ? nullptr : a.weight.data();
  call.training = a.training;
  if (a.training) {
    call.save_mean = a.save_mean.data();
    call.save_invstd = a.save_invstd.data();
  } else {
    call.running_mean = a.running_mean.data();
    call.running_var = a.running_var.data();
  }
  call.eps = a.eps;
  call.dx = a.dx.data();
  call.dweight = a.dweight.empty() ? nullptr : a.dweight.data();
  call.dbias = a.dbias.empty() ? nullptr : a.dbias.data();
  const detail::Implementation& impl = detail::select_implementation(options.backend);
  return detail::run_kernels([&] { impl.backward(call); });
}

}  // namespace bnorm
