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
  return check_bn_extensions(c);
}

namespace {

// The study sets these itself for each of its runs.
constexpr const char* kStudySets[] = {
    "batch-size", "steps", "epochs", "ghost-batch", "batch-renorm", "renorm-warmup",
    "renorm-ramp", "precise-bn", "freeze-bn-stats-after", "freeze-bn-affine-after", "only",
    "lr-sweep"};

Status check_study(TrainConfig* c) {
  for (const char* name : {"study-batch-sizes", "study-examples"})
    if (c->given.count(name) && !c->small_batch_study)
      return bad_option(name, "needs --small-batch-study");
  if (!c->small_batch_study) return Status();
  for (const char* name : kStudySets)
    if (c->given.count(name))
      return bad_option("small-batch-study", std::string("sets --") + name +
                                                 " itself for each run: remove --" + name);
  if (c->sync_bn)
    return bad_option("small-batch-study", "runs in one process: remove --sync-bn");
  if (c->study_batch_sizes.empty()) return bad_option("study-batch-sizes", "is empty");
  for (int64_t b : c->study_batch_sizes)
    if (b < 4 || b % 2 != 0 || b > kTrainExamples)
      return bad_option("study-batch-sizes",
                        std::to_string(b) + " is not an even batch size in [4, 60000] (ghost BN "
                                            "takes chunks of half the batch, >= 2)");
  if (c->study_examples < 0 && !c->given.count("study-examples")) c->study_examples = 300000;
  const int64_t largest = *std::max_element(c->study_batch_sizes.begin(), c->study_batch_sizes.end());
  if (c->study_examples < largest)
    return bad_option("study-examples", std::to_string(c->study_examples) +
                                            " is less than one batch of " + std::to_string(largest));
  return Status();
}

}  // namespace

Status check_bn_extensions(TrainConfig* c) {
  BNORM_RETURN_IF_ERROR(check_study(c));
  auto given = [&](const char* name) { return c->given.count(name) > 0; };
  const char* bn_only[] = {"ghost-batch", "batch-renorm", "freeze-bn-stats-after",
                           "freeze-bn-affine-after", "precise-bn"};
  if (c->which == "plain")
    for (const char* name : bn_only)
      if (given(name))
        return bad_option(name, "acts on batch norm, but --only plain trains no BN network");
  if (given("ghost-batch")) {
    const int64_t g = c->ghost_batch, n = c->batch_size;
    if (g < 2) return bad_option("ghost-batch", std::to_string(g) + " is not >= 2");
    if (g > n)
      return bad_option("ghost-batch", std::to_string(g) + " exceeds the batch size " +
                                           std::to_string(n));
    if (n % g == 1)
      return bad_option("ghost-batch", "batches of " + std::to_string(n) + " in chunks of " +
                                           std::to_string(g) +
                                           " leave a last chunk of 1 sample (batch norm needs 2)");
    if (c->batch_renorm)
      return bad_option("ghost-batch", "cannot be combined with --batch-renorm");
  } else {
    c->ghost_batch = 0;
  }
  for (const char* name : {"renorm-warmup", "renorm-ramp", "renorm-rmax", "renorm-dmax"})
    if (given(name) && !c->batch_renorm) return bad_option(name, "needs --batch-renorm");
  if (!std::isfinite(c->renorm_rmax) || c->renorm_rmax < 1)
    return bad_option("renorm-rmax", number(c->renorm_rmax) + " is not a finite value >= 1");
  if (!std::isfinite(c->renorm_dmax) || c->renorm_dmax < 0)
    return bad_option("renorm-dmax", number(c->renorm_dmax) + " is not a finite value >= 0");
  if (given("renorm-warmup") && c->renorm_warmup < 0)
    return bad_option("renorm-warmup", std::to_string(c->renorm_warmup) + " is not >= 0");
  if (given("renorm-ramp") && c->renorm_ramp < 0)
    return bad_option("renorm-ramp", std::to_string(c->renorm_ramp) + " is not >= 0");
  for (const char* name : {"freeze-bn-stats-after", "freeze-bn-affine-after"}) {
    const int64_t s = std::string(name) == "freeze-bn-stats-after" ? c->freeze_bn_stats_after
                                                                   : c->freeze_bn_affine_after;
    if (!given(name)) continue;
    if (s < 0 || s >= c->steps)
      return bad_option(name, std::to_string(s) + " is not a step in [0, " +
                                  std::to_string(c->steps) + ") (--steps " +
                                  std::to_string(c->steps) + ")");
  }
  if (!given("freeze-bn-stats-after")) c->freeze_bn_stats_after = -1;
  if (!given("freeze-bn-affine-after")) c->freeze_bn_affine_after = -1;
  if (given("precise-bn-aggregation") && !given("precise-bn") && !c->small_batch_study)
    return bad_option("precise-bn-aggregation", "needs --precise-bn");
  if (c->precise_bn_aggregation != "mean" && c->precise_bn_aggregation != "population")
    return bad_option("precise-bn-aggregation",
                      "'" + c->precise_bn_aggregation + "' (expected mean or population)");
  if (given("precise-bn")) {
    if (c->precise_bn < 1)
      return bad_option("precise-bn", std::to_string(c->precise_bn) + " batches is not >= 1");
    if (c->freeze_bn_stats_after >= 0)
      return bad_option("precise-bn", "cannot be combined with --freeze-bn-stats-after (the "
                                      "running statistics are frozen)");
  } else {
    c->precise_bn = 0;
  }
  return Status();
}

}  // namespace bnorm::tools
