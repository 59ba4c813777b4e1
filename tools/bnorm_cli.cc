// bnorm: the command-line tool.
//   bnorm train [--preset paper-mlp|cnn] [options]   train with and without batch norm, compare
//   bnorm eval --checkpoint FILE [--data DIR]          reload a checkpoint, evaluate on the test set
//   bnorm explain --checkpoint FILE --out DIR          batch norm's five steps on one BN layer
//   bnorm fold --checkpoint FILE --out FILE            fold batch norm into the layers before it
//   mpirun -np K bnorm train --sync-bn ...             data-parallel training over K processes
// Errors are one line on stderr and a non-zero exit code; under mpirun an error on any rank
// ends every rank (MPI_Abort).
#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "bnorm/batch_norm.h"
#include "bnorm/comm.h"
#include "explain.h"
#include "fold.h"
#include "training.h"

int main(int argc, char** argv) {
  // Under mpirun every process is a rank of MPI_COMM_WORLD. Collectives give up after
  // BNORM_COMM_TIMEOUT seconds (default 45) and abort every rank: a dead or hung rank ends the
  // job instead of hanging it.
  bnorm::Communicator* comm = nullptr;
  if (bnorm::launched_by_mpi()) {
    double timeout = 45.0;
    if (const char* env = std::getenv("BNORM_COMM_TIMEOUT")) timeout = std::atof(env);
    if (!(timeout > 0)) {
      std::fprintf(stderr, "bnorm: BNORM_COMM_TIMEOUT: must be a number of seconds > 0\n");
      return 2;
    }
    const bnorm::Status s = bnorm::mpi_world(&argc, &argv, &comm, timeout);
    if (!s.ok()) {
      std::fprintf(stderr, "bnorm: started by mpirun, but %s\n", s.message().c_str());
      return 1;
    }
  }

  CLI::App app{"bnorm: batch normalization (Ioffe & Szegedy, 2015) on Fashion-MNIST"};
  app.require_subcommand(1);
  app.set_version_flag("--version", bnorm::version());

  bnorm::tools::TrainConfig train;
  CLI::App* t = app.add_subcommand("train", "Train a preset network with and without batch norm");
  t->add_option("--preset", train.preset,
                "paper-mlp (Ioffe & Szegedy 4.1, Fig. 1) or cnn (conv-BN-ReLU, >= 93 %)")
      ->capture_default_str();
  t->add_option("--steps", train.steps, "Optimizer steps (paper-mlp: 50000)");
  t->add_option("--epochs", train.epochs, "Epochs instead of steps (cnn: 15)");
  t->add_option("--batch-size", train.batch_size, "Mini-batch size (paper-mlp: 60, cnn: 128)");
  t->add_option("--lr", train.lr, "Learning rate (paper-mlp: 0.1, cnn: 0.05)");
  t->add_option("--momentum", train.momentum, "SGD momentum (paper-mlp: 0, cnn: 0.9)");
  t->add_option("--weight-decay", train.weight_decay, "Weight decay (paper-mlp: 0, cnn: 5e-4)");
  t->add_option("--schedule", train.schedule, "constant, step or cosine (paper-mlp: constant, cnn: cosine)");
  t->add_option("--warmup-steps", train.warmup_steps, "Linear learning-rate warm-up steps");
  t->add_option("--seed", train.seed, "Seed of the initialization and the shuffling")->capture_default_str();
  t->add_option("--threads", train.threads, "Threads (0: BNORM_NUM_THREADS or all cores)")->capture_default_str();
  t->add_option("--eval-every", train.eval_every,
                "Steps between test evaluations (paper-mlp: 500, cnn: one epoch; 0: at the end)");
  t->add_option("--data", train.data_dir, "Fashion-MNIST directory (default: Debian's dataset-fashion-mnist)");
  t->add_option("--out", train.out_dir, "Output directory (default: runs/<preset>)");
  t->add_option("--only", train.which, "both, bn or plain")->capture_default_str();
  t->add_option("--lr-sweep", train.lr_sweep, "Learning rates to sweep (comma-separated), each with and without BN")
      ->delimiter(',');
  t->add_option("--sweep-steps", train.sweep_steps, "Steps of each sweep run (paper-mlp: 5000, cnn: 1000)");
  t->add_flag("--normalize", train.normalize, "Standardize the pixels (cnn always does)");
  t->add_option("--augment", train.augment, "none, flip (random horizontal flips), crop (random shifts of up to 2 pixels) or flip+crop (paper-mlp: none, cnn: flip)");
  bool no_plots = false;
  t->add_flag("--no-plots", no_plots, "Write report.json only, no PNGs or report.md");
  t->add_flag("--sync-bn", train.sync_bn,
              "Under mpirun: batch norm over the global batch of every rank (synchronized)");
  t->add_option("--sync-mode", train.sync_mode,
                "reproducible (bitwise the same for any number of ranks) or per-rank (smaller "
                "exchange)")
      ->capture_default_str();

  t->add_option("--ghost-batch", train.ghost_batch,
                "Ghost batch norm (Hoffer 2017): statistics per chunk of G consecutive samples "
                "(2 <= G <= batch size)");
  t->add_flag("--batch-renorm", train.batch_renorm,
              "Batch renormalization (Ioffe 2017) with the schedule of --renorm-*");
  t->add_option("--renorm-warmup", train.renorm_warmup,
                "Steps at rmax = 1, dmax = 0 (plain BN) before the ramp (default: 10 % of the steps)");
  t->add_option("--renorm-ramp", train.renorm_ramp,
                "Steps over which rmax and dmax grow linearly to their limits (default: 40 % of "
                "the steps)");
  t->add_option("--renorm-rmax", train.renorm_rmax, "Batch renorm's final rmax (>= 1)")
      ->capture_default_str();
  t->add_option("--renorm-dmax", train.renorm_dmax, "Batch renorm's final dmax (>= 0)")
      ->capture_default_str();
  t->add_option("--freeze-bn-stats-after", train.freeze_bn_stats_after,
                "From step S on, batch norm's running statistics are not updated");
  t->add_option("--freeze-bn-affine-after", train.freeze_bn_affine_after,
                "From step S on, batch norm's weight and bias are not trained");
  t->add_option("--precise-bn", train.precise_bn,
                "After training, recompute the running statistics from K training batches "
                "(Wu & Johnson 2021); the checkpoint has them");
  t->add_option("--precise-bn-aggregation", train.precise_bn_aggregation,
                "mean (of the per-batch statistics, fvcore's) or population")
      ->capture_default_str();
  t->add_flag("--small-batch-study", train.small_batch_study,
              "Train the BN network at each --study-batch-sizes with plain BN, ghost BN, batch "
              "renorm and precise statistics; a table and a plot of eval- and train-mode accuracy");
  t->add_option("--study-batch-sizes", train.study_batch_sizes,
                "Batch sizes of the study (comma-separated, even, >= 4)")
      ->delimiter(',')
      ->capture_default_str();
  t->add_option("--study-examples", train.study_examples,
                "Training examples each study run sees (steps = examples / batch; default 300000)");

  bnorm::tools::EvalConfig eval;
  CLI::App* e = app.add_subcommand("eval", "Evaluate a checkpoint on the Fashion-MNIST test set");
  e->add_option("--checkpoint", eval.checkpoint, "A .safetensors file written by bnorm train (or PyTorch)")
      ->required();
  e->add_option("--data", eval.data_dir, "Fashion-MNIST directory");
  e->add_option("--preset", eval.preset, "For a checkpoint without bnorm metadata: paper-mlp or cnn");
  std::string bn_flag;
  e->add_option("--batch-norm", bn_flag, "For a checkpoint without bnorm metadata: on or off")
      ->check(CLI::IsMember({"on", "off"}));
  e->add_option("--batch-size", eval.batch_size, "Evaluation batch size")->capture_default_str();
  e->add_option("--threads", eval.threads, "Threads (0: default)");
  e->add_flag("--normalize", eval.normalize, "Standardize the pixels (for a checkpoint without metadata)");

  bnorm::tools::ExplainConfig explain;
  CLI::App* x = app.add_subcommand(
      "explain", "Batch norm's five steps on one BatchNorm layer of a trained network: a real "
                 "mini-batch's activations, their mean and variance, the normalized values, "
                 "gamma and beta, the running statistics against the training set's");
  x->add_option("--checkpoint", explain.checkpoint, "A .safetensors file written by bnorm train")
      ->required();
  x->add_option("--layer", explain.layer, "Which BatchNorm layer, 1 = the first")->capture_default_str();
  x->add_option("--data", explain.data_dir, "Fashion-MNIST directory (default: Debian's dataset-fashion-mnist)");
  x->add_option("--batch-size", explain.batch_size,
                "Mini-batch size (default: the checkpoint's training batch)");
  x->add_option("--seed", explain.seed,
                "The mini-batch is the first one `bnorm train --seed S` draws")->capture_default_str();
  x->add_option("--out", explain.out_dir, "Output directory (explain.png, explain.md, explain.json)")
      ->required();
  x->add_option("--threads", explain.threads, "Threads (0: default)");
  bool explain_no_plots = false;
  x->add_flag("--no-plots", explain_no_plots, "Write explain.json and batch.safetensors only");

  bnorm::tools::FoldConfig fold;
  CLI::App* f = app.add_subcommand(
      "fold", "Fold every batch norm into the Linear or Conv2d before it, for inference, and "
              "compare the two models on the test set");
  f->add_option("--checkpoint", fold.checkpoint, "A .safetensors file written by bnorm train, with batch norm")
      ->required();
  f->add_option("--out", fold.out, "The folded checkpoint to write (bnorm eval reads it)")->required();
  f->add_option("--data", fold.data_dir, "Fashion-MNIST directory");
  f->add_option("--batch-size", fold.batch_size, "Evaluation batch size")->capture_default_str();
  f->add_option("--threads", fold.threads, "Threads (0: default)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& err) {
    return app.exit(err);
  }

  bnorm::Status status;
  if (t->parsed()) {
    train.plots = !no_plots;
    for (const CLI::Option* opt : t->get_options())
      if (opt->count() > 0 && !opt->get_lnames().empty()) train.given.insert(opt->get_lnames()[0]);
    status = bnorm::tools::apply_preset_defaults(&train);
    if (status.ok()) status = bnorm::tools::run_training(train, comm);
  } else if (x->parsed()) {
    explain.plots = !explain_no_plots;
    status = bnorm::tools::run_explain(explain);
  } else if (f->parsed()) {
    status = bnorm::tools::run_fold(fold);
  } else if (e->parsed()) {
    if (!bn_flag.empty()) eval.batch_norm = bn_flag == "on" ? 1 : 0;
    if (eval.batch_size < 1) {
      status = bnorm::Status::invalid_argument("--batch-size: " + std::to_string(eval.batch_size) +
                                               " is not >= 1");
    } else {
      status = bnorm::tools::run_eval(eval);
    }
  }
  if (!status.ok()) {
    if (comm != nullptr && comm->size() > 1) comm->abort(status.message(), 1);  // no return
    std::fprintf(stderr, "bnorm: %s\n", status.message().c_str());
    return 1;
  }
  return 0;
}
