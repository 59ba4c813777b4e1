// Element-wise loops of the layers and the optimizer, compiled for several x86 targets
// (AVX-512, AVX2, baseline) and dispatched once per process by the loader (target_clones).
// Every clone computes the same results: no FMA contraction (ISO C++ mode), same operations.
#ifndef BNORM_SRC_NN_ELEMENTWISE_H_
#define BNORM_SRC_NN_ELEMENTWISE_H_

#include <cstdint>

namespace bnorm::nn::detail {

// exp(x) for x <= 0 (x below -87.3 gives exp(-87.3) ~ 1.2e-38), ~2 ulp.
float exp_nonpositive(float x);
// y = 1 / (1 + exp(-x)), built on exp(-|x|) so nothing overflows; NaN propagates.
void sigmoid(const float* x, float* y, int64_t n);
// dx = dy * y * (1 - y).
void sigmoid_backward(const float* y, const float* dy, float* dx, int64_t n);
// y = x <= 0 ? 0 : x.
void relu(const float* x, float* y, int64_t n);
// dx = y > 0 ? dy : 0.
void relu_backward(const float* y, const float* dy, float* dx, int64_t n);
// SGD: d = g + wd * p; buf = mu * buf + d; p -= lr * buf (buf == nullptr: p -= lr * d).
void sgd_update(float* p, const float* g, float* buf, int64_t n, float lr, float mu, float wd);

}  // namespace bnorm::nn::detail

#endif  // BNORM_SRC_NN_ELEMENTWISE_H_
