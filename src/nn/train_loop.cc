#include "bnorm/nn/train_loop.h"

#include <chrono>
#include <string>

namespace bnorm::nn {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

Status train_loop(DataParallel* dp, Sgd* sgd, const LrSchedule& schedule,
                  const TrainLoopOptions& options, const TrainLoopHooks& hooks,
                  TrainLoopResult* out) {
  if (dp == nullptr || sgd == nullptr || out == nullptr)
    return Status::invalid_argument("train_loop: dp, sgd and out must not be null");
  if (!hooks.batch) return Status::invalid_argument("train_loop: hooks.batch: is not set");
  if (options.steps < 1)
    return Status::invalid_argument("train_loop: steps: must be >= 1, got " +
                                    std::to_string(options.steps));
  if (options.eval_every < 0)
    return Status::invalid_argument("train_loop: eval_every: must be >= 0, got " +
                                    std::to_string(options.eval_every));
  *out = TrainLoopResult();
  const bool every = options.eval_every > 0;
  if (every && hooks.interval)
    BNORM_RETURN_IF_ERROR(hooks.interval(TrainInterval{0, NAN, NAN, schedule.lr_at(0)}));

  Tensor x;
  std::vector<int32_t> labels;
  const double batch = static_cast<double>(dp->global_batch());
  double interval_loss = 0, interval_correct = 0, interval_seen = 0;
  int64_t interval_steps = 0;
  auto train_start = Clock::now();
  int64_t step = 0;
  for (; step < options.steps; ++step) {
    out->steps_done = step;
    BNORM_RETURN_IF_ERROR(hooks.batch(step, &x, &labels));
    const double lr = schedule.lr_at(step);
    sgd->set_lr(lr);
    StepResult r;
    BNORM_RETURN_IF_ERROR(dp->train_step(x, labels, sgd, &r));
    if (!r.finite) {
      out->diverged = true;
      break;
    }
    interval_loss += r.loss;
    interval_correct += static_cast<double>(r.correct);
    interval_seen += batch;
    ++interval_steps;
    const bool ends = (every && (step + 1) % options.eval_every == 0) || step + 1 == options.steps;
    if (hooks.step) hooks.step(TrainStep{step, r.loss, r.correct, lr, ends});
    if (!ends) continue;
    out->train_seconds += seconds_since(train_start);
    const double mean_loss = interval_loss / static_cast<double>(interval_steps);
    const double accuracy = interval_correct / interval_seen;
    out->final_train_loss = mean_loss;
    out->final_train_accuracy = accuracy;
    out->steps_done = step + 1;
    if (hooks.interval)
      BNORM_RETURN_IF_ERROR(hooks.interval(TrainInterval{step + 1, mean_loss, accuracy, lr}));
    interval_loss = interval_correct = interval_seen = 0;
    interval_steps = 0;
    train_start = Clock::now();
  }
  out->steps_done = step;
  // A finished run counted its last interval at the last step; a diverged one counts it here.
  if (out->diverged) out->train_seconds += seconds_since(train_start);
  return Status();
}

}  // namespace bnorm::nn
