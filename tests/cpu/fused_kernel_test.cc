// The fused BN + ReLU and BN + add + ReLU passes against the unfused composition, on every
// Highway target compiled into the library and on the reference.
//
// The fused CPU kernels compute in fp32 what the composition computes: bn(x) rounded as the
// unfused apply rounds it, then + z in fp32, then max(., 0); the backward sums and applies
// g = dy * (y > 0), which is exact. So on every target, and on the reference (whose fused
// backward masks dy, then runs the unfused passes), the fused outputs are bitwise those of
// backward() on g, and the fused forward of the CPU kernels bitwise relu(forward() + z). The
// reference's fused forward rounds once from fp64, so it is within one rounding of that.
// In place (y over x or z, dx over dy, x or y, dz over dy) the outputs are bitwise the same.
#include <hwy/highway.h>
#include <hwy/tests/hwy_gtest.h>

#include <cmath>
#include <vector>

#include "bnorm/batch_norm.h"
#include "test_util.h"

namespace bnorm_test {
namespace {

using bnorm::Backend;

float relu_of(float v) { return v <= 0.0f ? 0.0f : v; }

struct Case {
  std::vector<int64_t> dims;
  Layout layout;
  bool add;
  bool training;
  Backend backend;
};

std::string describe(const Case& k) {
  return DimsString(k.dims) + " " + LayoutTag(k.layout) + (k.add ? " add" : "") +
         (k.training ? " train" : " eval") +
         (k.backend == Backend::kReference ? " reference" : " cpu");
}

void check_case(const Case& k, uint64_t seed) {
  SCOPED_TRACE(describe(k));
  BNORM_SEEDED_RNG(rng, seed);
  const Tensor x = RandomTensor(rng, k.dims, k.layout, ChannelOffsets(k.dims[1], 2.0), 1.5);
  const Tensor z = RandomTensor(rng, k.dims, k.layout);
  const Tensor dy = RandomTensor(rng, k.dims, k.layout);
  const int64_t c = k.dims[1];
  const std::vector<float> w = RandomVector(rng, c, -1.5, 1.5);
  const std::vector<float> b = RandomVector(rng, c, -0.5, 0.5);
  const std::vector<float> rm0 = RandomVector(rng, c, -1.0, 1.0);
  const std::vector<float> rv0 = RandomVector(rng, c, 0.5, 3.0);
  bnorm::CallOptions opt;
  opt.backend = k.backend;
  const bnorm::ConstTensorView zv = k.add ? z.cview() : bnorm::ConstTensorView();

  // Forward: fused, and the unfused composition.
  Tensor y(k.dims, k.layout), y_bn(k.dims, k.layout);
  std::vector<float> rm = rm0, rv = rv0, rm_u = rm0, rv_u = rv0;
  std::vector<float> sm(c), si(c), sm_u(c), si_u(c);
  if (k.training) {
    bnorm::ForwardTrainArgs a;
    a.x = x.cview();
    a.weight = w;
    a.bias = b;
    a.running_mean = rm;
    a.running_var = rv;
    a.y = y.view();
    a.save_mean = sm;
    a.save_invstd = si;
    ASSERT_TRUE(IsOk(bnorm::forward_train_relu(a, zv, opt)));
    a.running_mean = rm_u;
    a.running_var = rv_u;
    a.y = y_bn.view();
    a.save_mean = sm_u;
    a.save_invstd = si_u;
    ASSERT_TRUE(IsOk(bnorm::forward_train(a, opt)));
    EXPECT_TRUE(BitIdentical(rm, rm_u));
    EXPECT_TRUE(BitIdentical(rv, rv_u));
    EXPECT_TRUE(BitIdentical(sm, sm_u));
    EXPECT_TRUE(BitIdentical(si, si_u));
  } else {
    bnorm::ForwardEvalArgs a;
    a.x = x.cview();
    a.weight = w;
    a.bias = b;
    a.running_mean = rm0;
    a.running_var = rv0;
    a.y = y.view();
    ASSERT_TRUE(IsOk(bnorm::forward_eval_relu(a, zv, opt)));
    a.y = y_bn.view();
    ASSERT_TRUE(IsOk(bnorm::forward_eval(a, opt)));
  }
  std::vector<float> want(y.data.size());
  for (size_t i = 0; i < want.size(); ++i)
    want[i] = relu_of(k.add ? y_bn.data[i] + z.data[i] : y_bn.data[i]);
  if (k.backend == Backend::kReference) {
    // One rounding from fp64 against two in fp32.
    for (size_t i = 0; i < want.size(); ++i) {
      const double tol = 2 * kFloatU * (std::fabs(y_bn.data[i]) + (k.add ? std::fabs(z.data[i]) : 0));
      ASSERT_LE(std::fabs(y.data[i] - want[i]), tol) << "y[" << i << "]";
    }
  } else {
    ASSERT_TRUE(BitIdentical(y.data, want));
  }
  // In place: y over x, and y over z.
  {
    Tensor xy = x;
    Tensor zy = z;
    std::vector<float> rm2 = rm0, rv2 = rv0;
    for (int variant = 0; variant < (k.add ? 2 : 1); ++variant) {
      const bool over_x = variant == 0;
      Tensor& out = over_x ? xy : zy;
      if (k.training) {
        bnorm::ForwardTrainArgs a;
        a.x = over_x ? xy.cview() : x.cview();
        a.weight = w;
        a.bias = b;
        a.y = out.view();
        ASSERT_TRUE(IsOk(bnorm::forward_train_relu(
            a, k.add ? (over_x ? z.cview() : zy.cview()) : bnorm::ConstTensorView(), opt)));
      } else {
        bnorm::ForwardEvalArgs a;
        a.x = over_x ? xy.cview() : x.cview();
        a.weight = w;
        a.bias = b;
        a.running_mean = rm0;
        a.running_var = rv0;
        a.y = out.view();
        ASSERT_TRUE(IsOk(bnorm::forward_eval_relu(
            a, k.add ? (over_x ? z.cview() : zy.cview()) : bnorm::ConstTensorView(), opt)));
      }
      EXPECT_TRUE(BitIdentical(out.data, y.data)) << (over_x ? "y over x" : "y over z");
    }
  }

  // Backward: fused from (dy, y), and backward() on g = dy * (y > 0).
  Tensor g(k.dims, k.layout);
  for (size_t i = 0; i < g.data.size(); ++i) g.data[i] = y.data[i] > 0 ? dy.data[i] : 0.0f;
  auto args = [&](bnorm::ConstTensorView dyv, bnorm::ConstTensorView xv, bnorm::TensorView dxv,
                  std::vector<float>& dw, std::vector<float>& db) {
    bnorm::BackwardArgs a;
    a.dy = dyv;
    a.x = xv;
    a.weight = w;
    a.training = k.training;
    a.save_mean = sm;
    a.save_invstd = si;
    a.running_mean = rm0;
    a.running_var = rv0;
    a.dx = dxv;
    a.dweight = dw;
    a.dbias = db;
    return a;
  };
  Tensor dx(k.dims, k.layout), dz(k.dims, k.layout), dx_u(k.dims, k.layout);
  std::vector<float> dw(c), db(c), dw_u(c), db_u(c);
  ASSERT_TRUE(IsOk(bnorm::backward_relu(args(dy.cview(), x.cview(), dx.view(), dw, db), y.cview(),
                                        dz.view(), opt)));
  ASSERT_TRUE(IsOk(bnorm::backward(args(g.cview(), x.cview(), dx_u.view(), dw_u, db_u), opt)));
  EXPECT_TRUE(BitIdentical(dx.data, dx_u.data));
  EXPECT_TRUE(BitIdentical(dw, dw_u));
  EXPECT_TRUE(BitIdentical(db, db_u));
  EXPECT_TRUE(BitIdentical(dz.data, g.data));
  // In place: dx over dy (dz separate), over x, over y; dz over dy (dx separate).
  for (int variant = 0; variant < 4; ++variant) {
    Tensor dy2 = dy, x2 = x, y2 = y, dx2(k.dims, k.layout), dz2(k.dims, k.layout);
    std::vector<float> dw2(c), db2(c);
    bnorm::TensorView dxv = variant == 0   ? dy2.view()
                            : variant == 1 ? x2.view()
                            : variant == 2 ? y2.view()
                                           : dx2.view();
    bnorm::TensorView dzv = variant == 3 ? dy2.view() : dz2.view();
    ASSERT_TRUE(IsOk(bnorm::backward_relu(args(dy2.cview(), x2.cview(), dxv, dw2, db2),
                                          y2.cview(), dzv, opt)))
        << "variant " << variant;
    const Tensor& got_dx = variant == 0 ? dy2 : variant == 1 ? x2 : variant == 2 ? y2 : dx2;
    const Tensor& got_dz = variant == 3 ? dy2 : dz2;
    EXPECT_TRUE(BitIdentical(got_dx.data, dx.data)) << "in-place variant " << variant;
    EXPECT_TRUE(BitIdentical(got_dz.data, g.data)) << "in-place variant " << variant;
    EXPECT_TRUE(BitIdentical(dw2, dw));
    EXPECT_TRUE(BitIdentical(db2, db));
  }
}

void check_all(Backend backend, const std::vector<std::vector<int64_t>>& shapes, uint64_t seed) {
  for (const auto& dims : shapes)
    for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast})
      for (bool add : {false, true})
        for (bool training : {true, false}) {
          check_case({dims, layout, add, training, backend}, seed++);
          if (::testing::Test::HasFatalFailure()) return;
        }
}

class FusedKernelTest : public hwy::TestWithParamTarget {};
HWY_TARGET_INSTANTIATE_TEST_SUITE_P(FusedKernelTest);

// Sizes below, at and above the vector widths (tails, masked tails), tiles and wide
// channels-last rows, several blocks and waves, ranks 2 to 5.
TEST_P(FusedKernelTest, MatchesUnfusedComposition) {
  check_all(Backend::kAuto,
            {{7, 3},
             {3, 5, 17},
             {2, 33, 7},
             {4, 19, 3, 5},
             {2, 3, 2, 3, 4},
             {5, 140, 3},
             {3, 8, 40, 40},
             {2, 2, 20000}},
            300);
}

TEST(FusedReferenceTest, MatchesUnfusedComposition) {
  check_all(Backend::kReference, {{7, 3}, {3, 5, 17}, {4, 19, 3, 5}, {2, 3, 2, 3, 4}}, 500);
}

}  // namespace
}  // namespace bnorm_test
