// oneDNN as a peer of the benchmark: batch_normalization_forward/_backward of oneDNN 2.x on
// nchw, nhwc and nChw16c (4-D), and nc plus the same bytes as a {N,C,1,1} nhwc tensor (2-D).
// Built from onednn_runner.cc when CMake finds oneDNN, from onednn_absent.cc otherwise (then
// available() is false and the table says "oneDNN: not found").
#ifndef BNORM_BENCH_PEERS_ONEDNN_RUNNER_H_
#define BNORM_BENCH_PEERS_ONEDNN_RUNNER_H_

#include <string>
#include <vector>

#include "bench_common.h"

namespace bench::onednn {

bool available();
std::string version();  // "2.6.3", or "not found"
int max_threads();      // threads of oneDNN's OpenMP runtime; -1 when unknown

// Validates each (layout, op) against the problem's reference, then times it in each mode of
// run. Rows have impl "onednn" and the implementation oneDNN picked in the note. The fused ops
// use normalization_flags::fuse_norm_relu (fwd_train_add_relu: a "skip" row, oneDNN's CPU
// engine has no fused add). scratch holds numel floats.
std::vector<Row> run(const Problem& p, const RunOptions& run, Buffer& scratch);

}  // namespace bench::onednn

#endif  // BNORM_BENCH_PEERS_ONEDNN_RUNNER_H_
