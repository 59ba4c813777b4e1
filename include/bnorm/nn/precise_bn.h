// Precise batch statistics (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"; fvcore's
// update_bn_stats): after training, replace every batch-norm layer's running statistics, an EMA
// that lags behind the last weights, by an average over K batches computed with the weights
// fixed.
//
// The model runs forward in training mode over the K batches (each batch-norm layer normalizes
// with its batch statistics, as in training, so that each layer sees the inputs it was trained
// on); per layer and batch b the batch mean m_b, the unbiased variance u_b and the count per
// channel n_b (N * spatial) are collected, and then aggregated as asked:
//   kMeanOfBatches (fvcore's): running_mean = mean_b m_b, running_var = mean_b u_b;
//   kPopulation: the statistics of all K batches as one population:
//     running_mean = sum n_b m_b / sum n_b,
//     running_var  = (sum (n_b - 1) u_b + n_b (m_b - running_mean)^2) / (sum n_b - 1).
// Sample budget: K batches of the caller's size; the statistics of every layer come from the same
// K * N samples. Wu & Johnson find a few thousand samples enough (fvcore's default: 200 batches).
//
// Distributed: with options.comm, every rank passes its own K batches; a layer synchronized
// over comm (set_sync) already sees the global batch, otherwise the ranks' per-batch statistics
// are pooled (kPopulation: their counts add; kMeanOfBatches: the mean over K * ranks batches), in
// fp64 by one all-reduce. Every rank ends with the same running statistics.
//
// During the K forwards each layer runs as plain batch norm: ghost batches off (the whole
// batch's statistics), batch renorm with r = 1 and d = 0, normalization with the batch
// statistics. A layer with freeze_running_stats keeps its statistics and runs as configured.
// Afterwards everything but running_mean and running_var is as before: the model's and each
// layer's mode, momentum and the other switches, num_batches_tracked, the parameters. On error
// (a failing batch, a forward error, a collective failure) the model is entirely unchanged.
#ifndef BNORM_NN_PRECISE_BN_H_
#define BNORM_NN_PRECISE_BN_H_

#include <cstdint>
#include <functional>

#include "bnorm/nn/layers.h"
#include "bnorm/status.h"

namespace bnorm {
class Communicator;
}

namespace bnorm::nn {

enum class PreciseBnAggregation : int { kMeanOfBatches = 0, kPopulation = 1 };

struct PreciseBnOptions {
  int64_t batches = 0;  // K >= 1
  PreciseBnAggregation aggregation = PreciseBnAggregation::kMeanOfBatches;
  Communicator* comm = nullptr;  // nullptr: this process alone
};

struct PreciseBnReport {
  int64_t layers = 0;   // batch-norm layers updated
  int64_t samples = 0;  // samples seen, summed over the ranks
};

// next_batch(k, &x) fills x with the k-th input batch (k = 0 .. K-1), any size N >= 1 the model
// accepts; an error it returns ends the call. Errors also: K < 1, an unknown aggregation, a model
// without batch-norm layers or with only frozen ones, a layer without running statistics
// (track_running_stats = false).
Status update_bn_stats(Sequential& model, const std::function<Status(int64_t, Tensor*)>& next_batch,
                       const PreciseBnOptions& options, PreciseBnReport* report = nullptr);

}  // namespace bnorm::nn

#endif  // BNORM_NN_PRECISE_BN_H_
