#include "bnorm/io/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
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

struct TensorRecord {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;
  uint64_t end = 0;
};

struct FileContents {
  std::vector<TensorRecord> tensors;  // sorted by begin
  std::map<std::string, std::string> metadata;
  std::vector<uint8_t> data;  // the data region (empty if not read)
};

Status corrupt(const std::string& path, const std::string& problem) {
  return Status::invalid_argument("corrupt checkpoint " + path + ": " + problem);
}

// Reads and validates the header of path and, if read_data, the data region.
Status read_file(const std::string& path, bool read_data, FileContents* out) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    return Status::invalid_argument("checkpoint " + path + ": no such file");
  }
  if (std::filesystem::is_directory(path, ec)) {
    return Status::invalid_argument("checkpoint " + path + ": is a directory, not a file");
  }
  std::ifstream in(path, std::ios::binary);
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
  std::string header(header_len, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_len));
  if (!in) return corrupt(path, "cannot read the header");
  const uint64_t data_size = file_size - 8 - header_len;

  // Duplicate top-level keys would silently overwrite one another: catch them while parsing.
  std::set<std::string> keys;
  std::string duplicate;
  nlohmann::json::parser_callback_t on_event = [&](int depth, nlohmann::json::parse_event_t event,
                                                   nlohmann::json& parsed) {
    if (event == nlohmann::json::parse_event_t::key && depth == 1 && parsed.is_string()) {
      if (!keys.insert(parsed.get<std::string>()).second && duplicate.empty()) {
        duplicate = parsed.get<std::string>();
      }
    }
    return true;
  };
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(header, on_event);
  } catch (const nlohmann::json::exception& e) {
    return corrupt(path, std::string("header is not valid JSON: ") + e.what());
  }
  if (!json.is_object()) return corrupt(path, "header is not a JSON object");
  if (!duplicate.empty()) return corrupt(path, "tensor \"" + duplicate + "\" appears twice");

  FileContents contents;
  for (const auto& [name, value] : json.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) return corrupt(path, "__metadata__ is not an object");
      for (const auto& [key, v] : value.items()) {
        if (!v.is_string()) return corrupt(path, "__metadata__ value of \"" + key + "\" is not a string");
        contents.metadata[key] = v.get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor \"" + name + "\": ";
    if (!value.is_object()) return corrupt(path, where + "record is not an object");
    TensorRecord t;
    t.name = name;
    if (!value.contains("dtype") || !value["dtype"].is_string()) {
      return corrupt(path, where + "dtype missing or not a string");
    }
    t.dtype = value["dtype"].get<std::string>();
    const int esize = dtype_size(t.dtype);
    if (esize == 0) return corrupt(path, where + "unknown dtype \"" + t.dtype + "\"");
    if (!value.contains("shape") || !value["shape"].is_array()) {
      return corrupt(path, where + "shape missing or not an array");
    }
    for (const auto& d : value["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) {
        return corrupt(path, where + "shape " + value["shape"].dump() +
                                 " is not a list of non-negative integers");
      }
      t.shape.push_back(d.get<int64_t>());
    }
    const auto& off = value.contains("data_offsets") ? value["data_offsets"] : nlohmann::json();
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned()) {
      return corrupt(path, where + "data_offsets missing or not two non-negative integers");
    }
    t.begin = off[0].get<uint64_t>();
    t.end = off[1].get<uint64_t>();
    if (t.begin > t.end || t.end > data_size) {
      return corrupt(path, where + "data_offsets [" + std::to_string(t.begin) + ", " +
                               std::to_string(t.end) + "] outside the data region of " +
                               std::to_string(data_size) + " bytes");
    }
    uint64_t numel = 0;
    if (!checked_numel(t.shape, &numel) || numel > data_size ||
        numel * static_cast<uint64_t>(esize) != t.end - t.begin) {
      return corrupt(path, where + "data_offsets hold " + std::to_string(t.end - t.begin) +
                               " bytes, but " + t.dtype + " " + shape_string(t.shape) + " needs " +
                               (checked_numel(t.shape, &numel)
                                    ? std::to_string(numel) + " x " + std::to_string(esize)
                                    : std::string("too many")));
    }
    contents.tensors.push_back(std::move(t));
  }
  std::sort(contents.tensors.begin(), contents.tensors.end(),
            [](const TensorRecord& a, const TensorRecord& b) {
              return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
            });
  uint64_t covered = 0;
  const TensorRecord* previous = nullptr;
  for (const TensorRecord& t : contents.tensors) {
    if (t.begin < covered) {
      return corrupt(path, "tensors \"" + previous->name + "\" and \"" + t.name +
                               "\" overlap in the data region");
    }
    if (t.begin > covered) {
      return corrupt(path, "unused bytes [" + std::to_string(covered) + ", " +
                               std::to_string(t.begin) + ") before tensor \"" + t.name + "\"");
    }
    covered = t.end;
    if (t.end > t.begin) previous = &t;
  }
  if (covered != data_size) {
    return corrupt(path, std::to_string(data_size - covered) +
                             " bytes after the last tensor in the data region");
  }
  if (read_data) {
    contents.data.resize(data_size);
    in.read(reinterpret_cast<char*>(contents.data.data()), static_cast<std::streamsize>(data_size));
    if (!in) return corrupt(path, "cannot read the data region");
  }
  *out = std::move(contents);
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
  FileContents file;
  BNORM_RETURN_IF_ERROR(read_file(path, /*read_data=*/true, &file));

  std::map<std::string, const TensorRecord*> by_name;
  for (const TensorRecord& t : file.tensors) by_name[t.name] = &t;
  std::set<std::string> wanted;
  for (const nn::StateEntry& e : into) wanted.insert(e.name);

  std::vector<std::string> missing, unexpected;
  for (const nn::StateEntry& e : into) {
    if (by_name.count(e.name) == 0 &&
        !(options.allow_missing_num_batches_tracked && is_counter_name(e.name) &&
          e.dtype == nn::DType::kI64 && e.numel() == 1)) {
      missing.push_back(e.name);
    }
  }
  for (const TensorRecord& t : file.tensors) {
    if (wanted.count(t.name) == 0) unexpected.push_back(t.name);
  }
  if (!missing.empty() || !unexpected.empty()) {
    std::string msg = "checkpoint " + path + " does not match the model:";
    if (!missing.empty()) msg += " missing tensors: " + name_list(missing);
    if (!missing.empty() && !unexpected.empty()) msg += ";";
    if (!unexpected.empty()) msg += " unexpected tensors: " + name_list(unexpected);
    return Status::invalid_argument(msg);
  }

  // Stage every destination's new bytes; copy only when all have passed.
  std::vector<std::vector<uint8_t>> staged(into.size());
  for (size_t i = 0; i < into.size(); ++i) {
    const nn::StateEntry& e = into[i];
    auto it = by_name.find(e.name);
    if (it == by_name.end()) {  // an absent counter: 0
      staged[i].assign(sizeof(int64_t), 0);
      continue;
    }
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
    const uint8_t* src = file.data.data() + t.begin;
    if (f64_ok && t.dtype == "F64") {
      const int64_t n = e.numel();
      staged[i].resize(static_cast<size_t>(n) * sizeof(float));
      for (int64_t k = 0; k < n; ++k) {
        double v;
        std::memcpy(&v, src + 8 * k, 8);
        const float f = static_cast<float>(v);
        std::memcpy(staged[i].data() + 4 * k, &f, 4);
      }
    } else {
      staged[i].assign(src, src + (t.end - t.begin));
    }
  }
  for (size_t i = 0; i < into.size(); ++i) {
    if (!staged[i].empty()) std::memcpy(into[i].data, staged[i].data(), staged[i].size());
  }
  if (metadata != nullptr) *metadata = std::move(file.metadata);
  return Status();
}

Status read_safetensors(const std::string& path, std::vector<OwnedTensor>* tensors,
                        std::map<std::string, std::string>* metadata) {
  if (tensors == nullptr) return Status::invalid_argument("read_safetensors: tensors is null");
  FileContents file;
  BNORM_RETURN_IF_ERROR(read_file(path, /*read_data=*/true, &file));
  std::vector<OwnedTensor> out;
  out.reserve(file.tensors.size());
  for (const TensorRecord& t : file.tensors) {
    OwnedTensor o;
    o.name = t.name;
    o.dtype = t.dtype;
    o.shape = t.shape;
    o.bytes.assign(file.data.begin() + static_cast<ptrdiff_t>(t.begin),
                   file.data.begin() + static_cast<ptrdiff_t>(t.end));
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
  FileContents file;
  BNORM_RETURN_IF_ERROR(read_file(path, /*read_data=*/false, &file));
  *metadata = std::move(file.metadata);
  return Status();
}

namespace testing {
void set_save_failure_after_bytes(int64_t bytes) { g_fail_after_bytes.store(bytes); }
}  // namespace testing

}  // namespace bnorm::io
