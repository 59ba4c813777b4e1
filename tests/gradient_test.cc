// Gradients.
//
// 1. The fp64 backward (bnorm::ref kernels instantiated for double) against central finite
//    differences of the fp64 forward, in training mode (through the batch statistics) and eval
//    mode (running statistics constant), several shapes, both layouts.
// 2. The public fp32 backward (after the public forward_train) against that fp64 backward, with a
//    tolerance derived from the fp32 unit roundoff.
// 3. Training-mode invariants: per channel sum(dx) = 0 and sum(dx * xhat) = A * S2 * eps / (var +
//    eps) (which is ~0 for var >> eps).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
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

Geometry GeometryOf(const std::vector<int64_t>& dims, Layout layout) {
  Geometry g;
  g.layout = layout;
  g.n = dims[0];
  g.c = dims[1];
  g.s = SpatialOf(dims);
  return g;
}

// A problem in fp64: x and dy in memory order of g.layout, per-channel weight and bias, and the
// running statistics that eval mode holds constant.
struct Problem {
  Geometry g;
  bool training = true;
  std::vector<double> x, dy, w, b, rm, rv;
};

// The statistics a pass uses: batch ones (training) or running ones (eval).
void Statistics(const Problem& p, const std::vector<double>& x, std::vector<double>* mean,
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

// L(x, w, b) = sum dy * y(x, w, b), accumulated in long double.
double Loss(const Problem& p, const std::vector<double>& x, const std::vector<double>& w,
            const std::vector<double>& b) {
  std::vector<double> mean, invstd, y(x.size());
  Statistics(p, x, &mean, &invstd);
  ref::apply(p.g, x.data(), mean.data(), invstd.data(), w.data(), b.data(), y.data());
  long double sum = 0;
  for (size_t k = 0; k < y.size(); ++k) sum += static_cast<long double>(p.dy[k]) * y[k];
  return static_cast<double>(sum);
}

struct Grads {
  std::vector<double> dx, dw, db;
  std::vector<double> mean, invstd, sum_dy, sum_dy_xhat;  // what they came from
};

// The fp64 backward: ref::backward_reduce then ref::backward_apply.
Grads Analytic(const Problem& p) {
  Grads r;
  Statistics(p, p.x, &r.mean, &r.invstd);
  const auto c = static_cast<size_t>(p.g.c);
  r.sum_dy.resize(c);
  r.sum_dy_xhat.resize(c);
  r.dx.resize(p.x.size());
  ref::backward_reduce(p.g, p.dy.data(), p.x.data(), r.mean.data(), r.invstd.data(),
                       r.sum_dy.data(), r.sum_dy_xhat.data());
  ref::backward_apply(p.g, p.dy.data(), p.x.data(), r.mean.data(), r.invstd.data(), p.w.data(),
                      r.sum_dy.data(), r.sum_dy_xhat.data(), p.training, r.dx.data());
  r.dw = r.sum_dy_xhat;
  r.db = r.sum_dy;
  return r;
}

// Central difference of L along one coordinate of *v (x, w or b): (L(v+h) - L(v-h)) / (2h), with
// the step actually taken (the difference of the two rounded points) as the denominator.
template <class LossOf>
double CentralDifference(std::vector<double>* v, size_t k, LossOf loss) {
  const double orig = (*v)[k];
  const double h = 1e-6 * std::max(1.0, std::fabs(orig));
  const double up = orig + h, down = orig - h;
  (*v)[k] = up;
  const double lp = loss();
  (*v)[k] = down;
  const double lm = loss();
  (*v)[k] = orig;
  return (lp - lm) / (up - down);
}

// |analytic - fd| <= 1e-6 * (|analytic| + max_k |analytic_k|): 1e-6 relative to the gradient's
// scale. The finite difference itself is good to ~1e-9 of that scale here: truncation
// h^2 / 6 * L''' ~ 1e-12 and cancellation eps_f64 * |L| / h ~ 1e-16 * 50 / 1e-6 = 5e-9.
void ExpectGradientMatches(const std::vector<double>& analytic, const std::vector<double>& fd,
                           const char* what) {
  double scale = 1e-3;
  for (double v : analytic) scale = std::max(scale, std::fabs(v));
  for (size_t k = 0; k < analytic.size(); ++k)
    EXPECT_TRUE(Near(analytic[k], fd[k], 1e-6 * (std::fabs(analytic[k]) + scale),
                     std::string(what) + "[" + std::to_string(k) + "]"));
}

struct GradCase {
  std::vector<int64_t> dims;
  Layout layout;
  bool training;
};
void PrintTo(const GradCase& c, std::ostream* os) {
  *os << DimsString(c.dims) << " " << LayoutTag(c.layout) << (c.training ? " training" : " eval");
}

std::string GradCaseName(const ::testing::TestParamInfo<GradCase>& info) {
  std::string name = info.param.training ? "train" : "eval";
  for (int64_t d : info.param.dims) (name += '_') += std::to_string(d);
  return name + "_" + LayoutTag(info.param.layout);
}

Problem RandomProblem(std::mt19937_64& rng, const GradCase& gc) {
  Problem p;
  p.g = GeometryOf(gc.dims, gc.layout);
  p.training = gc.training;
  const auto c = static_cast<size_t>(p.g.c);
  const auto numel = static_cast<size_t>(p.g.numel());
  std::vector<double> offsets(c);
  for (double& o : offsets) o = Uniform(rng, -4, 4);
  p.x.resize(numel);
  p.dy.resize(numel);
  for (int64_t i = 0; i < p.g.n; ++i)
    for (int64_t ch = 0; ch < p.g.c; ++ch)
      for (int64_t j = 0; j < p.g.s; ++j) {
        const int64_t k = IndexOf(gc.layout, p.g.c, p.g.s, i, ch, j);
        p.x[k] = offsets[ch] + Normal(rng, 0, 1.5);
        p.dy[k] = Normal(rng);
      }
  for (size_t ch = 0; ch < c; ++ch) {
    p.w.push_back(Uniform(rng, 0.5, 2.0) * (ch % 2 ? -1 : 1));
    p.b.push_back(Uniform(rng, -1, 1));
    p.rm.push_back(Uniform(rng, -2, 2));
    p.rv.push_back(Uniform(rng, 0.3, 3));
  }
  return p;
}

class FiniteDifferences : public ::testing::TestWithParam<GradCase> {};

TEST_P(FiniteDifferences, Fp64BackwardMatchesCentralDifferences) {
  const GradCase& gc = GetParam();
  BNORM_SEEDED_RNG(rng, 900 + gc.dims.size() * 4 + static_cast<int>(gc.layout) * 2 + gc.training);
  Problem p = RandomProblem(rng, gc);
  const Grads an = Analytic(p);

  std::vector<double> fd_x(p.x.size()), fd_w(p.w.size()), fd_b(p.b.size());
  for (size_t k = 0; k < p.x.size(); ++k)
    fd_x[k] = CentralDifference(&p.x, k, [&] { return Loss(p, p.x, p.w, p.b); });
  for (size_t k = 0; k < p.w.size(); ++k) {
    fd_w[k] = CentralDifference(&p.w, k, [&] { return Loss(p, p.x, p.w, p.b); });
    fd_b[k] = CentralDifference(&p.b, k, [&] { return Loss(p, p.x, p.w, p.b); });
  }
  ExpectGradientMatches(an.dx, fd_x, "dx");
  ExpectGradientMatches(an.dw, fd_w, "dweight");
  ExpectGradientMatches(an.db, fd_b, "dbias");

  // The analytic gradient is not trivially small: the check has teeth. (Not with two values per
  // channel in training: xhat = +-sqrt(var / (var + eps)) whatever x is, so dx is O(eps / var).)
  if (!gc.training || p.g.count() > 2) {
    double max_dx = 0;
    for (double v : an.dx) max_dx = std::max(max_dx, std::fabs(v));
    EXPECT_GT(max_dx, 1e-2);
  }
}

// Training-mode invariants of the fp64 backward, per channel c with n values:
//   sum_k dx_k = A/n (n S1 - n S1 - S2 sum_k xhat_k) = 0            (sum xhat = 0)
//   sum_k dx_k xhat_k = A/n (n S2 - S1 sum xhat - S2 sum xhat^2) = A S2 eps / (var + eps)
// since sum xhat^2 = n var / (var + eps). A = w invstd, S1 = sum dy, S2 = sum dy xhat.
class TrainingInvariants : public ::testing::TestWithParam<GradCase> {};

TEST_P(TrainingInvariants, SumDxAndSumDxXhat) {
  const GradCase& gc = GetParam();
  BNORM_SEEDED_RNG(rng, 1900 + gc.dims.size() * 4 + static_cast<int>(gc.layout));
  const Problem p = RandomProblem(rng, gc);
  const Grads an = Analytic(p);
  const double n = static_cast<double>(p.g.count());
  for (int64_t ch = 0; ch < p.g.c; ++ch) {
    const double a = p.w[ch] * an.invstd[ch];
    const double var = 1.0 / (an.invstd[ch] * an.invstd[ch]) - kEps;
    double sum_dx = 0, sum_dx_xhat = 0, mag = 0;
    for (int64_t i = 0; i < p.g.n; ++i)
      for (int64_t j = 0; j < p.g.s; ++j) {
        const int64_t k = IndexOf(gc.layout, p.g.c, p.g.s, i, ch, j);
        const double xhat = (p.x[k] - an.mean[ch]) * an.invstd[ch];
        sum_dx += an.dx[k];
        sum_dx_xhat += an.dx[k] * xhat;
        mag +=
            std::fabs(a) * (std::fabs(p.dy[k]) +
                            (std::fabs(an.sum_dy[ch]) + std::fabs(xhat * an.sum_dy_xhat[ch])) / n);
      }
    // fp64 rounding of n terms of size <= mag / n each: well under 1e-13 * mag for these n.
    EXPECT_TRUE(Near(sum_dx, 0.0, 1e-13 * mag, "sum dx, channel " + std::to_string(ch)));
    const double residual = a * an.sum_dy_xhat[ch] * kEps / (var + kEps);
    EXPECT_TRUE(Near(sum_dx_xhat, residual, 1e-13 * mag * std::sqrt(n),
                     "sum dx*xhat, channel " + std::to_string(ch)));
    if (n > 2) {
      EXPECT_LT(std::fabs(residual), 1e-4 * mag);  // ~0 next to the terms (see above)
    }
  }
}

std::vector<GradCase> GradCases(bool eval_too = true) {
  std::vector<GradCase> out;
  for (const std::vector<int64_t>& dims :
       {std::vector<int64_t>{2, 3}, std::vector<int64_t>{3, 2, 5}, std::vector<int64_t>{2, 3, 3, 2},
        std::vector<int64_t>{2, 2, 2, 3, 2}})
    for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast})
      for (bool training : {true, false})
        if ((dims.size() > 2 || layout == Layout::kChannelsFirst) && (training || eval_too))
          out.push_back({dims, layout, training});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Shapes, FiniteDifferences, ::testing::ValuesIn(GradCases()), GradCaseName);
INSTANTIATE_TEST_SUITE_P(Shapes, TrainingInvariants, ::testing::ValuesIn(GradCases(false)),
                         GradCaseName);

// ------------------------------------------------------------------------------------------
// The public fp32 backward against the fp64 backward.
//
// Tolerance, per element k of channel c (u = 2^-24, n = N * S, A = |w| invstd):
//  * The public backward takes the statistics from forward_train as fp32 (save_mean,
//    save_invstd): each carries a relative error <= u, so every xhat it forms is off by at most
//    u (|mean| invstd + |xhat|) <= u R, R = 1 + |mean| invstd + max |xhat|.
//  * The terms of dx_k = A/n (n dy_k - S1 - xhat_k S2) add up, in absolute value, to
//    T_k = A (|dy_k| + (|S1| + |xhat_k| |S2|) / n) with |S2| <= sum |dy| |xhat|; an error of u R
//    in every xhat moves them by at most 2 u R T'_k, T'_k = A (|dy_k| + (1 + |xhat_k|) sum |dy|
//    (1 + |xhat|) / n).
//  * Summing n fp32 terms (a kernel that accumulates in fp32) costs at most n u of the sum of
//    their absolute values; the reference accumulates in fp64 and is far below that.
//  * The final rounding of dx and of the prefactor: 2 u |dx_k| <= 2 u T_k.
//  So |dx32 - dx64| <= u (n + 4) R T'_k; the test allows 4x that. dbias: 4 u (n + 4) sum |dy|;
//  dweight: 4 u (n + 4) R sum |dy| (1 + |xhat|).
// A wrong formula is off by O(T_k), i.e. by 1 / (4 u (n + 4) R) ~ 10^4 times the tolerance here.

struct PublicCase {
  std::vector<int64_t> dims;
  Layout layout;
  double offset_spread;
};
void PrintTo(const PublicCase& c, std::ostream* os) {
  *os << DimsString(c.dims) << " " << LayoutTag(c.layout) << " offsets +-" << c.offset_spread;
}

void CheckPublicTraining(const PublicCase& pc, std::mt19937_64& rng) {
  const int64_t c = pc.dims[1];
  const Tensor x = RandomTensor(rng, pc.dims, pc.layout, ChannelOffsets(c, pc.offset_spread), 1.5);
  const Tensor dy = RandomTensor(rng, pc.dims, pc.layout);
  const std::vector<float> w = RandomVector(rng, c, -2, 2), b = RandomVector(rng, c, -1, 1);

  // fp64 problem on exactly the same (fp32-representable) values.
  Problem p;
  p.g = GeometryOf(pc.dims, pc.layout);
  p.training = true;
  p.x.assign(x.data.begin(), x.data.end());
  p.dy.assign(dy.data.begin(), dy.data.end());
  p.w.assign(w.begin(), w.end());
  p.b.assign(b.begin(), b.end());
  const Grads want = Analytic(p);
  const double n = static_cast<double>(p.g.count());

  for (bnorm::Backend backend : {bnorm::Backend::kAuto, bnorm::Backend::kReference}) {
    SCOPED_TRACE(::testing::Message() << "backend " << static_cast<int>(backend));
    bnorm::CallOptions o;
    o.backend = backend;
    Tensor y(pc.dims, pc.layout), dx(pc.dims, pc.layout);
    std::vector<float> sm(c), si(c), dw(c), db(c);
    bnorm::ForwardTrainArgs f;
    f.x = x.cview();
    f.y = y.view();
    f.weight = w;
    f.bias = b;
    f.save_mean = sm;
    f.save_invstd = si;
    ASSERT_TRUE(IsOk(bnorm::forward_train(f, o)));
    bnorm::BackwardArgs a;
    a.dy = dy.cview();
    a.x = x.cview();
    a.weight = w;
    a.training = true;
    a.save_mean = sm;
    a.save_invstd = si;
    a.dx = dx.view();
    a.dweight = dw;
    a.dbias = db;
    ASSERT_TRUE(IsOk(bnorm::backward(a, o)));

    for (int64_t ch = 0; ch < c; ++ch) {
      const double inv = want.invstd[ch], m = want.mean[ch], aa = std::fabs(w[ch]) * inv;
      double max_xhat = 0, sum_dy_abs = 0, sum_dy_1xhat = 0;
      for (int64_t i = 0; i < p.g.n; ++i)
        for (int64_t j = 0; j < p.g.s; ++j) {
          const int64_t k = x.index(i, ch, j);
          const double xhat = std::fabs((p.x[k] - m) * inv);
          max_xhat = std::max(max_xhat, xhat);
          sum_dy_abs += std::fabs(p.dy[k]);
          sum_dy_1xhat += std::fabs(p.dy[k]) * (1 + xhat);
        }
      const double r = 1 + std::fabs(m) * inv + max_xhat;
      const double bound = kFloatU * (n + 4);
      double sum_tol = 0, sum_tol_xhat = 0, sum_dx = 0, sum_dx_xhat = 0;
      for (int64_t i = 0; i < p.g.n; ++i)
        for (int64_t j = 0; j < p.g.s; ++j) {
          const int64_t k = x.index(i, ch, j);
          const double xhat = (p.x[k] - m) * inv;
          const double t = aa * (std::fabs(p.dy[k]) + (1 + std::fabs(xhat)) * sum_dy_1xhat / n);
          const double tol = 4 * bound * r * t;
          ASSERT_TRUE(Near(dx.data[k], want.dx[k], tol,
                           "dx at (" + std::to_string(i) + ", " + std::to_string(ch) + ", " +
                               std::to_string(j) + ")"));
          sum_tol += tol;
          sum_tol_xhat += tol * std::fabs(xhat);
          sum_dx += dx.data[k];
          sum_dx_xhat += dx.data[k] * xhat;
        }
      EXPECT_TRUE(
          Near(db[ch], want.db[ch], 4 * bound * sum_dy_abs, "dbias[" + std::to_string(ch) + "]"));
      EXPECT_TRUE(Near(dw[ch], want.dw[ch], 4 * bound * r * sum_dy_1xhat,
                       "dweight[" + std::to_string(ch) + "]"));
      // The invariants hold for the fp32 result within the summed element tolerances.
      const double var = 1 / (inv * inv) - kEps;
      const double residual = w[ch] * inv * want.sum_dy_xhat[ch] * kEps / (var + kEps);
      EXPECT_TRUE(Near(sum_dx, 0.0, sum_tol, "fp32 sum dx, channel " + std::to_string(ch)));
      EXPECT_TRUE(Near(sum_dx_xhat, residual, sum_tol_xhat,
                       "fp32 sum dx*xhat, channel " + std::to_string(ch)));
    }
  }
}

void CheckPublicEval(const PublicCase& pc, std::mt19937_64& rng) {
  const int64_t c = pc.dims[1];
  const Tensor x = RandomTensor(rng, pc.dims, pc.layout, ChannelOffsets(c, pc.offset_spread), 1.5);
  const Tensor dy = RandomTensor(rng, pc.dims, pc.layout);
  const std::vector<float> w = RandomVector(rng, c, -2, 2);
  const std::vector<float> rm = RandomVector(rng, c, -3, 3), rv = RandomVector(rng, c, 0.2, 4);
  Problem p;
  p.g = GeometryOf(pc.dims, pc.layout);
  p.training = false;
  p.x.assign(x.data.begin(), x.data.end());
  p.dy.assign(dy.data.begin(), dy.data.end());
  p.w.assign(w.begin(), w.end());
  p.b.assign(c, 0.0);
  p.rm.assign(rm.begin(), rm.end());
  p.rv.assign(rv.begin(), rv.end());
  const Grads want = Analytic(p);
  const double n = static_cast<double>(p.g.count());

  Tensor dx(pc.dims, pc.layout);
  std::vector<float> dw(c), db(c);
  bnorm::BackwardArgs a;
  a.dy = dy.cview();
  a.x = x.cview();
  a.weight = w;
  a.training = false;
  a.running_mean = rm;
  a.running_var = rv;
  a.dx = dx.view();
  a.dweight = dw;
  a.dbias = db;
  ASSERT_TRUE(IsOk(bnorm::backward(a)));
  for (int64_t ch = 0; ch < c; ++ch) {
    const double aa = std::fabs(w[ch]) * want.invstd[ch];
    double sum_dy_abs = 0, sum_dy_xhat_abs = 0;
    for (int64_t i = 0; i < p.g.n; ++i)
      for (int64_t j = 0; j < p.g.s; ++j) {
        const int64_t k = x.index(i, ch, j);
        // dx = dy * w * invstd: a product of three exact inputs and 1/sqrt, rounded: <= 4 u,
        // x4 for kernels that form invstd in fp32.
        ASSERT_TRUE(Near(dx.data[k], want.dx[k], 16 * kFloatU * aa * std::fabs(p.dy[k]), "dx"));
        const double xhat = std::fabs((p.x[k] - rm[ch]) * want.invstd[ch]);
        sum_dy_abs += std::fabs(p.dy[k]);
        sum_dy_xhat_abs += std::fabs(p.dy[k]) * (1 + xhat + std::fabs(rm[ch]) * want.invstd[ch]);
      }
    EXPECT_TRUE(Near(db[ch], want.db[ch], 4 * kFloatU * (n + 4) * sum_dy_abs, "dbias"));
    EXPECT_TRUE(Near(dw[ch], want.dw[ch], 4 * kFloatU * (n + 4) * sum_dy_xhat_abs, "dweight"));
  }
}

class PublicBackward : public ::testing::TestWithParam<PublicCase> {};

TEST_P(PublicBackward, Fp32MatchesFp64InTrainingMode) {
  const PublicCase& pc = GetParam();
  BNORM_SEEDED_RNG(rng, 3000 + pc.dims.size() * 8 + static_cast<int>(pc.layout) * 3 +
                            static_cast<int>(pc.offset_spread));
  CheckPublicTraining(pc, rng);
}

TEST_P(PublicBackward, Fp32MatchesFp64InEvalMode) {
  const PublicCase& pc = GetParam();
  BNORM_SEEDED_RNG(rng, 4000 + pc.dims.size() * 8 + static_cast<int>(pc.layout) * 3);
  CheckPublicEval(pc, rng);
}

// Random shapes (odd channel counts and spatial sizes, tiny and larger batches, both layouts):
// where vectorized kernels keep their remainder loops.
TEST(PublicBackwardSweep, RandomShapesMatchFp64) {
  BNORM_SEEDED_RNG(rng, 4500);
  for (int trial = 0; trial < 120; ++trial) {
    PublicCase pc;
    const int rank = 2 + static_cast<int>(rng() % 4);
    pc.dims.push_back(1 + static_cast<int64_t>(rng() % 5));
    pc.dims.push_back(1 + static_cast<int64_t>(rng() % 37));
    for (int d = 2; d < rank; ++d) pc.dims.push_back(1 + static_cast<int64_t>(rng() % 6));
    if (pc.dims[0] * SpatialOf(pc.dims) < 2) pc.dims[0] = 2;
    pc.layout = rng() % 2 ? Layout::kChannelsLast : Layout::kChannelsFirst;
    pc.offset_spread = Uniform(rng, 0, 20);
    SCOPED_TRACE(::testing::Message() << "trial " << trial << ": " << DimsString(pc.dims) << " "
                                      << LayoutTag(pc.layout));
    CheckPublicTraining(pc, rng);
    CheckPublicEval(pc, rng);
    if (::testing::Test::HasFailure()) return;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, PublicBackward,
                         ::testing::Values(PublicCase{{2, 3}, Layout::kChannelsFirst, 2},
                                           PublicCase{{3, 2, 5}, Layout::kChannelsLast, 2},
                                           PublicCase{{2, 3, 3, 2}, Layout::kChannelsFirst, 2},
                                           PublicCase{{2, 2, 2, 3, 2}, Layout::kChannelsLast, 2},
                                           PublicCase{{16, 5}, Layout::kChannelsFirst, 20},
                                           PublicCase{{8, 4, 16}, Layout::kChannelsLast, 50},
                                           PublicCase{{4, 3, 5, 7}, Layout::kChannelsFirst, 8},
                                           PublicCase{{4, 3, 5, 7}, Layout::kChannelsLast, 8},
                                           PublicCase{{2, 3, 4, 3, 5}, Layout::kChannelsLast, 3}),
                         [](const ::testing::TestParamInfo<PublicCase>& info) {
                           std::string name = "shape";
                           for (int64_t d : info.param.dims) (name += '_') += std::to_string(d);
                           return name + "_" + LayoutTag(info.param.layout);
                         });

// ------------------------------------------------------------------------------------------
// Backward in place and without weight.

TEST(BackwardMisc, InPlaceIsBitIdenticalToOutOfPlace) {
  BNORM_SEEDED_RNG(rng, 5000);
  for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast})
    for (bool training : {true, false}) {
      SCOPED_TRACE(::testing::Message() << LayoutTag(layout) << (training ? " training" : " eval"));
      const std::vector<int64_t> dims = {3, 4, 2, 5};
      const Tensor x = RandomTensor(rng, dims, layout, ChannelOffsets(4, 3), 2);
      const Tensor dy = RandomTensor(rng, dims, layout);
      const std::vector<float> w = RandomVector(rng, 4, -2, 2), sm = RandomVector(rng, 4, -3, 3),
                               si = RandomVector(rng, 4, 0.3, 2), rm = RandomVector(rng, 4, -1, 1),
                               rv = RandomVector(rng, 4, 0.5, 2);
      auto args = [&](const Tensor& dyv, const Tensor& xv, Tensor* dx, std::vector<float>* dw,
                      std::vector<float>* db) {
        bnorm::BackwardArgs a;
        a.dy = dyv.cview();
        a.x = xv.cview();
        a.weight = w;
        a.training = training;
        if (training) {
          a.save_mean = sm;
          a.save_invstd = si;
        } else {
          a.running_mean = rm;
          a.running_var = rv;
        }
        a.dx = dx->view();
        a.dweight = *dw;
        a.dbias = *db;
        return a;
      };
      Tensor out(dims, layout);
      std::vector<float> dw1(4), db1(4), dw2(4), db2(4), dw3(4), db3(4);
      ASSERT_TRUE(IsOk(bnorm::backward(args(dy, x, &out, &dw1, &db1))));
      Tensor dy_inplace = dy;  // dx aliases dy
      ASSERT_TRUE(IsOk(bnorm::backward(args(dy_inplace, x, &dy_inplace, &dw2, &db2))));
      EXPECT_TRUE(BitIdentical(out.data, dy_inplace.data));
      EXPECT_TRUE(BitIdentical(dw1, dw2));
      EXPECT_TRUE(BitIdentical(db1, db2));
      Tensor x_inplace = x;  // dx aliases x
      ASSERT_TRUE(IsOk(bnorm::backward(args(dy, x_inplace, &x_inplace, &dw3, &db3))));
      EXPECT_TRUE(BitIdentical(out.data, x_inplace.data));
      EXPECT_TRUE(BitIdentical(dw1, dw3));
      EXPECT_TRUE(BitIdentical(db1, db3));
    }
}

TEST(BackwardMisc, AbsentWeightIsOneAndGradOutputsAreOptional) {
  BNORM_SEEDED_RNG(rng, 5100);
  const std::vector<int64_t> dims = {4, 3, 6};
  const Tensor x = RandomTensor(rng, dims, Layout::kChannelsLast, ChannelOffsets(3, 1), 1);
  const Tensor dy = RandomTensor(rng, dims, Layout::kChannelsLast);
  const std::vector<float> ones(3, 1.0f), sm = RandomVector(rng, 3, -1, 1),
                                          si = RandomVector(rng, 3, 0.5, 2);
  Tensor dx1(dims, Layout::kChannelsLast), dx2(dims, Layout::kChannelsLast);
  std::vector<float> dw(3), db(3);
  bnorm::BackwardArgs a;
  a.dy = dy.cview();
  a.x = x.cview();
  a.save_mean = sm;
  a.save_invstd = si;
  a.dx = dx1.view();
  ASSERT_TRUE(IsOk(bnorm::backward(a)));  // no weight, no dweight/dbias
  a.weight = ones;
  a.dx = dx2.view();
  a.dweight = dw;
  a.dbias = db;
  ASSERT_TRUE(IsOk(bnorm::backward(a)));
  for (size_t k = 0; k < dx1.data.size(); ++k)
    EXPECT_NEAR(dx1.data[k], dx2.data[k], 1e-6 * (1 + std::fabs(dx2.data[k])));
}

}  // namespace
}  // namespace bnorm_test
