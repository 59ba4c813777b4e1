// `bnorm train`'s loop for one network: the preset's model replicated over the ranks
// (nn::DataParallel), Fashion-MNIST batches drawn and augmented the same on every rank, the
// library's training loop (nn::train_loop), test evaluations that record the curves and the
// sigmoid trace, and the checkpoint. Also the test-set evaluation `bnorm eval` uses.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>

#include "bnorm/batch_norm.h"
#include "bnorm/io/safetensors.h"
#include "bnorm/nn/optim.h"
#include "bnorm/nn/precise_bn.h"
#include "bnorm/nn/train_loop.h"
#include "progress.h"
#include "train_internal.h"
#include "training.h"

namespace bnorm::tools {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// The p-quantile (0..1) of sorted values, linearly interpolated.
double quantile(const std::vector<float>& sorted, double p) {
  if (sorted.empty()) return NAN;
  const double pos = p * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  const double t = pos - static_cast<double>(lo);
  return (1 - t) * sorted[lo] + t * sorted[hi];
}

// The module whose output is the input of the last sigmoid (the paper's "typical sigmoid in the
// last hidden layer"); -1 if the network has none.
int last_sigmoid_input(const nn::Sequential& model) {
  int found = -1;
  for (size_t i = 1; i < model.size(); ++i)
    if (model.at(i).repr().rfind("Sigmoid", 0) == 0) found = static_cast<int>(i) - 1;
  return found;
}

// Mirrors each image of the batch left-right with probability 1/2 (clothes stay clothes).
void flip_some(const io::Dataset& data, int64_t batch, io::SplitMix64* rng, float* images) {
  for (int64_t i = 0; i < batch; ++i) {
    if (rng->uniform(2) == 0) continue;
    float* image = images + i * data.image_size();
    for (int64_t r = 0; r < data.rows; ++r) std::reverse(image + r * data.cols, image + (r + 1) * data.cols);
  }
}

// Shifts each image of the batch by a random offset of up to kMaxShift pixels in each direction
// (a random crop of the image padded by kMaxShift), filling with the background: its top-left
// pixel, which is background in every Fashion-MNIST image, raw or standardized.
constexpr int64_t kMaxShift = 2;
void shift_some(const io::Dataset& data, int64_t batch, io::SplitMix64* rng, float* images,
                std::vector<float>* scratch) {
  const int64_t rows = data.rows, cols = data.cols;
  scratch->resize(static_cast<size_t>(data.image_size()));
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t dr = static_cast<int64_t>(rng->uniform(2 * kMaxShift + 1)) - kMaxShift;
    const int64_t dc = static_cast<int64_t>(rng->uniform(2 * kMaxShift + 1)) - kMaxShift;
    if (dr == 0 && dc == 0) continue;
    float* image = images + i * data.image_size();
    float* out = scratch->data();
    const float background = image[0];
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t sr = r - dr, sc = c - dc;
        out[r * cols + c] =
            (sr >= 0 && sr < rows && sc >= 0 && sc < cols) ? image[sr * cols + sc] : background;
      }
    std::copy(out, out + data.image_size(), image);
  }
}

// Fault injection for the fault tests: BNORM_FAULT_INJECT=KIND:RANK:STEP makes rank RANK, at
// step STEP of a run, fail with an error (KIND error), exit at once without any clean-up as a
// crash would (exit), or stop responding (hang).
Status fault_point(int rank, int64_t step) {
  static const char* spec = std::getenv("BNORM_FAULT_INJECT");
  if (spec == nullptr || spec[0] == '\0') return Status();
  char kind[16] = {0};
  int at_rank = -1;
  long long at_step = -1;
  if (std::sscanf(spec, "%15[a-z]:%d:%lld", kind, &at_rank, &at_step) != 3)
    return Status::invalid_argument(std::string("BNORM_FAULT_INJECT: expected KIND:RANK:STEP, got '") +
                                    spec + "'");
  if (rank != at_rank || step != at_step) return Status();
  const std::string k = kind;
  if (k == "error")
    return Status::invalid_argument("bad input (fault injection) on rank " + std::to_string(rank) +
                                    " at step " + std::to_string(step));
  std::fprintf(stderr, "bnorm: fault injection: rank %d %s at step %lld\n", rank,
               k == "exit" ? "exits" : "hangs", at_step);
  if (k == "exit") std::_Exit(3);
  if (k == "hang")
    for (;;) pause();
  return Status::invalid_argument("BNORM_FAULT_INJECT: unknown kind '" + k +
                                  "' (expected error, exit or hang)");
}

}  // namespace

nn::ClassificationData classification_data(const io::Dataset& data, const std::string& preset) {
  std::vector<int64_t> sample = input_shape(preset, 1);
  sample.erase(sample.begin());
  return nn::ClassificationData{data.images.data(), std::span<const int32_t>(data.labels),
                                std::move(sample)};
}

Status evaluate(nn::Sequential& model, const std::string& preset, const io::Dataset& data,
                int64_t batch_size, EvalResult* out) {
  return nn::evaluate_classifier(model, classification_data(data, preset), batch_size, out);
}

Status evaluate_train_mode(nn::Sequential& model, const std::string& preset,
                           const io::Dataset& data, int64_t batch_size, EvalResult* out) {
  // Save every buffer (running statistics, counters), evaluate with batch statistics, restore.
  std::vector<nn::StateEntry> state = model.state_dict();
  std::vector<std::vector<unsigned char>> saved;
  for (const nn::StateEntry& e : state) {
    const size_t bytes = static_cast<size_t>(e.numel()) * (e.dtype == nn::DType::kI64 ? 8 : 4);
    const auto* p = static_cast<const unsigned char*>(e.data);
    saved.emplace_back(p, p + bytes);
  }
  const bool was_training = model.is_training();
  model.train(true);
  // Only full batches: batch statistics of a 1-example remainder do not exist.
  nn::ClassificationData head = classification_data(data, preset);
  head.labels = head.labels.first(static_cast<size_t>(data.count / batch_size * batch_size));
  Status s = nn::evaluate_classifier(model, head, batch_size, out);
  model.train(was_training);
  for (size_t i = 0; i < state.size(); ++i)
    std::memcpy(state[i].data, saved[i].data(), saved[i].size());
  return s;
}

Status run_one(const TrainConfig& config, const RunSpec& spec, const io::Dataset& train,
               const io::Dataset& test, Communicator* comm, RunResult* result) {
  const auto wall_start = Clock::now();
  result->name = spec.name;
  result->batch_norm = spec.batch_norm;
  result->lr = spec.lr;
  if (comm != nullptr) comm->reset_counters();

  nn::Sequential model;
  BNORM_RETURN_IF_ERROR(build_model(config.preset, spec.batch_norm, config.seed, &model));
  // The extensions' switches of step 0 before DataParallel::create (it compares the replicas'
  // layouts, which freeze_affine changes).
  const bool extensions = spec.batch_norm && uses_bn_extensions(config);
  bool affine_frozen_now = false;
  if (extensions)
    BNORM_RETURN_IF_ERROR(apply_bn_switches(model, config, spec.steps, 0, &affine_frozen_now));
  // The global batch split across the ranks, the same split at every step; every rank starts
  // from the same parameters (the same seed), checked here and at every evaluation.
  nn::DataParallel dp;
  BNORM_RETURN_IF_ERROR(nn::DataParallel::create(
      comm, &model,
      nn::DataParallelOptions{.global_batch = config.batch_size,
                              .sync_batch_norm = config.sync_bn && spec.batch_norm,
                              .sync_mode = config.sync_mode == "per-rank" ? SyncMode::kPerRank
                                                                          : SyncMode::kReproducible},
      &dp));
  const bool distributed = dp.distributed();
  const bool lead = dp.rank() == 0;  // prints, writes the files
  result->sync_bn = dp.sync_batch_norm();
  nn::Sgd sgd;
  BNORM_RETURN_IF_ERROR(nn::Sgd::create(
      model.parameters(),
      nn::SgdOptions{.lr = spec.lr, .momentum = config.momentum, .weight_decay = config.weight_decay},
      &sgd));
  nn::LrScheduleKind kind;
  BNORM_RETURN_IF_ERROR(nn::LrSchedule::parse_kind(config.schedule, &kind));
  nn::LrSchedule schedule;
  BNORM_RETURN_IF_ERROR(nn::LrSchedule::create(
      nn::LrScheduleOptions{.kind = kind,
                            .base_lr = spec.lr,
                            .total_steps = spec.steps,
                            .step_size = std::max<int64_t>(spec.steps / 3, 1),
                            .gamma = 0.1,
                            .min_lr = 0.0,
                            .warmup_steps = std::min(config.warmup_steps, spec.steps - 1)},
      &schedule));

  const int64_t batch = config.batch_size;
  const nn::ClassificationData test_data = classification_data(test, config.preset);
  std::optional<Progress> progress;  // from the first step: the step-0 evaluation is not in it
  // The sigmoid's quantiles need every test example's value: one process only.
  const int sigmoid_input = spec.trace_sigmoid && !distributed ? last_sigmoid_input(model) : -1;
  std::vector<float> sigmoid_values;
  auto test_eval = [&](const nn::TrainInterval& at) -> Status {
    model.train(false);
    sigmoid_values.clear();
    EvalResult r;
    if (distributed) {
      BNORM_RETURN_IF_ERROR(dp.check_replicas(at.step));
      BNORM_RETURN_IF_ERROR(dp.evaluate(test_data, kEvalBatch, &r));
    } else {
      BNORM_RETURN_IF_ERROR(dp.evaluate(test_data, kEvalBatch, &r, [&](int64_t rows) {
        if (sigmoid_input < 0) return;
        const nn::Tensor& h = model.output(static_cast<size_t>(sigmoid_input));
        const int64_t width = h.numel() / rows;
        for (int64_t i = 0; i < rows; ++i) sigmoid_values.push_back(h[i * width]);  // unit 0
      }));
    }
    model.train(true);
    Curve& c = result->curve;
    c.step.push_back(at.step);
    c.epoch.push_back(static_cast<double>(at.step * batch) / static_cast<double>(train.count));
    c.train_loss.push_back(at.train_loss);
    c.train_accuracy.push_back(at.train_accuracy);
    c.test_loss.push_back(r.loss);
    c.test_accuracy.push_back(r.accuracy);
    c.lr.push_back(at.lr);
    if (sigmoid_input >= 0) {
      std::sort(sigmoid_values.begin(), sigmoid_values.end());
      SigmoidTrace& s = result->sigmoid;
      s.step.push_back(at.step);
      s.p15.push_back(quantile(sigmoid_values, 0.15));
      s.p50.push_back(quantile(sigmoid_values, 0.50));
      s.p85.push_back(quantile(sigmoid_values, 0.85));
    }
    result->final_test = r;
    if (lead && at.step > 0) progress->update(at.step, at.train_loss, r.accuracy);
    return Status();
  };

  io::BatchSampler sampler(train.count, batch, config.seed, /*drop_last=*/true);
  // Every rank draws and augments the whole global batch (cheap, and the same random streams
  // as one process), then trains on its shard.
  nn::Tensor x_global(input_shape(config.preset, batch));
  std::vector<int32_t> labels_global(static_cast<size_t>(batch));
  io::SplitMix64 flips(config.seed ^ 0x666c6970ULL);  // its own stream: the order stays the same
  std::vector<float> shift_scratch;
  // This rank's shard of the next global batch (training, then the precise statistics).
  auto draw = [&](nn::Tensor* x, std::vector<int32_t>* labels) {
    int64_t epoch = 0;
    const std::vector<int64_t>& idx = sampler.next(&epoch);
    io::gather_batch(train, idx.data(), batch, x_global.data(), labels_global.data());
    if (config.augment == "flip" || config.augment == "flip+crop")
      flip_some(train, batch, &flips, x_global.data());
    if (config.augment == "crop" || config.augment == "flip+crop")
      shift_some(train, batch, &flips, x_global.data(), &shift_scratch);
    const int64_t begin = dp.shard_begin(), local = dp.shard_size();
    x->resize(input_shape(config.preset, local));
    const float* mine = x_global.data() + begin * train.image_size();
    std::copy(mine, mine + local * train.image_size(), x->data());
    labels->assign(labels_global.begin() + begin, labels_global.begin() + begin + local);
  };
  auto next_batch = [&](int64_t step, nn::Tensor* x, std::vector<int32_t>* labels) -> Status {
    if (!progress) progress.emplace(spec.name, spec.steps);
    draw(x, labels);
    if (extensions && step > 0) {
      BNORM_RETURN_IF_ERROR(apply_bn_switches(model, config, spec.steps, step, &affine_frozen_now));
      // A frozen weight and bias leave the optimizer (no momentum or weight decay moves them).
      if (affine_frozen_now) BNORM_RETURN_IF_ERROR(sgd.set_params(model.parameters()));
    }
    return fault_point(dp.rank(), step);
  };
  auto after_step = [&](const nn::TrainStep& s) {
    if (lead && !s.ends_interval && (s.step & 15) == 0)
      progress->update(s.step + 1, s.loss,
                       result->curve.test_accuracy.empty() ? NAN : result->curve.test_accuracy.back());
  };

  nn::TrainLoopResult loop;
  BNORM_RETURN_IF_ERROR(nn::train_loop(
      &dp, &sgd, schedule, nn::TrainLoopOptions{.steps = spec.steps, .eval_every = spec.eval_every},
      nn::TrainLoopHooks{.batch = next_batch, .interval = test_eval, .step = after_step}, &loop));
  result->steps_done = loop.steps_done;
  result->diverged = loop.diverged;
  result->train_time_s = loop.train_seconds;
  result->final_train_loss = loop.final_train_loss;
  result->final_train_accuracy = loop.final_train_accuracy;
  if (result->diverged) {
    result->final_test = EvalResult{NAN, NAN};
    std::fprintf(stderr, "%s: diverged at step %lld (loss is not finite)\n", spec.name.c_str(),
                 static_cast<long long>(result->steps_done + 1));
  }
  if (lead) progress->finish(result->final_train_loss, result->final_test.accuracy);
  if (comm != nullptr) result->comm = comm->counters();

  // With batch statistics over the test set in batches of the global batch: one process only.
  if (spec.train_mode_gap && !result->diverged && !distributed)
    BNORM_RETURN_IF_ERROR(
        evaluate_train_mode(model, config.preset, test, batch, &result->final_test_train_mode));

  // Precise statistics (Wu & Johnson 2021) from the next config.precise_bn batches of the
  // training stream, pooled over the ranks (synchronized layers see the global batch).
  if (spec.batch_norm && config.precise_bn > 0 && !result->diverged) {
    result->test_before_precise = result->final_test;
    std::vector<int32_t> unused_labels;
    nn::PreciseBnReport precise;
    BNORM_RETURN_IF_ERROR(nn::update_bn_stats(
        model, [&](int64_t, nn::Tensor* x) { draw(x, &unused_labels); return Status(); },
        nn::PreciseBnOptions{.batches = config.precise_bn,
                             .aggregation = config.precise_bn_aggregation == "population"
                                                ? nn::PreciseBnAggregation::kPopulation
                                                : nn::PreciseBnAggregation::kMeanOfBatches,
                             .comm = distributed ? comm : nullptr},
        &precise));
    result->precise_batches = config.precise_bn;
    result->precise_samples = precise.samples;
    result->precise_aggregation = config.precise_bn_aggregation;
    model.train(false);
    BNORM_RETURN_IF_ERROR(dp.evaluate(test_data, kEvalBatch, &result->final_test));
    model.train(true);
  }
  if (extensions) BNORM_RETURN_IF_ERROR(reset_bn_switches(model));

  if (distributed && !result->diverged) BNORM_RETURN_IF_ERROR(dp.check_replicas(result->steps_done));
  result->replica_checks = dp.replica_checks_passed();
  if (!spec.checkpoint.empty() && !result->diverged && lead) {
    std::map<std::string, std::string> meta = {
        {"format", "bnorm-checkpoint-1"},
        {"architecture", model.architecture()},
        {"preset", config.preset},
        {"batch_norm", spec.batch_norm ? "true" : "false"},
        {"normalize", config.normalize ? "true" : "false"},
        {"seed", std::to_string(config.seed)},
        {"steps", std::to_string(result->steps_done)},
        {"batch_size", std::to_string(config.batch_size)},
        {"bnorm_version", bnorm::version()},
    };
    if (spec.batch_norm && !bn_training_summary(config).empty())
      meta["batch_norm_training"] = bn_training_summary(config);
    model.train(false);
    const fs::path path = fs::path(config.out_dir) / spec.checkpoint;
    BNORM_RETURN_IF_ERROR(io::save_safetensors(path.string(), model.state_dict(), meta));
    result->checkpoint = spec.checkpoint;
  }
  result->wall_time_s = seconds_since(wall_start);
  return Status();
}

}  // namespace bnorm::tools
