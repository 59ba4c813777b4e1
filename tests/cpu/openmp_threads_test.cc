// bnorm::use_openmp_threads: the kernels' jobs on the host's OpenMP runtime (libgomp, as PyTorch
// loads it). Before a libgomp is in the process it stays off; once the host has loaded one, every
// slot runs exactly once, bnorm's own pool creates no worker, and every output of every pass is
// bitwise what bnorm's own pool gives. Not built under ThreadSanitizer: libgomp is not
// instrumented, so TSan would report its barriers (the pool's own tests cover TSan).
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <atomic>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/c_api.h"
#include "cpu/thread_pool.h"
#include "test_util.h"

namespace bnorm_test {
namespace {

struct Slots {
  std::vector<std::atomic<int>> hits;
  explicit Slots(int n) : hits(n) {}
};

void hit(void* ctx, int slot, int) { static_cast<Slots*>(ctx)->hits[slot].fetch_add(1); }

struct Passes {
  std::vector<float> y, mean, invstd, rm, rv, dx, dw, db;
};

Passes run_passes(const Tensor& x, const Tensor& dy, int threads) {
  bnorm::set_num_threads(threads);
  const int64_t c = x.c();
  std::mt19937_64 rng(3);
  const std::vector<float> weight = RandomVector(rng, c, 0.5, 1.5), bias = RandomVector(rng, c, -1, 1);
  Passes p;
  p.mean.assign(c, 0);
  p.invstd.assign(c, 0);
  p.rm.assign(c, 0.25f);
  p.rv.assign(c, 1.5f);
  p.dw.assign(c, 0);
  p.db.assign(c, 0);
  Tensor y(x.dims, x.layout), dx(x.dims, x.layout);
  bnorm::ForwardTrainArgs f;
  f.x = x.cview();
  f.y = y.view();
  f.weight = weight;
  f.bias = bias;
  f.running_mean = p.rm;
  f.running_var = p.rv;
  f.save_mean = p.mean;
  f.save_invstd = p.invstd;
  EXPECT_TRUE(IsOk(bnorm::forward_train(f)));
  bnorm::BackwardArgs b;
  b.dy = dy.cview();
  b.x = x.cview();
  b.weight = weight;
  b.training = true;
  b.save_mean = p.mean;
  b.save_invstd = p.invstd;
  b.dx = dx.view();
  b.dweight = p.dw;
  b.dbias = p.db;
  EXPECT_TRUE(IsOk(bnorm::backward(b)));
  p.y = y.data;
  p.dx = dx.data;
  bnorm::set_num_threads(0);
  return p;
}

TEST(OpenmpThreads, OffUntilTheHostLoadsLibgomp) {
  // This binary does not link OpenMP: nothing has loaded libgomp yet.
  ASSERT_EQ(dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD), nullptr)
      << "libgomp is already loaded: the test cannot check the off case";
  EXPECT_FALSE(bnorm::use_openmp_threads(true));
  EXPECT_EQ(bnorm_use_openmp_threads(1), 0);

  // Own pool first (the reference of the comparison), then the host's runtime.
  const std::vector<std::pair<std::vector<int64_t>, Layout>> cases = {
      {{4, 32, 96, 96}, Layout::kChannelsFirst},
      {{4, 32, 96, 96}, Layout::kChannelsLast},
      {{8192, 160}, Layout::kChannelsFirst},
      {{40, 7, 33, 129}, Layout::kChannelsLast},
  };
  std::vector<Tensor> xs, dys;
  std::vector<Passes> own;
  for (const auto& [dims, layout] : cases) {
    BNORM_SEEDED_RNG(rng, 17);
    xs.push_back(RandomTensor(rng, dims, layout, ChannelOffsets(dims[1], 50.0), 3.0));
    dys.push_back(RandomTensor(rng, dims, layout));
    own.push_back(run_passes(xs.back(), dys.back(), 2));
  }

  // The host loads its OpenMP runtime, as importing torch does.
  void* gomp = dlopen("libgomp.so.1", RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(gomp, nullptr) << "libgomp.so.1 (Debian: libgomp1, a dependency of g++) not found: "
                           << dlerror();
  ASSERT_TRUE(bnorm::use_openmp_threads(true));
  EXPECT_TRUE(bnorm::cpu::ThreadPool::using_openmp());

  bnorm::cpu::ThreadPool pool;
  for (int n : {1, 2, 3, 8, 64, 1024}) {
    Slots s(n);
    pool.run(2, n, &hit, &s);
    for (int t = 0; t < n; ++t) ASSERT_EQ(s.hits[t].load(), 1) << "slots " << n << ", slot " << t;
  }
  EXPECT_EQ(pool.worker_count(), 0) << "the jobs ran on bnorm's own workers";

  for (size_t k = 0; k < cases.size(); ++k) {
    SCOPED_TRACE(xs[k].Describe());
    for (int threads : {1, 2, 3}) {
      SCOPED_TRACE(::testing::Message() << threads << " threads on libgomp");
      const Passes got = run_passes(xs[k], dys[k], threads);
      EXPECT_TRUE(BitIdentical(got.y, own[k].y)) << "y";
      EXPECT_TRUE(BitIdentical(got.mean, own[k].mean)) << "save_mean";
      EXPECT_TRUE(BitIdentical(got.invstd, own[k].invstd)) << "save_invstd";
      EXPECT_TRUE(BitIdentical(got.rm, own[k].rm)) << "running_mean";
      EXPECT_TRUE(BitIdentical(got.rv, own[k].rv)) << "running_var";
      EXPECT_TRUE(BitIdentical(got.dx, own[k].dx)) << "dx";
      EXPECT_TRUE(BitIdentical(got.dw, own[k].dw)) << "dweight";
      EXPECT_TRUE(BitIdentical(got.db, own[k].db)) << "dbias";
    }
  }

  // Off again: the own pool runs the jobs.
  EXPECT_FALSE(bnorm::use_openmp_threads(false));
  Slots s(8);
  pool.run(2, 8, &hit, &s);
  EXPECT_EQ(pool.worker_count(), 1);
}

}  // namespace
}  // namespace bnorm_test
