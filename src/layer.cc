// The stateful layer: owns PyTorch's parameters and buffers and calls the functional passes.
#include <algorithm>
#include <cmath>
#include <exception>

#include "bnorm/batch_norm.h"
#include "bnorm/comm.h"
#include "util/check.h"

namespace bnorm {

Status BatchNorm::create(const BatchNormOptions& options, BatchNorm* out) {
  if (out == nullptr) return Status::invalid_argument("out: is null");
  if (options.num_features <= 0)
    return Status::invalid_argument("num_features: must be > 0, got " +
                                    std::to_string(options.num_features));
  BNORM_RETURN_IF_ERROR(detail::check_eps(options.eps));
  BNORM_RETURN_IF_ERROR(detail::check_momentum(options.momentum));
  if (options.backend != Backend::kAuto && options.backend != Backend::kReference)
    return Status::invalid_argument("backend: unknown value " +
                                    std::to_string(static_cast<int>(options.backend)));
  BatchNorm layer;
  layer.options_ = options;
  const auto c = static_cast<size_t>(options.num_features);
  try {
    if (options.affine) {
      layer.weight_.resize(c);
      layer.bias_.resize(c);
      layer.weight_grad_.assign(c, 0.0f);
      layer.bias_grad_.assign(c, 0.0f);
      layer.dweight_scratch_.resize(c);
      layer.dbias_scratch_.resize(c);
    }
    if (options.track_running_stats) {
      layer.running_mean_.resize(c);
      layer.running_var_.resize(c);
    }
    layer.save_mean_.resize(c);
    layer.save_invstd_.resize(c);
  } catch (const std::exception& e) {  // bad_alloc, or length_error for absurd sizes
    return Status::internal("num_features: cannot allocate " +
                            std::to_string(options.num_features) + " channels (" + e.what() + ")");
  }
  layer.reset_parameters();
  *out = std::move(layer);
  return Status();
}

Status BatchNorm::set_momentum(std::optional<double> momentum) {
  BNORM_RETURN_IF_ERROR(detail::check_momentum(momentum));
  options_.momentum = momentum;
  return Status();
}

CallOptions BatchNorm::call_options() const {
  CallOptions o;
  o.check_finite = options_.check_finite;
  o.backend = options_.backend;
  return o;
}

void BatchNorm::reset_running_stats() {
  std::fill(running_mean_.begin(), running_mean_.end(), 0.0f);
  std::fill(running_var_.begin(), running_var_.end(), 1.0f);
  num_batches_tracked_ = 0;
}

void BatchNorm::reset_parameters() {
  reset_running_stats();
  std::fill(weight_.begin(), weight_.end(), 1.0f);
  std::fill(bias_.begin(), bias_.end(), 0.0f);
}

void BatchNorm::set_sync(Communicator* comm, SyncMode mode) {
  comm_ = comm;
  sync_mode_ = static_cast<int>(mode);
  last_split_.clear();
}

void BatchNorm::zero_grad() {
  std::fill(weight_grad_.begin(), weight_grad_.end(), 0.0f);
  std::fill(bias_grad_.begin(), bias_grad_.end(), 0.0f);
}

std::vector<std::pair<std::string, std::span<float>>> BatchNorm::named_tensors() {
  std::vector<std::pair<std::string, std::span<float>>> out;
  if (options_.affine) {
    out.emplace_back("weight", weight_);
    out.emplace_back("bias", bias_);
  }
  if (options_.track_running_stats) {
    out.emplace_back("running_mean", running_mean_);
    out.emplace_back("running_var", running_var_);
  }
  return out;
}

Status BatchNorm::forward(ConstTensorView x, TensorView y) {
  if (options_.num_features <= 0)
    return Status::invalid_argument("BatchNorm: layer was not created with BatchNorm::create");
  if (x.rank() >= 2 && x.channels() != options_.num_features)
    return Status::invalid_argument(
        "x: has C = " + std::to_string(x.channels()) + " channels (size " + x.size_string() +
        "), the layer has num_features = " + std::to_string(options_.num_features));
  // Batch statistics in training mode, and in eval mode without running statistics.
  const bool use_batch_stats = training_ || !options_.track_running_stats;
  if (use_batch_stats) {
    ForwardTrainArgs a;
    a.x = x;
    a.weight = weight_;
    a.bias = bias_;
    if (training_ && options_.track_running_stats) {
      a.running_mean = running_mean_;
      a.running_var = running_var_;
      a.num_batches_tracked = &num_batches_tracked_;
    }
    a.momentum = options_.momentum;
    a.eps = options_.eps;
    a.y = y;
    a.save_mean = save_mean_;
    a.save_invstd = save_invstd_;
    if (comm_ != nullptr && training_) {
      SyncOptions sync;
      sync.mode = static_cast<SyncMode>(sync_mode_);
      sync.split = sync_split_;
      sync.split_out = &last_split_;
      BNORM_RETURN_IF_ERROR(sync_forward_train(*comm_, a, call_options(), sync));
    } else {
      BNORM_RETURN_IF_ERROR(forward_train(a, call_options()));
    }
  } else {
    ForwardEvalArgs a;
    a.x = x;
    a.weight = weight_;
    a.bias = bias_;
    a.running_mean = running_mean_;
    a.running_var = running_var_;
    a.eps = options_.eps;
    a.y = y;
    BNORM_RETURN_IF_ERROR(forward_eval(a, call_options()));
    for (size_t c = 0; c < save_mean_.size(); ++c) {
      save_mean_[c] = running_mean_[c];
      save_invstd_[c] =
          static_cast<float>(1.0 / std::sqrt(static_cast<double>(running_var_[c]) + options_.eps));
    }
  }
  have_forward_ = true;
  last_forward_training_ = use_batch_stats;
  last_forward_synced_ = use_batch_stats && comm_ != nullptr && training_;
  last_rank_ = x.rank();
  last_layout_ = x.layout();
  for (int i = 0; i < kMaxRank; ++i) last_dims_[i] = x.raw_dim(i);
  return Status();
}

Status BatchNorm::backward(ConstTensorView dy, ConstTensorView x, TensorView dx) {
  if (!have_forward_) return Status::invalid_argument("backward: no forward has run on this layer");
  bool same = x.rank() == last_rank_ && x.layout() == last_layout_;
  for (int i = 0; same && i < kMaxRank; ++i) same = x.raw_dim(i) == last_dims_[i];
  if (!same)
    return Status::invalid_argument("x: size " + x.size_string() + " (" + layout_name(x.layout()) +
                                    ") differs from the last forward's input");
  BackwardArgs a;
  a.dy = dy;
  a.x = x;
  a.weight = weight_;
  a.training = last_forward_training_;
  if (last_forward_training_) {
    a.save_mean = save_mean_;
    a.save_invstd = save_invstd_;
  } else {
    a.running_mean = running_mean_;
    a.running_var = running_var_;
  }
  a.eps = options_.eps;
  a.dx = dx;
  a.dweight = dweight_scratch_;
  a.dbias = dbias_scratch_;
  if (last_forward_synced_) {
    SyncOptions sync;
    sync.mode = static_cast<SyncMode>(sync_mode_);
    sync.split = last_split_;
    BNORM_RETURN_IF_ERROR(sync_backward(*comm_, a, call_options(), sync));
  } else {
    BNORM_RETURN_IF_ERROR(bnorm::backward(a, call_options()));
  }
  for (size_t c = 0; c < weight_grad_.size(); ++c) {
    weight_grad_[c] += dweight_scratch_[c];
    bias_grad_[c] += dbias_scratch_[c];
  }
  return Status();
}

}  // namespace bnorm
