// What the parts of `bnorm train` share (not installed, not the CLI's interface: training.h):
// the description and the outcome of one network's run, and the functions of the configuration
// (train_config.cc), the loop (train_loop.cc) and the report (train_report.cc).
#ifndef BNORM_TOOLS_TRAIN_INTERNAL_H_
#define BNORM_TOOLS_TRAIN_INTERNAL_H_

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "bnorm/comm.h"
#include "bnorm/io/idx.h"
#include "bnorm/nn/data_parallel.h"
#include "bnorm/nn/layers.h"
#include "bnorm/status.h"
#include "training.h"

namespace bnorm::tools {

// Examples in the Fashion-MNIST training set (the presets' epochs) and the evaluation batch.
inline constexpr int64_t kTrainExamples = 60000;
inline constexpr int64_t kEvalBatch = 1000;

// ----- train_config.cc -----
// InvalidArgument "--<name>: <problem>".
Status bad_option(const std::string& name, const std::string& problem);
// A double as the stream prints it ("0.1", "1e-05").
std::string number(double v);
// The batch-norm extensions' options and the small-batch study's (part of apply_preset_defaults,
// after the steps and the batch size are known).
Status check_bn_extensions(TrainConfig* config);

// ----- train_bn.cc -----
// The BatchNorm1d/2d layers of model, in order.
std::vector<nn::BatchNormNd*> batch_norm_layers(nn::Sequential& model);
// Batch renorm's schedule for a run of `steps` steps: the warm-up and the ramp in steps (the
// defaults: 10 % and 40 % of the steps) and the limits at a step: rmax = 1, dmax = 0 during the
// warm-up, then linear to config.renorm_rmax / renorm_dmax over the ramp.
struct RenormLimits {
  double rmax, dmax;
};
int64_t renorm_warmup_steps(const TrainConfig& config, int64_t steps);
int64_t renorm_ramp_steps(const TrainConfig& config, int64_t steps);
RenormLimits renorm_limits_at(const TrainConfig& config, int64_t steps, int64_t step);
// Whether config asks for ghost batches, batch renorm or a freeze.
bool uses_bn_extensions(const TrainConfig& config);
// The switches of config on every BatchNorm layer for step `step` of `steps` (ghost batch,
// batch renorm and its limits, the freezes). *affine_frozen_now: the weight and bias froze at
// this step (the optimizer must drop them).
Status apply_bn_switches(nn::Sequential& model, const TrainConfig& config, int64_t steps,
                         int64_t step, bool* affine_frozen_now);
// Every BatchNorm layer back to PyTorch's batch norm (eval mode computes the same; the
// checkpoint then has the architecture bnorm eval and bnorm fold expect).
Status reset_bn_switches(nn::Sequential& model);
// One line for the checkpoint's metadata ("" without extensions).
std::string bn_training_summary(const TrainConfig& config);

// ----- train_loop.cc -----
struct RunSpec {
  std::string name;
  bool batch_norm = false;
  double lr = 0;
  int64_t steps = 0;
  int64_t eval_every = 0;
  bool trace_sigmoid = false;
  bool train_mode_gap = false;
  std::string checkpoint;  // file name in out_dir; empty: none
};

struct Curve {
  std::vector<int64_t> step;
  std::vector<double> epoch, train_loss, train_accuracy, test_loss, test_accuracy, lr;
};

struct SigmoidTrace {
  std::vector<int64_t> step;
  std::vector<double> p15, p50, p85;
};

struct RunResult {
  std::string name;
  bool batch_norm = false;
  double lr = 0;
  int64_t steps_done = 0;
  bool diverged = false;
  double wall_time_s = 0;
  double train_time_s = 0;
  Curve curve;
  SigmoidTrace sigmoid;
  EvalResult final_test;
  EvalResult final_test_train_mode{NAN, NAN};  // with batch statistics; BN runs only
  // --precise-bn: final_test is with the precise statistics, test_before_precise before.
  int64_t precise_batches = 0;
  int64_t precise_samples = 0;  // over every rank
  std::string precise_aggregation;
  EvalResult test_before_precise{NAN, NAN};
  double final_train_loss = NAN;
  double final_train_accuracy = NAN;
  std::string checkpoint;
  bool sync_bn = false;
  int64_t replica_checks = 0;  // times every rank's parameters were found identical
  CommCounters comm;
};

// A data set as the nn library's evaluation takes it (the preset's input shape).
nn::ClassificationData classification_data(const io::Dataset& data, const std::string& preset);

// One network trained by spec (every rank of comm calls it; only rank 0 prints and writes the
// checkpoint).
Status run_one(const TrainConfig& config, const RunSpec& spec, const io::Dataset& train,
               const io::Dataset& test, Communicator* comm, RunResult* result);

// ----- small_batch_study.cc -----
// One row of the small-batch study's table.
struct StudyRow {
  int64_t batch_size = 0;
  std::string method;  // "BN", "ghost BN", "batch renorm", "BN + precise statistics"
  std::string run;     // the RunResult's name
  int64_t steps = 0;
  int64_t ghost_batch = 0;
  int64_t precise_batches = 0;
  double test_accuracy = NAN;             // eval mode (running statistics)
  double test_accuracy_train_mode = NAN;  // batch statistics, batches of batch_size
  double wall_time_s = 0;
};
// The study's samples for the precise statistics of every batch size.
inline constexpr int64_t kStudyPreciseSamples = 4800;
// Runs the study of config (small_batch_study): its runs and its table.
Status run_small_batch_study(const TrainConfig& config, const io::Dataset& train,
                             const io::Dataset& test, std::vector<RunResult>* runs,
                             std::vector<StudyRow>* rows);

// ----- train_report.cc -----
// Creates dir if needed and proves it writable, before any training time is spent.
Status prepare_output_dir(const std::string& dir);
// report.json in config.out_dir: the configuration, the runs and the sweep's runs.
Status write_report(const TrainConfig& config, const Communicator* comm, const io::Dataset& train,
                    const io::Dataset& test, const std::vector<RunResult>& runs,
                    const std::vector<RunResult>& sweep, const std::vector<StudyRow>& study,
                    const std::string& explained, double wall_time_s);
// The closing lines on stderr: each run's test accuracy and speed, where the report is.
void print_summary(const std::vector<RunResult>& runs, const std::string& out_dir);
// plot_report.py over out_dir (or a line saying why the plots are skipped).
Status draw_plots(const std::string& out_dir);

}  // namespace bnorm::tools

#endif  // BNORM_TOOLS_TRAIN_INTERNAL_H_
