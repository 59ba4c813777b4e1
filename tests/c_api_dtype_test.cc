// The C API's *_dt entry points (bnorm_forward_train_dt, ..., include/bnorm/c_api.h): with bf16
// and fp16 tensors, bitwise the C++ API's results on views of the same 16-bit data (every
// output: y, dx, dz and the fp32 per-channel vectors), in both layouts, with and without the
// affine parameters and the residual; with BNORM_FLOAT32, bitwise the fp32 entry points; and a
// dtype outside the three (fp64's 3, -1, 7) rejected by every *_dt entry point with the message
// naming it and nothing written.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/c_api.h"
#include "bnorm/tensor.h"

namespace {

using bnorm::DType;
using bnorm::Layout;

// 16-bit elements of a dtype as raw bits; float elements for BNORM_FLOAT32.
struct Buf {
  int dtype = BNORM_BFLOAT16;
  std::vector<uint16_t> h;
  std::vector<float> f;
  void* data() { return dtype == BNORM_FLOAT32 ? static_cast<void*>(f.data()) : h.data(); }
  const void* data() const {
    return dtype == BNORM_FLOAT32 ? static_cast<const void*>(f.data()) : h.data();
  }
  bool operator==(const Buf& o) const {
    // memcmp only on non-empty data (an empty vector's data() may be null).
    return dtype == o.dtype && h == o.h && f.size() == o.f.size() &&
           (f.empty() || std::memcmp(f.data(), o.f.data(), f.size() * sizeof(float)) == 0);
  }
};

Buf MakeBuf(int dtype, const std::vector<double>& v) {
  Buf b;
  b.dtype = dtype;
  for (double d : v) {
    const float f = static_cast<float>(d);
    if (dtype == BNORM_FLOAT32)
      b.f.push_back(f);
    else if (dtype == BNORM_BFLOAT16)
      b.h.push_back(bnorm::to_bfloat16(f).bits);
    else
      b.h.push_back(bnorm::to_float16(f).bits);
  }
  return b;
}

Buf Filled(int dtype, size_t count) {  // a recognizable pattern: nothing written keeps it
  Buf b;
  b.dtype = dtype;
  if (dtype == BNORM_FLOAT32)
    b.f.assign(count, -7.0f);
  else
    b.h.assign(count, 0xABCD);
  return b;
}

std::vector<double> Normal(size_t count, double mean, double sd, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(mean, sd);
  std::vector<double> v(count);
  for (double& d : v) d = normal(rng);
  return v;
}

bnorm::ConstTensorView CView(const Buf& b, Layout l, int64_t n, int64_t c, int64_t s) {
  const std::vector<int64_t> dims = s == 1 ? std::vector<int64_t>{n, c}
                                           : std::vector<int64_t>{n, c, s};
  return bnorm::ConstTensorView(b.data(), static_cast<DType>(b.dtype), dims, l);
}
bnorm::TensorView MView(Buf& b, Layout l, int64_t n, int64_t c, int64_t s) {
  const std::vector<int64_t> dims = s == 1 ? std::vector<int64_t>{n, c}
                                           : std::vector<int64_t>{n, c, s};
  return bnorm::TensorView(b.data(), static_cast<DType>(b.dtype), dims, l);
}

bnorm_layout CLayout(Layout l) {
  return l == Layout::kChannelsLast ? BNORM_CHANNELS_LAST : BNORM_CHANNELS_FIRST;
}

void ExpectSameFloats(const std::vector<float>& a, const std::vector<float>& b,
                      const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << what;
}

struct Case {
  int dtype;
  int64_t n, c, s;
  Layout layout;
  bool affine;
};

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  const Case& k = info.param;
  const char* dt = k.dtype == BNORM_BFLOAT16 ? "bf16" : k.dtype == BNORM_FLOAT16 ? "fp16" : "fp32";
  return std::string(dt) + "_" + std::to_string(k.n) + "x" + std::to_string(k.c) + "x" +
         std::to_string(k.s) + (k.layout == Layout::kChannelsLast ? "_last" : "_first") +
         (k.affine ? "_affine" : "_plain");
}

// A problem in dtype: x, dy and z rounded to it; the per-channel vectors fp32.
struct Problem {
  Case k;
  Buf x, dy, z;
  std::vector<float> weight, bias, running_mean, running_var;
  size_t count() const { return static_cast<size_t>(k.n * k.c * k.s); }
  const float* w() const { return k.affine ? weight.data() : nullptr; }
  const float* b() const { return k.affine ? bias.data() : nullptr; }
};

Problem MakeProblem(const Case& k) {
  Problem p;
  p.k = k;
  const size_t count = static_cast<size_t>(k.n * k.c * k.s);
  p.x = MakeBuf(k.dtype, Normal(count, 1.5, 2.0, 11));
  p.dy = MakeBuf(k.dtype, Normal(count, 0.0, 1.0, 12));
  p.z = MakeBuf(k.dtype, Normal(count, 0.2, 1.0, 13));
  const auto f = [](const std::vector<double>& v) {
    return std::vector<float>(v.begin(), v.end());
  };
  p.weight = f(Normal(static_cast<size_t>(k.c), 1.0, 0.3, 14));
  p.bias = f(Normal(static_cast<size_t>(k.c), 0.0, 0.3, 15));
  p.running_mean = f(Normal(static_cast<size_t>(k.c), 0.5, 0.2, 16));
  p.running_var = f(Normal(static_cast<size_t>(k.c), 0.0, 0.2, 17));
  for (float& v : p.running_var) v = 1.0f + std::abs(v);
  return p;
}

class CApiDtype : public ::testing::TestWithParam<Case> {};

TEST_P(CApiDtype, ForwardTrainEqualsTheCppApi) {
  const Problem p = MakeProblem(GetParam());
  const Case& k = p.k;
  const size_t c = static_cast<size_t>(k.c);
  // Through the C API.
  Buf y = Filled(k.dtype, p.count());
  std::vector<float> rm = p.running_mean, rv = p.running_var, sm(c), si(c);
  int64_t nbt = 3;
  ASSERT_EQ(bnorm_forward_train_dt(CLayout(k.layout), k.dtype, k.n, k.c, k.s, p.x.data(), p.w(),
                                   p.b(), rm.data(), rv.data(), &nbt, 0.1, 1e-5, y.data(),
                                   sm.data(), si.data()),
            BNORM_OK)
      << bnorm_last_error();
  // Through the C++ API.
  Buf y2 = Filled(k.dtype, p.count());
  std::vector<float> rm2 = p.running_mean, rv2 = p.running_var, sm2(c), si2(c);
  int64_t nbt2 = 3;
  bnorm::ForwardTrainArgs a;
  a.x = CView(p.x, k.layout, k.n, k.c, k.s);
  if (k.affine) {
    a.weight = p.weight;
    a.bias = p.bias;
  }
  a.running_mean = rm2;
  a.running_var = rv2;
  a.num_batches_tracked = &nbt2;
  a.y = MView(y2, k.layout, k.n, k.c, k.s);
  a.save_mean = sm2;
  a.save_invstd = si2;
  ASSERT_TRUE(bnorm::forward_train(a).ok());
  EXPECT_TRUE(y == y2) << "y";
  ExpectSameFloats(rm, rm2, "running_mean");
  ExpectSameFloats(rv, rv2, "running_var");
  ExpectSameFloats(sm, sm2, "save_mean");
  ExpectSameFloats(si, si2, "save_invstd");
  EXPECT_EQ(nbt, 4);
  EXPECT_EQ(nbt2, 4);
  // The backward from those statistics, and the eval-mode backward.
  for (int training : {1, 0}) {
    SCOPED_TRACE(training ? "training backward" : "eval backward");
    Buf dx = Filled(k.dtype, p.count()), dx2 = Filled(k.dtype, p.count());
    std::vector<float> dw(c, -1), db(c, -1), dw2(c, -1), db2(c, -1);
    ASSERT_EQ(bnorm_backward_dt(CLayout(k.layout), k.dtype, k.n, k.c, k.s, p.dy.data(),
                                p.x.data(), p.w(), sm.data(), si.data(), p.running_mean.data(),
                                p.running_var.data(), 1e-5, training, dx.data(), dw.data(),
                                db.data()),
              BNORM_OK)
        << bnorm_last_error();
    bnorm::BackwardArgs b;
    b.dy = CView(p.dy, k.layout, k.n, k.c, k.s);
    b.x = a.x;
    if (k.affine) b.weight = p.weight;
    b.training = training != 0;
    b.save_mean = sm;
    b.save_invstd = si;
    b.running_mean = p.running_mean;
    b.running_var = p.running_var;
    b.dx = MView(dx2, k.layout, k.n, k.c, k.s);
    b.dweight = dw2;
    b.dbias = db2;
    ASSERT_TRUE(bnorm::backward(b).ok());
    EXPECT_TRUE(dx == dx2) << "dx";
    ExpectSameFloats(dw, dw2, "dweight");
    ExpectSameFloats(db, db2, "dbias");
  }
}

TEST_P(CApiDtype, ForwardEvalEqualsTheCppApi) {
  const Problem p = MakeProblem(GetParam());
  const Case& k = p.k;
  Buf y = Filled(k.dtype, p.count()), y2 = Filled(k.dtype, p.count());
  ASSERT_EQ(bnorm_forward_eval_dt(CLayout(k.layout), k.dtype, k.n, k.c, k.s, p.x.data(), p.w(),
                                  p.b(), p.running_mean.data(), p.running_var.data(), 1e-5,
                                  y.data()),
            BNORM_OK)
      << bnorm_last_error();
  bnorm::ForwardEvalArgs a;
  a.x = CView(p.x, k.layout, k.n, k.c, k.s);
  if (k.affine) {
    a.weight = p.weight;
    a.bias = p.bias;
  }
  a.running_mean = p.running_mean;
  a.running_var = p.running_var;
  a.y = MView(y2, k.layout, k.n, k.c, k.s);
  ASSERT_TRUE(bnorm::forward_eval(a).ok());
  EXPECT_TRUE(y == y2) << "y";
}

TEST_P(CApiDtype, FusedReLUEqualsTheCppApi) {
  const Problem p = MakeProblem(GetParam());
  const Case& k = p.k;
  const size_t c = static_cast<size_t>(k.c);
  for (bool with_z : {false, true}) {
    SCOPED_TRACE(with_z ? "relu(bn(x) + z)" : "relu(bn(x))");
    const void* z = with_z ? p.z.data() : nullptr;
    Buf y = Filled(k.dtype, p.count()), y2 = Filled(k.dtype, p.count());
    std::vector<float> rm = p.running_mean, rv = p.running_var, sm(c), si(c);
    std::vector<float> rm2 = rm, rv2 = rv, sm2(c), si2(c);
    ASSERT_EQ(bnorm_forward_train_relu_dt(CLayout(k.layout), k.dtype, k.n, k.c, k.s, p.x.data(),
                                          p.w(), p.b(), rm.data(), rv.data(), nullptr, 0.1, 1e-5,
                                          z, y.data(), sm.data(), si.data()),
              BNORM_OK)
        << bnorm_last_error();
    bnorm::ForwardTrainArgs a;
    a.x = CView(p.x, k.layout, k.n, k.c, k.s);
    if (k.affine) {
      a.weight = p.weight;
      a.bias = p.bias;
    }
    a.running_mean = rm2;
    a.running_var = rv2;
    a.y = MView(y2, k.layout, k.n, k.c, k.s);
    a.save_mean = sm2;
    a.save_invstd = si2;
    const bnorm::ConstTensorView zv =
        with_z ? CView(p.z, k.layout, k.n, k.c, k.s) : bnorm::ConstTensorView();
    ASSERT_TRUE(bnorm::forward_train_relu(a, zv).ok());
    EXPECT_TRUE(y == y2) << "y";
    ExpectSameFloats(rm, rm2, "running_mean");
    ExpectSameFloats(rv, rv2, "running_var");
    ExpectSameFloats(sm, sm2, "save_mean");
    ExpectSameFloats(si, si2, "save_invstd");

    Buf ye = Filled(k.dtype, p.count()), ye2 = Filled(k.dtype, p.count());
    ASSERT_EQ(bnorm_forward_eval_relu_dt(CLayout(k.layout), k.dtype, k.n, k.c, k.s, p.x.data(),
                                         p.w(), p.b(), p.running_mean.data(),
                                         p.running_var.data(), 1e-5, z, ye.data()),
              BNORM_OK)
        << bnorm_last_error();
    bnorm::ForwardEvalArgs e;
    e.x = a.x;
    if (k.affine) {
      e.weight = p.weight;
      e.bias = p.bias;
    }
    e.running_mean = p.running_mean;
    e.running_var = p.running_var;
    e.y = MView(ye2, k.layout, k.n, k.c, k.s);
    ASSERT_TRUE(bnorm::forward_eval_relu(e, zv).ok());
    EXPECT_TRUE(ye == ye2) << "eval y";

    Buf dx = Filled(k.dtype, p.count()), dx2 = Filled(k.dtype, p.count());
    Buf dz = Filled(k.dtype, p.count()), dz2 = Filled(k.dtype, p.count());
    std::vector<float> dw(c, -1), db(c, -1), dw2(c, -1), db2(c, -1);
    ASSERT_EQ(bnorm_backward_relu_dt(CLayout(k.layout), k.dtype, k.n, k.c, k.s, p.dy.data(),
                                     p.x.data(), y.data(), p.w(), sm.data(), si.data(), nullptr,
                                     nullptr, 1e-5, 1, dx.data(), dw.data(), db.data(),
                                     with_z ? dz.data() : nullptr),
              BNORM_OK)
        << bnorm_last_error();
    bnorm::BackwardArgs b;
    b.dy = CView(p.dy, k.layout, k.n, k.c, k.s);
    b.x = a.x;
    if (k.affine) b.weight = p.weight;
    b.save_mean = sm;
    b.save_invstd = si;
    b.dx = MView(dx2, k.layout, k.n, k.c, k.s);
    b.dweight = dw2;
    b.dbias = db2;
    ASSERT_TRUE(bnorm::backward_relu(b, CView(y, k.layout, k.n, k.c, k.s),
                                     with_z ? MView(dz2, k.layout, k.n, k.c, k.s)
                                            : bnorm::TensorView())
                    .ok());
    EXPECT_TRUE(dx == dx2) << "dx";
    EXPECT_TRUE(dz == dz2) << "dz";
    ExpectSameFloats(dw, dw2, "dweight");
    ExpectSameFloats(db, db2, "dbias");
  }
}

INSTANTIATE_TEST_SUITE_P(
    Dtypes, CApiDtype,
    ::testing::Values(Case{BNORM_BFLOAT16, 8, 3, 1, Layout::kChannelsFirst, true},
                      Case{BNORM_BFLOAT16, 5, 4, 37, Layout::kChannelsFirst, false},
                      Case{BNORM_BFLOAT16, 6, 19, 25, Layout::kChannelsLast, true},
                      Case{BNORM_BFLOAT16, 3, 64, 49, Layout::kChannelsLast, false},
                      Case{BNORM_FLOAT16, 8, 3, 1, Layout::kChannelsFirst, true},
                      Case{BNORM_FLOAT16, 5, 4, 37, Layout::kChannelsFirst, true},
                      Case{BNORM_FLOAT16, 6, 19, 25, Layout::kChannelsLast, false},
                      Case{BNORM_FLOAT32, 5, 4, 37, Layout::kChannelsLast, true}),
    CaseName);

// BNORM_FLOAT32 through the *_dt entry points is the fp32 entry point, bit for bit.
TEST(CApiDtypeFloat32, DtEntryPointsAreTheFp32Ones) {
  const Problem p = MakeProblem(Case{BNORM_FLOAT32, 6, 5, 9, Layout::kChannelsFirst, true});
  const size_t c = 5, count = p.count();
  std::vector<float> y(count), y2(count), rm = p.running_mean, rv = p.running_var, rm2 = rm,
                                          rv2 = rv, sm(c), si(c), sm2(c), si2(c);
  ASSERT_EQ(bnorm_forward_train(BNORM_CHANNELS_FIRST, 6, 5, 9, p.x.f.data(), p.w(), p.b(),
                                rm.data(), rv.data(), nullptr, 0.1, 1e-5, y.data(), sm.data(),
                                si.data()),
            BNORM_OK);
  ASSERT_EQ(bnorm_forward_train_dt(BNORM_CHANNELS_FIRST, BNORM_FLOAT32, 6, 5, 9, p.x.f.data(),
                                   p.w(), p.b(), rm2.data(), rv2.data(), nullptr, 0.1, 1e-5,
                                   y2.data(), sm2.data(), si2.data()),
            BNORM_OK);
  ExpectSameFloats(y, y2, "y");
  ExpectSameFloats(rm, rm2, "running_mean");
  ExpectSameFloats(si, si2, "save_invstd");
  std::vector<float> dx(count), dx2(count), dw(c), db(c), dw2(c), db2(c);
  ASSERT_EQ(bnorm_backward(BNORM_CHANNELS_FIRST, 6, 5, 9, p.dy.f.data(), p.x.f.data(), p.w(),
                           sm.data(), si.data(), nullptr, nullptr, 1e-5, 1, dx.data(), dw.data(),
                           db.data()),
            BNORM_OK);
  ASSERT_EQ(bnorm_backward_dt(BNORM_CHANNELS_FIRST, BNORM_FLOAT32, 6, 5, 9, p.dy.f.data(),
                              p.x.f.data(), p.w(), sm.data(), si.data(), nullptr, nullptr, 1e-5,
                              1, dx2.data(), dw2.data(), db2.data()),
            BNORM_OK);
  ExpectSameFloats(dx, dx2, "dx");
  ExpectSameFloats(dw, dw2, "dweight");
  ExpectSameFloats(db, db2, "dbias");
}

// Every *_dt entry point rejects a dtype outside the three, naming it, and writes nothing
// (otherwise valid arguments: the dtype is the only fault).
TEST(CApiDtypeRejects, BadDtypeNamedAndNothingWritten) {
  const int64_t n = 4, c = 3, s = 5;
  const size_t count = static_cast<size_t>(n * c * s);
  std::vector<float> x(count, 1.25f), dy(count, 0.5f), w(c, 1.0f), b(c, 0.0f), rm(c, 0.0f),
      rv(c, 1.0f), sm(c, 0.5f), si(c, 2.0f);
  for (size_t i = 0; i < count; ++i) x[i] = static_cast<float>(i % 7);
  for (int bad : {3, -1, 7}) {
    SCOPED_TRACE("dtype " + std::to_string(bad));
    const std::string want = "dtype " + std::to_string(bad) +
                             " is not one of float32 (0), bfloat16 (1), float16 (2); float64 "
                             "tensors are not supported";
    std::vector<float> out(count, -3.0f), out2(count, -3.0f), v1(c, -3.0f), v2(c, -3.0f),
        rm_w = rm, rv_w = rv;
    int64_t nbt = 5;
    const auto unchanged = [&] {
      for (float f : out) ASSERT_EQ(f, -3.0f);
      for (float f : out2) ASSERT_EQ(f, -3.0f);
      for (float f : v1) ASSERT_EQ(f, -3.0f);
      for (float f : v2) ASSERT_EQ(f, -3.0f);
      ExpectSameFloats(rm_w, rm, "running_mean");
      ExpectSameFloats(rv_w, rv, "running_var");
      ASSERT_EQ(nbt, 5);
    };
    const auto rejected = [&](int rc, const char* entry) {
      EXPECT_EQ(rc, BNORM_ERROR_INVALID_ARGUMENT) << entry;
      EXPECT_NE(std::string(bnorm_last_error()).find(want), std::string::npos)
          << entry << ": " << bnorm_last_error();
      unchanged();
    };
    const auto L = BNORM_CHANNELS_FIRST;
    rejected(bnorm_forward_train_dt(L, bad, n, c, s, x.data(), w.data(), b.data(), rm_w.data(),
                                    rv_w.data(), &nbt, 0.1, 1e-5, out.data(), v1.data(),
                                    v2.data()),
             "bnorm_forward_train_dt");
    rejected(bnorm_forward_train_ext_dt(L, bad, n, c, s, x.data(), w.data(), b.data(),
                                        rm_w.data(), rv_w.data(), &nbt, 0.1, 1e-5, out.data(),
                                        v1.data(), v2.data(), nullptr),
             "bnorm_forward_train_ext_dt");
    rejected(bnorm_forward_eval_dt(L, bad, n, c, s, x.data(), w.data(), b.data(), rm.data(),
                                   rv.data(), 1e-5, out.data()),
             "bnorm_forward_eval_dt");
    rejected(bnorm_backward_dt(L, bad, n, c, s, dy.data(), x.data(), w.data(), sm.data(),
                               si.data(), nullptr, nullptr, 1e-5, 1, out.data(), v1.data(),
                               v2.data()),
             "bnorm_backward_dt");
    rejected(bnorm_backward_ext_dt(L, bad, n, c, s, dy.data(), x.data(), w.data(), sm.data(),
                                   si.data(), nullptr, nullptr, 1e-5, 1, out.data(), v1.data(),
                                   v2.data(), nullptr),
             "bnorm_backward_ext_dt");
    rejected(bnorm_forward_train_relu_dt(L, bad, n, c, s, x.data(), w.data(), b.data(),
                                         rm_w.data(), rv_w.data(), &nbt, 0.1, 1e-5, dy.data(),
                                         out.data(), v1.data(), v2.data()),
             "bnorm_forward_train_relu_dt");
    rejected(bnorm_forward_eval_relu_dt(L, bad, n, c, s, x.data(), w.data(), b.data(), rm.data(),
                                        rv.data(), 1e-5, dy.data(), out.data()),
             "bnorm_forward_eval_relu_dt");
    rejected(bnorm_backward_relu_dt(L, bad, n, c, s, dy.data(), x.data(), x.data(), w.data(),
                                    sm.data(), si.data(), nullptr, nullptr, 1e-5, 1, out.data(),
                                    v1.data(), v2.data(), out2.data()),
             "bnorm_backward_relu_dt");
    bnorm_comm one{};
    one.size = 1;
    rejected(bnorm_sync_forward_train_dt(&one, nullptr, L, bad, n, c, s, x.data(), w.data(),
                                         b.data(), rm_w.data(), rv_w.data(), &nbt, 0.1, 1e-5,
                                         out.data(), v1.data(), v2.data()),
             "bnorm_sync_forward_train_dt");
    rejected(bnorm_sync_backward_dt(&one, nullptr, L, bad, n, c, s, dy.data(), x.data(),
                                    w.data(), sm.data(), si.data(), out.data(), v1.data(),
                                    v2.data()),
             "bnorm_sync_backward_dt");
  }
}

}  // namespace
