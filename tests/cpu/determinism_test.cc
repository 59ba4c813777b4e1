// Bitwise-identical results for 1, 2, 3 and 8 threads: every output of every pass; and the
// training passes, which run short channels-first channels group by group (plan.h: local
// plans), give the bits of the separate passes.
#include <cstring>

#include "cpu/cpu.h"
#include "kernels.h"
#include "test_util.h"

namespace bnorm_test {
namespace {

struct Outputs {
  std::vector<float> y, save_mean, save_invstd, rm, rv, y_eval, dx_train, dw_train, db_train,
      dx_eval, dw_eval, db_eval;
};

Outputs run_all(const Tensor& x, const Tensor& dy, int threads) {
  bnorm::set_num_threads(threads);
  const int64_t c = x.c();
  Outputs o;
  std::mt19937_64 rng(7);
  const std::vector<float> weight = RandomVector(rng, c, 0.5, 1.5),
                           bias = RandomVector(rng, c, -1, 1);
  Tensor y(x.dims, x.layout), y_eval(x.dims, x.layout), dx(x.dims, x.layout),
      dx_eval(x.dims, x.layout);
  o.save_mean.assign(c, 0);
  o.save_invstd.assign(c, 0);
  o.rm.assign(c, 0.5f);
  o.rv.assign(c, 2.0f);
  bnorm::ForwardTrainArgs f;
  f.x = x.cview();
  f.y = y.view();
  f.weight = weight;
  f.bias = bias;
  f.running_mean = o.rm;
  f.running_var = o.rv;
  f.save_mean = o.save_mean;
  f.save_invstd = o.save_invstd;
  EXPECT_TRUE(IsOk(bnorm::forward_train(f)));
  o.y = y.data;

  bnorm::ForwardEvalArgs e;
  e.x = x.cview();
  e.y = y_eval.view();
  e.weight = weight;
  e.bias = bias;
  e.running_mean = o.rm;
  e.running_var = o.rv;
  EXPECT_TRUE(IsOk(bnorm::forward_eval(e)));
  o.y_eval = y_eval.data;

  for (bool training : {true, false}) {
    std::vector<float> dw(c), db(c);
    Tensor& out = training ? dx : dx_eval;
    bnorm::BackwardArgs b;
    b.dy = dy.cview();
    b.x = x.cview();
    b.weight = weight;
    b.training = training;
    b.save_mean = o.save_mean;
    b.save_invstd = o.save_invstd;
    b.running_mean = o.rm;
    b.running_var = o.rv;
    b.dx = out.view();
    b.dweight = dw;
    b.dbias = db;
    EXPECT_TRUE(IsOk(bnorm::backward(b)));
    (training ? o.dw_train : o.dw_eval) = dw;
    (training ? o.db_train : o.db_eval) = db;
  }
  o.dx_train = dx.data;
  o.dx_eval = dx_eval.data;
  bnorm::set_num_threads(0);
  return o;
}

void expect_identical(const Outputs& a, const Outputs& b) {
  EXPECT_TRUE(BitIdentical(a.y, b.y)) << "y";
  EXPECT_TRUE(BitIdentical(a.save_mean, b.save_mean)) << "save_mean";
  EXPECT_TRUE(BitIdentical(a.save_invstd, b.save_invstd)) << "save_invstd";
  EXPECT_TRUE(BitIdentical(a.rm, b.rm)) << "running_mean";
  EXPECT_TRUE(BitIdentical(a.rv, b.rv)) << "running_var";
  EXPECT_TRUE(BitIdentical(a.y_eval, b.y_eval)) << "y (eval)";
  EXPECT_TRUE(BitIdentical(a.dx_train, b.dx_train)) << "dx (train)";
  EXPECT_TRUE(BitIdentical(a.dw_train, b.dw_train)) << "dweight (train)";
  EXPECT_TRUE(BitIdentical(a.db_train, b.db_train)) << "dbias (train)";
  EXPECT_TRUE(BitIdentical(a.dx_eval, b.dx_eval)) << "dx (eval)";
  EXPECT_TRUE(BitIdentical(a.dw_eval, b.dw_eval)) << "dweight (eval)";
  EXPECT_TRUE(BitIdentical(a.db_eval, b.db_eval)) << "dbias (eval)";
}

// Shapes large enough that every thread count up to 8 gets work (>= 8 * 2^17 elements read).
TEST(CpuDeterminism, BitIdenticalOverThreadCounts) {
  const std::vector<std::pair<std::vector<int64_t>, Layout>> cases = {
      {{4, 32, 96, 96}, Layout::kChannelsFirst},   // large spatial, local: a channel a group
      {{33, 12, 64, 64}, Layout::kChannelsFirst},  // 528 KB a channel: pipelined waves
      {{4, 32, 96, 96}, Layout::kChannelsLast},
      {{96, 256, 7, 7}, Layout::kChannelsFirst},  // 7x7: local channel groups
      {{8192, 160}, Layout::kChannelsFirst},      // 2-D (N, C)
      {{3, 5, 40000}, Layout::kChannelsFirst},    // few channels, long rows in pieces, local
      {{9, 2, 60000}, Layout::kChannelsFirst},    // rows in pieces, not local (2.2 MB a channel)
      {{40, 7, 33, 129}, Layout::kChannelsLast},  // odd C
  };
  for (const auto& [dims, layout] : cases) {
    BNORM_SEEDED_RNG(rng, 99);
    const Tensor x = RandomTensor(rng, dims, layout, ChannelOffsets(dims[1], 50.0), 3.0);
    const Tensor dy = RandomTensor(rng, dims, layout);
    SCOPED_TRACE(x.Describe());
    const Outputs one = run_all(x, dy, 1);
    for (int threads : {2, 3, 8}) {
      SCOPED_TRACE(::testing::Message() << threads << " threads");
      expect_identical(one, run_all(x, dy, threads));
    }
  }
}

// forward_train and the training backward run a channels-first tensor whose channels are short
// (n * S * 4 bytes <= kLocalGroupBytes) group by group, each group of channels sized for L2
// reduced, merged and applied by one thread; the stats, apply, backward_reduce and backward_apply
// passes (which sync batch norm composes) each sweep the whole tensor, the apply passes with
// wider groups. Every output must be bitwise the same. Shapes: several groups with a shorter
// last one (7x7), groups of one channel, rows cut into pieces, and a tensor of one group.
TEST(CpuDeterminism, TrainingPassesByGroupEqualTheSeparatePasses) {
  const std::vector<std::vector<int64_t>> shapes = {
      {12, 700, 7, 7}, {96, 256, 7, 7}, {6, 40, 28, 28}, {2, 6, 20000}, {3, 9, 5}};
  for (const auto& dims : shapes) {
    BNORM_SEEDED_RNG(rng, 5);
    const Tensor x = RandomTensor(rng, dims, Layout::kChannelsFirst, ChannelOffsets(dims[1], 20.0));
    const Tensor dy = RandomTensor(rng, dims, Layout::kChannelsFirst);
    SCOPED_TRACE(x.Describe());
    const int64_t c = x.c();
    const std::vector<float> weight = RandomVector(rng, c, 0.5, 1.5),
                             bias = RandomVector(rng, c, -1, 1);
    for (int threads : {1, 2}) {
      bnorm::set_num_threads(threads);
      // The whole passes.
      Tensor y(dims, Layout::kChannelsFirst), dx(dims, Layout::kChannelsFirst);
      std::vector<float> save_mean(c), save_invstd(c), dw(c), db(c);
      bnorm::ForwardTrainArgs f;
      f.x = x.cview();
      f.y = y.view();
      f.weight = weight;
      f.bias = bias;
      f.save_mean = save_mean;
      f.save_invstd = save_invstd;
      ASSERT_TRUE(IsOk(bnorm::forward_train(f)));
      bnorm::BackwardArgs b;
      b.dy = dy.cview();
      b.x = x.cview();
      b.weight = weight;
      b.training = true;
      b.save_mean = save_mean;
      b.save_invstd = save_invstd;
      b.dx = dx.view();
      b.dweight = dw;
      b.dbias = db;
      ASSERT_TRUE(IsOk(bnorm::backward(b)));

      // The separate passes.
      bnorm::detail::Geometry g;
      g.layout = Layout::kChannelsFirst;
      g.n = x.n();
      g.c = c;
      g.s = x.s();
      const size_t cs = static_cast<size_t>(c);
      std::vector<double> mean(cs), var(cs), invstd(cs), w64(weight.begin(), weight.end()),
          b64(bias.begin(), bias.end());
      bnorm::cpu::stats(g, x.data.data(), mean.data(), var.data());
      bnorm::cpu::finalize(g, mean.data(), var.data(), 1e-5, 0.1, invstd.data(), nullptr, nullptr);
      std::vector<float> y2(x.data.size()), dx2(x.data.size());
      bnorm::cpu::apply(g, x.data.data(), mean.data(), invstd.data(), w64.data(), b64.data(),
                        y2.data());
      std::vector<float> mean32(cs), invstd32(cs);
      for (size_t k = 0; k < cs; ++k) {
        mean32[k] = static_cast<float>(mean[k]);
        invstd32[k] = static_cast<float>(invstd[k]);
      }
      EXPECT_TRUE(BitIdentical(save_mean, mean32)) << threads << " threads: save_mean";
      EXPECT_TRUE(BitIdentical(save_invstd, invstd32)) << threads << " threads: save_invstd";
      EXPECT_TRUE(BitIdentical(y.data, y2)) << threads << " threads: y";

      std::vector<double> m(save_mean.begin(), save_mean.end()),
          is(save_invstd.begin(), save_invstd.end()), sum_dy(cs), sum_dy_xhat(cs);
      bnorm::cpu::backward_reduce(g, dy.data.data(), x.data.data(), m.data(), is.data(),
                                  sum_dy.data(), sum_dy_xhat.data());
      bnorm::cpu::backward_apply(g, dy.data.data(), x.data.data(), m.data(), is.data(), w64.data(),
                                 sum_dy.data(), sum_dy_xhat.data(), true, dx2.data());
      std::vector<float> dw2(cs), db2(cs);
      for (size_t k = 0; k < cs; ++k) {
        dw2[k] = static_cast<float>(sum_dy_xhat[k]);
        db2[k] = static_cast<float>(sum_dy[k]);
      }
      EXPECT_TRUE(BitIdentical(dw, dw2)) << threads << " threads: dweight";
      EXPECT_TRUE(BitIdentical(db, db2)) << threads << " threads: dbias";
      EXPECT_TRUE(BitIdentical(dx.data, dx2)) << threads << " threads: dx";
    }
    bnorm::set_num_threads(0);
  }
}

}  // namespace
}  // namespace bnorm_test
