// SGD with momentum and weight decay (PyTorch's torch.optim.SGD, dampening 0, not Nesterov)
// and learning-rate schedules.
//
// Thread safety: an Sgd or LrSchedule is not safe for concurrent use.
#ifndef BNORM_NN_OPTIM_H_
#define BNORM_NN_OPTIM_H_

#include <cstdint>
#include <string>
#include <vector>

#include "bnorm/nn/state.h"
#include "bnorm/status.h"

namespace bnorm::nn {

struct SgdOptions {
  double lr = 0.01;           // finite, >= 0
  double momentum = 0.0;      // in [0, 1)
  double weight_decay = 0.0;  // finite, >= 0
};

// For each parameter p with gradient g, per step (PyTorch's semantics):
//   d = g + weight_decay * p
//   buf = momentum * buf + d     (buf starts at 0, so the first step's buf is d; skipped when
//                                 momentum == 0: buf = d)
//   p -= lr * buf
// Gradients are read, not cleared: call Module::zero_grad() (or Sgd::zero_grad()) each step.
class Sgd {
 public:
  Sgd() = default;
  // params: the entries of Module::parameters() (each kF32, is_parameter, grad not null); they
  // must outlive the optimizer. Fails on a bad option or entry, naming it.
  static Status create(std::vector<StateEntry> params, const SgdOptions& options, Sgd* out);

  // Replaces the parameters (e.g. Module::parameters() after a layer froze its weight and bias:
  // those are no longer stepped, neither by momentum nor weight decay). A parameter that stays
  // (the same data pointer) keeps its momentum buffer; a new one starts from 0. Fails on an
  // entry create() would refuse, naming it (nothing changed).
  Status set_params(std::vector<StateEntry> params);

  // One update of every parameter with the current learning rate.
  void step();
  // Zeroes every parameter's gradient.
  void zero_grad();

  // The learning rate of the following steps (e.g. from an LrSchedule); requires finite >= 0.
  void set_lr(double lr) { options_.lr = lr; }
  double lr() const { return options_.lr; }
  const SgdOptions& options() const { return options_; }

 private:
  std::vector<StateEntry> params_;
  std::vector<std::vector<float>> buffers_;  // momentum buffers, one per parameter
  SgdOptions options_;
};

enum class LrScheduleKind : int {
  kConstant = 0,  // base_lr
  kStep = 1,      // base_lr * gamma^floor(t / step_size)
  kCosine = 2,    // min_lr + (base_lr - min_lr) * (1 + cos(pi * t / T)) / 2, T = total - warmup
};

struct LrScheduleOptions {
  LrScheduleKind kind = LrScheduleKind::kConstant;
  double base_lr = 0.01;      // finite, >= 0
  int64_t total_steps = 0;    // cosine: > warmup_steps
  int64_t step_size = 1;      // step: >= 1
  double gamma = 0.1;         // step: finite, > 0
  double min_lr = 0.0;        // cosine: finite, >= 0
  int64_t warmup_steps = 0;   // >= 0: linear warm-up lr = base_lr * (s + 1) / warmup_steps for
                              // s < warmup_steps; the schedule's t = s - warmup_steps after it
};

// The learning rate as a function of the step index s (0-based).
class LrSchedule {
 public:
  LrSchedule() = default;
  // Validates the options, naming a bad one.
  static Status create(const LrScheduleOptions& options, LrSchedule* out);
  // Learning rate for step s >= 0 (cosine stays at min_lr after total_steps).
  double lr_at(int64_t step) const;
  const LrScheduleOptions& options() const { return options_; }
  // "constant", "step", "cosine"; parse_kind accepts the same names.
  static const char* kind_name(LrScheduleKind kind);
  static Status parse_kind(const std::string& name, LrScheduleKind* out);

 private:
  LrScheduleOptions options_;
};

}  // namespace bnorm::nn

#endif  // BNORM_NN_OPTIM_H_
