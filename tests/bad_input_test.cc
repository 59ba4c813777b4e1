// Every bad input of the functional passes and of the C API. Each case checks the status code,
// the message (naming the argument and its value) and that every output and state buffer is
// bit-for-bit unchanged (outputs are filled with a sentinel pattern first).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/c_api.h"
#include "test_util.h"

namespace bnorm_test {
namespace {

using bnorm::backward;
using bnorm::BackwardArgs;
using bnorm::CallOptions;
using bnorm::ConstTensorView;
using bnorm::forward_eval;
using bnorm::forward_train;
using bnorm::ForwardEvalArgs;
using bnorm::ForwardTrainArgs;
using bnorm::StatusCode;
using bnorm::TensorView;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr double kDNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kDInf = std::numeric_limits<double>::infinity();

// x is (N, C, H, W) = (2, 3, 2, 4): 48 values, C = 3.
const std::vector<int64_t> kDims = {2, 3, 2, 4};
constexpr int64_t kNumel = 48;
constexpr size_t kC = 3;
const std::string kSize = "[2, 3, 2, 4]";

// All buffers of one call of any pass, valid, with outputs holding the sentinel.
struct Buffers {
  explicit Buffers(Layout layout = Layout::kChannelsFirst)
      : x(kDims, layout), y(kDims, layout), dy(kDims, layout), dx(kDims, layout) {
    for (int64_t i = 0; i < x.n(); ++i)
      for (int64_t c = 0; c < x.c(); ++c)
        for (int64_t j = 0; j < x.s(); ++j) {
          x.at(i, c, j) = static_cast<float>(0.25 * c + 0.125 * j - 0.5 * i);
          dy.at(i, c, j) = static_cast<float>(0.1 * (j % 3) - 0.2 * c + 0.05 * i);
        }
    FillSentinel(y.data);
    FillSentinel(dx.data);
    FillSentinel(save_mean);
    FillSentinel(save_invstd);
    FillSentinel(dweight);
    FillSentinel(dbias);
    FillSentinel(shared);
    FillSentinel(four);
  }

  ForwardTrainArgs Train() {
    ForwardTrainArgs a;
    a.x = x.cview();
    a.weight = weight;
    a.bias = bias;
    a.running_mean = running_mean;
    a.running_var = running_var;
    a.num_batches_tracked = &num_batches_tracked;
    a.momentum = 0.1;
    a.eps = 1e-5;
    a.y = y.view();
    a.save_mean = save_mean;
    a.save_invstd = save_invstd;
    return a;
  }

  ForwardEvalArgs Eval() {
    ForwardEvalArgs a;
    a.x = x.cview();
    a.weight = weight;
    a.bias = bias;
    a.running_mean = running_mean;
    a.running_var = running_var;
    a.eps = 1e-5;
    a.y = y.view();
    return a;
  }

  BackwardArgs Back(bool training) {
    BackwardArgs a;
    a.dy = dy.cview();
    a.x = x.cview();
    a.weight = weight;
    a.training = training;
    if (training) {
      a.save_mean = batch_mean;
      a.save_invstd = batch_invstd;
    } else {
      a.running_mean = running_mean;
      a.running_var = running_var;
    }
    a.eps = 1e-5;
    a.dx = dx.view();
    a.dweight = dweight;
    a.dbias = dbias;
    return a;
  }

  // Everything, inputs included: a failed call writes nothing at all.
  Snapshot Snap() const {
    Snapshot s;
    s.Add("x", x.data).Add("y", y.data).Add("dy", dy.data).Add("dx", dx.data);
    s.Add("weight", weight).Add("bias", bias).Add("running_mean", running_mean);
    s.Add("running_var", running_var).Add("num_batches_tracked", &num_batches_tracked);
    s.Add("save_mean", save_mean).Add("save_invstd", save_invstd);
    s.Add("batch_mean", batch_mean).Add("batch_invstd", batch_invstd);
    s.Add("dweight", dweight).Add("dbias", dbias).Add("shared", shared).Add("four", four);
    return s;
  }

  // The memory-order element k of a tensor holding (i, c, j) = logical index.
  Tensor x, y, dy, dx;
  std::vector<float> weight = {1.5f, -0.5f, 2.0f}, bias = {0.1f, 0.2f, 0.3f};
  std::vector<float> running_mean = {0.5f, -0.25f, 1.0f}, running_var = {2.0f, 0.5f, 1.5f};
  int64_t num_batches_tracked = 5;
  std::vector<float> save_mean = std::vector<float>(kC), save_invstd = std::vector<float>(kC);
  std::vector<float> batch_mean = {0.1f, 0.2f, 0.3f}, batch_invstd = {1.5f, 2.5f, 0.75f};
  std::vector<float> dweight = std::vector<float>(kC), dbias = std::vector<float>(kC);
  std::vector<float> shared = std::vector<float>(2 * kNumel + 8);  // for overlapping views
  std::vector<float> four = std::vector<float>(4);                 // a per-channel vector too long
};

std::span<float> Two(std::vector<float>& v) { return std::span<float>(v.data(), 2); }

// ------------------------------------------------------------------------------------------
// A table of cases per pass; each case gets its own test.

struct Case {
  std::string name;
  std::function<void(Buffers&, ForwardTrainArgs&, ForwardEvalArgs&, BackwardArgs&, CallOptions&)>
      mutate;
  StatusCode code;
  std::string text;
  Layout layout = Layout::kChannelsFirst;
  bool training = true;  // backward cases
  bool exact = false;    // the message must equal text (not merely contain it)
};

using Mutate = decltype(Case::mutate);

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

std::string CaseName(const ::testing::TestParamInfo<Case>& info) { return info.param.name; }

// Forward training cases.
class TrainRejects : public ::testing::TestWithParam<Case> {};

TEST_P(TrainRejects, WithMessageAndNothingWritten) {
  const Case& p = GetParam();
  Buffers b(p.layout);
  ForwardTrainArgs a = b.Train();
  ForwardEvalArgs unused_e;
  BackwardArgs unused_b;
  CallOptions o;
  p.mutate(b, a, unused_e, unused_b, o);
  const Snapshot snap = b.Snap();
  const bnorm::Status st = forward_train(a, o);
  EXPECT_TRUE(StatusIs(st, p.code, p.text));
  if (p.exact) {
    EXPECT_EQ(st.message(), p.text);
  }
  EXPECT_TRUE(snap.Unchanged());
}

const std::string kRankText =
    "x: rank must be 2 to 5 ((N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W)), got ";
const std::string kMomentumText = "momentum: must be in [0, 1] or none (cumulative average), got ";
const std::string kEpsText = "eps: must be finite and > 0, got ";

Case T(std::string name, Mutate m, std::string text, StatusCode code = StatusCode::kInvalidArgument,
       Layout layout = Layout::kChannelsFirst) {
  return Case{std::move(name), std::move(m), code, std::move(text), layout};
}

Case Exact(Case c) {
  c.exact = true;
  return c;
}

// A per-channel vector of the wrong length: "<name>: must hold one value per channel, C = 3 (x
// size [2, 3, 2, 4]), got <n>".
std::string WrongC(const std::string& name, int got) {
  return name + ": must hold one value per channel, C = 3 (x size " + kSize + "), got " +
         std::to_string(got);
}

std::vector<Case> TrainCases() {
  using B = Buffers;
  using TA = ForwardTrainArgs;
  using EA = ForwardEvalArgs;
  using BA = BackwardArgs;
  using O = CallOptions;
  std::vector<Case> v;
  // Shapes.
  v.push_back(T(
      "Rank1",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.x = ConstTensorView(b.x.data.data(), {kNumel});
        a.y = TensorView(b.y.data.data(), {kNumel});
      },
      kRankText + "1 dims, size [48]"));
  v.push_back(T(
      "Rank6",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.x = ConstTensorView(b.x.data.data(), {2, 3, 2, 2, 1, 2});
        a.y = TensorView(b.y.data.data(), {2, 3, 2, 2, 1, 2});
      },
      kRankText + "6 dims, size [2, 3, 2, 2, 1, ...]"));
  v.push_back(T(
      "Rank0",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.x = ConstTensorView(b.x.data.data(), std::span<const int64_t>());
      },
      kRankText + "0 dims, size []"));
  v.push_back(T(
      "ZeroSpatialDim",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.x = ConstTensorView(b.x.data.data(), {2, 3, 0, 4});
      },
      "x: dim 2 must be > 0, got 0 in size [2, 3, 0, 4]"));
  v.push_back(T(
      "ZeroChannels",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.x = ConstTensorView(b.x.data.data(), {2, 0, 2, 4});
      },
      "x: dim 1 must be > 0, got 0 in size [2, 0, 2, 4]"));
  v.push_back(T(
      "NegativeSpatialDim",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.x = ConstTensorView(b.x.data.data(), {2, 3, -2, 4});
      },
      "x: dim 2 must be > 0, got -2 in size [2, 3, -2, 4]"));
  v.push_back(T(
      "NegativeLastDim",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.x = ConstTensorView(b.x.data.data(), {2, 3, 2, 2, -4});
      },
      "x: dim 4 must be > 0, got -4 in size [2, 3, 2, 2, -4]"));
  v.push_back(T(
      "NegativeBatch",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.x = ConstTensorView(b.x.data.data(), {-2, 3});
      },
      "x: dim 0 must be > 0, got -2 in size [-2, 3]"));
  v.push_back(T(
      "EmptyBatch",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.x = ConstTensorView(b.x.data.data(), {0, 3, 2, 4});
        a.y = TensorView(b.y.data.data(), {0, 3, 2, 4});
      },
      "x: empty batch (N = 0), size [0, 3, 2, 4]"));
  v.push_back(T(
      "ElementCountOverflow",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.x = ConstTensorView(b.x.data.data(), {int64_t{1} << 40, 3, int64_t{1} << 20, 1024});
        a.y = TensorView(b.y.data.data(), {int64_t{1} << 40, 3, int64_t{1} << 20, 1024});
      },
      "x: number of elements exceeds 2^56 (no address space holds such a tensor), size "
      "[1099511627776, 3, 1048576, 1024]"));
  // Within int64 but beyond any address space: C = 2^62 with N = 1 once passed and overflowed in
  // the kernels' per-channel workspace sizes (found by fuzz_c_api).
  v.push_back(T(
      "ElementCountBeyondAddressSpace",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.x = ConstTensorView(b.x.data.data(), {1, int64_t{1} << 62});
        a.y = TensorView(b.y.data.data(), {1, int64_t{1} << 62});
      },
      "x: number of elements exceeds 2^56 (no address space holds such a tensor), size "
      "[1, 4611686018427387904]"));
  // Layout values outside the enum.
  v.push_back(T(
      "InvalidLayoutValue",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.x = ConstTensorView(b.x.data.data(), {2, 3, 2, 4}, static_cast<Layout>(7));
      },
      "x: layout must be channels_first (0) or channels_last (1), got 7"));
  v.push_back(T(
      "InvalidYLayoutValue",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.y = TensorView(b.y.data.data(), {2, 3, 2, 4}, static_cast<Layout>(-1));
      },
      "y: layout invalid(-1) must equal x's layout channels_first"));
  // Pointers.
  v.push_back(T(
      "NullX",
      [](B&, TA& a, EA&, BA&, O&) {
        a.x = ConstTensorView(nullptr, {2, 3, 2, 4});
      },
      "x: data is null"));
  v.push_back(T(
      "DefaultX", [](B&, TA& a, EA&, BA&, O&) { a.x = ConstTensorView(); }, "x: data is null"));
  v.push_back(T(
      "NullY",
      [](B&, TA& a, EA&, BA&, O&) {
        a.y = TensorView(nullptr, {2, 3, 2, 4});
      },
      "y: data is null"));
  // y against x.
  v.push_back(T(
      "YShapeMismatch",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.y = TensorView(b.y.data.data(), {2, 3, 4, 2});
      },
      "y: size [2, 3, 4, 2] must equal x's size " + kSize));
  v.push_back(T(
      "YRankMismatch",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.y = TensorView(b.y.data.data(), {2, 3, 8});
      },
      "y: size [2, 3, 8] must equal x's size " + kSize));
  v.push_back(T(
      "YLayoutMismatch",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.y = TensorView(b.y.data.data(), {2, 3, 2, 4}, Layout::kChannelsLast);
      },
      "y: layout channels_last must equal x's layout channels_first"));
  v.push_back(T(
      "YLayoutMismatchChannelsLastX",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.y = TensorView(b.y.data.data(), {2, 3, 2, 4}, Layout::kChannelsFirst);
      },
      "y: layout channels_first must equal x's layout channels_last", StatusCode::kInvalidArgument,
      Layout::kChannelsLast));
  v.push_back(T(
      "YPartiallyOverlapsXAfter",
      [](B& b, TA& a, EA&, BA&, O&) {
        std::copy(b.x.data.begin(), b.x.data.end(), b.shared.begin());
        a.x = ConstTensorView(b.shared.data(), {2, 3, 2, 4});
        a.y = TensorView(b.shared.data() + 3, {2, 3, 2, 4});
      },
      "y: partially overlaps x (in-place needs y == x exactly)"));
  v.push_back(T(
      "YPartiallyOverlapsXBefore",
      [](B& b, TA& a, EA&, BA&, O&) {
        std::copy(b.x.data.begin(), b.x.data.end(), b.shared.begin() + 8);
        a.x = ConstTensorView(b.shared.data() + 8, {2, 3, 2, 4});
        a.y = TensorView(b.shared.data() + 1, {2, 3, 2, 4});
      },
      "y: partially overlaps x (in-place needs y == x exactly)"));
  // Per-channel vectors.
  v.push_back(T(
      "WeightTooShort", [](B& b, TA& a, EA&, BA&, O&) { a.weight = Two(b.weight); },
      WrongC("weight", 2)));
  v.push_back(T(
      "WeightTooLong", [](B& b, TA& a, EA&, BA&, O&) { a.weight = b.four; }, WrongC("weight", 4)));
  v.push_back(T(
      "BiasTooShort", [](B& b, TA& a, EA&, BA&, O&) { a.bias = Two(b.bias); }, WrongC("bias", 2)));
  v.push_back(T(
      "BiasTooLong", [](B& b, TA& a, EA&, BA&, O&) { a.bias = b.four; }, WrongC("bias", 4)));
  v.push_back(T(
      "RunningMeanWrongC", [](B& b, TA& a, EA&, BA&, O&) { a.running_mean = Two(b.running_mean); },
      WrongC("running_mean", 2)));
  v.push_back(T(
      "RunningVarWrongC", [](B& b, TA& a, EA&, BA&, O&) { a.running_var = b.four; },
      WrongC("running_var", 4)));
  v.push_back(T(
      "SaveMeanWrongC", [](B& b, TA& a, EA&, BA&, O&) { a.save_mean = Two(b.save_mean); },
      WrongC("save_mean", 2)));
  v.push_back(T(
      "SaveInvstdWrongC", [](B& b, TA& a, EA&, BA&, O&) { a.save_invstd = b.four; },
      WrongC("save_invstd", 4)));
  v.push_back(T(
      "RunningMeanWithoutRunningVar", [](B&, TA& a, EA&, BA&, O&) { a.running_var = {}; },
      "running_var: required, one value per channel (C = 3), got none"));
  v.push_back(T(
      "RunningVarWithoutRunningMean", [](B&, TA& a, EA&, BA&, O&) { a.running_mean = {}; },
      "running_mean: required, one value per channel (C = 3), got none"));
  // eps.
  v.push_back(T(
      "EpsZero", [](B&, TA& a, EA&, BA&, O&) { a.eps = 0; }, kEpsText + "0"));
  v.push_back(T(
      "EpsNegative", [](B&, TA& a, EA&, BA&, O&) { a.eps = -1e-5; }, kEpsText + "-1e-05"));
  v.push_back(T(
      "EpsNaN", [](B&, TA& a, EA&, BA&, O&) { a.eps = kDNaN; }, kEpsText + "nan"));
  v.push_back(T(
      "EpsInf", [](B&, TA& a, EA&, BA&, O&) { a.eps = kDInf; }, kEpsText + "inf"));
  v.push_back(T(
      "EpsMinusInf", [](B&, TA& a, EA&, BA&, O&) { a.eps = -kDInf; }, kEpsText + "-inf"));
  // momentum.
  v.push_back(T(
      "MomentumNegative", [](B&, TA& a, EA&, BA&, O&) { a.momentum = -0.1; },
      kMomentumText + "-0.1"));
  v.push_back(T(
      "MomentumAboveOne", [](B&, TA& a, EA&, BA&, O&) { a.momentum = 1.5; },
      kMomentumText + "1.5"));
  v.push_back(T(
      "MomentumNaN", [](B&, TA& a, EA&, BA&, O&) { a.momentum = kDNaN; }, kMomentumText + "nan"));
  v.push_back(T(
      "MomentumInf", [](B&, TA& a, EA&, BA&, O&) { a.momentum = kDInf; }, kMomentumText + "inf"));
  v.push_back(T(
      "MomentumNaNWithoutTracking",
      [](B&, TA& a, EA&, BA&, O&) {
        a.running_mean = {};
        a.running_var = {};
        a.momentum = kDNaN;
      },
      kMomentumText + "nan"));
  v.push_back(T(
      "MomentumNoneWithoutCounter",
      [](B&, TA& a, EA&, BA&, O&) {
        a.momentum = std::nullopt;
        a.num_batches_tracked = nullptr;
      },
      "num_batches_tracked: required when momentum is none (cumulative average) and running "
      "statistics are tracked, got null"));
  v.push_back(T(
      "MomentumNoneNegativeCounter",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.momentum = std::nullopt;
        b.num_batches_tracked = -1;
      },
      "num_batches_tracked: must be >= 0, got -1"));
  // One value per channel (PyTorch's exact text).
  v.push_back(Exact(T(
      "OneValuePerChannelRank2",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.x = ConstTensorView(b.x.data.data(), {1, 16});
        a.y = TensorView(b.y.data.data(), {1, 16});
        a.weight = {};
        a.bias = {};
        a.running_mean = {};
        a.running_var = {};
        a.save_mean = {};
        a.save_invstd = {};
      },
      "Expected more than 1 value per channel when training, got input size [1, 16]")));
  v.push_back(Exact(T(
      "OneValuePerChannelRank4",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.x = ConstTensorView(b.x.data.data(), {1, 3, 1, 1});
        a.y = TensorView(b.y.data.data(), {1, 3, 1, 1});
      },
      "Expected more than 1 value per channel when training, got input size [1, 3, 1, 1]")));
  v.push_back(Exact(T(
      "OneValuePerChannelRank5ChannelsLast",
      [](B& b, TA& a, EA&, BA&, O&) {
        a.x = ConstTensorView(b.x.data.data(), {1, 3, 1, 1, 1}, Layout::kChannelsLast);
        a.y = TensorView(b.y.data.data(), {1, 3, 1, 1, 1}, Layout::kChannelsLast);
      },
      "Expected more than 1 value per channel when training, got input size [1, 3, 1, 1, 1]",
      StatusCode::kInvalidArgument, Layout::kChannelsLast)));
  // check_finite: NaN / Inf named by logical index and channel.
  v.push_back(T(
      "NaNChannelsFirst",
      [](B& b, TA&, EA&, BA&, O& o) {
        o.check_finite = true;
        b.x.at(1, 2, SpatialIndex(kDims, {0, 3})) = kNaN;
      },
      "x: nan at index [1, 2, 0, 3] (channel 2)", StatusCode::kNonFinite));
  v.push_back(T(
      "NaNChannelsLast",
      [](B& b, TA&, EA&, BA&, O& o) {
        o.check_finite = true;
        b.x.at(1, 2, SpatialIndex(kDims, {0, 3})) = kNaN;
      },
      "x: nan at index [1, 2, 0, 3] (channel 2)", StatusCode::kNonFinite, Layout::kChannelsLast));
  v.push_back(T(
      "InfChannelsFirst",
      [](B& b, TA&, EA&, BA&, O& o) {
        o.check_finite = true;
        b.x.at(0, 1, SpatialIndex(kDims, {1, 2})) = kInf;
      },
      "x: inf at index [0, 1, 1, 2] (channel 1)", StatusCode::kNonFinite));
  v.push_back(T(
      "MinusInfChannelsLast",
      [](B& b, TA&, EA&, BA&, O& o) {
        o.check_finite = true;
        b.x.at(1, 0, SpatialIndex(kDims, {1, 0})) = -kInf;
      },
      "x: -inf at index [1, 0, 1, 0] (channel 0)", StatusCode::kNonFinite, Layout::kChannelsLast));
  // Two bad values: the first in MEMORY order is named, which depends on the layout.
  // A = (0, 2, h 0, w 1), B = (0, 0, h 1, w 0). Channels-first: A at 2*8+1 = 17, B at 4 -> B.
  // Channels-last: A at 1*3+2 = 5, B at 4*3+0 = 12 -> A.
  v.push_back(T(
      "FirstInMemoryOrderChannelsFirst",
      [](B& b, TA&, EA&, BA&, O& o) {
        o.check_finite = true;
        b.x.at(0, 2, SpatialIndex(kDims, {0, 1})) = kNaN;
        b.x.at(0, 0, SpatialIndex(kDims, {1, 0})) = kInf;
      },
      "x: inf at index [0, 0, 1, 0] (channel 0)", StatusCode::kNonFinite));
  v.push_back(T(
      "FirstInMemoryOrderChannelsLast",
      [](B& b, TA&, EA&, BA&, O& o) {
        o.check_finite = true;
        b.x.at(0, 2, SpatialIndex(kDims, {0, 1})) = kNaN;
        b.x.at(0, 0, SpatialIndex(kDims, {1, 0})) = kInf;
      },
      "x: nan at index [0, 2, 0, 1] (channel 2)", StatusCode::kNonFinite, Layout::kChannelsLast));
  v.push_back(T(
      "NaNRank2",
      [](B& b, TA& a, EA&, BA&, O& o) {
        o.check_finite = true;
        b.x.data[7] = kNaN;  // (N, C) = (16, 3): element 7 is (2, 1)
        a.x = ConstTensorView(b.x.data.data(), {16, 3});
        a.y = TensorView(b.y.data.data(), {16, 3});
      },
      "x: nan at index [2, 1] (channel 1)", StatusCode::kNonFinite));
  v.push_back(T(
      "NaNRank5",
      [](B& b, TA& a, EA&, BA&, O& o) {
        o.check_finite = true;
        // (2, 3, 2, 2, 2) channels-first: (1, 2, 1, 0, 1) at ((1*3 + 2)*2 + 1)*4 + 0*2 + 1 = 45.
        b.x.data[45] = kNaN;
        a.x = ConstTensorView(b.x.data.data(), {2, 3, 2, 2, 2});
        a.y = TensorView(b.y.data.data(), {2, 3, 2, 2, 2});
      },
      "x: nan at index [1, 2, 1, 0, 1] (channel 2)", StatusCode::kNonFinite));
  return v;
}

INSTANTIATE_TEST_SUITE_P(forward_train, TrainRejects, ::testing::ValuesIn(TrainCases()), CaseName);

// The untouched arguments are valid: each rejection above is the mutation's doing.
TEST(BadInputControl, ValidArgumentsSucceed) {
  for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast}) {
    Buffers b(layout);
    EXPECT_TRUE(IsOk(forward_train(b.Train())));
    EXPECT_EQ(b.num_batches_tracked, 6);
    EXPECT_TRUE(IsOk(forward_eval(b.Eval())));
    EXPECT_TRUE(IsOk(backward(b.Back(true))));
    EXPECT_TRUE(IsOk(backward(b.Back(false))));
    CallOptions o;
    o.check_finite = true;
    EXPECT_TRUE(IsOk(forward_train(b.Train(), o)));
    EXPECT_TRUE(IsOk(forward_eval(b.Eval(), o)));
    EXPECT_TRUE(IsOk(backward(b.Back(true), o)));
  }
}

// check_finite off (the default): NaN flows through without an error.
TEST(BadInputControl, NaNPassesWhenCheckFiniteIsOff) {
  for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast}) {
    SCOPED_TRACE(LayoutTag(layout));
    Buffers b(layout);
    b.x.at(1, 2, 3) = kNaN;
    ASSERT_TRUE(IsOk(forward_train(b.Train())));
    for (int64_t i = 0; i < b.x.n(); ++i)
      for (int64_t j = 0; j < b.x.s(); ++j) {
        EXPECT_TRUE(std::isnan(b.y.at(i, 2, j)));  // the whole channel goes NaN
        EXPECT_TRUE(std::isfinite(b.y.at(i, 0, j)));
        EXPECT_TRUE(std::isfinite(b.y.at(i, 1, j)));
      }
    EXPECT_TRUE(std::isnan(b.running_mean[2]));
    EXPECT_TRUE(std::isfinite(b.running_mean[0]));
    ASSERT_TRUE(IsOk(forward_eval(b.Eval())));
    EXPECT_TRUE(std::isfinite(b.y.at(0, 1, 0)));
    b.dy.at(0, 1, 1) = kInf;
    ASSERT_TRUE(IsOk(backward(b.Back(true))));
    EXPECT_FALSE(std::isfinite(b.dbias[1]));
  }
}

// ------------------------------------------------------------------------------------------
// Forward eval.

class EvalRejects : public ::testing::TestWithParam<Case> {};

TEST_P(EvalRejects, WithMessageAndNothingWritten) {
  const Case& p = GetParam();
  Buffers b(p.layout);
  ForwardTrainArgs unused_t;
  ForwardEvalArgs a = b.Eval();
  BackwardArgs unused_b;
  CallOptions o;
  p.mutate(b, unused_t, a, unused_b, o);
  const Snapshot snap = b.Snap();
  EXPECT_TRUE(StatusIs(forward_eval(a, o), p.code, p.text));
  EXPECT_TRUE(snap.Unchanged());
}

std::vector<Case> EvalCases() {
  using B = Buffers;
  using TA = ForwardTrainArgs;
  using EA = ForwardEvalArgs;
  using BA = BackwardArgs;
  using O = CallOptions;
  std::vector<Case> v;
  v.push_back(T(
      "Rank1", [](B& b, TA&, EA& a, BA&, O&) { a.x = ConstTensorView(b.x.data.data(), {kNumel}); },
      kRankText + "1 dims, size [48]"));
  v.push_back(T(
      "EmptyBatch",
      [](B& b, TA&, EA& a, BA&, O&) {
        a.x = ConstTensorView(b.x.data.data(), {0, 3});
      },
      "x: empty batch (N = 0), size [0, 3]"));
  v.push_back(T(
      "NullX",
      [](B&, TA&, EA& a, BA&, O&) {
        a.x = ConstTensorView(nullptr, {2, 3, 2, 4});
      },
      "x: data is null"));
  v.push_back(T(
      "NullY",
      [](B&, TA&, EA& a, BA&, O&) {
        a.y = TensorView(nullptr, {2, 3, 2, 4});
      },
      "y: data is null"));
  v.push_back(T(
      "YShapeMismatch",
      [](B& b, TA&, EA& a, BA&, O&) {
        a.y = TensorView(b.y.data.data(), {4, 3, 2, 2});
      },
      "y: size [4, 3, 2, 2] must equal x's size " + kSize));
  v.push_back(T(
      "YLayoutMismatch",
      [](B& b, TA&, EA& a, BA&, O&) {
        a.y = TensorView(b.y.data.data(), {2, 3, 2, 4}, Layout::kChannelsLast);
      },
      "y: layout channels_last must equal x's layout channels_first"));
  v.push_back(T(
      "YPartiallyOverlapsX",
      [](B& b, TA&, EA& a, BA&, O&) {
        std::copy(b.x.data.begin(), b.x.data.end(), b.shared.begin());
        a.x = ConstTensorView(b.shared.data(), {2, 3, 2, 4});
        a.y = TensorView(b.shared.data() + kNumel - 1, {2, 3, 2, 4});
      },
      "y: partially overlaps x (in-place needs y == x exactly)"));
  v.push_back(T(
      "WeightWrongC", [](B& b, TA&, EA& a, BA&, O&) { a.weight = Two(b.weight); },
      WrongC("weight", 2)));
  v.push_back(T(
      "BiasWrongC", [](B& b, TA&, EA& a, BA&, O&) { a.bias = b.four; }, WrongC("bias", 4)));
  v.push_back(T(
      "RunningMeanWrongC", [](B& b, TA&, EA& a, BA&, O&) { a.running_mean = Two(b.running_mean); },
      WrongC("running_mean", 2)));
  v.push_back(T(
      "RunningVarWrongC", [](B& b, TA&, EA& a, BA&, O&) { a.running_var = b.four; },
      WrongC("running_var", 4)));
  v.push_back(T(
      "NoRunningMean", [](B&, TA&, EA& a, BA&, O&) { a.running_mean = {}; },
      "running_mean: required, one value per channel (C = 3), got none"));
  v.push_back(T(
      "NoRunningVar", [](B&, TA&, EA& a, BA&, O&) { a.running_var = {}; },
      "running_var: required, one value per channel (C = 3), got none"));
  v.push_back(T(
      "EpsZero", [](B&, TA&, EA& a, BA&, O&) { a.eps = 0; }, kEpsText + "0"));
  v.push_back(T(
      "EpsNegative", [](B&, TA&, EA& a, BA&, O&) { a.eps = -1e-5; }, kEpsText + "-1e-05"));
  v.push_back(T(
      "EpsNaN", [](B&, TA&, EA& a, BA&, O&) { a.eps = kDNaN; }, kEpsText + "nan"));
  v.push_back(T(
      "EpsInf", [](B&, TA&, EA& a, BA&, O&) { a.eps = kDInf; }, kEpsText + "inf"));
  v.push_back(T(
      "NaNInX",
      [](B& b, TA&, EA&, BA&, O& o) {
        o.check_finite = true;
        b.x.at(0, 2, SpatialIndex(kDims, {1, 1})) = kNaN;
      },
      "x: nan at index [0, 2, 1, 1] (channel 2)", StatusCode::kNonFinite, Layout::kChannelsLast));
  return v;
}

INSTANTIATE_TEST_SUITE_P(forward_eval, EvalRejects, ::testing::ValuesIn(EvalCases()), CaseName);

// ------------------------------------------------------------------------------------------
// Backward.

class BackwardRejects : public ::testing::TestWithParam<Case> {};

TEST_P(BackwardRejects, WithMessageAndNothingWritten) {
  const Case& p = GetParam();
  Buffers b(p.layout);
  ForwardTrainArgs unused_t;
  ForwardEvalArgs unused_e;
  BackwardArgs a = b.Back(p.training);
  CallOptions o;
  p.mutate(b, unused_t, unused_e, a, o);
  const Snapshot snap = b.Snap();
  EXPECT_TRUE(StatusIs(backward(a, o), p.code, p.text));
  EXPECT_TRUE(snap.Unchanged());
}

Case BT(std::string name, Mutate m, std::string text, bool training = true,
        StatusCode code = StatusCode::kInvalidArgument, Layout layout = Layout::kChannelsFirst) {
  Case c = T(std::move(name), std::move(m), std::move(text), code, layout);
  c.training = training;
  return c;
}

std::vector<Case> BackwardCases() {
  using B = Buffers;
  using TA = ForwardTrainArgs;
  using EA = ForwardEvalArgs;
  using BA = BackwardArgs;
  using O = CallOptions;
  std::vector<Case> v;
  v.push_back(BT(
      "Rank6",
      [](B& b, TA&, EA&, BA& a, O&) {
        a.x = ConstTensorView(b.x.data.data(), {1, 3, 2, 2, 2, 2});
      },
      kRankText + "6 dims, size [1, 3, 2, 2, 2, ...]"));
  v.push_back(BT(
      "EmptyBatch",
      [](B& b, TA&, EA&, BA& a, O&) {
        a.x = ConstTensorView(b.x.data.data(), {0, 3, 2});
      },
      "x: empty batch (N = 0), size [0, 3, 2]"));
  v.push_back(BT(
      "NegativeDim",
      [](B& b, TA&, EA&, BA& a, O&) {
        a.x = ConstTensorView(b.x.data.data(), {2, 3, -8});
      },
      "x: dim 2 must be > 0, got -8 in size [2, 3, -8]"));
  v.push_back(BT(
      "NullX",
      [](B&, TA&, EA&, BA& a, O&) {
        a.x = ConstTensorView(nullptr, {2, 3, 2, 4});
      },
      "x: data is null"));
  v.push_back(BT(
      "NullDy",
      [](B&, TA&, EA&, BA& a, O&) {
        a.dy = ConstTensorView(nullptr, {2, 3, 2, 4});
      },
      "dy: data is null"));
  v.push_back(BT(
      "NullDx",
      [](B&, TA&, EA&, BA& a, O&) {
        a.dx = TensorView(nullptr, {2, 3, 2, 4});
      },
      "dx: data is null"));
  v.push_back(BT(
      "DyShapeMismatch",
      [](B& b, TA&, EA&, BA& a, O&) {
        a.dy = ConstTensorView(b.dy.data.data(), {2, 3, 8});
      },
      "dy: size [2, 3, 8] must equal x's size " + kSize));
  v.push_back(BT(
      "DxShapeMismatch",
      [](B& b, TA&, EA&, BA& a, O&) {
        a.dx = TensorView(b.dx.data.data(), {1, 3, 4, 4});
      },
      "dx: size [1, 3, 4, 4] must equal x's size " + kSize));
  v.push_back(BT(
      "DyLayoutMismatch",
      [](B& b, TA&, EA&, BA& a, O&) {
        a.dy = ConstTensorView(b.dy.data.data(), {2, 3, 2, 4}, Layout::kChannelsLast);
      },
      "dy: layout channels_last must equal x's layout channels_first"));
  v.push_back(BT(
      "DxLayoutMismatch",
      [](B& b, TA&, EA&, BA& a, O&) {
        a.dx = TensorView(b.dx.data.data(), {2, 3, 2, 4}, Layout::kChannelsFirst);
      },
      "dx: layout channels_first must equal x's layout channels_last", true,
      StatusCode::kInvalidArgument, Layout::kChannelsLast));
  v.push_back(BT(
      "DxPartiallyOverlapsDy",
      [](B& b, TA&, EA&, BA& a, O&) {
        std::copy(b.dy.data.begin(), b.dy.data.end(), b.shared.begin());
        a.dy = ConstTensorView(b.shared.data(), {2, 3, 2, 4});
        a.dx = TensorView(b.shared.data() + 5, {2, 3, 2, 4});
      },
      "dx: partially overlaps dy (in-place needs dx == dy exactly)"));
  v.push_back(BT(
      "DxPartiallyOverlapsX",
      [](B& b, TA&, EA&, BA& a, O&) {
        std::copy(b.x.data.begin(), b.x.data.end(), b.shared.begin() + 4);
        a.x = ConstTensorView(b.shared.data() + 4, {2, 3, 2, 4});
        a.dx = TensorView(b.shared.data(), {2, 3, 2, 4});
      },
      "dx: partially overlaps x (in-place needs dx == x exactly)"));
  v.push_back(BT(
      "WeightWrongC", [](B& b, TA&, EA&, BA& a, O&) { a.weight = b.four; }, WrongC("weight", 4)));
  v.push_back(BT(
      "SaveMeanWrongC", [](B& b, TA&, EA&, BA& a, O&) { a.save_mean = Two(b.batch_mean); },
      WrongC("save_mean", 2)));
  v.push_back(BT(
      "SaveInvstdWrongC", [](B& b, TA&, EA&, BA& a, O&) { a.save_invstd = b.four; },
      WrongC("save_invstd", 4)));
  v.push_back(BT(
      "DweightWrongC", [](B& b, TA&, EA&, BA& a, O&) { a.dweight = Two(b.dweight); },
      WrongC("dweight", 2)));
  v.push_back(BT(
      "DbiasWrongC", [](B& b, TA&, EA&, BA& a, O&) { a.dbias = b.four; }, WrongC("dbias", 4)));
  v.push_back(BT(
      "TrainingWithoutSaveMean", [](B&, TA&, EA&, BA& a, O&) { a.save_mean = {}; },
      "save_mean: required, one value per channel (C = 3), got none"));
  v.push_back(BT(
      "TrainingWithoutSaveInvstd", [](B&, TA&, EA&, BA& a, O&) { a.save_invstd = {}; },
      "save_invstd: required, one value per channel (C = 3), got none"));
  v.push_back(BT(
      "EvalWithoutRunningMean", [](B&, TA&, EA&, BA& a, O&) { a.running_mean = {}; },
      "running_mean: required, one value per channel (C = 3), got none", false));
  v.push_back(BT(
      "EvalWithoutRunningVar", [](B&, TA&, EA&, BA& a, O&) { a.running_var = {}; },
      "running_var: required, one value per channel (C = 3), got none", false));
  v.push_back(BT(
      "EvalRunningMeanWrongC", [](B& b, TA&, EA&, BA& a, O&) { a.running_mean = b.four; },
      WrongC("running_mean", 4), false));
  v.push_back(BT(
      "EvalRunningVarWrongC", [](B& b, TA&, EA&, BA& a, O&) { a.running_var = Two(b.running_var); },
      WrongC("running_var", 2), false));
  v.push_back(BT(
      "EvalEpsZero", [](B&, TA&, EA&, BA& a, O&) { a.eps = 0; }, kEpsText + "0", false));
  v.push_back(BT(
      "EvalEpsNaN", [](B&, TA&, EA&, BA& a, O&) { a.eps = kDNaN; }, kEpsText + "nan", false));
  v.push_back(BT(
      "NaNInDyChannelsFirst",
      [](B& b, TA&, EA&, BA&, O& o) {
        o.check_finite = true;
        b.dy.at(1, 1, SpatialIndex(kDims, {1, 3})) = kNaN;
      },
      "dy: nan at index [1, 1, 1, 3] (channel 1)", true, StatusCode::kNonFinite));
  v.push_back(BT(
      "NaNInDyChannelsLast",
      [](B& b, TA&, EA&, BA&, O& o) {
        o.check_finite = true;
        b.dy.at(1, 1, SpatialIndex(kDims, {1, 3})) = kNaN;
      },
      "dy: nan at index [1, 1, 1, 3] (channel 1)", true, StatusCode::kNonFinite,
      Layout::kChannelsLast));
  v.push_back(BT(
      "InfInDyEval",
      [](B& b, TA&, EA&, BA&, O& o) {
        o.check_finite = true;
        b.dy.at(0, 0, 0) = -kInf;
      },
      "dy: -inf at index [0, 0, 0, 0] (channel 0)", false, StatusCode::kNonFinite));
  v.push_back(BT(
      "InfInX",
      [](B& b, TA&, EA&, BA&, O& o) {
        o.check_finite = true;
        b.x.at(0, 2, SpatialIndex(kDims, {0, 2})) = kInf;
      },
      "x: inf at index [0, 2, 0, 2] (channel 2)", true, StatusCode::kNonFinite,
      Layout::kChannelsLast));
  return v;
}

INSTANTIATE_TEST_SUITE_P(backward, BackwardRejects, ::testing::ValuesIn(BackwardCases()), CaseName);

// ------------------------------------------------------------------------------------------
// The C API.

// Sets an environment variable for the scope, restoring the previous state afterwards.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (old_)
      setenv(name_, old_->c_str(), 1);
    else
      unsetenv(name_);
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

// Raw buffers for the C API: (n, c, s) = (2, 3, 4).
struct CBuffers {
  CBuffers() {
    for (size_t k = 0; k < x.size(); ++k)
      x[k] = static_cast<float>(0.3 * static_cast<double>(k % 7) - 0.7);
    for (size_t k = 0; k < dy.size(); ++k)
      dy[k] = static_cast<float>(0.1 * static_cast<double>(k % 5) - 0.2);
    FillSentinel(y);
    FillSentinel(dx);
    FillSentinel(save_mean);
    FillSentinel(save_invstd);
    FillSentinel(dweight);
    FillSentinel(dbias);
  }
  Snapshot Snap() const {
    Snapshot s;
    s.Add("x", x).Add("y", y).Add("dy", dy).Add("dx", dx).Add("running_mean", running_mean);
    s.Add("running_var", running_var).Add("num_batches_tracked", &nbt).Add("save_mean", save_mean);
    s.Add("save_invstd", save_invstd).Add("dweight", dweight).Add("dbias", dbias);
    return s;
  }
  int Train(bnorm_layout layout, int64_t n, int64_t c, int64_t s, double momentum = 0.1,
            double eps = 1e-5) {
    return bnorm_forward_train(layout, n, c, s, x.data(), weight.data(), bias.data(),
                               running_mean.data(), running_var.data(), &nbt, momentum, eps,
                               y.data(), save_mean.data(), save_invstd.data());
  }
  // x has one spare element so that the view y = x + 1 stays inside the allocation.
  std::vector<float> x = std::vector<float>(25), y = std::vector<float>(24);
  std::vector<float> dy = std::vector<float>(24), dx = std::vector<float>(24);
  std::vector<float> weight = {1, 2, 3}, bias = {0, 0.5f, -0.5f};
  std::vector<float> running_mean = {0.25f, 0, -1}, running_var = {1, 2, 0.5f};
  int64_t nbt = 2;
  std::vector<float> save_mean = std::vector<float>(3), save_invstd = std::vector<float>(3);
  std::vector<float> batch_mean = {0, 0.1f, 0.2f}, batch_invstd = {1, 2, 3};
  std::vector<float> dweight = std::vector<float>(3), dbias = std::vector<float>(3);
};

// A failed C call: its code, bnorm_last_error() containing `text`, nothing written.
#define EXPECT_C_REJECTS(call, buffers, code, text)                                                \
  do {                                                                                             \
    const Snapshot c_snap_ = (buffers).Snap();                                                     \
    EXPECT_EQ((call), (code));                                                                     \
    EXPECT_NE(std::string(bnorm_last_error()).find(text), std::string::npos)                       \
        << "bnorm_last_error() = \"" << bnorm_last_error() << "\", expected \"" << (text) << "\""; \
    EXPECT_TRUE(c_snap_.Unchanged());                                                              \
  } while (0)

TEST(CApi, ForwardTrainRejections) {
  CBuffers b;
  EXPECT_C_REJECTS(b.Train(BNORM_CHANNELS_FIRST, 0, 3, 4), b, BNORM_ERROR_INVALID_ARGUMENT,
                   "n: empty batch, got n = 0");
  EXPECT_C_REJECTS(b.Train(BNORM_CHANNELS_FIRST, -2, 3, 4), b, BNORM_ERROR_INVALID_ARGUMENT,
                   "n: must be > 0, got -2");
  EXPECT_C_REJECTS(b.Train(BNORM_CHANNELS_LAST, 2, -1, 4), b, BNORM_ERROR_INVALID_ARGUMENT,
                   "c: must be > 0, got -1");
  EXPECT_C_REJECTS(b.Train(BNORM_CHANNELS_LAST, 2, 0, 4), b, BNORM_ERROR_INVALID_ARGUMENT,
                   "c: must be > 0, got 0");
  EXPECT_C_REJECTS(b.Train(BNORM_CHANNELS_LAST, 2, 3, 0), b, BNORM_ERROR_INVALID_ARGUMENT,
                   "s: must be > 0, got 0");
  EXPECT_C_REJECTS(b.Train(BNORM_CHANNELS_FIRST, 2, 3, 4, kDNaN), b, BNORM_ERROR_INVALID_ARGUMENT,
                   "momentum: must be in [0, 1], or < 0 for none, got nan");
  EXPECT_C_REJECTS(b.Train(BNORM_CHANNELS_FIRST, 2, 3, 4, 1.5), b, BNORM_ERROR_INVALID_ARGUMENT,
                   "momentum: must be in [0, 1] or none (cumulative average), got 1.5");
  EXPECT_C_REJECTS(b.Train(BNORM_CHANNELS_FIRST, 2, 3, 4, 0.1, 0.0), b,
                   BNORM_ERROR_INVALID_ARGUMENT, "eps: must be finite and > 0, got 0");
  EXPECT_C_REJECTS(b.Train(BNORM_CHANNELS_FIRST, 2, 3, 4, 0.1, kDNaN), b,
                   BNORM_ERROR_INVALID_ARGUMENT, "eps: must be finite and > 0, got nan");
  EXPECT_C_REJECTS(b.Train(BNORM_CHANNELS_FIRST, 1, 3, 1), b, BNORM_ERROR_INVALID_ARGUMENT,
                   "Expected more than 1 value per channel when training, got input size [1, 3]");
  EXPECT_C_REJECTS(bnorm_forward_train(BNORM_CHANNELS_FIRST, 2, 3, 4, nullptr, nullptr, nullptr,
                                       nullptr, nullptr, nullptr, 0.1, 1e-5, b.y.data(),
                                       b.save_mean.data(), b.save_invstd.data()),
                   b, BNORM_ERROR_INVALID_ARGUMENT, "x: data is null");
  EXPECT_C_REJECTS(
      bnorm_forward_train(BNORM_CHANNELS_FIRST, 2, 3, 4, b.x.data(), nullptr, nullptr, nullptr,
                          nullptr, nullptr, 0.1, 1e-5, nullptr, nullptr, nullptr),
      b, BNORM_ERROR_INVALID_ARGUMENT, "y: data is null");
  EXPECT_C_REJECTS(
      bnorm_forward_train(BNORM_CHANNELS_FIRST, 2, 3, 4, b.x.data(), nullptr, nullptr,
                          b.running_mean.data(), nullptr, &b.nbt, 0.1, 1e-5, b.y.data(), nullptr,
                          nullptr),
      b, BNORM_ERROR_INVALID_ARGUMENT,
      "running_mean and running_var: give both (tracking) or neither, got running_var NULL");
  EXPECT_C_REJECTS(
      bnorm_forward_train(BNORM_CHANNELS_FIRST, 2, 3, 4, b.x.data(), nullptr, nullptr, nullptr,
                          b.running_var.data(), &b.nbt, 0.1, 1e-5, b.y.data(), nullptr, nullptr),
      b, BNORM_ERROR_INVALID_ARGUMENT,
      "running_mean and running_var: give both (tracking) or neither, got running_mean NULL");
  EXPECT_C_REJECTS(bnorm_forward_train(BNORM_CHANNELS_FIRST, 2, 3, 4, b.x.data(), nullptr, nullptr,
                                       b.running_mean.data(), b.running_var.data(), nullptr, -1.0,
                                       1e-5, b.y.data(), nullptr, nullptr),
                   b, BNORM_ERROR_INVALID_ARGUMENT,
                   "num_batches_tracked: required when momentum is none");
  EXPECT_C_REJECTS(
      bnorm_forward_train(BNORM_CHANNELS_FIRST, 2, 3, 4, b.x.data(), nullptr, nullptr, nullptr,
                          nullptr, nullptr, 0.1, 1e-5, b.x.data() + 1, nullptr, nullptr),
      b, BNORM_ERROR_INVALID_ARGUMENT, "y: partially overlaps x");
  // A valid call after all that succeeds.
  EXPECT_EQ(b.Train(BNORM_CHANNELS_LAST, 2, 3, 4), BNORM_OK) << bnorm_last_error();
  EXPECT_EQ(b.nbt, 3);
}

// A layout value outside the enum, as a C or ctypes caller can pass it. (Its own test: see the
// report on src/c_api.cc, which loads the value as the C++ enum type, undefined behaviour that
// UBSan flags.)
TEST(CApiInvalidLayout, EveryEntryPointRejectsLayout7) {
  CBuffers b;
  const auto seven = static_cast<bnorm_layout>(7);
  const char* text = "layout: must be BNORM_CHANNELS_FIRST (0) or BNORM_CHANNELS_LAST (1), got 7";
  EXPECT_C_REJECTS(b.Train(seven, 2, 3, 4), b, BNORM_ERROR_INVALID_ARGUMENT, text);
  EXPECT_C_REJECTS(
      bnorm_forward_eval(seven, 2, 3, 4, b.x.data(), nullptr, nullptr, b.running_mean.data(),
                         b.running_var.data(), 1e-5, b.y.data()),
      b, BNORM_ERROR_INVALID_ARGUMENT, text);
  EXPECT_C_REJECTS(bnorm_backward(seven, 2, 3, 4, b.dy.data(), b.x.data(), nullptr,
                                  b.batch_mean.data(), b.batch_invstd.data(), nullptr, nullptr,
                                  1e-5, 1, b.dx.data(), nullptr, nullptr),
                   b, BNORM_ERROR_INVALID_ARGUMENT, text);
}

// The fuzzer's find: a size within int64 but beyond any address space (C = 2^62, N = S = 1) used
// to pass validation and overflow in the kernels' per-channel workspace sizes.
TEST(CApi, SizeBeyondAddressSpaceRejected) {
  CBuffers b;
  const int64_t c = int64_t{1} << 62;
  const char* text = "exceeds 2^56 (no address space holds such a tensor)";
  EXPECT_C_REJECTS(bnorm_backward(BNORM_CHANNELS_FIRST, 1, c, 1, b.dy.data(), b.x.data(), nullptr,
                                  b.batch_mean.data(), b.batch_invstd.data(), nullptr, nullptr,
                                  1e-5, 1, b.dx.data(), nullptr, nullptr),
                   b, BNORM_ERROR_INVALID_ARGUMENT, text);
  EXPECT_C_REJECTS(bnorm_forward_eval(BNORM_CHANNELS_LAST, 1, c, 1, b.x.data(), nullptr, nullptr,
                                      b.running_mean.data(), b.running_var.data(), 1e-5,
                                      b.y.data()),
                   b, BNORM_ERROR_INVALID_ARGUMENT, text);
}

TEST(CApi, ForwardEvalRejections) {
  CBuffers b;
  auto eval = [&](const float* rm, const float* rv, double eps = 1e-5, int64_t n = 2) {
    return bnorm_forward_eval(BNORM_CHANNELS_LAST, n, 3, 4, b.x.data(), b.weight.data(),
                              b.bias.data(), rm, rv, eps, b.y.data());
  };
  EXPECT_C_REJECTS(eval(nullptr, b.running_var.data()), b, BNORM_ERROR_INVALID_ARGUMENT,
                   "running_mean: is NULL; eval needs running statistics");
  EXPECT_C_REJECTS(eval(b.running_mean.data(), nullptr), b, BNORM_ERROR_INVALID_ARGUMENT,
                   "running_var: is NULL; eval needs running statistics");
  EXPECT_C_REJECTS(eval(b.running_mean.data(), b.running_var.data(), -kDInf), b,
                   BNORM_ERROR_INVALID_ARGUMENT, "eps: must be finite and > 0, got -inf");
  EXPECT_C_REJECTS(eval(b.running_mean.data(), b.running_var.data(), 1e-5, 0), b,
                   BNORM_ERROR_INVALID_ARGUMENT, "n: empty batch, got n = 0");
  EXPECT_EQ(eval(b.running_mean.data(), b.running_var.data()), BNORM_OK) << bnorm_last_error();
}

TEST(CApi, BackwardRejections) {
  CBuffers b;
  auto back = [&](int training, const float* sm, const float* si, const float* rm, const float* rv,
                  const float* dy) {
    return bnorm_backward(BNORM_CHANNELS_FIRST, 2, 3, 4, dy, b.x.data(), b.weight.data(), sm, si,
                          rm, rv, 1e-5, training, b.dx.data(), b.dweight.data(), b.dbias.data());
  };
  EXPECT_C_REJECTS(back(1, nullptr, b.batch_invstd.data(), nullptr, nullptr, b.dy.data()), b,
                   BNORM_ERROR_INVALID_ARGUMENT, "save_mean: is NULL; required when training = 1");
  EXPECT_C_REJECTS(back(1, b.batch_mean.data(), nullptr, nullptr, nullptr, b.dy.data()), b,
                   BNORM_ERROR_INVALID_ARGUMENT,
                   "save_invstd: is NULL; required when training = 1");
  EXPECT_C_REJECTS(back(0, b.batch_mean.data(), b.batch_invstd.data(), nullptr,
                        b.running_var.data(), b.dy.data()),
                   b, BNORM_ERROR_INVALID_ARGUMENT,
                   "running_mean: is NULL; required when training = 0");
  EXPECT_C_REJECTS(back(0, nullptr, nullptr, b.running_mean.data(), nullptr, b.dy.data()), b,
                   BNORM_ERROR_INVALID_ARGUMENT,
                   "running_var: is NULL; required when training = 0");
  EXPECT_C_REJECTS(back(1, b.batch_mean.data(), b.batch_invstd.data(), nullptr, nullptr, nullptr),
                   b, BNORM_ERROR_INVALID_ARGUMENT, "dy: data is null");
  EXPECT_EQ(back(1, b.batch_mean.data(), b.batch_invstd.data(), nullptr, nullptr, b.dy.data()),
            BNORM_OK)
      << bnorm_last_error();
  EXPECT_EQ(back(0, nullptr, nullptr, b.running_mean.data(), b.running_var.data(), b.dy.data()),
            BNORM_OK)
      << bnorm_last_error();
}

TEST(CApi, CheckFiniteFromEnvironment) {
  CBuffers b;
  b.x[17] = kNaN;  // channels-first (2, 3, 4): k = 17 = (1*3 + 1)*4 + 1 -> [1, 1, 1]
  {
    ScopedEnv env("BNORM_CHECK_FINITE", "1");
    EXPECT_C_REJECTS(b.Train(BNORM_CHANNELS_FIRST, 2, 3, 4), b, BNORM_ERROR_NON_FINITE,
                     "x: nan at index [1, 1, 1] (channel 1)");
    // Channels-last (2, 4, 3) memory: k = 17 = (1*4 + 1)*3 + 2 -> i 1, j 1, c 2.
    EXPECT_C_REJECTS(b.Train(BNORM_CHANNELS_LAST, 2, 3, 4), b, BNORM_ERROR_NON_FINITE,
                     "x: nan at index [1, 2, 1] (channel 2)");
    // s == 1: (N, C) = (8, 3): k = 17 -> [5, 2].
    EXPECT_C_REJECTS(b.Train(BNORM_CHANNELS_FIRST, 8, 3, 1), b, BNORM_ERROR_NON_FINITE,
                     "x: nan at index [5, 2] (channel 2)");
    EXPECT_C_REJECTS(
        bnorm_forward_eval(BNORM_CHANNELS_FIRST, 2, 3, 4, b.x.data(), nullptr, nullptr,
                           b.running_mean.data(), b.running_var.data(), 1e-5, b.y.data()),
        b, BNORM_ERROR_NON_FINITE, "x: nan at index [1, 1, 1] (channel 1)");
    CBuffers c;
    c.dy[5] = kInf;  // channels-first (2, 3, 4): k = 5 -> [0, 1, 1]
    EXPECT_C_REJECTS(bnorm_backward(BNORM_CHANNELS_FIRST, 2, 3, 4, c.dy.data(), c.x.data(), nullptr,
                                    c.batch_mean.data(), c.batch_invstd.data(), nullptr, nullptr,
                                    1e-5, 1, c.dx.data(), c.dweight.data(), c.dbias.data()),
                     c, BNORM_ERROR_NON_FINITE, "dy: inf at index [0, 1, 1] (channel 1)");
  }
  {
    ScopedEnv env("BNORM_CHECK_FINITE", "0");  // "0" means off
    EXPECT_EQ(b.Train(BNORM_CHANNELS_FIRST, 2, 3, 4), BNORM_OK) << bnorm_last_error();
  }
  // Unset (the default): NaN passes.
  ASSERT_EQ(std::getenv("BNORM_CHECK_FINITE"), nullptr);
  EXPECT_EQ(b.Train(BNORM_CHANNELS_FIRST, 2, 3, 4), BNORM_OK) << bnorm_last_error();
  EXPECT_TRUE(std::isnan(b.y[17]));
}

TEST(CApi, LastErrorIsPerThreadAndVersionIsSet) {
  CBuffers b;
  EXPECT_EQ(b.Train(BNORM_CHANNELS_FIRST, 2, -5, 4), BNORM_ERROR_INVALID_ARGUMENT);
  EXPECT_STREQ(bnorm_last_error(), "c: must be > 0, got -5");
  std::string other;
  std::thread t([&] {
    other = bnorm_last_error();  // nothing failed on this thread yet
    CBuffers tb;
    tb.Train(BNORM_CHANNELS_FIRST, 0, 3, 4);
  });
  t.join();
  EXPECT_EQ(other, "");
  EXPECT_STREQ(bnorm_last_error(), "c: must be > 0, got -5");

  const std::string version = bnorm_version();
  EXPECT_FALSE(version.empty());
  EXPECT_EQ(version, bnorm::version());
  EXPECT_EQ(std::count(version.begin(), version.end(), '.'), 2) << version;  // MAJOR.MINOR.PATCH
}

// The C API's status codes are the C++ StatusCode values.
TEST(CApi, StatusCodesMatchCpp) {
  EXPECT_EQ(BNORM_OK, static_cast<int>(StatusCode::kOk));
  EXPECT_EQ(BNORM_ERROR_INVALID_ARGUMENT, static_cast<int>(StatusCode::kInvalidArgument));
  EXPECT_EQ(BNORM_ERROR_NON_FINITE, static_cast<int>(StatusCode::kNonFinite));
  EXPECT_EQ(BNORM_ERROR_INTERNAL, static_cast<int>(StatusCode::kInternal));
  EXPECT_EQ(bnorm::Status::invalid_argument("m").to_string(), "InvalidArgument: m");
  EXPECT_EQ(bnorm::Status().to_string(), "OK");
}

}  // namespace
}  // namespace bnorm_test
