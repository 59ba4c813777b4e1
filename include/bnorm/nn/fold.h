// Folding batch norm into the layer before it, for inference.
//
// In eval mode a batch-norm layer is the per-channel affine map y = a * x + b with
// a = weight / sqrt(running_var + eps) and b = bias - running_mean * a (weight 1 and bias 0
// without affine). When the layer right before it is a Linear or a Conv2d, that map composes
// with it into one Linear or Conv2d of the same shape:
//   W'[c, ...] = a[c] * W[c, ...],   b'[c] = a[c] * (b[c] - running_mean[c]) + bias_bn[c]
// (b[c] = 0 for a layer without bias, which gains one). fold_batch_norm builds that model: the
// same modules in the same order, each foldable batch-norm layer removed and absorbed, the
// arithmetic in fp64 and each weight rounded once to fp32. In eval mode its outputs equal the
// original's up to that rounding; its state_dict names shift as PyTorch's indices would
// (e.g. the cnn preset with batch norm folds into the cnn preset's architecture without it).
#ifndef BNORM_NN_FOLD_H_
#define BNORM_NN_FOLD_H_

#include <cstddef>
#include <string>
#include <vector>

#include "bnorm/nn/layers.h"
#include "bnorm/status.h"

namespace bnorm::nn {

struct FoldedLayer {
  size_t batch_norm_index = 0;  // index of the batch-norm layer in the original model
  size_t into_index = 0;        // index of the Linear or Conv2d it was folded into (original)
  std::string into;             // "Linear" or "Conv2d"
  bool added_bias = false;      // the layer had no bias and gained one
};

struct FoldReport {
  std::vector<FoldedLayer> folded;  // in model order; empty when the model has no batch norm
};

// Writes to *out the model equal to `model` in eval mode without batch-norm layers. `model` is
// not modified (its parameters are read). *out starts in eval mode.
// Refused, with *out untouched, when a batch-norm layer cannot be folded:
//   - it is the first module, or the module right before it is not a Linear or Conv2d (a
//     nonlinearity, pooling, Flatten or another batch norm in between: the map does not commute
//     with them; a batch norm before a Linear or Conv2d is not folded forward either, since with
//     zero padding the border would differ);
//   - BatchNorm1d after a Conv2d or BatchNorm2d after a Linear, or channel counts that differ;
//   - it keeps no running statistics (track_running_stats = false: eval uses batch statistics);
//   - a running variance that makes running_var + eps non-positive or non-finite, or a
//     non-finite mean, weight or bias;
//   - a module of a type this function cannot copy (anything but Linear, Conv2d, MaxPool2d,
//     ReLU, Sigmoid, Flatten, BatchNorm1d/2d and nested Sequential, which is folded within).
// The message names the index and the module, e.g.
//   "fold_batch_norm: module 3 (BatchNorm2d): follows ReLU (module 2), not a Linear or Conv2d".
Status fold_batch_norm(Sequential& model, Sequential* out, FoldReport* report = nullptr);

}  // namespace bnorm::nn

#endif  // BNORM_NN_FOLD_H_
