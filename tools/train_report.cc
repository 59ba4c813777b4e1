// `bnorm train`'s report: report.json (the configuration, every run's curves and final figures,
// the learning-rate sweep), the closing summary on stderr and the plots (plot_report.py), and
// the file and process helpers the tools share.
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "bnorm/batch_norm.h"
#include "progress.h"
#include "train_internal.h"
#include "training.h"

extern char** environ;

namespace bnorm::tools {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

// Writes text to path atomically (temp file + rename).
Status write_file_atomically(const fs::path& path, const std::string& text) {
  const fs::path temp = path.string() + ".tmp-" + std::to_string(getpid());
  {
    std::ofstream out(temp, std::ios::binary | std::ios::trunc);
    out << text;
    out.flush();
    if (!out) {
      std::error_code ignored;
      fs::remove(temp, ignored);
      return Status::invalid_argument(path.string() + ": cannot write (" + std::strerror(errno) + ")");
    }
  }
  std::error_code ec;
  fs::rename(temp, path, ec);
  if (ec) {
    fs::remove(temp, ec);
    return Status::invalid_argument(path.string() + ": cannot write (" + ec.message() + ")");
  }
  return Status();
}

// Creates dir if needed and proves it writable, before any training time is spent.
Status prepare_dir(const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return Status::invalid_argument("output directory " + dir.string() + ": " + ec.message());
  const fs::path probe = dir / (".bnorm-write-test-" + std::to_string(getpid()));
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0644);
  if (fd < 0)
    return Status::invalid_argument("output directory " + dir.string() + ": not writable (" +
                                    std::strerror(errno) + ")");
  ::close(fd);
  fs::remove(probe, ec);
  return Status();
}

// Runs argv (no shell) and returns its exit code, or -1 if it could not start.
int run_command(const std::vector<std::string>& argv, bool quiet) {
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (quiet) {
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
  }
  pid_t pid;
  const int rc = posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) return -1;
  int status = 0;
  if (waitpid(pid, &status, 0) < 0) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// The Python that draws the plots: $BNORM_PYTHON, else Debian's /usr/bin/python3 (which has
// python3-matplotlib), else python3 on PATH; the first that imports matplotlib.
std::string find_plot_python() {
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("BNORM_PYTHON")) candidates.push_back(env);
  candidates.push_back("/usr/bin/python3");
  candidates.push_back("python3");
  for (const std::string& py : candidates)
    if (run_command({py, "-c", "import matplotlib, json"}, true) == 0) return py;
  return "";
}

// A script (plot_report.py): next to the executable (build tree), or in ../share/bnorm (installed).
std::string find_plot_script(const std::string& name = "plot_report.py") {
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (ec) return "";
  for (const fs::path& p : {exe.parent_path() / name,
                            exe.parent_path() / ".." / "share" / "bnorm" / name})
    if (fs::exists(p)) return p.string();
  return "";
}

// A finite number, or null.
Json num(double d) { return std::isfinite(d) ? Json(d) : Json(nullptr); }

Json to_json(const std::vector<double>& v) {
  Json a = Json::array();
  for (double d : v) a.push_back(std::isfinite(d) ? Json(d) : Json(nullptr));
  return a;
}

Json to_json(const RunResult& r) {
  Json run;
  run["name"] = r.name;
  run["batch_norm"] = r.batch_norm;
  run["lr"] = r.lr;
  run["steps"] = r.steps_done;
  run["diverged"] = r.diverged;
  run["wall_time_s"] = r.wall_time_s;
  run["train_time_s"] = r.train_time_s;
  run["steps_per_s"] = r.train_time_s > 0 ? static_cast<double>(r.steps_done) / r.train_time_s : 0.0;
  Json curve;
  curve["step"] = r.curve.step;
  curve["epoch"] = to_json(r.curve.epoch);
  curve["lr"] = to_json(r.curve.lr);
  curve["train_loss"] = to_json(r.curve.train_loss);
  curve["train_accuracy"] = to_json(r.curve.train_accuracy);
  curve["test_loss"] = to_json(r.curve.test_loss);
  curve["test_accuracy"] = to_json(r.curve.test_accuracy);
  run["curve"] = curve;
  if (!r.sigmoid.step.empty()) {
    Json s;
    s["layer"] = "input of the last hidden layer's sigmoid, unit 0, over the test set";
    s["step"] = r.sigmoid.step;
    s["p15"] = to_json(r.sigmoid.p15);
    s["p50"] = to_json(r.sigmoid.p50);
    s["p85"] = to_json(r.sigmoid.p85);
    run["sigmoid_input"] = s;
  }
  Json fin;
  fin["test_accuracy"] = num(r.final_test.accuracy);
  fin["test_loss"] = num(r.final_test.loss);
  fin["test_accuracy_train_mode"] = num(r.final_test_train_mode.accuracy);
  fin["train_eval_gap"] = num(r.final_test_train_mode.accuracy - r.final_test.accuracy);
  fin["train_accuracy"] = num(r.final_train_accuracy);
  fin["train_loss"] = num(r.final_train_loss);
  run["final"] = fin;
  if (r.precise_batches > 0) {
    Json p;
    p["batches"] = r.precise_batches;
    p["samples"] = r.precise_samples;
    p["aggregation"] = r.precise_aggregation;
    p["test_accuracy_before"] = num(r.test_before_precise.accuracy);
    p["test_loss_before"] = num(r.test_before_precise.loss);
    p["test_accuracy_after"] = num(r.final_test.accuracy);
    p["test_loss_after"] = num(r.final_test.loss);
    run["precise_bn"] = p;
  }
  if (!r.checkpoint.empty()) run["checkpoint"] = r.checkpoint;
  if (r.comm.allreduce_calls > 0) {
    Json c;
    c["sync_bn"] = r.sync_bn;
    c["replica_checks_passed"] = r.replica_checks;
    c["allreduce_calls"] = r.comm.allreduce_calls;
    c["allreduce_bytes"] = r.comm.allreduce_bytes;
    c["allreduce_seconds"] = r.comm.allreduce_seconds;
    c["step_time_ms"] = r.steps_done > 0 ? 1e3 * r.train_time_s / static_cast<double>(r.steps_done) : 0.0;
    run["distributed"] = c;
  }
  return run;
}

}  // namespace

Status prepare_output_dir(const std::string& dir) { return prepare_dir(fs::path(dir)); }

Status write_report(const TrainConfig& config, const Communicator* comm, const io::Dataset& train,
                    const io::Dataset& test, const std::vector<RunResult>& runs,
                    const std::vector<RunResult>& sweep, const std::vector<StudyRow>& study,
                    const std::string& explained, double wall_time_s) {
  Json report;
  report["tool"] = "bnorm train";
  report["bnorm_version"] = bnorm::version();
  report["preset"] = config.preset;
  report["seed"] = config.seed;
  report["threads"] = bnorm::num_threads();
  if (comm != nullptr) {
    Json d;
    d["ranks"] = comm->size();
    d["communicator"] = comm->kind();
    d["threads_per_rank"] = bnorm::num_threads();
    d["global_batch"] = config.batch_size;
    d["sync_bn"] = config.sync_bn;
    d["sync_mode"] = config.sync_bn ? Json(config.sync_mode) : Json(nullptr);
    report["distributed"] = d;
  }
  std::time_t now = std::time(nullptr);
  char started[32];
  std::strftime(started, sizeof started, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  report["finished"] = started;
  Json cfg;
  cfg["steps"] = config.steps;
  cfg["epochs"] = config.epochs;
  cfg["batch_size"] = config.batch_size;
  cfg["lr"] = config.lr;
  cfg["momentum"] = config.momentum;
  cfg["weight_decay"] = config.weight_decay;
  cfg["schedule"] = config.schedule;
  cfg["warmup_steps"] = config.warmup_steps;
  cfg["eval_every"] = config.eval_every;
  cfg["normalize"] = config.normalize;
  cfg["augment"] = config.augment;
  cfg["data"] = config.data_dir.empty() ? std::string(io::kDefaultFashionMnistDir) : config.data_dir;
  cfg["train_examples"] = train.count;
  cfg["test_examples"] = test.count;
  if (!config.lr_sweep.empty()) cfg["sweep_steps"] = config.sweep_steps;
  // The batch-norm extensions, only those asked for (PyTorch's batch norm otherwise).
  if (config.ghost_batch != 0) cfg["ghost_batch"] = config.ghost_batch;
  if (config.batch_renorm) {
    Json r;
    r["rmax"] = config.renorm_rmax;
    r["dmax"] = config.renorm_dmax;
    if (!config.small_batch_study) {
      r["warmup_steps"] = renorm_warmup_steps(config, config.steps);
      r["ramp_steps"] = renorm_ramp_steps(config, config.steps);
    }
    cfg["batch_renorm"] = r;
  }
  if (config.freeze_bn_stats_after >= 0) cfg["freeze_bn_stats_after"] = config.freeze_bn_stats_after;
  if (config.freeze_bn_affine_after >= 0)
    cfg["freeze_bn_affine_after"] = config.freeze_bn_affine_after;
  if (config.precise_bn > 0) {
    Json p;
    p["batches"] = config.precise_bn;
    p["aggregation"] = config.precise_bn_aggregation;
    cfg["precise_bn"] = p;
  }
  if (config.small_batch_study) {
    for (const char* unused : {"steps", "epochs", "batch_size", "eval_every"}) cfg.erase(unused);
    cfg["study_batch_sizes"] = config.study_batch_sizes;
    cfg["study_examples"] = config.study_examples;
  }
  report["config"] = cfg;
  report["wall_time_s"] = wall_time_s;
  Json jruns = Json::array();
  for (const RunResult& r : runs) jruns.push_back(to_json(r));
  report["runs"] = jruns;
  Json jsweep = Json::array();
  for (const RunResult& r : sweep) {
    // Diverged: the loss became non-finite, or the network ends no better than chance.
    const bool failed = r.diverged || !(r.final_test.accuracy > 0.2);
    Json e;
    e["lr"] = r.lr;
    e["batch_norm"] = r.batch_norm;
    e["steps"] = r.steps_done;
    e["final_test_accuracy"] = std::isfinite(r.final_test.accuracy) ? Json(r.final_test.accuracy) : Json(nullptr);
    e["final_train_loss"] = std::isfinite(r.final_train_loss) ? Json(r.final_train_loss) : Json(nullptr);
    e["diverged"] = failed;
    e["loss_not_finite"] = r.diverged;
    jsweep.push_back(e);
  }
  if (!jsweep.empty()) report["lr_sweep"] = jsweep;
  if (!study.empty()) {
    Json st;
    st["examples_per_run"] = config.study_examples;
    st["batch_sizes"] = config.study_batch_sizes;
    st["methods"] = {"BN", "ghost BN", "batch renorm", "BN + precise statistics"};
    st["ghost_batch"] = "batch / 2";
    Json renorm;
    renorm["rmax"] = config.renorm_rmax;
    renorm["dmax"] = config.renorm_dmax;
    renorm["warmup"] = "10 % of the steps";
    renorm["ramp"] = "40 % of the steps";
    st["batch_renorm"] = renorm;
    Json precise;
    precise["samples"] = kStudyPreciseSamples;
    precise["aggregation"] = config.precise_bn_aggregation;
    st["precise_bn"] = precise;
    Json rows = Json::array();
    for (const StudyRow& r : study) {
      Json row;
      row["batch_size"] = r.batch_size;
      row["method"] = r.method;
      row["run"] = r.run;
      row["steps"] = r.steps;
      row["ghost_batch"] = r.ghost_batch != 0 ? Json(r.ghost_batch) : Json(nullptr);
      row["precise_bn_batches"] = r.precise_batches != 0 ? Json(r.precise_batches) : Json(nullptr);
      row["test_accuracy"] = num(r.test_accuracy);
      row["test_accuracy_train_mode"] = num(r.test_accuracy_train_mode);
      row["train_eval_gap"] = num(r.test_accuracy_train_mode - r.test_accuracy);
      row["wall_time_s"] = r.wall_time_s;
      rows.push_back(row);
    }
    st["rows"] = rows;
    report["small_batch_study"] = st;
  }
  if (!explained.empty()) report["explain"] = explained;
  return write_file_atomically(fs::path(config.out_dir) / "report.json", report.dump(1) + "\n");
}

void print_summary(const std::vector<RunResult>& runs, const std::string& out_dir) {
  std::fprintf(stderr, "\n");
  for (const RunResult& r : runs) {
    std::fprintf(stderr,
                 "%-10s test accuracy %.2f%% (eval mode)", r.name.c_str(),
                 100 * r.final_test.accuracy);
    if (std::isfinite(r.final_test_train_mode.accuracy) && r.final_test_train_mode.accuracy > 0)
      std::fprintf(stderr, ", %.2f%% with batch statistics", 100 * r.final_test_train_mode.accuracy);
    std::fprintf(stderr, "; %.0f steps/s, %s\n",
                 r.train_time_s > 0 ? static_cast<double>(r.steps_done) / r.train_time_s : 0.0,
                 format_duration(r.wall_time_s).c_str());
  }
  std::fprintf(stderr, "report: %s\n", (fs::path(out_dir) / "report.json").c_str());
}

Status draw_plots(const std::string& out_dir) {
  const std::string script = find_plot_script();
  const std::string python = script.empty() ? "" : find_plot_python();
  if (script.empty() || python.empty()) {
    std::fprintf(stderr, "plots skipped: %s\n",
                 script.empty() ? "plot_report.py not found next to the bnorm executable"
                                : "no python3 with matplotlib (apt-get install python3-matplotlib)");
  } else if (run_command({python, script, out_dir}, false) != 0) {
    return Status::internal("plot_report.py failed on " + out_dir);
  } else {
    std::fprintf(stderr, "plots and report.md: %s\n", out_dir.c_str());
  }
  return Status();
}

std::string plot_python() { return find_plot_python(); }
std::string tool_script(const std::string& name) { return find_plot_script(name); }
int run_program(const std::vector<std::string>& argv, bool quiet) { return run_command(argv, quiet); }
Status write_text_file(const std::string& path, const std::string& text) {
  return write_file_atomically(path, text);
}

}  // namespace bnorm::tools
