#include "bnorm/nn/init.h"

#include <cmath>
#include <numbers>

namespace bnorm::nn {
namespace {

uint64_t splitmix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

}  // namespace

void Rng::seed_with(uint64_t seed) {
  uint64_t state = seed;
  for (uint64_t& s : s_) s = splitmix64(&state);
  has_spare_ = false;
}

uint64_t Rng::next_u64() {  // xoshiro256**
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double Rng::uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

double Rng::normal() {
  if (has_spare_) {
    has_spare_ = false;
    return spare_;
  }
  // u1 in (0, 1] so that log(u1) is finite.
  const double u1 = 1.0 - uniform();
  const double u2 = uniform();
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double theta = 2.0 * std::numbers::pi * u2;
  spare_ = r * std::sin(theta);
  has_spare_ = true;
  return r * std::cos(theta);
}

uint64_t Rng::below(uint64_t n) {
  // Reject the top partial block so that every residue is equally likely.
  const uint64_t limit = (~uint64_t{0}) - (~uint64_t{0}) % n;
  uint64_t v;
  do {
    v = next_u64();
  } while (v >= limit);
  return v % n;
}

void constant_(std::span<float> w, float value) {
  for (float& v : w) v = value;
}

void uniform_(std::span<float> w, double lo, double hi, Rng& rng) {
  for (float& v : w) v = static_cast<float>(rng.uniform(lo, hi));
}

void normal_(std::span<float> w, double mean, double std, Rng& rng) {
  for (float& v : w) v = static_cast<float>(mean + std * rng.normal());
}

double leaky_relu_gain(double a) { return std::sqrt(2.0 / (1.0 + a * a)); }

void kaiming_uniform_(std::span<float> w, int64_t fan, double a, Rng& rng) {
  const double bound = leaky_relu_gain(a) * std::sqrt(3.0 / static_cast<double>(fan));
  uniform_(w, -bound, bound, rng);
}

void kaiming_normal_(std::span<float> w, int64_t fan, double a, Rng& rng) {
  normal_(w, 0.0, leaky_relu_gain(a) / std::sqrt(static_cast<double>(fan)), rng);
}

}  // namespace bnorm::nn
