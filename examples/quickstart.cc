// The README's C++ snippet as a complete program: a BatchNorm layer over a channels-last
// (N, C, H, W) batch, forward and backward in training mode, then forward in eval mode. Checks
// what batch norm promises (each channel of the training output has mean 0 and variance 1; the
// backward accumulated dweight and dbias) and exits non-zero if it does not hold.
// Uses only <bnorm/...>: the install test builds it as a consumer of the installed package.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "bnorm/batch_norm.h"

namespace {

int fail(const char* what, const bnorm::Status& s) {
  std::fprintf(stderr, "quickstart: %s: %s\n", what, s.to_string().c_str());
  return 1;
}

}  // namespace

int main() {
  constexpr int64_t N = 32, C = 64, H = 28, W = 28, kPerChannel = N * H * W;
  std::vector<float> x_data(N * C * H * W), y_data(x_data.size()), dy(x_data.size()),
      dx(x_data.size());
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(3.0f, 2.0f);
  for (float& v : x_data) v = normal(rng);
  for (float& v : dy) v = normal(rng);

  bnorm::BatchNormOptions options;
  options.num_features = C;                     // eps 1e-5, momentum 0.1, affine, tracking
  bnorm::BatchNorm bn;
  if (auto s = bnorm::BatchNorm::create(options, &bn); !s.ok()) return fail("create", s);
  bnorm::ConstTensorView x(x_data.data(), {N, C, H, W}, bnorm::Layout::kChannelsLast);
  bnorm::TensorView y(y_data.data(), {N, C, H, W}, bnorm::Layout::kChannelsLast);
  bnorm::Status s = bn.forward(x, y);           // training mode; bn.eval() for inference
  if (!s.ok()) return fail("forward", s);
  bnorm::ConstTensorView dy_view(dy.data(), {N, C, H, W}, bnorm::Layout::kChannelsLast);
  bnorm::TensorView dx_view(dx.data(), {N, C, H, W}, bnorm::Layout::kChannelsLast);
  s = bn.backward(dy_view, x, dx_view);         // accumulates into bn.weight_grad(), bias_grad()
  if (!s.ok()) return fail("backward", s);

  // Channels-last: channel c of element i is at i * C + c.
  double worst_mean = 0, worst_var = 0;
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0, sq = 0;
    for (int64_t i = 0; i < kPerChannel; ++i) sum += y_data[i * C + c];
    const double mean = sum / kPerChannel;
    for (int64_t i = 0; i < kPerChannel; ++i) {
      const double d = y_data[i * C + c] - mean;
      sq += d * d;
    }
    worst_mean = std::fmax(worst_mean, std::fabs(mean));
    worst_var = std::fmax(worst_var, std::fabs(sq / kPerChannel - 1.0));
  }
  // dbias is the sum of dy over the channel's values.
  double sum_dy0 = 0;
  for (int64_t i = 0; i < kPerChannel; ++i) sum_dy0 += dy[i * C];
  const double dbias_error = std::fabs(bn.bias_grad()[0] - sum_dy0) / std::fabs(sum_dy0);

  bn.eval();
  if (s = bn.forward(x, y); !s.ok()) return fail("forward (eval)", s);
  std::printf("training output: max |mean| %.2e, max |var - 1| %.2e; dbias[0] rel. error %.2e; "
              "running_mean[0] %.4f after %lld batch\n",
              worst_mean, worst_var, dbias_error, bn.running_mean()[0],
              static_cast<long long>(bn.num_batches_tracked()));
  if (worst_mean > 1e-4 || worst_var > 1e-3 || dbias_error > 1e-4 ||
      bn.num_batches_tracked() != 1) {
    std::fprintf(stderr, "quickstart: batch norm's output is not what it should be\n");
    return 1;
  }
  std::printf("quickstart: OK\n");
  return 0;
}
