// libFuzzer target: the safetensors reader (read_safetensors_metadata, read_safetensors,
// load_safetensors) on any bytes. Checked: no crash or sanitizer report, errors one line naming
// the file, the three readers agree on validity, a successful read gives tensors of
// numel x dtype size bytes that load back into a model of their names and shapes, and a failed
// load leaves the model bit-for-bit unchanged.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "bnorm/io/safetensors.h"
#include "fuzz_util.h"

namespace {

int dtype_bytes(const std::string& d) {
  if (d == "F64" || d == "I64" || d == "U64") return 8;
  if (d == "F32" || d == "I32" || d == "U32") return 4;
  if (d == "F16" || d == "BF16" || d == "I16" || d == "U16") return 2;
  return 1;
}

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "fuzz_safetensors: %s\n", what);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace bnorm;
  const std::string& path = fuzz::write_input(data, size, ".safetensors");
  std::map<std::string, std::string> meta;
  const Status m = io::read_safetensors_metadata(path, &meta);
  fuzz::check_error(m, path);
  std::vector<io::OwnedTensor> tensors;
  std::map<std::string, std::string> meta2;
  const Status r = io::read_safetensors(path, &tensors, &meta2);
  fuzz::check_error(r, path);
  if (m.ok() != r.ok()) fail("read_safetensors and read_safetensors_metadata disagree");
  if (r.ok() && meta != meta2) fail("the two readers return different metadata");

  // A fixed small model: loading into it either succeeds or changes nothing.
  std::vector<float> w(4, 7.0f);
  int64_t counter = 3;
  std::vector<nn::StateEntry> model(2);
  model[0].name = "weight";
  model[0].shape = {4};
  model[0].data = w.data();
  model[1].name = "num_batches_tracked";
  model[1].dtype = nn::DType::kI64;
  model[1].data = &counter;
  const Status l = io::load_safetensors(path, model);
  fuzz::check_error(l, path);
  if (!l.ok() && (counter != 3 || w != std::vector<float>(4, 7.0f))) fail("a failed load wrote the model");
  if (l.ok() && !r.ok()) fail("load_safetensors accepted a file read_safetensors rejected");
  if (!r.ok()) return 0;

  // Every F32/I64 tensor loads into a model of its own names and shapes, with its bytes.
  std::vector<nn::StateEntry> mine;
  std::vector<std::vector<uint8_t>> storage;
  bool loadable = true;
  for (const io::OwnedTensor& t : tensors) {
    uint64_t numel = 1;
    for (int64_t d : t.shape) numel *= static_cast<uint64_t>(d);
    if (t.bytes.size() != numel * static_cast<uint64_t>(dtype_bytes(t.dtype))) fail("tensor size");
    if (t.dtype != "F32" && t.dtype != "I64") loadable = false;
  }
  if (!loadable) return 0;
  storage.reserve(tensors.size());
  for (const io::OwnedTensor& t : tensors) {
    storage.emplace_back(t.bytes.size() + 1, 0xa5);
    nn::StateEntry e;
    e.name = t.name;
    e.dtype = t.dtype == "F32" ? nn::DType::kF32 : nn::DType::kI64;
    e.shape = t.shape;
    e.data = storage.back().data();
    mine.push_back(e);
  }
  const Status back = io::load_safetensors(path, mine);
  // The only reasons left to fail: names the saver rejects (e.g. empty) or a vanished file.
  if (!back.ok()) {
    fuzz::check_error(back, path);
    return 0;
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!tensors[i].bytes.empty() &&
        std::memcmp(storage[i].data(), tensors[i].bytes.data(), tensors[i].bytes.size()) != 0) {
      fail("load_safetensors and read_safetensors give different bytes");
    }
  }
  return 0;
}
