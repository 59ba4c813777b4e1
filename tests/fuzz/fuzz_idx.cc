// libFuzzer target: the IDX reader (read_idx_images, read_idx_labels) on any bytes, plain or
// gzip (detected by content, as the reader does). Checked: no crash or sanitizer report, errors
// one line naming the file, and a successful read gives exactly the announced number of values
// (labels in [0, num_classes)).
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bnorm/io/idx.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace bnorm;
  const std::string& path = fuzz::write_input(data, size, ".idx");
  io::IdxImages images;
  const Status si = io::read_idx_images(path, &images);
  fuzz::check_error(si, path);
  if (si.ok() && (images.count <= 0 || images.rows <= 0 || images.cols <= 0 ||
                  images.pixels.size() != static_cast<size_t>(images.count * images.rows * images.cols))) {
    std::fprintf(stderr, "fuzz_idx: images of the wrong size\n");
    std::abort();
  }
  const int classes = size > 0 ? 1 + data[size - 1] % 10 : 10;
  std::vector<uint8_t> labels;
  const Status sl = io::read_idx_labels(path, &labels, classes);
  fuzz::check_error(sl, path);
  if (sl.ok()) {
    if (labels.empty()) std::abort();
    for (uint8_t v : labels) {
      if (v >= classes) {
        std::fprintf(stderr, "fuzz_idx: label %d >= %d accepted\n", v, classes);
        std::abort();
      }
    }
  }
  return 0;
}
