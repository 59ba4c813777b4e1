// libFuzzer target: the C API (bnorm_forward_train, bnorm_forward_eval, bnorm_backward) on small
// buffers with fuzzed shapes, layouts, null and aliased pointers, eps and momentum.
//
// The contract checked on every input: the call on the fast kernels and the same call on the
// reference kernels (BNORM_BACKEND=reference, read at each call) return the same status; on an
// error every buffer (outputs and state, all in one arena) is bit-for-bit unchanged; on success
// every output agrees with the reference within a tolerance derived per element from the
// kernels' documented error (variance relative error <= 2.2e-5, fp32 rounding of x - mean and
// of the final products), and num_batches_tracked exactly.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "bnorm/c_api.h"

namespace {

// Reads the input a byte at a time; zeros once exhausted.
struct Bytes {
  const uint8_t* p;
  size_t n;
  uint8_t u8() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
  int16_t i16() { return static_cast<int16_t>(u8() | (u8() << 8)); }
};

constexpr double kUlp = 1.0 / (1 << 23);  // fp32 epsilon
constexpr double kVarRel = 2.2e-5;        // the fast kernels' variance bound (docs/design.md)

[[noreturn]] void fail(const char* what, long i, double got, double want, double tol) {
  std::fprintf(stderr, "fuzz_c_api: %s[%ld] = %.9g, reference %.9g, tolerance %.3g\n", what, i, got,
               want, tol);
  std::abort();
}

void check_close(const char* what, long i, double got, double want, double tol) {
  if (std::isnan(want) || std::isnan(got)) {
    if (std::isnan(want) != std::isnan(got)) fail(what, i, got, want, tol);
    return;
  }
  if (std::isinf(want) || std::isinf(got)) {
    if (got != want) fail(what, i, got, want, tol);
    return;
  }
  if (!(std::fabs(got - want) <= tol)) fail(what, i, got, want, tol);
}

// Slots of the arena: each buffer is a range of it, or absent.
enum Slot { kX, kY, kW, kB, kRm, kRv, kSm, kSi, kDy, kDx, kDw, kDb, kSlots };

struct Case {
  int op = 0;  // 0 forward_train, 1 forward_eval, 2 backward
  bnorm_layout layout = BNORM_CHANNELS_FIRST;
  int64_t n = 0, c = 0, s = 0;
  double momentum = 0.1, eps = 1e-5;
  int training = 1;
  bool counter = true;
  int64_t nbt = 0;
  long offset[kSlots];  // -1: null
  std::vector<float> arena;
};

float* at(std::vector<float>& a, const Case& k, Slot s) {
  return k.offset[s] < 0 ? nullptr : a.data() + k.offset[s];
}

int run(const Case& k, std::vector<float>& a, int64_t* nbt) {
  int64_t* counter = k.counter ? nbt : nullptr;
  switch (k.op) {
    case 0:
      return bnorm_forward_train(k.layout, k.n, k.c, k.s, at(a, k, kX), at(a, k, kW), at(a, k, kB),
                                 at(a, k, kRm), at(a, k, kRv), counter, k.momentum, k.eps,
                                 at(a, k, kY), at(a, k, kSm), at(a, k, kSi));
    case 1:
      return bnorm_forward_eval(k.layout, k.n, k.c, k.s, at(a, k, kX), at(a, k, kW), at(a, k, kB),
                                at(a, k, kRm), at(a, k, kRv), k.eps, at(a, k, kY));
    default:
      return bnorm_backward(k.layout, k.n, k.c, k.s, at(a, k, kDy), at(a, k, kX), at(a, k, kW),
                            at(a, k, kSm), at(a, k, kSi), at(a, k, kRm), at(a, k, kRv), k.eps,
                            k.training, at(a, k, kDx), at(a, k, kDw), at(a, k, kDb));
  }
}

// Element (i, ch, j) of an (n, c, s) tensor in the layout.
long index_of(const Case& k, int64_t i, int64_t ch, int64_t j) {
  return static_cast<long>(k.layout == BNORM_CHANNELS_FIRST ? (i * k.c + ch) * k.s + j
                                                            : (i * k.s + j) * k.c + ch);
}

// Compares the outputs of a successful call with the reference's. `in` is the arena before.
void compare(const Case& k, const std::vector<float>& in, const std::vector<float>& got,
             const std::vector<float>& ref, int64_t nbt_got, int64_t nbt_ref) {
  if (nbt_got != nbt_ref) fail("num_batches_tracked", 0, double(nbt_got), double(nbt_ref), 0);
  const int64_t count = k.n * k.s;
  const auto value = [&](Slot s, long i, double absent) {
    return k.offset[s] < 0 ? absent : double(in[k.offset[s] + i]);
  };
  for (int64_t ch = 0; ch < k.c; ++ch) {
    // fp64 statistics of the input channel, for the tolerances only.
    double mean = 0, var = 0, xmax = 0;
    for (int64_t i = 0; i < k.n; ++i)
      for (int64_t j = 0; j < k.s; ++j) mean += in[k.offset[kX] + index_of(k, i, ch, j)];
    mean /= double(count);
    for (int64_t i = 0; i < k.n; ++i)
      for (int64_t j = 0; j < k.s; ++j) {
        const double x = in[k.offset[kX] + index_of(k, i, ch, j)];
        var += (x - mean) * (x - mean);
        xmax = std::fmax(xmax, std::fabs(x));
      }
    var /= double(count);
    const double w = std::fabs(value(kW, ch, 1.0)), b = std::fabs(value(kB, ch, 0.0));
    const auto out = [&](Slot s, long i) { return double(got[k.offset[s] + i]); };
    const auto want = [&](Slot s, long i) { return double(ref[k.offset[s] + i]); };
    if (k.op == 0) {
      const double invstd = 1.0 / std::sqrt(var + k.eps);
      // |x - mean| rounded in fp32 (4 ulp of the largest input) and the variance's bound.
      const double dx_err = 4 * kUlp * std::fmax(xmax, std::fabs(mean));
      for (int64_t i = 0; i < k.n; ++i)
        for (int64_t j = 0; j < k.s; ++j) {
          const long e = index_of(k, i, ch, j);
          const double xhat = std::fabs((in[k.offset[kX] + e] - mean) * invstd);
          const double tol = w * (invstd * dx_err + kVarRel * xhat) + 8 * kUlp * (w * xhat + b);
          check_close("y", e, out(kY, e), want(kY, e), tol);
        }
      if (k.offset[kSm] >= 0) check_close("save_mean", ch, out(kSm, ch), want(kSm, ch), dx_err);
      if (k.offset[kSi] >= 0) {
        check_close("save_invstd", ch, out(kSi, ch), want(kSi, ch), (kVarRel + 4 * kUlp) * invstd);
      }
      if (k.offset[kRm] >= 0) {
        const double rm = std::fabs(value(kRm, ch, 0)), rv = std::fabs(value(kRv, ch, 0));
        check_close("running_mean", ch, out(kRm, ch), want(kRm, ch),
                    dx_err + 4 * kUlp * (rm + std::fabs(mean)));
        const double unbiased = var * double(count) / double(count - 1);
        check_close("running_var", ch, out(kRv, ch), want(kRv, ch),
                    (kVarRel + 4 * kUlp) * (unbiased + rv) + 4 * dx_err * std::sqrt(unbiased));
      }
    } else if (k.op == 1) {
      const double a = w / std::sqrt(double(in[k.offset[kRv] + ch]) + k.eps);
      const double shift = b + std::fabs(double(in[k.offset[kRm] + ch])) * a;
      for (int64_t i = 0; i < k.n; ++i)
        for (int64_t j = 0; j < k.s; ++j) {
          const long e = index_of(k, i, ch, j);
          const double tol = 8 * kUlp * (a * std::fabs(in[k.offset[kX] + e]) + shift);
          check_close("y", e, out(kY, e), want(kY, e), tol);
        }
    } else {
      // The statistics the backward uses, as the reference computed them.
      const double m = k.training ? value(kSm, ch, 0) : value(kRm, ch, 0);
      const double invstd = k.training ? std::fabs(value(kSi, ch, 0))
                                       : 1.0 / std::sqrt(value(kRv, ch, 0) + k.eps);
      double sum_dy = 0, sum_dyxhat = 0, xhat_max = 0;
      for (int64_t i = 0; i < k.n; ++i)
        for (int64_t j = 0; j < k.s; ++j) {
          const long e = index_of(k, i, ch, j);
          const double xhat = std::fabs((in[k.offset[kX] + e] - m) * invstd);
          sum_dy += std::fabs(in[k.offset[kDy] + e]);
          sum_dyxhat += std::fabs(in[k.offset[kDy] + e]) * xhat;
          xhat_max = std::fmax(xhat_max, xhat);
        }
      const double dx_err = 4 * kUlp * std::fmax(xmax, std::fabs(m)) * invstd;  // on x-hat
      const double rel = 16 * kUlp;
      for (int64_t i = 0; i < k.n; ++i)
        for (int64_t j = 0; j < k.s; ++j) {
          const long e = index_of(k, i, ch, j);
          const double dy = std::fabs(in[k.offset[kDy] + e]);
          const double xhat = std::fabs((in[k.offset[kX] + e] - m) * invstd);
          double tol = rel * w * invstd * dy;
          if (k.training) {
            tol = w * invstd *
                  (rel * (dy + (sum_dy + (xhat + dx_err) * sum_dyxhat) / double(count)) +
                   (dx_err * sum_dyxhat + (xhat + dx_err) * dx_err * sum_dy) / double(count));
          }
          check_close("dx", e, out(kDx, e), want(kDx, e), tol);
        }
      const double tol_dw = rel * sum_dyxhat + dx_err * sum_dy;
      if (k.offset[kDw] >= 0) check_close("dweight", ch, out(kDw, ch), want(kDw, ch), tol_dw);
      if (k.offset[kDb] >= 0) check_close("dbias", ch, out(kDb, ch), want(kDb, ch), rel * sum_dy);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Bytes in{data, size};
  Case k;
  const uint8_t head = in.u8();
  k.op = head % 3;
  k.layout = (head & 4) ? BNORM_CHANNELS_LAST : BNORM_CHANNELS_FIRST;
  // (No invalid layout value: bnorm_layout's C++ range is {0, 1}, and passing 2 from C++ is
  // undefined behaviour before the library sees it.)
  const uint8_t dims = in.u8();
  k.n = dims & 7;
  k.c = 1 + ((dims >> 3) & 3);
  k.s = 1 + (dims >> 5);
  const uint8_t odd = in.u8();
  if ((odd & 0x0f) == 1) k.n = -static_cast<int64_t>(odd >> 4);
  if ((odd & 0x0f) == 2) k.c = odd >> 6;  // 0 channels possible
  if ((odd & 0x0f) == 3) k.s = 0;
  // (No n * c * s beyond the buffers, which could not hold it; sizes beyond 2^56 elements, e.g.
  // c = 2^62, are refused by the validation, bad_input_test.)
  const uint8_t e = in.u8();
  static const double kEps[] = {1e-5, 1e-3, 1.0, 1e-12, 0.0, -1e-5, NAN, INFINITY};
  k.eps = kEps[e & 7];
  static const double kMomentum[] = {0.1, 0.0, 1.0, 0.5, -1.0, 1.5, NAN, 0.01};
  k.momentum = kMomentum[(e >> 3) & 7];
  k.training = (e >> 6) & 1;
  k.counter = !((e >> 7) & 1);
  k.nbt = in.u8();

  // Which buffers are present, and how y / dx alias their inputs.
  const uint8_t present = in.u8();
  const uint8_t alias = in.u8();
  const int64_t numel = (k.n > 0 && k.c > 0 && k.c < 64 && k.s > 0) ? k.n * k.c * k.s : 0;
  const int64_t cv = (k.c > 0 && k.c < 64) ? k.c : 0;
  long next = 0;
  const auto place = [&](Slot s, int64_t len, bool on) {
    k.offset[s] = on ? next : -1;
    if (on) next += static_cast<long>(len) + 1;  // a gap: no accidental adjacency
  };
  place(kX, numel, !(present & 1) || (present & 0x80) == 0);
  place(kW, cv, present & 2);
  place(kB, cv, present & 4);
  const bool stats = !(present & 8);
  place(kRm, cv, stats);
  place(kRv, cv, stats && !((alias >> 4) & 1 && (alias >> 5) & 1));  // sometimes one of the two
  place(kSm, cv, (present & 16) || k.op == 2);
  place(kSi, cv, (present & 32) || k.op == 2);
  place(kDy, numel, k.op == 2);
  place(kY, numel, true);
  place(kDx, numel, true);
  place(kDw, cv, present & 64);
  place(kDb, cv, (present & 64) && !(alias & 64));
  // Aliasing: exact (allowed), partial (an error), or none.
  switch (alias & 3) {
    case 1:
      k.offset[kY] = k.offset[kX];
      k.offset[kDx] = k.op == 2 && (alias & 4) ? k.offset[kX] : k.offset[kDy];
      break;
    case 2:
      if (k.offset[kX] >= 0) k.offset[kY] = k.offset[kX] + 1;
      if (k.offset[kDy] >= 0) k.offset[kDx] = k.offset[kDy] + 1;
      break;
    default:
      break;
  }
  if ((alias & 0x88) == 0x88) k.offset[kY] = k.offset[kDx] = -1;  // a null output
  k.arena.assign(static_cast<size_t>(next + 2), 0.0f);
  // Values on a grid of 1/64 in [-512, 512): finite, with exact ties and constant channels.
  const uint8_t scale_byte = in.u8();
  const double scale = std::ldexp(1.0, (scale_byte & 15) - 8);
  for (float& v : k.arena) v = static_cast<float>(in.i16() / 64.0 * scale);
  // The variance and invstd must be > 0 where the API reads them as statistics.
  for (Slot s : {kRv, kSi}) {
    if (k.offset[s] >= 0) {
      for (int64_t ch = 0; ch < cv; ++ch) {
        float& v = k.arena[k.offset[s] + ch];
        v = std::fabs(v) + 0.25f;
      }
    }
  }
  if ((scale_byte >> 4) == 15 && !k.arena.empty()) k.arena[0] = NAN;  // NaN in the input

  std::vector<float> fast = k.arena, ref = k.arena;
  int64_t nbt_fast = k.nbt, nbt_ref = k.nbt;
  unsetenv("BNORM_BACKEND");
  const int rc_fast = run(k, fast, &nbt_fast);
  setenv("BNORM_BACKEND", "reference", 1);
  const int rc_ref = run(k, ref, &nbt_ref);
  unsetenv("BNORM_BACKEND");
  if (rc_fast != rc_ref) {
    std::fprintf(stderr, "fuzz_c_api: status %d, reference %d\n", rc_fast, rc_ref);
    std::abort();
  }
  if (rc_fast != BNORM_OK) {
    if (std::memcmp(fast.data(), k.arena.data(), fast.size() * sizeof(float)) != 0 ||
        nbt_fast != k.nbt || std::memcmp(ref.data(), k.arena.data(), ref.size() * sizeof(float)) != 0 ||
        nbt_ref != k.nbt) {
      std::fprintf(stderr, "fuzz_c_api: status %d but a buffer changed\n", rc_fast);
      std::abort();
    }
    return 0;
  }
  if (k.arena.size() > 0 && std::isnan(k.arena[0])) return 0;  // NaN propagates: not compared
  compare(k, k.arena, fast, ref, nbt_fast, nbt_ref);
  return 0;
}
