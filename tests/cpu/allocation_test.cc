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

// A network's worth of shapes in turn (each takes up to four plans: forward and backward, local
// and wide): after one pass over them, the next passes allocate nothing, so the plan cache holds
// them all.
TEST(CpuAllocation, NoneForTwentyShapesInTurn) {
  struct Layer {
    Tensor x, dy, y, dx;
    std::vector<float> w, b, rm, rv, sm, si, dw, db;
  };
  std::vector<Layer> layers;
  BNORM_SEEDED_RNG(rng, 4);
  for (int64_t k = 0; k < 20; ++k) {
    const std::vector<int64_t> dims = {2, 8 + k, 5 + k % 4, 6};  // 20 distinct shapes
    const Layout layout = k % 3 == 2 ? Layout::kChannelsLast : Layout::kChannelsFirst;
    const size_t c = static_cast<size_t>(dims[1]);
    layers.push_back(Layer{RandomTensor(rng, dims, layout), RandomTensor(rng, dims, layout),
                           Tensor(dims, layout), Tensor(dims, layout), std::vector<float>(c, 1.0f),
                           std::vector<float>(c, 0.0f), std::vector<float>(c, 0.0f),
                           std::vector<float>(c, 1.0f), std::vector<float>(c),
                           std::vector<float>(c), std::vector<float>(c), std::vector<float>(c)});
  }
  auto run_all = [&] {
    for (Layer& l : layers) {
      bnorm::ForwardTrainArgs f;
      f.x = l.x.cview();
      f.y = l.y.view();
      f.weight = l.w;
      f.bias = l.b;
      f.running_mean = l.rm;
      f.running_var = l.rv;
      f.save_mean = l.sm;
      f.save_invstd = l.si;
      EXPECT_TRUE(IsOk(bnorm::forward_train(f)));
      bnorm::ForwardEvalArgs e;
      e.x = l.x.cview();
      e.y = l.y.view();
      e.running_mean = l.rm;
      e.running_var = l.rv;
      EXPECT_TRUE(IsOk(bnorm::forward_eval(e)));
      bnorm::BackwardArgs k;
      k.dy = l.dy.cview();
      k.x = l.x.cview();
      k.save_mean = l.sm;
      k.save_invstd = l.si;
      k.dx = l.dx.view();
      k.dweight = l.dw;
      k.dbias = l.db;
      EXPECT_TRUE(IsOk(bnorm::backward(k)));
    }
  };
  bnorm::set_num_threads(2);
  run_all();
  const long before = bnorm_test::alloc::count.load();
  for (int rep = 0; rep < 2; ++rep) run_all();
  EXPECT_EQ(bnorm_test::alloc::count.load() - before, 0);
  bnorm::set_num_threads(0);
}

}  // namespace
}  // namespace bnorm_test
