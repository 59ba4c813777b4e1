// What `bnorm train` and `bnorm eval` do, separated from the command line (bnorm_cli.cc parses
// the options and calls these): the presets' configurations (train_config.cc), the training runs
// on the nn library's data-parallel loop (training.cc, train_loop.cc; the loop, the gradient
// all-reduce, the replica checks and the sharding are include/bnorm/nn/data_parallel.h and
// train_loop.h), the report (train_report.cc), and test-set evaluation and checkpoints.
#ifndef BNORM_TOOLS_TRAINING_H_
#define BNORM_TOOLS_TRAINING_H_

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "bnorm/comm.h"
#include "bnorm/nn/data_parallel.h"
#include "bnorm/nn/layers.h"
#include "bnorm/status.h"
#include "bnorm/io/idx.h"

namespace bnorm::tools {

// Everything a training run depends on. apply_preset_defaults() fills what the user left unset:
// a field is unset when its name ("lr", "steps", ...) is not in `given` and it holds its
// sentinel (negative numbers, empty strings). A given value is validated as it is.
struct TrainConfig {
  std::string preset = "paper-mlp";  // "paper-mlp" or "cnn"
  int64_t steps = -1;                // optimizer steps; -1: from epochs or the preset's default
  double epochs = -1;                // alternative to steps (cnn's default unit)
  int64_t batch_size = -1;
  double lr = -1;
  double momentum = -1;
  double weight_decay = -1;
  std::string schedule;  // "constant", "step", "cosine"
  int64_t warmup_steps = -1;
  uint64_t seed = 1;
  int threads = 0;  // 0: bnorm's default (BNORM_NUM_THREADS or the cores)
  int64_t eval_every = -1;  // steps between test evaluations; 0: only at the end
  bool normalize = false;   // standardize pixels with Fashion-MNIST's mean and std
  std::string augment;      // "none", "flip" (random horizontal flips of training images), "crop"
                            // (random shifts of up to 2 pixels) or "flip+crop"; empty: the
                            // preset's (paper-mlp: none, cnn: flip)
  std::string data_dir;     // empty: the Debian package's directory
  std::string out_dir;      // empty: runs/<preset>
  std::string which = "both";  // "both", "bn" or "plain"
  std::vector<double> lr_sweep;  // learning rates; empty: no sweep
  int64_t sweep_steps = -1;
  bool plots = true;
  // Data-parallel training (under mpirun): each global batch of batch_size is split across the
  // ranks, gradients are all-reduced once per step. sync_bn: batch norm over the global batch.
  bool sync_bn = false;
  std::string sync_mode = "reproducible";  // "reproducible" or "per-rank"
  // Batch-norm extensions on every BatchNorm layer of the BN network (docs/batch_norm.md §7;
  // each off by default, PyTorch's batch norm). Validated by apply_preset_defaults.
  int64_t ghost_batch = 0;  // 0: off; G >= 2: statistics per chunk of G samples
  bool batch_renorm = false;
  // The schedule (Ioffe 2017): rmax = 1, dmax = 0 for renorm_warmup steps, then linearly to
  // renorm_rmax / renorm_dmax over renorm_ramp steps. -1: 10 % / 40 % of the steps.
  int64_t renorm_warmup = -1;
  int64_t renorm_ramp = -1;
  double renorm_rmax = 3.0;
  double renorm_dmax = 5.0;
  int64_t freeze_bn_stats_after = -1;   // from this step on, running statistics frozen; -1: never
  int64_t freeze_bn_affine_after = -1;  // from this step on, weight and bias frozen; -1: never
  int64_t precise_bn = 0;  // K > 0: after training, running statistics from K training batches
  std::string precise_bn_aggregation = "mean";  // "mean" (fvcore's) or "population"
  // The small-batch study (small_batch_study.cc): instead of the runs above, the BN network at
  // each of study_batch_sizes with plain BN, ghost BN, batch renorm and precise statistics, each
  // run seeing study_examples training examples (-1: the default, 300000).
  bool small_batch_study = false;
  std::vector<int64_t> study_batch_sizes = {4, 8, 16, 60};
  int64_t study_examples = -1;
  std::set<std::string> given;  // option names the user gave (without "--")
};

// Fills the unset fields with the preset's defaults. Fails on an unknown preset or a value out
// of range, naming the option.
Status apply_preset_defaults(TrainConfig* config);

// The preset's network with or without batch norm.
Status build_model(const std::string& preset, bool batch_norm, uint64_t seed, nn::Sequential* out);

// The input shape a preset's network takes for a batch of n images.
std::vector<int64_t> input_shape(const std::string& preset, int64_t n);

// Loss (mean cross-entropy) and accuracy.
using EvalResult = nn::EvalResult;

// Loss and accuracy of model on data, in batches of batch_size, in the model's current mode.
// In training mode the running statistics would move: the caller saves and restores them
// (evaluate_train_mode does).
Status evaluate(nn::Sequential& model, const std::string& preset, const io::Dataset& data,
                int64_t batch_size, EvalResult* out);

// Accuracy with batch statistics (training mode, batches of batch_size) without changing the
// model: its buffers are restored afterwards.
Status evaluate_train_mode(nn::Sequential& model, const std::string& preset,
                           const io::Dataset& data, int64_t batch_size, EvalResult* out);

// Runs `bnorm train` with a complete config (after apply_preset_defaults). Writes the report,
// checkpoints and plots into config.out_dir. comm: the ranks of a data-parallel run (null: one
// process); every rank calls this with the same config, only rank 0 prints and writes files.
// An error on one rank is returned on every rank where it can be (setup errors, batch-norm
// input errors); the caller should abort the group on any error.
Status run_training(const TrainConfig& config, Communicator* comm = nullptr);

struct EvalConfig {
  std::string checkpoint;
  std::string data_dir;
  std::string preset;     // needed only for a checkpoint without bnorm's metadata
  int batch_norm = -1;    // likewise: 1 with BN, 0 without, -1 from the metadata
  int64_t batch_size = 1000;
  int threads = 0;
  bool normalize = false;  // likewise; bnorm's checkpoints record it
};

// Runs `bnorm eval`: rebuilds the network the checkpoint describes, loads it and prints the test
// loss and accuracy in eval mode.
Status run_eval(const EvalConfig& config);

// What a checkpoint describes: its preset, with or without batch norm, the pixel
// standardization it was trained with, and its metadata.
struct CheckpointInfo {
  std::string preset;
  bool batch_norm = false;
  bool normalize = false;
  std::map<std::string, std::string> metadata;
};

// Rebuilds the network of config.checkpoint (from its metadata, or config.preset /
// config.batch_norm / config.normalize for a checkpoint without) and loads its tensors into
// *model. Fails on a missing or corrupt file, an unknown preset, another architecture.
Status load_checkpoint(const EvalConfig& config, nn::Sequential* model, CheckpointInfo* info);

// Helpers shared by the tools that write reports (bnorm train, bnorm explain).
// A Python with matplotlib ($BNORM_PYTHON, /usr/bin/python3, python3), or "" if none.
std::string plot_python();
// A script installed with the tool (plot_report.py, plot_explain.py): next to the executable
// (build tree) or in ../share/bnorm (installed); "" if absent.
std::string tool_script(const std::string& name);
// Runs argv (no shell) and returns its exit code, -1 if it could not start.
int run_program(const std::vector<std::string>& argv, bool quiet);
// Writes text to path atomically (temporary file + rename).
Status write_text_file(const std::string& path, const std::string& text);

}  // namespace bnorm::tools

#endif  // BNORM_TOOLS_TRAINING_H_
