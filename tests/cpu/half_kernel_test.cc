// The native bf16 and fp16 passes of the CPU kernels against the staged path, bit for bit: the
// 16-bit inputs widened to fp32, the fp32 passes (cpu::forward_train, forward_eval, backward) on
// the copies as batch_norm.cc runs them (in place: y over x's copy, dx over dy's, or with the
// ReLU dx over x's and dz over dy's), and the outputs rounded with bnorm::to_bfloat16 /
// to_float16. Every output (y, dx, dz, and the fp32 save_mean, save_invstd, running statistics,
// dweight, dbias) on every compiled Highway target, for 1, 2, 3 and 8 threads. Plus the SIMD
// rounding against the scalar one over many bit patterns.
#include <hwy/highway.h>
#include <hwy/tests/hwy_gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/tensor.h"
#include "cpu/cpu.h"
#include "kernels.h"

namespace bnorm_test {
namespace {

using bnorm::bfloat16;
using bnorm::float16;
using bnorm::Layout;
using bnorm::detail::Geometry;

float widen(bfloat16 v) { return bnorm::to_float(v); }
float widen(float16 v) { return bnorm::to_float(v); }
template <class E>
E round_to(float v) {
  if constexpr (std::is_same_v<E, bfloat16>) {
    return bnorm::to_bfloat16(v);
  } else {
    return bnorm::to_float16(v);
  }
}

template <class E>
uint16_t bits(E v) {
  return v.bits;
}
uint32_t bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}

// A native tensor placed `off` elements into its buffer, so that the tensors start at every
// element alignment (and differ from each other's). The streamed outputs stay vector-aligned:
// on the FMA-less targets the prologue of a streamed row follows the alignment (ops-inl.h).
template <class E>
struct Shifted {
  std::vector<E> buf;
  size_t off;
  Shifted(const std::vector<E>& v, size_t o) : buf(v.size() + 8), off(o) {
    std::copy(v.begin(), v.end(), buf.begin() + static_cast<std::ptrdiff_t>(o));
  }
  Shifted(size_t n, size_t o) : buf(n + 8), off(o) {}
  E* data() { return buf.data() + off; }
  void assign(const std::vector<E>& v) {
    std::copy(v.begin(), v.end(), buf.begin() + static_cast<std::ptrdiff_t>(off));
  }
};

size_t offset(const Geometry& g, uint64_t seed, int k) {
  if (g.numel() * 4 >= (int64_t{16} << 20)) return 0;  // streamed (kStreamMinBytes)
  return static_cast<size_t>((seed >> (2 * k)) % 5);
}

template <class E>
struct Natives;
template <>
struct Natives<bfloat16> {
  static auto train(const bnorm::detail::Implementation& i) { return i.forward_train_bf16; }
  static auto eval(const bnorm::detail::Implementation& i) { return i.forward_eval_bf16; }
  static auto backward(const bnorm::detail::Implementation& i) { return i.backward_bf16; }
};
template <>
struct Natives<float16> {
  static auto train(const bnorm::detail::Implementation& i) { return i.forward_train_f16; }
  static auto eval(const bnorm::detail::Implementation& i) { return i.forward_eval_f16; }
  static auto backward(const bnorm::detail::Implementation& i) { return i.backward_f16; }
};

const bnorm::detail::Implementation& cpu_impl() {
  const auto& impl = bnorm::detail::implementations()[0];
  EXPECT_STREQ(impl.name, "cpu");
  return impl;
}

struct Shape {
  Layout layout;
  std::vector<int64_t> dims;  // N, C, spatial...
};

Geometry geometry(const Shape& sh) {
  Geometry g;
  g.layout = sh.layout;
  g.n = sh.dims[0];
  g.c = sh.dims[1];
  g.s = 1;
  for (size_t k = 2; k < sh.dims.size(); ++k) g.s *= sh.dims[k];
  return g;
}

std::string name(const Shape& sh, int threads, const char* what) {
  std::string s = sh.layout == Layout::kChannelsLast ? "last" : "first";
  for (int64_t d : sh.dims) s += " " + std::to_string(d);
  const int64_t targets = hwy::SupportedTargets();
  return s + " threads " + std::to_string(threads) + " " + what + " " +
         hwy::TargetName(targets & -targets);  // the best one (the test narrows to one)
}

// Values with per-channel offsets and scales (so the pivot and the fp32/fp64 paths matter);
// with `special`, some elements are NaN (quiet and signalling payloads), +-Inf, +-0, the
// element type's subnormals and its largest values, and channel 0 is constant (y = bias exactly,
// which the tests set to ties and fp16 overflow).
template <class E>
std::vector<E> make(const Geometry& g, std::mt19937_64& rng, float offset_scale, bool special) {
  std::vector<E> out(static_cast<size_t>(g.numel()));
  std::uniform_real_distribution<float> nd(-1.7f, 1.7f);
  std::uniform_int_distribution<int> pick(0, 99);
  std::vector<float> off(g.c), scale(g.c);
  for (int64_t c = 0; c < g.c; ++c) {
    off[c] = offset_scale * nd(rng);
    scale[c] = std::exp2(static_cast<float>(pick(rng) % 7) - 3.0f);
  }
  const uint16_t specials[] = {0x7FC0, 0x7F81, 0xFFC1, 0x7F80, 0xFF80, 0x0000, 0x8000,
                               0x0001, 0x807F, 0x7F7F, 0xFF7F, 0xFF81};
  const uint16_t specials16[] = {0x7E00, 0x7C01, 0xFE13, 0x7C00, 0xFC00, 0x0000, 0x8000,
                                 0x0001, 0x83FF, 0x7BFF, 0xFBFF, 0xFC05};
  for (int64_t i = 0; i < g.n; ++i)
    for (int64_t c = 0; c < g.c; ++c)
      for (int64_t j = 0; j < g.s; ++j) {
        float v = off[c] + scale[c] * nd(rng);
        if (special && c == 0) v = 0.75f;
        E e = round_to<E>(v);
        if (special && c > 0 && pick(rng) < 3) {
          const int k = pick(rng) % 12;
          e.bits = std::is_same_v<E, bfloat16> ? specials[k] : specials16[k];
        }
        out[static_cast<size_t>(g.index(i, c, j))] = e;
      }
  return out;
}

template <class E>
std::vector<float> widened(const std::vector<E>& v) {
  std::vector<float> out(v.size());
  for (size_t k = 0; k < v.size(); ++k) out[k] = widen(v[k]);
  return out;
}

// NaN matches NaN of any payload and sign: which NaN operand an operation returns depends on
// the order of its operands in the instruction, which the compiler may swap for commutative
// operations (add, mul, the multiplicands of an FMA) differently in each instantiation of a
// kernel, so a NaN's payload is not reproducible between the 16-bit and the fp32 kernels (nor,
// in general, between two compilers' fp32 kernels). Every other pattern must be equal.
template <class E>
bool is_nan(E v) {
  return std::is_same_v<E, bfloat16> ? (v.bits & 0x7FFF) > 0x7F80 : (v.bits & 0x7FFF) > 0x7C00;
}

template <class E>
void expect_rounded(const std::vector<E>& native, const float* staged, size_t count,
                    const std::string& what) {
  size_t bad = 0;
  for (size_t k = 0; k < count; ++k) {
    const E want = round_to<E>(staged[k]);
    if (native[k].bits != want.bits && !(is_nan(native[k]) && is_nan(want))) {
      if (bad < 5)
        ADD_FAILURE() << what << " element " << k << ": native 0x" << std::hex << native[k].bits
                      << " staged 0x" << want.bits << std::dec << " (fp32 " << staged[k] << ")";
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0u) << what;
}

void expect_same(const std::vector<float>& a, const std::vector<float>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t k = 0; k < a.size(); ++k)
    if (bits(a[k]) != bits(b[k]) && !(std::isnan(a[k]) && std::isnan(b[k]))) {
      ADD_FAILURE() << what << " channel " << k << ": native " << a[k] << " staged " << b[k];
      return;
    }
}

// Per-channel parameters; the constant channel 0 gets bias = a rounding tie or an fp16 overflow.
struct Params {
  std::vector<float> weight, bias, rm, rv, save_mean, save_invstd;
};

template <class E>
Params params(const Geometry& g, std::mt19937_64& rng, bool special) {
  std::uniform_real_distribution<float> u(0.5f, 1.5f), b(-1.0f, 1.0f);
  Params p;
  for (int64_t c = 0; c < g.c; ++c) {
    p.weight.push_back(u(rng));
    p.bias.push_back(b(rng));
    p.rm.push_back(b(rng));
    p.rv.push_back(u(rng));
    p.save_mean.push_back(b(rng));
    p.save_invstd.push_back(u(rng));
  }
  if (special) {
    // Ties of each type, an fp16 overflow (65520 rounds to Inf) and an fp16 subnormal tie.
    const float ties[] = {1.0f + 0x1p-8f, 1.0f + 0x1p-11f, 65520.0f, 3 * 0x1p-25f, -1.0f - 0x1p-8f};
    p.bias[0] = ties[rng() % 5];
    if (g.c > 1) p.weight[1] = 3.0e4f;  // outputs beyond the fp16 range
  }
  return p;
}

// Aliasing of the outputs: none, y = x (dx = dy), z = y (dx = x), dz = dy (dx = y).
enum Alias { kNone = 0, kFirst = 1, kSecond = 2, kThird = 3 };

template <class E>
void check_forward(const Shape& sh, int threads, uint64_t seed, bool relu, bool with_z, Alias alias,
                   bool special, bool eval_only = false) {
  const Geometry g = geometry(sh);
  const size_t numel = static_cast<size_t>(g.numel());
  std::mt19937_64 rng(seed);
  const std::vector<E> x = make<E>(g, rng, 3.0f, special);
  const std::vector<E> z = make<E>(g, rng, 0.5f, special);
  const Params p = params<E>(g, rng, special);
  const auto& impl = cpu_impl();
  bnorm::set_num_threads(threads);

  for (bool train : {true, false}) {
    if (train && eval_only) continue;
    // Native.
    Shifted<E> xn(x, offset(g, seed, 0)), yn(numel, offset(g, seed, 1)), zn(z, offset(g, seed, 2));
    const E* xp = xn.data();
    E* yp = yn.data();
    const E* zp = with_z ? zn.data() : nullptr;
    if (alias == kFirst) yp = xn.data();  // y = x
    if (alias == kSecond && with_z) {     // z = y
      yn.assign(z);
      zp = yn.data();
    }
    std::vector<float> rm = p.rm, rv = p.rv, sm(g.c, -7.0f), si(g.c, -7.0f);
    // Staged as batch_norm.cc stages: y over the fp32 copy of x, z its own copy.
    std::vector<float> xs = widened(x), zs = widened(z);
    const float* xsp = xs.data();
    float* ysp = xs.data();
    const float* zsp = with_z ? zs.data() : nullptr;
    std::vector<float> rm_s = p.rm, rv_s = p.rv, sm_s(g.c, -7.0f), si_s(g.c, -7.0f);
    if (train) {
      bnorm::detail::TrainCallOf<E> call;
      call.g = g;
      call.x = xp;
      call.weight = p.weight.data();
      call.bias = p.bias.data();
      call.running_mean = rm.data();
      call.running_var = rv.data();
      call.factor = 0.1;
      call.eps = 1e-5;
      call.y = yp;
      call.save_mean = sm.data();
      call.save_invstd = si.data();
      call.relu = relu;
      call.z = zp;
      Natives<E>::train(impl)(call);
      bnorm::detail::TrainCall s;
      s.g = g;
      s.x = xsp;
      s.weight = p.weight.data();
      s.bias = p.bias.data();
      s.running_mean = rm_s.data();
      s.running_var = rv_s.data();
      s.factor = 0.1;
      s.eps = 1e-5;
      s.y = ysp;
      s.save_mean = sm_s.data();
      s.save_invstd = si_s.data();
      s.relu = relu;
      s.z = zsp;
      bnorm::cpu::forward_train(s);
    } else {
      bnorm::detail::EvalCallOf<E> call;
      call.g = g;
      call.x = xp;
      call.weight = p.weight.data();
      call.bias = p.bias.data();
      call.running_mean = p.rm.data();
      call.running_var = p.rv.data();
      call.eps = 1e-5;
      call.y = yp;
      call.relu = relu;
      call.z = zp;
      Natives<E>::eval(impl)(call);
      bnorm::detail::EvalCall s;
      s.g = g;
      s.x = xsp;
      s.weight = p.weight.data();
      s.bias = p.bias.data();
      s.running_mean = p.rm.data();
      s.running_var = p.rv.data();
      s.eps = 1e-5;
      s.y = ysp;
      s.relu = relu;
      s.z = zsp;
      bnorm::cpu::forward_eval(s);
    }
    const std::string what = name(sh, threads, train ? "forward_train" : "forward_eval") +
                             (relu ? " relu" : "") + (with_z ? " z" : "") + " alias " +
                             std::to_string(alias) + (special ? " special" : "");
    std::vector<E> yout(yp, yp + numel);
    expect_rounded(yout, ysp, numel, what + " y");
    expect_same(rm, rm_s, what + " running_mean");
    expect_same(rv, rv_s, what + " running_var");
    expect_same(sm, sm_s, what + " save_mean");
    expect_same(si, si_s, what + " save_invstd");
  }
}

template <class E>
void check_backward(const Shape& sh, int threads, uint64_t seed, bool training, bool relu,
                    bool with_dz, Alias alias, bool special) {
  const Geometry g = geometry(sh);
  const size_t numel = static_cast<size_t>(g.numel());
  std::mt19937_64 rng(seed);
  const std::vector<E> x = make<E>(g, rng, 3.0f, special);
  const std::vector<E> dy = make<E>(g, rng, 0.1f, special);
  const std::vector<E> y = make<E>(g, rng, 0.3f, special);
  const Params p = params<E>(g, rng, special);
  const auto& impl = cpu_impl();
  bnorm::set_num_threads(threads);

  Shifted<E> xn(x, offset(g, seed, 0)), dyn(dy, offset(g, seed, 1)), yn(y, offset(g, seed, 2)),
      dxn(numel, offset(g, seed, 3)), dzn(numel, offset(g, seed, 4));
  E* dxp = dxn.data();
  E* dzp = relu && with_dz ? dzn.data() : nullptr;
  // Staged as batch_norm.cc stages: dx over the fp32 copy of dy; with the ReLU, dx over the
  // copy of x and dz over the copy of dy.
  std::vector<float> xs = widened(x), dys = widened(dy), yss = widened(y);
  float* dxsp = relu ? xs.data() : dys.data();
  float* dzsp = relu && with_dz ? dys.data() : nullptr;
  if (alias == kFirst) {
    dxp = dyn.data();
  } else if (alias == kSecond) {
    dxp = xn.data();
  } else if (alias == kThird && relu && with_dz) {
    dzp = dyn.data();
    dxp = yn.data();
  }
  std::vector<float> dw(g.c, -7.0f), db(g.c, -7.0f), dw_s(g.c, -7.0f), db_s(g.c, -7.0f);

  bnorm::detail::BackwardCallOf<E> call;
  call.g = g;
  call.dy = dyn.data();
  call.x = xn.data();
  call.weight = p.weight.data();
  call.training = training;
  call.save_mean = p.save_mean.data();
  call.save_invstd = p.save_invstd.data();
  call.running_mean = p.rm.data();
  call.running_var = p.rv.data();
  call.eps = 1e-5;
  call.dx = dxp;
  call.dweight = dw.data();
  call.dbias = db.data();
  call.y = relu ? yn.data() : nullptr;
  call.dz = dzp;
  // Eval without dweight/dbias takes the single-sweep kernel: every other case.
  if (!training && (seed & 1)) call.dweight = call.dbias = nullptr;
  Natives<E>::backward(impl)(call);

  bnorm::detail::BackwardCall s;
  s.g = g;
  s.dy = dys.data();
  s.x = xs.data();
  s.weight = p.weight.data();
  s.training = training;
  s.save_mean = p.save_mean.data();
  s.save_invstd = p.save_invstd.data();
  s.running_mean = p.rm.data();
  s.running_var = p.rv.data();
  s.eps = 1e-5;
  s.dx = dxsp;
  s.dweight = call.dweight ? dw_s.data() : nullptr;
  s.dbias = call.dbias ? db_s.data() : nullptr;
  s.y = relu ? yss.data() : nullptr;
  s.dz = dzsp;
  bnorm::cpu::backward(s);

  const std::string what = name(sh, threads, training ? "backward train" : "backward eval") +
                           (relu ? " relu" : "") + (with_dz ? " dz" : "") + " alias " +
                           std::to_string(alias) + (special ? " special" : "");
  std::vector<E> dxout(dxp, dxp + numel);
  expect_rounded(dxout, dxsp, numel, what + " dx");
  if (dzp != nullptr) {
    std::vector<E> dzout(dzp, dzp + numel);
    expect_rounded(dzout, dzsp, numel, what + " dz");
  }
  expect_same(dw, dw_s, what + " dweight");
  expect_same(db, db_s, what + " dbias");
}

const Shape kShapes[] = {
    {Layout::kChannelsFirst, {2, 3}},           {Layout::kChannelsLast, {5, 19}},
    {Layout::kChannelsFirst, {2, 5, 1}},        {Layout::kChannelsLast, {2, 5, 3}},
    {Layout::kChannelsFirst, {2, 7, 3}},        {Layout::kChannelsFirst, {2, 6, 7, 7}},
    {Layout::kChannelsLast, {2, 21, 7, 7}},     {Layout::kChannelsFirst, {3, 4, 5, 13}},
    {Layout::kChannelsLast, {2, 37, 3, 5}},     {Layout::kChannelsFirst, {2, 3, 2, 3, 5}},
    {Layout::kChannelsLast, {2, 9, 2, 3, 5}},   {Layout::kChannelsFirst, {2, 21, 28, 28}},
    {Layout::kChannelsLast, {2, 200, 9, 9}},    {Layout::kChannelsFirst, {1, 2, 20000}},
    {Layout::kChannelsLast, {64, 33}},          {Layout::kChannelsFirst, {17, 3, 1, 1000}},
};
constexpr int kThreads[] = {1, 2, 3, 8};

class HalfKernelTest : public hwy::TestWithParamTarget {
 protected:
  void TearDown() override {
    bnorm::set_num_threads(0);
    hwy::TestWithParamTarget::TearDown();
  }
};
HWY_TARGET_INSTANTIATE_TEST_SUITE_P(HalfKernelTest);

// Each shape with each thread count; the larger ones (more than 4096 elements) with one count
// each call, in turn, to keep the suite short under the sanitizers.
template <class E>
void run_all_cases() {
  uint64_t seed = 1;
  for (const Shape& sh : kShapes) {
    const Geometry g = geometry(sh);
    const bool large = g.numel() > 4096;
    for (int t = 0; t < (large ? 1 : 4); ++t) {
      auto threads = [&] { return large ? kThreads[seed % 4] : kThreads[t]; };
      // Forward: plain, relu in place, relu + z (aliased in turn).
      check_forward<E>(sh, threads(), seed, false, false, kNone, false);
      ++seed;
      check_forward<E>(sh, threads(), seed, true, false, kFirst, false);
      ++seed;
      check_forward<E>(sh, threads(), seed, true, true, Alias(seed % 3), false);
      ++seed;
      // Backward: training and eval, plain and relu (with dz), aliased in turn.
      for (bool training : {true, false}) {
        check_backward<E>(sh, threads(), seed, training, false, false, Alias(seed % 3), false);
        ++seed;
        check_backward<E>(sh, threads(), seed, training, true, true, Alias(seed % 4), false);
        ++seed;
      }
      if (::testing::Test::HasFailure()) return;
    }
  }
}

TEST_P(HalfKernelTest, BFloat16NativeEqualsStaged) { run_all_cases<bfloat16>(); }
TEST_P(HalfKernelTest, Float16NativeEqualsStaged) { run_all_cases<float16>(); }

template <class E>
void run_special_cases() {
  uint64_t seed = 1000;
  for (const Shape& sh : kShapes) {
    if (geometry(sh).numel() > 20000) continue;  // the small shapes cover every kernel path
    const int threads = kThreads[seed % 4];
    check_forward<E>(sh, threads, seed++, false, false, kNone, true);
    check_forward<E>(sh, threads, seed++, true, true, kNone, true);
    for (bool training : {true, false}) {
      check_backward<E>(sh, threads, seed++, training, false, false, kNone, true);
      check_backward<E>(sh, threads, seed++, training, true, true, kNone, true);
    }
    if (::testing::Test::HasFailure()) return;
  }
}

TEST_P(HalfKernelTest, BFloat16SpecialValues) { run_special_cases<bfloat16>(); }
TEST_P(HalfKernelTest, Float16SpecialValues) { run_special_cases<float16>(); }

// Outputs of more than kStreamMinBytes (as fp32) take streaming stores, after a prologue up to
// the first aligned output of each row (rows of odd length, so that most begin unaligned); the
// backward's rows are written by the same write_row. Inference only: the cheapest pass.
// HWY_SCALAR (one lane: no prologue, and Stream is a store), the slowest target, takes a small
// shape instead.
TEST_P(HalfKernelTest, StreamedOutputs) {
  const Shape sh = GetParam() == HWY_SCALAR ? Shape{Layout::kChannelsFirst, {2, 3, 37, 5}}
                                            : Shape{Layout::kChannelsFirst, {4, 8, 371, 365}};
  check_forward<bfloat16>(sh, 2, 77, true, true, kNone, false, /*eval_only=*/true);
}

}  // namespace
}  // namespace bnorm_test
