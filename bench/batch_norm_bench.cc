// The batch-norm benchmark: STREAM-like copy and non-temporal copy, bnorm and (when found at
// build time) oneDNN, in one run, on the shapes of bench/shapes/*.txt. Every implementation is
// validated against bnorm's reference (fp64 accumulation) before it is timed; a failure is
// printed loudly and written as status FAIL, never timed. Writes one CSV (bench_common.h has the
// columns); bench/report.py merges it with the PyTorch runner's CSV into the table.
//
// The fused ops (fwd_train_relu, fwd_infer_relu, bwd_relu, fwd_train_add_relu) run bnorm's fused
// calls (impl "bnorm") and its plain passes followed by a separate ReLU pass (impl
// "bnorm_unfused", relu_passes.h) beside oneDNN's fuse_norm_relu. --mode cold times every
// implementation on a rotation of buffer sets larger than twice the L3 (bench_common.h, Mode).
//
//   bnorm_bench [--shapes FILE]... [--ops fwd_train,...] [--impls copy,bnorm,onednn]
//               [--mode warm|cold|both] [--cold] [--cold-mib 1536] [--quick] [--threads 2]
//               [--copy-mib 256] [--min-time S] [--min-reps N] [--csv PATH (none: no CSV)]
//               [--dtypes f32,bf16,f16 (default f32)] [--half-ops OP,... (default: --ops)]
//
// --dtypes: the element types of the tensors. bf16 and f16 run bnorm with bf16/fp16 views (the
// per-channel vectors fp32) and oneDNN's bf16/f16 primitives; a peer that refuses the dtype
// gets a skip row that says so. --half-ops restricts the 16-bit dtypes to some of the ops.
#include <pthread.h>
#include <sched.h>

#include <cctype>
#include <filesystem>
#include <functional>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <thread>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "bench_common.h"
#include "bnorm/batch_norm.h"
#include "peers/onednn_runner.h"
#include "relu_passes.h"

namespace bench {
namespace {

// ---------------------------------------------------------------------------------------------
// Options.
struct Options {
  std::vector<std::string> shape_files;
  RunOptions run;  // ops: every op unless --ops
  std::vector<Dtype> dtypes = {Dtype::kF32};  // --dtypes
  std::vector<Op> half_ops;  // --half-ops: the ops of the 16-bit dtypes (empty: every op of --ops)
  bool run_copy = true, run_bnorm = true, run_onednn = true;
  bool quick = false;
  int threads = 2;
  double copy_mib = 256;
  std::string csv;  // empty: no CSV (the rows are printed on stderr either way)
};

std::string all_op_names() {
  std::string names;
  for (Op op : kAllOps) {
    if (!names.empty()) names += ", ";
    names += op_name(op);
  }
  return names;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

[[noreturn]] void usage(const std::string& error) {
  std::fprintf(stderr,
               "bnorm_bench: %s\n"
               "usage: bnorm_bench [--shapes FILE]... [--ops OP,...] [--impls copy,bnorm,onednn]\n"
               "                   [--mode warm|cold|both] [--cold] [--cold-mib MIB] [--quick]\n"
               "                   [--threads N] [--copy-mib MIB] [--min-time SECONDS]\n"
               "                   [--min-reps N] [--csv PATH] [--dtypes f32,bf16,f16]\n"
               "                   [--half-ops OP,...]\n"
               "ops: %s\n"
               "dtypes: f32 (default), bf16, f16 (the tensors' element type; --half-ops: the ops\n"
               "        the 16-bit ones run, default every op of --ops)\n",
               error.c_str(), all_op_names().c_str());
  std::exit(2);
}

Options parse_options(int argc, char** argv) {
  Options o;
  o.run.ops.assign(std::begin(kAllOps), std::end(kAllOps));
  double min_time = -1;
  int min_reps = -1;
  double copy_mib = -1;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage("missing value after " + a);
      return argv[++i];
    };
    if (a == "--shapes") {
      o.shape_files.push_back(value());
    } else if (a == "--ops") {
      o.run.ops.clear();
      for (const auto& name : split(value(), ',')) {
        auto it = std::find_if(std::begin(kAllOps), std::end(kAllOps),
                               [&](Op op) { return name == op_name(op); });
        if (it == std::end(kAllOps))
          usage("unknown op '" + name + "' in --ops (expected " + all_op_names() + ")");
        o.run.ops.push_back(*it);
      }
      if (o.run.ops.empty()) usage("--ops is empty");
    } else if (a == "--dtypes") {
      o.dtypes.clear();
      for (const auto& name : split(value(), ',')) {
        auto it = std::find_if(std::begin(kAllDtypes), std::end(kAllDtypes),
                               [&](Dtype d) { return name == dtype_name(d); });
        if (it == std::end(kAllDtypes))
          usage("unknown dtype '" + name + "' in --dtypes (expected f32, bf16, f16)");
        if (std::find(o.dtypes.begin(), o.dtypes.end(), *it) == o.dtypes.end())
          o.dtypes.push_back(*it);
      }
      if (o.dtypes.empty()) usage("--dtypes is empty");
    } else if (a == "--half-ops") {
      o.half_ops.clear();
      for (const auto& name : split(value(), ',')) {
        auto it = std::find_if(std::begin(kAllOps), std::end(kAllOps),
                               [&](Op op) { return name == op_name(op); });
        if (it == std::end(kAllOps))
          usage("unknown op '" + name + "' in --half-ops (expected " + all_op_names() + ")");
        o.half_ops.push_back(*it);
      }
    } else if (a == "--mode") {
      std::string m = value();
      if (m == "warm") o.run.modes = {Mode::kWarm};
      else if (m == "cold") o.run.modes = {Mode::kCold};
      else if (m == "both") o.run.modes = {Mode::kWarm, Mode::kCold};
      else usage("unknown --mode '" + m + "' (expected warm, cold, both)");
    } else if (a == "--cold") {
      o.run.modes = {Mode::kCold};
    } else if (a == "--cold-mib") {
      double mib = std::atof(value().c_str());
      if (!(mib >= 1)) usage("--cold-mib must be >= 1");
      o.run.cold_budget_bytes = mib * (1 << 20);
    } else if (a == "--impls") {
      o.run_copy = o.run_bnorm = o.run_onednn = false;
      for (const auto& name : split(value(), ',')) {
        if (name == "copy") o.run_copy = true;
        else if (name == "bnorm") o.run_bnorm = true;
        else if (name == "onednn") o.run_onednn = true;
        else if (name == "torch") continue;  // run by scripts/bench.sh, not here
        else usage("unknown implementation '" + name + "' (expected copy, bnorm, onednn)");
      }
    } else if (a == "--quick") {
      o.quick = true;
    } else if (a == "--threads") {
      o.threads = std::atoi(value().c_str());
      if (o.threads < 1) usage("--threads must be >= 1");
    } else if (a == "--copy-mib") {
      copy_mib = std::atof(value().c_str());
      if (!(copy_mib >= 1)) usage("--copy-mib must be >= 1");
    } else if (a == "--min-time") {
      min_time = std::atof(value().c_str());
      if (!(min_time >= 0)) usage("--min-time must be >= 0");
    } else if (a == "--min-reps") {
      min_reps = std::atoi(value().c_str());
      if (min_reps < 1) usage("--min-reps must be >= 1");
    } else if (a == "--csv") {
      o.csv = value();
    } else if (a == "-h" || a == "--help") {
      usage("help");
    } else {
      usage("unknown argument '" + a + "'");
    }
  }
  if (o.quick) {
    o.run.timing.warmup = 1;
    o.run.timing.min_reps = 5;
    o.run.timing.min_seconds = 0.05;
    o.copy_mib = 128;
  }
  if (min_time >= 0) o.run.timing.min_seconds = min_time;
  if (min_reps >= 1) o.run.timing.min_reps = min_reps;
  if (copy_mib >= 1) o.copy_mib = copy_mib;
  if (o.shape_files.empty()) {
#ifdef BNORM_BENCH_SHAPES_DIR
    std::vector<std::string> files;
    for (const auto& e : std::filesystem::directory_iterator(BNORM_BENCH_SHAPES_DIR))
      if (e.path().extension() == ".txt") files.push_back(e.path().string());
    std::sort(files.begin(), files.end());
    o.shape_files = files;
#endif
    if (o.shape_files.empty()) usage("no shape files (give --shapes FILE)");
  }
  return o;
}

// One shape per line, "32x64x112x112"; '#' starts a comment.
std::vector<Shape> read_shapes(const std::vector<std::string>& files) {
  std::vector<Shape> shapes;
  for (const auto& file : files) {
    std::ifstream in(file);
    if (!in) throw std::runtime_error("cannot read shape file " + file);
    std::string line;
    int line_no = 0;
    while (std::getline(in, line)) {
      ++line_no;
      line = line.substr(0, line.find('#'));
      std::string text;
      for (char ch : line)
        if (!std::isspace(static_cast<unsigned char>(ch))) text += ch;
      if (text.empty()) continue;
      Shape s;
      s.text = text;
      for (const auto& d : split(text, 'x')) {
        char* end = nullptr;
        long long v = std::strtoll(d.c_str(), &end, 10);
        if (*end != '\0' || v <= 0)
          throw std::runtime_error(file + ":" + std::to_string(line_no) + ": bad shape '" + text +
                                   "' (expected e.g. 32x64x112x112)");
        s.dims.push_back(v);
      }
      if (s.rank() != 2 && s.rank() != 4)
        throw std::runtime_error(file + ":" + std::to_string(line_no) + ": shape '" + text +
                                 "' has rank " + std::to_string(s.rank()) +
                                 "; the benchmark takes (N,C) and (N,C,H,W)");
      if (s.reduction() < 2)
        throw std::runtime_error(file + ":" + std::to_string(line_no) + ": shape '" + text +
                                 "' has one value per channel: training needs more");
      shapes.push_back(s);
    }
  }
  return shapes;
}

// ---------------------------------------------------------------------------------------------
// STREAM-like copy, fp32, one half of the arrays per thread, each thread pinned to its own CPU.
std::vector<int> allowed_cpus() {
  std::vector<int> cpus;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0)
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (CPU_ISSET(c, &set)) cpus.push_back(c);
  if (cpus.empty()) cpus.push_back(0);
  return cpus;
}

void pin_to(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) void copy_avx2(const float* a, float* b, size_t count) {
  size_t i = 0;
  for (; i + 32 <= count; i += 32) {
    __m256 v0 = _mm256_load_ps(a + i), v1 = _mm256_load_ps(a + i + 8);
    __m256 v2 = _mm256_load_ps(a + i + 16), v3 = _mm256_load_ps(a + i + 24);
    _mm256_store_ps(b + i, v0);
    _mm256_store_ps(b + i + 8, v1);
    _mm256_store_ps(b + i + 16, v2);
    _mm256_store_ps(b + i + 24, v3);
  }
  for (; i < count; ++i) b[i] = a[i];
}
__attribute__((target("avx2"))) void copy_nt_avx2(const float* a, float* b, size_t count) {
  size_t i = 0;
  for (; i + 32 <= count; i += 32) {
    __m256 v0 = _mm256_load_ps(a + i), v1 = _mm256_load_ps(a + i + 8);
    __m256 v2 = _mm256_load_ps(a + i + 16), v3 = _mm256_load_ps(a + i + 24);
    _mm256_stream_ps(b + i, v0);
    _mm256_stream_ps(b + i + 8, v1);
    _mm256_stream_ps(b + i + 16, v2);
    _mm256_stream_ps(b + i + 24, v3);
  }
  for (; i < count; ++i) b[i] = a[i];
  _mm_sfence();
}
void copy_nt_sse(const float* a, float* b, size_t count) {
  size_t i = 0;
  for (; i + 4 <= count; i += 4) _mm_stream_ps(b + i, _mm_load_ps(a + i));
  for (; i < count; ++i) b[i] = a[i];
  _mm_sfence();
}
#endif

// A plain loop (CMake builds this file with -fno-tree-loop-distribute-patterns so that the
// compiler does not turn it into memcpy, which switches to non-temporal stores for large sizes).
void copy_plain(const float* a, float* b, size_t count) {
  for (size_t i = 0; i < count; ++i) b[i] = a[i];
}

using CopyFn = void (*)(const float*, float*, size_t);

CopyFn pick_copy(bool nt, std::string* name) {
#if defined(__x86_64__)
  bool avx2 = __builtin_cpu_supports("avx2");
  *name = nt ? (avx2 ? "avx2 stream" : "sse stream") : (avx2 ? "avx2" : "plain loop");
  if (nt) return avx2 ? copy_nt_avx2 : copy_nt_sse;
  return avx2 ? copy_avx2 : copy_plain;
#else
  *name = "plain loop";
  return nt ? nullptr : copy_plain;
#endif
}

void run_copies(const Options& o, std::FILE* csv) {
  const int threads = o.threads;
  std::vector<int> cpus = allowed_cpus();
  size_t count = static_cast<size_t>(o.copy_mib * 1024 * 1024 / sizeof(float));
  count = count / (32 * threads) * (32 * threads);  // every thread's part 128-byte aligned
  const size_t part = count / threads;
  auto run_parallel = [&](auto&& body) {
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        pin_to(cpus[t % cpus.size()]);
        body(t * part, part);
      });
    for (auto& th : pool) th.join();
  };
  for (Mode mode : o.run.modes) {
    // warm: one pair (a, b); cold: pairs rotated as the kernels' buffer sets are.
    const double pair_bytes = 2.0 * count * sizeof(float);
    const Rotation rot = rotation(mode, pair_bytes, o.run.cold_budget_bytes);
    std::vector<Buffer> a, b;
    for (int k = 0; k < rot.sets; ++k) {
      a.emplace_back(count);
      b.emplace_back(count);
      // First touch by the thread that will copy the part.
      run_parallel([&](size_t begin, size_t len) {
        for (size_t i = begin; i < begin + len; ++i) {
          a[k][i] = static_cast<float>(i % 1000);
          b[k][i] = 0;
        }
      });
    }
    for (bool nt : {false, true}) {
      std::string kernel;
      CopyFn fn = pick_copy(nt, &kernel);
      Row r;
      r.impl = nt ? "copy_nt" : "copy";
      r.shape = std::to_string(static_cast<long long>(o.copy_mib)) + "MiBx2";
      r.layout = "-";
      r.op = "copy";
      r.mode = mode_name(mode);
      r.bytes = pair_bytes;  // read a + write b, STREAM's count
      if (!fn) {
        r.status = "skip";
        r.note = "no non-temporal store on this architecture";
      } else {
        TimingOptions t = o.run.timing;
        t.min_reps = std::max(t.min_reps, 10);
        size_t next = 0;
        Timing tm = time_calls(
            [&] {
              const size_t k = next++ % a.size();
              run_parallel([&](size_t begin, size_t len) {
                fn(a[k].data() + begin, b[k].data() + begin, len);
              });
              return true;
            },
            t);
        bool same = true;
        for (size_t k = 0; k < std::min(next, a.size()); ++k)
          same = same && b[k][count - 1] == a[k][count - 1] && b[k][count / 2] == a[k][count / 2];
        r.status = same ? "ok" : "FAIL";
        r.median_ms = tm.median_ms;
        r.min_ms = tm.min_ms;
        r.reps = tm.reps;
        r.note = kernel + ", " + std::to_string(threads) + " pinned threads";
        if (!rot.note.empty()) r.note += "; " + rot.note;
      }
      print_row(r);
      write_row(csv, r);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Data and the reference results of one shape.
struct Rng {
  uint64_t s;
  uint64_t next() {  // splitmix64
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  // Mean 0, variance 1: a sum of four uniforms (Irwin-Hall), cheap and bounded.
  float normalish() {
    uint64_t r0 = next(), r1 = next();
    double u = ((r0 & 0xffffffffu) + (r0 >> 32) + (r1 & 0xffffffffu) + (r1 >> 32)) * 0x1.0p-32;
    return static_cast<float>((u - 2.0) * 1.7320508075688772);
  }
};

void check(const bnorm::Status& s, const char* what) {
  if (!s.ok()) throw std::runtime_error(std::string(what) + ": " + s.message());
}

}  // namespace

// The reference's backward_relu of the problem, from dy and a channels-first y (the forward's
// output: its mask is y > 0), with the reference's batch statistics. Also what a peer that
// computes its own ReLU mask (oneDNN's workspace) is validated against, with its own y.
void reference_backward_relu(const Problem& p, const float* y, float* dx,
                             std::span<float> dweight, std::span<float> dbias) {
  const auto layout = bnorm::Layout::kChannelsFirst;
  bnorm::CallOptions ref;
  ref.backend = bnorm::Backend::kReference;
  bnorm::BackwardArgs b;
  b.dy = bnorm::ConstTensorView(p.dy.data(), p.shape.dims, layout);
  b.x = bnorm::ConstTensorView(p.x.data(), p.shape.dims, layout);
  b.weight = p.weight;
  b.training = true;
  b.save_mean = p.save_mean;
  b.save_invstd = p.save_invstd;
  b.dx = bnorm::TensorView(dx, p.shape.dims, layout);
  b.dweight = dweight;
  b.dbias = dbias;
  check(bnorm::backward_relu(b, bnorm::ConstTensorView(y, p.shape.dims, layout), {}, ref),
        "reference backward_relu");
}

namespace {

std::unique_ptr<Problem> make_problem(const Shape& shape, const std::vector<Op>& ops, Dtype dtype) {
  auto p = std::make_unique<Problem>();
  p->shape = shape;
  p->dtype = dtype;
  const int64_t C = shape.c(), S = shape.spatial(), N = shape.n();
  const size_t count = static_cast<size_t>(shape.numel());
  Rng rng{0x5eed0000ull + static_cast<uint64_t>(count)};
  p->weight.resize(C);
  p->bias.resize(C);
  p->eval_mean.resize(C);
  p->eval_var.resize(C);
  std::vector<float> offset(C);
  for (int64_t c = 0; c < C; ++c) {
    offset[c] = static_cast<float>(4 * rng.uniform() - 2);  // channel means in [-2, 2)
    p->weight[c] = static_cast<float>(0.5 + rng.uniform());
    p->bias[c] = static_cast<float>(rng.uniform() - 0.5);
    p->eval_mean[c] = offset[c] + static_cast<float>(0.2 * rng.uniform() - 0.1);
    p->eval_var[c] = static_cast<float>(0.5 + 1.5 * rng.uniform());
  }
  p->x = Buffer(count);
  p->dy = Buffer(count);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t c = 0; c < C; ++c) {
      float* x = p->x.data() + (i * C + c) * S;
      float* dy = p->dy.data() + (i * C + c) * S;
      for (int64_t j = 0; j < S; ++j) {
        // Rounded to the dtype (exact for f32): the values every implementation gets.
        x[j] = quantize(offset[c] + rng.normalish(), dtype);
        dy[j] = quantize(rng.normalish(), dtype);
      }
    }

  // The reference, channels-first. Training is always run: backward uses its statistics.
  bnorm::CallOptions ref;
  ref.backend = bnorm::Backend::kReference;
  const auto layout = bnorm::Layout::kChannelsFirst;
  bnorm::ConstTensorView x(p->x.data(), shape.dims, layout);
  p->y_train = Buffer(count);
  p->save_mean.resize(C);
  p->save_invstd.resize(C);
  p->running_mean.assign(C, 0.0f);
  p->running_var.assign(C, 1.0f);
  int64_t tracked = 0;
  bnorm::ForwardTrainArgs ft;
  ft.x = x;
  ft.weight = p->weight;
  ft.bias = p->bias;
  ft.running_mean = p->running_mean;
  ft.running_var = p->running_var;
  ft.num_batches_tracked = &tracked;
  ft.momentum = p->momentum;
  ft.eps = p->eps;
  ft.y = bnorm::TensorView(p->y_train.data(), shape.dims, layout);
  ft.save_mean = p->save_mean;
  ft.save_invstd = p->save_invstd;
  check(bnorm::forward_train(ft, ref), "reference forward_train");

  auto wants = [&](Op op) { return std::find(ops.begin(), ops.end(), op) != ops.end(); };
  if (wants(Op::kFwdTrainAddRelu)) {  // drawn after x and dy, so their values do not change
    p->z = Buffer(count);
    for (size_t i = 0; i < count; ++i) p->z[i] = quantize(rng.normalish(), dtype);
    p->max_abs_z = max_abs(p->z.data(), count);
  }
  // The fused forwards' references: the reference's fused calls, on fresh running statistics
  // (the outputs compared are y and the same batch statistics as above).
  auto reference_train_relu = [&](Buffer& y, const float* z) {
    y = Buffer(count);
    std::vector<float> rm(C, 0.0f), rv(C, 1.0f), mean(C), invstd(C);
    int64_t n_tracked = 0;
    bnorm::ForwardTrainArgs a = ft;
    a.running_mean = rm;
    a.running_var = rv;
    a.num_batches_tracked = &n_tracked;
    a.save_mean = mean;
    a.save_invstd = invstd;
    a.y = bnorm::TensorView(y.data(), shape.dims, layout);
    bnorm::ConstTensorView zv;
    if (z) zv = bnorm::ConstTensorView(z, shape.dims, layout);
    check(bnorm::forward_train_relu(a, zv, ref), "reference forward_train_relu");
  };
  if (wants(Op::kFwdTrainRelu) || wants(Op::kBwdRelu)) reference_train_relu(p->y_train_relu, nullptr);
  if (wants(Op::kFwdTrainAddRelu)) reference_train_relu(p->y_train_add_relu, p->z.data());
  if (wants(Op::kFwdInferRelu)) {
    p->y_eval_relu = Buffer(count);
    bnorm::ForwardEvalArgs fe;
    fe.x = x;
    fe.weight = p->weight;
    fe.bias = p->bias;
    fe.running_mean = p->eval_mean;
    fe.running_var = p->eval_var;
    fe.eps = p->eps;
    fe.y = bnorm::TensorView(p->y_eval_relu.data(), shape.dims, layout);
    check(bnorm::forward_eval_relu(fe, {}, ref), "reference forward_eval_relu");
  }
  if (wants(Op::kBwdRelu)) {
    if (dtype != Dtype::kF32) {  // the input y as the implementations get it
      p->y_relu_in16 = Buffer(count);
      for (size_t i = 0; i < count; ++i) p->y_relu_in16[i] = quantize(p->y_train_relu[i], dtype);
    }
    p->dx_relu = Buffer(count);
    p->dweight_relu.resize(C);
    p->dbias_relu.resize(C);
    reference_backward_relu(*p, p->relu_input().data(), p->dx_relu.data(), p->dweight_relu,
                            p->dbias_relu);
  }
  if (wants(Op::kFwdInfer)) {
    p->y_eval = Buffer(count);
    bnorm::ForwardEvalArgs fe;
    fe.x = x;
    fe.weight = p->weight;
    fe.bias = p->bias;
    fe.running_mean = p->eval_mean;
    fe.running_var = p->eval_var;
    fe.eps = p->eps;
    fe.y = bnorm::TensorView(p->y_eval.data(), shape.dims, layout);
    check(bnorm::forward_eval(fe, ref), "reference forward_eval");
  }
  if (wants(Op::kBwd)) {
    p->dx = Buffer(count);
    p->dweight.resize(C);
    p->dbias.resize(C);
    bnorm::BackwardArgs b;
    b.dy = bnorm::ConstTensorView(p->dy.data(), shape.dims, layout);
    b.x = x;
    b.weight = p->weight;
    b.training = true;
    b.save_mean = p->save_mean;
    b.save_invstd = p->save_invstd;
    b.dx = bnorm::TensorView(p->dx.data(), shape.dims, layout);
    b.dweight = p->dweight;
    b.dbias = p->dbias;
    check(bnorm::backward(b, ref), "reference backward");
  }

  p->max_abs_x = max_abs(p->x.data(), count);
  p->max_abs_dy = max_abs(p->dy.data(), count);
  p->max_abs_weight = max_abs(p->weight.data(), C);
  for (float v : p->save_invstd) p->max_invstd = std::max(p->max_invstd, double(v));
  for (int64_t i = 0; i < N; ++i)
    for (int64_t c = 0; c < C; ++c) {
      const float* xs = p->x.data() + (i * C + c) * S;
      for (int64_t j = 0; j < S; ++j)
        p->max_abs_xhat = std::max(
            p->max_abs_xhat, std::fabs((double(xs[j]) - p->save_mean[c]) * p->save_invstd[c]));
    }
  return p;
}

// Channels-first <-> channels-last copies of a (N, C, S) tensor.
void to_channels_last(const float* src, float* dst, int64_t N, int64_t C, int64_t S) {
  for (int64_t i = 0; i < N; ++i)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < S; ++j) dst[(i * S + j) * C + c] = src[(i * C + c) * S + j];
}
void to_channels_first(const float* src, float* dst, int64_t N, int64_t C, int64_t S) {
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < S; ++j)
      for (int64_t c = 0; c < C; ++c) dst[(i * C + c) * S + j] = src[(i * S + j) * C + c];
}

// ---------------------------------------------------------------------------------------------
// bnorm through its public API, Backend::kAuto: the fused calls (impl "bnorm") and, for the
// fused ops, the plain passes with a separate ReLU pass (impl "bnorm_unfused").

// The tensors of one call in the layout timed, elements of the problem's dtype. Inputs: x; z
// (the add); dy and y (the fused backward's mask). Outputs: y (forward), dx (backward).
struct CallBuffers {
  const void* x = nullptr;
  const void* z = nullptr;
  const void* dy = nullptr;
  const void* y_in = nullptr;
  void* y = nullptr;
  void* dx = nullptr;
};
// What a call writes besides its tensors, kept across the timed calls.
struct CallState {
  std::vector<float> rm, rv, mean, invstd, dweight, dbias;
  int64_t tracked = 0;
  std::string error;  // the message of the last call that failed
};

// One call of op on b. unfused: batch norm's plain pass and the ReLU pass apart (backward: the
// mask pass into dx, then batch norm's backward from dx in place); for 16 bits the passes of
// relu_passes.h on the 16-bit elements. The views carry the problem's dtype (bnorm's bf16 /
// fp16 views for 16 bits).
bool call_bnorm(const Problem& p, Op op, bool unfused, bnorm::Layout layout,
                const CallBuffers& cb, CallState& st, WorkerTeam& team) {
  const auto& dims = p.shape.dims;
  const size_t count = static_cast<size_t>(p.shape.numel());
  const bnorm::DType dt = bnorm_dtype(p.dtype);
  auto cview = [&](const void* d) { return bnorm::ConstTensorView(d, dt, dims, layout); };
  auto mview = [&](void* d) { return bnorm::TensorView(d, dt, dims, layout); };
  // The fp32 elements, for the unfused ReLU passes.
  struct {
    const float* z;
    const float* dy;
    const float* y_in;
    float* y;
    float* dx;
  } b = {static_cast<const float*>(cb.z), static_cast<const float*>(cb.dy),
         static_cast<const float*>(cb.y_in), static_cast<float*>(cb.y), static_cast<float*>(cb.dx)};
  // The 16-bit elements, for the same passes on 16-bit tensors.
  const bool half = p.dtype != Dtype::kF32, bf16 = p.dtype == Dtype::kBF16;
  struct {
    const uint16_t* z;
    const uint16_t* dy;
    const uint16_t* y_in;
    uint16_t* y;
    uint16_t* dx;
  } h = {static_cast<const uint16_t*>(cb.z), static_cast<const uint16_t*>(cb.dy),
         static_cast<const uint16_t*>(cb.y_in), static_cast<uint16_t*>(cb.y),
         static_cast<uint16_t*>(cb.dx)};
  auto relu_pass = [&] {
    if (half) team.run(count, [&](size_t i, size_t e) { relu_inplace16(h.y + i, e - i, bf16); });
    else team.run(count, [&](size_t i, size_t e) { relu_inplace(b.y + i, e - i); });
  };
  bnorm::ConstTensorView xv = cview(cb.x);
  auto ok = [&](const bnorm::Status& s) {
    if (!s.ok()) st.error = s.message();
    return s.ok();
  };
  if (training_forward(op)) {
    bnorm::ForwardTrainArgs ft;
    ft.x = xv;
    ft.weight = p.weight;
    ft.bias = p.bias;
    ft.running_mean = st.rm;
    ft.running_var = st.rv;
    ft.num_batches_tracked = &st.tracked;
    ft.momentum = p.momentum;
    ft.eps = p.eps;
    ft.y = mview(cb.y);
    ft.save_mean = st.mean;
    ft.save_invstd = st.invstd;
    bnorm::ConstTensorView zv;
    if (op == Op::kFwdTrainAddRelu) zv = cview(cb.z);
    if (op == Op::kFwdTrain || unfused) {
      if (!ok(bnorm::forward_train(ft))) return false;
      if (op == Op::kFwdTrainRelu) relu_pass();
      if (op == Op::kFwdTrainAddRelu) {
        if (half)
          team.run(count, [&](size_t i, size_t e) { add_relu_inplace16(h.y + i, h.z + i, e - i, bf16); });
        else
          team.run(count, [&](size_t i, size_t e) { add_relu_inplace(b.y + i, b.z + i, e - i); });
      }
      return true;
    }
    return ok(bnorm::forward_train_relu(ft, zv));
  }
  if (inference(op)) {
    bnorm::ForwardEvalArgs fe;
    fe.x = xv;
    fe.weight = p.weight;
    fe.bias = p.bias;
    fe.running_mean = p.eval_mean;
    fe.running_var = p.eval_var;
    fe.eps = p.eps;
    fe.y = mview(cb.y);
    if (op == Op::kFwdInfer) return ok(bnorm::forward_eval(fe));
    if (!unfused) return ok(bnorm::forward_eval_relu(fe));
    if (!ok(bnorm::forward_eval(fe))) return false;
    relu_pass();
    return true;
  }
  // The reference's batch statistics, so that backward is judged on its own.
  bnorm::BackwardArgs bw;
  bw.dy = cview(cb.dy);
  bw.x = xv;
  bw.weight = p.weight;
  bw.training = true;
  bw.save_mean = p.save_mean;
  bw.save_invstd = p.save_invstd;
  bw.dx = mview(cb.dx);
  bw.dweight = st.dweight;
  bw.dbias = st.dbias;
  if (op == Op::kBwd) return ok(bnorm::backward(bw));
  if (!unfused) return ok(bnorm::backward_relu(bw, cview(cb.y_in)));
  if (half)
    team.run(count, [&](size_t i, size_t e) { relu_mask16(h.dy + i, h.y_in + i, h.dx + i, e - i, bf16); });
  else
    team.run(count, [&](size_t i, size_t e) { relu_mask(b.dy + i, b.y_in + i, b.dx + i, e - i); });
  bw.dy = cview(cb.dx);  // dx may alias dy exactly
  return ok(bnorm::backward(bw));
}

// Times call(set) over the mode's rotation of buffer sets: set 0 is `base` (validated);
// in cold mode the others are copies of its inputs with their own outputs. Fills r's timing.
void time_rotated(const Problem& p, Op op, Mode mode, const RunOptions& run, const CallBuffers& base,
                  const std::function<bool(const CallBuffers&)>& call, Row& r) {
  const size_t count = static_cast<size_t>(p.shape.numel());
  const size_t bytes = count * dtype_bytes(p.dtype);
  const Rotation rot =
      rotation(mode, min_traffic_bytes(op, p.shape, p.dtype), run.cold_budget_bytes);
  std::vector<Buffer> owned;
  std::vector<CallBuffers> sets = {base};
  auto copy_of = [&](const void* src) -> const void* {
    if (!src) return nullptr;
    owned.push_back(Buffer::of_elements(count, dtype_bytes(p.dtype)));
    std::memcpy(owned.back().data(), src, bytes);
    return owned.back().data();
  };
  auto output_like = [&](const void* out) -> void* {
    if (!out) return nullptr;
    owned.push_back(Buffer::of_elements(count, dtype_bytes(p.dtype)));
    std::memset(owned.back().data(), 0, bytes);
    return owned.back().data();
  };
  owned.reserve(6 * static_cast<size_t>(rot.sets));
  for (int k = 1; k < rot.sets; ++k) {
    CallBuffers c;
    c.x = copy_of(base.x);
    c.z = copy_of(base.z);
    c.dy = copy_of(base.dy);
    c.y_in = copy_of(base.y_in);
    c.y = output_like(base.y);
    c.dx = output_like(base.dx);
    sets.push_back(c);
  }
  size_t next = 0;
  Timing t = time_calls([&] { return call(sets[next++ % sets.size()]); }, run.timing);
  r.status = t.ok ? "ok" : "error";
  r.median_ms = t.median_ms;
  r.min_ms = t.min_ms;
  r.reps = t.reps;
  if (!rot.note.empty()) r.note += "; " + rot.note;
}

void run_bnorm(const Problem& p, bnorm::Layout layout, const std::string& layout_name,
               const Options& o, Buffer& scratch, WorkerTeam& team, std::FILE* csv) {
  const Shape& shape = p.shape;
  const int64_t N = shape.n(), C = shape.c(), S = shape.spatial();
  const size_t count = static_cast<size_t>(shape.numel());
  const bool last = layout == bnorm::Layout::kChannelsLast && S > 1;
  const Dtype dtype = p.dtype;
  const size_t bytes = count * dtype_bytes(dtype);
  const Tolerances tol = tolerances(p);
  const std::string who = "bnorm " + shape.text + " " + layout_name +
                          (dtype == Dtype::kF32 ? "" : std::string(" ") + dtype_name(dtype));
  auto wants = [&](Op op) {
    return std::find(o.run.ops.begin(), o.run.ops.end(), op) != o.run.ops.end();
  };

  // Inputs in the layout and the dtype (first-touched here; the problem's values are exact in
  // the dtype), outputs first-touched with zeros.
  auto in_layout = [&](const Buffer& src) {
    Buffer b = Buffer::of_elements(count, dtype_bytes(dtype));
    const float* from = src.data();
    if (last) {
      to_channels_last(src.data(), scratch.data(), N, C, S);
      from = scratch.data();
    }
    narrow(from, b.data(), count, dtype);
    return b;
  };
  Buffer x = in_layout(p.x), y = Buffer::of_elements(count, dtype_bytes(dtype)),
         dx = Buffer::of_elements(count, dtype_bytes(dtype)), dy, z, y_relu;
  std::memset(y.data(), 0, bytes);
  std::memset(dx.data(), 0, bytes);
  if (wants(Op::kBwd) || wants(Op::kBwdRelu)) dy = in_layout(p.dy);
  if (wants(Op::kFwdTrainAddRelu)) z = in_layout(p.z);
  if (wants(Op::kBwdRelu)) y_relu = in_layout(p.relu_input());
  // A 16-bit output widened to fp32 (exact), then in channels-first order, for comparing with
  // the reference.
  Buffer wide;
  if (dtype != Dtype::kF32) wide = Buffer(count);
  auto first_order = [&](const void* b) -> const float* {
    const float* f = static_cast<const float*>(b);
    if (dtype != Dtype::kF32) {
      widen(b, wide.data(), count, dtype);
      f = wide.data();
    }
    if (!last) return f;
    to_channels_first(f, scratch.data(), N, C, S);
    return scratch.data();
  };

  for (Op op : o.run.ops) {
    CallBuffers base;
    base.x = x.data();
    if (training_forward(op) || inference(op)) base.y = y.data();
    if (op == Op::kFwdTrainAddRelu) base.z = z.data();
    if (backward(op)) {
      base.dy = dy.data();
      base.dx = dx.data();
    }
    if (op == Op::kBwdRelu) base.y_in = y_relu.data();
    const std::string what = who + " " + op_name(op);
    // Validates one variant; returns its error ratio (infinity when a call failed).
    auto validate = [&](bool unfused, CallState& st) {
      st.rm.assign(C, 0.0f);
      st.rv.assign(C, 1.0f);
      st.mean.assign(C, 0.0f);
      st.invstd.assign(C, 0.0f);
      st.dweight.assign(C, 0.0f);
      st.dbias.assign(C, 0.0f);
      st.tracked = 0;
      const std::string w = what + (unfused ? " (unfused)" : "");
      if (!call_bnorm(p, op, unfused, layout, base, st, team))
        throw std::runtime_error(w + ": the call failed: " + st.error);
      double err = 0;
      if (training_forward(op)) {
        const Buffer& want = op == Op::kFwdTrain       ? p.y_train
                             : op == Op::kFwdTrainRelu ? p.y_train_relu
                                                       : p.y_train_add_relu;
        err = compare("y", w, first_order(base.y), want.data(), count,
                      op == Op::kFwdTrainAddRelu ? tol.y_train_add : tol.y_train);
        err = std::max(err, compare("save_mean", w, st.mean.data(), p.save_mean.data(), C, tol.mean));
        err = std::max(err, compare("save_invstd", w, st.invstd.data(), p.save_invstd.data(), C, tol.invstd));
        err = std::max(err, compare("running_mean", w, st.rm.data(), p.running_mean.data(), C, tol.running_mean));
        err = std::max(err, compare("running_var", w, st.rv.data(), p.running_var.data(), C, tol.running_var));
      } else if (inference(op)) {
        const Buffer& want = op == Op::kFwdInfer ? p.y_eval : p.y_eval_relu;
        err = compare("y", w, first_order(base.y), want.data(), count, tol.y_eval);
      } else {
        const bool relu = op == Op::kBwdRelu;
        err = compare("dx", w, first_order(base.dx), (relu ? p.dx_relu : p.dx).data(), count,
                      relu ? tol.dx_relu : tol.dx);
        err = std::max(err, compare("dweight", w, st.dweight.data(),
                                    (relu ? p.dweight_relu : p.dweight).data(), C, tol.dweight));
        err = std::max(err, compare("dbias", w, st.dbias.data(),
                                    (relu ? p.dbias_relu : p.dbias).data(), C, tol.dbias));
      }
      return err;
    };

    std::vector<bool> variants = {false};
    if (fused(op)) variants.push_back(true);
    std::vector<CallState> states(variants.size());
    std::vector<double> errs(variants.size(), 0.0);
    std::vector<std::string> errors(variants.size());
    for (size_t v = 0; v < variants.size(); ++v) {
      try {
        errs[v] = validate(variants[v], states[v]);
      } catch (const std::exception& e) {
        errors[v] = e.what();
        std::fprintf(stderr, "\n!!! %s\n\n", e.what());
      }
    }
    // Fused and unfused alternate within each mode, so that a change of load hits both.
    for (Mode mode : o.run.modes) {
      for (size_t v = 0; v < variants.size(); ++v) {
        Row r;
        r.impl = variants[v] ? "bnorm_unfused" : "bnorm";
        r.shape = shape.text;
        r.layout = layout_name;
        r.op = op_name(op);
        r.mode = mode_name(mode);
        r.dtype = dtype_name(dtype);
        r.bytes = min_traffic_bytes(op, shape, dtype);
        r.err_ratio = errs[v];
        if (!errors[v].empty()) {
          r.status = "error";
          r.note = errors[v];
        } else if (!(errs[v] <= 1.0)) {
          r.status = "FAIL";
          r.note = "validation failed (see the log); not timed";
        } else {
          r.note = "threads=" + std::to_string(bnorm::num_threads());
          if (variants[v]) r.note += ", ReLU pass on " + std::to_string(o.threads) + " threads";
          try {
            time_rotated(p, op, mode, o.run, base,
                         [&](const CallBuffers& b) {
                           return call_bnorm(p, op, variants[v], layout, b, states[v], team);
                         },
                         r);
            if (r.status == "error") r.note += "; a timed call failed: " + states[v].error;
          } catch (const std::exception& e) {  // e.g. out of memory for the cold sets
            r.status = "error";
            r.note = e.what();
          }
        }
        print_row(r);
        write_row(csv, r);
      }
    }
  }
}

std::string load_average() {
  std::ifstream in("/proc/loadavg");
  std::string one, five, fifteen;
  in >> one >> five >> fifteen;
  return in ? one + " " + five + " " + fifteen : "unknown";
}

void meta(std::FILE* csv, const std::string& key, const std::string& value) {
  Row r;
  r.impl = "meta";
  r.dtype = "-";
  r.shape = "-";
  r.layout = key;
  r.op = "-";
  r.status = "ok";
  r.note = value;
  write_row(csv, r);
  std::fprintf(stderr, "  %s: %s\n", key.c_str(), value.c_str());
}

int run(int argc, char** argv) {
  Options o = parse_options(argc, argv);
  std::vector<Shape> shapes = read_shapes(o.shape_files);
  std::FILE* csv = nullptr;
  if (!o.csv.empty()) {
    csv = std::fopen(o.csv.c_str(), "w");
    if (!csv) throw std::runtime_error("cannot write " + o.csv);
    std::fprintf(csv, "%s\n", kCsvHeader);
  }

  bnorm::set_num_threads(o.threads);
  meta(csv, "bnorm_version", bnorm::version());
  meta(csv, "bnorm_threads", std::to_string(bnorm::num_threads()));
  meta(csv, "threads_requested", std::to_string(o.threads));
  meta(csv, "compiler", std::string("g++ ") + __VERSION__);
  meta(csv, "quick", o.quick ? "yes" : "no");
  std::string modes;
  for (Mode m : o.run.modes) {
    if (!modes.empty()) modes += ",";
    modes += mode_name(m);
  }
  meta(csv, "modes", modes);
  std::string dtypes;
  for (Dtype d : o.dtypes) {
    if (!dtypes.empty()) dtypes += ",";
    dtypes += dtype_name(d);
  }
  meta(csv, "dtypes", dtypes);
  const size_t l3 = l3_cache_bytes();
  meta(csv, "l3_bytes", std::to_string(l3));
  meta(csv, "cold_budget_mib",
       std::to_string(static_cast<long long>(o.run.cold_budget_bytes / (1 << 20))));
  meta(csv, "loadavg_start", load_average());
  if (o.run_onednn) {
    if (onednn::available()) {
      meta(csv, "onednn_version", onednn::version());
      int t = onednn::max_threads();
      meta(csv, "onednn_threads", t > 0 ? std::to_string(t) : "unknown");
      if (t > 0 && t != o.threads)
        std::fprintf(stderr, "\n!!! oneDNN runs %d threads, not %d: set OMP_NUM_THREADS=%d\n\n", t,
                     o.threads, o.threads);
    } else {
      meta(csv, "onednn_version", "not found");
    }
  }

  if (o.run_copy) {
    std::fprintf(stderr, "copy (%d threads, 2 x %.0f MiB):\n", o.threads, o.copy_mib);
    run_copies(o, csv);
  }
  WorkerTeam team(o.threads);  // the unfused rows' ReLU passes
  for (const Shape& shape : shapes) {
    if (!o.run_bnorm && !(o.run_onednn && onednn::available())) break;
    Buffer scratch(static_cast<size_t>(shape.numel()));
    std::memset(scratch.data(), 0, scratch.size() * sizeof(float));
    // One problem per dtype (its inputs rounded to the dtype, its reference on those values),
    // one at a time.
    for (Dtype dtype : o.dtypes) {
      Options od = o;
      if (dtype != Dtype::kF32 && !o.half_ops.empty()) {
        od.run.ops.clear();
        for (Op op : o.run.ops)
          if (std::find(o.half_ops.begin(), o.half_ops.end(), op) != o.half_ops.end())
            od.run.ops.push_back(op);
        if (od.run.ops.empty()) continue;
      }
      std::fprintf(stderr, "%s %s: data and reference...\n", shape.text.c_str(), dtype_name(dtype));
      std::unique_ptr<Problem> p = make_problem(shape, od.run.ops, dtype);
      if (o.run_bnorm) {
        if (shape.rank() == 2) {
          run_bnorm(*p, bnorm::Layout::kChannelsFirst, "nc", od, scratch, team, csv);
        } else {
          run_bnorm(*p, bnorm::Layout::kChannelsFirst, "nchw", od, scratch, team, csv);
          run_bnorm(*p, bnorm::Layout::kChannelsLast, "nhwc", od, scratch, team, csv);
        }
      }
      if (o.run_onednn && onednn::available()) {
        for (Row& r : onednn::run(*p, od.run, scratch)) {
          print_row(r);
          write_row(csv, r);
        }
      }
    }
  }
  meta(csv, "loadavg_end", load_average());
  if (csv != nullptr) std::fclose(csv);
  return 0;
}

}  // namespace
}  // namespace bench

int main(int argc, char** argv) {
  try {
    return bench::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bnorm_bench: %s\n", e.what());
    return 1;
  }
}
