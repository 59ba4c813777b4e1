// The training loop as library code: steps of DataParallel::train_step under a learning-rate
// schedule, the training loss and accuracy averaged over intervals, and hooks that supply each
// step's batch and run an evaluation at the end of each interval. With a distributed
// DataParallel every rank runs the loop (and its hooks) in lockstep; without one it is plain
// training. What bnorm train runs for each of its networks.
//
// Thread safety: one loop per DataParallel at a time, on that rank's thread.
#ifndef BNORM_NN_TRAIN_LOOP_H_
#define BNORM_NN_TRAIN_LOOP_H_

#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "bnorm/nn/data_parallel.h"
#include "bnorm/nn/optim.h"
#include "bnorm/nn/tensor.h"
#include "bnorm/status.h"

namespace bnorm::nn {

struct TrainLoopOptions {
  int64_t steps = 0;  // optimizer steps to take, >= 1
  // > 0: an interval ends after every eval_every steps and at the last step, and the interval
  // hook also runs once at step 0, before training. 0: one interval, ending at the last step.
  int64_t eval_every = 0;
};

// The end of an interval, as the interval hook sees it.
struct TrainInterval {
  int64_t step = 0;             // steps done (0: before training)
  double train_loss = NAN;      // mean over the interval's steps of their global mean loss
  double train_accuracy = NAN;  // samples classified correctly / samples, over the interval
  double lr = 0;                // the learning rate of the interval's last step (step 0: lr_at(0))
};

// One step taken, as the step hook sees it.
struct TrainStep {
  int64_t step = 0;    // its index (0-based): step + 1 steps are done
  double loss = 0;     // the global batch's mean loss
  int64_t correct = 0;
  double lr = 0;
  bool ends_interval = false;  // the interval hook runs next
};

struct TrainLoopHooks {
  // Required. Fills this rank's shard of step `step`'s global batch: x (resized by the hook to
  // DataParallel::shard_size() samples) and labels (as many). Called once per step, in order.
  std::function<Status(int64_t step, Tensor* x, std::vector<int32_t>* labels)> batch;
  // Optional. At the end of each interval (e.g. to evaluate; it may switch the model's mode and
  // must switch it back to training). Its time is not counted in train_seconds.
  std::function<Status(const TrainInterval&)> interval;
  // Optional. After every step taken, before the interval hook (e.g. progress).
  std::function<void(const TrainStep&)> step;
};

struct TrainLoopResult {
  int64_t steps_done = 0;   // steps taken: options.steps, or the diverged step's index
  bool diverged = false;    // a step's global loss was not finite: the loop stopped there
  double train_seconds = 0; // wall time of the steps and batch hooks (not the interval hooks)
  double final_train_loss = NAN;      // of the last interval that ended
  double final_train_accuracy = NAN;
};

// Runs options.steps steps: for step s, hooks.batch(s), sgd->set_lr(schedule.lr_at(s)),
// dp->train_step; at each interval's end hooks.interval. Stops early, without error, when a
// step's loss is not finite (out->diverged; the interval it was in does not end). Collective
// with a distributed dp (the hooks may make collectives of their own, in the same order on every
// rank). Errors: a null argument or hooks.batch missing, options.steps < 1 or eval_every < 0,
// and the first error of a hook or a step (out then holds the steps done so far); a step's
// error is local as DataParallel::train_step says.
Status train_loop(DataParallel* dp, Sgd* sgd, const LrSchedule& schedule,
                  const TrainLoopOptions& options, const TrainLoopHooks& hooks,
                  TrainLoopResult* out);

}  // namespace bnorm::nn

#endif  // BNORM_NN_TRAIN_LOOP_H_
