// `bnorm train` (setup, the runs with and without batch norm, the learning-rate sweep, the
// explain figures, the report) and `bnorm eval`. The parts: train_config.cc (the options),
// train_loop.cc (one network's run, on the nn library's data-parallel loop), train_report.cc.
#include "training.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>

#include "bnorm/batch_norm.h"
#include "bnorm/io/safetensors.h"
#include "bnorm/nn/data_parallel.h"
#include "explain.h"
#include "train_internal.h"

namespace bnorm::tools {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

Status run_training(const TrainConfig& config, Communicator* comm) {
  const auto start = Clock::now();
  const fs::path out_dir(config.out_dir);
  const int ranks = comm != nullptr ? comm->size() : 1;
  const bool lead = comm == nullptr || comm->rank() == 0;
  if (config.threads > 0) nn::set_num_threads(config.threads);
  io::Dataset train, test;
  io::DataOptions data_options;
  data_options.normalize = config.normalize;
  // Every rank sets up; a rank that fails ends every rank (agree) before the first step.
  Status setup = io::load_fashion_mnist(config.data_dir, data_options, &train, &test);
  if (setup.ok() && config.batch_size < ranks)
    setup = bad_option("batch-size", std::to_string(config.batch_size) + " is smaller than the " +
                                         std::to_string(ranks) + " ranks: each needs a sample");
  if (setup.ok() && !config.sync_bn && config.batch_size < 2 * ranks && config.which != "plain")
    setup = bad_option("batch-size", std::to_string(config.batch_size) + " gives some of the " +
                                         std::to_string(ranks) +
                                         " ranks a single sample: batch norm without --sync-bn "
                                         "needs 2 per rank");
  // Under mpirun: sync BN refuses ghost batches and batch renorm; without it each rank's
  // layers see its shard, which must suit the ghost batch.
  if (setup.ok() && ranks > 1 && config.which != "plain") {
    if (config.sync_bn && config.ghost_batch != 0)
      setup = bad_option("ghost-batch", "cannot be combined with --sync-bn (synchronized batch "
                                        "norm has no ghost batches)");
    else if (config.sync_bn && config.batch_renorm)
      setup = bad_option("batch-renorm", "cannot be combined with --sync-bn (synchronized batch "
                                         "norm has no batch renorm)");
    for (int64_t shard : nn::shard_sizes(config.batch_size, ranks))
      if (setup.ok() && !config.sync_bn && config.ghost_batch != 0 &&
          (shard < config.ghost_batch || shard % config.ghost_batch == 1))
        setup = bad_option("ghost-batch", std::to_string(config.ghost_batch) +
                                              " does not suit a rank's shard of " +
                                              std::to_string(shard) + " samples (G <= shard, "
                                              "no last chunk of 1 sample)");
  }
  if (setup.ok() && ranks > 1 && config.small_batch_study)
    setup = bad_option("small-batch-study", "runs in one process (not under mpirun)");
  // Before any training time is spent: the report must be writable.
  if (setup.ok() && lead) setup = prepare_output_dir(config.out_dir);
  BNORM_RETURN_IF_ERROR(nn::agree(comm, setup, "setup"));
  if (lead)
    std::fprintf(stderr,
                 "bnorm train: preset %s, %lld steps of %lld (%.1f epochs), lr %g, momentum %g, "
                 "weight decay %g, %s schedule, seed %llu, %d threads -> %s\n",
                 config.preset.c_str(), static_cast<long long>(config.steps),
                 static_cast<long long>(config.batch_size), config.epochs, config.lr,
                 config.momentum, config.weight_decay, config.schedule.c_str(),
                 static_cast<unsigned long long>(config.seed), bnorm::num_threads(),
                 config.out_dir.c_str());
  if (comm == nullptr && config.sync_bn)
    std::fprintf(stderr, "bnorm train: --sync-bn: one process (not started by mpirun), so batch "
                         "norm already sees the whole batch\n");
  if (lead && comm != nullptr)
    std::fprintf(stderr,
                 "bnorm train: data parallel over %d %s rank(s), global batch %lld, batch norm %s\n",
                 ranks, comm->kind().c_str(), static_cast<long long>(config.batch_size),
                 config.sync_bn ? ("synchronized (" + config.sync_mode + ")").c_str()
                                : "local to each rank (rank 0's running statistics kept)");

  std::vector<RunResult> runs;
  std::vector<StudyRow> study;
  if (config.small_batch_study) {
    BNORM_RETURN_IF_ERROR(run_small_batch_study(config, train, test, &runs, &study));
    BNORM_RETURN_IF_ERROR(
        write_report(config, comm, train, test, runs, {}, study, "", seconds_since(start)));
    print_summary(runs, config.out_dir);
    if (config.plots) BNORM_RETURN_IF_ERROR(draw_plots(config.out_dir));
    return Status();
  }
  for (bool bn : {true, false}) {
    if ((bn && config.which == "plain") || (!bn && config.which == "bn")) continue;
    RunSpec spec{.name = bn ? "with BN" : "without BN",
                 .batch_norm = bn,
                 .lr = config.lr,
                 .steps = config.steps,
                 .eval_every = config.eval_every,
                 .trace_sigmoid = true,
                 .train_mode_gap = bn,
                 .checkpoint = bn ? "bn.safetensors" : "plain.safetensors"};
    RunResult r;
    BNORM_RETURN_IF_ERROR(run_one(config, spec, train, test, comm, &r));
    runs.push_back(std::move(r));
  }

  std::vector<RunResult> sweep;
  for (double lr : config.lr_sweep) {
    for (bool bn : {true, false}) {
      char name[64];
      std::snprintf(name, sizeof name, "%s lr %g", bn ? "BN" : "plain", lr);
      RunSpec spec{.name = name, .batch_norm = bn, .lr = lr, .steps = config.sweep_steps,
                   .eval_every = 0, .trace_sigmoid = false, .train_mode_gap = false,
                   .checkpoint = ""};
      RunResult r;
      BNORM_RETURN_IF_ERROR(run_one(config, spec, train, test, comm, &r));
      sweep.push_back(std::move(r));
    }
  }

  if (!lead) return Status();  // rank 0 writes the report and the plots

  // The seed's five steps of batch norm on the BN network's first BatchNorm layer (explain/).
  std::string explained;
  for (const RunResult& r : runs) {
    if (!r.batch_norm || r.checkpoint.empty()) continue;
    ExplainConfig ex;
    ex.checkpoint = (out_dir / r.checkpoint).string();
    ex.out_dir = (out_dir / "explain").string();
    ex.batch_size = config.batch_size;
    ex.seed = config.seed;
    ex.plots = config.plots;
    BNORM_RETURN_IF_ERROR(run_explain(ex, &train));
    explained = "explain/explain.json";
  }

  BNORM_RETURN_IF_ERROR(
      write_report(config, comm, train, test, runs, sweep, {}, explained, seconds_since(start)));
  print_summary(runs, config.out_dir);
  if (config.plots) BNORM_RETURN_IF_ERROR(draw_plots(config.out_dir));
  return Status();
}

Status load_checkpoint(const EvalConfig& config, nn::Sequential* out, CheckpointInfo* info) {
  std::map<std::string, std::string> meta;
  BNORM_RETURN_IF_ERROR(io::read_safetensors_metadata(config.checkpoint, &meta));
  std::string preset = config.preset;
  if (preset.empty()) {
    auto it = meta.find("preset");
    if (it == meta.end())
      return Status::invalid_argument(config.checkpoint +
                                      ": no bnorm metadata; give --preset and --batch-norm");
    preset = it->second;
  }
  int bn = config.batch_norm;
  if (bn < 0) {
    auto it = meta.find("batch_norm");
    if (it == meta.end())
      return Status::invalid_argument(config.checkpoint +
                                      ": no bnorm metadata; give --batch-norm on|off");
    bn = it->second == "true" ? 1 : 0;
  }
  bool normalize = config.normalize;
  if (auto it = meta.find("normalize"); it != meta.end()) normalize = it->second == "true";
  else if (preset == "cnn") normalize = true;

  nn::Sequential model;
  BNORM_RETURN_IF_ERROR(build_model(preset, bn == 1, 0, &model));
  if (auto it = meta.find("architecture"); it != meta.end() && it->second != model.architecture())
    return Status::invalid_argument(
        config.checkpoint + ": a checkpoint of another architecture than " + preset +
        (bn ? " with" : " without") + " batch norm (its architecture: " + it->second + ")");
  BNORM_RETURN_IF_ERROR(io::load_safetensors(config.checkpoint, model.state_dict()));
  *out = std::move(model);
  *info = CheckpointInfo{preset, bn == 1, normalize, std::move(meta)};
  return Status();
}

Status run_eval(const EvalConfig& config) {
  nn::Sequential model;
  CheckpointInfo info;
  BNORM_RETURN_IF_ERROR(load_checkpoint(config, &model, &info));
  const std::string& preset = info.preset;
  const bool bn = info.batch_norm;
  const bool normalize = info.normalize;
  if (config.threads > 0) nn::set_num_threads(config.threads);

  io::Dataset test;  // evaluation needs only the test files
  io::DataOptions data_options;
  data_options.normalize = normalize;
  BNORM_RETURN_IF_ERROR(io::load_fashion_mnist_test(config.data_dir, data_options, &test));
  model.train(false);
  EvalResult r;
  BNORM_RETURN_IF_ERROR(evaluate(model, preset, test, config.batch_size, &r));
  std::printf("%s: %s %s batch norm: test accuracy %.2f%%, loss %.4f (%lld images, eval mode)\n",
              config.checkpoint.c_str(), preset.c_str(), bn ? "with" : "without",
              100 * r.accuracy, r.loss, static_cast<long long>(test.count));
  return Status();
}

}  // namespace bnorm::tools
