// Plan once, run many: after the first call for a shape, forward and backward allocate nothing.
// Counts every operator new of the process (this test binary replaces the global one).
#include "replaced_new.h"
#include "test_util.h"

namespace bnorm_test {
namespace {

TEST(CpuAllocation, NoneAfterTheFirstCallForAShape) {
  const std::vector<std::pair<std::vector<int64_t>, Layout>> cases = {
      {{4, 32, 64, 64}, Layout::kChannelsFirst}, {{4, 32, 64, 64}, Layout::kChannelsLast},
      {{64, 96, 7, 7}, Layout::kChannelsFirst},  {{4096, 64}, Layout::kChannelsFirst},
      {{8, 64, 8, 8}, Layout::kChannelsFirst},
  };
  bnorm::set_num_threads(2);
  for (const auto& [dims, layout] : cases) {
    BNORM_SEEDED_RNG(rng, 3);
    const Tensor x = RandomTensor(rng, dims, layout);
    const Tensor dy = RandomTensor(rng, dims, layout);
    Tensor y(dims, layout), dx(dims, layout);
    const int64_t c = dims[1];
    std::vector<float> w(c, 1.0f), b(c, 0.0f), rm(c, 0.0f), rv(c, 1.0f), sm(c), si(c), dw(c), db(c);
    bnorm::ForwardTrainArgs f;
    f.x = x.cview();
    f.y = y.view();
    f.weight = w;
    f.bias = b;
    f.running_mean = rm;
    f.running_var = rv;
    f.save_mean = sm;
    f.save_invstd = si;
    bnorm::ForwardEvalArgs e;
    e.x = x.cview();
    e.y = y.view();
    e.running_mean = rm;
    e.running_var = rv;
    bnorm::BackwardArgs k;
    k.dy = dy.cview();
    k.x = x.cview();
    k.save_mean = sm;
    k.save_invstd = si;
    k.running_mean = rm;
    k.running_var = rv;
    k.dx = dx.view();
    k.dweight = dw;
    k.dbias = db;
    auto run_all = [&] {
      EXPECT_TRUE(IsOk(bnorm::forward_train(f)));
      EXPECT_TRUE(IsOk(bnorm::forward_eval(e)));
      k.training = true;
      EXPECT_TRUE(IsOk(bnorm::backward(k)));
      k.training = false;
      EXPECT_TRUE(IsOk(bnorm::backward(k)));
    };
    run_all();  // plans, workspaces, pool threads
    const long before = bnorm_test::alloc::count.load();
    for (int rep = 0; rep < 3; ++rep) run_all();
    EXPECT_EQ(bnorm_test::alloc::count.load() - before, 0) << x.Describe();
  }
  bnorm::set_num_threads(0);
}

}  // namespace
}  // namespace bnorm_test
