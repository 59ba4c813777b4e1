// The CPU kernels against the reference, pass by pass, on every Highway target compiled into the
// library (HWY_EMU128, Highway's portable scalar fallback, included): the test parameter narrows
// the library's dynamic dispatch to one target.
#include <hwy/highway.h>
#include <hwy/tests/hwy_gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>

#include "kernel_tester.h"

namespace bnorm_test {
namespace {

using Pass = KernelTester::Pass;
constexpr Layout kLayouts[] = {Layout::kChannelsFirst, Layout::kChannelsLast};

class CpuKernelTest : public hwy::TestWithParamTarget {};
HWY_TARGET_INSTANTIATE_TEST_SUITE_P(CpuKernelTest);

// Channels 1 .. 2 * lanes + 1 (16 fp32 lanes on AVX-512) against short and odd spatial sizes.
TEST_P(CpuKernelTest, ChannelsAndSmallSpatial) {
  for (Layout layout : kLayouts)
    for (int64_t c = 1; c <= 33; ++c)
      for (int64_t s : {1, 2, 3, 7, 15, 16, 17})
        KernelTester()
            .layout(layout)
            .channels(c)
            .spatial({s})
            .batch(3)
            .seed(100 + c * 7 + s)
            .test_all();
}

TEST_P(CpuKernelTest, SpatialSizes) {
  for (Layout layout : kLayouts)
    for (int64_t s : {1, 2, 3, 7, 15, 16, 17, 49, 196, 1000, 12544})
      for (int64_t c : {1, 3, 17}) {
        if (s >= 1000 && c > 3) continue;
        KernelTester().layout(layout).channels(c).spatial({s}).batch(2).seed(7 * s + c).test_all();
      }
}

// Spatial sizes beyond one block (channels-first cuts rows into pieces of <= 16384).
TEST_P(CpuKernelTest, RowsLongerThanABlock) {
  for (Layout layout : kLayouts)
    for (int64_t s : {16383, 16385, 2 * 16384 + 1})
      KernelTester().layout(layout).channels(1).spatial({s}).batch(2).seed(s).test_all();
}

// Batch sizes around the block sizes. Channels-first: groups of G = clamp(16384 / S, 1, C)
// channels, blocks of max(1, 16384 / (G * S)) batch items (the passes that reduce take
// G = clamp(65536 / (n * S), 1, C) instead when n * S * 4 <= 256 KiB); channels-last: blocks
// of max(32, 32768 / C) rows.
TEST_P(CpuKernelTest, BatchAroundBlockSize) {
  for (int64_t n : {26, 27, 28, 55})  // S = 196, C = 3: G = 3, 27 items a block
    KernelTester()
        .layout(Layout::kChannelsFirst)
        .channels(3)
        .spatial({196})
        .batch(n)
        .seed(n)
        .test_all();
  for (int64_t n : {6, 7, 8, 15})  // S = 49, C = 45: G = 45, 7 items a block
    KernelTester()
        .layout(Layout::kChannelsFirst)
        .channels(45)
        .spatial({7, 7})
        .batch(n)
        .seed(n)
        .test_all();
  for (int64_t n : {1, 2, 3})  // S = 784, C = 40: G = 20, one item a block, two groups
    KernelTester()
        .layout(Layout::kChannelsFirst)
        .channels(40)
        .spatial({28, 28})
        .batch(n)
        .seed(n)
        .test_all();
  // The training passes' local plans (plan.h: groups of 256 KiB / (4 n S) channels, sized
  // for L2): C = 100, S = 49, n = 40: groups of 33 channels with blocks of 10 items, the last
  // group of 1 channel.
  KernelTester()
      .layout(Layout::kChannelsFirst)
      .channels(100)
      .spatial({7, 7})
      .batch(40)
      .seed(40)
      .test_all();
  for (int64_t n : {31, 32, 33, 65})  // C = 1024: 32 rows a block
    KernelTester()
        .layout(Layout::kChannelsLast)
        .channels(1024)
        .spatial({})
        .batch(n)
        .seed(n)
        .test_all();
  for (int64_t n : {2047, 2048, 2049})  // C = 16: 2048 rows a block
    KernelTester()
        .layout(Layout::kChannelsLast)
        .channels(16)
        .spatial({})
        .batch(n)
        .seed(n)
        .test_all();
}

TEST_P(CpuKernelTest, Ranks) {
  const std::vector<std::vector<int64_t>> spatials = {{}, {5}, {3, 4}, {2, 3, 4}};
  for (Layout layout : kLayouts)
    for (const auto& sp : spatials)
      KernelTester().layout(layout).channels(5).spatial(sp).batch(4).test_all();
}

TEST_P(CpuKernelTest, MisalignedAndInPlace) {
  for (Layout layout : kLayouts)
    for (int64_t s : {1, 17, 196, 1000})
      for (bool in_place : {false, true})
        KernelTester()
            .layout(layout)
            .channels(s >= 196 ? 5 : 19)
            .spatial({s})
            .batch(3)
            .misaligned()
            .in_place(in_place)
            .test_all();
}

TEST_P(CpuKernelTest, LargeOffsetAndConstantChannel) {
  for (Layout layout : kLayouts)
    for (double offset : {1e3, 1e6})
      for (int64_t s : {1, 49, 300})
        KernelTester()
            .layout(layout)
            .channels(9)
            .spatial({s})
            .batch(5)
            .offset(offset)
            .constant_channel()
            .test_all();
}

TEST_P(CpuKernelTest, AffineRunningStatsMomentum) {
  for (Layout layout : kLayouts)
    for (bool affine : {false, true})
      for (bool running : {false, true})
        for (std::optional<double> m : {std::optional<double>(0.1), std::optional<double>()}) {
          if (!m && !running) continue;
          KernelTester()
              .layout(layout)
              .channels(6)
              .spatial({33})
              .batch(3)
              .affine(affine)
              .running_stats(running)
              .momentum(m)
              .test_all();
        }
}

TEST_P(CpuKernelTest, LargeShapeUsesThreads) {
  for (Layout layout : kLayouts)
    KernelTester().layout(layout).channels(64).spatial({24, 24}).batch(8).test_all();
}

// Channels-last rows wider than kTileApplyMaxChannels go row by row in the apply kernels;
// narrower ones in tiles (internal.h): both sides of the switch, with a channel remainder.
TEST_P(CpuKernelTest, WideAndNarrowChannelsLast) {
  for (int64_t c : {bnorm::cpu::kTileApplyMaxChannels + 37, bnorm::cpu::kTileApplyMaxChannels})
    KernelTester().layout(Layout::kChannelsLast).channels(c).spatial({5}).batch(13).test_all();
}

// Outputs of 16 MiB and more are streamed; a channels-last row whose output is not
// vector-aligned starts with one masked vector up to the alignment (apply.cc,
// backward_apply.cc; AVX-512 targets, the others do not stream such rows). Every alignment of
// the tensors gives the bits of the aligned call: inference plain and fused, the backward in
// training and eval. On the best target of the machine only: 16 MiB a call is slow under the
// sanitizers, and the head exists on AVX-512 only.
TEST(CpuKernelStreaming, ChannelsLastRowsAtAnyAlignment) {
  const int64_t n = 4100, c = 1024;  // 16.4 MiB
  const size_t count = static_cast<size_t>(n * c);
  BNORM_SEEDED_RNG(rng, 3);
  const Tensor x = RandomTensor(rng, {n, c}, Layout::kChannelsLast, {}, 2.0);
  const std::vector<float> weight = RandomVector(rng, c, 0.5, 1.5),
                           bias = RandomVector(rng, c, -1, 1), rm = RandomVector(rng, c, -1, 1),
                           rv = RandomVector(rng, c, 0.5, 2);
  // 64-byte aligned buffers with room for a shift of up to 15 floats.
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  const size_t bytes = (count + 16) * sizeof(float);
  std::unique_ptr<float, Free> in(static_cast<float*>(std::aligned_alloc(64, bytes))),
      out(static_cast<float*>(std::aligned_alloc(64, bytes)));
  ASSERT_TRUE(in && out);
  auto run = [&](size_t shift, bool relu) {
    std::copy(x.data.begin(), x.data.end(), in.get() + shift);
    bnorm::ForwardEvalArgs e;
    e.x = bnorm::ConstTensorView(in.get() + shift, {n, c}, Layout::kChannelsLast);
    e.y = bnorm::TensorView(out.get() + shift, {n, c}, Layout::kChannelsLast);
    e.weight = weight;
    e.bias = bias;
    e.running_mean = rm;
    e.running_var = rv;
    EXPECT_TRUE(IsOk(relu ? bnorm::forward_eval_relu(e) : bnorm::forward_eval(e)));
    return std::vector<float>(out.get() + shift, out.get() + shift + count);
  };
  for (bool relu : {false, true}) {
    // Shift 0: every row's output is aligned, and the rows stream with no head.
    const std::vector<float> want = run(0, relu);
    // Spot checks of want against the formula in fp64.
    for (size_t k : {size_t{0}, size_t{1}, count / 2 + 7, count - 1}) {
      const size_t ch = k % static_cast<size_t>(c);
      const double a = weight[ch] / std::sqrt(static_cast<double>(rv[ch]) + 1e-5);
      double v = (x.data[k] - static_cast<double>(rm[ch])) * a + bias[ch];
      if (relu && v <= 0) v = 0;
      EXPECT_NEAR(want[k], v, 1e-5 * (1 + std::abs(v))) << "element " << k;
    }
    for (size_t shift : {1, 7}) {
      SCOPED_TRACE(::testing::Message() << "shift " << shift << (relu ? " relu" : ""));
      EXPECT_TRUE(BitIdentical(run(shift, relu), want));
    }
  }
  // The backward's rows (dx streamed), training and eval.
  const Tensor dy = RandomTensor(rng, {n, c}, Layout::kChannelsLast);
  std::vector<float> save_mean(static_cast<size_t>(c)), save_invstd(static_cast<size_t>(c));
  {
    std::vector<float> y(count);
    bnorm::ForwardTrainArgs f;
    f.x = x.cview();
    f.y = bnorm::TensorView(y.data(), {n, c}, Layout::kChannelsLast);
    f.weight = weight;
    f.bias = bias;
    f.save_mean = save_mean;
    f.save_invstd = save_invstd;
    ASSERT_TRUE(IsOk(bnorm::forward_train(f)));
  }
  std::unique_ptr<float, Free> grad(static_cast<float*>(std::aligned_alloc(64, bytes)));
  ASSERT_TRUE(grad);
  auto backward = [&](size_t shift, bool training) {
    std::copy(x.data.begin(), x.data.end(), in.get() + shift);
    std::copy(dy.data.begin(), dy.data.end(), grad.get() + shift);
    bnorm::BackwardArgs b;
    b.dy = bnorm::ConstTensorView(grad.get() + shift, {n, c}, Layout::kChannelsLast);
    b.x = bnorm::ConstTensorView(in.get() + shift, {n, c}, Layout::kChannelsLast);
    b.weight = weight;
    b.training = training;
    b.save_mean = save_mean;
    b.save_invstd = save_invstd;
    b.running_mean = rm;
    b.running_var = rv;
    b.dx = bnorm::TensorView(out.get() + shift, {n, c}, Layout::kChannelsLast);
    EXPECT_TRUE(IsOk(bnorm::backward(b)));
    return std::vector<float>(out.get() + shift, out.get() + shift + count);
  };
  for (bool training : {true, false}) {
    const std::vector<float> want = backward(0, training);
    EXPECT_TRUE(std::all_of(want.begin(), want.end(), [](float v) { return std::isfinite(v); }));
    for (size_t shift : {4}) {
      SCOPED_TRACE(::testing::Message()
                   << "backward, shift " << shift << (training ? " training" : " eval"));
      EXPECT_TRUE(BitIdentical(backward(shift, training), want));
    }
  }
}

// Channels-first data larger than a wave (plan.h: 6 MiB), with channels too long for a local
// plan (33 x 64 x 64 floats: 528 KB; groups of 4 channels, 2 waves forward and 3 backward):
// the pipelined sweeps apply one wave while they reduce the next, in place (the harder case:
// y overwrites x).
TEST_P(CpuKernelTest, ManyWavesPipelined) {
  KernelTester()
      .layout(Layout::kChannelsFirst)
      .channels(12)
      .spatial({64, 64})
      .batch(33)
      .in_place(true)
      .test_all();
}

// Every implementation of the list but the reference (the oracle) passes the tester: a new
// backend is tested by being listed.
TEST(KernelImplementations, EveryImplementationAgainstTheReference) {
  const auto list = bnorm::detail::implementations();
  ASSERT_GE(list.size(), 2u);
  EXPECT_STREQ(list.back().name, "reference");
  for (size_t i = 0; i + 1 < list.size(); ++i)
    for (Layout layout : kLayouts)
      for (int64_t s : {1, 17, 196})
        KernelTester()
            .implementation(list[i])
            .layout(layout)
            .channels(19)
            .spatial({s})
            .batch(3)
            .in_place(s == 17)
            .test_all();
}

}  // namespace
}  // namespace bnorm_test
