// `bnorm fold`: a checkpoint with batch norm folded into the layers before it (nn::fold_batch_norm),
// written as a checkpoint without batch norm, with the evidence that it computes the same:
// the largest logit difference between the two models over the whole test set (eval mode) and
// both test accuracies.
#ifndef BNORM_TOOLS_FOLD_H_
#define BNORM_TOOLS_FOLD_H_

#include <cstdint>
#include <string>

#include "bnorm/status.h"

namespace bnorm::tools {

struct FoldConfig {
  std::string checkpoint;  // a .safetensors file written by bnorm train (with batch norm)
  std::string out;         // the folded checkpoint to write (atomically; not the input)
  std::string data_dir;    // empty: Debian's dataset-fashion-mnist
  int64_t batch_size = 1000;
  int threads = 0;         // 0: bnorm's default
};

// Loads, folds, compares on the test set and writes config.out (only when everything before
// succeeded). Prints one summary line; errors name the file or the layer.
Status run_fold(const FoldConfig& config);

}  // namespace bnorm::tools

#endif  // BNORM_TOOLS_FOLD_H_
