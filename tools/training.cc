#include "training.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "bnorm/batch_norm.h"
#include "bnorm/nn/loss.h"
#include "bnorm/nn/models.h"
#include "bnorm/nn/optim.h"
#include "bnorm/io/safetensors.h"
#include "explain.h"
#include "progress.h"

extern char** environ;

namespace bnorm::tools {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

constexpr int64_t kTrainExamples = 60000;
constexpr int64_t kEvalBatch = 1000;

Status bad_option(const std::string& name, const std::string& problem) {
  return Status::invalid_argument("--" + name + ": " + problem);
}

std::string number(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

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
Status prepare_output_dir(const fs::path& dir) {
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

// Examples [begin, end) of data: the sum of their losses and the number classified correctly.
Status evaluate_range(nn::Sequential& model, const std::string& preset, const io::Dataset& data,
                      int64_t begin, int64_t end, int64_t batch_size, double* loss_total,
                      int64_t* correct_total, const std::function<void(int64_t rows)>& on_batch) {
  nn::Tensor x, logits;
  double loss_sum = 0;
  int64_t correct = 0;
  for (int64_t start = begin; start < end; start += batch_size) {
    const int64_t rows = std::min(batch_size, end - start);
    const std::vector<int64_t> shape = input_shape(preset, rows);
    x.resize(shape);
    std::copy_n(data.images.data() + start * data.image_size(), rows * data.image_size(),
                x.data());
    BNORM_RETURN_IF_ERROR(model.forward(x, &logits));
    nn::CrossEntropyResult r;
    BNORM_RETURN_IF_ERROR(nn::softmax_cross_entropy(
        logits, std::span<const int32_t>(data.labels.data() + start, static_cast<size_t>(rows)),
        &r));
    loss_sum += r.loss * static_cast<double>(rows);
    correct += r.correct;
    if (on_batch) on_batch(rows);
  }
  *loss_total = loss_sum;
  *correct_total = correct;
  return Status();
}

Status evaluate_with(nn::Sequential& model, const std::string& preset, const io::Dataset& data,
                     int64_t batch_size, EvalResult* out,
                     const std::function<void(int64_t rows)>& on_batch) {
  double loss_sum = 0;
  int64_t correct = 0;
  BNORM_RETURN_IF_ERROR(
      evaluate_range(model, preset, data, 0, data.count, batch_size, &loss_sum, &correct, on_batch));
  out->loss = loss_sum / static_cast<double>(data.count);
  out->accuracy = static_cast<double>(correct) / static_cast<double>(data.count);
  return Status();
}

// ----- Data parallelism -----

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

// Rank r's part of n items split as evenly as possible: the first n % k ranks get one more.
int64_t shard_begin(int64_t n, int k, int r) {
  return n / k * r + std::min<int64_t>(r, n % k);
}

// Every rank's status: OK when all are, else this rank's error or one naming the failed rank.
// Lets a rank that fails before a collective (a bad file, an unwritable directory) end every
// rank with an error instead of leaving them waiting.
Status agree(Communicator* comm, const Status& mine, const std::string& what) {
  if (comm == nullptr) return mine;
  std::vector<double> flags(static_cast<size_t>(comm->size()), 0.0);
  flags[static_cast<size_t>(comm->rank())] = mine.ok() ? 0.0 : 1.0;
  BNORM_RETURN_IF_ERROR(comm->allreduce_sum(flags));
  if (!mine.ok()) return mine;
  for (int r = 0; r < comm->size(); ++r)
    if (flags[static_cast<size_t>(r)] != 0)
      return Status::invalid_argument(what + ": rank " + std::to_string(r) +
                                      " failed (see its message); every rank stops");
  return Status();
}

// A 48-bit hash of every parameter and buffer (exact in a double).
double state_hash(nn::Sequential& model) {
  uint64_t h = 1469598103934665603ULL;
  for (const nn::StateEntry& e : model.state_dict()) {
    const auto* p = static_cast<const unsigned char*>(e.data);
    const size_t bytes = static_cast<size_t>(e.numel()) * (e.dtype == nn::DType::kI64 ? 8 : 4);
    for (size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ULL;
  }
  return static_cast<double>(h >> 16);
}

// Fails unless every rank's parameters and buffers are bit for bit rank 0's.
Status check_replicas(Communicator* comm, nn::Sequential& model, int64_t step) {
  if (comm == nullptr || comm->size() == 1) return Status();
  std::vector<double> hashes(static_cast<size_t>(comm->size()), 0.0);
  hashes[static_cast<size_t>(comm->rank())] = state_hash(model);
  BNORM_RETURN_IF_ERROR(comm->allreduce_sum(hashes));
  for (int r = 1; r < comm->size(); ++r)
    if (hashes[static_cast<size_t>(r)] != hashes[0])
      return Status::internal("after step " + std::to_string(step) + ": rank " +
                              std::to_string(r) +
                              "'s parameters or buffers differ from rank 0's (replicas diverged)");
  return Status();
}

// The test set evaluated in eval mode, each rank on its shard, the sums all-reduced.
Status evaluate_distributed(nn::Sequential& model, const std::string& preset,
                            const io::Dataset& data, int64_t batch_size, Communicator* comm,
                            EvalResult* out) {
  const int k = comm->size(), r = comm->rank();
  double loss_sum = 0;
  int64_t correct = 0;
  BNORM_RETURN_IF_ERROR(evaluate_range(model, preset, data, shard_begin(data.count, k, r),
                                       shard_begin(data.count, k, r + 1), batch_size, &loss_sum,
                                       &correct, nullptr));
  std::vector<double> sums = {loss_sum, static_cast<double>(correct)};
  BNORM_RETURN_IF_ERROR(comm->allreduce_sum(sums));
  out->loss = sums[0] / static_cast<double>(data.count);
  out->accuracy = sums[1] / static_cast<double>(data.count);
  return Status();
}

Status run_one(const TrainConfig& config, const RunSpec& spec, const io::Dataset& train,
               const io::Dataset& test, Communicator* comm, RunResult* result) {
  const auto wall_start = Clock::now();
  result->name = spec.name;
  result->batch_norm = spec.batch_norm;
  result->lr = spec.lr;
  const int ranks = comm != nullptr ? comm->size() : 1;
  const int rank = comm != nullptr ? comm->rank() : 0;
  const bool distributed = ranks > 1;
  const bool lead = rank == 0;  // prints, writes the files
  if (comm != nullptr) comm->reset_counters();

  nn::Sequential model;
  BNORM_RETURN_IF_ERROR(build_model(config.preset, spec.batch_norm, config.seed, &model));
  // The global batch split across the ranks, the same split at every step.
  const int64_t batch = config.batch_size;
  std::vector<int64_t> split(static_cast<size_t>(ranks));
  for (int r = 0; r < ranks; ++r)
    split[static_cast<size_t>(r)] = shard_begin(batch, ranks, r + 1) - shard_begin(batch, ranks, r);
  const int64_t local_begin = shard_begin(batch, ranks, rank);
  const int64_t local = split[static_cast<size_t>(rank)];
  const bool sync_bn = comm != nullptr && config.sync_bn && spec.batch_norm;
  if (sync_bn) {
    model.set_sync(comm, config.sync_mode == "per-rank" ? SyncMode::kPerRank
                                                        : SyncMode::kReproducible);
    model.set_sync_split(split);
  }
  result->sync_bn = sync_bn;
  // Every rank starts from the same parameters (the same seed); checked, as after every
  // evaluation.
  BNORM_RETURN_IF_ERROR(check_replicas(comm, model, 0));
  if (distributed) ++result->replica_checks;
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

  // The sigmoid's quantiles need every test example's value: one process only.
  const int sigmoid_input = spec.trace_sigmoid && !distributed ? last_sigmoid_input(model) : -1;
  std::vector<float> sigmoid_values;
  auto test_eval = [&](int64_t step, double epoch, double train_loss, double train_acc,
                       double lr) -> Status {
    model.train(false);
    sigmoid_values.clear();
    EvalResult r;
    if (distributed) {
      BNORM_RETURN_IF_ERROR(check_replicas(comm, model, step));
      ++result->replica_checks;
      BNORM_RETURN_IF_ERROR(evaluate_distributed(model, config.preset, test, kEvalBatch, comm, &r));
    } else BNORM_RETURN_IF_ERROR(evaluate_with(model, config.preset, test, kEvalBatch, &r,
                                        [&](int64_t rows) {
                                          if (sigmoid_input < 0) return;
                                          const nn::Tensor& h =
                                              model.output(static_cast<size_t>(sigmoid_input));
                                          const int64_t width = h.numel() / rows;
                                          for (int64_t i = 0; i < rows; ++i)
                                            sigmoid_values.push_back(h[i * width]);  // unit 0
                                        }));
    model.train(true);
    Curve& c = result->curve;
    c.step.push_back(step);
    c.epoch.push_back(epoch);
    c.train_loss.push_back(train_loss);
    c.train_accuracy.push_back(train_acc);
    c.test_loss.push_back(r.loss);
    c.test_accuracy.push_back(r.accuracy);
    c.lr.push_back(lr);
    if (sigmoid_input >= 0) {
      std::sort(sigmoid_values.begin(), sigmoid_values.end());
      SigmoidTrace& s = result->sigmoid;
      s.step.push_back(step);
      s.p15.push_back(quantile(sigmoid_values, 0.15));
      s.p50.push_back(quantile(sigmoid_values, 0.50));
      s.p85.push_back(quantile(sigmoid_values, 0.85));
    }
    result->final_test = r;
    return Status();
  };

  io::BatchSampler sampler(train.count, batch, config.seed, /*drop_last=*/true);
  // Every rank draws and augments the whole global batch (cheap, and the same random streams
  // as one process), then trains on its part.
  nn::Tensor x_global(input_shape(config.preset, batch)), x_local, logits, dlogits;
  if (distributed) x_local.resize(input_shape(config.preset, local));
  const nn::Tensor& x = distributed ? x_local : x_global;
  std::vector<int32_t> labels_global(static_cast<size_t>(batch));
  std::span<const int32_t> labels(labels_global.data() + local_begin, static_cast<size_t>(local));
  // One all-reduce per step: the gradients the ranks must sum (not batch norm's under sync BN:
  // those are the global batch's already), then without sync BN rank 0's batch-norm buffers
  // (PyTorch DDP's broadcast_buffers), then the loss and the number correct.
  struct Segment {
    float* data;
    int64_t n;
    bool from_lead;  // rank 0's values (the others send zeros), not a sum
  };
  std::vector<Segment> segments;
  for (const nn::StateEntry& e : model.state_dict()) {
    if (e.is_parameter && !e.grad_is_global) segments.push_back({e.grad, e.numel(), false});
    if (!e.is_parameter && e.dtype == nn::DType::kF32 && !sync_bn)
      segments.push_back({static_cast<float*>(e.data), e.numel(), true});
  }
  size_t fused_size = 2;
  for (const Segment& seg : segments) fused_size += static_cast<size_t>(seg.n);
  std::vector<float> fused(distributed ? fused_size : 0);
  const float grad_scale = static_cast<float>(static_cast<double>(local) / static_cast<double>(batch));
  const bool record_curve = spec.eval_every > 0;
  if (record_curve) BNORM_RETURN_IF_ERROR(test_eval(0, 0.0, NAN, NAN, schedule.lr_at(0)));

  io::SplitMix64 flips(config.seed ^ 0x666c6970ULL);  // its own stream: the order stays the same
  std::vector<float> shift_scratch;
  Progress progress(spec.name, spec.steps);
  double interval_loss = 0, interval_correct = 0, interval_seen = 0;
  int64_t interval_steps = 0;
  double train_seconds = 0;
  auto train_start = Clock::now();
  int64_t step = 0;
  for (; step < spec.steps; ++step) {
    int64_t epoch = 0;
    const std::vector<int64_t>& idx = sampler.next(&epoch);
    io::gather_batch(train, idx.data(), batch, x_global.data(), labels_global.data());
    if (config.augment == "flip" || config.augment == "flip+crop")
      flip_some(train, batch, &flips, x_global.data());
    if (config.augment == "crop" || config.augment == "flip+crop")
      shift_some(train, batch, &flips, x_global.data(), &shift_scratch);
    if (distributed) {
      const float* mine = x_global.data() + local_begin * train.image_size();
      std::copy(mine, mine + local * train.image_size(), x_local.data());
    }
    BNORM_RETURN_IF_ERROR(fault_point(rank, step));
    const double lr = schedule.lr_at(step);
    sgd.set_lr(lr);
    model.zero_grad();
    BNORM_RETURN_IF_ERROR(model.forward(x, &logits));
    nn::CrossEntropyResult r;
    BNORM_RETURN_IF_ERROR(nn::softmax_cross_entropy(logits, labels, &r, &dlogits));
    if (distributed) {
      // The gradient of the global batch's mean loss: this rank's mean times its share.
      for (int64_t i = 0; i < dlogits.numel(); ++i) dlogits.data()[i] *= grad_scale;
    }
    if (!distributed && !std::isfinite(r.loss)) {
      result->diverged = true;
      break;
    }
    BNORM_RETURN_IF_ERROR(model.backward(dlogits, nullptr));
    if (distributed) {
      float* at = fused.data();
      for (const Segment& seg : segments) {
        if (seg.from_lead && !lead) std::fill(at, at + seg.n, 0.0f);
        else std::copy(seg.data, seg.data + seg.n, at);
        at += seg.n;
      }
      at[0] = static_cast<float>(r.loss * static_cast<double>(local));
      at[1] = static_cast<float>(r.correct);
      BNORM_RETURN_IF_ERROR(comm->allreduce_sum(fused));
      at = fused.data();
      for (const Segment& seg : segments) {
        std::copy(at, at + seg.n, seg.data);
        at += seg.n;
      }
      r.loss = static_cast<double>(at[0]) / static_cast<double>(batch);
      r.correct = static_cast<int64_t>(at[1]);
      if (!std::isfinite(r.loss)) {  // every rank sees the same global loss: all stop together
        result->diverged = true;
        break;
      }
    }
    sgd.step();
    interval_loss += r.loss;
    interval_correct += static_cast<double>(r.correct);
    interval_seen += static_cast<double>(batch);
    ++interval_steps;
    const bool last = step + 1 == spec.steps;
    if ((record_curve && (step + 1) % spec.eval_every == 0) || last) {
      train_seconds += seconds_since(train_start);
      const double mean_loss = interval_loss / static_cast<double>(interval_steps);
      const double train_acc = interval_correct / interval_seen;
      result->final_train_loss = mean_loss;
      result->final_train_accuracy = train_acc;
      if (record_curve || last) {
        const double epochs_done =
            static_cast<double>((step + 1) * batch) / static_cast<double>(train.count);
        BNORM_RETURN_IF_ERROR(test_eval(step + 1, epochs_done, mean_loss, train_acc, lr));
      }
      interval_loss = interval_correct = interval_seen = 0;
      interval_steps = 0;
      if (lead) progress.update(step + 1, mean_loss, result->final_test.accuracy);
      train_start = Clock::now();
    } else if ((step & 15) == 0 && lead) {
      progress.update(step + 1, r.loss,
                      result->curve.test_accuracy.empty() ? NAN : result->curve.test_accuracy.back());
    }
  }
  // A finished run added its last interval at the last step; a diverged one adds it here.
  result->steps_done = step;
  if (result->diverged) train_seconds += seconds_since(train_start);
  result->train_time_s = train_seconds;
  if (result->diverged) {
    result->final_test = EvalResult{NAN, NAN};
    std::fprintf(stderr, "%s: diverged at step %lld (loss is not finite)\n", spec.name.c_str(),
                 static_cast<long long>(step + 1));
  }
  if (lead) progress.finish(result->final_train_loss, result->final_test.accuracy);
  if (comm != nullptr) result->comm = comm->counters();

  // With batch statistics over the test set in batches of the global batch: one process only.
  if (spec.train_mode_gap && !result->diverged && !distributed)
    BNORM_RETURN_IF_ERROR(
        evaluate_train_mode(model, config.preset, test, batch, &result->final_test_train_mode));

  if (distributed && !result->diverged) {
    BNORM_RETURN_IF_ERROR(check_replicas(comm, model, result->steps_done));
    ++result->replica_checks;
  }
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
    model.train(false);
    const fs::path path = fs::path(config.out_dir) / spec.checkpoint;
    BNORM_RETURN_IF_ERROR(io::save_safetensors(path.string(), model.state_dict(), meta));
    result->checkpoint = spec.checkpoint;
  }
  result->wall_time_s = seconds_since(wall_start);
  return Status();
}

Json to_json(const std::vector<double>& v) {
  Json a = Json::array();
  for (double d : v) a.push_back(std::isfinite(d) ? Json(d) : Json(nullptr));
  return a;
}

Json to_json(const RunResult& r, const TrainConfig& config) {
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
  auto num = [](double d) { return std::isfinite(d) ? Json(d) : Json(nullptr); };
  fin["test_accuracy"] = num(r.final_test.accuracy);
  fin["test_loss"] = num(r.final_test.loss);
  fin["test_accuracy_train_mode"] = num(r.final_test_train_mode.accuracy);
  fin["train_eval_gap"] = num(r.final_test_train_mode.accuracy - r.final_test.accuracy);
  fin["train_accuracy"] = num(r.final_train_accuracy);
  fin["train_loss"] = num(r.final_train_loss);
  run["final"] = fin;
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
  (void)config;
  return run;
}

}  // namespace

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

Status evaluate(nn::Sequential& model, const std::string& preset, const io::Dataset& data,
                int64_t batch_size, EvalResult* out) {
  return evaluate_with(model, preset, data, batch_size, out, nullptr);
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
  io::Dataset head = data;
  head.count = data.count / batch_size * batch_size;
  Status s = evaluate_with(model, preset, head, batch_size, out, nullptr);
  model.train(was_training);
  for (size_t i = 0; i < state.size(); ++i)
    std::memcpy(state[i].data, saved[i].data(), saved[i].size());
  return s;
}

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
  // Before any training time is spent: the report must be writable.
  if (setup.ok() && lead) setup = prepare_output_dir(out_dir);
  BNORM_RETURN_IF_ERROR(agree(comm, setup, "setup"));
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

  Json sweep = Json::array();
  for (double lr : config.lr_sweep) {
    for (bool bn : {true, false}) {
      char name[64];
      std::snprintf(name, sizeof name, "%s lr %g", bn ? "BN" : "plain", lr);
      RunSpec spec{.name = name, .batch_norm = bn, .lr = lr, .steps = config.sweep_steps,
                   .eval_every = 0, .trace_sigmoid = false, .train_mode_gap = false,
                   .checkpoint = ""};
      RunResult r;
      BNORM_RETURN_IF_ERROR(run_one(config, spec, train, test, comm, &r));
      // Diverged: the loss became non-finite, or the network ends no better than chance.
      const bool failed = r.diverged || !(r.final_test.accuracy > 0.2);
      Json e;
      e["lr"] = lr;
      e["batch_norm"] = bn;
      e["steps"] = r.steps_done;
      e["final_test_accuracy"] = std::isfinite(r.final_test.accuracy) ? Json(r.final_test.accuracy) : Json(nullptr);
      e["final_train_loss"] = std::isfinite(r.final_train_loss) ? Json(r.final_train_loss) : Json(nullptr);
      e["diverged"] = failed;
      e["loss_not_finite"] = r.diverged;
      sweep.push_back(e);
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

  Json report;
  report["tool"] = "bnorm train";
  report["bnorm_version"] = bnorm::version();
  report["preset"] = config.preset;
  report["seed"] = config.seed;
  report["threads"] = bnorm::num_threads();
  if (comm != nullptr) {
    Json d;
    d["ranks"] = ranks;
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
  report["config"] = cfg;
  report["wall_time_s"] = seconds_since(start);
  Json jruns = Json::array();
  for (const RunResult& r : runs) jruns.push_back(to_json(r, config));
  report["runs"] = jruns;
  if (!sweep.empty()) report["lr_sweep"] = sweep;
  if (!explained.empty()) report["explain"] = explained;
  BNORM_RETURN_IF_ERROR(write_file_atomically(out_dir / "report.json", report.dump(1) + "\n"));

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
  std::fprintf(stderr, "report: %s\n", (out_dir / "report.json").c_str());

  if (config.plots) {
    const std::string script = find_plot_script();
    const std::string python = script.empty() ? "" : find_plot_python();
    if (script.empty() || python.empty()) {
      std::fprintf(stderr, "plots skipped: %s\n",
                   script.empty() ? "plot_report.py not found next to the bnorm executable"
                                  : "no python3 with matplotlib (apt-get install python3-matplotlib)");
    } else if (run_command({python, script, out_dir.string()}, false) != 0) {
      return Status::internal("plot_report.py failed on " + out_dir.string());
    } else {
      std::fprintf(stderr, "plots and report.md: %s\n", out_dir.c_str());
    }
  }
  return Status();
}

std::string plot_python() { return find_plot_python(); }
std::string tool_script(const std::string& name) { return find_plot_script(name); }
int run_program(const std::vector<std::string>& argv, bool quiet) { return run_command(argv, quiet); }
Status write_text_file(const std::string& path, const std::string& text) {
  return write_file_atomically(path, text);
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
