// Softmax cross-entropy, PyTorch's nn.CrossEntropyLoss() (mean reduction, no weights, no label
// smoothing) on logits, with its gradient and the count of correct argmax predictions.
//
// Thread safety: touches only its arguments.
#ifndef BNORM_NN_LOSS_H_
#define BNORM_NN_LOSS_H_

#include <cstdint>
#include <span>

#include "bnorm/nn/tensor.h"
#include "bnorm/status.h"

namespace bnorm::nn {

struct CrossEntropyResult {
  double loss = 0.0;    // mean over the batch of -log softmax(logits)[label]
  int64_t correct = 0;  // rows whose argmax (first maximum) equals the label
};

// logits (N, K), N >= 1, K >= 1; labels N values in [0, K). Computed stably (log-sum-exp with
// the row maximum subtracted, in double). When dlogits is not null it is resized to (N, K) and
// receives d(loss)/d(logits) = (softmax - onehot(label)) / N. Errors (wrong rank, label count or
// a label out of range, naming the row and value) leave *out and *dlogits unchanged.
Status softmax_cross_entropy(const Tensor& logits, std::span<const int32_t> labels,
                             CrossEntropyResult* out, Tensor* dlogits = nullptr);
// The same with uint8 labels (as the IDX files store them).
Status softmax_cross_entropy(const Tensor& logits, std::span<const uint8_t> labels,
                             CrossEntropyResult* out, Tensor* dlogits = nullptr);

// Number of rows of logits (N, K) whose first maximum is at the label; no validation beyond
// labels.size() == N (returns -1 otherwise). For eval loops that need no loss.
int64_t count_correct(const Tensor& logits, std::span<const uint8_t> labels);

}  // namespace bnorm::nn

#endif  // BNORM_NN_LOSS_H_
