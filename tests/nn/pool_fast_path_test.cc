// The MaxPool2d kernel-2 stride-2 fast path against a naive reference: ties, NaN, odd H/W.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "bnorm/nn/layers.h"

namespace bnorm::nn {
namespace {

// PyTorch's rule: the first maximum of the window, NaN propagating (the first NaN wins).
void reference(const Tensor& x, const Tensor& dy, std::vector<float>* y, std::vector<float>* dx) {
  const int64_t n = x.dim(0), c = x.dim(1), h = x.dim(2), w = x.dim(3);
  const int64_t ho = h / 2, wo = w / 2;
  y->assign(static_cast<size_t>(n * c * ho * wo), 0.0f);
  dx->assign(static_cast<size_t>(x.numel()), 0.0f);
  for (int64_t p = 0; p < n * c; ++p)
    for (int64_t oh = 0; oh < ho; ++oh)
      for (int64_t ow = 0; ow < wo; ++ow) {
        int64_t best = p * h * w + 2 * oh * w + 2 * ow;
        for (int64_t i = 0; i < 2; ++i)
          for (int64_t j = 0; j < 2; ++j) {
            const int64_t idx = p * h * w + (2 * oh + i) * w + 2 * ow + j;
            const float v = x[best], xv = x[idx];
            if (xv > v || (std::isnan(xv) && !std::isnan(v))) best = idx;
          }
        const int64_t o = (p * ho + oh) * wo + ow;
        (*y)[static_cast<size_t>(o)] = x[best];
        (*dx)[static_cast<size_t>(best)] += dy[o];
      }
}

TEST(MaxPool2dFastPath, MatchesReferenceWithTiesNaNAndOddSizes) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const auto& dims : std::vector<std::vector<int64_t>>{
           {2, 3, 4, 4}, {1, 2, 5, 7}, {3, 1, 7, 6}, {2, 2, 2, 3}, {1, 1, 9, 9}}) {
    Tensor x(dims);
    uint32_t state = 12345;
    for (int64_t i = 0; i < x.numel(); ++i) {
      state = state * 1664525u + 1013904223u;
      // Few distinct values: many ties; some NaN and signed zeros.
      const uint32_t r = (state >> 24) % 9;
      x[i] = r == 0 ? nan : r == 1 ? -0.0f : r == 2 ? 0.0f : static_cast<float>(r % 4) - 1.0f;
    }
    std::unique_ptr<MaxPool2d> m;
    ASSERT_TRUE(MaxPool2d::create(2, 2, &m).ok());
    Tensor y;
    ASSERT_TRUE(m->forward(x, &y).ok());
    Tensor dy(y.shape());
    for (int64_t i = 0; i < dy.numel(); ++i) dy[i] = static_cast<float>(i + 1);
    Tensor dx;
    dx.resize(x.shape());
    dx.fill(123.0f);  // stale contents must be overwritten
    ASSERT_TRUE(m->backward(dy, &dx).ok());
    std::vector<float> ry, rdx;
    reference(x, dy, &ry, &rdx);
    ASSERT_EQ(y.numel(), static_cast<int64_t>(ry.size()));
    for (int64_t i = 0; i < y.numel(); ++i) {
      if (std::isnan(ry[static_cast<size_t>(i)])) {
        EXPECT_TRUE(std::isnan(y[i])) << i;
      } else {
        EXPECT_EQ(y[i], ry[static_cast<size_t>(i)]) << i;
        EXPECT_EQ(std::signbit(y[i]), std::signbit(ry[static_cast<size_t>(i)])) << i;
      }
    }
    for (int64_t i = 0; i < dx.numel(); ++i) EXPECT_EQ(dx[i], rdx[static_cast<size_t>(i)]) << i;
  }
}

}  // namespace
}  // namespace bnorm::nn
