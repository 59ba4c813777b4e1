// Shared helpers of the unit tests: seeded random data, owning tensors in both layouts, index
// helpers, buffer snapshots (bit-for-bit "nothing was written" checks), Status matchers and a
// naive fp64 oracle for the batch statistics.
//
// Everything here is written independently of src/: the tests compare the library against it.
#ifndef BNORM_TESTS_TEST_UTIL_H_
#define BNORM_TESTS_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/status.h"
#include "bnorm/tensor.h"

namespace bnorm_test {

using bnorm::Layout;

// ---------------------------------------------------------------------------------------------
// Seeded randomness.

// The seed of a test: BNORM_TEST_SEED from the environment when set, else the test's default.
inline uint64_t TestSeed(uint64_t default_seed) {
  const char* env = std::getenv("BNORM_TEST_SEED");
  if (env != nullptr && env[0] != '\0') return std::strtoull(env, nullptr, 10);
  return default_seed;
}

// Declares `std::mt19937_64 var` seeded by TestSeed(default_seed) and puts the seed into every
// failure message of the enclosing scope.
#define BNORM_SEEDED_RNG(var, default_seed)                                                       \
  const uint64_t var##_seed = ::bnorm_test::TestSeed(default_seed);                               \
  SCOPED_TRACE(::testing::Message() << "seed " << var##_seed                                      \
                                    << " (reproduce with BNORM_TEST_SEED=" << var##_seed << ")"); \
  std::mt19937_64 var(var##_seed)

inline double Uniform(std::mt19937_64& rng, double lo, double hi) {
  return std::uniform_real_distribution<double>(lo, hi)(rng);
}

inline double Normal(std::mt19937_64& rng, double mean = 0.0, double stddev = 1.0) {
  return std::normal_distribution<double>(mean, stddev)(rng);
}

// c floats uniform in [lo, hi).
inline std::vector<float> RandomVector(std::mt19937_64& rng, int64_t c, double lo, double hi) {
  std::vector<float> v(static_cast<size_t>(c));
  for (float& f : v) f = static_cast<float>(Uniform(rng, lo, hi));
  return v;
}

// ---------------------------------------------------------------------------------------------
// Shapes and indices.

// Product of the spatial dims (dims[2..]); 1 for (N, C).
inline int64_t SpatialOf(std::span<const int64_t> dims) {
  int64_t s = 1;
  for (size_t i = 2; i < dims.size(); ++i) s *= dims[i];
  return s;
}

// Memory index of logical element (i, ch, j) of an (N, C, S) tensor (j: flattened spatial index).
//   channels-first: (i*C + ch)*S + j        channels-last: (i*S + j)*C + ch
inline int64_t IndexChannelsFirst(int64_t c, int64_t s, int64_t i, int64_t ch, int64_t j) {
  return (i * c + ch) * s + j;
}
inline int64_t IndexChannelsLast(int64_t c, int64_t s, int64_t i, int64_t ch, int64_t j) {
  return (i * s + j) * c + ch;
}
inline int64_t IndexOf(Layout layout, int64_t c, int64_t s, int64_t i, int64_t ch, int64_t j) {
  return layout == Layout::kChannelsFirst ? IndexChannelsFirst(c, s, i, ch, j)
                                          : IndexChannelsLast(c, s, i, ch, j);
}

// Flattened spatial index j of the spatial multi-index `spatial` (row-major over dims[2..]).
inline int64_t SpatialIndex(std::span<const int64_t> dims, std::initializer_list<int64_t> spatial) {
  int64_t j = 0;
  size_t d = 2;
  for (int64_t v : spatial) j = j * dims[d++] + v;
  return j;
}

inline const char* LayoutTag(Layout layout) {
  return layout == Layout::kChannelsFirst ? "channels_first" : "channels_last";
}

// "[2, 3, 4]".
inline std::string DimsString(std::span<const int64_t> dims) {
  std::string out = "[";
  for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + std::to_string(dims[i]);
  return out + "]";
}

// ---------------------------------------------------------------------------------------------
// An owning fp32 tensor with logical dims (N, C, spatial...) and a memory layout.

struct Tensor {
  std::vector<int64_t> dims;
  Layout layout = Layout::kChannelsFirst;
  std::vector<float> data;

  Tensor() = default;
  Tensor(std::vector<int64_t> d, Layout l, float fill = 0.0f) : dims(std::move(d)), layout(l) {
    data.assign(static_cast<size_t>(numel()), fill);
  }

  int64_t n() const { return dims[0]; }
  int64_t c() const { return dims[1]; }
  int64_t s() const { return SpatialOf(dims); }
  int64_t numel() const { return n() * c() * s(); }
  int64_t count() const { return n() * s(); }  // elements per channel

  int64_t index(int64_t i, int64_t ch, int64_t j) const {
    return IndexOf(layout, c(), s(), i, ch, j);
  }
  float& at(int64_t i, int64_t ch, int64_t j) { return data[static_cast<size_t>(index(i, ch, j))]; }
  float at(int64_t i, int64_t ch, int64_t j) const {
    return data[static_cast<size_t>(index(i, ch, j))];
  }

  bnorm::TensorView view() { return bnorm::TensorView(data.data(), dims, layout); }
  bnorm::ConstTensorView cview() const { return bnorm::ConstTensorView(data.data(), dims, layout); }
  std::span<float> span() { return data; }

  // The same logical tensor stored in `other` layout.
  Tensor ToLayout(Layout other) const {
    Tensor t(dims, other);
    for (int64_t i = 0; i < n(); ++i)
      for (int64_t ch = 0; ch < c(); ++ch)
        for (int64_t j = 0; j < s(); ++j) t.at(i, ch, j) = at(i, ch, j);
    return t;
  }

  std::string Describe() const { return DimsString(dims) + " " + LayoutTag(layout); }
};

// Random tensor: element (i, ch, j) = offsets[ch] + scale * N(0, 1) (offsets empty: 0).
inline Tensor RandomTensor(std::mt19937_64& rng, std::vector<int64_t> dims, Layout layout,
                           std::span<const float> offsets = {}, double scale = 1.0) {
  Tensor t(std::move(dims), layout);
  // Fill in logical order so that the same seed gives the same logical tensor in both layouts.
  for (int64_t i = 0; i < t.n(); ++i)
    for (int64_t ch = 0; ch < t.c(); ++ch)
      for (int64_t j = 0; j < t.s(); ++j) {
        const double off = offsets.empty() ? 0.0 : offsets[static_cast<size_t>(ch)];
        t.at(i, ch, j) = static_cast<float>(off + scale * Normal(rng));
      }
  return t;
}

// Per-channel offsets spread over [-spread, spread] (channel 0 most negative).
inline std::vector<float> ChannelOffsets(int64_t c, double spread) {
  std::vector<float> v(static_cast<size_t>(c));
  for (int64_t ch = 0; ch < c; ++ch)
    v[static_cast<size_t>(ch)] =
        c == 1 ? 0.0f
               : static_cast<float>(-spread + 2.0 * spread * ch / static_cast<double>(c - 1));
  return v;
}

// ---------------------------------------------------------------------------------------------
// Sentinels and snapshots.

// A recognizable finite pattern (-7777.25, -7778.25, ...): any write of a computed value shows.
inline void FillSentinel(std::span<float> v) {
  for (size_t k = 0; k < v.size(); ++k) v[k] = -7777.25f - static_cast<float>(k % 4096);
}

// Copies a set of buffers and checks later that every byte is unchanged (memcmp).
class Snapshot {
 public:
  Snapshot& Add(std::string name, std::span<const float> buffer) {
    Entry e;
    e.name = std::move(name);
    e.address = buffer.data();
    e.bytes.resize(buffer.size_bytes());
    if (!buffer.empty()) std::memcpy(e.bytes.data(), buffer.data(), buffer.size_bytes());
    entries_.push_back(std::move(e));
    return *this;
  }
  Snapshot& Add(std::string name, const std::vector<float>& buffer) {
    return Add(std::move(name), std::span<const float>(buffer));
  }
  Snapshot& Add(std::string name, const int64_t* counter) {
    Entry e;
    e.name = std::move(name);
    e.address = counter;
    e.bytes.resize(sizeof(int64_t));
    std::memcpy(e.bytes.data(), counter, sizeof(int64_t));
    entries_.push_back(std::move(e));
    return *this;
  }

  // Every snapshotted buffer is bit-for-bit what it was when added.
  ::testing::AssertionResult Unchanged() const {
    for (const Entry& e : entries_) {
      if (e.bytes.empty() || std::memcmp(e.address, e.bytes.data(), e.bytes.size()) == 0) continue;
      const auto* now = static_cast<const unsigned char*>(e.address);
      size_t first = 0;
      while (first < e.bytes.size() && now[first] == e.bytes[first]) ++first;
      return ::testing::AssertionFailure()
             << e.name << " was modified (first differing byte " << first << " of "
             << e.bytes.size() << ", element " << first / 4 << ")";
    }
    return ::testing::AssertionSuccess();
  }

 private:
  struct Entry {
    std::string name;
    const void* address = nullptr;
    std::vector<unsigned char> bytes;
  };
  std::vector<Entry> entries_;
};

// Bitwise equality of two float buffers (memcmp), naming the first differing element.
inline ::testing::AssertionResult BitIdentical(std::span<const float> a, std::span<const float> b) {
  if (a.size() != b.size())
    return ::testing::AssertionFailure() << "sizes differ: " << a.size() << " vs " << b.size();
  if (a.empty() || std::memcmp(a.data(), b.data(), a.size_bytes()) == 0)
    return ::testing::AssertionSuccess();
  size_t k = 0;
  while (std::memcmp(&a[k], &b[k], sizeof(float)) == 0) ++k;
  return ::testing::AssertionFailure()
         << "first difference at element " << k << ": " << a[k] << " vs " << b[k];
}

// ---------------------------------------------------------------------------------------------
// Status matchers.

inline ::testing::AssertionResult StatusIs(const bnorm::Status& status, bnorm::StatusCode code,
                                           std::string_view substring) {
  if (status.code() != code)
    return ::testing::AssertionFailure()
           << "code " << bnorm::status_code_name(status.code()) << ", expected "
           << bnorm::status_code_name(code) << " (message: \"" << status.message() << "\")";
  if (status.message().find(substring) == std::string::npos)
    return ::testing::AssertionFailure()
           << "message \"" << status.message() << "\" does not contain \"" << substring << "\"";
  return ::testing::AssertionSuccess();
}

inline ::testing::AssertionResult IsInvalid(const bnorm::Status& status,
                                            std::string_view substring) {
  return StatusIs(status, bnorm::StatusCode::kInvalidArgument, substring);
}

inline ::testing::AssertionResult IsOk(const bnorm::Status& status) {
  if (status.ok()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << status.to_string();
}

// ---------------------------------------------------------------------------------------------
// Naive fp64 oracle (logical indexing, two-pass), independent of the library's reference.

struct ChannelStats {
  std::vector<double> mean;  // batch mean
  std::vector<double> var;   // biased variance (1/n) sum (x - mean)^2
};

inline ChannelStats BatchStats(const Tensor& x) {
  ChannelStats st;
  const auto c = static_cast<size_t>(x.c());
  st.mean.assign(c, 0.0);
  st.var.assign(c, 0.0);
  const double n = static_cast<double>(x.count());
  for (int64_t ch = 0; ch < x.c(); ++ch) {
    double sum = 0;
    for (int64_t i = 0; i < x.n(); ++i)
      for (int64_t j = 0; j < x.s(); ++j) sum += x.at(i, ch, j);
    const double m = sum / n;
    double sq = 0;
    for (int64_t i = 0; i < x.n(); ++i)
      for (int64_t j = 0; j < x.s(); ++j) sq += (x.at(i, ch, j) - m) * (x.at(i, ch, j) - m);
    st.mean[static_cast<size_t>(ch)] = m;
    st.var[static_cast<size_t>(ch)] = sq / n;
  }
  return st;
}

// |got - want| <= tol, with a message naming `what`.
inline ::testing::AssertionResult Near(double got, double want, double tol, std::string_view what) {
  if (std::fabs(got - want) <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << ": got " << got << ", want " << want << " (|diff| " << std::fabs(got - want)
         << " > tol " << tol << ")";
}

// fp32 unit roundoff 2^-24.
inline constexpr double kFloatU = std::numeric_limits<float>::epsilon() / 2.0;

// The accuracy of the fast kernels' batch statistics on top of the final fp32 rounding
// (src/cpu/stats.cc, docs/design.md): they sum x - pivot in fp32 lanes for at most K = 8 terms,
// then in fp64, and accept that only when |mean - pivot| <= 3 std, so the variance errs by at
// most 2 (K + 3) u (1 + 2 R + 3 R^2) relative with R = 4 (7.5e-5) and the mean by at most
// 2 (K + 2) u (1 + R) std (6e-6 std). Tests of the public passes allow these on top of their
// fp32 terms; the reference is far more accurate.
inline constexpr double kVarRelTol = 8e-5;
inline constexpr double kMeanStdTol = 1e-5;

}  // namespace bnorm_test

#endif  // BNORM_TESTS_TEST_UTIL_H_
