// The fused activations y = relu(bn(x)) and y = relu(bn(x) + z): gradients and bad input.
//
// 1. The fp64 reference's fused backward (relu_mask then the backward passes, instantiated for
//    double) against central finite differences of its fused forward (apply_relu), for dx,
//    dweight, dbias and dz, training and eval, both layouts. Points within 1e-3 of the ReLU's
//    kink are moved off it through z (the add form), so a step of 1e-6 never crosses it; for
//    relu(bn(x)) (no z) the problem is drawn again until no point is that close.
// 2. Bad input through the public API: every argument the fused forms add is validated before
//    the first write, naming the argument; nothing is written.
// (tests/cpu/fused_kernel_test.cc checks the fp32 passes against the unfused composition.)
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "bnorm/batch_norm.h"
#include "kernels.h"
#include "reference/reference.h"
#include "test_util.h"

namespace bnorm_test {
namespace {

using bnorm::detail::Geometry;
namespace ref = bnorm::ref;

constexpr double kEps = 1e-5;

struct Problem {
  Geometry g;
  bool training = true;
  bool add = true;
  std::vector<double> x, z, dy, w, b, rm, rv;
};

void statistics(const Problem& p, const std::vector<double>& x, std::vector<double>* mean,
                std::vector<double>* invstd) {
  const auto c = static_cast<size_t>(p.g.c);
  mean->assign(c, 0.0);
  invstd->assign(c, 0.0);
  if (p.training) {
    std::vector<double> var(c);
    ref::stats(p.g, x.data(), mean->data(), var.data());
    ref::finalize(p.g, mean->data(), var.data(), kEps, 0.0, invstd->data(), nullptr, nullptr);
  } else {
    for (size_t ch = 0; ch < c; ++ch) {
      (*mean)[ch] = p.rm[ch];
      (*invstd)[ch] = 1.0 / std::sqrt(p.rv[ch] + kEps);
    }
  }
}

std::vector<double> forward(const Problem& p, const std::vector<double>& x,
                            const std::vector<double>& z, const std::vector<double>& w,
                            const std::vector<double>& b) {
  std::vector<double> mean, invstd, y(x.size());
  statistics(p, x, &mean, &invstd);
  ref::apply_relu(p.g, x.data(), mean.data(), invstd.data(), w.data(), b.data(),
                  p.add ? z.data() : nullptr, y.data());
  return y;
}

double loss(const Problem& p, const std::vector<double>& x, const std::vector<double>& z,
            const std::vector<double>& w, const std::vector<double>& b) {
  const std::vector<double> y = forward(p, x, z, w, b);
  long double sum = 0;
  for (size_t k = 0; k < y.size(); ++k) sum += static_cast<long double>(p.dy[k]) * y[k];
  return static_cast<double>(sum);
}

Problem make_problem(std::vector<int64_t> dims, Layout layout, bool training, uint64_t seed,
                     bool add = true) {
  BNORM_SEEDED_RNG(rng, seed);
  Problem p;
  p.add = add;
  p.g.layout = layout;
  p.g.n = dims[0];
  p.g.c = dims[1];
  p.g.s = SpatialOf(dims);
  p.training = training;
  const auto n = static_cast<size_t>(p.g.numel());
  for (size_t k = 0; k < n; ++k) {
    p.x.push_back(Normal(rng, 0.5, 2.0));
    p.z.push_back(Normal(rng));
    p.dy.push_back(Normal(rng));
  }
  for (int64_t c = 0; c < p.g.c; ++c) {
    p.w.push_back(Uniform(rng, 0.5, 1.5) * (c % 2 ? -1 : 1));
    p.b.push_back(Uniform(rng, -0.5, 0.5));
    p.rm.push_back(Uniform(rng, -0.5, 0.5));
    p.rv.push_back(Uniform(rng, 0.5, 2.0));
  }
  // Off the kink: |bn(x) + z| >= 1e-3 everywhere (z moves; bn(x) does not depend on z).
  std::vector<double> mean, invstd, bn(n);
  statistics(p, p.x, &mean, &invstd);
  ref::apply(p.g, p.x.data(), mean.data(), invstd.data(), p.w.data(), p.b.data(), bn.data());
  for (size_t k = 0; k < n; ++k)
    if (std::fabs(bn[k] + p.z[k]) < 1e-3) p.z[k] += 0.01;
  return p;
}

// relu(bn(x)): a problem with every |bn(x)| >= 1e-3 (nothing can move bn(x) off the kink
// without changing the statistics, so draw again; a point is that close with probability ~1e-3).
Problem make_problem_without_add(std::vector<int64_t> dims, Layout layout, bool training,
                                 uint64_t seed) {
  for (int attempt = 0; attempt < 100; ++attempt) {
    Problem p = make_problem(dims, layout, training, seed + 1000 * attempt, false);
    std::vector<double> mean, invstd, bn(p.x.size());
    statistics(p, p.x, &mean, &invstd);
    ref::apply(p.g, p.x.data(), mean.data(), invstd.data(), p.w.data(), p.b.data(), bn.data());
    bool clear = true;
    for (double v : bn) clear = clear && std::fabs(v) >= 1e-3;
    if (clear) return p;
  }
  ADD_FAILURE() << "no problem off the ReLU's kink in 100 draws";
  return make_problem(dims, layout, training, seed, false);
}

void check_gradients(const Problem& p) {
  const size_t n = p.x.size(), c = p.w.size();
  // The analytic gradients: g = dy * (y > 0), then the backward of bn; dz = g.
  const std::vector<double> y = forward(p, p.x, p.z, p.w, p.b);
  std::vector<double> g(n), mean, invstd, s0(c), s1(c), dx(n);
  ref::relu_mask(p.g, p.dy.data(), y.data(), g.data());
  statistics(p, p.x, &mean, &invstd);
  ref::backward_reduce(p.g, g.data(), p.x.data(), mean.data(), invstd.data(), s0.data(),
                       s1.data());
  ref::backward_apply(p.g, g.data(), p.x.data(), mean.data(), invstd.data(), p.w.data(),
                      s0.data(), s1.data(), p.training, dx.data());
  const double h = 1e-6;
  auto fd = [&](auto perturb) {
    const double up = perturb(h), down = perturb(-h);
    return (up - down) / (2 * h);
  };
  // Loss values are O(n); fp64 rounding of the difference quotient is ~n * 1e-16 / h.
  const double tol = 1e-6 * static_cast<double>(n) + 1e-6;
  for (size_t k = 0; k < n; ++k) {
    const double got_dx = fd([&](double d) {
      std::vector<double> x = p.x;
      x[k] += d;
      return loss(p, x, p.z, p.w, p.b);
    });
    EXPECT_NEAR(dx[k], got_dx, tol) << "dx[" << k << "]";
    if (!p.add) continue;
    const double got_dz = fd([&](double d) {
      std::vector<double> z = p.z;
      z[k] += d;
      return loss(p, p.x, z, p.w, p.b);
    });
    EXPECT_NEAR(g[k], got_dz, tol) << "dz[" << k << "]";
  }
  for (size_t ch = 0; ch < c; ++ch) {
    const double got_dw = fd([&](double d) {
      std::vector<double> w = p.w;
      w[ch] += d;
      return loss(p, p.x, p.z, w, p.b);
    });
    EXPECT_NEAR(s1[ch], got_dw, tol) << "dweight[" << ch << "]";
    const double got_db = fd([&](double d) {
      std::vector<double> b = p.b;
      b[ch] += d;
      return loss(p, p.x, p.z, p.w, b);
    });
    EXPECT_NEAR(s0[ch], got_db, tol) << "dbias[" << ch << "]";
  }
  // The mask does something: some elements are clamped, some pass.
  size_t clamped = 0;
  for (double v : y) clamped += v == 0;
  EXPECT_GT(clamped, 0u);
  EXPECT_LT(clamped, n);
}

TEST(FusedGradient, FiniteDifferences) {
  uint64_t seed = 41;
  for (const auto& dims : std::vector<std::vector<int64_t>>{{6, 3}, {3, 2, 5}, {2, 3, 2, 3}})
    for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast})
      for (bool training : {true, false}) {
        SCOPED_TRACE(DimsString(dims) + " " + LayoutTag(layout) + (training ? " train" : " eval"));
        check_gradients(make_problem(dims, layout, training, seed++));
      }
}

TEST(FusedGradient, FiniteDifferencesWithoutAdd) {
  uint64_t seed = 141;
  for (const auto& dims : std::vector<std::vector<int64_t>>{{6, 3}, {3, 2, 5}, {2, 3, 2, 3}})
    for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast})
      for (bool training : {true, false}) {
        SCOPED_TRACE(DimsString(dims) + " " + LayoutTag(layout) + (training ? " train" : " eval"));
        check_gradients(make_problem_without_add(dims, layout, training, seed++));
      }
}

// The fused backward of the reference against the unfused composition in fp64: relu's
// backward (dy where y > 0) then bn's backward, computed here from the definitions.
TEST(FusedGradient, ReferenceIsTheComposition) {
  const Problem p = make_problem({4, 3, 5}, Layout::kChannelsFirst, true, 77);
  const size_t n = p.x.size();
  const std::vector<double> y = forward(p, p.x, p.z, p.w, p.b);
  std::vector<double> mean, invstd;
  statistics(p, p.x, &mean, &invstd);
  for (size_t k = 0; k < n; ++k) {
    const int64_t c = (static_cast<int64_t>(k) / p.g.s) % p.g.c;
    const double v = p.w[c] * ((p.x[k] - mean[c]) * invstd[c]) + p.b[c] + p.z[k];
    EXPECT_NEAR(y[k], v <= 0 ? 0.0 : v, 1e-14 * (std::fabs(v) + 1)) << k;
  }
}

// ---- Bad input ----

struct Buffers {
  std::vector<int64_t> dims{2, 3, 4};
  Tensor x{dims, Layout::kChannelsFirst}, y{dims, Layout::kChannelsFirst},
      z{dims, Layout::kChannelsFirst}, dy{dims, Layout::kChannelsFirst},
      dx{dims, Layout::kChannelsFirst}, dz{dims, Layout::kChannelsFirst};
  std::vector<float> rm = std::vector<float>(3, 0.f), rv = std::vector<float>(3, 1.f);
  std::vector<float> sm = std::vector<float>(3, 0.f), si = std::vector<float>(3, 1.f);
  Buffers() {
    for (size_t k = 0; k < x.data.size(); ++k) {
      x.data[k] = static_cast<float>(k % 7) - 3.f;
      z.data[k] = 0.5f;
      dy.data[k] = 1.f;
    }
    FillSentinel(y.data);
    FillSentinel(dx.data);
    FillSentinel(dz.data);
  }
  bnorm::ForwardTrainArgs train() {
    bnorm::ForwardTrainArgs a;
    a.x = x.cview();
    a.running_mean = rm;
    a.running_var = rv;
    a.y = y.view();
    return a;
  }
  bnorm::BackwardArgs back() {
    bnorm::BackwardArgs a;
    a.dy = dy.cview();
    a.x = x.cview();
    a.save_mean = sm;
    a.save_invstd = si;
    a.dx = dx.view();
    return a;
  }
  Snapshot snapshot() const {
    Snapshot s;
    s.Add("y", y.data).Add("dx", dx.data).Add("dz", dz.data).Add("rm", rm).Add("rv", rv);
    return s;
  }
};

TEST(FusedBadInput, ForwardZ) {
  Buffers b;
  const Snapshot s = b.snapshot();
  const std::vector<int64_t> other{2, 3, 5};
  EXPECT_TRUE(IsInvalid(bnorm::forward_train_relu(
                            b.train(), bnorm::ConstTensorView(b.z.data.data(), other)),
                        "z"));
  EXPECT_TRUE(IsInvalid(
      bnorm::forward_train_relu(
          b.train(), bnorm::ConstTensorView(b.z.data.data(), b.dims, Layout::kChannelsLast)),
      "z"));
  // z partially overlapping y.
  bnorm::ForwardTrainArgs a = b.train();
  EXPECT_TRUE(IsInvalid(
      bnorm::forward_train_relu(a, bnorm::ConstTensorView(b.y.data.data() + 1, b.dims)), "z"));
  bnorm::ForwardEvalArgs e;
  e.x = b.x.cview();
  e.running_mean = b.rm;
  e.running_var = b.rv;
  e.y = b.y.view();
  EXPECT_TRUE(IsInvalid(
      bnorm::forward_eval_relu(e, bnorm::ConstTensorView(b.z.data.data(), other)), "z"));
  // Non-finite z with check_finite.
  b.z.data[5] = NAN;
  bnorm::CallOptions check;
  check.check_finite = true;
  EXPECT_TRUE(StatusIs(bnorm::forward_train_relu(b.train(), b.z.cview(), check),
                       bnorm::StatusCode::kNonFinite, "z: nan"));
  EXPECT_TRUE(StatusIs(bnorm::forward_eval_relu(e, b.z.cview(), check),
                       bnorm::StatusCode::kNonFinite, "z: nan"));
  // The unfused checks still apply (no running_var).
  a.running_var = {};
  EXPECT_TRUE(IsInvalid(bnorm::forward_train_relu(a, {}), "running"));
  EXPECT_TRUE(s.Unchanged());
}

TEST(FusedBadInput, Backward) {
  Buffers b;
  const Snapshot s = b.snapshot();
  const std::vector<int64_t> other{2, 3, 5};
  // y required, same shape.
  EXPECT_TRUE(IsInvalid(bnorm::backward_relu(b.back(), {}), "y"));
  EXPECT_TRUE(IsInvalid(
      bnorm::backward_relu(b.back(), bnorm::ConstTensorView(b.y.data.data(), other)), "y"));
  // dx partially over y (here z's buffer is the forward's output y).
  bnorm::BackwardArgs a = b.back();
  a.dx = bnorm::TensorView(b.z.data.data() + 1, b.dims);
  EXPECT_TRUE(IsInvalid(bnorm::backward_relu(a, b.z.cview()), "dx"));
  // dz: wrong shape; over x, y or dx; partially over dy.
  EXPECT_TRUE(IsInvalid(bnorm::backward_relu(b.back(), b.z.cview(),
                                             bnorm::TensorView(b.dz.data.data(), other)),
                        "dz"));
  EXPECT_TRUE(IsInvalid(bnorm::backward_relu(b.back(), b.z.cview(), b.x.view()), "dz"));
  EXPECT_TRUE(IsInvalid(bnorm::backward_relu(b.back(), b.z.cview(), b.z.view()), "dz"));
  EXPECT_TRUE(IsInvalid(bnorm::backward_relu(b.back(), b.z.cview(), b.dx.view()), "dz"));
  EXPECT_TRUE(IsInvalid(bnorm::backward_relu(b.back(), b.z.cview(),
                                             bnorm::TensorView(b.dy.data.data() + 2, b.dims)),
                        "dz"));
  // dx over dy and dz over dy: dz overlaps dx.
  a = b.back();
  a.dx = bnorm::TensorView(b.dy.data.data(), b.dims);
  EXPECT_TRUE(IsInvalid(bnorm::backward_relu(a, b.z.cview(), b.dy.view()), "dz"));
  // Non-finite y with check_finite.
  b.z.data[3] = INFINITY;
  bnorm::CallOptions check;
  check.check_finite = true;
  EXPECT_TRUE(StatusIs(bnorm::backward_relu(b.back(), b.z.cview(), b.dz.view(), check),
                       bnorm::StatusCode::kNonFinite, "y: inf"));
  // The unfused checks still apply (training without save_invstd).
  a = b.back();
  a.save_invstd = {};
  EXPECT_TRUE(IsInvalid(bnorm::backward_relu(a, b.z.cview(), b.dz.view()), "save_invstd"));
  EXPECT_TRUE(s.Unchanged());
}

}  // namespace
}  // namespace bnorm_test
