// Seeded random numbers and the initializers of the nn layers.
//
// Rng is our own small generator (splitmix64 seeding a xoshiro256**, Box-Muller for normals), so
// a seed gives the same bits on every platform and compiler (normals also go through the C
// library's log, sqrt, sin and cos, correctly rounded or within an ulp on glibc): a network
// built with seed s is the same network everywhere. It does not reproduce torch.manual_seed's.
//
// Thread safety: an Rng is not safe for concurrent use; the free functions touch only their
// arguments.
#ifndef BNORM_NN_INIT_H_
#define BNORM_NN_INIT_H_

#include <cstdint>
#include <span>

namespace bnorm::nn {

class Rng {
 public:
  explicit Rng(uint64_t seed = 0) { seed_with(seed); }
  void seed_with(uint64_t seed);

  // 64 uniformly random bits.
  uint64_t next_u64();
  // Uniform in [0, 1), 53 random bits.
  double uniform();
  // Uniform in [lo, hi).
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  // Standard normal N(0, 1) (Box-Muller; the second value of each pair is kept for the next call).
  double normal();
  // Uniform integer in [0, n); requires n > 0. Unbiased (rejection sampling).
  uint64_t below(uint64_t n);

 private:
  uint64_t s_[4] = {};
  double spare_ = 0.0;
  bool has_spare_ = false;
};

// w[i] = value.
void constant_(std::span<float> w, float value);
// w[i] ~ U(lo, hi).
void uniform_(std::span<float> w, double lo, double hi, Rng& rng);
// w[i] ~ N(mean, std^2).
void normal_(std::span<float> w, double mean, double std, Rng& rng);

// PyTorch's calculate_gain("leaky_relu", a) = sqrt(2 / (1 + a^2)); a = 0 is ReLU's sqrt(2).
double leaky_relu_gain(double a);
// PyTorch's kaiming_uniform_(w, a, mode): U(-b, b), b = gain(a) * sqrt(3 / fan), where fan is
// fan_in (in * kh * kw) or fan_out (out * kh * kw) as the caller chooses. Requires fan > 0.
// PyTorch's default Linear/Conv2d weight init is a = sqrt(5) with fan_in: b = 1 / sqrt(fan_in).
void kaiming_uniform_(std::span<float> w, int64_t fan, double a, Rng& rng);
// PyTorch's kaiming_normal_(w, a, mode): N(0, (gain(a) / sqrt(fan))^2). torchvision's conv init
// is fan = fan_out, a = 0 (nonlinearity "relu").
void kaiming_normal_(std::span<float> w, int64_t fan, double a, Rng& rng);

}  // namespace bnorm::nn

#endif  // BNORM_NN_INIT_H_
