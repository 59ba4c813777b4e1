// Built instead of onednn_runner.cc when CMake did not find oneDNN.
#include "peers/onednn_runner.h"

namespace bench::onednn {

bool available() { return false; }
std::string version() { return "not found"; }
int max_threads() { return -1; }
std::vector<Row> run(const Problem&, const RunOptions&, Buffer&) {
  return {};
}

}  // namespace bench::onednn
