// The preset networks of `bnorm train`, each with and without batch norm, as Sequential.
//
// Both are deterministic functions of their seed (our own Rng; see init.h). The layer indices
// are PyTorch's: the equivalent torch.nn.Sequential has the same state_dict names and shapes,
// and architecture() describes it.
#ifndef BNORM_NN_MODELS_H_
#define BNORM_NN_MODELS_H_

#include <cstdint>

#include "bnorm/nn/layers.h"

namespace bnorm::nn {

// Standard deviation of the paper_mlp weights' Gaussian init.
inline constexpr double kPaperMlpInitStd = 0.1;

// Ioffe & Szegedy (2015) §4.1: 784-100-100-100-10 with sigmoid.
//   batch_norm = false: Linear(784,100) Sigmoid Linear(100,100) Sigmoid Linear(100,100) Sigmoid
//                       Linear(100,10)                       (indices 0..6)
//   batch_norm = true:  Linear BatchNorm1d Sigmoid, three times, then Linear(100,10)
//                       (indices 0..9; BatchNorm1d at 1, 4, 7)
// Weights ~ N(0, kPaperMlpInitStd^2) ("small random Gaussian values"), biases 0. Every Linear
// keeps its bias, also before BatchNorm1d where it is redundant (BN subtracts it again and its
// gradient is ~0): the same layers with and without BN, and a plain nn.Linear in PyTorch.
// Input (N, 784) (flattened 28x28 images), output logits (N, 10).
Sequential paper_mlp(bool batch_norm, uint64_t seed);

// Units of the cnn's hidden head layer.
inline constexpr int64_t kCnnHidden = 256;

// A small conv net for 28x28 single-channel images, input (N, 1, 28, 28), logits (N, 10):
//   [Conv2d(1,32,3,p1) BN2d ReLU] MaxPool2d(2) [Conv2d(32,64,3,p1) BN2d ReLU] MaxPool2d(2)
//   [Conv2d(64,128,3,p1) BN2d ReLU] Flatten [Linear(128*7*7, 256) BN1d ReLU] Linear(256, 10)
// About 18 MFLOP per image forward (54 with backward): sized so that enough epochs for >= 93 %
// fit in 10 minutes on 2 cores.
// Without BN the BN entries are absent (indices shift, as in PyTorch) and the convolutions and
// the hidden Linear keep their bias; with BN they have none (bias=False, as torchvision does
// before BN). Init: convolutions Kaiming normal (fan_out, relu) as torchvision, their biases
// (without BN) 0; BN weight 1 bias 0; the Linear layers PyTorch's default.
Sequential cnn(bool batch_norm, uint64_t seed);

}  // namespace bnorm::nn

#endif  // BNORM_NN_MODELS_H_
