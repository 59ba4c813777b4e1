// The stateful layer: owns PyTorch's parameters and buffers and calls the functional passes.
#include <algorithm>
#include <array>
#include <cmath>
#include <exception>

#include "bnorm/batch_norm.h"
#include "bnorm/comm.h"
#include "util/check.h"

namespace bnorm {
namespace {

// The freeze, renorm and ghost options together (each one's range, and the combinations).
Status check_extension_options(const BatchNormOptions& o) {
  if (o.normalize_with_running_stats && !o.track_running_stats)
    return Status::invalid_argument(
        "normalize_with_running_stats: a frozen-statistics layer needs running statistics, but "
        "track_running_stats is false");
  if (o.batch_renorm) {
    if (!o.track_running_stats)
      return Status::invalid_argument(
          "batch_renorm: needs running statistics (mu and sigma), but track_running_stats is "
          "false");
    if (o.normalize_with_running_stats)
      return Status::invalid_argument(
          "batch_renorm: cannot be combined with normalize_with_running_stats");
    if (o.ghost_batch != 0)
      return Status::invalid_argument("batch_renorm: cannot be combined with ghost_batch = " +
                                      std::to_string(o.ghost_batch));
  }
  BNORM_RETURN_IF_ERROR(detail::check_renorm_limits(o.renorm_rmax, o.renorm_dmax));
  return detail::check_ghost_batch(o.ghost_batch);
}

}  // namespace

Status BatchNorm::set_freeze(bool normalize_with_running_stats, bool freeze_running_stats,
                             bool freeze_affine) {
  BatchNormOptions o = options_;
  o.normalize_with_running_stats = normalize_with_running_stats;
  o.freeze_running_stats = freeze_running_stats;
  o.freeze_affine = freeze_affine;
  BNORM_RETURN_IF_ERROR(check_extension_options(o));
  options_ = o;
  return Status();
}

Status BatchNorm::set_renorm_limits(double rmax, double dmax) {
  BNORM_RETURN_IF_ERROR(detail::check_renorm_limits(rmax, dmax));
  options_.renorm_rmax = rmax;
  options_.renorm_dmax = dmax;
  return Status();
}

Status BatchNorm::set_batch_renorm(bool on) {
  BatchNormOptions o = options_;
  o.batch_renorm = on;
  BNORM_RETURN_IF_ERROR(check_extension_options(o));
  options_ = o;
  return Status();
}

Status BatchNorm::set_ghost_batch(int64_t ghost_batch) {
  BatchNormOptions o = options_;
  o.ghost_batch = ghost_batch;
  BNORM_RETURN_IF_ERROR(check_extension_options(o));
  options_ = o;
  return Status();
}

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
  BNORM_RETURN_IF_ERROR(check_extension_options(options));
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
      layer.frozen_mean_.resize(c);
      layer.frozen_var_.resize(c);
      layer.new_mean_.resize(c);
      layer.new_var_.resize(c);
      layer.save_r_.resize(c);
      layer.save_d_.resize(c);
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
  const bool tracking = options_.track_running_stats;
  const bool frozen_stats = training_ && options_.normalize_with_running_stats;
  // Batch statistics in training mode (unless frozen), and in eval mode without running
  // statistics.
  const bool use_batch_stats = (training_ && !frozen_stats) || !tracking;
  const bool update = training_ && tracking && !options_.freeze_running_stats;
  const bool renorm = training_ && options_.batch_renorm;
  const int64_t ghost = training_ && !frozen_stats ? options_.ghost_batch : 0;
  if (ghost != 0 || renorm) {
    // K * C chunk statistics (a G the pass refuses keeps C: the pass names the problem).
    const bool chunked = ghost != 0 && x.rank() >= 2 && x.batch() > 0 && ghost <= x.batch();
    const auto chunks = static_cast<size_t>(chunked ? (x.batch() + ghost - 1) / ghost : 1);
    try {
      save_mean_.resize(chunks * static_cast<size_t>(options_.num_features));
      save_invstd_.resize(save_mean_.size());
    } catch (const std::exception& e) {
      return Status::internal(std::string("ghost_batch: cannot allocate the chunk statistics (") +
                              e.what() + ")");
    }
  } else if (save_mean_.size() != static_cast<size_t>(options_.num_features)) {
    save_mean_.resize(static_cast<size_t>(options_.num_features));
    save_invstd_.resize(save_mean_.size());
  }
  if (use_batch_stats) {
    ForwardTrainArgs a;
    a.x = x;
    a.weight = weight_;
    a.bias = bias_;
    if (update || renorm) {
      a.running_mean = running_mean_;
      a.running_var = running_var_;
      a.num_batches_tracked = &num_batches_tracked_;
    }
    if (renorm && !update) {  // mu and sigma read, not updated
      a.running_mean_out = new_mean_;
      a.running_var_out = new_var_;
    }
    a.momentum = options_.momentum;
    a.eps = options_.eps;
    a.y = y;
    a.save_mean = save_mean_;
    a.save_invstd = save_invstd_;
    a.batch_renorm = renorm;
    a.rmax = options_.renorm_rmax;
    a.dmax = options_.renorm_dmax;
    if (renorm) {
      a.save_r = save_r_;
      a.save_d = save_d_;
    }
    a.ghost_batch = ghost;
    if (comm_ != nullptr && training_) {
      SyncOptions sync;
      sync.mode = static_cast<SyncMode>(sync_mode_);
      sync.split = sync_split_;
      sync.split_out = &last_split_;
      BNORM_RETURN_IF_ERROR(sync_forward_train(*comm_, a, call_options(), sync));
    } else {
      BNORM_RETURN_IF_ERROR(fused_.on ? forward_train_relu(a, fused_.z, call_options())
                                      : forward_train(a, call_options()));
    }
  } else {
    // Running statistics: eval mode, or a frozen-statistics training forward, which keeps what
    // it normalized with (the backward's constants) and may update them from the batch.
    std::copy(running_mean_.begin(), running_mean_.end(), frozen_mean_.begin());
    std::copy(running_var_.begin(), running_var_.end(), frozen_var_.begin());
    int64_t new_count = num_batches_tracked_;
    if (frozen_stats && update) {
      // The update pass writes a y of its own: y itself unless it is x (then a scratch copy).
      TensorView target = y;
      if (y.raw() == x.raw() && x.rank() >= 2) {
        int64_t numel = 1;
        for (int i = 0; i < x.rank() && i < kMaxRank; ++i) numel *= std::max<int64_t>(x.dim(i), 0);
        try {
          y_scratch_.resize(static_cast<size_t>(numel));
        } catch (const std::exception& e) {
          return Status::internal(std::string("normalize_with_running_stats: cannot allocate the "
                                              "update pass's output (") + e.what() + ")");
        }
        std::array<int64_t, kMaxRank> dims{};
        for (int i = 0; i < x.rank() && i < kMaxRank; ++i) dims[i] = x.dim(i);
        // y_scratch_ holds numel floats: room for numel elements of any dtype.
        target = TensorView(static_cast<void*>(y_scratch_.data()), x.dtype(),
                            std::span<const int64_t>(dims.data(), static_cast<size_t>(x.rank())),
                            x.layout());
      }
      ForwardTrainArgs u;
      u.x = x;
      u.running_mean = running_mean_;
      u.running_var = running_var_;
      u.num_batches_tracked = &num_batches_tracked_;
      u.running_mean_out = new_mean_;
      u.running_var_out = new_var_;
      u.num_batches_tracked_out = &new_count;
      u.momentum = options_.momentum;
      u.eps = options_.eps;
      u.y = target;
      if (comm_ != nullptr) {
        SyncOptions sync;
        sync.mode = static_cast<SyncMode>(sync_mode_);
        BNORM_RETURN_IF_ERROR(sync_forward_train(*comm_, u, call_options(), sync));
      } else {
        BNORM_RETURN_IF_ERROR(forward_train(u, call_options()));
      }
    }
    ForwardEvalArgs a;
    a.x = x;
    a.weight = weight_;
    a.bias = bias_;
    a.running_mean = frozen_mean_;
    a.running_var = frozen_var_;
    a.eps = options_.eps;
    a.y = y;
    BNORM_RETURN_IF_ERROR(fused_.on ? forward_eval_relu(a, fused_.z, call_options())
                                    : forward_eval(a, call_options()));
    if (frozen_stats && update) {
      std::copy(new_mean_.begin(), new_mean_.end(), running_mean_.begin());
      std::copy(new_var_.begin(), new_var_.end(), running_var_.begin());
      num_batches_tracked_ = new_count;
    }
    for (size_t c = 0; c < frozen_mean_.size(); ++c) {
      save_mean_[c] = frozen_mean_[c];
      save_invstd_[c] =
          static_cast<float>(1.0 / std::sqrt(static_cast<double>(frozen_var_[c]) + options_.eps));
    }
  }
  last_ghost_ = use_batch_stats ? ghost : 0;
  last_renorm_ = use_batch_stats && renorm;
  have_forward_ = true;
  last_forward_training_ = use_batch_stats;
  last_forward_synced_ = use_batch_stats && comm_ != nullptr && training_;
  last_freeze_affine_ = options_.freeze_affine;
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
    a.running_mean = frozen_mean_;
    a.running_var = frozen_var_;
  }
  if (last_renorm_) {
    a.renorm_r = save_r_;
    a.renorm_d = save_d_;
  }
  a.ghost_batch = last_ghost_;
  a.eps = options_.eps;
  a.dx = dx;
  if (!last_freeze_affine_) {
    a.dweight = dweight_scratch_;
    a.dbias = dbias_scratch_;
  }
  if (last_forward_synced_) {
    SyncOptions sync;
    sync.mode = static_cast<SyncMode>(sync_mode_);
    sync.split = last_split_;
    BNORM_RETURN_IF_ERROR(sync_backward(*comm_, a, call_options(), sync));
  } else {
    BNORM_RETURN_IF_ERROR(fused_.on ? bnorm::backward_relu(a, fused_.y, fused_.dz, call_options())
                                    : bnorm::backward(a, call_options()));
  }
  for (size_t c = 0; !last_freeze_affine_ && c < weight_grad_.size(); ++c) {
    weight_grad_[c] += dweight_scratch_[c];
    bias_grad_[c] += dbias_scratch_[c];
  }
  return Status();
}

Status BatchNorm::forward_relu(ConstTensorView x, TensorView y, ConstTensorView z) {
  if (comm_ != nullptr && training_)
    return Status::invalid_argument(
        "forward_relu: the fused forms do not run synchronized (set_sync); call forward, then "
        "the ReLU");
  fused_ = Fused{true, z, {}, {}};
  const Status status = forward(x, y);
  fused_ = Fused();
  return status;
}

Status BatchNorm::backward_relu(ConstTensorView dy, ConstTensorView x, ConstTensorView y,
                                TensorView dx, TensorView dz) {
  if (have_forward_ && last_forward_synced_)
    return Status::invalid_argument(
        "backward_relu: the last forward was synchronized; the fused forms do not run "
        "synchronized");
  fused_ = Fused{true, {}, y, dz};
  const Status status = backward(dy, x, dx);
  fused_ = Fused();
  return status;
}

}  // namespace bnorm
