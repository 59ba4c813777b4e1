#include "bnorm/io/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <utility>

#include <nlohmann/json.hpp>

namespace bnorm::io {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; this code copies it as it is");

namespace {

std::atomic<int64_t> g_fail_after_bytes{-1};

// Bytes per element of the dtypes of the format; 0 for an unknown name.
int dtype_size(const std::string& dtype) {
  static const std::pair<const char*, int> kSizes[] = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4},
      {"I16", 2}, {"I8", 1},  {"U64", 8}, {"U32", 4},  {"U16", 2}, {"U8", 1},
      {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}};
  for (const auto& [name, size] : kSizes) {
    if (dtype == name) return size;
  }
  return 0;
}

const char* dtype_name(nn::DType dtype) {
  switch (dtype) {
    case nn::DType::kF32:
      return "F32";
    case nn::DType::kI64:
      return "I64";
  }
  return "?";
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

std::string name_list(const std::vector<std::string>& names) {
  constexpr size_t kShown = 8;
  std::string s;
  for (size_t i = 0; i < names.size() && i < kShown; ++i) {
    if (i > 0) s += ", ";
    s += names[i];
  }
  if (names.size() > kShown) s += ", ... (" + std::to_string(names.size() - kShown) + " more)";
  return s;
}

bool is_counter_name(const std::string& name) {
  static const std::string kCounter = "num_batches_tracked";
  return name == kCounter ||
         (name.size() > kCounter.size() && name.ends_with("." + kCounter));
}

// numel of a shape, or false if it overflows (or a dimension is negative).
bool checked_numel(const std::vector<int64_t>& shape, uint64_t* numel) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (d != 0 && n > (uint64_t{1} << 62) / static_cast<uint64_t>(d)) return false;
    n *= static_cast<uint64_t>(d);
  }
  *numel = n;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Reading
//
// The header is parsed by a SAX handler that keeps only what the format defines (the tensor
// records and "__metadata__") and stops at the first problem: no JSON tree is built, so memory
// stays within a small multiple of the header's bytes, time is linear in them, and nothing is
// recursive. Values nested deeper than kMaxHeaderDepth are rejected; messages quote at most
// kShownChars characters of any name or value the file holds.

constexpr int kMaxHeaderDepth = 64;
constexpr size_t kMaxRank = 64;
constexpr size_t kShownChars = 80;

// s for a one-line message: control characters escaped, cut to kShownChars (at a UTF-8
// boundary) with "..." and the full length.
std::string shown(std::string_view s, size_t limit = kShownChars) {
  std::string out;
  size_t n = std::min(s.size(), limit);
  while (n < s.size() && n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  if (n < s.size()) out += "... (" + std::to_string(s.size()) + " bytes)";
  return out;
}

std::string quote_name(const std::string& s) {
  // Built by appending: GCC 12 warns falsely (-Wrestrict) on "\"" + std::string&&.
  std::string q(1, '"');
  q += shown(s);
  q += '"';
  return q;
}

struct TensorRecord {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;
  uint64_t end = 0;
};

struct Header {
  std::vector<TensorRecord> tensors;  // sorted by begin
  std::map<std::string, std::string> metadata;
  uint64_t data_size = 0;
};

// The SAX handler (nlohmann::json::sax_parse's interface). Each callback returns false to stop
// the parse, with error set.
class HeaderHandler {
 public:
  using json = nlohmann::json;
  explicit HeaderHandler(uint64_t data_size) : data_size_(data_size) {}

  std::string error;
  std::vector<TensorRecord> tensors;
  std::map<std::string, std::string> metadata;

  bool null() { return scalar("null"); }
  bool boolean(bool v) { return scalar(v ? "true" : "false"); }
  bool number_integer(json::number_integer_t v) {
    if (skip_depth_ > 0) return true;
    if (state_ == State::kShape) return shape_element(v >= 0, std::to_string(v), v);
    return scalar(std::to_string(v));
  }
  bool number_unsigned(json::number_unsigned_t v) {
    if (skip_depth_ > 0) return true;
    if (state_ == State::kShape) {
      return shape_element(v <= static_cast<uint64_t>(INT64_MAX), std::to_string(v),
                           static_cast<int64_t>(v));
    }
    if (state_ == State::kOffsets) {
      if (offsets_ < 2) offset_[offsets_] = v;
      ++offsets_;
      return true;
    }
    return scalar(std::to_string(v));
  }
  bool number_float(json::number_float_t, const std::string& text) { return scalar(text); }
  bool string(std::string& v) {
    if (skip_depth_ == 0) {
      if (state_ == State::kDtype) {
        record_.dtype = std::move(v);
        have_dtype_ = true;
        state_ = State::kRecord;
        return true;
      }
      if (state_ == State::kMetaValue) {
        metadata[meta_key_] = std::move(v);
        state_ = State::kMetadata;
        return true;
      }
    }
    return scalar(quote_name(v));
  }
  bool binary(json::binary_t&) { return scalar("binary"); }

  bool start_object(std::size_t) { return open('{'); }
  bool end_object() { return close('}'); }
  bool start_array(std::size_t) { return open('['); }
  bool end_array() { return close(']'); }

  bool key(std::string& k) {
    if (skip_depth_ > 0) return true;
    switch (state_) {
      case State::kTop:
        if (k == "__metadata__") {
          if (seen_metadata_) return fail("\"__metadata__\" appears twice");
          seen_metadata_ = true;
          state_ = State::kMetadataValue;
        } else {
          record_ = TensorRecord();
          record_.name = std::move(k);
          have_dtype_ = have_shape_ = have_offsets_ = false;
          state_ = State::kRecordValue;
        }
        return true;
      case State::kMetadata:
        meta_key_ = std::move(k);
        state_ = State::kMetaValue;
        return true;
      case State::kRecord: {
        bool* seen = k == "dtype" ? &have_dtype_ : k == "shape" ? &have_shape_
                     : k == "data_offsets" ? &have_offsets_ : nullptr;
        if (seen != nullptr && *seen) return fail(where() + quote_name(k) + " appears twice");
        state_ = k == "dtype" ? State::kDtype : k == "shape" ? State::kShapeValue
                 : k == "data_offsets" ? State::kOffsetsValue : State::kSkipValue;
        if (seen != nullptr) *seen = true;
        return true;
      }
      default:
        return fail("unexpected key " + quote_name(k));
    }
  }

  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& e) {
    // nlohmann's message quotes the last token, which may be most of the header: cut it.
    // nlohmann's message: "[json.exception...] parse error at line L, column C: <problem>;
    // last read: '<token>'". The byte position replaces the line and column; the token, which
    // may be most of the header, is cut short.
    // Views into the exception's own message (no copy of a header-sized token).
    std::string_view what = e.what();
    if (const size_t column = what.find("column "); column != std::string_view::npos) {
      if (const size_t colon = what.find(": ", column); colon != std::string_view::npos) {
        what.remove_prefix(colon + 2);
      }
    }
    std::string_view token;
    if (const size_t last = what.find("; last read: "); last != std::string_view::npos) {
      token = what.substr(last + 13);
      what = what.substr(0, last);
    }
    error = "header is not valid JSON at byte " + std::to_string(position) + ": " +
            shown(what, 2 * kShownChars);
    if (!token.empty()) error += "; last read: " + shown(token, kShownChars / 2);
    return false;
  }

  bool finished_ok() const { return error.empty(); }

 private:
  enum class State {
    kStart, kTop, kDone,
    kMetadataValue, kMetadata, kMetaValue,
    kRecordValue, kRecord, kDtype, kShapeValue, kShape, kOffsetsValue, kOffsets, kSkipValue
  };

  bool fail(const std::string& e) {
    if (error.empty()) error = e;
    return false;
  }
  std::string where() const { return "tensor " + quote_name(record_.name) + ": "; }

  // A value that is not a structure, in any state: right only where skipped.
  bool scalar(const std::string& text) {
    if (skip_depth_ > 0) return true;
    switch (state_) {
      case State::kStart: return fail("header is not a JSON object");
      case State::kMetadataValue: return fail("__metadata__ is not an object");
      case State::kMetaValue:
        return fail("__metadata__ value of " + quote_name(meta_key_) + " is not a string");
      case State::kRecordValue: return fail(where() + "record is not an object");
      case State::kDtype: return fail(where() + "dtype missing or not a string");
      case State::kShapeValue: return fail(where() + "shape missing or not an array");
      case State::kShape: return shape_element(false, text, 0);
      case State::kOffsetsValue:
      case State::kOffsets:
        return fail(where() + "data_offsets missing or not two non-negative integers");
      case State::kSkipValue: state_ = State::kRecord; return true;
      default: return fail("unexpected value " + shown(text));
    }
  }

  bool shape_element(bool ok, const std::string& text, int64_t v) {
    if (!shape_text_.empty() && shape_text_.back() != '[') shape_text_ += ", ";
    if (shape_text_.size() < kShownChars) shape_text_ += text;
    if (!ok) shape_bad_ = true;
    if (ok && !shape_bad_) {
      if (record_.shape.size() == kMaxRank) {
        return fail(where() + "shape has more than " + std::to_string(kMaxRank) + " dimensions");
      }
      record_.shape.push_back(v);
    }
    return true;
  }

  bool open(char bracket) {
    if (++depth_ > kMaxHeaderDepth) {
      return fail("header nests deeper than " + std::to_string(kMaxHeaderDepth) + " levels");
    }
    if (skip_depth_ > 0) {
      ++skip_depth_;
      return true;
    }
    const bool object = bracket == '{';
    switch (state_) {
      case State::kStart:
        if (!object) return fail("header is not a JSON object");
        state_ = State::kTop;
        return true;
      case State::kMetadataValue:
        if (!object) return fail("__metadata__ is not an object");
        state_ = State::kMetadata;
        return true;
      case State::kRecordValue:
        if (!object) return fail(where() + "record is not an object");
        state_ = State::kRecord;
        return true;
      case State::kShapeValue:
        if (object) return fail(where() + "shape missing or not an array");
        state_ = State::kShape;
        shape_text_ = "[";
        shape_bad_ = false;
        return true;
      case State::kOffsetsValue:
        if (object) return fail(where() + "data_offsets missing or not two non-negative integers");
        state_ = State::kOffsets;
        offsets_ = 0;
        return true;
      case State::kShape:  // a nested value: shown as [...] and skipped
        shape_element(false, object ? "{...}" : "[...]", 0);
        skip_depth_ = 1;
        return true;
      case State::kSkipValue:
        skip_depth_ = 1;
        return true;
      default:
        return scalar(object ? "{...}" : "[...]");
    }
  }

  bool close(char bracket) {
    --depth_;
    if (skip_depth_ > 0) {
      if (--skip_depth_ == 0 && state_ == State::kSkipValue) state_ = State::kRecord;
      return true;
    }
    (void)bracket;
    switch (state_) {
      case State::kTop: state_ = State::kDone; return true;
      case State::kMetadata: state_ = State::kTop; return true;
      case State::kShape:
        if (shape_bad_) {
          return fail(where() + "shape " + shape_text_ +
                      (shape_text_.size() >= kShownChars ? " ...]" : "]") +
                      " is not a list of non-negative integers");
        }
        state_ = State::kRecord;
        return true;
      case State::kOffsets:
        if (offsets_ != 2) {
          return fail(where() + "data_offsets missing or not two non-negative integers");
        }
        record_.begin = offset_[0];
        record_.end = offset_[1];
        state_ = State::kRecord;
        return true;
      case State::kRecord:
        if (!finish_record()) return false;
        state_ = State::kTop;
        return true;
      default: return fail("unexpected end of a value");
    }
  }

  bool finish_record() {
    if (!have_dtype_) return fail(where() + "dtype missing or not a string");
    const int esize = dtype_size(record_.dtype);
    if (esize == 0) return fail(where() + "unknown dtype " + quote_name(record_.dtype));
    if (!have_shape_) return fail(where() + "shape missing or not an array");
    if (!have_offsets_) {
      return fail(where() + "data_offsets missing or not two non-negative integers");
    }
    const TensorRecord& t = record_;
    if (t.begin > t.end || t.end > data_size_) {
      return fail(where() + "data_offsets [" + std::to_string(t.begin) + ", " +
                  std::to_string(t.end) + "] outside the data region of " +
                  std::to_string(data_size_) + " bytes");
    }
    uint64_t numel = 0;
    const bool fits = checked_numel(t.shape, &numel);
    if (!fits || numel > data_size_ || numel * static_cast<uint64_t>(esize) != t.end - t.begin) {
      return fail(where() + "data_offsets hold " + std::to_string(t.end - t.begin) +
                  " bytes, but " + t.dtype + " " + shape_string(t.shape) + " needs " +
                  (fits ? std::to_string(numel) + " x " + std::to_string(esize)
                        : std::string("too many")));
    }
    tensors.push_back(std::move(record_));
    return true;
  }

  uint64_t data_size_;
  State state_ = State::kStart;
  int depth_ = 0;
  int skip_depth_ = 0;  // > 0 while inside a value that is skipped (an unknown record field)
  bool seen_metadata_ = false;
  std::string meta_key_;
  TensorRecord record_;
  bool have_dtype_ = false, have_shape_ = false, have_offsets_ = false;
  std::string shape_text_;
  bool shape_bad_ = false;
  int offsets_ = 0;
  uint64_t offset_[2] = {0, 0};
};

Status corrupt(const std::string& path, const std::string& problem) {
  return Status::invalid_argument("corrupt checkpoint " + path + ": " + problem);
}

// Opens path, reads and validates its header; `in` is left at the start of the data region.
Status read_header(const std::string& path, std::ifstream& in, Header* out) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    return Status::invalid_argument("checkpoint " + path + ": no such file");
  }
  if (std::filesystem::is_directory(path, ec)) {
    return Status::invalid_argument("checkpoint " + path + ": is a directory, not a file");
  }
  in.open(path, std::ios::binary);
  if (!in) {
    return Status::invalid_argument("checkpoint " + path + ": cannot open: " +
                                    std::strerror(errno));
  }
  in.seekg(0, std::ios::end);
  const uint64_t file_size = static_cast<uint64_t>(in.tellg());
  in.seekg(0, std::ios::beg);
  if (file_size < 8) {
    return corrupt(path, "file has " + std::to_string(file_size) +
                             " bytes, too short for the 8-byte header length");
  }
  uint8_t len_bytes[8];
  in.read(reinterpret_cast<char*>(len_bytes), 8);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  if (header_len < 2 || header_len > kMaxSafetensorsHeaderBytes || header_len > file_size - 8) {
    return corrupt(path, "header length " + std::to_string(header_len) +
                             " is not in [2, min(file size - 8 = " + std::to_string(file_size - 8) +
                             ", " + std::to_string(kMaxSafetensorsHeaderBytes) + ")]");
  }
  // Checked against the file's size above: these bytes are really there.
  std::string text(header_len, '\0');
  in.read(text.data(), static_cast<std::streamsize>(header_len));
  if (!in) return corrupt(path, "cannot read the header");
  const uint64_t data_size = file_size - 8 - header_len;

  HeaderHandler handler(data_size);
  bool parsed = false;
  try {
    parsed = nlohmann::json::sax_parse(text, &handler);
  } catch (const std::exception& e) {  // e.g. out of memory
    return corrupt(path, std::string("cannot parse the header: ") + shown(e.what()));
  }
  if (!parsed || !handler.finished_ok()) {
    return corrupt(path, handler.error.empty() ? "header is not valid JSON" : handler.error);
  }
  text = std::string();

  Header h;
  h.tensors = std::move(handler.tensors);
  h.metadata = std::move(handler.metadata);
  h.data_size = data_size;
  // Duplicate names would make one record shadow another: sorted by name, they are neighbours.
  {
    std::vector<const TensorRecord*> by_name(h.tensors.size());
    for (size_t i = 0; i < h.tensors.size(); ++i) by_name[i] = &h.tensors[i];
    std::sort(by_name.begin(), by_name.end(),
              [](const TensorRecord* a, const TensorRecord* b) { return a->name < b->name; });
    for (size_t i = 1; i < by_name.size(); ++i) {
      if (by_name[i]->name == by_name[i - 1]->name) {
        return corrupt(path, "tensor " + quote_name(by_name[i]->name) + " appears twice");
      }
    }
  }
  std::sort(h.tensors.begin(), h.tensors.end(), [](const TensorRecord& a, const TensorRecord& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t covered = 0;
  const TensorRecord* previous = nullptr;
  for (const TensorRecord& t : h.tensors) {
    if (t.begin < covered) {
      return corrupt(path, "tensors " + quote_name(previous->name) + " and " + quote_name(t.name) +
                               " overlap in the data region");
    }
    if (t.begin > covered) {
      return corrupt(path, "unused bytes [" + std::to_string(covered) + ", " +
                               std::to_string(t.begin) + ") before tensor " + quote_name(t.name));
    }
    covered = t.end;
    if (t.end > t.begin) previous = &t;
  }
  if (covered != data_size) {
    return corrupt(path, std::to_string(data_size - covered) +
                             " bytes after the last tensor in the data region");
  }
  *out = std::move(h);
  return Status();
}

// ---------------------------------------------------------------------------------------------
// Writing

Status validate_entries(const std::vector<nn::StateEntry>& entries, const char* what) {
  std::set<std::string> names;
  for (const nn::StateEntry& e : entries) {
    if (e.name.empty() || e.name == "__metadata__") {
      return Status::invalid_argument(std::string(what) + ": invalid tensor name \"" + e.name + "\"");
    }
    if (!names.insert(e.name).second) {
      return Status::invalid_argument(std::string(what) + ": tensor \"" + e.name + "\" appears twice");
    }
    if (e.dtype != nn::DType::kF32 && e.dtype != nn::DType::kI64) {
      return Status::invalid_argument(std::string(what) + ": tensor \"" + e.name +
                                      "\" has an unknown dtype " +
                                      std::to_string(static_cast<int>(e.dtype)));
    }
    uint64_t numel = 0;
    if (!checked_numel(e.shape, &numel)) {
      return Status::invalid_argument(std::string(what) + ": tensor \"" + e.name +
                                      "\" has an invalid shape " + shape_string(e.shape));
    }
    if (numel > 0 && e.data == nullptr) {
      return Status::invalid_argument(std::string(what) + ": tensor \"" + e.name + "\" has null data");
    }
  }
  return Status();
}

uint64_t entry_bytes(const nn::StateEntry& e) {
  return static_cast<uint64_t>(e.numel()) * (e.dtype == nn::DType::kF32 ? 4 : 8);
}

// Writes all of [p, p + n) to fd, honouring the test hook.
bool write_all(int fd, const uint8_t* p, uint64_t n, uint64_t* written) {
  while (n > 0) {
    size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, uint64_t{1} << 24));
    const int64_t limit = g_fail_after_bytes.load();
    if (limit >= 0) {
      if (*written >= static_cast<uint64_t>(limit)) {
        errno = ENOSPC;
        return false;
      }
      chunk = static_cast<size_t>(std::min<uint64_t>(chunk, static_cast<uint64_t>(limit) - *written));
    }
    const ssize_t r = ::write(fd, p, chunk);
    if (r < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += r;
    n -= static_cast<uint64_t>(r);
    *written += static_cast<uint64_t>(r);
  }
  return true;
}

}  // namespace

Status save_safetensors(const std::string& path, const std::vector<nn::StateEntry>& entries,
                        const std::map<std::string, std::string>& metadata) {
  namespace fs = std::filesystem;
  BNORM_RETURN_IF_ERROR(validate_entries(entries, ("save " + path).c_str()));
  if (path.empty()) return Status::invalid_argument("save checkpoint: path is empty");

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = std::move(meta);
  }
  uint64_t offset = 0;
  for (const nn::StateEntry& e : entries) {
    const uint64_t bytes = entry_bytes(e);
    header[e.name] = {{"dtype", dtype_name(e.dtype)},
                      {"shape", e.shape},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data then starts 8-byte aligned
  uint8_t len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<uint8_t>(uint64_t{text.size()} >> (8 * i));

  // The temporary file lives in the destination's directory so that rename() is atomic.
  const fs::path dest(path);
  const fs::path dir = dest.has_parent_path() ? dest.parent_path() : fs::path(".");
  std::random_device random;
  std::string tmp;
  int fd = -1;
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    // Built by appending: GCC 12 warns falsely (-Wrestrict) on "." + std::string&&.
    std::string name(1, '.');
    name += dest.filename().string();
    name += ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(random());
    tmp = (dir / name).string();
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0) {
    return Status::invalid_argument("cannot write checkpoint " + path + ": cannot create a file in " +
                                    dir.string() + ": " + std::strerror(errno));
  }
  auto fail = [&](const std::string& step) {
    const int err = errno;
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    return Status::invalid_argument("cannot write checkpoint " + path + ": " + step + ": " +
                                    std::strerror(err));
  };
  uint64_t written = 0;
  if (!write_all(fd, len_bytes, 8, &written) ||
      !write_all(fd, reinterpret_cast<const uint8_t*>(text.data()), text.size(), &written)) {
    return fail("write");
  }
  for (const nn::StateEntry& e : entries) {
    if (!write_all(fd, static_cast<const uint8_t*>(e.data), entry_bytes(e), &written)) {
      return fail("write");
    }
  }
  if (::fsync(fd) != 0) return fail("fsync");
  const int closed = ::close(fd);
  fd = -1;
  if (closed != 0) return fail("close");
  if (::rename(tmp.c_str(), path.c_str()) != 0) return fail("rename");
  // Make the rename itself durable; a failure here cannot undo it, so it is not an error.
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
  return Status();
}

Status load_safetensors(const std::string& path, const std::vector<nn::StateEntry>& into,
                        const LoadOptions& options, std::map<std::string, std::string>* metadata) {
  BNORM_RETURN_IF_ERROR(validate_entries(into, ("load " + path).c_str()));
  std::ifstream in;
  Header file;
  BNORM_RETURN_IF_ERROR(read_header(path, in, &file));

  std::map<std::string, const TensorRecord*> by_name;
  for (const TensorRecord& t : file.tensors) by_name[t.name] = &t;
  std::set<std::string> wanted;
  for (const nn::StateEntry& e : into) wanted.insert(e.name);

  std::vector<std::string> missing, unexpected;
  for (const nn::StateEntry& e : into) {
    if (by_name.count(e.name) == 0 &&
        !(options.allow_missing_num_batches_tracked && is_counter_name(e.name) &&
          e.dtype == nn::DType::kI64 && e.numel() == 1)) {
      missing.push_back(shown(e.name));
    }
  }
  for (const TensorRecord& t : file.tensors) {
    if (wanted.count(t.name) == 0) unexpected.push_back(shown(t.name));
  }
  if (!missing.empty() || !unexpected.empty()) {
    std::string msg = "checkpoint " + path + " does not match the model:";
    if (!missing.empty()) msg += " missing tensors: " + name_list(missing);
    if (!missing.empty() && !unexpected.empty()) msg += ";";
    if (!unexpected.empty()) msg += " unexpected tensors: " + name_list(unexpected);
    return Status::invalid_argument(msg);
  }
  // Every check on names, dtypes and shapes before a byte of data is read.
  for (const nn::StateEntry& e : into) {
    auto it = by_name.find(e.name);
    if (it == by_name.end()) continue;
    const TensorRecord& t = *it->second;
    const std::string want = dtype_name(e.dtype);
    const bool f64_ok = options.allow_f64_to_f32 && e.dtype == nn::DType::kF32 && t.dtype == "F64";
    if (t.dtype != want && !f64_ok) {
      return Status::invalid_argument("checkpoint " + path + ": tensor \"" + e.name + "\" is " +
                                      t.dtype + ", the model expects " + want);
    }
    if (t.shape != e.shape) {
      return Status::invalid_argument("checkpoint " + path + ": tensor \"" + e.name +
                                      "\" has shape " + shape_string(t.shape) +
                                      ", the model expects " + shape_string(e.shape));
    }
  }
  // One copy of the data region, the staging buffer: the destinations are written only once it
  // has been read in full (every byte of it belongs to a tensor of the model).
  std::vector<uint8_t> data(file.data_size);
  in.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(data.size()));
  if (!in) return corrupt(path, "cannot read the data region");
  for (const nn::StateEntry& e : into) {
    auto it = by_name.find(e.name);
    if (it == by_name.end()) {  // an absent counter: 0
      const int64_t zero = 0;
      std::memcpy(e.data, &zero, sizeof zero);
      continue;
    }
    const TensorRecord& t = *it->second;
    const uint8_t* src = data.data() + t.begin;
    if (t.dtype == "F64" && e.dtype == nn::DType::kF32) {
      const int64_t n = e.numel();
      auto* dst = static_cast<uint8_t*>(e.data);
      for (int64_t k = 0; k < n; ++k) {
        double v;
        std::memcpy(&v, src + 8 * k, 8);
        const float f = static_cast<float>(v);
        std::memcpy(dst + 4 * k, &f, 4);
      }
    } else if (t.end > t.begin) {
      std::memcpy(e.data, src, t.end - t.begin);
    }
  }
  if (metadata != nullptr) *metadata = std::move(file.metadata);
  return Status();
}

Status read_safetensors(const std::string& path, std::vector<OwnedTensor>* tensors,
                        std::map<std::string, std::string>* metadata) {
  if (tensors == nullptr) return Status::invalid_argument("read_safetensors: tensors is null");
  std::ifstream in;
  Header file;
  BNORM_RETURN_IF_ERROR(read_header(path, in, &file));
  // The records are in offset order and cover the data region: read each into its own bytes.
  std::vector<OwnedTensor> out;
  out.reserve(file.tensors.size());
  for (TensorRecord& t : file.tensors) {
    OwnedTensor o;
    o.name = std::move(t.name);
    o.dtype = std::move(t.dtype);
    o.shape = std::move(t.shape);
    o.bytes.resize(t.end - t.begin);
    in.read(reinterpret_cast<char*>(o.bytes.data()), static_cast<std::streamsize>(o.bytes.size()));
    if (!in) return corrupt(path, "cannot read the data region");
    out.push_back(std::move(o));
  }
  *tensors = std::move(out);
  if (metadata != nullptr) *metadata = std::move(file.metadata);
  return Status();
}

Status read_safetensors_metadata(const std::string& path,
                                 std::map<std::string, std::string>* metadata) {
  if (metadata == nullptr) {
    return Status::invalid_argument("read_safetensors_metadata: metadata is null");
  }
  std::ifstream in;
  Header file;
  BNORM_RETURN_IF_ERROR(read_header(path, in, &file));
  *metadata = std::move(file.metadata);
  return Status();
}

namespace testing {
void set_save_failure_after_bytes(int64_t bytes) { g_fail_after_bytes.store(bytes); }
}  // namespace testing

}  // namespace bnorm::io
