// Fashion-MNIST (and MNIST) in the IDX format: reading, validation, conversion and shuffling.
//
// An IDX file is a 4-byte big-endian magic 0x0000TTRR (TT the element type, 0x08 = uint8; RR the
// rank), RR big-endian uint32 dimensions, then the row-major payload. Files may be gzip-compressed
// (read through zlib; a plain file is read as it is, whatever its name).
//
// Every reader validates the header (magic, element type, rank, dimensions > 0) before it reads
// the payload, then checks that the payload has exactly the size the header announces: a
// truncated file or trailing bytes are errors. On error the output arguments are unchanged and
// the Status message is one line, "<file>: <problem>".
//
// Thread safety: the functions are reentrant; distinct outputs may be filled concurrently.
#ifndef BNORM_IO_IDX_H_
#define BNORM_IO_IDX_H_

#include <cstdint>
#include <string>
#include <vector>

#include "bnorm/status.h"

namespace bnorm::io {

// IDX magics of the files this reader accepts.
inline constexpr uint32_t kIdxImagesMagic = 0x00000803;  // uint8, rank 3: [count, rows, cols]
inline constexpr uint32_t kIdxLabelsMagic = 0x00000801;  // uint8, rank 1: [count]

// The largest payload (dimensions' product, in bytes) a reader accepts: 1 GiB, 20 times
// Fashion-MNIST's training images (47 MB) and above EMNIST's largest set (0.55 GB). A header
// announcing more is rejected before anything is allocated or decompressed; within the limit,
// memory grows only as the data arrives, and no more than the announced bytes are decompressed
// (then at most 1 MiB more, to report trailing data).
inline constexpr uint64_t kMaxIdxPayloadBytes = uint64_t{1} << 30;

// Where the Debian package dataset-fashion-mnist installs the four .gz files.
inline constexpr const char kDefaultFashionMnistDir[] = "/usr/share/datasets/fashion-mnist";

// Fashion-MNIST's training-set pixel statistics (of the pixels scaled to [0, 1]).
inline constexpr float kFashionMnistMean = 0.2860f;
inline constexpr float kFashionMnistStd = 0.3530f;

// Raw uint8 images as stored: count images of rows x cols, row-major.
struct IdxImages {
  int64_t count = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<uint8_t> pixels;  // count * rows * cols
};

// Reads an images file (magic 0x00000803, rank 3). Dimensions must be > 0 and their product at
// most kMaxIdxPayloadBytes; 28 x 28 is not required. Errors: missing/unreadable file, bad magic or rank, a zero dimension, a payload of
// another size ("expected N bytes, got M"; "trailing bytes"), a corrupt or truncated gzip stream.
Status read_idx_images(const std::string& path, IdxImages* out);

// Reads a labels file (magic 0x00000801, rank 1) and checks every label is in
// [0, num_classes): the error names the first bad index and its value. num_classes in [1, 256].
Status read_idx_labels(const std::string& path, std::vector<uint8_t>* out, int num_classes = 10);

// How pixels become floats: x = p / 255, then, if normalize, (x - mean) / std.
struct DataOptions {
  bool normalize = false;
  float mean = kFashionMnistMean;  // used only if normalize
  float std = kFashionMnistStd;    // used only if normalize; must be finite and > 0
  int num_classes = 10;
};

// A labelled image set in memory, ready for training.
struct Dataset {
  int64_t count = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<float> images;   // count * rows * cols floats, image i at i * image_size()
  std::vector<int32_t> labels;  // count labels in [0, num_classes)

  int64_t image_size() const { return rows * cols; }
};

// Reads an images file and a labels file into *out (converted per options). Also an error: the
// two files hold different counts.
Status load_idx_dataset(const std::string& images_path, const std::string& labels_path,
                        const DataOptions& options, Dataset* out);

// The path of the IDX file `base` (e.g. "train-images-idx3-ubyte") in dir: dir/base.gz if it
// exists, else dir/base. Error if neither exists: the message names both and says how to get the
// data (apt-get install dataset-fashion-mnist, or --data DIR).
Status find_idx_file(const std::string& dir, const std::string& base, std::string* path);

// Loads the standard four files of dir (train-images-idx3-ubyte, train-labels-idx1-ubyte,
// t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each optionally .gz). dir empty means
// kDefaultFashionMnistDir. *train and *test are written only if all four load.
Status load_fashion_mnist(const std::string& dir, const DataOptions& options, Dataset* train,
                          Dataset* test);

// Loads only the test set of dir (t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each
// optionally .gz): what evaluation needs, so a directory without the training files will do.
// dir empty means kDefaultFashionMnistDir. *test is written only if both load.
Status load_fashion_mnist_test(const std::string& dir, const DataOptions& options, Dataset* test);

// Copies the images and labels of the examples indices[0..count) into caller buffers of
// count * data.image_size() floats and count labels. Indices must be in [0, data.count): the
// caller's contract (checked only by assert).
void gather_batch(const Dataset& data, const int64_t* indices, int64_t count, float* images,
                  int32_t* labels);

// splitmix64 (Steele, Lea, Flood 2014): a small, fast, deterministic generator, the same on
// every platform, so a seed gives the same order everywhere.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next();
  // Uniform in [0, bound), bound >= 1, without modulo bias (rejection sampling).
  uint64_t uniform(uint64_t bound);

 private:
  uint64_t state_;
};

// The order of the examples in epoch `epoch` of a run seeded with seed: a uniformly random
// permutation of 0..n-1 (Fisher-Yates), a pure function of (seed, epoch, n), so epoch k can be
// recomputed without replaying epochs 0..k-1. n >= 0.
std::vector<int64_t> epoch_permutation(uint64_t seed, uint64_t epoch, int64_t n);

// Yields shuffled mini-batches epoch after epoch: each epoch visits every example once in the
// order epoch_permutation(seed, epoch, n); a batch never spans two epochs, so the last batch of
// an epoch may be smaller than batch_size unless drop_last (then each epoch yields
// floor(n / batch_size) full batches). Not thread-safe.
class BatchSampler {
 public:
  // Requires n >= 1 and 1 <= batch_size <= n.
  BatchSampler(int64_t n, int64_t batch_size, uint64_t seed, bool drop_last = true);

  // The indices of the next batch (valid until the next call) and the epoch it belongs to.
  const std::vector<int64_t>& next(int64_t* epoch = nullptr);
  // Number of the epoch the next batch will come from (0-based).
  int64_t epoch() const { return epoch_; }
  int64_t batches_per_epoch() const;

 private:
  int64_t n_;
  int64_t batch_size_;
  uint64_t seed_;
  bool drop_last_;
  int64_t epoch_ = 0;
  int64_t position_ = 0;
  std::vector<int64_t> order_;
  std::vector<int64_t> batch_;
};

}  // namespace bnorm::io

#endif  // BNORM_IO_IDX_H_
