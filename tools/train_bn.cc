// `bnorm train`'s batch-norm extensions on the BN network: ghost batches, batch renorm and its
// schedule, the freezes from a step on (set on every BatchNorm layer before each step), and the
// switches put back to PyTorch's batch norm for the checkpoint.
#include <algorithm>
#include <cmath>

#include "train_internal.h"

namespace bnorm::tools {

std::vector<nn::BatchNormNd*> batch_norm_layers(nn::Sequential& model) {
  std::vector<nn::BatchNormNd*> out;
  for (size_t i = 0; i < model.size(); ++i)
    if (auto* bn = dynamic_cast<nn::BatchNormNd*>(&model.at(i))) out.push_back(bn);
  return out;
}

int64_t renorm_warmup_steps(const TrainConfig& c, int64_t steps) {
  return c.renorm_warmup >= 0 ? c.renorm_warmup : std::llround(0.1 * static_cast<double>(steps));
}

int64_t renorm_ramp_steps(const TrainConfig& c, int64_t steps) {
  return c.renorm_ramp >= 0 ? c.renorm_ramp : std::llround(0.4 * static_cast<double>(steps));
}

RenormLimits renorm_limits_at(const TrainConfig& c, int64_t steps, int64_t step) {
  const int64_t warmup = renorm_warmup_steps(c, steps), ramp = renorm_ramp_steps(c, steps);
  if (step < warmup) return {1.0, 0.0};
  const double t = ramp == 0 ? 1.0
                             : std::min(1.0, static_cast<double>(step - warmup) /
                                                 static_cast<double>(ramp));
  return {1.0 + t * (c.renorm_rmax - 1.0), t * c.renorm_dmax};
}

bool uses_bn_extensions(const TrainConfig& c) {
  return c.ghost_batch != 0 || c.batch_renorm || c.freeze_bn_stats_after >= 0 ||
         c.freeze_bn_affine_after >= 0;
}

Status apply_bn_switches(nn::Sequential& model, const TrainConfig& c, int64_t steps, int64_t step,
                         bool* affine_frozen_now) {
  *affine_frozen_now = false;
  if (!uses_bn_extensions(c)) return Status();
  const bool freeze_stats = c.freeze_bn_stats_after >= 0 && step >= c.freeze_bn_stats_after;
  const bool freeze_affine = c.freeze_bn_affine_after >= 0 && step >= c.freeze_bn_affine_after;
  const RenormLimits limits = renorm_limits_at(c, steps, step);
  for (nn::BatchNormNd* bn : batch_norm_layers(model)) {
    bnorm::BatchNorm& layer = bn->layer();
    if (freeze_affine && !layer.options().freeze_affine) *affine_frozen_now = true;
    BNORM_RETURN_IF_ERROR(layer.set_freeze(false, freeze_stats, freeze_affine));
    if (layer.options().ghost_batch != c.ghost_batch)
      BNORM_RETURN_IF_ERROR(layer.set_ghost_batch(c.ghost_batch));
    if (c.batch_renorm) {
      BNORM_RETURN_IF_ERROR(layer.set_renorm_limits(limits.rmax, limits.dmax));
      if (!layer.options().batch_renorm) BNORM_RETURN_IF_ERROR(layer.set_batch_renorm(true));
    }
  }
  return Status();
}

Status reset_bn_switches(nn::Sequential& model) {
  for (nn::BatchNormNd* bn : batch_norm_layers(model)) {
    bnorm::BatchNorm& layer = bn->layer();
    BNORM_RETURN_IF_ERROR(layer.set_batch_renorm(false));
    BNORM_RETURN_IF_ERROR(layer.set_ghost_batch(0));
    BNORM_RETURN_IF_ERROR(layer.set_freeze(false, false, false));
    BNORM_RETURN_IF_ERROR(layer.set_renorm_limits(3.0, 5.0));  // BatchNormOptions' defaults
  }
  return Status();
}

std::string bn_training_summary(const TrainConfig& c) {
  std::string out;
  auto add = [&](const std::string& part) { out += (out.empty() ? "" : ", ") + part; };
  if (c.ghost_batch != 0) add("ghost_batch=" + std::to_string(c.ghost_batch));
  if (c.batch_renorm)
    add("batch_renorm rmax=" + number(c.renorm_rmax) + " dmax=" + number(c.renorm_dmax) +
        " warmup=" + std::to_string(renorm_warmup_steps(c, c.steps)) +
        " ramp=" + std::to_string(renorm_ramp_steps(c, c.steps)));
  if (c.freeze_bn_stats_after >= 0)
    add("running statistics frozen from step " + std::to_string(c.freeze_bn_stats_after));
  if (c.freeze_bn_affine_after >= 0)
    add("weight and bias frozen from step " + std::to_string(c.freeze_bn_affine_after));
  if (c.precise_bn > 0)
    add("precise statistics from " + std::to_string(c.precise_bn) + " batches (" +
        c.precise_bn_aggregation + ")");
  return out;
}

}  // namespace bnorm::tools
