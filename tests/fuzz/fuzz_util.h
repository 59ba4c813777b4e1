// Helpers of the file-reader fuzz targets: the readers take paths, so each input is written to
// a file of this process first.
#ifndef BNORM_TESTS_FUZZ_FUZZ_UTIL_H_
#define BNORM_TESTS_FUZZ_FUZZ_UTIL_H_

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "bnorm/status.h"

namespace bnorm::fuzz {

// A file of this process under $TMPDIR (or /tmp), holding the input.
inline const std::string& write_input(const uint8_t* data, size_t size, const char* suffix) {
  static const std::string path = [suffix] {
    const char* dir = std::getenv("TMPDIR");
    return std::string(dir != nullptr && *dir != '\0' ? dir : "/tmp") + "/bnorm_fuzz_" +
           std::to_string(::getpid()) + suffix;
  }();
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) std::abort();
  if (size > 0 && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
  return path;
}

// Every error is one line of reasonable length that names the file.
inline void check_error(const Status& s, const std::string& path) {
  if (s.ok()) return;
  const std::string& m = s.message();
  if (m.find('\n') != std::string::npos || m.size() > 1024 || m.find(path) == std::string::npos) {
    std::fprintf(stderr, "bad error message (%zu bytes): %.2000s\n", m.size(), m.c_str());
    std::abort();
  }
}

}  // namespace bnorm::fuzz

#endif  // BNORM_TESTS_FUZZ_FUZZ_UTIL_H_
