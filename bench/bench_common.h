// Shared pieces of the batch-norm benchmark: aligned buffers, shapes, the timing loop, the
// reference results every implementation is validated against, tolerances and CSV rows.
// Header-only, used by batch_norm_bench.cc and peers/onednn_runner.cc.
#ifndef BNORM_BENCH_BENCH_COMMON_H_
#define BNORM_BENCH_BENCH_COMMON_H_

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <vector>

#include <unistd.h>

#include "bnorm/tensor.h"

namespace bench {

// ---------------------------------------------------------------------------------------------
// 64-byte aligned fp32 buffer. Not zeroed: the owner first-touches it with real data.
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t count) : count_(count) {
    size_t bytes = std::max<size_t>(64, (count * sizeof(float) + 63) / 64 * 64);
    data_.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    if (!data_) throw std::bad_alloc();
  }
  float* data() const { return data_.get(); }
  size_t size() const { return count_; }
  float& operator[](size_t i) const { return data_.get()[i]; }
  // A buffer that holds count elements of `bytes_per_element` (2 or 4) bytes.
  static Buffer of_elements(size_t count, size_t bytes_per_element) {
    return Buffer((count * bytes_per_element + sizeof(float) - 1) / sizeof(float));
  }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> data_;
  size_t count_ = 0;
};

// ---------------------------------------------------------------------------------------------
// A shape in PyTorch's logical order (N, C, spatial...), as written in bench/shapes/*.txt.
struct Shape {
  std::vector<int64_t> dims;
  std::string text;  // "32x64x112x112"
  int64_t n() const { return dims[0]; }
  int64_t c() const { return dims[1]; }
  int64_t spatial() const {
    int64_t s = 1;
    for (size_t i = 2; i < dims.size(); ++i) s *= dims[i];
    return s;
  }
  int64_t numel() const { return n() * c() * spatial(); }
  int64_t reduction() const { return n() * spatial(); }  // elements per channel
  int rank() const { return static_cast<int>(dims.size()); }
};

// The ops, as named in the CSV and the table. The fused ones are bnorm's forward_train_relu /
// forward_eval_relu (y = relu(bn(x)), and relu(bn(x) + z) for the add) and backward_relu (the
// ReLU's mask from the forward's output y, then batch norm's backward).
enum class Op { kFwdTrain, kFwdInfer, kBwd, kFwdTrainRelu, kFwdInferRelu, kBwdRelu, kFwdTrainAddRelu };
inline constexpr Op kAllOps[] = {Op::kFwdTrain,     Op::kFwdInfer,      Op::kBwd,
                                 Op::kFwdTrainRelu, Op::kFwdInferRelu,  Op::kBwdRelu,
                                 Op::kFwdTrainAddRelu};
inline const char* op_name(Op op) {
  switch (op) {
    case Op::kFwdTrain: return "fwd_train";
    case Op::kFwdInfer: return "fwd_infer";
    case Op::kBwd: return "bwd";
    case Op::kFwdTrainRelu: return "fwd_train_relu";
    case Op::kFwdInferRelu: return "fwd_infer_relu";
    case Op::kBwdRelu: return "bwd_relu";
    case Op::kFwdTrainAddRelu: return "fwd_train_add_relu";
  }
  return "?";
}
inline bool fused(Op op) { return op != Op::kFwdTrain && op != Op::kFwdInfer && op != Op::kBwd; }
inline bool training_forward(Op op) {
  return op == Op::kFwdTrain || op == Op::kFwdTrainRelu || op == Op::kFwdTrainAddRelu;
}
inline bool inference(Op op) { return op == Op::kFwdInfer || op == Op::kFwdInferRelu; }
inline bool backward(Op op) { return op == Op::kBwd || op == Op::kBwdRelu; }
// Tensors read and written by one call at the minimum: x and y; + z for the add; backward reads
// x and dy and writes dx, + y (the mask) for the fused one.
inline int min_tensors(Op op) {
  switch (op) {
    case Op::kBwdRelu: return 4;
    case Op::kBwd:
    case Op::kFwdTrainAddRelu: return 3;
    default: return 2;
  }
}

// ---------------------------------------------------------------------------------------------
// Element types of the tensors (x, y, dy, dx, z): f32, and the 16-bit bf16 and f16 (bnorm's
// DType::kBFloat16 / kFloat16 views; the per-channel vectors stay fp32 in every case).
enum class Dtype { kF32, kBF16, kF16 };
inline constexpr Dtype kAllDtypes[] = {Dtype::kF32, Dtype::kBF16, Dtype::kF16};
inline const char* dtype_name(Dtype d) {  // as in --dtypes and the CSV's dtype column
  return d == Dtype::kF32 ? "f32" : d == Dtype::kBF16 ? "bf16" : "f16";
}
inline size_t dtype_bytes(Dtype d) { return d == Dtype::kF32 ? 4 : 2; }
inline bnorm::DType bnorm_dtype(Dtype d) {
  return d == Dtype::kF32 ? bnorm::DType::kFloat32
         : d == Dtype::kBF16 ? bnorm::DType::kBFloat16 : bnorm::DType::kFloat16;
}
// The unit roundoff of the format (half the distance from 1 to the next number: 2^-p for p
// significand bits): 2^-8 for bf16, 2^-11 for fp16; 0 for f32, whose tolerances are the fp32
// ones below (an fp32 result is not rounded a second time).
inline double unit_roundoff(Dtype d) {
  return d == Dtype::kBF16 ? 0x1.0p-8 : d == Dtype::kF16 ? 0x1.0p-11 : 0.0;
}
// The absolute rounding error at the bottom of the range: half fp16's smallest subnormal
// (2^-24); bf16 has fp32's exponent range (its subnormals are far below the data here).
inline double underflow_step(Dtype d) { return d == Dtype::kF16 ? 0x1.0p-25 : 0.0; }

// One element rounded to the format and widened back (exact for f32). Round to nearest even:
// bnorm's to_bfloat16 / to_float16, which are what oneDNN's and PyTorch's conversions do.
inline float quantize(float v, Dtype d) {
  if (d == Dtype::kBF16) return bnorm::to_float(bnorm::to_bfloat16(v));
  if (d == Dtype::kF16) return bnorm::to_float(bnorm::to_float16(v));
  return v;
}
// n fp32 values narrowed into dst (elements of d), and widened back.
inline void narrow(const float* src, void* dst, size_t n, Dtype d) {
  if (d == Dtype::kF32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (d == Dtype::kBF16) {
    auto* out = static_cast<bnorm::bfloat16*>(dst);
    for (size_t i = 0; i < n; ++i) out[i] = bnorm::to_bfloat16(src[i]);
  } else {
    auto* out = static_cast<bnorm::float16*>(dst);
    for (size_t i = 0; i < n; ++i) out[i] = bnorm::to_float16(src[i]);
  }
}
inline void widen(const void* src, float* dst, size_t n, Dtype d) {
  if (d == Dtype::kF32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (d == Dtype::kBF16) {
    const auto* in = static_cast<const bnorm::bfloat16*>(src);
    for (size_t i = 0; i < n; ++i) dst[i] = bnorm::to_float(in[i]);
  } else {
    const auto* in = static_cast<const bnorm::float16*>(src);
    for (size_t i = 0; i < n; ++i) dst[i] = bnorm::to_float(in[i]);
  }
}

inline double min_traffic_bytes(Op op, const Shape& s, Dtype d = Dtype::kF32) {
  return min_tensors(op) * static_cast<double>(s.numel()) * static_cast<double>(dtype_bytes(d));
}

// ---------------------------------------------------------------------------------------------
// Cache modes. warm: every timed call runs on the same buffers (repeated calls: what fits in
// the caches stays there). cold: each call gets the next of K buffer sets (inputs and outputs),
// K large enough that the K sets exceed twice the last-level cache, so every call reads data
// that was evicted since its last use, as in a network where each layer sees new tensors.
enum class Mode { kWarm, kCold };
inline const char* mode_name(Mode m) { return m == Mode::kWarm ? "warm" : "cold"; }

// The last-level (L3) cache in bytes, read at run time; 0 when the system does not say.
inline size_t l3_cache_bytes() {
#ifdef _SC_LEVEL3_CACHE_SIZE
  long v = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (v > 0) return static_cast<size_t>(v);
#endif
  for (int index = 3; index >= 2; --index) {  // sysfs: index3 is the L3 on x86
    std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::FILE* f = std::fopen((dir + "level").c_str(), "r");
    if (!f) continue;
    int level = 0;
    bool read = std::fscanf(f, "%d", &level) == 1;
    std::fclose(f);
    if (!read || level != 3) continue;
    f = std::fopen((dir + "size").c_str(), "r");
    if (!f) continue;
    unsigned long long size = 0;
    char unit = 0;
    int got = std::fscanf(f, "%llu%c", &size, &unit);
    std::fclose(f);
    if (got >= 1) return static_cast<size_t>(size) * (unit == 'K' ? 1024 : unit == 'M' ? 1 << 20 : 1);
  }
  return 0;
}

// How many buffer sets of set_bytes one measurement rotates through: 1 when warm; when cold,
// enough to exceed 2 x the L3 (256 MiB assumed when unknown), at least 2, and at most what
// budget_bytes holds (then the note says the rotation is short of 2 x L3).
struct Rotation {
  int sets = 1;
  std::string note;  // for the row: "cold: 3 sets x 411 MiB = 1233 MiB (L3 508 MiB)"
};
inline Rotation rotation(Mode mode, double set_bytes, double budget_bytes) {
  Rotation r;
  if (mode == Mode::kWarm) return r;
  const size_t l3 = l3_cache_bytes();
  const double target = 2.0 * (l3 ? static_cast<double>(l3) : 256.0 * (1 << 20));
  double sets = std::max(2.0, std::ceil(target / set_bytes));
  bool short_of_target = false;
  if (sets * set_bytes > budget_bytes) {
    sets = std::max(2.0, std::floor(budget_bytes / set_bytes));
    short_of_target = sets * set_bytes < target;
  }
  r.sets = static_cast<int>(sets);
  const double mib = 1 << 20;
  char text[160];
  std::snprintf(text, sizeof text, "cold: %d sets x %.1f MiB = %.0f MiB (L3 %s%.0f MiB)%s",
                r.sets, set_bytes / mib, sets * set_bytes / mib, l3 ? "" : "unknown, assumed ",
                (l3 ? static_cast<double>(l3) : 256.0 * mib) / mib,
                short_of_target ? ", below 2 x L3: --cold-mib too small" : "");
  r.note = text;
  return r;
}

// ---------------------------------------------------------------------------------------------
// Timing: `warmup` untimed calls, then every call timed on its own until at least `min_reps`
// calls and `min_seconds` of calls (capped at `max_reps`; a warm-up call slower than 0.25 s
// ends the warm-up and lowers min_reps to 3). Median and min of the calls.
struct TimingOptions {
  int warmup = 3;
  int min_reps = 10;
  double min_seconds = 0.3;
  int max_reps = 100000;
};
// What each runner measures: the ops, the cache modes, the timing rule, and the memory the
// cold mode's buffer sets may take (per measurement).
struct RunOptions {
  std::vector<Op> ops;
  std::vector<Mode> modes = {Mode::kWarm};
  TimingOptions timing;
  double cold_budget_bytes = 1536.0 * (1 << 20);
};

struct Timing {
  bool ok = false;  // false: a call failed while timed
  double median_ms = 0, min_ms = 0;
  int reps = 0;
};

template <class F>  // F: () -> bool (true: the call succeeded)
Timing time_calls(F&& call, const TimingOptions& options) {
  using Clock = std::chrono::steady_clock;
  Timing t;
  // A slow call (> kSlowMs, e.g. a peer's generic kernel on a large tensor) gets one warm-up
  // and kSlowReps timed calls instead of the full count, so that it cannot take minutes.
  constexpr double kSlowMs = 250;
  constexpr int kSlowReps = 3;
  int min_reps = options.min_reps;
  for (int i = 0; i < options.warmup; ++i) {
    auto t0 = Clock::now();
    if (!call()) return t;
    if (std::chrono::duration<double, std::milli>(Clock::now() - t0).count() > kSlowMs) {
      min_reps = std::min(min_reps, kSlowReps);
      break;
    }
  }
  std::vector<double> ms;
  double total = 0, fastest = std::numeric_limits<double>::infinity();
  // Enough calls: min_reps, and min_seconds of calls counted at the fastest call's time, so that
  // one call preempted for 100 ms on a busy machine does not end the measurement early; at most
  // 10 x min_seconds in all.
  auto enough = [&] {
    const double n = static_cast<double>(ms.size());
    if (n >= options.max_reps) return true;
    if (n < min_reps) return false;
    return n * fastest >= options.min_seconds * 1e3 || total >= 10 * options.min_seconds * 1e3;
  };
  while (!enough()) {
    auto t0 = Clock::now();
    bool ok = call();
    auto t1 = Clock::now();
    if (!ok) return t;
    double d = std::chrono::duration<double, std::milli>(t1 - t0).count();
    ms.push_back(d);
    total += d;
    fastest = std::min(fastest, d);
  }
  std::sort(ms.begin(), ms.end());
  size_t k = ms.size();
  t.median_ms = k % 2 ? ms[k / 2] : 0.5 * (ms[k / 2 - 1] + ms[k / 2]);
  t.min_ms = ms.front();
  t.reps = static_cast<int>(k);
  t.ok = true;
  return t;
}

// ---------------------------------------------------------------------------------------------
// Data of one shape in channels-first order, and the reference (fp64-accumulating) results.
// For a 16-bit dtype the inputs (x, dy, z, and bwd_relu's y) are drawn in fp32 and rounded to
// the format, so that they are exactly representable and every implementation, the reference
// included, computes on the same values; the references are computed in fp64 on those values and
// kept in fp32, and the outputs, rounded to the format by the implementations, are compared
// with a tolerance that adds that rounding (tolerances()).
struct Problem {
  Shape shape;
  Dtype dtype = Dtype::kF32;
  double eps = 1e-5;
  double momentum = 0.1;
  Buffer x, dy;                                // channels-first (nchw / nc)
  std::vector<float> weight, bias;             // C
  std::vector<float> eval_mean, eval_var;      // C, the running statistics used in inference
  // Reference outputs (Backend::kReference), channels-first.
  Buffer y_train, y_eval, dx;
  std::vector<float> save_mean, save_invstd;   // batch statistics
  std::vector<float> running_mean, running_var;  // after one training call from (0, 1)
  std::vector<float> dweight, dbias;
  // The fused ops' references (allocated for the ops asked for): z the added tensor,
  // y_train_relu = relu(y_train), y_eval_relu = relu(y_eval), y_train_add_relu =
  // relu(bn(x) + z), and the backward of relu(bn(x)) from dy and y_train_relu.
  Buffer z, y_train_relu, y_eval_relu, y_train_add_relu, dx_relu;
  // bwd_relu's input y for a 16-bit dtype: y_train_relu rounded to the format (the reference
  // backward is computed from it: a value that underflows to 0 in fp16 changes the mask).
  Buffer y_relu_in16;
  const Buffer& relu_input() const { return y_relu_in16.size() ? y_relu_in16 : y_train_relu; }
  std::vector<float> dweight_relu, dbias_relu;
  // Magnitudes the tolerances are derived from.
  double max_abs_x = 0, max_abs_z = 0, max_abs_dy = 0, max_abs_xhat = 0, max_invstd = 0, max_abs_weight = 0;
};

// The reference's backward_relu of p (bnorm's reference backend) from dy and a channels-first
// y, whose mask y > 0 it applies, with p's batch statistics: dx (numel floats), dweight, dbias.
// Defined in batch_norm_bench.cc; throws on failure.
void reference_backward_relu(const Problem& p, const float* y, float* dx,
                             std::span<float> dweight, std::span<float> dbias);

// Tolerances, derived rather than guessed. An fp32 implementation accumulates a sum of n terms
// with an error that grows like eps * sqrt(n) * (size of the terms) for the random-sign data
// used here (the usual probabilistic form of the recursive-summation bound); the factor 4 and
// the + 8 leave room for the few roundings of the elementwise steps.
inline constexpr double kEps32 = 1.1920928955078125e-07;  // 2^-23
inline double growth(double n) { return 4.0 * kEps32 * (std::sqrt(n) + 8.0); }
// An elementwise output whose inputs went through a reduction of length n; `scale` is the size
// of the terms that combine into it.
inline double elementwise_tol(double n, double scale) { return growth(n) * scale; }
// A per-channel sum of n terms each at most `term` in magnitude.
inline double sum_tol(double n, double term) { return growth(n) * std::sqrt(n) * term; }

// Compares got against want (same order), tolerance tol. Returns max |got - want| / tol
// (infinity for NaN/Inf), prints the first worst element when it exceeds 1.
inline double compare(const char* what, const std::string& who, const float* got,
                      const float* want, size_t count, double tol) {
  double worst = 0;
  size_t worst_i = 0;
  for (size_t i = 0; i < count; ++i) {
    double d = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (!std::isfinite(got[i])) d = std::numeric_limits<double>::infinity();
    if (!(d <= worst)) {
      worst = d;
      worst_i = i;
      if (std::isinf(d)) break;
    }
  }
  double ratio = worst / tol;
  if (!(ratio <= 1.0)) {
    std::fprintf(stderr,
                 "\n!!! VALIDATION FAILED: %s: %s differs from the reference: index %zu got %.9g "
                 "want %.9g, |diff| %.3g > tolerance %.3g (%.3gx)\n\n",
                 who.c_str(), what, worst_i, static_cast<double>(got[worst_i]),
                 static_cast<double>(want[worst_i]), worst, tol, ratio);
  }
  return ratio;
}

inline double max_abs(const float* p, size_t count) {
  double m = 0;
  for (size_t i = 0; i < count; ++i) m = std::max(m, std::fabs(static_cast<double>(p[i])));
  return m;
}

// Tolerances per output, from the problem's magnitudes. For a 16-bit dtype, each tensor output
// (y, dx) is rounded once to the format at the end: kRoundings x u x its largest magnitude is
// added to the fp32 tolerance (u the format's unit roundoff; kRoundings = 2 leaves room for one
// more rounding, e.g. of an intermediate, and fp16 adds its underflow step). The per-channel
// outputs (statistics, dweight, dbias) are fp32 from exactly widened inputs: fp32 tolerances.
inline constexpr double kRoundings = 2.0;
inline double rounding_tol(Dtype d, double max_out) {
  return kRoundings * (unit_roundoff(d) * max_out + underflow_step(d));
}
struct Tolerances {
  double y_train, y_train_add, y_eval, mean, invstd, var, running_mean, running_var, dx, dx_relu,
      dweight, dbias;
};
inline Tolerances tolerances(const Problem& p) {
  double n = static_cast<double>(p.shape.reduction());
  Tolerances t;
  // y = w (x - m) invstd + b: the mean's error scaled by w invstd, invstd's relative error by y.
  t.y_train = elementwise_tol(n, p.max_abs_weight * p.max_invstd * p.max_abs_x +
                                     max_abs(p.y_train.data(), p.y_train.size()) + 1.0);
  // relu is 1-Lipschitz: the tolerances of bn(x) hold for relu(bn(x)); the add is one more
  // rounding of terms up to max|z|.
  t.y_train_add = t.y_train + elementwise_tol(1, p.max_abs_z + max_abs(p.y_train.data(), p.y_train.size()));
  t.y_eval = elementwise_tol(1, max_abs(p.y_eval.data(), p.y_eval.size()) + 1.0) *
             (1.0 + p.max_abs_x);
  t.mean = elementwise_tol(n, p.max_abs_x);
  t.invstd = elementwise_tol(n, p.max_invstd * (1.0 + p.max_abs_x * p.max_invstd));
  double max_var = 0;
  for (float v : p.save_invstd) max_var = std::max(max_var, 1.0 / (double(v) * v));
  t.var = elementwise_tol(n, max_var * (1.0 + p.max_abs_x * p.max_invstd));
  t.running_mean = elementwise_tol(n, p.max_abs_x);
  t.running_var = elementwise_tol(n, max_var * (1.0 + p.max_abs_x * p.max_invstd));
  double term = p.max_abs_dy * (1.0 + p.max_abs_xhat);
  t.dx = elementwise_tol(n, p.max_abs_weight * p.max_invstd * term +
                                max_abs(p.dx.data(), p.dx.size()));
  // The fused backward sums g = dy * (y > 0), |g| <= |dy|: the same terms, bounded alike.
  t.dx_relu = elementwise_tol(n, p.max_abs_weight * p.max_invstd * term +
                                     max_abs(p.dx_relu.data(), p.dx_relu.size()));
  t.dweight = sum_tol(n, term);
  t.dbias = sum_tol(n, p.max_abs_dy);
  if (p.dtype != Dtype::kF32) {
    const Dtype d = p.dtype;
    const double max_y = max_abs(p.y_train.data(), p.y_train.size());
    t.y_train += rounding_tol(d, max_y);
    t.y_train_add += rounding_tol(d, max_y + p.max_abs_z);
    t.y_eval += rounding_tol(d, std::max(max_abs(p.y_eval.data(), p.y_eval.size()),
                                         max_abs(p.y_eval_relu.data(), p.y_eval_relu.size())));
    if (p.dx.size()) t.dx += rounding_tol(d, max_abs(p.dx.data(), p.dx.size()));
    if (p.dx_relu.size()) t.dx_relu += rounding_tol(d, max_abs(p.dx_relu.data(), p.dx_relu.size()));
  }
  return t;
}

// ---------------------------------------------------------------------------------------------
// CSV rows, one format for every runner (the PyTorch runner writes the same columns):
//   impl,shape,layout,op,mode,status,median_ms,min_ms,reps,bytes,err_ratio,note,dtype
// mode: warm | cold (see Mode). status: ok | FAIL (validation failed, not timed) | error (the
// call failed) | skip (not available; the note says why: "unsupported by oneDNN 2.6: ..." when
// the peer refuses the dtype). dtype: f32 | bf16 | f16, the element type of the tensors (last,
// so that a reader of the older columns by position still reads them; a CSV without it is f32).
// impl "meta" rows carry key (layout column) = value (note column).
inline const char* kCsvHeader =
    "impl,shape,layout,op,mode,status,median_ms,min_ms,reps,bytes,err_ratio,note,dtype";

struct Row {
  std::string impl, shape, layout, op, mode = "-", status;
  double median_ms = 0, min_ms = 0;
  int reps = 0;
  double bytes = 0, err_ratio = 0;
  std::string note;
  std::string dtype = "f32";
};

inline std::string csv_escape(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string out = "\"";
  for (char ch : s) {
    if (ch == '"') out += '"';
    out += ch;
  }
  return out + "\"";
}

inline void write_row(std::FILE* f, const Row& r) {  // f null: no CSV
  if (f == nullptr) return;
  std::fprintf(f, "%s,%s,%s,%s,%s,%s,%.6f,%.6f,%d,%.0f,%.4g,%s,%s\n", csv_escape(r.impl).c_str(),
               r.shape.c_str(), r.layout.c_str(), r.op.c_str(), r.mode.c_str(), r.status.c_str(), r.median_ms,
               r.min_ms, r.reps, r.bytes, r.err_ratio, csv_escape(r.note).c_str(), r.dtype.c_str());
  std::fflush(f);
}

// Prints a one-line progress report of a row on stderr.
inline void print_row(const Row& r) {
  if (r.status == "ok") {
    double gbs = r.bytes / (r.median_ms * 1e-3) / 1e9;
    std::fprintf(stderr, "  %-13s %-15s %-10s %-18s %-4s %-4s median %9.4f ms  min %9.4f ms  %6.1f GB/s  (%d reps, err %.2g of tol) %s\n",
                 r.impl.c_str(), r.shape.c_str(), r.layout.c_str(), r.op.c_str(), r.mode.c_str(), r.dtype.c_str(), r.median_ms,
                 r.min_ms, gbs, r.reps, r.err_ratio, r.note.c_str());
  } else {
    std::fprintf(stderr, "  %-13s %-15s %-10s %-18s %-4s %-4s %s %s\n", r.impl.c_str(), r.shape.c_str(),
                 r.layout.c_str(), r.op.c_str(), r.mode.c_str(), r.dtype.c_str(), r.status.c_str(), r.note.c_str());
  }
}

}  // namespace bench

#endif  // BNORM_BENCH_BENCH_COMMON_H_
