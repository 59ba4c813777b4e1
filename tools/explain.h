// `bnorm explain`: the five steps of batch norm (the activations of a mini-batch, their mean and
// variance per feature, the normalized values, the scale and shift by gamma and beta, the moving
// averages kept for inference) measured on one BatchNorm layer of a trained network.
//
// The numbers come from here; tools/plot_explain.py draws them. Output, in config.out_dir:
//   explain.json       every per-feature number of the five steps and their summaries
//   batch.safetensors  the mini-batch at the layer: "input" (the layer's input, its own shape),
//                      and for the selected features "selected_input", "selected_normalized",
//                      "selected_output" [features, values per feature]
//   explain.png, explain.md   the figure and the numbers as text (when plots is set and a Python
//                      with matplotlib is found)
#ifndef BNORM_TOOLS_EXPLAIN_H_
#define BNORM_TOOLS_EXPLAIN_H_

#include <cstdint>
#include <string>

#include "bnorm/io/idx.h"
#include "bnorm/status.h"

namespace bnorm::tools {

struct ExplainConfig {
  std::string checkpoint;   // a .safetensors file written by bnorm train
  int64_t layer = 1;        // which BatchNorm layer, counted from 1 in forward order
  std::string data_dir;     // empty: Debian's dataset-fashion-mnist
  int64_t batch_size = -1;  // -1: the checkpoint's training batch (its metadata) or the preset's
  uint64_t seed = 1;        // the mini-batch is the first one `bnorm train --seed S` trains on
  std::string out_dir;      // required
  int threads = 0;          // 0: bnorm's default
  bool plots = true;        // run plot_explain.py (explain.png, explain.md)
  bool quiet = false;       // no progress lines on stderr
  // For a checkpoint without bnorm's metadata (as bnorm eval): preset, 1/0 batch norm,
  // standardized pixels.
  std::string preset;
  int batch_norm = -1;
  bool normalize = false;
};

// Runs `bnorm explain`. Everything is checked (checkpoint, layer, data) and computed before
// config.out_dir is touched; the files are written into a staging directory and moved into
// out_dir at the end, so an error leaves no partial output. train: the training set when the
// caller has it loaded with the checkpoint's pixel standardization (bnorm train), else null
// (then it is read from data_dir).
Status run_explain(const ExplainConfig& config, const io::Dataset* train = nullptr);

}  // namespace bnorm::tools

#endif  // BNORM_TOOLS_EXPLAIN_H_
