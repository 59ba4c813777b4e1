// `bnorm train`'s configuration: the presets' defaults, the validation of every option, and the
// preset networks and their input shapes.
#include <algorithm>
#include <cmath>
#include <sstream>

#include "bnorm/nn/models.h"
#include "bnorm/nn/optim.h"
#include "train_internal.h"
#include "training.h"

namespace bnorm::tools {

Status bad_option(const std::string& name, const std::string& problem) {
  return Status::invalid_argument("--" + name + ": " + problem);
}

std::string number(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

std::vector<int64_t> input_shape(const std::string& preset, int64_t n) {
  if (preset == "cnn") return {n, 1, 28, 28};
  return {n, 784};
}

Status build_model(const std::string& preset, bool batch_norm, uint64_t seed, nn::Sequential* out) {
  if (preset == "paper-mlp") {
    *out = nn::paper_mlp(batch_norm, seed);
  } else if (preset == "cnn") {
    *out = nn::cnn(batch_norm, seed);
  } else {
    return bad_option("preset", "unknown preset '" + preset + "' (expected paper-mlp or cnn)");
  }
  return Status();
}

Status apply_preset_defaults(TrainConfig* c) {
  struct Defaults {
    int64_t steps;
    double epochs;
    int64_t batch;
    double lr, momentum, wd;
    const char* schedule;
    int64_t warmup;
    int64_t eval_every;  // -1: once per epoch
    bool normalize;
    int64_t sweep_steps;
    const char* augment;
  };
  Defaults d;
  if (c->preset == "paper-mlp") {
    // Ioffe & Szegedy 4.1: mini-batches of 60, 50,000 steps, plain SGD. The paper gives no
    // learning rate; we use 0.1 for both networks (the sweep in the README shows others).
    d = {50000, -1, 60, 0.1, 0.0, 0.0, "constant", 0, 500, false, 5000, "none"};
  } else if (c->preset == "cnn") {
    d = {-1, 15, 128, 0.05, 0.9, 5e-4, "cosine", 0, -1, true, 1000, "flip"};
  } else {
    return bad_option("preset", "unknown preset '" + c->preset + "' (expected paper-mlp or cnn)");
  }
  if (!c->given.count("batch-size") && c->batch_size < 0) c->batch_size = d.batch;
  if (c->batch_size < 2)
    return bad_option("batch-size", std::to_string(c->batch_size) +
                                        " is too small: batch norm needs at least 2 examples");
  if (c->batch_size > kTrainExamples)
    return bad_option("batch-size", std::to_string(c->batch_size) + " exceeds the 60000 examples");
  const int64_t steps_per_epoch = kTrainExamples / c->batch_size;
  const bool steps_given = c->given.count("steps") || c->steps >= 0;
  const bool epochs_given = c->given.count("epochs") || c->epochs >= 0;
  if (steps_given && epochs_given) return bad_option("steps", "give --steps or --epochs, not both");
  if (epochs_given) {
    if (!std::isfinite(c->epochs) || c->epochs <= 0)
      return bad_option("epochs", number(c->epochs) + " is not > 0");
    c->steps = std::max<int64_t>(1, std::llround(c->epochs * static_cast<double>(steps_per_epoch)));
  } else if (!steps_given) {
    c->steps = d.steps >= 0 ? d.steps : std::llround(d.epochs * static_cast<double>(steps_per_epoch));
  }
  if (c->steps < 1) return bad_option("steps", std::to_string(c->steps) + " is not >= 1");
  c->epochs = static_cast<double>(c->steps) / static_cast<double>(steps_per_epoch);
  if (!c->given.count("lr") && c->lr < 0) c->lr = d.lr;
  if (!std::isfinite(c->lr) || c->lr <= 0) return bad_option("lr", number(c->lr) + " is not > 0");
  if (!c->given.count("momentum") && c->momentum < 0) c->momentum = d.momentum;
  if (!(c->momentum >= 0 && c->momentum < 1))
    return bad_option("momentum", number(c->momentum) + " is not in [0, 1)");
  if (!c->given.count("weight-decay") && c->weight_decay < 0) c->weight_decay = d.wd;
  if (!std::isfinite(c->weight_decay) || c->weight_decay < 0)
    return bad_option("weight-decay", number(c->weight_decay) + " is not a finite value >= 0");
  if (c->schedule.empty()) c->schedule = d.schedule;
  nn::LrScheduleKind kind;
  if (!nn::LrSchedule::parse_kind(c->schedule, &kind).ok())
    return bad_option("schedule", "unknown schedule '" + c->schedule +
                                      "' (expected constant, step or cosine)");
  if (!c->given.count("warmup-steps") && c->warmup_steps < 0) c->warmup_steps = d.warmup;
  if (c->warmup_steps < 0)
    return bad_option("warmup-steps", std::to_string(c->warmup_steps) + " is not >= 0");
  if (!c->given.count("eval-every") && c->eval_every < 0) c->eval_every = d.eval_every >= 0 ? d.eval_every : steps_per_epoch;
  if (c->eval_every < 0)
    return bad_option("eval-every", std::to_string(c->eval_every) + " is not >= 0");
  if (c->eval_every > c->steps) c->eval_every = c->steps;
  if (!c->given.count("sweep-steps") && c->sweep_steps < 0) c->sweep_steps = d.sweep_steps;
  if (c->sweep_steps < 1) return bad_option("sweep-steps", std::to_string(c->sweep_steps) + " is not >= 1");
  for (double lr : c->lr_sweep)
    if (!std::isfinite(lr) || lr <= 0) return bad_option("lr-sweep", number(lr) + " is not > 0");
  if (c->which != "both" && c->which != "bn" && c->which != "plain")
    return bad_option("only", "'" + c->which + "' (expected both, bn or plain)");
  if (d.normalize) c->normalize = true;
  if (c->augment.empty()) c->augment = d.augment;
  if (c->augment != "none" && c->augment != "flip" && c->augment != "crop" &&
      c->augment != "flip+crop")
    return bad_option("augment", "'" + c->augment + "' (expected none, flip, crop or flip+crop)");
  if (c->out_dir.empty()) c->out_dir = "runs/" + c->preset;
  if (c->sync_mode != "reproducible" && c->sync_mode != "per-rank")
    return bad_option("sync-mode", "'" + c->sync_mode + "' (expected reproducible or per-rank)");
  if (c->threads < 0) return bad_option("threads", std::to_string(c->threads) + " is not >= 0");
  return Status();
}

}  // namespace bnorm::tools
