// Shared helpers of the nn tests: random tensors and the finite-difference gradient checker.
#ifndef BNORM_TESTS_NN_NN_TEST_UTIL_H_
#define BNORM_TESTS_NN_NN_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "bnorm/nn/init.h"
#include "bnorm/nn/module.h"
#include "bnorm/nn/tensor.h"

namespace bnorm::nn::testing {

inline Tensor random_tensor(std::initializer_list<int64_t> shape, Rng& rng, double lo = -1.0,
                            double hi = 1.0) {
  Tensor t(shape);
  uniform_(t.span(), lo, hi, rng);
  return t;
}

// loss = sum_k y_k r_k in double, and S = sum_k |r_k| max(|y_k|, 1), the scale of its rounding.
struct LossValue {
  double loss = 0.0;
  double scale = 0.0;
};

inline LossValue dot_loss(Module& m, const Tensor& x, const Tensor& r) {
  Tensor y;
  Status s = m.forward(x, &y);
  EXPECT_TRUE(s.ok()) << s.to_string();
  LossValue v;
  for (int64_t k = 0; k < y.numel(); ++k) {
    v.loss += static_cast<double>(y[k]) * r[k];
    v.scale += std::fabs(r[k]) * std::max(1.0, std::fabs(static_cast<double>(y[k])));
  }
  return v;
}

// Checks dx and every parameter gradient of m at x against central differences of
// L = sum(y * r) with random r.
//   fd(h) = (L(v + h) - L(v - h)) / 2h. Its error is rounding plus truncation:
//   rounding: each fp32 output carries a few ulps (kUlps) of max(|y|, 1), so L carries
//             kUlps * eps * S and fd(h) kUlps * eps * S / h;
//   truncation: h^2 f''' / 6, estimated from fd(2h) - fd(h) = 3 * (h^2 f''' / 6) (+ rounding),
//             taken twice for safety. Linear maps have none, so a large h kills the rounding.
// Also checks that backward ACCUMULATES parameter gradients (a second backward doubles them)
// and that dx == nullptr gives the same parameter gradients. The module must be in the mode
// (train/eval) to test; in training mode a BatchNorm's running statistics drift with every
// forward, which does not change its training-mode output.
inline void check_gradients(Module& m, const Tensor& x0, double h, uint64_t seed,
                            int max_checks_per_tensor = 64) {
  constexpr double kUlps = 32.0;
  const double eps = std::numeric_limits<float>::epsilon();
  Rng rng(seed);
  Tensor x = x0, y;
  ASSERT_TRUE(m.forward(x, &y).ok());
  Tensor r(y.shape());
  normal_(r.span(), 0.0, 1.0, rng);
  m.zero_grad();
  Tensor dx;
  Status s = m.backward(r, &dx);
  ASSERT_TRUE(s.ok()) << s.to_string();
  ASSERT_TRUE(dx.same_shape(x)) << dx.size_string() << " vs " << x.size_string();
  const Tensor dx_analytic = dx;

  std::vector<StateEntry> params = m.parameters();
  std::vector<std::vector<float>> grads;
  for (const StateEntry& p : params) grads.emplace_back(p.grad, p.grad + p.numel());

  // Accumulation and dx == nullptr.
  ASSERT_TRUE(m.forward(x, &y).ok());
  ASSERT_TRUE(m.backward(r, nullptr).ok());
  for (size_t k = 0; k < params.size(); ++k)
    for (int64_t i = 0; i < params[k].numel(); ++i)
      ASSERT_NEAR(params[k].grad[i], 2.0f * grads[k][static_cast<size_t>(i)],
                  1e-5 * (1.0 + std::fabs(grads[k][static_cast<size_t>(i)])))
          << params[k].name << "[" << i << "] does not accumulate";

  auto central = [&](float* v, double step) {
    const float saved = *v;
    *v = static_cast<float>(saved + step);
    const double actual_plus = static_cast<double>(*v) - saved;
    LossValue plus = dot_loss(m, x, r);
    *v = static_cast<float>(saved - step);
    const double actual_minus = saved - static_cast<double>(*v);
    LossValue minus = dot_loss(m, x, r);
    *v = saved;
    return std::pair<double, double>{(plus.loss - minus.loss) / (actual_plus + actual_minus),
                                     std::max(plus.scale, minus.scale)};
  };
  auto check = [&](const std::string& what, float* v, int64_t count, const float* analytic) {
    const int64_t stride = std::max<int64_t>(1, count / max_checks_per_tensor);
    for (int64_t i = 0; i < count; i += stride) {
      auto [fd1, scale] = central(v + i, h);
      auto [fd2, scale2] = central(v + i, 2 * h);
      const double rounding = kUlps * eps * std::max(scale, scale2) / h;
      const double truncation = 2.0 * std::fabs(fd2 - fd1) / 3.0;
      const double tol = rounding + truncation + 1e-6 * std::fabs(fd1);
      EXPECT_NEAR(analytic[i], fd1, tol)
          << what << "[" << i << "] seed " << seed << " (fd(2h) " << fd2 << ")";
    }
  };
  check("dx", x.data(), x.numel(), dx_analytic.data());
  for (size_t k = 0; k < params.size(); ++k)
    check(params[k].name, static_cast<float*>(params[k].data), params[k].numel(),
          grads[k].data());
}

// True when s failed with InvalidArgument and its message contains every piece.
inline ::testing::AssertionResult fails_with(const Status& s,
                                             std::initializer_list<const char*> pieces) {
  if (s.ok()) return ::testing::AssertionFailure() << "expected an error, got OK";
  if (s.code() != StatusCode::kInvalidArgument)
    return ::testing::AssertionFailure() << "expected InvalidArgument, got " << s.to_string();
  for (const char* p : pieces)
    if (s.message().find(p) == std::string::npos)
      return ::testing::AssertionFailure() << "message \"" << s.message() << "\" lacks \"" << p
                                           << "\"";
  return ::testing::AssertionSuccess();
}

}  // namespace bnorm::nn::testing

#endif  // BNORM_TESTS_NN_NN_TEST_UTIL_H_
