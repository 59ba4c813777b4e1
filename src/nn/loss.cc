#include <cmath>
#include <string>

#include "bnorm/nn/loss.h"
#include "common.h"

namespace bnorm::nn {
namespace {

template <class Label>
Status cross_entropy(const Tensor& logits, std::span<const Label> labels, CrossEntropyResult* out,
                     Tensor* dlogits) {
  if (out == nullptr) return Status::invalid_argument("softmax_cross_entropy: out: is null");
  if (logits.rank() != 2 || logits.dim(0) < 1 || logits.dim(1) < 1)
    return detail::shape_error("softmax_cross_entropy", "logits", "shape [N >= 1, K >= 1]",
                               logits);
  if (dlogits == &logits)
    return Status::invalid_argument("softmax_cross_entropy: dlogits: must not be logits");
  const int64_t n = logits.dim(0), k = logits.dim(1);
  if (static_cast<int64_t>(labels.size()) != n)
    return Status::invalid_argument("softmax_cross_entropy: labels: expected " +
                                    std::to_string(n) + " (the batch size of logits " +
                                    logits.size_string() + "), got " +
                                    std::to_string(labels.size()));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t l = static_cast<int64_t>(labels[static_cast<size_t>(i)]);
    if (l < 0 || l >= k)
      return Status::invalid_argument("softmax_cross_entropy: labels[" + std::to_string(i) +
                                      "]: must be in [0, " + std::to_string(k) + "), got " +
                                      std::to_string(l));
  }
  if (dlogits != nullptr) dlogits->resize({n, k});
  double total = 0.0;
  int64_t correct = 0;
  const double inv_n = 1.0 / static_cast<double>(n);
  for (int64_t i = 0; i < n; ++i) {
    const float* z = logits.data() + i * k;
    const int64_t label = static_cast<int64_t>(labels[static_cast<size_t>(i)]);
    int64_t arg = 0;
    for (int64_t j = 1; j < k; ++j)
      if (z[j] > z[arg]) arg = j;
    if (arg == label) ++correct;
    // log-sum-exp with the maximum subtracted: every exponent is <= 0.
    const double m = z[arg];
    double sum = 0.0;
    for (int64_t j = 0; j < k; ++j) sum += std::exp(static_cast<double>(z[j]) - m);
    const double lse = m + std::log(sum);
    total += lse - z[label];
    if (dlogits != nullptr) {
      float* d = dlogits->data() + i * k;
      for (int64_t j = 0; j < k; ++j) {
        const double p = std::exp(static_cast<double>(z[j]) - lse);
        d[j] = static_cast<float>((p - (j == label ? 1.0 : 0.0)) * inv_n);
      }
    }
  }
  out->loss = total * inv_n;
  out->correct = correct;
  return Status();
}

}  // namespace

Status softmax_cross_entropy(const Tensor& logits, std::span<const int32_t> labels,
                             CrossEntropyResult* out, Tensor* dlogits) {
  return cross_entropy(logits, labels, out, dlogits);
}

Status softmax_cross_entropy(const Tensor& logits, std::span<const uint8_t> labels,
                             CrossEntropyResult* out, Tensor* dlogits) {
  return cross_entropy(logits, labels, out, dlogits);
}

int64_t count_correct(const Tensor& logits, std::span<const uint8_t> labels) {
  if (logits.rank() != 2 || static_cast<int64_t>(labels.size()) != logits.dim(0)) return -1;
  const int64_t n = logits.dim(0), k = logits.dim(1);
  int64_t correct = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float* z = logits.data() + i * k;
    int64_t arg = 0;
    for (int64_t j = 1; j < k; ++j)
      if (z[j] > z[arg]) arg = j;
    if (arg == labels[static_cast<size_t>(i)]) ++correct;
  }
  return correct;
}

}  // namespace bnorm::nn
