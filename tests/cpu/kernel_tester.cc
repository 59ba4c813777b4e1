#include "kernel_tester.h"

#include <algorithm>
#include <cstring>
#include <functional>

namespace bnorm_test {
namespace {

constexpr double kU = kFloatU;   // fp32 unit roundoff 2^-24
constexpr double kTiny = 1e-37;  // below: denormal noise, not an error
// The backward sums are summed in fp32 lanes for at most kFlushTerms terms, then in fp64
// (src/cpu/backward_reduce.cc): each errs by (K + 3) u of the sum of its terms' magnitudes at
// most (K fp32 additions, the flush, x - m and the product). Twice that, plus the fp64 merge.
double sum_rel(double n) {
  return 2 * (static_cast<double>(bnorm::cpu::kFlushTerms) + 3) * kU + 2 * n * kU64;
}

// Compares got[k] with want[k] for k < count, tolerance tol(k); reports the first bad index.
::testing::AssertionResult all_close(const char* what, const float* got, const float* want,
                                     int64_t count, const std::function<double(int64_t)>& tol,
                                     const std::function<int64_t(int64_t)>& channel_of) {
  for (int64_t k = 0; k < count; ++k) {
    const double g = got[k], w = want[k];
    if (std::isnan(w) && std::isnan(g)) continue;
    const double t = tol(k) + kTiny;
    if (!(std::fabs(g - w) <= t))
      return ::testing::AssertionFailure()
             << what << "[" << k << "] (channel " << channel_of(k) << "): got " << g << ", want "
             << w << ", |diff| " << std::fabs(g - w) << " > tol " << t;
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult all_close(const char* what, const double* got, const double* want,
                                     int64_t count, const std::function<double(int64_t)>& tol) {
  for (int64_t k = 0; k < count; ++k) {
    if (std::isnan(want[k]) && std::isnan(got[k])) continue;
    const double t = tol(k) + kTiny;
    if (!(std::fabs(got[k] - want[k]) <= t))
      return ::testing::AssertionFailure()
             << what << "[" << k << "]: got " << got[k] << ", want " << want[k] << ", |diff| "
             << std::fabs(got[k] - want[k]) << " > tol " << t;
  }
  return ::testing::AssertionSuccess();
}

std::vector<double> widen(const std::vector<float>& v) { return {v.begin(), v.end()}; }

}  // namespace

KernelTester::Data KernelTester::make_data(std::mt19937_64& rng) const {
  Data d;
  const int64_t count = numel(), sp = s();
  d.x.resize(static_cast<size_t>(count));
  d.dy.resize(static_cast<size_t>(count));
  for (int64_t k = 0; k < count; ++k) {
    const int64_t ch = layout_ == Layout::kChannelsFirst ? (k / sp) % c_ : k % c_;
    const double off = offset_ * (1.0 + static_cast<double>(ch) / static_cast<double>(c_));
    d.x[k] = static_cast<float>(constant_ && ch == 0 ? off + 0.7 : off + scale_ * Normal(rng));
    d.dy[k] = static_cast<float>(Normal(rng));
  }
  d.weight = RandomVector(rng, c_, 0.5, 1.5);
  for (size_t i = 0; i < d.weight.size(); i += 3) d.weight[i] = -d.weight[i];
  d.bias = RandomVector(rng, c_, -1.0, 1.0);
  d.running_mean = RandomVector(rng, c_, -1.0, 1.0);
  for (float& v : d.running_mean) v = static_cast<float>(v + offset_);
  d.running_var = RandomVector(rng, c_, 0.5, 2.0);
  for (float& v : d.running_var) v = static_cast<float>(v * scale_ * scale_);
  return d;
}

void KernelTester::test_passes(std::initializer_list<Pass> passes) const {
  BNORM_SEEDED_RNG(rng, seed_);
  SCOPED_TRACE(describe());
  const Data d = make_data(rng);
  for (Pass pass : passes) {
    switch (pass) {
      case Pass::kStats:
        test_stats(d);
        break;
      case Pass::kApply:
        test_apply(d);
        break;
      case Pass::kBackwardReduce:
        test_backward_reduce(d);
        break;
      case Pass::kBackwardApplyTrain:
        test_backward_apply(d, true);
        break;
      case Pass::kBackwardApplyEval:
        test_backward_apply(d, false);
        break;
      case Pass::kForwardTrain:
        test_forward_train(d);
        break;
      case Pass::kForwardEval:
        test_forward_eval(d);
        break;
      case Pass::kBackwardTrain:
        test_backward(d, true);
        break;
      case Pass::kBackwardEval:
        test_backward(d, false);
        break;
    }
    if (::testing::Test::HasFatalFailure()) return;
  }
}

namespace {

// Per-channel magnitudes the tolerances need, from the reference's fp64 statistics.
struct Scales {
  std::vector<double> mean, var, tol_mean, tol_var;
};

Scales scales_of(const bnorm::detail::Geometry& g, const float* x) {
  Scales s;
  const auto c = static_cast<size_t>(g.c);
  s.mean.resize(c);
  s.var.resize(c);
  s.tol_mean.resize(c);
  s.tol_var.resize(c);
  bnorm::ref::stats(g, x, s.mean.data(), s.var.data());
  const double n = static_cast<double>(g.count());
  for (int64_t ch = 0; ch < g.c; ++ch) {
    double abs_sum = 0, max_dev2 = 0;
    for (int64_t i = 0; i < g.n; ++i)
      for (int64_t j = 0; j < g.s; ++j) {
        const double v = x[g.index(i, ch, j)];
        abs_sum += std::fabs(v);
        max_dev2 = std::max(max_dev2, (v - s.mean[ch]) * (v - s.mean[ch]));
      }
    // The kernel sums d = x - pivot in fp32 lanes, at most kFlushTerms terms a lane, then in
    // fp64 (src/cpu/stats.cc). It accepts those sums only when |mean - pivot| <= R std
    // (R = kMaxPivotDistance; else it sums again in fp64): with R' = R + 1 for the rounding of
    // that test and u = 2^-24, mean|d| <= mean|x - mean| + R' std, the mean errs by at most
    // (K + 2) u mean|d|, and the variance by (K + 3) u std^2 (1 + 2 R' + 3 R'^2). Twice those,
    // plus the fp64 terms of the merge.
    const double k_terms = static_cast<double>(bnorm::cpu::kFlushTerms);
    const double r = bnorm::cpu::kMaxPivotDistance + 1;
    const double sd = std::sqrt(s.var[ch]);
    double abs_dev = 0;
    for (int64_t i = 0; i < g.n; ++i)
      for (int64_t j = 0; j < g.s; ++j) abs_dev += std::fabs(x[g.index(i, ch, j)] - s.mean[ch]);
    s.tol_mean[ch] = 2 * (k_terms + 2) * kFloatU * (abs_dev / n + r * sd) + 2 * n * kU64 * abs_sum / n;
    s.tol_var[ch] = 2 * (k_terms + 3) * kFloatU * s.var[ch] * (1 + 2 * r + 3 * r * r) +
                    2 * n * kU64 * (s.var[ch] + max_dev2);
  }
  return s;
}

}  // namespace

void KernelTester::test_stats(const Data& d) const {
  const auto g = geometry();
  std::vector<float> xo;
  float* x = alloc(xo, numel());
  std::copy(d.x.begin(), d.x.end(), x);
  const Scales sc = scales_of(g, x);
  std::vector<double> mean(c_), var(c_);
  impl_->stats(g, x, mean.data(), var.data());
  EXPECT_TRUE(all_close("mean", mean.data(), sc.mean.data(), c_,
                        [&](int64_t c) { return sc.tol_mean[c]; }));
  EXPECT_TRUE(
      all_close("var", var.data(), sc.var.data(), c_, [&](int64_t c) { return sc.tol_var[c]; }));
}

void KernelTester::test_apply(const Data& d) const {
  const auto g = geometry();
  std::vector<float> xo, yo;
  float* x = alloc(xo, numel());
  std::copy(d.x.begin(), d.x.end(), x);
  const Scales sc = scales_of(g, x);
  std::vector<double> invstd(c_);
  for (int64_t c = 0; c < c_; ++c) invstd[c] = 1.0 / std::sqrt(sc.var[c] + 1e-5);
  const std::vector<double> w = widen(d.weight), b = widen(d.bias);
  const double* wp = affine_ ? w.data() : nullptr;
  const double* bp = affine_ ? b.data() : nullptr;
  std::vector<float> want(d.x.size());
  bnorm::ref::apply(g, d.x.data(), sc.mean.data(), invstd.data(), wp, bp, want.data());
  float* y = in_place_ ? x : alloc(yo, numel());
  impl_->apply(g, x, sc.mean.data(), invstd.data(), wp, bp, y);
  auto chan = [&](int64_t k) {
    return layout_ == Layout::kChannelsFirst ? (k / s()) % c_ : k % c_;
  };
  EXPECT_TRUE(all_close(
      "y", y, want.data(), numel(),
      [&](int64_t k) {
        const int64_t c = chan(k);
        const double wc = wp ? w[c] : 1.0, bc = bp ? b[c] : 0.0;
        const double wx = std::fabs(wc * (d.x[k] - sc.mean[c]) * invstd[c]);
        return 8 * kU * (wx + std::fabs(bc)) + kU * std::fabs(want[k]);
      },
      chan));
}

void KernelTester::test_backward_reduce(const Data& d) const {
  const auto g = geometry();
  std::vector<float> xo, dyo;
  float* x = alloc(xo, numel());
  float* dy = alloc(dyo, numel());
  std::copy(d.x.begin(), d.x.end(), x);
  std::copy(d.dy.begin(), d.dy.end(), dy);
  const Scales sc = scales_of(g, x);
  std::vector<double> invstd(c_);
  for (int64_t c = 0; c < c_; ++c) invstd[c] = 1.0 / std::sqrt(sc.var[c] + 1e-5);
  std::vector<double> s0_ref(c_), s1_ref(c_), s0(c_), s1(c_), abs0(c_), abs1(c_);
  bnorm::ref::backward_reduce(g, dy, x, sc.mean.data(), invstd.data(), s0_ref.data(),
                              s1_ref.data());
  impl_->backward_reduce(g, dy, x, sc.mean.data(), invstd.data(), s0.data(), s1.data());
  for (int64_t k = 0; k < numel(); ++k) {
    const int64_t c = layout_ == Layout::kChannelsFirst ? (k / s()) % c_ : k % c_;
    abs0[c] += std::fabs(dy[k]);
    abs1[c] += std::fabs(dy[k] * (x[k] - sc.mean[c]) * invstd[c]);
  }
  const double n = static_cast<double>(g.count());
  EXPECT_TRUE(all_close("sum_dy", s0.data(), s0_ref.data(), c_,
                        [&](int64_t c) { return sum_rel(n) * abs0[c]; }));
  EXPECT_TRUE(all_close("sum_dy_xhat", s1.data(), s1_ref.data(), c_,
                        [&](int64_t c) { return sum_rel(n) * abs1[c]; }));
}

void KernelTester::test_backward_apply(const Data& d, bool training) const {
  const auto g = geometry();
  std::vector<float> xo, dyo, dxo;
  float* x = alloc(xo, numel());
  float* dy = alloc(dyo, numel());
  std::copy(d.x.begin(), d.x.end(), x);
  std::copy(d.dy.begin(), d.dy.end(), dy);
  const Scales sc = scales_of(g, x);
  std::vector<double> invstd(c_), s0(c_), s1(c_);
  for (int64_t c = 0; c < c_; ++c) invstd[c] = 1.0 / std::sqrt(sc.var[c] + 1e-5);
  bnorm::ref::backward_reduce(g, dy, x, sc.mean.data(), invstd.data(), s0.data(), s1.data());
  const std::vector<double> w = widen(d.weight);
  const double* wp = affine_ ? w.data() : nullptr;
  std::vector<float> want(d.x.size());
  bnorm::ref::backward_apply(g, dy, x, sc.mean.data(), invstd.data(), wp, s0.data(), s1.data(),
                             training, want.data());
  float* dx = in_place_ ? dy : alloc(dxo, numel());
  impl_->backward_apply(g, dy, x, sc.mean.data(), invstd.data(), wp, s0.data(), s1.data(),
                        training, dx, 0);
  const double n = static_cast<double>(g.count());
  auto chan = [&](int64_t k) {
    return layout_ == Layout::kChannelsFirst ? (k / s()) % c_ : k % c_;
  };
  EXPECT_TRUE(all_close(
      training ? "dx(train)" : "dx(eval)", dx, want.data(), numel(),
      [&](int64_t k) {
        const int64_t c = chan(k);
        const double wc = wp ? w[c] : 1.0;
        const double alpha = std::fabs(wc * invstd[c] * d.dy[k]);
        if (!training) return 3 * kU * alpha;
        const double dev = std::fabs(d.x[k] - sc.mean[c]) + kU * std::fabs(sc.mean[c]);
        const double beta = std::fabs(wc * invstd[c] * invstd[c] * s1[c] / n) * dev;
        const double gamma = std::fabs(wc * invstd[c] * s0[c] / n);
        return 8 * kU * (alpha + beta + gamma) + kU * std::fabs(want[k]);
      },
      chan));
}

void KernelTester::test_forward_train(const Data& d) const {
  const auto g = geometry();
  const Scales sc = scales_of(g, d.x.data());
  struct Out {
    std::vector<float> xo, yo, rm, rv, save_mean, save_invstd;
    float* y = nullptr;
  };
  // The running-stat factor the front end would pass: momentum, or 1 / num_batches_tracked
  // after its increment (from 3).
  const double f = momentum_ ? *momentum_ : 1.0 / 4.0;
  auto run = [&](const bnorm::detail::Implementation& impl, Out& o) {
    float* x = alloc(o.xo, numel());
    std::copy(d.x.begin(), d.x.end(), x);
    o.y = in_place_ ? x : alloc(o.yo, numel());
    o.rm = d.running_mean;
    o.rv = d.running_var;
    o.save_mean.assign(c_, 0.0f);
    o.save_invstd.assign(c_, 0.0f);
    bnorm::detail::TrainCall call;
    call.g = g;
    call.x = x;
    call.y = o.y;
    if (affine_) {
      call.weight = d.weight.data();
      call.bias = d.bias.data();
    }
    if (running_) {
      call.running_mean = o.rm.data();
      call.running_var = o.rv.data();
    }
    call.factor = f;
    call.eps = 1e-5;
    call.save_mean = o.save_mean.data();
    call.save_invstd = o.save_invstd.data();
    impl.forward_train(call);
  };
  Out ref, cpu;
  run(reference_implementation(), ref);
  run(*impl_, cpu);
  const double n = static_cast<double>(g.count());
  auto chan = [&](int64_t k) {
    return layout_ == Layout::kChannelsFirst ? (k / s()) % c_ : k % c_;
  };
  auto inv = [&](int64_t c) { return 1.0 / std::sqrt(sc.var[c] + 1e-5); };
  auto dinv_rel = [&](int64_t c) { return sc.tol_var[c] / (2 * (sc.var[c] + 1e-5)); };
  EXPECT_TRUE(all_close(
      "y", cpu.y, ref.y, numel(),
      [&](int64_t k) {
        const int64_t c = chan(k);
        const double wc = affine_ ? d.weight[c] : 1.0, bc = affine_ ? d.bias[c] : 0.0;
        const double wx = std::fabs(wc * (d.x[k] - sc.mean[c]) * inv(c));
        return 8 * kU * (wx + std::fabs(bc)) + kU * std::fabs(ref.y[k]) +
               std::fabs(wc) * inv(c) * sc.tol_mean[c] + wx * dinv_rel(c);
      },
      chan));
  auto id = [](int64_t k) { return k; };
  EXPECT_TRUE(all_close(
      "save_mean", cpu.save_mean.data(), ref.save_mean.data(), c_,
      [&](int64_t c) { return sc.tol_mean[c] + 2 * kU * std::fabs(sc.mean[c]); }, id));
  EXPECT_TRUE(all_close(
      "save_invstd", cpu.save_invstd.data(), ref.save_invstd.data(), c_,
      [&](int64_t c) { return inv(c) * (dinv_rel(c) + 2 * kU); }, id));
  if (running_) {
    EXPECT_TRUE(all_close(
        "running_mean", cpu.rm.data(), ref.rm.data(), c_,
        [&](int64_t c) { return f * sc.tol_mean[c] + 2 * kU * std::fabs(ref.rm[c]); }, id));
    EXPECT_TRUE(all_close(
        "running_var", cpu.rv.data(), ref.rv.data(), c_,
        [&](int64_t c) { return f * n / (n - 1) * sc.tol_var[c] + 2 * kU * std::fabs(ref.rv[c]); },
        id));
  }
}

void KernelTester::test_forward_eval(const Data& d) const {
  auto run = [&](const bnorm::detail::Implementation& impl, std::vector<float>& xo,
                 std::vector<float>& yo) -> float* {
    float* x = alloc(xo, numel());
    std::copy(d.x.begin(), d.x.end(), x);
    float* y = in_place_ ? x : alloc(yo, numel());
    bnorm::detail::EvalCall call;
    call.g = geometry();
    call.x = x;
    call.y = y;
    if (affine_) {
      call.weight = d.weight.data();
      call.bias = d.bias.data();
    }
    call.running_mean = d.running_mean.data();
    call.running_var = d.running_var.data();
    call.eps = 1e-5;
    impl.forward_eval(call);
    return y;
  };
  std::vector<float> x1, y1, x2, y2;
  const float* want = run(reference_implementation(), x1, y1);
  const float* got = run(*impl_, x2, y2);
  auto chan = [&](int64_t k) {
    return layout_ == Layout::kChannelsFirst ? (k / s()) % c_ : k % c_;
  };
  EXPECT_TRUE(all_close(
      "y(eval)", got, want, numel(),
      [&](int64_t k) {
        const int64_t c = chan(k);
        const double wc = affine_ ? d.weight[c] : 1.0, bc = affine_ ? d.bias[c] : 0.0;
        const double inv = 1.0 / std::sqrt(static_cast<double>(d.running_var[c]) + 1e-5);
        const double wx = std::fabs(wc * (d.x[k] - d.running_mean[c]) * inv);
        return 8 * kU * (wx + std::fabs(bc)) + kU * std::fabs(want[k]);
      },
      chan));
}

void KernelTester::test_backward(const Data& d, bool training) const {
  const auto g = geometry();
  // The forward statistics both backends receive: the reference's fp32 save_mean/save_invstd.
  std::vector<float> save_mean(c_), save_invstd(c_);
  {
    std::vector<float> y(d.x.size());
    bnorm::detail::TrainCall call;
    call.g = g;
    call.x = d.x.data();
    call.eps = 1e-5;
    call.y = y.data();
    call.save_mean = save_mean.data();
    call.save_invstd = save_invstd.data();
    reference_implementation().forward_train(call);
  }
  std::vector<double> mean(c_), invstd(c_);
  for (int64_t c = 0; c < c_; ++c) {
    mean[c] = training ? save_mean[c] : d.running_mean[c];
    invstd[c] =
        training ? save_invstd[c] : 1.0 / std::sqrt(static_cast<double>(d.running_var[c]) + 1e-5);
  }
  struct Out {
    std::vector<float> xo, dyo, dxo, dweight, dbias;
    float* dx = nullptr;
  };
  auto run = [&](const bnorm::detail::Implementation& impl, Out& o) {
    float* x = alloc(o.xo, numel());
    float* dy = alloc(o.dyo, numel());
    std::copy(d.x.begin(), d.x.end(), x);
    std::copy(d.dy.begin(), d.dy.end(), dy);
    o.dx = in_place_ ? dy : alloc(o.dxo, numel());
    o.dweight.assign(c_, 0.0f);
    o.dbias.assign(c_, 0.0f);
    bnorm::detail::BackwardCall call;
    call.g = g;
    call.dy = dy;
    call.x = x;
    call.dx = o.dx;
    if (affine_) call.weight = d.weight.data();
    call.training = training;
    call.save_mean = save_mean.data();
    call.save_invstd = save_invstd.data();
    call.running_mean = d.running_mean.data();
    call.running_var = d.running_var.data();
    call.eps = 1e-5;
    call.dweight = o.dweight.data();
    call.dbias = o.dbias.data();
    impl.backward(call);
  };
  Out ref, cpu;
  run(reference_implementation(), ref);
  run(*impl_, cpu);
  std::vector<double> s0(c_), s1(c_), abs0(c_), abs1(c_);
  bnorm::ref::backward_reduce(g, d.dy.data(), d.x.data(), mean.data(), invstd.data(), s0.data(),
                              s1.data());
  auto chan = [&](int64_t k) {
    return layout_ == Layout::kChannelsFirst ? (k / s()) % c_ : k % c_;
  };
  for (int64_t k = 0; k < numel(); ++k) {
    const int64_t c = chan(k);
    abs0[c] += std::fabs(d.dy[k]);
    abs1[c] += std::fabs(d.dy[k] * (d.x[k] - mean[c]) * invstd[c]);
  }
  const double n = static_cast<double>(g.count());
  auto id = [](int64_t k) { return k; };
  EXPECT_TRUE(all_close(
      "dbias", cpu.dbias.data(), ref.dbias.data(), c_,
      [&](int64_t c) { return sum_rel(n) * abs0[c] + 2 * kU * std::fabs(s0[c]); }, id));
  EXPECT_TRUE(all_close(
      "dweight", cpu.dweight.data(), ref.dweight.data(), c_,
      [&](int64_t c) { return sum_rel(n) * abs1[c] + 2 * kU * std::fabs(s1[c]); }, id));
  EXPECT_TRUE(all_close(
      training ? "dx(train)" : "dx(eval)", cpu.dx, ref.dx, numel(),
      [&](int64_t k) {
        const int64_t c = chan(k);
        const double wc = affine_ ? d.weight[c] : 1.0;
        const double alpha = std::fabs(wc * invstd[c] * d.dy[k]);
        if (!training) return 3 * kU * alpha;
        const double xhat = std::fabs(d.x[k] - mean[c]) * invstd[c];
        const double beta =
            std::fabs(wc * invstd[c] * s1[c] / n) * (xhat + kU * std::fabs(mean[c]) * invstd[c]);
        const double gamma = std::fabs(wc * invstd[c] * s0[c] / n);
        const double sums =
            std::fabs(wc * invstd[c] / n) * sum_rel(n) * (abs0[c] + xhat * abs1[c]);
        return 8 * kU * (alpha + beta + gamma) + kU * std::fabs(ref.dx[k]) + sums;
      },
      chan));
}

}  // namespace bnorm_test
