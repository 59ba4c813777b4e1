// write_seed_checkpoint: saves the freshly initialised state of the CLI's presets (paper-mlp
// and cnn, with batch norm) as the checkpoints bnorm train writes, for the safetensors fuzz
// target's seed corpus (make_seeds.py cuts them down):
//   write_seed_checkpoint DIR     writes DIR/paper-mlp.safetensors and DIR/cnn.safetensors
#include <cstdio>
#include <string>

#include "bnorm/io/safetensors.h"
#include "bnorm/nn/models.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: write_seed_checkpoint DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  struct Preset {
    const char* name;
    bnorm::nn::Sequential model;
  } presets[] = {{"paper-mlp", bnorm::nn::paper_mlp(true, 1)}, {"cnn", bnorm::nn::cnn(true, 1)}};
  for (Preset& p : presets) {
    const bnorm::Status s = bnorm::io::save_safetensors(
        dir + "/" + p.name + ".safetensors", p.model.state_dict(),
        {{"architecture", p.name}, {"preset", p.name}, {"bnorm_version", "fuzz-seed"}});
    if (!s.ok()) {
      std::fprintf(stderr, "write_seed_checkpoint: %s\n", s.message().c_str());
      return 1;
    }
  }
  return 0;
}
