// One tester for the kernel family: every pass of an implementation (by default the first of
// bnorm::detail::implementations(), the fast CPU kernels) against the reference, the last, on
// the same data, one line per case:
//
//   KernelTester().channels(3).spatial({17}).batch(5).layout(Layout::kChannelsLast).test_all();
//
// The tolerances below are the CPU kernels' (the fp32-lane sums); a new implementation with
// other numerics states its own.
//
// Tolerances are derived, not guessed (u = 2^-24, u64 = 2^-53, n = elements per channel):
//   * The kernels' sums are fp32 runs of at most K = kFlushTerms terms, flushed into fp64
//     (src/cpu/stats.cc, backward_reduce.cc); the reference sums in fp64. A run errs by
//     (K + 3) u of the sum of its terms' magnitudes; the fp64 merge of n terms adds
//     ~n * u64 * sum |terms|. We allow twice each (kernel_tester.cc: sum_rel, scales_of).
//   * The statistics: the kernel sums d = x - p, (x - p)^2 around a pivot p (the channel's first
//     element) and keeps the result only when |mean - p| <= R std (R = kMaxPivotDistance; else
//     it sums again in fp64), so the mean errs by at most (K + 2) u (mean|x - mean| + R' std)
//     and the variance by (K + 3) u var (1 + 2R' + 3R'^2), R' = R + 1, plus the fp64 terms.
//   * y in fp32 as ((x - mhi) - mlo) * a + b: two subtractions, the rounding of a = w * invstd
//     and of the fused multiply-add (mul + add on targets without FMA) give at most
//     ~5u * |w * xhat| + 2u * |b|; the reference's own rounding adds 0.5 ulp(y) <= u * |y|.
//     We allow 8u * (|w * xhat| + |b|) + u * |y|, plus what the mean and invstd differences
//     above propagate (|w| * invstd * d_mean + |w * xhat| * d_invstd / invstd).
//   * dx = alpha * dy + beta * (x - m) + gamma with fp32 alpha, beta, gamma (one rounding each),
//     x - m (one rounding) and two FMAs: at most ~5u * (|alpha dy| + |beta (x - m)| + |gamma|);
//     we allow 8u of that sum + u * |dx|, plus the sums' differences propagated through
//     |w * invstd / n| * (d_sum_dy + |xhat| * d_sum_dy_xhat).
// A failure names the seed (BNORM_TEST_SEED reproduces it), the case and the first bad index.
#ifndef BNORM_TESTS_CPU_KERNEL_TESTER_H_
#define BNORM_TESTS_CPU_KERNEL_TESTER_H_

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bnorm/batch_norm.h"
#include "cpu/internal.h"
#include "kernels.h"
#include "reference/reference.h"
#include "test_util.h"

namespace bnorm_test {

inline constexpr double kU64 = 1.1102230246251565e-16;  // 2^-53

class KernelTester {
 public:
  KernelTester& batch(int64_t n) {
    n_ = n;
    return *this;
  }
  KernelTester& channels(int64_t c) {
    c_ = c;
    return *this;
  }
  // Spatial dims (rank = 2 + size); empty: (N, C).
  KernelTester& spatial(std::vector<int64_t> dims) {
    spatial_ = std::move(dims);
    return *this;
  }
  KernelTester& layout(Layout l) {
    layout_ = l;
    return *this;
  }
  // x = offset (per channel, spread over [offset, 2 * offset]) + scale * N(0, 1).
  KernelTester& offset(double o) {
    offset_ = o;
    return *this;
  }
  KernelTester& scale(double s) {
    scale_ = s;
    return *this;
  }
  // Channel 0 holds one value everywhere.
  KernelTester& constant_channel(bool on = true) {
    constant_ = on;
    return *this;
  }
  // Buffers start one float past a 64-byte boundary.
  KernelTester& misaligned(bool on = true) {
    misaligned_ = on;
    return *this;
  }
  // y == x, dx == dy.
  KernelTester& in_place(bool on = true) {
    in_place_ = on;
    return *this;
  }
  KernelTester& affine(bool on) {
    affine_ = on;
    return *this;
  }
  KernelTester& running_stats(bool on) {
    running_ = on;
    return *this;
  }
  KernelTester& momentum(std::optional<double> m) {
    momentum_ = m;
    return *this;
  }
  KernelTester& seed(uint64_t s) {
    seed_ = s;
    return *this;
  }
  // The implementation under test.
  KernelTester& implementation(const bnorm::detail::Implementation& impl) {
    impl_ = &impl;
    return *this;
  }

  enum class Pass {
    kStats,
    kApply,
    kBackwardReduce,
    kBackwardApplyTrain,
    kBackwardApplyEval,
    kForwardTrain,
    kForwardEval,
    kBackwardTrain,
    kBackwardEval
  };

  void test(Pass pass) const { test_passes({pass}); }
  void test_all() const {
    test_passes({Pass::kStats, Pass::kApply, Pass::kBackwardReduce,
                 Pass::kBackwardApplyTrain, Pass::kBackwardApplyEval, Pass::kForwardTrain,
                 Pass::kForwardEval, Pass::kBackwardTrain, Pass::kBackwardEval});
  }
  // The passes on one data set.
  void test_passes(std::initializer_list<Pass> passes) const;

  std::string describe() const {
    std::ostringstream o;
    o << impl_->name << " N=" << n_ << " C=" << c_ << " spatial=" << DimsString(spatial_) << " "
      << LayoutTag(layout_) << " offset=" << offset_ << " scale=" << scale_
      << (constant_ ? " constant-channel" : "") << (misaligned_ ? " misaligned" : "")
      << (in_place_ ? " in-place" : "") << (affine_ ? "" : " affine=off")
      << (running_ ? "" : " running=off")
      << (momentum_ ? " momentum=" + std::to_string(*momentum_) : " momentum=none");
    return o.str();
  }

 private:
  int64_t s() const {
    int64_t s = 1;
    for (int64_t d : spatial_) s *= d;
    return s;
  }
  int64_t numel() const { return n_ * c_ * s(); }
  bnorm::detail::Geometry geometry() const { return {layout_, n_, c_, s()}; }

  // A buffer of `count` floats, misaligned on request; the storage stays in `owner`.
  float* alloc(std::vector<float>& owner, int64_t count) const {
    owner.assign(static_cast<size_t>(count + 32), 0.0f);
    auto base = reinterpret_cast<uintptr_t>(owner.data());
    size_t skip = ((64 - base % 64) % 64) / sizeof(float);
    return owner.data() + skip + (misaligned_ ? 1 : 0);
  }

  struct Data {
    std::vector<float> x, dy;  // logical values in memory order
    std::vector<float> weight, bias, running_mean, running_var;
  };
  Data make_data(std::mt19937_64& rng) const;

  void test_stats(const Data& d) const;
  void test_apply(const Data& d) const;
  void test_backward_reduce(const Data& d) const;
  void test_backward_apply(const Data& d, bool training) const;
  void test_forward_train(const Data& d) const;
  void test_forward_eval(const Data& d) const;
  void test_backward(const Data& d, bool training) const;

  int64_t n_ = 2, c_ = 3;
  std::vector<int64_t> spatial_ = {5};
  Layout layout_ = Layout::kChannelsFirst;
  double offset_ = 0, scale_ = 1;
  bool constant_ = false, misaligned_ = false, in_place_ = false;
  bool affine_ = true, running_ = true;
  std::optional<double> momentum_ = 0.1;
  uint64_t seed_ = 12345;
  const bnorm::detail::Implementation* impl_ = &bnorm::detail::implementations().front();
};

// The reference implementation (the last of the list), the oracle.
inline const bnorm::detail::Implementation& reference_implementation() {
  return bnorm::detail::implementations().back();
}

}  // namespace bnorm_test

#endif  // BNORM_TESTS_CPU_KERNEL_TESTER_H_
