#include "bnorm/io/idx.h"

#include <zlib.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <system_error>
#include <utility>

namespace bnorm::io {
namespace {

// Trailing data after the payload is counted up to this many bytes, no further: a long (or
// endlessly compressible) tail costs no more time than this.
constexpr uint64_t kMaxTrailingScan = uint64_t{1} << 20;
// The most a deflate stream expands (258-byte matches coded in 2 bits, zlib's FAQ: 1032:1).
constexpr uint64_t kMaxDeflateRatio = 1032;
// gzread takes an unsigned int length: read in chunks well below that.
constexpr size_t kChunkBytes = size_t{1} << 20;

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

Status file_error(const std::string& path, const std::string& problem) {
  return Status::invalid_argument(path + ": " + problem);
}

// A gzip (or plain) file open for reading; closes itself.
class GzFile {
 public:
  GzFile() = default;
  GzFile(const GzFile&) = delete;
  GzFile& operator=(const GzFile&) = delete;
  ~GzFile() {
    if (file_ != nullptr) gzclose(file_);
  }

  Status open(const std::string& path) {
    path_ = path;
    std::error_code ec;
    auto status = std::filesystem::status(path, ec);
    if (ec || !std::filesystem::exists(status)) return file_error(path, "no such file");
    if (std::filesystem::is_directory(status)) return file_error(path, "is a directory, not a file");
    errno = 0;
    file_ = gzopen(path.c_str(), "rb");
    if (file_ == nullptr) {
      return file_error(path, std::string("cannot open: ") +
                                  (errno != 0 ? std::strerror(errno) : "out of memory"));
    }
    gzbuffer(file_, 1 << 17);
    return Status();
  }

  // Reads up to n bytes, fewer only at the end of the data; *got is the count read. A corrupt
  // or truncated gzip stream is an error naming the offset where it failed.
  Status read(uint8_t* dst, size_t n, size_t* got) {
    *got = 0;
    while (*got < n) {
      unsigned chunk = static_cast<unsigned>(std::min(n - *got, kChunkBytes));
      int r = gzread(file_, dst + *got, chunk);
      if (r < 0) return stream_error();
      if (r == 0) break;
      *got += static_cast<size_t>(r);
    }
    if (*got < n) {
      int errnum = Z_OK;
      gzerror(file_, &errnum);
      if (errnum != Z_OK) return stream_error();
    }
    return Status();
  }

  bool is_plain() const { return gzdirect(file_) == 1; }

 private:
  Status stream_error() {
    int errnum = Z_OK;
    std::string msg = gzerror(file_, &errnum);
    // zlib prefixes its message with the path, which ours already names.
    if (msg.starts_with(path_ + ": ")) msg = msg.substr(path_.size() + 2);
    std::string what = errnum == Z_BUF_ERROR ? "truncated gzip stream" : "corrupt gzip stream";
    return file_error(path_, what + " (" + msg + ") after " +
                                 std::to_string(gztell(file_)) + " decompressed bytes");
  }

  gzFile file_ = nullptr;
  std::string path_;
};

uint32_t big_endian32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

// Reads and validates an IDX uint8 file of the given magic; dims and payload on success.
Status read_idx(const std::string& path, uint32_t expected_magic, const char* what,
                std::vector<int64_t>* dims_out, std::vector<uint8_t>* payload_out) {
  const int expected_rank = static_cast<int>(expected_magic & 0xff);
  GzFile file;
  BNORM_RETURN_IF_ERROR(file.open(path));

  uint8_t head[4];
  size_t got = 0;
  BNORM_RETURN_IF_ERROR(file.read(head, 4, &got));
  if (got < 4) {
    return file_error(path, "too short for an IDX header (" + std::to_string(got) + " bytes)");
  }
  const uint32_t magic = big_endian32(head);
  if (magic != expected_magic) {
    std::string detail;
    if (head[0] != 0 || head[1] != 0) {
      detail = "not an IDX file";
    } else if (head[2] != 0x08) {
      detail = "element type " + hex32(head[2]).substr(8) + " is not uint8";
    } else {
      detail = "rank " + std::to_string(head[3]) + ", expected " + std::to_string(expected_rank);
    }
    return file_error(path, "bad magic " + hex32(magic) + ", expected " + hex32(expected_magic) +
                                " (IDX uint8 " + what + "): " + detail);
  }

  std::vector<uint8_t> raw_dims(static_cast<size_t>(4 * expected_rank));
  BNORM_RETURN_IF_ERROR(file.read(raw_dims.data(), raw_dims.size(), &got));
  if (got < raw_dims.size()) {
    return file_error(path, "truncated header: expected " + std::to_string(expected_rank) +
                                " dimensions of 4 bytes, got " + std::to_string(got) + " bytes");
  }
  std::vector<int64_t> dims;
  uint64_t payload_bytes = 1;
  for (int i = 0; i < expected_rank; ++i) {
    const uint32_t d = big_endian32(raw_dims.data() + 4 * i);
    if (d == 0) return file_error(path, "dimension " + std::to_string(i) + " is 0");
    dims.push_back(d);
    if (d > kMaxIdxPayloadBytes / payload_bytes) {  // checked before multiplying: cannot wrap
      std::string dims_text;
      for (int j = 0; j < expected_rank; ++j) {
        dims_text += (j > 0 ? " x " : "") + std::to_string(big_endian32(raw_dims.data() + 4 * j));
      }
      return file_error(path, "implausible size: the dimensions " + dims_text +
                                  " give more than the limit of " +
                                  std::to_string(kMaxIdxPayloadBytes) + " payload bytes");
    }
    payload_bytes *= d;
  }
  const uint64_t header_bytes = 4 + 4 * static_cast<uint64_t>(expected_rank);

  // A plain file: check its size against the header before reading the payload.
  if (file.is_plain()) {
    std::error_code ec;
    const uint64_t size = std::filesystem::file_size(path, ec);
    if (!ec) {
      const uint64_t have = size - header_bytes;
      if (have < payload_bytes) {
        return file_error(path, "truncated: expected " + std::to_string(payload_bytes) +
                                    " payload bytes, got " + std::to_string(have));
      }
      if (have > payload_bytes) {
        return file_error(path, std::to_string(have - payload_bytes) +
                                    " trailing bytes after the payload of " +
                                    std::to_string(payload_bytes) + " bytes");
      }
    }
  }

  // A gzip stream: deflate expands at most 1032:1 (zlib's documented limit), so a header that
  // announces more than the compressed file could hold is a truncated file, found without
  // decompressing anything.
  if (!file.is_plain()) {
    std::error_code ec;
    const uint64_t size = std::filesystem::file_size(path, ec);
    if (!ec && size < (uint64_t{1} << 40) && payload_bytes + header_bytes > kMaxDeflateRatio * size + 1024) {
      return file_error(path, "truncated: the header announces " + std::to_string(payload_bytes) +
                                  " payload bytes, more than a gzip file of " + std::to_string(size) +
                                  " bytes can hold (deflate expands at most " +
                                  std::to_string(kMaxDeflateRatio) + ":1)");
    }
  }

  // Grow the buffer as data arrives, so a header that lies about a short gzip stream costs
  // only the memory of the data really there; the capacity is reserved (address space, not
  // memory, until written) so the buffer is never copied. At most payload_bytes are read from
  // the stream, whatever it holds.
  std::vector<uint8_t> payload;
  payload.reserve(static_cast<size_t>(payload_bytes));
  size_t have = 0;
  while (have < payload_bytes) {
    // Chunks grow with the data read (1 MiB, then as much as is there): the zero-filled room
    // ahead of the data is never more than the data itself.
    const size_t want = static_cast<size_t>(
        std::min<uint64_t>(payload_bytes - have, std::max<uint64_t>(kChunkBytes, have)));
    payload.resize(have + want);
    if (Status s = file.read(payload.data() + have, want, &got); !s.ok()) {
      return Status::invalid_argument(s.message() + ", expected " + std::to_string(payload_bytes) +
                                      " payload bytes");
    }
    have += got;
    if (got < want) break;
  }
  if (have < payload_bytes) {
    return file_error(path, "truncated: expected " + std::to_string(payload_bytes) +
                                " payload bytes, got " + std::to_string(have));
  }
  // Anything after the payload means the header and the data disagree.
  uint8_t extra[4096];
  uint64_t trailing = 0;
  do {
    BNORM_RETURN_IF_ERROR(file.read(extra, sizeof extra, &got));
    trailing += got;
  } while (got == sizeof extra && trailing < kMaxTrailingScan);
  if (trailing > 0) {
    return file_error(path, (trailing >= kMaxTrailingScan ? "at least " : "") +
                                std::to_string(trailing) + " trailing bytes after the payload of " +
                                std::to_string(payload_bytes) + " bytes");
  }
  *dims_out = std::move(dims);
  *payload_out = std::move(payload);
  return Status();
}

}  // namespace

Status read_idx_images(const std::string& path, IdxImages* out) {
  if (out == nullptr) return Status::invalid_argument("read_idx_images: out is null");
  std::vector<int64_t> dims;
  std::vector<uint8_t> pixels;
  BNORM_RETURN_IF_ERROR(read_idx(path, kIdxImagesMagic, "images, rank 3", &dims, &pixels));
  out->count = dims[0];
  out->rows = dims[1];
  out->cols = dims[2];
  out->pixels = std::move(pixels);
  return Status();
}

Status read_idx_labels(const std::string& path, std::vector<uint8_t>* out, int num_classes) {
  if (out == nullptr) return Status::invalid_argument("read_idx_labels: out is null");
  if (num_classes < 1 || num_classes > 256) {
    return Status::invalid_argument("num_classes: must be in [1, 256], got " +
                                    std::to_string(num_classes));
  }
  std::vector<int64_t> dims;
  std::vector<uint8_t> labels;
  BNORM_RETURN_IF_ERROR(read_idx(path, kIdxLabelsMagic, "labels, rank 1", &dims, &labels));
  for (size_t i = 0; i < labels.size(); ++i) {
    if (labels[i] >= num_classes) {
      return file_error(path, "label " + std::to_string(i) + " is " + std::to_string(labels[i]) +
                                  ", expected 0.." + std::to_string(num_classes - 1));
    }
  }
  *out = std::move(labels);
  return Status();
}

Status load_idx_dataset(const std::string& images_path, const std::string& labels_path,
                        const DataOptions& options, Dataset* out) {
  if (out == nullptr) return Status::invalid_argument("load_idx_dataset: out is null");
  if (options.normalize &&
      !(std::isfinite(options.mean) && std::isfinite(options.std) && options.std > 0)) {
    return Status::invalid_argument("normalization: std must be finite and > 0 and mean finite, got mean " +
                                    std::to_string(options.mean) + " std " +
                                    std::to_string(options.std));
  }
  IdxImages images;
  BNORM_RETURN_IF_ERROR(read_idx_images(images_path, &images));
  std::vector<uint8_t> labels;
  BNORM_RETURN_IF_ERROR(read_idx_labels(labels_path, &labels, options.num_classes));
  if (static_cast<int64_t>(labels.size()) != images.count) {
    return Status::invalid_argument(images_path + " and " + labels_path + ": " +
                                    std::to_string(images.count) + " images but " +
                                    std::to_string(labels.size()) + " labels");
  }
  Dataset d;
  d.count = images.count;
  d.rows = images.rows;
  d.cols = images.cols;
  d.images.resize(images.pixels.size());
  const float mean = options.normalize ? options.mean : 0.0f;
  const float inv_std = options.normalize ? 1.0f / options.std : 1.0f;
  for (size_t i = 0; i < images.pixels.size(); ++i) {
    const float x = static_cast<float>(images.pixels[i]) / 255.0f;
    d.images[i] = options.normalize ? (x - mean) * inv_std : x;
  }
  d.labels.assign(labels.begin(), labels.end());
  *out = std::move(d);
  return Status();
}

Status find_idx_file(const std::string& dir, const std::string& base, std::string* path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path gz = fs::path(dir) / (base + ".gz");
  const fs::path plain = fs::path(dir) / base;
  if (fs::exists(gz, ec)) {
    *path = gz.string();
    return Status();
  }
  if (fs::exists(plain, ec)) {
    *path = plain.string();
    return Status();
  }
  std::string hint = dir == kDefaultFashionMnistDir
                         ? "install it with `apt-get install dataset-fashion-mnist` or pass --data DIR"
                         : "pass --data DIR with the four Fashion-MNIST IDX files, or install "
                           "dataset-fashion-mnist (files in " +
                               std::string(kDefaultFashionMnistDir) + ")";
  return Status::invalid_argument("Fashion-MNIST data not found: neither " + gz.string() +
                                  " nor " + plain.string() + " exists; " + hint);
}

Status load_fashion_mnist(const std::string& dir_in, const DataOptions& options, Dataset* train,
                          Dataset* test) {
  if (train == nullptr || test == nullptr) {
    return Status::invalid_argument("load_fashion_mnist: train and test must not be null");
  }
  const std::string dir = dir_in.empty() ? std::string(kDefaultFashionMnistDir) : dir_in;
  std::string paths[4];
  const char* bases[4] = {"train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"};
  for (int i = 0; i < 4; ++i) BNORM_RETURN_IF_ERROR(find_idx_file(dir, bases[i], &paths[i]));
  Dataset tr, te;
  BNORM_RETURN_IF_ERROR(load_idx_dataset(paths[0], paths[1], options, &tr));
  BNORM_RETURN_IF_ERROR(load_idx_dataset(paths[2], paths[3], options, &te));
  if (tr.rows != te.rows || tr.cols != te.cols) {
    return Status::invalid_argument(dir + ": training images are " + std::to_string(tr.rows) +
                                    "x" + std::to_string(tr.cols) + " but test images " +
                                    std::to_string(te.rows) + "x" + std::to_string(te.cols));
  }
  *train = std::move(tr);
  *test = std::move(te);
  return Status();
}

Status load_fashion_mnist_test(const std::string& dir_in, const DataOptions& options,
                               Dataset* test) {
  if (test == nullptr) return Status::invalid_argument("load_fashion_mnist_test: test is null");
  const std::string dir = dir_in.empty() ? std::string(kDefaultFashionMnistDir) : dir_in;
  std::string images, labels;
  BNORM_RETURN_IF_ERROR(find_idx_file(dir, "t10k-images-idx3-ubyte", &images));
  BNORM_RETURN_IF_ERROR(find_idx_file(dir, "t10k-labels-idx1-ubyte", &labels));
  return load_idx_dataset(images, labels, options, test);
}

void gather_batch(const Dataset& data, const int64_t* indices, int64_t count, float* images,
                  int32_t* labels) {
  const int64_t size = data.image_size();
  for (int64_t b = 0; b < count; ++b) {
    const int64_t i = indices[b];
    assert(i >= 0 && i < data.count);
    std::memcpy(images + b * size, data.images.data() + i * size, sizeof(float) * size);
    labels[b] = data.labels[i];
  }
}

uint64_t SplitMix64::next() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t SplitMix64::uniform(uint64_t bound) {
  assert(bound >= 1);
  // Reject the top partial copy of [0, bound) so every residue is equally likely.
  const uint64_t limit = std::numeric_limits<uint64_t>::max() -
                         std::numeric_limits<uint64_t>::max() % bound;
  uint64_t r;
  do {
    r = next();
  } while (r >= limit);
  return r % bound;
}

std::vector<int64_t> epoch_permutation(uint64_t seed, uint64_t epoch, int64_t n) {
  std::vector<int64_t> order(static_cast<size_t>(std::max<int64_t>(n, 0)));
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  // Decorrelate (seed, epoch) pairs: one splitmix step of the seed, mixed with the epoch.
  SplitMix64 mix(seed);
  SplitMix64 rng(mix.next() ^ (epoch * 0xd1b54a32d192ed03ULL + 0x2545f4914f6cdd1dULL));
  for (size_t i = order.size(); i > 1; --i) {
    const size_t j = static_cast<size_t>(rng.uniform(i));
    std::swap(order[i - 1], order[j]);
  }
  return order;
}

BatchSampler::BatchSampler(int64_t n, int64_t batch_size, uint64_t seed, bool drop_last)
    : n_(n), batch_size_(batch_size), seed_(seed), drop_last_(drop_last) {
  assert(n >= 1 && batch_size >= 1 && batch_size <= n);
  order_ = epoch_permutation(seed_, 0, n_);
}

int64_t BatchSampler::batches_per_epoch() const {
  return drop_last_ ? n_ / batch_size_ : (n_ + batch_size_ - 1) / batch_size_;
}

const std::vector<int64_t>& BatchSampler::next(int64_t* epoch) {
  const int64_t left = n_ - position_;
  if (left == 0 || (drop_last_ && left < batch_size_)) {
    ++epoch_;
    position_ = 0;
    order_ = epoch_permutation(seed_, static_cast<uint64_t>(epoch_), n_);
  }
  const int64_t take = std::min(batch_size_, n_ - position_);
  batch_.assign(order_.begin() + position_, order_.begin() + position_ + take);
  position_ += take;
  if (epoch != nullptr) *epoch = epoch_;
  return batch_;
}

}  // namespace bnorm::io
