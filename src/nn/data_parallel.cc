#include "bnorm/nn/data_parallel.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "bnorm/nn/loss.h"

namespace bnorm::nn {
namespace {

constexpr uint64_t kFnvOffset = 1469598103934665603ULL;
constexpr uint64_t kFnvPrime = 1099511628211ULL;

void fnv(uint64_t* h, const void* data, size_t bytes) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < bytes; ++i) *h = (*h ^ p[i]) * kFnvPrime;
}

template <class T>
void fnv_value(uint64_t* h, T v) {
  fnv(h, &v, sizeof v);
}

size_t entry_bytes(const StateEntry& e) {
  return static_cast<size_t>(e.numel()) * (e.dtype == DType::kI64 ? 8 : 4);
}

// What the ranks must agree on besides the values: names, dtypes, shapes and flags.
void hash_layout(uint64_t* h, const std::vector<StateEntry>& state) {
  fnv_value(h, static_cast<uint64_t>(state.size()));
  for (const StateEntry& e : state) {
    fnv(h, e.name.data(), e.name.size() + 1);  // with the terminating NUL: "ab"+"c" != "a"+"bc"
    fnv_value(h, static_cast<int32_t>(e.dtype));
    fnv_value(h, static_cast<uint64_t>(e.shape.size()));
    for (int64_t d : e.shape) fnv_value(h, d);
    fnv_value(h, static_cast<uint8_t>(e.is_parameter));
    fnv_value(h, static_cast<uint8_t>(e.grad_is_global));
  }
}

uint64_t layout_hash(const std::vector<StateEntry>& state) {
  uint64_t h = kFnvOffset;
  hash_layout(&h, state);
  return h >> 16;
}

uint64_t full_hash(const std::vector<StateEntry>& state) {
  uint64_t h = kFnvOffset;
  hash_layout(&h, state);
  for (const StateEntry& e : state) fnv(&h, e.data, entry_bytes(e));
  return h >> 16;
}

// Every rank's value, by rank: each rank fills its own slot, the others add 0 (exact).
Status gather(Communicator& comm, double mine, std::vector<double>* all) {
  all->assign(static_cast<size_t>(comm.size()), 0.0);
  (*all)[static_cast<size_t>(comm.rank())] = mine;
  return comm.allreduce_sum(*all);
}

std::string rank_name(int r) { return "rank " + std::to_string(r); }

// After the hashes of every rank disagreed: a second exchange tells a layout (or, from
// create, options) mismatch from diverged values. Every rank sees the same hashes, so every rank
// makes this exchange.
Status explain_mismatch(Communicator& comm, const std::vector<double>& hashes, uint64_t layout,
                        uint64_t options, const std::string& values_message) {
  const int k = comm.size();
  int bad = 1;
  while (bad < k && hashes[static_cast<size_t>(bad)] == hashes[0]) ++bad;
  std::vector<double> parts(static_cast<size_t>(2 * k), 0.0);
  parts[static_cast<size_t>(2 * comm.rank())] = static_cast<double>(layout);
  parts[static_cast<size_t>(2 * comm.rank() + 1)] = static_cast<double>(options);
  BNORM_RETURN_IF_ERROR(comm.allreduce_sum(parts));
  const size_t b = static_cast<size_t>(bad);
  if (parts[2 * b + 1] != parts[1])
    return Status::invalid_argument(
        rank_name(bad) + "'s data-parallel options differ from rank 0's (global_batch, "
                         "sync_batch_norm or sync_mode): every rank must pass the same");
  if (parts[2 * b] != parts[0])
    return Status::invalid_argument(
        rank_name(bad) + "'s model has another layout than rank 0's (entry names, shapes, dtypes "
                         "or flags): the ranks must build the same model");
  return Status::internal(rank_name(bad) + "'s " + values_message);
}

// The exchange of create and check_replicas: every rank's hash (or -1: this rank failed before
// it, with `mine` saying why).
Status compare_hashes(Communicator& comm, const Status& mine, uint64_t hash, uint64_t layout,
                      uint64_t options, const std::string& what,
                      const std::string& values_message) {
  std::vector<double> hashes;
  BNORM_RETURN_IF_ERROR(gather(comm, mine.ok() ? static_cast<double>(hash) : -1.0, &hashes));
  if (!mine.ok()) return mine;
  for (int r = 0; r < comm.size(); ++r)
    if (hashes[static_cast<size_t>(r)] < 0)
      return Status::invalid_argument(what + ": " + rank_name(r) +
                                      " failed (see its message); every rank stops");
  for (int r = 1; r < comm.size(); ++r)
    if (hashes[static_cast<size_t>(r)] != hashes[0])
      return explain_mismatch(comm, hashes, layout, options, values_message);
  return Status();
}

uint64_t options_hash(const DataParallelOptions& o) {
  uint64_t h = kFnvOffset;
  fnv_value(&h, o.global_batch);
  fnv_value(&h, static_cast<uint8_t>(o.sync_batch_norm));
  fnv_value(&h, static_cast<int32_t>(o.sync_mode));
  return h >> 16;
}

// A failed rank's contribution to the count correct of a distributed evaluation: every true
// count is in [0, samples], so any negative sum says "a rank failed". Exact in a double.
constexpr double kEvalFailed = -1099511627776.0;  // -2^40

}  // namespace

int64_t shard_begin(int64_t n, int k, int r) { return n / k * r + std::min<int64_t>(r, n % k); }

std::vector<int64_t> shard_sizes(int64_t n, int k) {
  std::vector<int64_t> sizes(static_cast<size_t>(k));
  for (int r = 0; r < k; ++r)
    sizes[static_cast<size_t>(r)] = shard_begin(n, k, r + 1) - shard_begin(n, k, r);
  return sizes;
}

Status agree(Communicator* comm, const Status& mine, const std::string& what) {
  if (comm == nullptr) return mine;
  std::vector<double> flags;
  BNORM_RETURN_IF_ERROR(gather(*comm, mine.ok() ? 0.0 : 1.0, &flags));
  if (!mine.ok()) return mine;
  for (int r = 0; r < comm->size(); ++r)
    if (flags[static_cast<size_t>(r)] != 0)
      return Status::invalid_argument(what + ": " + rank_name(r) +
                                      " failed (see its message); every rank stops");
  return Status();
}

uint64_t state_hash(Module& model) { return full_hash(model.state_dict()); }

Status check_replicas(Communicator* comm, Module& model, int64_t step) {
  if (comm == nullptr || comm->size() == 1) return Status();
  const std::vector<StateEntry> state = model.state_dict();
  return compare_hashes(*comm, Status(), full_hash(state), layout_hash(state), 0,
                        "check_replicas",
                        "parameters or buffers differ from rank 0's after step " +
                            std::to_string(step) + " (replicas diverged)");
}

Status evaluate_classifier_range(Module& model, const ClassificationData& data, int64_t begin,
                                 int64_t end, int64_t batch_size, double* loss_sum,
                                 int64_t* correct,
                                 const std::function<void(int64_t rows)>& on_batch) {
  if (loss_sum == nullptr || correct == nullptr)
    return Status::invalid_argument("evaluate_classifier: loss_sum and correct must not be null");
  if (batch_size < 1)
    return Status::invalid_argument("evaluate_classifier: batch_size: must be >= 1, got " +
                                    std::to_string(batch_size));
  if (begin < 0 || begin > end || end > data.count())
    return Status::invalid_argument("evaluate_classifier: samples [" + std::to_string(begin) +
                                    ", " + std::to_string(end) + "): not within the data's " +
                                    std::to_string(data.count()));
  if (begin < end && data.inputs == nullptr)
    return Status::invalid_argument("evaluate_classifier: data.inputs: is null");
  const int64_t sample = data.sample_numel();
  Tensor x, logits;
  std::vector<int64_t> shape(data.sample_shape.size() + 1);
  std::copy(data.sample_shape.begin(), data.sample_shape.end(), shape.begin() + 1);
  double total = 0;
  int64_t right = 0;
  for (int64_t start = begin; start < end; start += batch_size) {
    const int64_t rows = std::min(batch_size, end - start);
    shape[0] = rows;
    x.resize(shape);
    std::copy_n(data.inputs + start * sample, rows * sample, x.data());
    BNORM_RETURN_IF_ERROR(model.forward(x, &logits));
    CrossEntropyResult r;
    BNORM_RETURN_IF_ERROR(
        softmax_cross_entropy(logits, data.labels.subspan(static_cast<size_t>(start),
                                                          static_cast<size_t>(rows)),
                              &r));
    total += r.loss * static_cast<double>(rows);
    right += r.correct;
    if (on_batch) on_batch(rows);
  }
  *loss_sum = total;
  *correct = right;
  return Status();
}

Status evaluate_classifier(Module& model, const ClassificationData& data, int64_t batch_size,
                           EvalResult* out, const std::function<void(int64_t rows)>& on_batch) {
  if (out == nullptr) return Status::invalid_argument("evaluate_classifier: out: is null");
  if (data.count() < 1)
    return Status::invalid_argument("evaluate_classifier: data: has no samples");
  double loss_sum = 0;
  int64_t correct = 0;
  BNORM_RETURN_IF_ERROR(evaluate_classifier_range(model, data, 0, data.count(), batch_size,
                                                  &loss_sum, &correct, on_batch));
  out->loss = loss_sum / static_cast<double>(data.count());
  out->accuracy = static_cast<double>(correct) / static_cast<double>(data.count());
  return Status();
}

Status DataParallel::create(Communicator* comm, Module* model, const DataParallelOptions& options,
                            DataParallel* out) {
  const int ranks = comm != nullptr ? comm->size() : 1;
  const int rank = comm != nullptr ? comm->rank() : 0;
  Status mine;
  if (model == nullptr || out == nullptr)
    mine = Status::invalid_argument("DataParallel::create: model and out must not be null");
  else if (options.global_batch < ranks)
    mine = Status::invalid_argument(
        "DataParallel::create: global_batch: " + std::to_string(options.global_batch) +
        " is smaller than the " + std::to_string(ranks) + " ranks (each needs a sample)");
  else if (options.sync_mode != SyncMode::kReproducible && options.sync_mode != SyncMode::kPerRank)
    mine = Status::invalid_argument("DataParallel::create: sync_mode: unknown value " +
                                    std::to_string(static_cast<int>(options.sync_mode)));

  DataParallel dp;
  if (mine.ok()) {
    dp.comm_ = comm;
    dp.model_ = model;
    dp.rank_ = rank;
    dp.ranks_ = ranks;
    dp.global_batch_ = options.global_batch;
    dp.split_ = shard_sizes(options.global_batch, ranks);
    dp.shard_begin_ = nn::shard_begin(options.global_batch, ranks, rank);
    dp.gradient_scale_ = static_cast<float>(static_cast<double>(dp.shard_size()) /
                                            static_cast<double>(options.global_batch));
    dp.sync_batch_norm_ = comm != nullptr && options.sync_batch_norm;
    if (dp.sync_batch_norm_) {
      model->set_sync(comm, options.sync_mode);
      model->set_sync_split(dp.split_);
    }
  }
  // Every rank starts from the same parameters; checked (the one exchange of create).
  if (ranks > 1) {
    uint64_t hash = 0, layout = 0;
    if (mine.ok()) {
      const std::vector<StateEntry> state = model->state_dict();
      layout = layout_hash(state);
      hash = full_hash(state) ^ options_hash(options);
    }
    Status s = compare_hashes(*comm, mine, hash, layout, options_hash(options),
                              "DataParallel::create",
                              "parameters or buffers differ from rank 0's at the start: the "
                              "replicas must start equal (build them from the same seed)");
    if (!s.ok()) {
      if (mine.ok() && dp.sync_batch_norm_) model->set_sync(nullptr, options.sync_mode);
      return s;
    }
    dp.replica_checks_ = 1;
  } else if (!mine.ok()) {
    return mine;
  }

  // The fused buffer of every step: the gradients the ranks must sum (not the synchronized
  // batch norms': those are the global batch's already), then without sync BN rank 0's
  // batch-norm buffers, then the loss and the number correct.
  if (dp.distributed()) {
    size_t fused = 2;
    for (const StateEntry& e : model->state_dict()) {
      if (e.is_parameter && !e.grad_is_global) dp.segments_.push_back({e.grad, e.numel(), false});
      if (!e.is_parameter && e.dtype == DType::kF32 && !dp.sync_batch_norm_)
        dp.segments_.push_back({static_cast<float*>(e.data), e.numel(), true});
    }
    for (const Segment& seg : dp.segments_) fused += static_cast<size_t>(seg.n);
    dp.fused_.assign(fused, 0.0f);
  }
  *out = std::move(dp);
  return Status();
}

Status DataParallel::check_replicas(int64_t step) {
  if (model_ == nullptr)
    return Status::invalid_argument("DataParallel: not created (DataParallel::create)");
  BNORM_RETURN_IF_ERROR(nn::check_replicas(comm_, *model_, step));
  if (distributed()) ++replica_checks_;
  return Status();
}

Status DataParallel::allreduce_gradients(double* loss, int64_t* correct) {
  if (loss == nullptr || correct == nullptr)
    return Status::invalid_argument("DataParallel::allreduce_gradients: loss and correct must "
                                    "not be null");
  if (!distributed()) return Status();
  const bool lead = rank_ == 0;
  float* at = fused_.data();
  for (const Segment& seg : segments_) {
    if (seg.from_lead && !lead) std::fill(at, at + seg.n, 0.0f);
    else std::copy(seg.data, seg.data + seg.n, at);
    at += seg.n;
  }
  at[0] = static_cast<float>(*loss * static_cast<double>(shard_size()));
  at[1] = static_cast<float>(*correct);
  BNORM_RETURN_IF_ERROR(comm_->allreduce_sum(fused_));
  at = fused_.data();
  for (const Segment& seg : segments_) {
    std::copy(at, at + seg.n, seg.data);
    at += seg.n;
  }
  *loss = static_cast<double>(at[0]) / static_cast<double>(global_batch_);
  *correct = static_cast<int64_t>(at[1]);
  return Status();
}

Status DataParallel::train_step(const Tensor& x, std::span<const int32_t> labels, Sgd* sgd,
                                StepResult* out) {
  if (model_ == nullptr)
    return Status::invalid_argument("DataParallel: not created (DataParallel::create)");
  if (sgd == nullptr || out == nullptr)
    return Status::invalid_argument("DataParallel::train_step: sgd and out must not be null");
  const int64_t n = shard_size();
  if (x.rank() < 1 || x.dim(0) != n || static_cast<int64_t>(labels.size()) != n)
    return Status::invalid_argument(
        "DataParallel::train_step: rank " + std::to_string(rank_) + " expected its shard of " +
        std::to_string(n) + " samples (of the global batch " + std::to_string(global_batch_) +
        "), got x " + x.size_string() + " and " + std::to_string(labels.size()) + " labels");
  model_->zero_grad();
  BNORM_RETURN_IF_ERROR(model_->forward(x, &logits_));
  CrossEntropyResult r;
  BNORM_RETURN_IF_ERROR(softmax_cross_entropy(logits_, labels, &r, &dlogits_));
  if (distributed()) {
    // The gradient of the global batch's mean loss: this rank's mean times its share.
    float* d = dlogits_.data();
    for (int64_t i = 0; i < dlogits_.numel(); ++i) d[i] *= gradient_scale_;
  } else if (!std::isfinite(r.loss)) {
    *out = StepResult{r.loss, r.correct, false};
    return Status();
  }
  BNORM_RETURN_IF_ERROR(model_->backward(dlogits_, nullptr));
  double loss = r.loss;
  int64_t correct = r.correct;
  BNORM_RETURN_IF_ERROR(allreduce_gradients(&loss, &correct));
  // Every rank sees the same global loss: all stop together.
  if (!std::isfinite(loss)) {
    *out = StepResult{loss, correct, false};
    return Status();
  }
  sgd->step();
  *out = StepResult{loss, correct, true};
  return Status();
}

Status DataParallel::evaluate(const ClassificationData& data, int64_t batch_size,
                              EvalResult* out, const std::function<void(int64_t rows)>& on_batch) {
  if (model_ == nullptr)
    return Status::invalid_argument("DataParallel: not created (DataParallel::create)");
  if (!distributed()) return evaluate_classifier(*model_, data, batch_size, out, on_batch);
  double loss_sum = 0;
  int64_t correct = 0;
  Status mine;
  if (out == nullptr) mine = Status::invalid_argument("DataParallel::evaluate: out: is null");
  else if (data.count() < 1) mine = Status::invalid_argument("DataParallel::evaluate: data: has no samples");
  else if (model_->is_training())
    mine = Status::invalid_argument("DataParallel::evaluate: the model is in training mode: "
                                    "evaluate in eval mode (train(false))");
  const int64_t n = data.count();
  if (mine.ok())
    mine = evaluate_classifier_range(*model_, data, nn::shard_begin(n, ranks_, rank_),
                                     nn::shard_begin(n, ranks_, rank_ + 1), batch_size, &loss_sum,
                                     &correct, on_batch);
  std::vector<double> sums = {mine.ok() ? loss_sum : 0.0,
                              mine.ok() ? static_cast<double>(correct) : kEvalFailed};
  BNORM_RETURN_IF_ERROR(comm_->allreduce_sum(sums));
  if (!mine.ok()) return mine;
  if (sums[1] < 0)
    return Status::invalid_argument(
        "evaluation: a rank failed (see its message); every rank stops");
  out->loss = sums[0] / static_cast<double>(n);
  out->accuracy = sums[1] / static_cast<double>(n);
  return Status();
}

}  // namespace bnorm::nn
