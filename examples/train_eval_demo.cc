// A batch-norm layer in training and in eval, on sensor-like readings whose channels have very
// different scales (a temperature near 20, a pressure near 1013, a humidity near 50 and a
// current near 0.002). Prints per-channel statistics of the input, the training output, the
// running statistics as they converge, and the eval output. Uses only <bnorm/...>.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "bnorm/batch_norm.h"

namespace {

constexpr int64_t kBatch = 32, kChannels = 4, kSteps = 200;
const char* const kNames[kChannels] = {"temperature", "pressure", "humidity", "current"};
const double kMean[kChannels] = {21.5, 1013.25, 48.0, 0.0021};
const double kStd[kChannels] = {3.0, 8.5, 12.0, 0.0004};

// Fills x, an (N, C) channels-first batch, with new readings (in place: the views keep
// pointing at it).
void readings(std::mt19937_64& rng, std::vector<float>& x) {
  std::normal_distribution<double> normal(0.0, 1.0);
  for (int64_t i = 0; i < kBatch; ++i)
    for (int64_t c = 0; c < kChannels; ++c)
      x[i * kChannels + c] = static_cast<float>(kMean[c] + kStd[c] * normal(rng));
}

void print_columns(const char* title, const std::vector<float>& x) {
  std::printf("%s\n  %-12s %14s %14s\n", title, "channel", "mean", "std");
  for (int64_t c = 0; c < kChannels; ++c) {
    double s = 0, ss = 0;
    for (int64_t i = 0; i < kBatch; ++i) s += x[i * kChannels + c];
    const double m = s / kBatch;
    for (int64_t i = 0; i < kBatch; ++i)
      ss += (x[i * kChannels + c] - m) * (x[i * kChannels + c] - m);
    std::printf("  %-12s %14.6g %14.6g\n", kNames[c], m, std::sqrt(ss / kBatch));
  }
}

void print_state(const char* title, const bnorm::BatchNorm& bn) {
  std::printf("%s (num_batches_tracked = %lld)\n  %-12s %14s %14s\n", title,
              static_cast<long long>(bn.num_batches_tracked()), "channel", "running_mean",
              "running_var");
  for (int64_t c = 0; c < kChannels; ++c)
    std::printf("  %-12s %14.6g %14.6g\n", kNames[c], bn.running_mean()[c], bn.running_var()[c]);
}

int fail(const bnorm::Status& s) {
  std::fprintf(stderr, "error: %s\n", s.to_string().c_str());
  return 1;
}

}  // namespace

int main() {
  std::printf("bnorm %s: BatchNorm1d(%lld) on batches of %lld readings\n\n", bnorm::version(),
              static_cast<long long>(kChannels), static_cast<long long>(kBatch));
  bnorm::BatchNormOptions options;
  options.num_features = kChannels;
  bnorm::BatchNorm bn;
  if (auto s = bnorm::BatchNorm::create(options, &bn); !s.ok()) return fail(s);

  std::mt19937_64 rng(2015);
  std::vector<float> x(kBatch * kChannels), y(x.size());
  readings(rng, x);
  const bnorm::ConstTensorView xv(x.data(), {kBatch, kChannels});
  const bnorm::TensorView yv(y.data(), {kBatch, kChannels});

  print_state("Before training: running statistics", bn);
  print_columns("\nFirst training batch, input x", x);
  if (auto s = bn.forward(xv, yv); !s.ok()) return fail(s);
  print_columns("Training output y (batch statistics: mean 0, std 1)", y);
  std::printf(
      "  (std = sqrt(v / (v + eps)): the current's variance, ~1.6e-7, is below eps = 1e-5,\n"
      "   so eps dominates its normalization, as it does in PyTorch)\n");

  for (int64_t step = 1; step < kSteps; ++step) {
    readings(rng, x);
    if (auto s = bn.forward(xv, yv); !s.ok()) return fail(s);
    if (step == 9) print_state("\nAfter 10 training batches (momentum 0.1)", bn);
  }
  print_state("\nAfter 200 training batches: running statistics", bn);
  std::printf("  (the population is mean %g / %g / %g / %g, var %g / %g / %g / %g)\n", kMean[0],
              kMean[1], kMean[2], kMean[3], kStd[0] * kStd[0], kStd[1] * kStd[1], kStd[2] * kStd[2],
              kStd[3] * kStd[3]);

  bn.eval();
  readings(rng, x);
  print_columns("\nEval batch, input x", x);
  if (auto s = bn.forward(xv, yv); !s.ok()) return fail(s);
  print_columns("Eval output y (running statistics, y = a*x + b)", y);

  // Bad input is refused with a message, and nothing is written.
  bn.train();
  const bnorm::ConstTensorView one(x.data(), {1, kChannels});
  const bnorm::TensorView one_out(y.data(), {1, kChannels});
  const bnorm::Status refused = bn.forward(one, one_out);
  std::printf("\nA single sample in training is refused: %s\n", refused.to_string().c_str());
  return refused.ok() ? 1 : 0;
}
