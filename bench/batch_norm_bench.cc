// The batch-norm benchmark: STREAM-like copy and non-temporal copy, bnorm and (when found at
// build time) oneDNN, in one run, on the shapes of bench/shapes/*.txt. Every implementation is
// validated against bnorm's reference (fp64 accumulation) before it is timed; a failure is
// printed loudly and written as status FAIL, never timed. Writes one CSV (bench_common.h has the
// columns); bench/report.py merges it with the PyTorch runner's CSV into the table.
//
//   bnorm_bench [--shapes FILE]... [--ops fwd_train,fwd_infer,bwd] [--impls copy,bnorm,onednn]
//               [--quick] [--threads 2] [--copy-mib 256] [--min-time S] [--min-reps N]
//               [--csv PATH]
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

namespace bench {
namespace {

// ---------------------------------------------------------------------------------------------
// Options.
struct Options {
  std::vector<std::string> shape_files;
  std::vector<Op> ops = {Op::kFwdTrain, Op::kFwdInfer, Op::kBwd};
  bool run_copy = true, run_bnorm = true, run_onednn = true;
  bool quick = false;
  int threads = 2;
  double copy_mib = 256;
  TimingOptions timing;
  std::string csv = "bench.csv";
};

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
               "usage: bnorm_bench [--shapes FILE]... [--ops fwd_train,fwd_infer,bwd]\n"
               "                   [--impls copy,bnorm,onednn] [--quick] [--threads N]\n"
               "                   [--copy-mib MIB] [--min-time SECONDS] [--min-reps N] [--csv PATH]\n",
               error.c_str());
  std::exit(2);
}

Options parse_options(int argc, char** argv) {
  Options o;
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
      o.ops.clear();
      for (const auto& name : split(value(), ',')) {
        if (name == "fwd_train") o.ops.push_back(Op::kFwdTrain);
        else if (name == "fwd_infer") o.ops.push_back(Op::kFwdInfer);
        else if (name == "bwd") o.ops.push_back(Op::kBwd);
        else usage("unknown op '" + name + "' (expected fwd_train, fwd_infer, bwd)");
      }
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
    o.timing.warmup = 1;
    o.timing.min_reps = 5;
    o.timing.min_seconds = 0.05;
    o.copy_mib = 128;
  }
  if (min_time >= 0) o.timing.min_seconds = min_time;
  if (min_reps >= 1) o.timing.min_reps = min_reps;
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
  Buffer a(count), b(count);
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
  // First touch by the thread that will copy the part.
  run_parallel([&](size_t begin, size_t len) {
    for (size_t i = begin; i < begin + len; ++i) {
      a[i] = static_cast<float>(i % 1000);
      b[i] = 0;
    }
  });
  for (bool nt : {false, true}) {
    std::string kernel;
    CopyFn fn = pick_copy(nt, &kernel);
    Row r;
    r.impl = nt ? "copy_nt" : "copy";
    r.shape = std::to_string(static_cast<long long>(o.copy_mib)) + "MiBx2";
    r.layout = "-";
    r.op = "copy";
    r.bytes = 2.0 * count * sizeof(float);  // read a + write b, STREAM's count
    if (!fn) {
      r.status = "skip";
      r.note = "no non-temporal store on this architecture";
    } else {
      TimingOptions t = o.timing;
      t.min_reps = std::max(t.min_reps, 10);
      Timing tm = time_calls(
          [&] {
            run_parallel([&](size_t begin, size_t len) { fn(a.data() + begin, b.data() + begin, len); });
            return true;
          },
          t);
      bool same = b[count - 1] == a[count - 1] && b[count / 2] == a[count / 2];
      r.status = same ? "ok" : "FAIL";
      r.median_ms = tm.median_ms;
      r.min_ms = tm.min_ms;
      r.reps = tm.reps;
      r.note = kernel + ", " + std::to_string(threads) + " pinned threads";
    }
    print_row(r);
    write_row(csv, r);
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

std::unique_ptr<Problem> make_problem(const Shape& shape, const std::vector<Op>& ops) {
  auto p = std::make_unique<Problem>();
  p->shape = shape;
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
        x[j] = offset[c] + rng.normalish();
        dy[j] = rng.normalish();
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
// bnorm through its public API, Backend::kAuto.
void run_bnorm(const Problem& p, bnorm::Layout layout, const std::string& layout_name,
               const Options& o, Buffer& scratch, std::FILE* csv) {
  const Shape& shape = p.shape;
  const int64_t N = shape.n(), C = shape.c(), S = shape.spatial();
  const size_t count = static_cast<size_t>(shape.numel());
  const bool last = layout == bnorm::Layout::kChannelsLast && S > 1;
  const Tolerances tol = tolerances(p);
  const std::string who = "bnorm " + shape.text + " " + layout_name;

  // Inputs in the layout (first-touched here), outputs first-touched with zeros.
  Buffer x(count), y(count);
  if (last) to_channels_last(p.x.data(), x.data(), N, C, S);
  else std::memcpy(x.data(), p.x.data(), count * sizeof(float));
  std::memset(y.data(), 0, count * sizeof(float));
  // In channels-first order, for comparing with the reference.
  auto first_order = [&](const Buffer& b) -> const float* {
    if (!last) return b.data();
    to_channels_first(b.data(), scratch.data(), N, C, S);
    return scratch.data();
  };
  bnorm::ConstTensorView xv(x.data(), shape.dims, layout);
  bnorm::TensorView yv(y.data(), shape.dims, layout);

  for (Op op : o.ops) {
    Row r;
    r.impl = "bnorm";
    r.shape = shape.text;
    r.layout = layout_name;
    r.op = op_name(op);
    r.bytes = min_traffic_bytes(op, shape);
    std::function<bool()> call;
    double err = 0;
    // Per-op state kept alive for the timed calls.
    std::vector<float> rm, rv, mean(C), invstd(C), dweight(C), dbias(C);
    int64_t tracked = 0;
    Buffer dy, dx;
    bnorm::ForwardTrainArgs ft;
    bnorm::ForwardEvalArgs fe;
    bnorm::BackwardArgs bw;
    try {
      if (op == Op::kFwdTrain) {
        rm.assign(C, 0.0f);
        rv.assign(C, 1.0f);
        ft.x = xv;
        ft.weight = p.weight;
        ft.bias = p.bias;
        ft.running_mean = rm;
        ft.running_var = rv;
        ft.num_batches_tracked = &tracked;
        ft.momentum = p.momentum;
        ft.eps = p.eps;
        ft.y = yv;
        ft.save_mean = mean;
        ft.save_invstd = invstd;
        check(bnorm::forward_train(ft), "forward_train");
        err = compare("y", who + " fwd_train", first_order(y), p.y_train.data(), count, tol.y_train);
        err = std::max(err, compare("save_mean", who + " fwd_train", mean.data(), p.save_mean.data(), C, tol.mean));
        err = std::max(err, compare("save_invstd", who + " fwd_train", invstd.data(), p.save_invstd.data(), C, tol.invstd));
        err = std::max(err, compare("running_mean", who + " fwd_train", rm.data(), p.running_mean.data(), C, tol.running_mean));
        err = std::max(err, compare("running_var", who + " fwd_train", rv.data(), p.running_var.data(), C, tol.running_var));
        call = [&] { return bnorm::forward_train(ft).ok(); };
      } else if (op == Op::kFwdInfer) {
        fe.x = xv;
        fe.weight = p.weight;
        fe.bias = p.bias;
        fe.running_mean = p.eval_mean;
        fe.running_var = p.eval_var;
        fe.eps = p.eps;
        fe.y = yv;
        check(bnorm::forward_eval(fe), "forward_eval");
        err = compare("y", who + " fwd_infer", first_order(y), p.y_eval.data(), count, tol.y_eval);
        call = [&] { return bnorm::forward_eval(fe).ok(); };
      } else {
        dy = Buffer(count);
        dx = Buffer(count);
        if (last) to_channels_last(p.dy.data(), dy.data(), N, C, S);
        else std::memcpy(dy.data(), p.dy.data(), count * sizeof(float));
        std::memset(dx.data(), 0, count * sizeof(float));
        // The reference's batch statistics, so that backward is judged on its own.
        bw.dy = bnorm::ConstTensorView(dy.data(), shape.dims, layout);
        bw.x = xv;
        bw.weight = p.weight;
        bw.training = true;
        bw.save_mean = p.save_mean;
        bw.save_invstd = p.save_invstd;
        bw.dx = bnorm::TensorView(dx.data(), shape.dims, layout);
        bw.dweight = dweight;
        bw.dbias = dbias;
        check(bnorm::backward(bw), "backward");
        err = compare("dx", who + " bwd", first_order(dx), p.dx.data(), count, tol.dx);
        err = std::max(err, compare("dweight", who + " bwd", dweight.data(), p.dweight.data(), C, tol.dweight));
        err = std::max(err, compare("dbias", who + " bwd", dbias.data(), p.dbias.data(), C, tol.dbias));
        call = [&] { return bnorm::backward(bw).ok(); };
      }
      r.err_ratio = err;
      if (!(err <= 1.0)) {
        r.status = "FAIL";
        r.note = "validation failed (see the log); not timed";
      } else {
        Timing t = time_calls(call, o.timing);
        r.status = t.ok ? "ok" : "error";
        r.median_ms = t.median_ms;
        r.min_ms = t.min_ms;
        r.reps = t.reps;
        r.note = "threads=" + std::to_string(bnorm::num_threads());
      }
    } catch (const std::exception& e) {
      r.status = "error";
      r.note = e.what();
      std::fprintf(stderr, "\n!!! %s %s: %s\n\n", who.c_str(), op_name(op), e.what());
    }
    print_row(r);
    write_row(csv, r);
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
  std::FILE* csv = std::fopen(o.csv.c_str(), "w");
  if (!csv) throw std::runtime_error("cannot write " + o.csv);
  std::fprintf(csv, "%s\n", kCsvHeader);

  bnorm::set_num_threads(o.threads);
  meta(csv, "bnorm_version", bnorm::version());
  meta(csv, "bnorm_threads", std::to_string(bnorm::num_threads()));
  meta(csv, "threads_requested", std::to_string(o.threads));
  meta(csv, "compiler", std::string("g++ ") + __VERSION__);
  meta(csv, "quick", o.quick ? "yes" : "no");
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
  for (const Shape& shape : shapes) {
    if (!o.run_bnorm && !(o.run_onednn && onednn::available())) break;
    std::fprintf(stderr, "%s: data and reference...\n", shape.text.c_str());
    std::unique_ptr<Problem> p = make_problem(shape, o.ops);
    Buffer scratch(static_cast<size_t>(shape.numel()));
    std::memset(scratch.data(), 0, scratch.size() * sizeof(float));
    if (o.run_bnorm) {
      if (shape.rank() == 2) {
        run_bnorm(*p, bnorm::Layout::kChannelsFirst, "nc", o, scratch, csv);
      } else {
        run_bnorm(*p, bnorm::Layout::kChannelsFirst, "nchw", o, scratch, csv);
        run_bnorm(*p, bnorm::Layout::kChannelsLast, "nhwc", o, scratch, csv);
      }
    }
    if (o.run_onednn && onednn::available()) {
      for (Row& r : onednn::run(*p, o.ops, o.timing, scratch)) {
        print_row(r);
        write_row(csv, r);
      }
    }
  }
  meta(csv, "loadavg_end", load_average());
  std::fclose(csv);
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
