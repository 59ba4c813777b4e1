// io_read_tool: runs one reader on one file and prints its status, for measuring the readers'
// time and memory on hostile files by hand (e.g. under /usr/bin/time -v; the files come from
// tests/io/make_hostile_files.py):
//
//   io_read_tool metadata FILE        read_safetensors_metadata (what `bnorm eval` reads first)
//   io_read_tool read FILE            read_safetensors
//   io_read_tool load FILE NAME N     load_safetensors into one F32 tensor NAME of shape [N]
//   io_read_tool images FILE          read_idx_images
//   io_read_tool labels FILE          read_idx_labels
//
// Exit status 0 if the reader succeeded, 1 with its one-line message on stderr if it failed,
// 2 on bad usage.
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "bnorm/io/idx.h"
#include "bnorm/io/safetensors.h"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: io_read_tool metadata|read|images|labels FILE | load FILE NAME N\n");
    return 2;
  }
  const std::string what = argv[1], path = argv[2];
  bnorm::Status s;
  if (what == "metadata") {
    std::map<std::string, std::string> meta;
    s = bnorm::io::read_safetensors_metadata(path, &meta);
  } else if (what == "read") {
    std::vector<bnorm::io::OwnedTensor> tensors;
    s = bnorm::io::read_safetensors(path, &tensors);
    if (s.ok()) std::printf("%zu tensors\n", tensors.size());
  } else if (what == "load" && argc == 5) {
    const int64_t n = std::atoll(argv[4]);
    std::vector<float> data(static_cast<size_t>(n));
    bnorm::nn::StateEntry e;
    e.name = argv[3];
    e.shape = {n};
    e.data = data.data();
    s = bnorm::io::load_safetensors(path, {e});
  } else if (what == "images") {
    bnorm::io::IdxImages images;
    s = bnorm::io::read_idx_images(path, &images);
  } else if (what == "labels") {
    std::vector<uint8_t> labels;
    s = bnorm::io::read_idx_labels(path, &labels);
  } else {
    std::fprintf(stderr, "io_read_tool: unknown command '%s'\n", what.c_str());
    return 2;
  }
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.message().c_str());
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
