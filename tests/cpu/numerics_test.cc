// The numerical guarantees of the CPU kernels, on every layout path: the variance of
// offset + N(0, 1) within 1e-4 relative of fp64 for offsets up to 1e6; a constant channel
// gives xhat = 0 exactly (y == bias bit for bit); |x| ~ 1e30 stays finite; NaN propagates.
#include <cmath>
#include <cstdio>

#include "cpu/cpu.h"
#include "kernels.h"
#include "reference/reference.h"
#include "test_util.h"

namespace bnorm_test {
namespace {

struct Shape {
  std::vector<int64_t> dims;
  Layout layout;
};

// One shape per kernel path: channels-first large S, small S (7x7 and 1x1), channels-last, 2-D.
const std::vector<Shape>& paths() {
  static const std::vector<Shape> shapes = {
      {{4, 6, 64, 64}, Layout::kChannelsFirst},  {{16, 24, 7, 7}, Layout::kChannelsFirst},
      {{512, 40, 1, 1}, Layout::kChannelsFirst}, {{8, 40, 16, 16}, Layout::kChannelsLast},
      {{4096, 24}, Layout::kChannelsFirst},
  };
  return shapes;
}

bnorm::detail::Geometry geometry_of(const Tensor& t) { return {t.layout, t.n(), t.c(), t.s()}; }

TEST(CpuNumerics, VarianceOfOffsetData) {
  double worst = 0;
  for (const Shape& shape : paths())
    for (double offset : {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6}) {
      BNORM_SEEDED_RNG(rng, 2024);
      std::vector<float> offsets(static_cast<size_t>(shape.dims[1]), static_cast<float>(offset));
      const Tensor x = RandomTensor(rng, shape.dims, shape.layout, offsets, 1.0);
      const auto g = geometry_of(x);
      std::vector<double> mean(x.c()), var(x.c()), mean_ref(x.c()), var_ref(x.c());
      bnorm::cpu::stats(g, x.data.data(), mean.data(), var.data());
      bnorm::ref::stats(g, x.data.data(), mean_ref.data(), var_ref.data());
      for (int64_t c = 0; c < x.c(); ++c) {
        const double rel = std::fabs(var[c] - var_ref[c]) / var_ref[c];
        worst = std::max(worst, rel);
        ASSERT_LE(rel, 1e-4) << x.Describe() << " offset " << offset << " channel " << c;
      }
      // Through the public API: the running variance (momentum 1: the unbiased batch variance).
      Tensor y(x.dims, x.layout);
      std::vector<float> rm(x.c(), 0.0f), rv(x.c(), 1.0f);
      bnorm::ForwardTrainArgs a;
      a.x = x.cview();
      a.y = y.view();
      a.running_mean = rm;
      a.running_var = rv;
      a.momentum = 1.0;
      ASSERT_TRUE(IsOk(bnorm::forward_train(a)));
      const double n = static_cast<double>(x.count());
      for (int64_t c = 0; c < x.c(); ++c) {
        const double want = var_ref[c] * n / (n - 1);
        ASSERT_LE(std::fabs(rv[c] - want) / want, 1e-4 + 2 * kFloatU)
            << x.Describe() << " offset " << offset;
      }
    }
  std::printf("worst variance relative error against fp64: %.3g\n", worst);
}

// The stats kernel's fp32 lanes are accurate only while the pivot (the channel's first element)
// lies within a few standard deviations of the mean; an outlier there must send the channel to
// the fp64 re-sum. Without it the variance below would be off by far more than 1e-6.
TEST(CpuNumerics, OutlierPivotIsResummedInFp64) {
  std::vector<Shape> shapes = paths();
  // More such channels than merge_stats sums again in one pass over the rows (256).
  shapes.push_back({{4, 300, 3, 3}, Layout::kChannelsLast});
  for (const Shape& shape : shapes) {
    BNORM_SEEDED_RNG(rng, 77);
    std::vector<float> offsets(static_cast<size_t>(shape.dims[1]), 100.0f);
    Tensor x = RandomTensor(rng, shape.dims, shape.layout, offsets, 1.0);
    for (int64_t c = 0; c < x.c(); ++c) x.at(0, c, 0) = 100.0f + 3e4f;  // the pivot
    const auto g = geometry_of(x);
    std::vector<double> mean(x.c()), var(x.c()), mean_ref(x.c()), var_ref(x.c());
    bnorm::cpu::stats(g, x.data.data(), mean.data(), var.data());
    bnorm::ref::stats(g, x.data.data(), mean_ref.data(), var_ref.data());
    for (int64_t c = 0; c < x.c(); ++c) {
      ASSERT_LE(std::fabs(var[c] - var_ref[c]) / var_ref[c], 1e-6) << x.Describe() << " channel " << c;
      ASSERT_LE(std::fabs(mean[c] - mean_ref[c]), 1e-6 * std::sqrt(var_ref[c])) << x.Describe();
    }
  }
}

TEST(CpuNumerics, ConstantChannelGivesBiasExactly) {
  for (const Shape& shape : paths())
    for (float value : {0.0f, 3.3f, -1e6f + 0.5f, 1e30f}) {
      Tensor x(shape.dims, shape.layout, value);
      Tensor y(shape.dims, shape.layout);
      std::vector<float> weight(x.c(), 1.75f), bias(x.c()), save_mean(x.c()), save_invstd(x.c());
      for (int64_t c = 0; c < x.c(); ++c) bias[c] = 0.25f * static_cast<float>(c) - 1.0f;
      bnorm::ForwardTrainArgs a;
      a.x = x.cview();
      a.y = y.view();
      a.weight = weight;
      a.bias = bias;
      a.save_mean = save_mean;
      a.save_invstd = save_invstd;
      ASSERT_TRUE(IsOk(bnorm::forward_train(a)));
      for (int64_t i = 0; i < x.n(); ++i)
        for (int64_t c = 0; c < x.c(); ++c)
          for (int64_t j = 0; j < x.s(); ++j)
            ASSERT_EQ(y.at(i, c, j), bias[c]) << x.Describe() << " value " << value << " at (" << i
                                              << ", " << c << ", " << j << ")";
      for (int64_t c = 0; c < x.c(); ++c) {
        ASSERT_EQ(save_mean[c], value);
        ASSERT_EQ(save_invstd[c], static_cast<float>(1.0 / std::sqrt(1e-5)));
      }
    }
}

TEST(CpuNumerics, HugeValuesStayFinite) {
  for (const Shape& shape : paths()) {
    BNORM_SEEDED_RNG(rng, 31);
    Tensor x = RandomTensor(rng, shape.dims, shape.layout, {}, 1e30);  // squares ~1e60
    // dy ~ 1e9: dy * (x - mean) ~ 1e39 overflows fp32, not fp64 (the backward re-sum).
    Tensor dy = RandomTensor(rng, shape.dims, shape.layout, {}, 1e9);
    Tensor y(shape.dims, shape.layout), y_ref(shape.dims, shape.layout),
        dx(shape.dims, shape.layout);
    std::vector<float> save_mean(x.c()), save_invstd(x.c()), m_ref(x.c()), inv_ref(x.c()),
        dw(x.c()), db(x.c());
    for (bnorm::Backend backend : {bnorm::Backend::kAuto, bnorm::Backend::kReference}) {
      const bool ref = backend == bnorm::Backend::kReference;
      bnorm::ForwardTrainArgs a;
      a.x = x.cview();
      a.y = ref ? y_ref.view() : y.view();
      a.save_mean = ref ? std::span<float>(m_ref) : std::span<float>(save_mean);
      a.save_invstd = ref ? std::span<float>(inv_ref) : std::span<float>(save_invstd);
      bnorm::CallOptions o;
      o.backend = backend;
      ASSERT_TRUE(IsOk(bnorm::forward_train(a, o)));
    }
    for (size_t k = 0; k < y.data.size(); ++k) {
      ASSERT_TRUE(std::isfinite(y.data[k])) << x.Describe() << " index " << k;
      ASSERT_NEAR(y.data[k], y_ref.data[k], 1e-5 * (1 + std::fabs(y_ref.data[k])))
          << x.Describe() << " index " << k;
    }
    for (int64_t c = 0; c < x.c(); ++c) {
      ASSERT_TRUE(std::isfinite(save_mean[c]) && std::isfinite(save_invstd[c]) &&
                  save_invstd[c] > 0);
      ASSERT_NEAR(save_invstd[c], inv_ref[c], 1e-6 * inv_ref[c]);
    }
    bnorm::BackwardArgs b;
    b.dy = dy.cview();
    b.x = x.cview();
    b.save_mean = save_mean;
    b.save_invstd = save_invstd;
    b.dx = dx.view();
    b.dweight = dw;
    b.dbias = db;
    ASSERT_TRUE(IsOk(bnorm::backward(b)));
    for (size_t k = 0; k < dx.data.size(); ++k) ASSERT_TRUE(std::isfinite(dx.data[k])) << k;
    for (int64_t c = 0; c < x.c(); ++c) ASSERT_TRUE(std::isfinite(dw[c]) && std::isfinite(db[c]));
  }
}

TEST(CpuNumerics, NanPropagatesInItsChannel) {
  for (const Shape& shape : paths()) {
    BNORM_SEEDED_RNG(rng, 5);
    Tensor x = RandomTensor(rng, shape.dims, shape.layout);
    x.at(x.n() - 1, 1, x.s() - 1) = std::nanf("");
    Tensor y(shape.dims, shape.layout);
    bnorm::ForwardTrainArgs a;
    a.x = x.cview();
    a.y = y.view();
    ASSERT_TRUE(IsOk(bnorm::forward_train(a)));
    for (int64_t i = 0; i < x.n(); ++i)
      for (int64_t c = 0; c < x.c(); ++c)
        for (int64_t j = 0; j < x.s(); ++j)
          ASSERT_EQ(std::isnan(y.at(i, c, j)), c == 1)
              << x.Describe() << " (" << i << ", " << c << ", " << j << ")";
  }
}

}  // namespace
}  // namespace bnorm_test
