#include "bnorm/nn/precise_bn.h"

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "bnorm/comm.h"

namespace bnorm::nn {
namespace {

struct Site {
  BatchNormNd* bn = nullptr;
  std::string where;  // "module 1.4 (BatchNorm2d)"
};

void find_layers(Sequential& s, const std::string& prefix, std::vector<Site>* out) {
  for (size_t i = 0; i < s.size(); ++i) {
    Module& m = s.at(i);
    if (auto* seq = dynamic_cast<Sequential*>(&m)) {
      find_layers(*seq, prefix + std::to_string(i) + ".", out);
    } else if (auto* bn = dynamic_cast<BatchNormNd*>(&m)) {
      const char* type = dynamic_cast<BatchNorm2d*>(bn) != nullptr ? "BatchNorm2d" : "BatchNorm1d";
      out->push_back({bn, "module " + prefix + std::to_string(i) + " (" + type + ")"});
    }
  }
}

// The input of every batch-norm layer in the last forward of s (whose input was `in`), in the
// order of find_layers.
void find_inputs(const Sequential& s, const Tensor* in, std::vector<const Tensor*>* out) {
  for (size_t i = 0; i < s.size(); ++i) {
    const Tensor* xi = i == 0 ? in : &s.output(i - 1);
    const Module& m = s.at(i);
    if (const auto* seq = dynamic_cast<const Sequential*>(&m))
      find_inputs(*seq, xi, out);
    else if (dynamic_cast<const BatchNormNd*>(&m) != nullptr)
      out->push_back(xi);
  }
}

// A copy of every state entry's bytes, to put back.
struct Snapshot {
  std::vector<StateEntry> entries;
  std::vector<std::vector<unsigned char>> bytes;
  explicit Snapshot(Sequential& model) : entries(model.state_dict()) {
    for (const StateEntry& e : entries) {
      const size_t size = static_cast<size_t>(e.numel()) *
                          (e.dtype == DType::kF32 ? sizeof(float) : sizeof(int64_t));
      const auto* p = static_cast<const unsigned char*>(e.data);
      bytes.emplace_back(p, p + size);
    }
  }
  void restore() const {
    for (size_t i = 0; i < entries.size(); ++i)
      std::memcpy(entries[i].data, bytes[i].data(), bytes[i].size());
  }
};

// Per layer and channel, the sums of the aggregation (fp64).
struct Sums {
  std::vector<double> shift;   // p: the first batch's mean on rank 0
  std::vector<double> s0;      // sum n_b
  std::vector<double> s1;      // sum n_b (m_b - p)
  std::vector<double> s2;      // sum (n_b - 1) u_b + n_b (m_b - p)^2
  std::vector<double> mean_sum, var_sum;  // sum m_b, sum u_b
};

// st with `prefix` before its message, same code.
Status prefixed(const Status& st, const std::string& prefix) {
  switch (st.code()) {
    case StatusCode::kNonFinite:
      return Status::non_finite(prefix + st.message());
    case StatusCode::kInternal:
      return Status::internal(prefix + st.message());
    default:
      return Status::invalid_argument(prefix + st.message());
  }
}

}  // namespace

Status update_bn_stats(Sequential& model, const std::function<Status(int64_t, Tensor*)>& next_batch,
                       const PreciseBnOptions& options, PreciseBnReport* report) {
  const std::string fn = "update_bn_stats: ";
  if (options.batches < 1)
    return Status::invalid_argument(fn + "batches: must be >= 1, got " +
                                    std::to_string(options.batches));
  if (options.aggregation != PreciseBnAggregation::kMeanOfBatches &&
      options.aggregation != PreciseBnAggregation::kPopulation)
    return Status::invalid_argument(fn + "aggregation: unknown value " +
                                    std::to_string(static_cast<int>(options.aggregation)));
  if (!next_batch) return Status::invalid_argument(fn + "next_batch: is empty");
  std::vector<Site> all_sites, sites;
  std::vector<ptrdiff_t> input_of;  // sites[l]'s position in all_sites (and in find_inputs')
  find_layers(model, "", &all_sites);
  if (all_sites.empty()) return Status::invalid_argument(fn + "the model has no batch-norm layer");
  for (const Site& s : all_sites) {
    const BatchNormOptions& o = s.bn->layer().options();
    if (!o.track_running_stats)
      return Status::invalid_argument(fn + s.where +
                                      ": keeps no running statistics (track_running_stats=false)");
    // A layer whose running statistics are frozen keeps them: it runs as configured.
    if (!o.freeze_running_stats) {
      sites.push_back(s);
      input_of.push_back(&s - all_sites.data());
    }
  }
  if (sites.empty())
    return Status::invalid_argument(fn + "every batch-norm layer has frozen running statistics "
                                         "(freeze_running_stats): nothing to update");

  // Everything to put back: the state, each layer's mode and momentum, the model's mode.
  const Snapshot snapshot(model);
  const bool model_training = model.is_training();
  std::vector<bool> layer_training;
  std::vector<BatchNormOptions> saved_options;
  for (const Site& s : all_sites) layer_training.push_back(s.bn->is_training());
  for (const Site& s : sites) saved_options.push_back(s.bn->layer().options());
  auto restore = [&] {
    snapshot.restore();
    model.train(model_training);
    for (size_t l = 0; l < all_sites.size(); ++l) all_sites[l].bn->train(layer_training[l]);
    for (size_t l = 0; l < sites.size(); ++l) {  // each value was the layer's: valid
      bnorm::BatchNorm& layer = sites[l].bn->layer();
      const BatchNormOptions& o = saved_options[l];
      (void)layer.set_momentum(o.momentum);
      (void)layer.set_freeze(o.normalize_with_running_stats, o.freeze_running_stats,
                             o.freeze_affine);
      (void)layer.set_ghost_batch(o.ghost_batch);
      (void)layer.set_renorm_limits(o.renorm_rmax, o.renorm_dmax);
    }
  };

  // Each layer as plain batch norm in training mode with momentum 1: after each forward its
  // running statistics are that batch's mean and unbiased variance (the global batch's for a
  // synchronized layer). Ghost batches off (the statistics of the whole batch), batch renorm's
  // limits 1 and 0 (r = 1, d = 0: batch norm), normalization with the batch statistics.
  model.train(true);
  for (const Site& s : sites) {
    bnorm::BatchNorm& layer = s.bn->layer();
    (void)layer.set_momentum(1.0);
    (void)layer.set_freeze(false, false, layer.options().freeze_affine);
    (void)layer.set_ghost_batch(0);
    (void)layer.set_renorm_limits(1.0, 0.0);
  }

  Communicator* comm = options.comm;
  const bool rank0 = comm == nullptr || comm->rank() == 0;
  std::vector<Sums> sums(sites.size());
  for (size_t l = 0; l < sites.size(); ++l) {
    const size_t c = static_cast<size_t>(sites[l].bn->num_features());
    Sums& z = sums[l];
    for (auto* v : {&z.shift, &z.s0, &z.s1, &z.s2, &z.mean_sum, &z.var_sum}) v->assign(c, 0.0);
  }
  auto synced = [&](size_t l) {
    return comm != nullptr && sites[l].bn->layer().sync_communicator() != nullptr;
  };
  Tensor x, y;
  std::vector<const Tensor*> inputs;
  std::vector<double> counts(sites.size());
  int64_t samples = 0;
  for (int64_t k = 0; k < options.batches; ++k) {
    Status st = next_batch(k, &x);
    if (st.ok() && x.rank() < 1) st = Status::invalid_argument("batch " + std::to_string(k) + ": is empty");
    if (st.ok()) st = model.forward(x, &y);
    if (!st.ok()) {
      restore();
      return prefixed(st, fn + "batch " + std::to_string(k) + ": ");
    }
    samples += x.dim(0);
    inputs.clear();
    find_inputs(model, &x, &inputs);
    for (size_t l = 0; l < sites.size(); ++l)
      counts[l] = static_cast<double>(inputs[static_cast<size_t>(input_of[l])]->numel() /
                                      sites[l].bn->num_features());
    if (comm != nullptr) {
      // A synchronized layer's statistics are the global batch's: its count is the ranks' sum.
      st = comm->allreduce_sum(std::span<double>(counts));
      if (!st.ok()) {
        restore();
        return prefixed(st, fn + "batch " + std::to_string(k) + ": ");
      }
      for (size_t l = 0; l < sites.size(); ++l)
        if (!synced(l)) counts[l] = static_cast<double>(inputs[static_cast<size_t>(input_of[l])]->numel() /
                                      sites[l].bn->num_features());
    }
    if (k == 0) {
      // The shift p, the same on every rank: rank 0's first batch means.
      std::vector<double> shift;
      for (size_t l = 0; l < sites.size(); ++l)
        for (float m : sites[l].bn->layer().running_mean()) shift.push_back(rank0 ? m : 0.0);
      if (comm != nullptr) {
        st = comm->allreduce_sum(std::span<double>(shift));
        if (!st.ok()) {
          restore();
          return prefixed(st, fn);
        }
      }
      size_t at = 0;
      for (Sums& z : sums)
        for (double& p : z.shift) p = shift[at++];
    }
    for (size_t l = 0; l < sites.size(); ++l) {
      const bnorm::BatchNorm& layer = sites[l].bn->layer();
      Sums& z = sums[l];
      const double n = counts[l];
      for (size_t ch = 0; ch < z.shift.size(); ++ch) {
        const double m = layer.running_mean()[ch], u = layer.running_var()[ch];
        const double d = m - z.shift[ch];
        z.s0[ch] += n;
        z.s1[ch] += n * d;
        z.s2[ch] += (n - 1) * u + n * d * d;
        z.mean_sum[ch] += m;
        z.var_sum[ch] += u;
      }
    }
  }
  double batches = static_cast<double>(options.batches);
  if (comm != nullptr) {
    // Pool the ranks' sums; a synchronized layer's are already global and identical on every
    // rank, so only rank 0 contributes them (the sum is then rank 0's value exactly).
    std::vector<double> all;
    for (size_t l = 0; l < sites.size(); ++l) {
      const bool contribute = !synced(l) || rank0;
      for (auto* v : {&sums[l].s0, &sums[l].s1, &sums[l].s2, &sums[l].mean_sum, &sums[l].var_sum})
        for (double e : *v) all.push_back(contribute ? e : 0.0);
    }
    std::vector<double> extra = {static_cast<double>(samples)};
    Status st = comm->allreduce_sum(std::span<double>(all));
    if (st.ok()) st = comm->allreduce_sum(std::span<double>(extra));
    if (!st.ok()) {
      restore();
      return prefixed(st, fn);
    }
    size_t at = 0;
    for (size_t l = 0; l < sites.size(); ++l)
      for (auto* v : {&sums[l].s0, &sums[l].s1, &sums[l].s2, &sums[l].mean_sum, &sums[l].var_sum})
        for (double& e : *v) e = all[at++];
    samples = static_cast<int64_t>(extra[0]);
  }

  restore();
  for (size_t l = 0; l < sites.size(); ++l) {
    bnorm::BatchNorm& layer = sites[l].bn->layer();
    const Sums& z = sums[l];
    const double nb = synced(l) || comm == nullptr ? batches : batches * comm->size();
    for (size_t ch = 0; ch < z.shift.size(); ++ch) {
      double mean, var;
      if (options.aggregation == PreciseBnAggregation::kMeanOfBatches) {
        mean = z.mean_sum[ch] / nb;
        var = z.var_sum[ch] / nb;
      } else {
        mean = z.shift[ch] + z.s1[ch] / z.s0[ch];
        var = (z.s2[ch] - z.s1[ch] * z.s1[ch] / z.s0[ch]) / (z.s0[ch] - 1);
      }
      layer.running_mean()[ch] = static_cast<float>(mean);
      layer.running_var()[ch] = static_cast<float>(var);
    }
  }
  if (report != nullptr) {
    report->layers = static_cast<int64_t>(sites.size());
    report->samples = samples;
  }
  return Status();
}

}  // namespace bnorm::nn
