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

// ----- train_report.cc -----
// Creates dir if needed and proves it writable, before any training time is spent.
Status prepare_output_dir(const std::string& dir);
// report.json in config.out_dir: the configuration, the runs and the sweep's runs.
Status write_report(const TrainConfig& config, const Communicator* comm, const io::Dataset& train,
                    const io::Dataset& test, const std::vector<RunResult>& runs,
                    const std::vector<RunResult>& sweep, const std::string& explained,
                    double wall_time_s);
// The closing lines on stderr: each run's test accuracy and speed, where the report is.
void print_summary(const std::vector<RunResult>& runs, const std::string& out_dir);
// plot_report.py over out_dir (or a line saying why the plots are skipped).
Status draw_plots(const std::string& out_dir);

}  // namespace bnorm::tools

#endif  // BNORM_TOOLS_TRAIN_INTERNAL_H_
