// The IDX reader on small synthetic files (plain and gzip), each kind of corruption, the real
// Fashion-MNIST when dataset-fashion-mnist is installed, and the shuffling.
#include "bnorm/io/idx.h"

#include <algorithm>
#include <filesystem>
#include <numeric>
#include <set>

#include <gtest/gtest.h>

#include "io_test_util.h"

namespace bnorm::io {
namespace {

using test::TempDir;
using test::write_bytes;
using test::write_gzip;

void put32(std::vector<uint8_t>* b, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) b->push_back(static_cast<uint8_t>(v >> s));
}

// An images file of count images of rows x cols; pixel k of the payload is (k * 7) % 256.
std::vector<uint8_t> images_file(uint32_t count, uint32_t rows, uint32_t cols) {
  std::vector<uint8_t> b;
  put32(&b, kIdxImagesMagic);
  put32(&b, count);
  put32(&b, rows);
  put32(&b, cols);
  for (uint64_t k = 0; k < uint64_t{count} * rows * cols; ++k) b.push_back(static_cast<uint8_t>(k * 7));
  return b;
}

std::vector<uint8_t> labels_file(const std::vector<uint8_t>& labels) {
  std::vector<uint8_t> b;
  put32(&b, kIdxLabelsMagic);
  put32(&b, static_cast<uint32_t>(labels.size()));
  b.insert(b.end(), labels.begin(), labels.end());
  return b;
}

// Expects an error whose message contains each of the fragments.
void expect_error(const Status& s, std::initializer_list<const char*> fragments) {
  ASSERT_FALSE(s.ok());
  for (const char* f : fragments) EXPECT_NE(s.message().find(f), std::string::npos) << s.message();
  EXPECT_EQ(s.message().find('\n'), std::string::npos) << "one line: " << s.message();
}

class IdxTest : public ::testing::TestWithParam<bool> {  // param: gzip
 protected:
  std::string write(const std::string& name, const std::vector<uint8_t>& bytes) {
    const std::string path = dir_.file(GetParam() ? name + ".gz" : name);
    if (GetParam()) {
      write_gzip(path, bytes);
    } else {
      write_bytes(path, bytes);
    }
    return path;
  }
  TempDir dir_;
};

TEST_P(IdxTest, ReadsImagesAndLabels) {
  const std::string images = write("img", images_file(3, 4, 5));
  const std::string labels = write("lab", labels_file({0, 9, 4}));
  IdxImages raw;
  ASSERT_TRUE(read_idx_images(images, &raw).ok());
  EXPECT_EQ(raw.count, 3);
  EXPECT_EQ(raw.rows, 4);
  EXPECT_EQ(raw.cols, 5);
  ASSERT_EQ(raw.pixels.size(), 60u);
  EXPECT_EQ(raw.pixels[59], static_cast<uint8_t>(59 * 7));

  Dataset d;
  ASSERT_TRUE(load_idx_dataset(images, labels, DataOptions(), &d).ok());
  EXPECT_EQ(d.count, 3);
  EXPECT_EQ(d.image_size(), 20);
  EXPECT_EQ(d.labels, (std::vector<int32_t>{0, 9, 4}));
  for (size_t k = 0; k < d.images.size(); ++k) {
    EXPECT_EQ(d.images[k], static_cast<float>(static_cast<uint8_t>(k * 7)) / 255.0f);
    EXPECT_GE(d.images[k], 0.0f);
    EXPECT_LE(d.images[k], 1.0f);
  }

  DataOptions norm;
  norm.normalize = true;
  norm.mean = 0.5f;
  norm.std = 0.25f;
  Dataset n;
  ASSERT_TRUE(load_idx_dataset(images, labels, norm, &n).ok());
  for (size_t k = 0; k < n.images.size(); ++k) {
    EXPECT_FLOAT_EQ(n.images[k], (d.images[k] - 0.5f) / 0.25f);
  }
  norm.std = 0.0f;
  expect_error(load_idx_dataset(images, labels, norm, &n), {"std"});
}

TEST_P(IdxTest, BadMagic) {
  auto bytes = images_file(2, 3, 3);
  bytes[3] = 0x02;  // rank 2
  std::vector<uint8_t> raw;
  expect_error(read_idx_labels(write("lab", images_file(2, 3, 3)), &raw),
               {"bad magic 0x00000803", "expected 0x00000801"});
  IdxImages images;
  expect_error(read_idx_images(write("img", bytes), &images), {"bad magic", "rank 2, expected 3"});
  bytes[3] = 0x03;
  bytes[2] = 0x0d;  // float
  expect_error(read_idx_images(write("img", bytes), &images), {"not uint8"});
  bytes[0] = 'P';
  expect_error(read_idx_images(write("img", bytes), &images), {"not an IDX file"});
  EXPECT_EQ(images.count, 0) << "output untouched";
}

TEST_P(IdxTest, ZeroDimension) {
  IdxImages images;
  expect_error(read_idx_images(write("img", images_file(2, 0, 3)), &images), {"dimension 1 is 0"});
  std::vector<uint8_t> labels;
  expect_error(read_idx_labels(write("lab", labels_file({})), &labels), {"dimension 0 is 0"});
}

TEST_P(IdxTest, ImplausibleSize) {
  std::vector<uint8_t> bytes;
  for (uint32_t v : {kIdxImagesMagic, 0xffffffffu, 0xffffffffu, 0xffffffffu}) put32(&bytes, v);
  IdxImages images;
  expect_error(read_idx_images(write("img", bytes), &images), {"implausible size"});
}

TEST_P(IdxTest, TruncatedPayload) {
  auto bytes = images_file(2, 3, 3);
  bytes.resize(bytes.size() - 5);
  IdxImages images;
  const std::string path = write("img", bytes);
  expect_error(read_idx_images(path, &images), {"truncated", "expected 18 payload bytes, got 13"});
  expect_error(read_idx_images(path, &images), {path.c_str()});
  // Header cut short.
  bytes.resize(10);
  expect_error(read_idx_images(write("img", bytes), &images), {"truncated header"});
  bytes.resize(2);
  expect_error(read_idx_images(write("img", bytes), &images), {"too short"});
}

TEST_P(IdxTest, TrailingBytes) {
  auto bytes = labels_file({1, 2, 3});
  bytes.push_back(0);
  bytes.push_back(0);
  std::vector<uint8_t> labels;
  expect_error(read_idx_labels(write("lab", bytes), &labels), {"2 trailing bytes", "payload of 3"});
  EXPECT_TRUE(labels.empty());
}

TEST_P(IdxTest, LabelOutOfRange) {
  std::vector<uint8_t> labels;
  expect_error(read_idx_labels(write("lab", labels_file({1, 9, 10, 200})), &labels),
               {"label 2 is 10", "0..9"});
  ASSERT_TRUE(read_idx_labels(write("lab", labels_file({1, 9, 10})), &labels, 11).ok());
  expect_error(read_idx_labels(write("lab", labels_file({1})), &labels, 0), {"num_classes"});
}

TEST_P(IdxTest, CountMismatch) {
  Dataset d;
  expect_error(load_idx_dataset(write("img", images_file(3, 2, 2)), write("lab", labels_file({1, 2})),
                                DataOptions(), &d),
               {"3 images but 2 labels"});
  EXPECT_EQ(d.count, 0);
}

INSTANTIATE_TEST_SUITE_P(PlainAndGzip, IdxTest, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "Gzip" : "Plain"; });

TEST(Idx, MissingFile) {
  TempDir dir;
  IdxImages images;
  expect_error(read_idx_images(dir.file("nope"), &images), {"nope", "no such file"});
  expect_error(read_idx_images(dir.path(), &images), {"is a directory"});
  Dataset train, test;
  expect_error(load_fashion_mnist(dir.path(), DataOptions(), &train, &test),
               {"not found", "train-images-idx3-ubyte.gz", "--data"});
  // The default directory's message says how to install the package.
  std::string path;
  Status s = find_idx_file(kDefaultFashionMnistDir, "no-such-file", &path);
  expect_error(s, {kDefaultFashionMnistDir, "apt-get install dataset-fashion-mnist"});
}

TEST(Idx, TruncatedGzipStream) {
  TempDir dir;
  // Incompressible enough that the stream is long: pseudo-random pixels.
  std::vector<uint8_t> bytes = images_file(50, 28, 28);
  SplitMix64 rng(3);
  for (size_t k = 16; k < bytes.size(); ++k) bytes[k] = static_cast<uint8_t>(rng.next());
  const std::string good = dir.file("good.gz");
  write_gzip(good, bytes);
  std::vector<uint8_t> gz = test::read_bytes(good);
  gz.resize(gz.size() / 2);
  write_bytes(dir.file("cut.gz"), gz);
  IdxImages images;
  ASSERT_TRUE(read_idx_images(good, &images).ok());
  images = IdxImages();
  expect_error(read_idx_images(dir.file("cut.gz"), &images), {"cut.gz", "truncated"});
  EXPECT_EQ(images.count, 0);

  // A corrupted deflate stream (bytes flipped in the middle).
  gz = test::read_bytes(good);
  for (size_t k = gz.size() / 3; k < gz.size() / 3 + 64; ++k) gz[k] ^= 0x5a;
  write_bytes(dir.file("bad.gz"), gz);
  Status s = read_idx_images(dir.file("bad.gz"), &images);
  expect_error(s, {"bad.gz"});
}

TEST(Idx, LoadsFashionMnistFromADirectory) {
  TempDir dir;
  write_gzip(dir.file("train-images-idx3-ubyte.gz"), images_file(4, 28, 28));
  write_gzip(dir.file("train-labels-idx1-ubyte.gz"), labels_file({1, 2, 3, 4}));
  write_bytes(dir.file("t10k-images-idx3-ubyte"), images_file(2, 28, 28));
  write_bytes(dir.file("t10k-labels-idx1-ubyte"), labels_file({5, 6}));
  Dataset train, test;
  ASSERT_TRUE(load_fashion_mnist(dir.path(), DataOptions(), &train, &test).ok());
  EXPECT_EQ(train.count, 4);
  EXPECT_EQ(test.count, 2);
  EXPECT_EQ(test.labels, (std::vector<int32_t>{5, 6}));

  // A mismatch in image size between the two sets.
  write_bytes(dir.file("t10k-images-idx3-ubyte"), images_file(2, 14, 14));
  expect_error(load_fashion_mnist(dir.path(), DataOptions(), &train, &test), {"28x28", "14x14"});
}

TEST(Idx, LoadsTheTestSetAlone) {
  TempDir dir;
  write_bytes(dir.file("t10k-images-idx3-ubyte"), images_file(3, 28, 28));
  write_gzip(dir.file("t10k-labels-idx1-ubyte.gz"), labels_file({7, 8, 9}));
  Dataset test;
  ASSERT_TRUE(load_fashion_mnist_test(dir.path(), DataOptions(), &test).ok());
  EXPECT_EQ(test.count, 3);
  EXPECT_EQ(test.labels, (std::vector<int32_t>{7, 8, 9}));
  // The training files are not needed, and load_fashion_mnist still asks for them.
  Dataset train, both;
  expect_error(load_fashion_mnist(dir.path(), DataOptions(), &train, &both),
               {"train-images-idx3-ubyte"});
  // Without the test labels: the error names them, and *test is unchanged.
  std::filesystem::remove(dir.file("t10k-labels-idx1-ubyte.gz"));
  expect_error(load_fashion_mnist_test(dir.path(), DataOptions(), &test),
               {"t10k-labels-idx1-ubyte", "--data"});
  EXPECT_EQ(test.count, 3);
}

TEST(Idx, RealFashionMnist) {
  std::error_code ec;
  if (!std::filesystem::exists(std::string(kDefaultFashionMnistDir) + "/t10k-labels-idx1-ubyte.gz", ec)) {
    GTEST_SKIP() << "skipped: dataset-fashion-mnist not installed";
  }
  Dataset train, test;
  Status s = load_fashion_mnist("", DataOptions(), &train, &test);
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(train.count, 60000);
  EXPECT_EQ(test.count, 10000);
  EXPECT_EQ(train.rows, 28);
  EXPECT_EQ(train.cols, 28);
  // The files' first labels: ankle boot, T-shirt, T-shirt, dress / ankle boot, pullover, trouser.
  EXPECT_EQ(std::vector<int32_t>(train.labels.begin(), train.labels.begin() + 4),
            (std::vector<int32_t>{9, 0, 0, 3}));
  EXPECT_EQ(std::vector<int32_t>(test.labels.begin(), test.labels.begin() + 3),
            (std::vector<int32_t>{9, 2, 1}));
  // Balanced classes: 6000 / 1000 each; pixel mean near the documented constant.
  std::vector<int> per_class(10, 0);
  for (int32_t l : train.labels) ++per_class[l];
  for (int c = 0; c < 10; ++c) EXPECT_EQ(per_class[c], 6000) << "class " << c;
  double sum = 0;
  for (float x : train.images) sum += x;
  EXPECT_NEAR(sum / static_cast<double>(train.images.size()), kFashionMnistMean, 5e-4);
}

TEST(Shuffle, PermutationIsDeterministicAndComplete) {
  const auto a = epoch_permutation(42, 0, 1000);
  EXPECT_EQ(a, epoch_permutation(42, 0, 1000));
  EXPECT_NE(a, epoch_permutation(42, 1, 1000));
  EXPECT_NE(a, epoch_permutation(43, 0, 1000));
  std::vector<int64_t> sorted = a;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> identity(1000);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_EQ(sorted, identity);
  EXPECT_NE(a, identity);
  EXPECT_TRUE(epoch_permutation(1, 0, 0).empty());
  EXPECT_EQ(epoch_permutation(1, 0, 1), std::vector<int64_t>{0});
}

TEST(Shuffle, FirstPositionIsRoughlyUniform) {
  // 4000 permutations of 4: each value lands first about 1000 times (sd ~27).
  std::vector<int> first(4, 0);
  for (uint64_t e = 0; e < 4000; ++e) ++first[epoch_permutation(7, e, 4)[0]];
  for (int v = 0; v < 4; ++v) EXPECT_NEAR(first[v], 1000, 150) << "value " << v;
}

TEST(Shuffle, SplitMixKnownValues) {
  // splitmix64 seeded with 0: the published first outputs.
  SplitMix64 rng(0);
  EXPECT_EQ(rng.next(), 0xe220a8397b1dcdafULL);
  EXPECT_EQ(rng.next(), 0x6e789e6aa1b965f4ULL);
  for (int i = 0; i < 1000; ++i) EXPECT_LT(rng.uniform(7), 7u);
}

TEST(Shuffle, BatchSamplerCoversEachEpoch) {
  BatchSampler sampler(10, 3, 5, /*drop_last=*/true);
  EXPECT_EQ(sampler.batches_per_epoch(), 3);
  std::set<int64_t> seen;
  int64_t epoch = -1;
  for (int b = 0; b < 3; ++b) {
    const auto& batch = sampler.next(&epoch);
    EXPECT_EQ(epoch, 0);
    ASSERT_EQ(batch.size(), 3u);
    seen.insert(batch.begin(), batch.end());
  }
  EXPECT_EQ(seen.size(), 9u);
  sampler.next(&epoch);
  EXPECT_EQ(epoch, 1);

  BatchSampler keep(10, 4, 5, /*drop_last=*/false);
  EXPECT_EQ(keep.batches_per_epoch(), 3);
  std::vector<size_t> sizes;
  for (int b = 0; b < 3; ++b) sizes.push_back(keep.next().size());
  EXPECT_EQ(sizes, (std::vector<size_t>{4, 4, 2}));

  Dataset d;
  d.count = 3;
  d.rows = 1;
  d.cols = 2;
  d.images = {0, 1, 10, 11, 20, 21};
  d.labels = {7, 8, 9};
  const int64_t idx[2] = {2, 0};
  float img[4];
  int32_t lab[2];
  gather_batch(d, idx, 2, img, lab);
  EXPECT_EQ(std::vector<float>(img, img + 4), (std::vector<float>{20, 21, 0, 1}));
  EXPECT_EQ(lab[0], 9);
  EXPECT_EQ(lab[1], 7);
}

}  // namespace
}  // namespace bnorm::io
