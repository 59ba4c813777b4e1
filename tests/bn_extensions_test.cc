// The batch-norm extensions (docs/batch_norm.md, "Extensions"): freeze switches, the stateless
// training forward, batch renormalization and ghost batch norm, through the functional passes,
// the layer and the C API.
//
// Every backward is checked twice: an fp64 analytic backward written here from the derivation
// against central finite differences of an fp64 forward written here (what the backward should
// be), and the library's fp32 backward against that fp64 backward evaluated at the statistics the
// library saved (what it is, within fp32 roundoff). Forwards are checked against the fp64 forward
// at the saved statistics, and the saved statistics against the fp64 batch statistics within the
// fast kernels' documented accuracy. Bad input leaves every buffer bit-for-bit unchanged.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/c_api.h"
#include "test_util.h"

namespace bnorm_test {
namespace {

constexpr double kEps = 1e-5;

// ---------------------------------------------------------------------------------------------
// fp64 model of one channel-wise normalization y = w * (A * xhat + D) + b over an (N, C, S)
// tensor, xhat = (x - mean) * invstd. Per channel: mean, invstd and (A, D); batch: whether
// mean/invstd are the batch's (a function of x) or constants. A = r, D = d for batch renorm;
// A = 1, D = 0 otherwise. Ghost batch norm: one such model per chunk.

struct Model {
  std::vector<int64_t> dims;  // (N, C, S...)
  Layout layout = Layout::kChannelsFirst;
  bool batch = true;                 // statistics of x (else the constants mean/invstd)
  std::vector<double> mean, invstd;  // constants when !batch
  std::vector<double> r, d;          // empty: 1 and 0
  int64_t ghost = 0;                 // chunk size (0: one chunk)

  int64_t n() const { return dims[0]; }
  int64_t c() const { return dims[1]; }
  int64_t s() const { return SpatialOf(dims); }
  int64_t chunk() const { return ghost ? ghost : n(); }
  int64_t chunks() const { return (n() + chunk() - 1) / chunk(); }
  int64_t idx(int64_t i, int64_t ch, int64_t j) const { return IndexOf(layout, c(), s(), i, ch, j); }
};

// Batch statistics of samples [i0, i1) (biased variance), fp64 two-pass.
void ChunkStats(const Model& m, const std::vector<double>& x, int64_t i0, int64_t i1,
                std::vector<double>* mean, std::vector<double>* invstd) {
  mean->assign(m.c(), 0);
  invstd->assign(m.c(), 0);
  const double cnt = static_cast<double>((i1 - i0) * m.s());
  for (int64_t ch = 0; ch < m.c(); ++ch) {
    double sum = 0, sq = 0;
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = 0; j < m.s(); ++j) sum += x[m.idx(i, ch, j)];
    const double mu = sum / cnt;
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = 0; j < m.s(); ++j) sq += (x[m.idx(i, ch, j)] - mu) * (x[m.idx(i, ch, j)] - mu);
    (*mean)[ch] = mu;
    (*invstd)[ch] = 1.0 / std::sqrt(sq / cnt + kEps);
  }
}

// The statistics chunk k uses: the batch's (of x) or the constants.
void StatsOf(const Model& m, const std::vector<double>& x, int64_t k, std::vector<double>* mean,
             std::vector<double>* invstd) {
  if (!m.batch) {
    *mean = m.mean;
    *invstd = m.invstd;
    return;
  }
  ChunkStats(m, x, k * m.chunk(), std::min(m.n(), (k + 1) * m.chunk()), mean, invstd);
}

std::vector<double> Forward(const Model& m, const std::vector<double>& x,
                            const std::vector<double>& w, const std::vector<double>& b) {
  std::vector<double> y(x.size()), mean, invstd;
  for (int64_t k = 0; k < m.chunks(); ++k) {
    StatsOf(m, x, k, &mean, &invstd);
    for (int64_t i = k * m.chunk(); i < std::min(m.n(), (k + 1) * m.chunk()); ++i)
      for (int64_t ch = 0; ch < m.c(); ++ch) {
        const double a = m.r.empty() ? 1.0 : m.r[ch], dd = m.d.empty() ? 0.0 : m.d[ch];
        for (int64_t j = 0; j < m.s(); ++j) {
          const int64_t q = m.idx(i, ch, j);
          y[q] = w[ch] * (a * (x[q] - mean[ch]) * invstd[ch] + dd) + b[ch];
        }
      }
  }
  return y;
}

struct Grads {
  std::vector<double> dx, dw, db;
};

// The backward of the derivation (docs/batch_norm.md): per chunk, with A = r, D = d constant,
//   dbias = sum dy, dweight = sum dy * (A * xhat + D),
//   batch:     dx = w * A * invstd / n * (n * dy - sum dy - xhat * sum dy * xhat)
//   constants: dx = dy * w * A * invstd.
// When stats are given (K * C values, the library's saved ones) they replace the batch's.
Grads Backward(const Model& m, const std::vector<double>& x, const std::vector<double>& dy,
               const std::vector<double>& w, const std::vector<double>* saved_mean = nullptr,
               const std::vector<double>* saved_invstd = nullptr) {
  Grads g;
  g.dx.assign(x.size(), 0);
  g.dw.assign(m.c(), 0);
  g.db.assign(m.c(), 0);
  std::vector<double> mean, invstd;
  for (int64_t k = 0; k < m.chunks(); ++k) {
    StatsOf(m, x, k, &mean, &invstd);
    if (saved_mean != nullptr)
      for (int64_t ch = 0; ch < m.c(); ++ch) {
        mean[ch] = (*saved_mean)[k * m.c() + ch];
        invstd[ch] = (*saved_invstd)[k * m.c() + ch];
      }
    const int64_t i0 = k * m.chunk(), i1 = std::min(m.n(), (k + 1) * m.chunk());
    const double cnt = static_cast<double>((i1 - i0) * m.s());
    for (int64_t ch = 0; ch < m.c(); ++ch) {
      const double a = m.r.empty() ? 1.0 : m.r[ch], dd = m.d.empty() ? 0.0 : m.d[ch];
      double sdy = 0, sdyx = 0;
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = 0; j < m.s(); ++j) {
          const int64_t q = m.idx(i, ch, j);
          sdy += dy[q];
          sdyx += dy[q] * (x[q] - mean[ch]) * invstd[ch];
        }
      g.db[ch] += sdy;
      g.dw[ch] += a * sdyx + dd * sdy;
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = 0; j < m.s(); ++j) {
          const int64_t q = m.idx(i, ch, j);
          const double xhat = (x[q] - mean[ch]) * invstd[ch];
          g.dx[q] = m.batch ? w[ch] * a * invstd[ch] / cnt * (cnt * dy[q] - sdy - xhat * sdyx)
                            : dy[q] * w[ch] * a * invstd[ch];
        }
    }
  }
  return g;
}

// (L(v + h) - L(v - h)) / (the step taken), L = sum dy * y.
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

// The fp64 backward against finite differences of the fp64 forward, in x, w and b. The
// tolerance, 1e-6 of the gradient's scale, is gradient_test.cc's (its derivation applies).
void ExpectBackwardMatchesFiniteDifferences(const Model& m, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const size_t numel = static_cast<size_t>(m.n() * m.c() * m.s());
  std::vector<double> x(numel), dy(numel), w(m.c()), b(m.c());
  for (int64_t i = 0; i < m.n(); ++i)
    for (int64_t ch = 0; ch < m.c(); ++ch)
      for (int64_t j = 0; j < m.s(); ++j) x[m.idx(i, ch, j)] = 0.5 * ch + 1.5 * Normal(rng);
  for (double& v : dy) v = Normal(rng);
  for (double& v : w) v = Uniform(rng, -2, 2);
  for (double& v : b) v = Uniform(rng, -1, 1);
  auto loss = [&] {
    const std::vector<double> y = Forward(m, x, w, b);
    long double sum = 0;
    for (size_t q = 0; q < y.size(); ++q) sum += static_cast<long double>(dy[q]) * y[q];
    return static_cast<double>(sum);
  };
  const Grads g = Backward(m, x, dy, w);
  auto check = [&](std::vector<double>* v, const std::vector<double>& analytic, const char* what) {
    double scale = 1e-3;
    for (double a : analytic) scale = std::max(scale, std::fabs(a));
    for (size_t k = 0; k < v->size(); ++k) {
      const double fd = CentralDifference(v, k, loss);
      EXPECT_TRUE(Near(analytic[k], fd, 1e-6 * (std::fabs(analytic[k]) + scale),
                       std::string(what) + "[" + std::to_string(k) + "]"));
    }
  };
  check(&x, g.dx, "dx");
  check(&w, g.dw, "dweight");
  check(&b, g.db, "dbias");
}

// ---------------------------------------------------------------------------------------------
// fp32 results against the fp64 model.

std::vector<double> ToDouble(std::span<const float> v) { return {v.begin(), v.end()}; }

// Per channel c, over the elements the bound covers: R = 1 + |mean| * invstd + max |xhat|
// (the cancellation in x - mean), n the reduction length; elementwise terms are within
// 4 u (n + 4) R of their magnitude (gradient_test.cc's bound).
struct Bound {
  double u_n_r;  // 4 u (n + 4) R
};

Bound BoundOf(const Model& m, const std::vector<double>& x, const std::vector<double>& mean,
              const std::vector<double>& invstd, int64_t k, int64_t ch) {
  const int64_t i0 = k * m.chunk(), i1 = std::min(m.n(), (k + 1) * m.chunk());
  double max_xhat = 0;
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t j = 0; j < m.s(); ++j)
      max_xhat = std::max(max_xhat, std::fabs((x[m.idx(i, ch, j)] - mean[ch]) * invstd[ch]));
  const double r = 1 + std::fabs(mean[ch]) * invstd[ch] + max_xhat;
  return {4 * kFloatU * static_cast<double>((i1 - i0) * m.s() + 4) * r};
}

// The library's y against the model's forward at the statistics the library saved (K * C).
void ExpectForwardNear(const Model& m0, const Tensor& x, const std::vector<float>& w,
                       const std::vector<float>& b, const std::vector<double>& mean,
                       const std::vector<double>& invstd, const Tensor& y) {
  const std::vector<double> xd = ToDouble(x.data), wd = ToDouble(w), bd = ToDouble(b);
  for (int64_t k = 0; k < m0.chunks(); ++k) {
    Model m = m0;
    m.batch = false;
    m.mean.assign(mean.begin() + k * m.c(), mean.begin() + (k + 1) * m.c());
    m.invstd.assign(invstd.begin() + k * m.c(), invstd.begin() + (k + 1) * m.c());
    m.ghost = 0;
    const std::vector<double> want = Forward(m, xd, wd, bd);
    for (int64_t i = k * m0.chunk(); i < std::min(m0.n(), (k + 1) * m0.chunk()); ++i)
      for (int64_t ch = 0; ch < m.c(); ++ch) {
        const Bound bound = BoundOf(m0, xd, m.mean, m.invstd, k, ch);
        const double a = m.r.empty() ? 1.0 : m.r[ch], dd = m.d.empty() ? 0.0 : m.d[ch];
        for (int64_t j = 0; j < m.s(); ++j) {
          const int64_t q = m.idx(i, ch, j);
          const double xhat = std::fabs((xd[q] - m.mean[ch]) * m.invstd[ch]);
          const double tol =
              bound.u_n_r * (std::fabs(wd[ch] * a) * (1 + xhat) + std::fabs(wd[ch] * dd) +
                             std::fabs(bd[ch]));
          ASSERT_TRUE(Near(y.data[q], want[q], tol, "y at (" + std::to_string(i) + ", " +
                                                        std::to_string(ch) + ", " +
                                                        std::to_string(j) + ")"));
        }
      }
  }
}

// The library's saved statistics (K * C) against the fp64 batch statistics of each chunk, within
// the fast kernels' accuracy (test_util.h) plus the fp32 rounding.
void ExpectSavedStatsNear(const Model& m, const Tensor& x, const std::vector<float>& save_mean,
                          const std::vector<float>& save_invstd) {
  const std::vector<double> xd = ToDouble(x.data);
  std::vector<double> mean, invstd;
  for (int64_t k = 0; k < m.chunks(); ++k) {
    ChunkStats(m, xd, k * m.chunk(), std::min(m.n(), (k + 1) * m.chunk()), &mean, &invstd);
    for (int64_t ch = 0; ch < m.c(); ++ch) {
      const double sd = 1 / invstd[ch];
      EXPECT_TRUE(Near(save_mean[k * m.c() + ch], mean[ch],
                       kMeanStdTol * sd + 4 * kFloatU * std::fabs(mean[ch]), "save_mean"));
      EXPECT_TRUE(Near(save_invstd[k * m.c() + ch], invstd[ch],
                       (kVarRelTol + 8 * kFloatU) * invstd[ch], "save_invstd"));
    }
  }
}

// The library's dx, dweight, dbias against the model's backward at the saved statistics.
void ExpectBackwardNear(const Model& m, const Tensor& x, const Tensor& dy,
                        const std::vector<float>& w, const std::vector<double>& mean,
                        const std::vector<double>& invstd, const Tensor& dx,
                        const std::vector<float>* dw, const std::vector<float>* db) {
  const std::vector<double> xd = ToDouble(x.data), dyd = ToDouble(dy.data), wd = ToDouble(w);
  const Grads want = Backward(m, xd, dyd, wd, &mean, &invstd);
  std::vector<double> tol_w(m.c(), 0), tol_b(m.c(), 0);
  for (int64_t k = 0; k < m.chunks(); ++k) {
    std::vector<double> mk(mean.begin() + k * m.c(), mean.begin() + (k + 1) * m.c());
    std::vector<double> ik(invstd.begin() + k * m.c(), invstd.begin() + (k + 1) * m.c());
    const int64_t i0 = k * m.chunk(), i1 = std::min(m.n(), (k + 1) * m.chunk());
    const double cnt = static_cast<double>((i1 - i0) * m.s());
    for (int64_t ch = 0; ch < m.c(); ++ch) {
      const Bound bound = BoundOf(m, xd, mk, ik, k, ch);
      const double a = m.r.empty() ? 1.0 : m.r[ch], dd = m.d.empty() ? 0.0 : m.d[ch];
      double s1 = 0, sabs = 0;
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = 0; j < m.s(); ++j) {
          const int64_t q = m.idx(i, ch, j);
          const double xhat = std::fabs((xd[q] - mk[ch]) * ik[ch]);
          s1 += std::fabs(dyd[q]) * (1 + xhat);
          sabs += std::fabs(dyd[q]);
        }
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = 0; j < m.s(); ++j) {
          const int64_t q = m.idx(i, ch, j);
          const double xhat = std::fabs((xd[q] - mk[ch]) * ik[ch]);
          const double t = std::fabs(wd[ch] * a) * ik[ch] *
                           (std::fabs(dyd[q]) + (m.batch ? (1 + xhat) * s1 / cnt : 0.0));
          ASSERT_TRUE(Near(dx.data[q], want.dx[q], 2 * bound.u_n_r * t,
                           "dx at (" + std::to_string(i) + ", " + std::to_string(ch) + ", " +
                               std::to_string(j) + ")"));
        }
      tol_w[ch] += 2 * bound.u_n_r * (std::fabs(a) * s1 + std::fabs(dd) * sabs);
      tol_b[ch] += 2 * bound.u_n_r * sabs;
    }
  }
  for (int64_t ch = 0; ch < m.c(); ++ch) {
    if (dw != nullptr) {
      EXPECT_TRUE(Near((*dw)[ch], want.dw[ch], tol_w[ch], "dweight[" + std::to_string(ch) + "]"));
    }
    if (db != nullptr) {
      EXPECT_TRUE(Near((*db)[ch], want.db[ch], tol_b[ch], "dbias[" + std::to_string(ch) + "]"));
    }
  }
}

struct Shape {
  std::vector<int64_t> dims;
  Layout layout;
};

std::vector<Shape> Shapes() {
  return {{{6, 3}, Layout::kChannelsFirst},
          {{5, 2, 7}, Layout::kChannelsFirst},
          {{4, 3, 3, 5}, Layout::kChannelsLast},
          {{7, 4, 2, 3}, Layout::kChannelsFirst},
          {{3, 2, 2, 2, 3}, Layout::kChannelsLast}};
}

Model ModelOf(const Shape& sh) {
  Model m;
  m.dims = sh.dims;
  m.layout = sh.layout;
  return m;
}

// ---------------------------------------------------------------------------------------------
// Finite differences of every backward the extensions add.

TEST(ExtensionGradients, FrozenStatisticsBackwardMatchesFiniteDifferences) {
  for (const Shape& sh : Shapes()) {
    SCOPED_TRACE(DimsString(sh.dims));
    Model m = ModelOf(sh);
    m.batch = false;
    for (int64_t ch = 0; ch < m.c(); ++ch) {
      m.mean.push_back(0.3 * ch - 0.2);
      m.invstd.push_back(1.0 / std::sqrt(0.5 + ch + kEps));
    }
    ExpectBackwardMatchesFiniteDifferences(m, 11);
  }
}

TEST(ExtensionGradients, BatchRenormBackwardMatchesFiniteDifferences) {
  // r and d are constants of the backward: the finite differences hold them fixed.
  for (const Shape& sh : Shapes()) {
    SCOPED_TRACE(DimsString(sh.dims));
    Model m = ModelOf(sh);
    for (int64_t ch = 0; ch < m.c(); ++ch) {
      m.r.push_back(0.5 + 0.7 * ch);
      m.d.push_back(0.4 - 0.3 * ch);
    }
    ExpectBackwardMatchesFiniteDifferences(m, 12);
  }
}

TEST(ExtensionGradients, GhostBackwardMatchesFiniteDifferences) {
  for (const Shape& sh : Shapes()) {
    for (int64_t ghost : {int64_t{2}, int64_t{3}}) {
      SCOPED_TRACE(DimsString(sh.dims) + " G " + std::to_string(ghost));
      Model m = ModelOf(sh);
      m.ghost = ghost;
      if (m.n() % ghost != 0 && (m.n() % ghost) * m.s() < 2) continue;  // refused (BadInput)
      ExpectBackwardMatchesFiniteDifferences(m, 13);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Part 1: freeze switches on the layer, every combination.

struct LayerRun {
  Tensor y, dx;
  std::vector<float> rm, rv, wg, bg;
  int64_t nbt = 0;
};

TEST(Freeze, EveryCombinationOfTheThreeSwitches) {
  BNORM_SEEDED_RNG(rng, 21);
  for (const Shape& sh : Shapes()) {
    const int64_t c = sh.dims[1];
    const Tensor x = RandomTensor(rng, sh.dims, sh.layout, ChannelOffsets(c, 2.0), 1.5);
    const Tensor dy = RandomTensor(rng, sh.dims, sh.layout);
    const std::vector<float> w = RandomVector(rng, c, -2, 2), b = RandomVector(rng, c, -1, 1);
    const std::vector<float> rm0 = RandomVector(rng, c, -1, 1), rv0 = RandomVector(rng, c, 0.5, 2);
    for (int combo = 0; combo < 8; ++combo) {
      const bool normalize = combo & 1, freeze_stats = combo & 2, freeze_affine = combo & 4;
      SCOPED_TRACE(DimsString(sh.dims) + " normalize_with_running_stats " +
                   std::to_string(normalize) + " freeze_running_stats " +
                   std::to_string(freeze_stats) + " freeze_affine " +
                   std::to_string(freeze_affine));
      bnorm::BatchNormOptions o;
      o.num_features = c;
      bnorm::BatchNorm layer;
      ASSERT_TRUE(IsOk(bnorm::BatchNorm::create(o, &layer)));
      ASSERT_TRUE(IsOk(layer.set_freeze(normalize, freeze_stats, freeze_affine)));
      std::copy(w.begin(), w.end(), layer.weight().begin());
      std::copy(b.begin(), b.end(), layer.bias().begin());
      std::copy(rm0.begin(), rm0.end(), layer.running_mean().begin());
      std::copy(rv0.begin(), rv0.end(), layer.running_var().begin());
      layer.set_num_batches_tracked(5);
      std::fill(layer.weight_grad().begin(), layer.weight_grad().end(), 0.25f);
      Tensor y(sh.dims, sh.layout), dx(sh.dims, sh.layout);
      ASSERT_TRUE(IsOk(layer.forward(x.cview(), y.view())));
      ASSERT_TRUE(IsOk(layer.backward(dy.cview(), x.cview(), dx.view())));

      // The running statistics: bitwise the plain training forward's update, or untouched.
      std::vector<float> rm = rm0, rv = rv0, sm(c), si(c);
      int64_t nbt = 5;
      Tensor scratch(sh.dims, sh.layout);
      bnorm::ForwardTrainArgs t;
      t.x = x.cview();
      t.y = scratch.view();
      t.running_mean = rm;
      t.running_var = rv;
      t.num_batches_tracked = &nbt;
      t.save_mean = sm;
      t.save_invstd = si;
      ASSERT_TRUE(IsOk(bnorm::forward_train(t)));
      if (freeze_stats) {
        EXPECT_TRUE(BitIdentical(layer.running_mean(), rm0));
        EXPECT_TRUE(BitIdentical(layer.running_var(), rv0));
        EXPECT_EQ(layer.num_batches_tracked(), 5);
      } else {
        EXPECT_TRUE(BitIdentical(layer.running_mean(), rm));
        EXPECT_TRUE(BitIdentical(layer.running_var(), rv));
        EXPECT_EQ(layer.num_batches_tracked(), 6);
      }

      // y and the gradients: the model with the statistics normalized with.
      Model m = ModelOf(sh);
      std::vector<double> mean, invstd;
      if (normalize) {
        m.batch = false;
        for (int64_t ch = 0; ch < c; ++ch) {
          mean.push_back(rm0[ch]);
          invstd.push_back(1.0 / std::sqrt(static_cast<double>(rv0[ch]) + kEps));
        }
        m.mean = mean;
        m.invstd = invstd;
      } else {
        mean = ToDouble(sm);
        invstd = ToDouble(si);
        ExpectSavedStatsNear(m, x, sm, si);
      }
      ExpectForwardNear(m, x, w, b, mean, invstd, y);
      std::vector<float> dw(c), db(c);
      for (int64_t ch = 0; ch < c; ++ch) {
        dw[ch] = layer.weight_grad()[ch] - 0.25f;
        db[ch] = layer.bias_grad()[ch];
      }
      if (freeze_affine) {
        for (int64_t ch = 0; ch < c; ++ch) {
          EXPECT_EQ(layer.weight_grad()[ch], 0.25f) << "frozen weight_grad changed";
          EXPECT_EQ(layer.bias_grad()[ch], 0.0f) << "frozen bias_grad changed";
        }
        ExpectBackwardNear(m, x, dy, w, mean, invstd, dx, nullptr, nullptr);
      } else {
        // dw went through one fp32 addition to 0.25: one more rounding of its magnitude.
        ExpectBackwardNear(m, x, dy, w, mean, invstd, dx, nullptr, &db);
        const Grads want = Backward(m, ToDouble(x.data), ToDouble(dy.data), ToDouble(w), &mean,
                                    &invstd);
        for (int64_t ch = 0; ch < c; ++ch)
          EXPECT_NEAR(dw[ch], want.dw[ch], 1e-4 * (1 + std::fabs(want.dw[ch])));
      }
      // Eval mode is unchanged by the switches: the running statistics, as forward_eval.
      layer.eval();
      Tensor ye(sh.dims, sh.layout), ye_want(sh.dims, sh.layout);
      ASSERT_TRUE(IsOk(layer.forward(x.cview(), ye.view())));
      bnorm::ForwardEvalArgs e;
      e.x = x.cview();
      e.weight = w;
      e.bias = b;
      e.running_mean = layer.running_mean();
      e.running_var = layer.running_var();
      e.y = ye_want.view();
      ASSERT_TRUE(IsOk(bnorm::forward_eval(e)));
      EXPECT_TRUE(BitIdentical(ye.data, ye_want.data));
    }
  }
}

TEST(Freeze, NormalizeWithRunningStatsInPlaceEqualsOutOfPlace) {
  BNORM_SEEDED_RNG(rng, 22);
  const std::vector<int64_t> dims = {4, 3, 5};
  const Tensor x = RandomTensor(rng, dims, Layout::kChannelsFirst, ChannelOffsets(3, 1.0));
  bnorm::BatchNormOptions o;
  o.num_features = 3;
  o.normalize_with_running_stats = true;
  bnorm::BatchNorm a, b;
  ASSERT_TRUE(IsOk(bnorm::BatchNorm::create(o, &a)));
  ASSERT_TRUE(IsOk(bnorm::BatchNorm::create(o, &b)));
  Tensor y(dims, Layout::kChannelsFirst), inplace = x;
  ASSERT_TRUE(IsOk(a.forward(x.cview(), y.view())));
  ASSERT_TRUE(IsOk(b.forward(inplace.cview(), inplace.view())));
  EXPECT_TRUE(BitIdentical(y.data, inplace.data));
  EXPECT_TRUE(BitIdentical(a.running_mean(), b.running_mean()));
  EXPECT_TRUE(BitIdentical(a.running_var(), b.running_var()));
  EXPECT_EQ(b.num_batches_tracked(), 1);
}

TEST(Freeze, BadInputChangesNothing) {
  bnorm::BatchNormOptions o;
  o.num_features = 3;
  o.track_running_stats = false;
  o.normalize_with_running_stats = true;
  bnorm::BatchNorm layer;
  EXPECT_TRUE(IsInvalid(bnorm::BatchNorm::create(o, &layer), "normalize_with_running_stats"));
  o.normalize_with_running_stats = false;
  ASSERT_TRUE(IsOk(bnorm::BatchNorm::create(o, &layer)));
  EXPECT_TRUE(IsInvalid(layer.set_freeze(true, false, true), "normalize_with_running_stats"));
  EXPECT_FALSE(layer.options().normalize_with_running_stats);
  EXPECT_FALSE(layer.options().freeze_affine);  // nothing of the failed call applied
}

// ---------------------------------------------------------------------------------------------
// Part 2: the stateless training forward.

TEST(Stateless, WritesTheUpdateToTheOutputsAndLeavesTheInputs) {
  BNORM_SEEDED_RNG(rng, 31);
  for (const Shape& sh : Shapes()) {
    for (int variant = 0; variant < 4; ++variant) {  // plain, cumulative, renorm, ghost
      SCOPED_TRACE(DimsString(sh.dims) + " variant " + std::to_string(variant));
      const int64_t c = sh.dims[1];
      const Tensor x = RandomTensor(rng, sh.dims, sh.layout, ChannelOffsets(c, 1.0));
      const std::vector<float> w = RandomVector(rng, c, -2, 2), b = RandomVector(rng, c, -1, 1);
      const std::vector<float> rm0 = RandomVector(rng, c, -1, 1),
                               rv0 = RandomVector(rng, c, 0.5, 2);
      auto args = [&](bnorm::ForwardTrainArgs* a) {
        a->x = x.cview();
        a->weight = w;
        a->bias = b;
        if (variant == 1) a->momentum = std::nullopt;
        if (variant == 2) a->batch_renorm = true;
        if (variant == 3) a->ghost_batch = 2;
        if (variant == 3 && sh.dims[0] % 2 == 1 && SpatialOf(sh.dims) == 1) a->ghost_batch = 3;
      };
      // In place.
      std::vector<float> rm = rm0, rv = rv0;
      int64_t nbt = 3;
      Tensor y(sh.dims, sh.layout);
      bnorm::ForwardTrainArgs a;
      args(&a);
      a.running_mean = rm;
      a.running_var = rv;
      a.num_batches_tracked = &nbt;
      a.y = y.view();
      ASSERT_TRUE(IsOk(bnorm::forward_train(a)));
      // Stateless.
      std::vector<float> srm = rm0, srv = rv0, orm(c), orv(c);
      FillSentinel(orm);
      FillSentinel(orv);
      int64_t snbt = 3, onbt = -1;
      Tensor sy(sh.dims, sh.layout);
      bnorm::ForwardTrainArgs s;
      args(&s);
      s.running_mean = srm;
      s.running_var = srv;
      s.num_batches_tracked = &snbt;
      s.running_mean_out = orm;
      s.running_var_out = orv;
      s.num_batches_tracked_out = &onbt;
      s.y = sy.view();
      ASSERT_TRUE(IsOk(bnorm::forward_train(s)));
      EXPECT_TRUE(BitIdentical(srm, rm0));
      EXPECT_TRUE(BitIdentical(srv, rv0));
      EXPECT_EQ(snbt, 3);
      EXPECT_TRUE(BitIdentical(orm, rm));
      EXPECT_TRUE(BitIdentical(orv, rv));
      EXPECT_EQ(onbt, nbt);
      EXPECT_TRUE(BitIdentical(sy.data, y.data));
      // The outputs may be the inputs themselves: then it is the in-place update.
      bnorm::ForwardTrainArgs same = s;
      same.running_mean_out = srm;
      same.running_var_out = srv;
      ASSERT_TRUE(IsOk(bnorm::forward_train(same)));
      EXPECT_TRUE(BitIdentical(srm, rm));
      EXPECT_TRUE(BitIdentical(srv, rv));
    }
  }
}

TEST(Stateless, PlainStatelessUpdateIsPyTorchsFormula) {
  BNORM_SEEDED_RNG(rng, 32);
  const std::vector<int64_t> dims = {5, 3, 4};
  const Tensor x = RandomTensor(rng, dims, Layout::kChannelsLast, ChannelOffsets(3, 2.0));
  const std::vector<float> rm0 = {0.5f, -1.0f, 2.0f}, rv0 = {1.0f, 0.25f, 3.0f};
  std::vector<float> orm(3), orv(3);
  Tensor y(dims, Layout::kChannelsLast);
  bnorm::ForwardTrainArgs s;
  s.x = x.cview();
  s.running_mean = std::span<float>(const_cast<float*>(rm0.data()), 3);  // only read
  s.running_var = std::span<float>(const_cast<float*>(rv0.data()), 3);
  s.running_mean_out = orm;
  s.running_var_out = orv;
  s.momentum = 0.3;
  s.y = y.view();
  ASSERT_TRUE(IsOk(bnorm::forward_train(s)));
  const ChannelStats st = BatchStats(x);
  const double n = static_cast<double>(x.count());
  for (int ch = 0; ch < 3; ++ch) {
    const double want_m = 0.7 * rm0[ch] + 0.3 * st.mean[ch];
    const double want_v = 0.7 * rv0[ch] + 0.3 * st.var[ch] * n / (n - 1);
    EXPECT_TRUE(Near(orm[ch], want_m, 1e-5 * (1 + std::fabs(want_m)), "running_mean_out"));
    EXPECT_TRUE(Near(orv[ch], want_v, kVarRelTol * want_v + 1e-6, "running_var_out"));
  }
}

// ---------------------------------------------------------------------------------------------
// Part 3: batch renormalization.

// r, d from the saved statistics and the running ones, in fp64 (the definition).
void RenormConstants(const std::vector<float>& sm, const std::vector<float>& si,
                     const std::vector<float>& rm, const std::vector<float>& rv, double rmax,
                     double dmax, std::vector<double>* r, std::vector<double>* d) {
  r->clear();
  d->clear();
  for (size_t ch = 0; ch < sm.size(); ++ch) {
    const double sigma = std::sqrt(static_cast<double>(rv[ch]) + kEps);
    r->push_back(std::clamp(1.0 / si[ch] / sigma, 1.0 / rmax, rmax));
    d->push_back(std::clamp((sm[ch] - static_cast<double>(rm[ch])) / sigma, -dmax, dmax));
  }
}

TEST(BatchRenorm, ForwardAndBackwardMatchFp64) {
  BNORM_SEEDED_RNG(rng, 41);
  const double inf = std::numeric_limits<double>::infinity();
  for (const Shape& sh : Shapes()) {
    for (auto [rmax, dmax] : {std::pair{1.0, 0.0}, std::pair{1.5, 0.5}, std::pair{3.0, 5.0},
                              std::pair{inf, inf}}) {
      for (bnorm::Backend backend : {bnorm::Backend::kAuto, bnorm::Backend::kReference}) {
        SCOPED_TRACE(DimsString(sh.dims) + " rmax " + std::to_string(rmax) + " dmax " +
                     std::to_string(dmax) + " backend " + std::to_string(int(backend)));
        const int64_t c = sh.dims[1];
        const Tensor x = RandomTensor(rng, sh.dims, sh.layout, ChannelOffsets(c, 2.0), 1.5);
        const Tensor dy = RandomTensor(rng, sh.dims, sh.layout);
        const std::vector<float> w = RandomVector(rng, c, -2, 2), b = RandomVector(rng, c, -1, 1);
        // Running statistics far from and near the batch's: r, d clipped in some channels.
        const std::vector<float> rm0 = RandomVector(rng, c, -3, 3),
                                 rv0 = RandomVector(rng, c, 0.1, 9);
        std::vector<float> rm = rm0, rv = rv0, sm(c), si(c), sr(c), sd(c), dw(c), db(c);
        int64_t nbt = 0;
        Tensor y(sh.dims, sh.layout), dx(sh.dims, sh.layout);
        bnorm::CallOptions opt;
        opt.backend = backend;
        bnorm::ForwardTrainArgs a;
        a.x = x.cview();
        a.weight = w;
        a.bias = b;
        a.running_mean = rm;
        a.running_var = rv;
        a.num_batches_tracked = &nbt;
        a.y = y.view();
        a.save_mean = sm;
        a.save_invstd = si;
        a.batch_renorm = true;
        a.rmax = rmax;
        a.dmax = dmax;
        a.save_r = sr;
        a.save_d = sd;
        ASSERT_TRUE(IsOk(bnorm::forward_train(a, opt)));
        Model m = ModelOf(sh);
        ExpectSavedStatsNear(m, x, sm, si);
        RenormConstants(sm, si, rm0, rv0, rmax, dmax, &m.r, &m.d);
        for (int64_t ch = 0; ch < c; ++ch) {
          EXPECT_TRUE(Near(sr[ch], m.r[ch], 4 * kFloatU * m.r[ch], "save_r"));
          EXPECT_TRUE(Near(sd[ch], m.d[ch], 8 * kFloatU * (1 + std::fabs(m.d[ch])), "save_d"));
          // The model takes the rounded r, d the backward receives.
          m.r[ch] = sr[ch];
          m.d[ch] = sd[ch];
        }
        ExpectForwardNear(m, x, w, b, ToDouble(sm), ToDouble(si), y);
        // The running statistics: batch norm's update (bitwise the plain pass's).
        std::vector<float> prm = rm0, prv = rv0;
        Tensor py(sh.dims, sh.layout);
        bnorm::ForwardTrainArgs p;
        p.x = x.cview();
        p.running_mean = prm;
        p.running_var = prv;
        p.y = py.view();
        ASSERT_TRUE(IsOk(bnorm::forward_train(p, opt)));
        EXPECT_TRUE(BitIdentical(rm, prm));
        EXPECT_TRUE(BitIdentical(rv, prv));
        EXPECT_EQ(nbt, 1);
        if (rmax == 1.0 && dmax == 0.0) {  // batch norm itself, within one more rounding
          p.weight = w;
          p.bias = b;
          ASSERT_TRUE(IsOk(bnorm::forward_train(p, opt)));
          for (size_t q = 0; q < y.data.size(); ++q)
            ASSERT_NEAR(y.data[q], py.data[q], 4 * kFloatU * (8 + std::fabs(py.data[q])));
        }

        bnorm::BackwardArgs g;
        g.dy = dy.cview();
        g.x = x.cview();
        g.weight = w;
        g.save_mean = sm;
        g.save_invstd = si;
        g.renorm_r = sr;
        g.renorm_d = sd;
        g.dx = dx.view();
        g.dweight = dw;
        g.dbias = db;
        ASSERT_TRUE(IsOk(bnorm::backward(g, opt)));
        ExpectBackwardNear(m, x, dy, w, ToDouble(sm), ToDouble(si), dx, &dw, &db);
      }
    }
  }
}

TEST(BatchRenorm, LayerScheduleAndStatelessLimits) {
  BNORM_SEEDED_RNG(rng, 42);
  const std::vector<int64_t> dims = {8, 3, 4};
  bnorm::BatchNormOptions o;
  o.num_features = 3;
  o.batch_renorm = true;
  bnorm::BatchNorm layer, plain;
  ASSERT_TRUE(IsOk(bnorm::BatchNorm::create(o, &layer)));
  o.batch_renorm = false;
  ASSERT_TRUE(IsOk(bnorm::BatchNorm::create(o, &plain)));
  // The paper's schedule: r = 1, d = 0 first (batch norm), then relaxed.
  for (int step = 0; step < 6; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    const double rmax = step < 3 ? 1.0 : 1.0 + (step - 2), dmax = step < 3 ? 0.0 : step - 2.0;
    ASSERT_TRUE(IsOk(layer.set_renorm_limits(rmax, dmax)));
    const Tensor x = RandomTensor(rng, dims, Layout::kChannelsFirst, ChannelOffsets(3, 3.0), 2.0);
    const Tensor dy = RandomTensor(rng, dims, Layout::kChannelsFirst);
    Tensor y(dims, Layout::kChannelsFirst), py(dims, Layout::kChannelsFirst),
        dx(dims, Layout::kChannelsFirst), pdx(dims, Layout::kChannelsFirst);
    const std::vector<float> rm0(layer.running_mean().begin(), layer.running_mean().end()),
        rv0(layer.running_var().begin(), layer.running_var().end());
    ASSERT_TRUE(IsOk(layer.forward(x.cview(), y.view())));
    ASSERT_TRUE(IsOk(plain.forward(x.cview(), py.view())));
    // The running statistics follow batch norm's exactly (same batches, same update).
    EXPECT_TRUE(BitIdentical(layer.running_mean(), plain.running_mean()));
    EXPECT_TRUE(BitIdentical(layer.running_var(), plain.running_var()));
    const std::vector<float> sm(layer.saved_mean().begin(), layer.saved_mean().end()),
        si(layer.saved_invstd().begin(), layer.saved_invstd().end());
    std::vector<double> r, d;
    RenormConstants(sm, si, rm0, rv0, rmax, dmax, &r, &d);
    bool clipped = false;
    for (int ch = 0; ch < 3; ++ch) {
      EXPECT_LE(r[ch], rmax);
      EXPECT_LE(std::fabs(d[ch]), dmax);
      clipped |= r[ch] == rmax || r[ch] == 1 / rmax || std::fabs(d[ch]) == dmax;
    }
    if (step < 3) {
      for (size_t q = 0; q < y.data.size(); ++q)
        ASSERT_NEAR(y.data[q], py.data[q], 4 * kFloatU * (8 + std::fabs(py.data[q])));
    }
    if (step == 3) {
      EXPECT_TRUE(clipped) << "the offsets were chosen to clip at rmax 2, dmax 1";
    }
    layer.zero_grad();
    ASSERT_TRUE(IsOk(layer.backward(dy.cview(), x.cview(), dx.view())));
    Model m = ModelOf({dims, Layout::kChannelsFirst});
    m.r = r;
    m.d = d;
    const std::vector<float> w(layer.weight().begin(), layer.weight().end());
    const std::vector<float> dw(layer.weight_grad().begin(), layer.weight_grad().end()),
        db(layer.bias_grad().begin(), layer.bias_grad().end());
    ExpectBackwardNear(m, x, dy, w, ToDouble(sm), ToDouble(si), dx, &dw, &db);
  }
  // With frozen running statistics, mu and sigma stay: r, d against the same constants.
  ASSERT_TRUE(IsOk(layer.set_freeze(false, true, false)));
  const std::vector<float> rm0(layer.running_mean().begin(), layer.running_mean().end());
  const int64_t count = layer.num_batches_tracked();
  const Tensor x = RandomTensor(rng, dims, Layout::kChannelsFirst);
  Tensor y(dims, Layout::kChannelsFirst);
  ASSERT_TRUE(IsOk(layer.forward(x.cview(), y.view())));
  EXPECT_TRUE(BitIdentical(layer.running_mean(), rm0));
  EXPECT_EQ(layer.num_batches_tracked(), count);
}

TEST(BatchRenorm, BadInputWritesNothing) {
  const std::vector<int64_t> dims = {4, 2, 3};
  Tensor x(dims, Layout::kChannelsFirst, 1.0f), y(dims, Layout::kChannelsFirst);
  x.data[0] = 3;
  std::vector<float> rm = {0.5f, 0.25f}, rv = {2, 3}, sm(2), si(2), sr(2), sd(2);
  FillSentinel(y.data);
  FillSentinel(sm);
  FillSentinel(sr);
  int64_t nbt = 4;
  auto base = [&] {
    bnorm::ForwardTrainArgs a;
    a.x = x.cview();
    a.y = y.view();
    a.running_mean = rm;
    a.running_var = rv;
    a.num_batches_tracked = &nbt;
    a.save_mean = sm;
    a.save_invstd = si;
    a.batch_renorm = true;
    a.save_r = sr;
    a.save_d = sd;
    return a;
  };
  Snapshot snap;
  snap.Add("y", y.data).Add("rm", rm).Add("rv", rv).Add("sm", sm).Add("sr", sr).Add("nbt", &nbt);
  bnorm::ForwardTrainArgs a = base();
  a.rmax = 0.5;
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(a), "rmax: must be >= 1"));
  a = base();
  a.rmax = std::nan("");
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(a), "rmax: must be >= 1 (1: no rescaling), got nan"));
  a = base();
  a.dmax = -0.5;
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(a), "dmax: must be >= 0 (0: no shift), got -0.5"));
  a = base();
  a.running_mean = {};
  a.running_var = {};
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(a), "batch_renorm: requires running_mean"));
  a = base();
  a.ghost_batch = 2;
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(a), "cannot be combined with batch_renorm"));
  a = base();
  a.batch_renorm = false;
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(a), "save_r: only with batch_renorm"));
  a = base();
  a.save_d = std::span<float>(sd.data(), 1);
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(a), "save_d: must hold one value per channel"));
  EXPECT_TRUE(snap.Unchanged());

  // Backward: r without d, r in eval mode.
  Tensor dx(dims, Layout::kChannelsFirst);
  FillSentinel(dx.data);
  Snapshot snap_dx;
  snap_dx.Add("dx", dx.data);
  bnorm::BackwardArgs g;
  g.dy = x.cview();
  g.x = x.cview();
  g.save_mean = rm;
  g.save_invstd = rv;
  g.renorm_r = rm;
  g.dx = dx.view();
  EXPECT_TRUE(IsInvalid(bnorm::backward(g), "renorm_r and renorm_d: give both"));
  g.renorm_d = rv;
  g.training = false;
  g.running_mean = rm;
  g.running_var = rv;
  EXPECT_TRUE(IsInvalid(bnorm::backward(g), "renorm_r: batch renorm's backward is a training"));
  EXPECT_TRUE(snap_dx.Unchanged());

  // The layer: limits, and the combinations refused.
  bnorm::BatchNormOptions o;
  o.num_features = 2;
  o.batch_renorm = true;
  bnorm::BatchNorm layer;
  ASSERT_TRUE(IsOk(bnorm::BatchNorm::create(o, &layer)));
  EXPECT_TRUE(IsInvalid(layer.set_renorm_limits(0.9, 1), "rmax: must be >= 1"));
  EXPECT_TRUE(IsInvalid(layer.set_renorm_limits(2, -1), "dmax: must be >= 0"));
  EXPECT_EQ(layer.options().renorm_rmax, 3.0);
  EXPECT_EQ(layer.options().renorm_dmax, 5.0);
  EXPECT_TRUE(IsInvalid(layer.set_freeze(true, false, false), "batch_renorm: cannot be combined"));
  EXPECT_TRUE(IsInvalid(layer.set_ghost_batch(2), "batch_renorm: cannot be combined"));
  EXPECT_EQ(layer.options().ghost_batch, 0);
  // Switched off and on again (bnorm train's schedule); refused with nothing changed.
  ASSERT_TRUE(IsOk(layer.set_batch_renorm(false)));
  EXPECT_FALSE(layer.options().batch_renorm);
  ASSERT_TRUE(IsOk(layer.set_ghost_batch(2)));
  EXPECT_TRUE(IsInvalid(layer.set_batch_renorm(true), "batch_renorm: cannot be combined"));
  EXPECT_FALSE(layer.options().batch_renorm);
  ASSERT_TRUE(IsOk(layer.set_ghost_batch(0)));
  ASSERT_TRUE(IsOk(layer.set_batch_renorm(true)));
  EXPECT_TRUE(layer.options().batch_renorm);
  o.track_running_stats = false;
  EXPECT_TRUE(IsInvalid(bnorm::BatchNorm::create(o, &layer), "batch_renorm: needs running"));
  o.batch_renorm = false;
  ASSERT_TRUE(IsOk(bnorm::BatchNorm::create(o, &layer)));
  EXPECT_TRUE(IsInvalid(layer.set_batch_renorm(true), "batch_renorm: needs running"));
  EXPECT_FALSE(layer.options().batch_renorm);
}

// ---------------------------------------------------------------------------------------------
// Part 4: ghost batch norm.

TEST(Ghost, IsBatchNormOnContiguousChunksWithOneUpdatePerChunk) {
  BNORM_SEEDED_RNG(rng, 51);
  for (const Shape& sh : Shapes()) {
    for (int64_t ghost : {int64_t{2}, int64_t{3}, sh.dims[0]}) {
      for (bool cumulative : {false, true}) {
        const int64_t n = sh.dims[0], c = sh.dims[1], s = SpatialOf(sh.dims);
        if (n % ghost != 0 && (n % ghost) * s < 2) continue;  // refused (BadInput)
        SCOPED_TRACE(DimsString(sh.dims) + " G " + std::to_string(ghost) + " cumulative " +
                     std::to_string(cumulative));
        const Tensor x = RandomTensor(rng, sh.dims, sh.layout, ChannelOffsets(c, 1.0), 1.5);
        const Tensor dy = RandomTensor(rng, sh.dims, sh.layout);
        const std::vector<float> w = RandomVector(rng, c, -2, 2), b = RandomVector(rng, c, -1, 1);
        const int64_t k_chunks = (n + ghost - 1) / ghost;
        std::vector<float> rm(c, 0.5f), rv(c, 2.0f), sm(k_chunks * c), si(k_chunks * c), dw(c),
            db(c);
        int64_t nbt = 7;
        Tensor y(sh.dims, sh.layout), dx(sh.dims, sh.layout);
        bnorm::ForwardTrainArgs a;
        a.x = x.cview();
        a.weight = w;
        a.bias = b;
        a.running_mean = rm;
        a.running_var = rv;
        a.num_batches_tracked = &nbt;
        if (cumulative) a.momentum = std::nullopt;
        a.y = y.view();
        a.save_mean = sm;
        a.save_invstd = si;
        a.ghost_batch = ghost;
        ASSERT_TRUE(IsOk(bnorm::forward_train(a)));
        bnorm::BackwardArgs g;
        g.dy = dy.cview();
        g.x = x.cview();
        g.weight = w;
        g.save_mean = sm;
        g.save_invstd = si;
        g.ghost_batch = ghost;
        g.dx = dx.view();
        g.dweight = dw;
        g.dbias = db;
        ASSERT_TRUE(IsOk(bnorm::backward(g)));

        // The same as the plain passes on each chunk in order (a chunk is a contiguous range).
        std::vector<float> crm(c, 0.5f), crv(c, 2.0f);
        int64_t cnbt = 7;
        std::vector<double> sum_dw(c, 0), sum_db(c, 0);
        const int64_t per_sample = c * s;
        for (int64_t k = 0; k < k_chunks; ++k) {
          const int64_t nk = std::min(ghost, n - k * ghost);
          std::vector<int64_t> cd = sh.dims;
          cd[0] = nk;
          const size_t off = static_cast<size_t>(k * ghost * per_sample);
          Tensor cy(cd, sh.layout), cdx(cd, sh.layout);
          std::vector<float> csm(c), csi(c), cdw(c), cdb(c);
          bnorm::ForwardTrainArgs p;
          p.x = bnorm::ConstTensorView(x.data.data() + off, cd, sh.layout);
          p.weight = w;
          p.bias = b;
          p.running_mean = crm;
          p.running_var = crv;
          p.num_batches_tracked = &cnbt;
          if (cumulative) p.momentum = std::nullopt;
          p.y = cy.view();
          p.save_mean = csm;
          p.save_invstd = csi;
          ASSERT_TRUE(IsOk(bnorm::forward_train(p)));
          EXPECT_TRUE(BitIdentical(std::span<const float>(y.data.data() + off, cy.data.size()),
                                   cy.data));
          EXPECT_TRUE(BitIdentical(std::span<const float>(sm.data() + k * c, c), csm));
          EXPECT_TRUE(BitIdentical(std::span<const float>(si.data() + k * c, c), csi));
          bnorm::BackwardArgs q;
          q.dy = bnorm::ConstTensorView(dy.data.data() + off, cd, sh.layout);
          q.x = p.x;
          q.weight = w;
          q.save_mean = csm;
          q.save_invstd = csi;
          q.dx = cdx.view();
          q.dweight = cdw;
          q.dbias = cdb;
          ASSERT_TRUE(IsOk(bnorm::backward(q)));
          EXPECT_TRUE(BitIdentical(std::span<const float>(dx.data.data() + off, cdx.data.size()),
                                   cdx.data));
          for (int64_t ch = 0; ch < c; ++ch) {
            sum_dw[ch] += cdw[ch];
            sum_db[ch] += cdb[ch];
          }
        }
        EXPECT_TRUE(BitIdentical(rm, crm));
        EXPECT_TRUE(BitIdentical(rv, crv));
        EXPECT_EQ(nbt, 7 + k_chunks);
        EXPECT_EQ(nbt, cnbt);
        for (int64_t ch = 0; ch < c; ++ch) {
          EXPECT_EQ(dw[ch], static_cast<float>(sum_dw[ch]));
          EXPECT_EQ(db[ch], static_cast<float>(sum_db[ch]));
        }
        // And against the fp64 model.
        Model m = ModelOf(sh);
        m.ghost = ghost;
        ExpectSavedStatsNear(m, x, sm, si);
        ExpectForwardNear(m, x, w, b, ToDouble(sm), ToDouble(si), y);
        ExpectBackwardNear(m, x, dy, w, ToDouble(sm), ToDouble(si), dx, &dw, &db);
      }
    }
  }
}

TEST(Ghost, LayerTrainsOnChunksAndEvalIsUnchanged) {
  BNORM_SEEDED_RNG(rng, 52);
  const std::vector<int64_t> dims = {10, 3, 2, 2};
  const Tensor x = RandomTensor(rng, dims, Layout::kChannelsLast, ChannelOffsets(3, 1.0));
  const Tensor dy = RandomTensor(rng, dims, Layout::kChannelsLast);
  bnorm::BatchNormOptions o;
  o.num_features = 3;
  o.ghost_batch = 4;  // chunks of 4, 4, 2
  bnorm::BatchNorm layer;
  ASSERT_TRUE(IsOk(bnorm::BatchNorm::create(o, &layer)));
  Tensor y(dims, Layout::kChannelsLast), dx(dims, Layout::kChannelsLast);
  ASSERT_TRUE(IsOk(layer.forward(x.cview(), y.view())));
  EXPECT_EQ(layer.num_batches_tracked(), 3);
  EXPECT_EQ(layer.saved_mean().size(), 9u);
  ASSERT_TRUE(IsOk(layer.backward(dy.cview(), x.cview(), dx.view())));
  // The functional ghost pass on the same input gives the same bits.
  std::vector<float> rm(3, 0.0f), rv(3, 1.0f), sm(9), si(9), dw(3), db(3);
  Tensor fy(dims, Layout::kChannelsLast), fdx(dims, Layout::kChannelsLast);
  bnorm::ForwardTrainArgs a;
  a.x = x.cview();
  a.weight = layer.weight();
  a.bias = layer.bias();
  a.running_mean = rm;
  a.running_var = rv;
  a.y = fy.view();
  a.save_mean = sm;
  a.save_invstd = si;
  a.ghost_batch = 4;
  ASSERT_TRUE(IsOk(bnorm::forward_train(a)));
  EXPECT_TRUE(BitIdentical(y.data, fy.data));
  EXPECT_TRUE(BitIdentical(layer.running_mean(), rm));
  bnorm::BackwardArgs g;
  g.dy = dy.cview();
  g.x = x.cview();
  g.weight = layer.weight();
  g.save_mean = sm;
  g.save_invstd = si;
  g.ghost_batch = 4;
  g.dx = fdx.view();
  g.dweight = dw;
  g.dbias = db;
  ASSERT_TRUE(IsOk(bnorm::backward(g)));
  EXPECT_TRUE(BitIdentical(dx.data, fdx.data));
  EXPECT_TRUE(BitIdentical(layer.weight_grad(), dw));
  // Eval: the running statistics over the whole batch, G plays no part (also G > N).
  ASSERT_TRUE(IsOk(layer.set_ghost_batch(64)));
  layer.eval();
  Tensor ye(dims, Layout::kChannelsLast), ye_want(dims, Layout::kChannelsLast);
  ASSERT_TRUE(IsOk(layer.forward(x.cview(), ye.view())));
  bnorm::ForwardEvalArgs e;
  e.x = x.cview();
  e.weight = layer.weight();
  e.bias = layer.bias();
  e.running_mean = layer.running_mean();
  e.running_var = layer.running_var();
  e.y = ye_want.view();
  ASSERT_TRUE(IsOk(bnorm::forward_eval(e)));
  EXPECT_TRUE(BitIdentical(ye.data, ye_want.data));
  // Training with G > N is refused, with nothing changed.
  layer.train();
  const std::vector<float> rm_before(layer.running_mean().begin(), layer.running_mean().end());
  FillSentinel(y.data);
  const std::vector<float> y_before = y.data;
  EXPECT_TRUE(IsInvalid(layer.forward(x.cview(), y.view()), "ghost_batch: must be <= N = 10"));
  EXPECT_TRUE(BitIdentical(y.data, y_before));
  EXPECT_TRUE(BitIdentical(layer.running_mean(), rm_before));
  EXPECT_EQ(layer.num_batches_tracked(), 3);
}

TEST(Ghost, BadInputWritesNothing) {
  const std::vector<int64_t> dims = {5, 2};
  Tensor x(dims, Layout::kChannelsFirst), y(dims, Layout::kChannelsFirst);
  for (size_t q = 0; q < x.data.size(); ++q) x.data[q] = static_cast<float>(q % 3);
  std::vector<float> rm = {0, 0}, rv = {1, 1}, sm(6), si(6);
  FillSentinel(y.data);
  FillSentinel(sm);
  int64_t nbt = 0;
  Snapshot snap;
  snap.Add("y", y.data).Add("rm", rm).Add("rv", rv).Add("sm", sm).Add("nbt", &nbt);
  auto base = [&](int64_t ghost) {
    bnorm::ForwardTrainArgs a;
    a.x = x.cview();
    a.y = y.view();
    a.running_mean = rm;
    a.running_var = rv;
    a.num_batches_tracked = &nbt;
    a.ghost_batch = ghost;
    return a;
  };
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(base(1)),
                        "ghost_batch: must be 0 (off) or >= 2, got 1"));
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(base(-3)), "ghost_batch: must be 0 (off) or >= 2"));
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(base(6)),
                        "ghost_batch: must be <= N = 5 in training (x size [5, 2]), got 6"));
  // 5 = 2 + 2 + 1: the last chunk has one value per channel.
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(base(2)), "last chunk of N mod G = 1 sample"));
  bnorm::ForwardTrainArgs a = base(3);  // 3 + 2: two chunks, 4 statistics needed, 6 given
  a.save_mean = sm;
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(a), "save_mean: must hold one value per chunk"));
  a.save_mean = std::span<float>(sm.data(), 2);
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(a), "K * C = 2 * 2 = 4"));
  EXPECT_TRUE(snap.Unchanged());
  // Backward: ghost statistics of the wrong size, eval mode, G > N.
  Tensor dx(dims, Layout::kChannelsFirst);
  FillSentinel(dx.data);
  Snapshot snap_dx;
  snap_dx.Add("dx", dx.data);
  bnorm::BackwardArgs g;
  g.dy = x.cview();
  g.x = x.cview();
  g.save_mean = std::span<const float>(sm.data(), 2);
  g.save_invstd = std::span<const float>(si.data(), 2);
  g.ghost_batch = 3;
  g.dx = dx.view();
  EXPECT_TRUE(IsInvalid(bnorm::backward(g), "save_mean: must hold one value per chunk"));
  g.ghost_batch = 9;
  EXPECT_TRUE(IsInvalid(bnorm::backward(g), "ghost_batch: must be <= N = 5"));
  g.ghost_batch = 3;
  g.training = false;
  g.running_mean = rm;
  g.running_var = rv;
  EXPECT_TRUE(IsInvalid(bnorm::backward(g), "ghost_batch: 3 is for a training-mode backward"));
  EXPECT_TRUE(snap_dx.Unchanged());
  // The layer refuses G = 1 and keeps its value.
  bnorm::BatchNormOptions o;
  o.num_features = 2;
  o.ghost_batch = 1;
  bnorm::BatchNorm layer;
  EXPECT_TRUE(IsInvalid(bnorm::BatchNorm::create(o, &layer), "ghost_batch: must be 0 (off) or >= 2"));
  o.ghost_batch = 2;
  ASSERT_TRUE(IsOk(bnorm::BatchNorm::create(o, &layer)));
  EXPECT_TRUE(IsInvalid(layer.set_ghost_batch(1), "ghost_batch"));
  EXPECT_EQ(layer.options().ghost_batch, 2);
}

// ---------------------------------------------------------------------------------------------
// Stateless-update errors; the C API.

TEST(Stateless, BadInputWritesNothing) {
  const std::vector<int64_t> dims = {4, 2};
  Tensor x(dims, Layout::kChannelsFirst), y(dims, Layout::kChannelsFirst);
  for (size_t q = 0; q < x.data.size(); ++q) x.data[q] = static_cast<float>(q);
  std::vector<float> rm = {0, 0}, rv = {1, 1}, om(2), ov(2);
  FillSentinel(y.data);
  FillSentinel(om);
  FillSentinel(ov);
  int64_t nbt = 0, onbt = 0;
  Snapshot snap;
  snap.Add("y", y.data).Add("rm", rm).Add("rv", rv).Add("om", om).Add("ov", ov).Add("nbt", &nbt)
      .Add("onbt", &onbt);
  bnorm::ForwardTrainArgs a;
  a.x = x.cview();
  a.y = y.view();
  a.running_mean = rm;
  a.running_var = rv;
  a.running_mean_out = om;
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(a), "running_mean_out and running_var_out: give both"));
  a.running_var_out = om;
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(a), "running_var_out: is the same buffer"));
  a.running_var_out = std::span<float>(ov.data(), 1);
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(a), "running_var_out: must hold one value"));
  a.running_var_out = ov;
  a.running_mean = {};
  a.running_var = {};
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(a), "running_mean_out: a stateless update needs"));
  a.running_mean = rm;
  a.running_var = rv;
  a.running_mean_out = {};
  a.running_var_out = {};
  a.num_batches_tracked_out = &onbt;
  EXPECT_TRUE(IsInvalid(bnorm::forward_train(a), "num_batches_tracked_out: only with"));
  EXPECT_TRUE(snap.Unchanged());
}

TEST(ExtensionsCApi, GhostRenormAndStatelessThroughTheCApi) {
  BNORM_SEEDED_RNG(rng, 61);
  const std::vector<int64_t> dims = {6, 3, 4};
  const Tensor x = RandomTensor(rng, dims, Layout::kChannelsFirst, ChannelOffsets(3, 1.0));
  const Tensor dy = RandomTensor(rng, dims, Layout::kChannelsFirst);
  const std::vector<float> w = RandomVector(rng, 3, -2, 2), b = RandomVector(rng, 3, -1, 1);
  for (int variant = 0; variant < 2; ++variant) {  // ghost + stateless, renorm
    SCOPED_TRACE("variant " + std::to_string(variant));
    std::vector<float> rm(3, 0.25f), rv(3, 1.5f), orm(3), orv(3), sm(9), si(9), sr(3), sd(3);
    std::vector<float> dw(3), db(3);
    int64_t nbt = 2, onbt = 0;
    Tensor y(dims, Layout::kChannelsFirst), dx(dims, Layout::kChannelsFirst);
    bnorm_train_extensions ext{};
    bnorm_backward_extensions bext{};
    if (variant == 0) {
      ext.ghost_batch = bext.ghost_batch = 2;
      ext.running_mean_out = orm.data();
      ext.running_var_out = orv.data();
      ext.num_batches_tracked_out = &onbt;
    } else {
      ext.batch_renorm = 1;
      ext.rmax = 2;
      ext.dmax = 1;
      ext.save_r = sr.data();
      ext.save_d = sd.data();
      bext.renorm_r = sr.data();
      bext.renorm_d = sd.data();
    }
    ASSERT_EQ(bnorm_forward_train_ext(BNORM_CHANNELS_FIRST, 6, 3, 4, x.data.data(), w.data(),
                                      b.data(), rm.data(), rv.data(), &nbt, 0.1, kEps,
                                      y.data.data(), sm.data(), si.data(), &ext),
              BNORM_OK)
        << bnorm_last_error();
    ASSERT_EQ(bnorm_backward_ext(BNORM_CHANNELS_FIRST, 6, 3, 4, dy.data.data(), x.data.data(),
                                 w.data(), sm.data(), si.data(), nullptr, nullptr, kEps, 1,
                                 dx.data.data(), dw.data(), db.data(), &bext),
              BNORM_OK)
        << bnorm_last_error();
    // The same as the C++ passes.
    std::vector<float> crm(3, 0.25f), crv(3, 1.5f), corm(3), corv(3), csm(9), csi(9), csr(3),
        csd(3), cdw(3), cdb(3);
    int64_t cnbt = 2, conbt = 0;
    Tensor cy(dims, Layout::kChannelsFirst), cdx(dims, Layout::kChannelsFirst);
    bnorm::ForwardTrainArgs a;
    a.x = x.cview();
    a.weight = w;
    a.bias = b;
    a.running_mean = crm;
    a.running_var = crv;
    a.num_batches_tracked = &cnbt;
    a.y = cy.view();
    a.save_mean = std::span<float>(csm.data(), variant == 0 ? 9 : 3);
    a.save_invstd = std::span<float>(csi.data(), variant == 0 ? 9 : 3);
    bnorm::BackwardArgs g;
    if (variant == 0) {
      a.ghost_batch = g.ghost_batch = 2;
      a.running_mean_out = corm;
      a.running_var_out = corv;
      a.num_batches_tracked_out = &conbt;
    } else {
      a.batch_renorm = true;
      a.rmax = 2;
      a.dmax = 1;
      a.save_r = csr;
      a.save_d = csd;
      g.renorm_r = csr;
      g.renorm_d = csd;
    }
    ASSERT_TRUE(IsOk(bnorm::forward_train(a)));
    g.dy = dy.cview();
    g.x = x.cview();
    g.weight = w;
    g.save_mean = a.save_mean;
    g.save_invstd = a.save_invstd;
    g.dx = cdx.view();
    g.dweight = cdw;
    g.dbias = cdb;
    ASSERT_TRUE(IsOk(bnorm::backward(g)));
    EXPECT_TRUE(BitIdentical(y.data, cy.data));
    EXPECT_TRUE(BitIdentical(dx.data, cdx.data));
    EXPECT_TRUE(BitIdentical(dw, cdw));
    EXPECT_TRUE(BitIdentical(rm, crm));
    EXPECT_TRUE(BitIdentical(orm, corm));
    EXPECT_TRUE(BitIdentical(sr, csr));
    EXPECT_EQ(nbt, cnbt);
    EXPECT_EQ(onbt, conbt);
  }
  // A bad ghost_batch: the library's message, nothing written.
  std::vector<float> rm(3, 0.25f), rv(3, 1.5f);
  Tensor y(dims, Layout::kChannelsFirst);
  FillSentinel(y.data);
  const std::vector<float> y0 = y.data;
  bnorm_train_extensions ext{};
  ext.ghost_batch = 1;
  EXPECT_EQ(bnorm_forward_train_ext(BNORM_CHANNELS_FIRST, 6, 3, 4, x.data.data(), nullptr, nullptr,
                                    rm.data(), rv.data(), nullptr, 0.1, kEps, y.data.data(),
                                    nullptr, nullptr, &ext),
            BNORM_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(bnorm_last_error()).find("ghost_batch: must be 0 (off) or >= 2, got 1"),
            std::string::npos);
  EXPECT_TRUE(BitIdentical(y.data, y0));
}

}  // namespace
}  // namespace bnorm_test
