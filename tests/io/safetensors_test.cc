// Checkpoints: round trip, atomic saving, and every corrupt or mismatched file leaving the
// destination bit-for-bit unchanged.
#include "bnorm/io/safetensors.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>

#include <gtest/gtest.h>

#include "io_test_util.h"

namespace bnorm::io {
namespace {

using nn::DType;
using nn::StateEntry;
using test::TempDir;

// A small model's state: a Linear(4 -> 3) and a BatchNorm1d(3).
struct FakeModel {
  std::vector<float> weight = std::vector<float>(12);
  std::vector<float> bias = std::vector<float>(3);
  std::vector<float> running_mean = std::vector<float>(3);
  std::vector<float> running_var = std::vector<float>(3);
  int64_t num_batches_tracked = 0;

  explicit FakeModel(float base) {
    for (size_t i = 0; i < weight.size(); ++i) weight[i] = base + 0.25f * static_cast<float>(i);
    for (size_t i = 0; i < 3; ++i) {
      bias[i] = base - static_cast<float>(i);
      running_mean[i] = base * 2 + static_cast<float>(i);
      running_var[i] = 1.0f + base + static_cast<float>(i);
    }
    num_batches_tracked = static_cast<int64_t>(base * 10);
  }

  std::vector<StateEntry> state() {
    auto f32 = [](const char* name, std::vector<float>& v, std::vector<int64_t> shape) {
      StateEntry e;
      e.name = name;
      e.shape = std::move(shape);
      e.data = v.data();
      return e;
    };
    std::vector<StateEntry> s = {f32("0.weight", weight, {3, 4}), f32("0.bias", bias, {3}),
                                 f32("1.running_mean", running_mean, {3}),
                                 f32("1.running_var", running_var, {3})};
    StateEntry counter;
    counter.name = "1.num_batches_tracked";
    counter.dtype = DType::kI64;
    counter.data = &num_batches_tracked;
    s.push_back(counter);
    return s;
  }

  // All the model's bytes, to compare before and after a failed load.
  std::vector<uint8_t> bytes() const {
    std::vector<uint8_t> b;
    auto add = [&b](const void* p, size_t n) {
      const auto* c = static_cast<const uint8_t*>(p);
      b.insert(b.end(), c, c + n);
    };
    add(weight.data(), 48);
    add(bias.data(), 12);
    add(running_mean.data(), 12);
    add(running_var.data(), 12);
    add(&num_batches_tracked, 8);
    return b;
  }
};

// A safetensors file from a header text and a data region, written by hand.
std::vector<uint8_t> make_file(const std::string& header, const std::vector<uint8_t>& data,
                               uint64_t header_len_override = 0) {
  const uint64_t n = header_len_override != 0 ? header_len_override : header.size();
  std::vector<uint8_t> b;
  for (int i = 0; i < 8; ++i) b.push_back(static_cast<uint8_t>(n >> (8 * i)));
  b.insert(b.end(), header.begin(), header.end());
  b.insert(b.end(), data.begin(), data.end());
  return b;
}

void expect_error(const Status& s, std::initializer_list<const char*> fragments) {
  ASSERT_FALSE(s.ok());
  for (const char* f : fragments) EXPECT_NE(s.message().find(f), std::string::npos) << s.message();
  EXPECT_EQ(s.message().find('\n'), std::string::npos) << "one line: " << s.message();
}

TEST(Safetensors, RoundTrip) {
  TempDir dir;
  FakeModel a(1.5f);
  const std::string path = dir.file("model.safetensors");
  const std::map<std::string, std::string> meta = {{"architecture", "{\"layers\":[]}"},
                                                   {"preset", "paper-mlp"}};
  Status s = save_safetensors(path, a.state(), meta);
  ASSERT_TRUE(s.ok()) << s.message();

  // The layout: 8-byte length, header padded to a multiple of 8, data in the given order.
  const std::vector<uint8_t> file = test::read_bytes(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | file[i];
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(file.size(), 8 + n + 48 + 12 * 3 + 8);
  EXPECT_EQ(std::memcmp(file.data() + 8 + n, a.weight.data(), 48), 0);
  const std::string header(file.begin() + 8, file.begin() + 8 + static_cast<ptrdiff_t>(n));
  EXPECT_NE(header.find("\"0.weight\":{\"dtype\":\"F32\",\"shape\":[3,4],\"data_offsets\":[0,48]}"),
            std::string::npos)
      << header;
  EXPECT_NE(header.find("\"1.num_batches_tracked\":{\"dtype\":\"I64\",\"shape\":[]"),
            std::string::npos);

  FakeModel b(-7.0f);
  std::map<std::string, std::string> got_meta;
  s = load_safetensors(path, b.state(), LoadOptions(), &got_meta);
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(b.bytes(), a.bytes());
  EXPECT_EQ(got_meta, meta);

  std::map<std::string, std::string> only_meta;
  ASSERT_TRUE(read_safetensors_metadata(path, &only_meta).ok());
  EXPECT_EQ(only_meta, meta);

  std::vector<OwnedTensor> tensors;
  ASSERT_TRUE(read_safetensors(path, &tensors, nullptr).ok());
  ASSERT_EQ(tensors.size(), 5u);
  EXPECT_EQ(tensors[0].name, "0.weight");
  EXPECT_EQ(tensors[0].dtype, "F32");
  EXPECT_EQ(tensors[0].shape, (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(tensors[4].name, "1.num_batches_tracked");
  EXPECT_EQ(tensors[4].dtype, "I64");
  EXPECT_TRUE(tensors[4].shape.empty());
  int64_t counter = 0;
  std::memcpy(&counter, tensors[4].bytes.data(), 8);
  EXPECT_EQ(counter, 15);

  // Overwriting an existing checkpoint replaces it; no temporary file is left behind.
  ASSERT_TRUE(save_safetensors(path, b.state(), {}).ok());
  EXPECT_EQ(test::list_dir(dir.path()), std::vector<std::string>{"model.safetensors"});
}

TEST(Safetensors, SaveRejectsBadEntries) {
  TempDir dir;
  FakeModel a(1.0f);
  auto state = a.state();
  state[1].name = "0.weight";
  expect_error(save_safetensors(dir.file("x"), state, {}), {"\"0.weight\" appears twice"});
  state = a.state();
  state[2].data = nullptr;
  expect_error(save_safetensors(dir.file("x"), state, {}), {"1.running_mean", "null data"});
  EXPECT_TRUE(test::list_dir(dir.path()).empty());
}

TEST(Safetensors, SaveIntoUnwritableDirectoryFailsAndLeavesNothing) {
  TempDir dir;
  FakeModel a(1.0f);
  expect_error(save_safetensors(dir.file("no/such/dir/m.safetensors"), a.state(), {}),
               {"cannot write checkpoint", "no/such/dir/m.safetensors"});
  if (geteuid() != 0) {  // root writes anywhere: the permission check means nothing then
    const std::string locked = dir.file("locked");
    ASSERT_EQ(mkdir(locked.c_str(), 0500), 0);
    expect_error(save_safetensors(locked + "/m.safetensors", a.state(), {}),
                 {"cannot write checkpoint", "Permission denied"});
    EXPECT_TRUE(test::list_dir(locked).empty());
  }
  // The destination is a directory: rename fails, the temporary file is removed.
  const std::string sub = dir.file("sub");
  ASSERT_EQ(mkdir(sub.c_str(), 0700), 0);
  expect_error(save_safetensors(sub, a.state(), {}), {"cannot write checkpoint", "rename"});
  EXPECT_EQ(test::list_dir(dir.path()), std::vector<std::string>{"sub"});
}

TEST(Safetensors, FailureMidWriteLeavesNoFileAndKeepsTheOldOne) {
  TempDir dir;
  FakeModel a(1.0f), b(2.0f);
  const std::string path = dir.file("m.safetensors");
  for (int64_t after : {0, 5, 100, 150}) {
    testing::set_save_failure_after_bytes(after);
    Status s = save_safetensors(path, a.state(), {});
    testing::set_save_failure_after_bytes(-1);
    expect_error(s, {"cannot write checkpoint", "No space left on device"});
    EXPECT_TRUE(test::list_dir(dir.path()).empty()) << "after " << after << " bytes";
  }
  // With a checkpoint in place, a failed save leaves it as it was.
  ASSERT_TRUE(save_safetensors(path, a.state(), {}).ok());
  const auto before = test::read_bytes(path);
  testing::set_save_failure_after_bytes(64);
  Status s = save_safetensors(path, b.state(), {});
  testing::set_save_failure_after_bytes(-1);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(test::read_bytes(path), before);
  EXPECT_EQ(test::list_dir(dir.path()), std::vector<std::string>{"m.safetensors"});
}

// A valid file's data region and header pieces for the corrupt variants below.
class CorruptFile : public ::testing::Test {
 protected:
  // Loads the file and checks it fails with the fragments and leaves the model untouched.
  void expect_rejected(const std::vector<uint8_t>& file, std::initializer_list<const char*> fragments,
                       LoadOptions options = LoadOptions()) {
    const std::string path = dir_.file("bad.safetensors");
    test::write_bytes(path, file);
    FakeModel m(3.0f);
    const auto before = m.bytes();
    std::map<std::string, std::string> meta = {{"keep", "me"}};
    expect_error(load_safetensors(path, m.state(), options, &meta), fragments);
    EXPECT_EQ(std::memcmp(m.bytes().data(), before.data(), before.size()), 0) << "model changed";
    EXPECT_EQ(meta.size(), 1u) << "metadata changed";
  }

  // The header of FakeModel's file with one record replaced (or removed if record is empty).
  static std::string header_with(const std::string& name, const std::string& record) {
    std::vector<std::pair<std::string, std::string>> records = {
        {"0.weight", R"({"dtype":"F32","shape":[3,4],"data_offsets":[0,48]})"},
        {"0.bias", R"({"dtype":"F32","shape":[3],"data_offsets":[48,60]})"},
        {"1.running_mean", R"({"dtype":"F32","shape":[3],"data_offsets":[60,72]})"},
        {"1.running_var", R"({"dtype":"F32","shape":[3],"data_offsets":[72,84]})"},
        {"1.num_batches_tracked", R"({"dtype":"I64","shape":[],"data_offsets":[84,92]})"}};
    std::string h = "{";
    bool replaced = false;
    for (auto& [n, r] : records) {
      std::string rec = r;
      if (n == name) {
        replaced = true;
        if (record.empty()) continue;
        rec = record;
      }
      if (h.size() > 1) h += ",";
      h += "\"" + n + "\":" + rec;
    }
    if (!replaced && !record.empty()) h += ",\"" + name + "\":" + record;
    return h + "}";
  }

  std::vector<uint8_t> data_ = std::vector<uint8_t>(92, 0x11);
  TempDir dir_;
};

TEST_F(CorruptFile, ValidBaselineLoads) {
  const std::string path = dir_.file("ok.safetensors");
  test::write_bytes(path, make_file(header_with("", ""), data_));
  FakeModel m(3.0f);
  Status s = load_safetensors(path, m.state());
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(m.num_batches_tracked, 0x1111111111111111);
}

TEST_F(CorruptFile, HeaderLength) {
  const std::string h = header_with("", "");
  expect_rejected(make_file(h, data_, 1u << 20), {"header length 1048576"});
  expect_rejected(make_file(h, data_, uint64_t{1} << 60), {"header length"});
  expect_rejected(make_file(h, data_, 1), {"header length 1"});
  expect_rejected({1, 2, 3}, {"too short"});
}

TEST_F(CorruptFile, BadJson) {
  expect_rejected(make_file("{\"0.weight\": {", data_), {"not valid JSON"});
  expect_rejected(make_file("[1, 2]", data_), {"not a JSON object"});
  expect_rejected(make_file(header_with("0.bias", "42"), data_), {"\"0.bias\"", "not an object"});
  expect_rejected(make_file(header_with("0.bias", R"({"dtype":"F32","shape":[3]})"), data_),
                  {"\"0.bias\"", "data_offsets"});
  expect_rejected(make_file(header_with("0.bias", R"({"dtype":"F99","shape":[3],"data_offsets":[48,60]})"),
                            data_),
                  {"unknown dtype \"F99\""});
  expect_rejected(make_file(header_with("0.bias", R"({"dtype":"F32","shape":[-3],"data_offsets":[48,60]})"),
                            data_),
                  {"shape [-3]"});
  std::string dup = header_with("", "");
  dup.insert(dup.size() - 1, R"(,"0.bias":{"dtype":"F32","shape":[3],"data_offsets":[48,60]})");
  expect_rejected(make_file(dup, data_), {"\"0.bias\" appears twice"});
  expect_rejected(make_file(header_with("__metadata__", R"({"a":1})"), data_),
                  {"__metadata__", "not a string"});
}

TEST_F(CorruptFile, OffsetsOutOfRange) {
  expect_rejected(
      make_file(header_with("1.num_batches_tracked", R"({"dtype":"I64","shape":[],"data_offsets":[84,100]})"),
                data_),
      {"\"1.num_batches_tracked\"", "outside the data region of 92 bytes"});
  expect_rejected(make_file(header_with("0.bias", R"({"dtype":"F32","shape":[3],"data_offsets":[60,48]})"),
                            data_),
                  {"outside the data region"});
  // Offsets that disagree with dtype x shape.
  expect_rejected(make_file(header_with("0.bias", R"({"dtype":"F32","shape":[4],"data_offsets":[48,60]})"),
                            data_),
                  {"\"0.bias\"", "hold 12 bytes", "needs 4 x 4"});
  // The data region is longer than the tensors, or shorter.
  std::vector<uint8_t> longer = data_;
  longer.push_back(0);
  expect_rejected(make_file(header_with("", ""), longer), {"1 bytes after the last tensor"});
  std::vector<uint8_t> shorter(data_.begin(), data_.end() - 1);
  expect_rejected(make_file(header_with("", ""), shorter), {"outside the data region of 91"});
}

TEST_F(CorruptFile, Overlapping) {
  expect_rejected(make_file(header_with("0.bias", R"({"dtype":"F32","shape":[3],"data_offsets":[40,52]})"),
                            data_),
                  {"\"0.weight\" and \"0.bias\" overlap"});
  // A gap between tensors is not a valid file either.
  std::string h = header_with("0.weight", R"({"dtype":"F32","shape":[2,4],"data_offsets":[0,32]})");
  expect_rejected(make_file(h, data_), {"unused bytes [32, 48)"});
}

TEST_F(CorruptFile, MissingExtraMisShaped) {
  // Without 0.bias: the following offsets shift down by 12 bytes.
  std::string h = R"({"0.weight":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]},)"
                  R"("1.running_mean":{"dtype":"F32","shape":[3],"data_offsets":[48,60]},)"
                  R"("1.running_var":{"dtype":"F32","shape":[3],"data_offsets":[60,72]},)"
                  R"("1.num_batches_tracked":{"dtype":"I64","shape":[],"data_offsets":[72,80]}})";
  expect_rejected(make_file(h, std::vector<uint8_t>(80, 1)), {"missing tensors: 0.bias"});
  h = header_with("2.weight", R"({"dtype":"F32","shape":[1],"data_offsets":[92,96]})");
  expect_rejected(make_file(h, std::vector<uint8_t>(96, 1)), {"unexpected tensors: 2.weight"});
  h = header_with("0.weight", R"({"dtype":"F32","shape":[4,3],"data_offsets":[0,48]})");
  expect_rejected(make_file(h, data_), {"\"0.weight\" has shape [4, 3]", "expects [3, 4]"});
  h = header_with("0.weight", R"({"dtype":"I32","shape":[3,4],"data_offsets":[0,48]})");
  expect_rejected(make_file(h, data_), {"\"0.weight\" is I32", "expects F32"});
  h = header_with("1.num_batches_tracked", R"({"dtype":"F64","shape":[],"data_offsets":[84,92]})");
  expect_rejected(make_file(h, data_), {"is F64", "expects I64"});
  // The counter may be absent only when the option allows it.
  h = header_with("1.num_batches_tracked", "");
  LoadOptions strict;
  strict.allow_missing_num_batches_tracked = false;
  expect_rejected(make_file(h, std::vector<uint8_t>(84, 1)), {"missing tensors: 1.num_batches_tracked"},
                  strict);
}

TEST_F(CorruptFile, MissingNumBatchesTrackedLoadsAsZero) {
  const std::string path = dir_.file("old.safetensors");
  test::write_bytes(path, make_file(header_with("1.num_batches_tracked", ""), std::vector<uint8_t>(84, 0)));
  FakeModel m(3.0f);
  ASSERT_EQ(m.num_batches_tracked, 30);
  Status s = load_safetensors(path, m.state());
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(m.num_batches_tracked, 0);
  EXPECT_EQ(m.weight[0], 0.0f);
}

TEST_F(CorruptFile, F64ConvertsToF32) {
  // 0.bias in double: the records after it shift by 12 bytes.
  const std::string h = R"({"0.weight":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]},)"
      R"("0.bias":{"dtype":"F64","shape":[3],"data_offsets":[48,72]},)"
      R"("1.running_mean":{"dtype":"F32","shape":[3],"data_offsets":[72,84]},)"
      R"("1.running_var":{"dtype":"F32","shape":[3],"data_offsets":[84,96]},)"
      R"("1.num_batches_tracked":{"dtype":"I64","shape":[],"data_offsets":[96,104]}})";
  std::vector<uint8_t> data(104, 0);
  const double bias[3] = {0.1, -2.5, 1e300};
  std::memcpy(data.data() + 48, bias, 24);
  const std::string path = dir_.file("f64.safetensors");
  test::write_bytes(path, make_file(h, data));
  FakeModel m(3.0f);
  ASSERT_TRUE(load_safetensors(path, m.state()).ok());
  EXPECT_EQ(m.bias[0], 0.1f);
  EXPECT_EQ(m.bias[1], -2.5f);
  EXPECT_TRUE(std::isinf(m.bias[2]));
  LoadOptions strict;
  strict.allow_f64_to_f32 = false;
  expect_rejected(make_file(h, data), {"\"0.bias\" is F64", "expects F32"}, strict);
}

TEST(Safetensors, LoadMissingFile) {
  TempDir dir;
  FakeModel m(1.0f);
  expect_error(load_safetensors(dir.file("none.safetensors"), m.state()), {"none.safetensors", "no such file"});
}

}  // namespace
}  // namespace bnorm::io
