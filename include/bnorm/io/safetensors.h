// Checkpoints in the safetensors format, by PyTorch's state_dict names.
//
// File layout (the format's specification): an 8-byte little-endian unsigned header length N,
// N bytes of UTF-8 JSON, then the data region. The JSON maps each tensor name to
//   {"dtype": "F32" | "I64" | ..., "shape": [d0, ...], "data_offsets": [begin, end]}
// (offsets in bytes, relative to the start of the data region, row-major little-endian data)
// and may hold "__metadata__": {string: string}. This writer pads the header with spaces to a
// multiple of 8 bytes and lays the tensors out in the order given, back to back.
//
// Saving is atomic: the file is written to a temporary file in the destination's directory,
// flushed to disk (fsync), then renamed over the destination. On any error the temporary file
// is removed and the destination is untouched: a reader never sees a half-written checkpoint.
//
// Loading is transactional: the header is validated, then the names, dtypes and shapes against
// the destination, then the data region is read into one staging buffer (the only copy of the
// data), and the destination tensors are written only when every check has passed. A failed
// load leaves the model bit-for-bit unchanged.
//
// Hostile files: the header is parsed as a stream (no JSON tree), in time linear in its bytes
// and memory of at most about 3 times them plus the records; values nested deeper than 64
// levels and shapes of more than 64 dimensions are rejected; messages quote at most 80
// characters of any name or value of the file, with control characters escaped.
//
// Thread safety: the functions are reentrant. The test hook below is a process-wide setting.
// Requires a little-endian host (checked at compile time).
#ifndef BNORM_IO_SAFETENSORS_H_
#define BNORM_IO_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "bnorm/nn/state.h"
#include "bnorm/status.h"

namespace bnorm::io {

// Headers longer than this are rejected as corrupt (the reference implementation's limit).
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100u << 20;

// Writes entries (kF32 or kI64 each, distinct non-empty names, data non-null unless numel is 0)
// and metadata (stored as "__metadata__"; the CLI stores "architecture", "preset" and
// "bnorm_version") to path, atomically. Errors: invalid entries (named), a missing or unwritable
// directory, a full disk: the message names the path and the system's reason.
Status save_safetensors(const std::string& path, const std::vector<nn::StateEntry>& entries,
                        const std::map<std::string, std::string>& metadata);

struct LoadOptions {
  // A destination entry named "num_batches_tracked" or "*.num_batches_tracked" that the file
  // lacks is set to 0, as PyTorch's BatchNorm does when loading a state_dict from before the
  // counter existed. When false, it is a missing tensor like any other.
  bool allow_missing_num_batches_tracked = true;
  // Accept an "F64" tensor for a kF32 destination, rounding each value to the nearest float
  // (e.g. a state_dict saved from a model in double). When false, a dtype mismatch is an error.
  bool allow_f64_to_f32 = true;
};

// Loads path into the tensors of `into` (each destination's name, dtype and shape must match
// the file's; data non-null unless numel is 0). Checked before anything is written: the header
// length (>= 2, within the file and kMaxSafetensorsHeaderBytes), the JSON (an object of
// tensor records with a known dtype, a shape of non-negative integers and two offsets),
// offsets inside the data region, consistent with dtype x shape, not overlapping, and covering
// the data region with no gap; then names: tensors the model lacks ("unexpected tensors in
// checkpoint: a, b") and tensors the file lacks ("missing tensors in checkpoint: c"), a shape
// mismatch naming the tensor and both shapes, a dtype mismatch naming both dtypes.
// metadata, if not null, receives "__metadata__" (cleared first; written only on success).
Status load_safetensors(const std::string& path, const std::vector<nn::StateEntry>& into,
                        const LoadOptions& options = LoadOptions(),
                        std::map<std::string, std::string>* metadata = nullptr);

// One tensor of a file, owning its bytes (for tools that do not have a model to load into).
struct OwnedTensor {
  std::string name;
  std::string dtype;            // as in the file: "F32", "I64", "F64", "F16", "BF16", "I32", ...
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;   // row-major little-endian, numel * dtype size bytes

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

// Reads and validates every tensor of path (the same file checks as load_safetensors) in file
// order of their offsets. *tensors and *metadata (if not null) are written only on success.
Status read_safetensors(const std::string& path, std::vector<OwnedTensor>* tensors,
                        std::map<std::string, std::string>* metadata = nullptr);

// Reads only the header's "__metadata__" (e.g. the architecture, to build the model before
// loading its tensors). The header is validated as by read_safetensors; the data is not read.
Status read_safetensors_metadata(const std::string& path,
                                 std::map<std::string, std::string>* metadata);

namespace testing {
// Test hook: makes the next save_safetensors calls fail after `bytes` bytes of the temporary
// file have been written, as a full disk would (-1, the default, disables it). Process-wide,
// not thread-safe; for tests only.
void set_save_failure_after_bytes(int64_t bytes);
}  // namespace testing

}  // namespace bnorm::io

#endif  // BNORM_IO_SAFETENSORS_H_
