#include "explain.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <numeric>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/io/safetensors.h"
#include "bnorm/nn/layers.h"
#include "training.h"

namespace bnorm::tools {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

constexpr int64_t kSelectedFeatures = 6;
constexpr int64_t kPopulationBatch = 1000;

Json num(double v) { return std::isfinite(v) ? Json(v) : Json(nullptr); }

Json nums(const std::vector<double>& v) {
  Json a = Json::array();
  for (double d : v) a.push_back(num(d));
  return a;
}

// Mean and biased variance in fp64, two passes.
void moments(const std::vector<float>& v, double* mean, double* var) {
  double s = 0;
  for (float x : v) s += x;
  const double m = s / static_cast<double>(v.size());
  double q = 0;
  for (float x : v) q += (x - m) * (x - m);
  *mean = m;
  *var = q / static_cast<double>(v.size());
}

double quantile_sorted(const std::vector<float>& sorted, double p) {
  const double pos = p * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  const double t = pos - static_cast<double>(lo);
  return (1 - t) * sorted[lo] + t * sorted[hi];
}

double median(std::vector<double> v) {
  std::erase_if(v, [](double d) { return !std::isfinite(d); });
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double d : v) m = std::max(m, std::fabs(d));
  return m;
}

Json range_summary(const std::vector<double>& v) {
  Json s;
  s["min"] = num(*std::min_element(v.begin(), v.end()));
  s["median"] = num(median(v));
  s["max"] = num(*std::max_element(v.begin(), v.end()));
  return s;
}

// A tensor laid out channels-first (N, C, S...) seen as N x C x S.
struct Planes {
  int64_t n = 0, c = 0, s = 1;
  explicit Planes(const nn::Tensor& t) : n(t.dim(0)), c(t.dim(1)) {
    for (int i = 2; i < t.rank(); ++i) s *= t.dim(i);
  }
  int64_t per_feature() const { return n * s; }
};

// Values of feature f of t (N, C, S...), every sample and position.
std::vector<float> feature_values(const nn::Tensor& t, int64_t f) {
  const Planes p(t);
  std::vector<float> v;
  v.reserve(static_cast<size_t>(p.per_feature()));
  for (int64_t i = 0; i < p.n; ++i) {
    const float* plane = t.data() + (i * p.c + f) * p.s;
    v.insert(v.end(), plane, plane + p.s);
  }
  return v;
}

// Runs modules [0, stop) of model on x; *in receives the input of module `stop`.
Status forward_to(nn::Sequential& model, size_t stop, const nn::Tensor& x,
                  std::vector<nn::Tensor>* buffers, const nn::Tensor** in) {
  buffers->resize(std::max<size_t>(stop, 1));
  const nn::Tensor* cur = &x;
  for (size_t i = 0; i < stop; ++i) {
    const Status s = model.at(i).forward(*cur, &(*buffers)[i]);
    if (!s.ok()) return Status::invalid_argument(std::to_string(i) + ": " + s.message());
    cur = &(*buffers)[i];
  }
  *in = cur;
  return Status();
}

// Per-channel count, mean and sum of squared deviations, merged batch by batch (Chan et al.):
// the population statistics of a layer's input over a whole data set, in fp64.
struct PopulationMoments {
  std::vector<double> count, mean, m2;
  void add(const nn::Tensor& t) {
    const Planes p(t);
    if (mean.empty()) count.assign(p.c, 0), mean.assign(p.c, 0), m2.assign(p.c, 0);
    for (int64_t f = 0; f < p.c; ++f) {
      double bm, bv;
      moments(feature_values(t, f), &bm, &bv);
      const double nb = static_cast<double>(p.per_feature());
      const double n = count[f] + nb;
      const double d = bm - mean[f];
      mean[f] += d * nb / n;
      m2[f] += bv * nb + d * d * count[f] * nb / n;
      count[f] = n;
    }
  }
};

// Per-feature quantiles of t (N, C, S...): min, 5th, 25th, 50th, 75th, 95th percentile, max.
struct Quantiles {
  static constexpr const char* kNames[] = {"min", "p05", "p25", "p50", "p75", "p95", "max"};
  static constexpr double kLevels[] = {0.0, 0.05, 0.25, 0.50, 0.75, 0.95, 1.0};
  std::vector<std::vector<double>> q;  // [level][feature]
  explicit Quantiles(const nn::Tensor& t) : q(std::size(kLevels)) {
    for (int64_t f = 0; f < t.dim(1); ++f) {
      std::vector<float> v = feature_values(t, f);
      std::sort(v.begin(), v.end());
      for (size_t l = 0; l < q.size(); ++l) q[l].push_back(quantile_sorted(v, kLevels[l]));
    }
  }
  // Adds "<prefix>_min", "<prefix>_p05", ... to json.
  void put(const std::string& prefix, Json* json) const {
    for (size_t l = 0; l < q.size(); ++l) (*json)[prefix + "_" + kNames[l]] = nums(q[l]);
  }
};

std::string module_name(const nn::Module& m) {
  std::string r = m.repr();
  return r.substr(0, r.find('\n'));
}

// Moves the files of staging into dir (replacing same-named ones) and removes staging.
Status publish(const fs::path& staging, const fs::path& dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(staging, ec)) {
    fs::rename(e.path(), dir / e.path().filename(), ec);
    if (ec) break;
  }
  if (ec) return Status::invalid_argument(dir.string() + ": cannot write (" + ec.message() + ")");
  fs::remove_all(staging, ec);
  return Status();
}

}  // namespace

Status run_explain(const ExplainConfig& config, const io::Dataset* train_given) {
  if (config.out_dir.empty()) return Status::invalid_argument("--out: required");
  if (config.batch_size == 0 || config.batch_size == 1 || config.batch_size < -1)
    return Status::invalid_argument("--batch-size: " + std::to_string(config.batch_size) +
                                    " is too small: batch norm needs at least 2 examples");
  if (config.threads > 0) nn::set_num_threads(config.threads);

  // The network, its BatchNorm layers, the layer asked for.
  EvalConfig ec;
  ec.checkpoint = config.checkpoint;
  ec.preset = config.preset;
  ec.batch_norm = config.batch_norm;
  ec.normalize = config.normalize;
  nn::Sequential model;
  CheckpointInfo info;
  BNORM_RETURN_IF_ERROR(load_checkpoint(ec, &model, &info));
  std::vector<size_t> bn_at;
  for (size_t i = 0; i < model.size(); ++i)
    if (dynamic_cast<const nn::BatchNormNd*>(&model.at(i)) != nullptr) bn_at.push_back(i);
  if (bn_at.empty())
    return Status::invalid_argument(config.checkpoint + ": the network has no BatchNorm layer (" +
                                    info.preset + " without batch norm): nothing to explain");
  const int64_t layers = static_cast<int64_t>(bn_at.size());
  if (config.layer < 1 || config.layer > layers)
    return Status::invalid_argument("--layer " + std::to_string(config.layer) +
                                    ": out of range, the network has " + std::to_string(layers) +
                                    " BatchNorm layers (1.." + std::to_string(layers) + ")");
  const size_t at = bn_at[static_cast<size_t>(config.layer - 1)];
  auto& bn_module = dynamic_cast<nn::BatchNormNd&>(model.at(at));
  const bnorm::BatchNorm& bn = bn_module.layer();
  const BatchNormOptions& opt = bn.options();
  const int64_t C = bn.num_features();

  int64_t batch = config.batch_size;
  if (batch < 0) {
    auto it = info.metadata.find("batch_size");
    batch = it != info.metadata.end() ? std::atoll(it->second.c_str()) : 0;
    if (batch < 2) batch = info.preset == "cnn" ? 128 : 60;
  }

  // The training set.
  io::Dataset train_loaded;
  if (train_given == nullptr) {
    const std::string dir =
        config.data_dir.empty() ? std::string(io::kDefaultFashionMnistDir) : config.data_dir;
    std::string images, labels;
    BNORM_RETURN_IF_ERROR(io::find_idx_file(dir, "train-images-idx3-ubyte", &images));
    BNORM_RETURN_IF_ERROR(io::find_idx_file(dir, "train-labels-idx1-ubyte", &labels));
    io::DataOptions options;
    options.normalize = info.normalize;
    BNORM_RETURN_IF_ERROR(io::load_idx_dataset(images, labels, options, &train_loaded));
  }
  const io::Dataset& train = train_given != nullptr ? *train_given : train_loaded;
  if (batch > train.count)
    return Status::invalid_argument("--batch-size: " + std::to_string(batch) + " exceeds the " +
                                    std::to_string(train.count) + " training examples");

  // What inference uses: the running statistics the checkpoint keeps.
  const bool tracked = opt.track_running_stats;
  std::vector<double> running_mean(C, NAN), running_var(C, NAN), gamma(C, 1.0), beta(C, 0.0);
  if (tracked)
    for (int64_t f = 0; f < C; ++f)
      running_mean[f] = bn.running_mean()[f], running_var[f] = bn.running_var()[f];
  if (opt.affine)
    for (int64_t f = 0; f < C; ++f) gamma[f] = bn.weight()[f], beta[f] = bn.bias()[f];

  // Step 5's reference: the population statistics of the layer's input over the training set,
  // weights fixed, every module before it in eval mode (as at inference).
  if (!config.quiet)
    std::fprintf(stderr, "bnorm explain: population statistics of layer %zu's input over %lld "
                         "training images...\n", at, static_cast<long long>(train.count));
  model.train(false);
  PopulationMoments pop;
  std::vector<nn::Tensor> buffers;
  nn::Tensor x;
  const nn::Tensor* in = nullptr;
  for (int64_t start = 0; start < train.count; start += kPopulationBatch) {
    const int64_t rows = std::min(kPopulationBatch, train.count - start);
    x.resize(input_shape(info.preset, rows));
    std::copy_n(train.images.data() + start * train.image_size(), rows * train.image_size(),
                x.data());
    BNORM_RETURN_IF_ERROR(forward_to(model, at, x, &buffers, &in));
    pop.add(*in);
  }
  std::vector<double> pop_mean = pop.mean, pop_var(C);
  for (int64_t f = 0; f < C; ++f) pop_var[f] = pop.m2[f] / pop.count[f];

  // Steps 1-4 on a real mini-batch: the first one `bnorm train --seed S` draws, through the
  // modules before the layer in training mode (as during training).
  io::BatchSampler sampler(train.count, batch, config.seed, /*drop_last=*/true);
  const std::vector<int64_t> indices = sampler.next();
  std::vector<int32_t> labels(static_cast<size_t>(batch));
  x.resize(input_shape(info.preset, batch));
  io::gather_batch(train, indices.data(), batch, x.data(), labels.data());
  model.train(true);
  BNORM_RETURN_IF_ERROR(forward_to(model, at, x, &buffers, &in));
  const nn::Tensor input = *in;
  const Planes planes(input);
  const int64_t per_feature = planes.per_feature();

  // The library's training forward, on its own buffers: momentum 1 makes the "running"
  // statistics the batch's own (mean, unbiased variance); save_mean / save_invstd are what it
  // normalizes with; y is the layer's output.
  std::vector<float> gamma_f(C), beta_f(C), batch_mean_f(C, 0.0f), batch_uvar_f(C, 0.0f),
      save_mean(C), save_invstd(C);
  for (int64_t f = 0; f < C; ++f) gamma_f[f] = static_cast<float>(gamma[f]), beta_f[f] = static_cast<float>(beta[f]);
  nn::Tensor y(input.shape());
  ForwardTrainArgs args;
  args.x = input.view();
  args.weight = gamma_f;
  args.bias = beta_f;
  args.running_mean = batch_mean_f;
  args.running_var = batch_uvar_f;
  args.momentum = 1.0;
  args.eps = opt.eps;
  args.y = y.view();
  args.save_mean = save_mean;
  args.save_invstd = save_invstd;
  BNORM_RETURN_IF_ERROR(bnorm::forward_train(args));

  const double n = static_cast<double>(per_feature);
  std::vector<double> batch_mean(C), batch_var(C), xhat_mean(C), xhat_var(C), y_mean(C), y_var(C),
      fp64_mean_diff(C), fp64_var_rel(C);
  nn::Tensor xhat(input.shape());
  double y_check = 0;
  for (int64_t f = 0; f < C; ++f) {
    batch_mean[f] = batch_mean_f[f];
    batch_var[f] = static_cast<double>(batch_uvar_f[f]) * (n - 1) / n;  // biased, as BN uses
    std::vector<float> v = feature_values(input, f);
    double m64, v64;
    moments(v, &m64, &v64);
    fp64_mean_diff[f] = batch_mean[f] - m64;
    fp64_var_rel[f] = v64 > 0 ? (batch_var[f] - v64) / v64 : batch_var[f];
    for (int64_t i = 0; i < planes.n; ++i) {
      const int64_t off = (i * C + f) * planes.s;
      for (int64_t s = 0; s < planes.s; ++s) {
        const float h = (input[off + s] - save_mean[f]) * save_invstd[f];
        xhat[off + s] = h;
        y_check = std::max(y_check, std::fabs(static_cast<double>(y[off + s]) -
                                              (gamma[f] * h + beta[f])));
      }
    }
    moments(feature_values(xhat, f), &xhat_mean[f], &xhat_var[f]);
    moments(feature_values(y, f), &y_mean[f], &y_var[f]);
  }
  const Quantiles in_q(input), xhat_q(xhat), y_q(y);

  // The features drawn one by one: kSelectedFeatures spread evenly over the ranks of the batch
  // mean (lowest to highest), so that they differ as the seed's Step 1 shows.
  std::vector<int64_t> order(C);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return batch_mean[a] < batch_mean[b]; });
  const int64_t k = std::min(kSelectedFeatures, C);
  std::vector<int64_t> selected;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t rank = k == 1 ? 0 : std::llround(static_cast<double>(j * (C - 1)) / static_cast<double>(k - 1));
    selected.push_back(order[rank]);
  }

  // How far the moving averages are from the population: the mean's gap in population standard
  // deviations (what it shifts x-hat by at inference), the variance's ratio.
  std::vector<double> gap_mean(C, NAN), ratio_var(C, NAN);
  for (int64_t f = 0; f < C; ++f) {
    gap_mean[f] = (running_mean[f] - pop_mean[f]) / std::sqrt(pop_var[f] + opt.eps);
    ratio_var[f] = (running_var[f] + opt.eps) / (pop_var[f] + opt.eps);
  }
  std::vector<double> abs_gap(C), log_ratio(C);
  for (int64_t f = 0; f < C; ++f)
    abs_gap[f] = std::fabs(gap_mean[f]), log_ratio[f] = std::fabs(std::log(ratio_var[f]));

  // ----- explain.json -----
  Json j;
  j["tool"] = "bnorm explain";
  j["bnorm_version"] = bnorm::version();
  j["checkpoint"] = fs::path(config.checkpoint).filename().string();
  j["preset"] = info.preset;
  if (auto it = info.metadata.find("steps"); it != info.metadata.end())
    j["trained_steps"] = std::atoll(it->second.c_str());
  Json L;
  L["k"] = config.layer;
  L["count"] = layers;
  L["module_index"] = at;
  L["name"] = std::to_string(at);  // its state_dict prefix
  L["repr"] = module_name(bn_module);
  L["after"] = at > 0 ? Json(module_name(model.at(at - 1))) : Json(nullptr);
  L["before"] = at + 1 < model.size() ? Json(module_name(model.at(at + 1))) : Json(nullptr);
  L["num_features"] = C;
  L["eps"] = opt.eps;
  L["momentum"] = opt.momentum ? Json(*opt.momentum) : Json(nullptr);
  L["affine"] = opt.affine;
  L["track_running_stats"] = tracked;
  L["num_batches_tracked"] = bn_module.num_batches_tracked();  // the state_dict's counter
  L["input_shape"] = input.shape();
  L["values_per_feature"] = per_feature;
  j["layer"] = L;
  Json B;
  B["size"] = batch;
  B["seed"] = config.seed;
  B["source"] = "training set: the first mini-batch bnorm train --seed S draws (no augmentation)";
  B["indices"] = indices;
  B["labels"] = labels;
  B["modules_before_layer"] = "training mode (batch statistics), as in training";
  j["batch"] = B;
  j["selected_features"] = selected;
  j["selection"] = std::to_string(k) +
                   " features spread evenly over the ranks of the batch mean, lowest to highest";
  Json F;
  F["batch_mean"] = nums(batch_mean);
  F["batch_var"] = nums(batch_var);
  in_q.put("input", &F);
  F["normalized_mean"] = nums(xhat_mean);
  F["normalized_var"] = nums(xhat_var);
  xhat_q.put("normalized", &F);
  F["gamma"] = nums(gamma);
  F["beta"] = nums(beta);
  F["output_mean"] = nums(y_mean);
  F["output_var"] = nums(y_var);
  y_q.put("output", &F);
  F["running_mean"] = nums(running_mean);
  F["running_var"] = nums(running_var);
  F["population_mean"] = nums(pop_mean);
  F["population_var"] = nums(pop_var);
  F["ema_mean_gap_in_std"] = nums(gap_mean);
  F["ema_var_ratio"] = nums(ratio_var);
  j["features"] = F;

  Json S;
  S["batch_mean"] = range_summary(batch_mean);
  S["batch_var"] = range_summary(batch_var);
  S["normalized_mean_max_abs"] = max_abs(xhat_mean);
  S["normalized_var"] = range_summary(xhat_var);
  // Var(x-hat) is v / (v + eps) exactly, not 1: the gap is the eps of the features with the
  // smallest variance.
  double eps_effect = 0;
  for (int64_t f = 0; f < C; ++f) eps_effect = std::max(eps_effect, opt.eps / (batch_var[f] + opt.eps));
  S["normalized_var_eps_effect_max"] = eps_effect;
  S["gamma"] = range_summary(gamma);
  S["beta"] = range_summary(beta);
  S["output_mean"] = range_summary(y_mean);
  S["output_var"] = range_summary(y_var);
  if (tracked) {
    Json E;
    E["mean_gap_in_std_median_abs"] = num(median(abs_gap));
    E["mean_gap_in_std_max_abs"] = num(max_abs(gap_mean));
    E["var_ratio"] = range_summary(ratio_var);
    E["var_ratio_median_abs_log"] = num(median(log_ratio));
    // What the EMA's sampling noise alone would give (independent values, stationary weights):
    // the std of an EMA of batch means with momentum f is sigma * sqrt(f / (2 - f) / n), and of
    // batch variances sigma^2 * sqrt(f / (2 - f) * 2 / (n - 1)) for Gaussian values.
    if (opt.momentum && *opt.momentum > 0 && *opt.momentum < 1) {
      const double f = *opt.momentum;
      const double vals = static_cast<double>(per_feature);
      E["noise_mean_gap_in_std"] = std::sqrt(f / (2 - f) / vals);
      E["noise_var_ratio"] = std::sqrt(f / (2 - f) * 2 / (vals - 1));
      E["noise_note"] =
          "EMA sampling noise alone, for independent Gaussian values with n = values per feature "
          "of this batch size (the values of one image are correlated in BatchNorm2d: a lower "
          "bound there)";
    }
    S["ema_vs_population"] = E;
  }
  j["summary"] = S;
  Json P;
  P["examples"] = train.count;
  P["values_per_feature"] = train.count * planes.s;
  P["mode"] = "weights fixed, every module before the layer in eval mode, as at inference";
  j["population"] = P;
  Json K;
  K["output_vs_gamma_xhat_plus_beta_max_abs"] = y_check;
  K["batch_mean_vs_fp64_max_abs"] = max_abs(fp64_mean_diff);
  K["batch_var_vs_fp64_max_rel"] = max_abs(fp64_var_rel);
  j["checks"] = K;
  j["files"] = {{"batch", "batch.safetensors"}, {"figure", "explain.png"}, {"text", "explain.md"}};

  // ----- the batch at the layer -----
  const int64_t ks = static_cast<int64_t>(selected.size());
  std::vector<float> sel_in, sel_xhat, sel_y;
  for (int64_t f : selected) {
    for (const auto& [t, dst] : {std::pair{&input, &sel_in}, {&xhat, &sel_xhat}, {&y, &sel_y}}) {
      const std::vector<float> v = feature_values(*t, f);
      dst->insert(dst->end(), v.begin(), v.end());
    }
  }
  auto entry = [](const char* name, std::vector<int64_t> shape, const float* data) {
    nn::StateEntry e;
    e.name = name;
    e.shape = std::move(shape);
    e.data = const_cast<float*>(data);
    return e;
  };
  const std::vector<nn::StateEntry> tensors = {
      entry("input", input.shape(), input.data()),
      entry("selected_input", {ks, per_feature}, sel_in.data()),
      entry("selected_normalized", {ks, per_feature}, sel_xhat.data()),
      entry("selected_output", {ks, per_feature}, sel_y.data())};

  // ----- write: staging directory inside out_dir, then moved in -----
  const fs::path out(config.out_dir);
  std::error_code err;
  const bool existed = fs::exists(out, err);
  fs::create_directories(out, err);
  if (err) return Status::invalid_argument("--out " + out.string() + ": " + err.message());
  const fs::path staging = out / (".explain-tmp-" + std::to_string(getpid()));
  fs::create_directories(staging, err);
  auto fail = [&](Status s) {
    std::error_code ignored;
    fs::remove_all(staging, ignored);
    if (!existed) fs::remove(out, ignored);  // only if empty: nothing of anyone else's
    return s;
  };
  if (err) return fail(Status::invalid_argument("--out " + out.string() + ": not writable (" + err.message() + ")"));
  Status s = write_text_file((staging / "explain.json").string(), j.dump(1) + "\n");
  if (s.ok())
    s = io::save_safetensors((staging / "batch.safetensors").string(), tensors,
                             {{"format", "bnorm-explain-1"}});
  if (!s.ok()) return fail(s);
  bool drawn = false;
  if (config.plots) {
    const std::string script = tool_script("plot_explain.py");
    const std::string python = script.empty() ? "" : plot_python();
    if (script.empty() || python.empty()) {
      std::fprintf(stderr, "bnorm explain: figure skipped: %s\n",
                   script.empty() ? "plot_explain.py not found next to the bnorm executable"
                                  : "no python3 with matplotlib (apt-get install python3-matplotlib)");
    } else if (run_program({python, script, staging.string()}, config.quiet) != 0) {
      return fail(Status::internal("plot_explain.py failed on " + out.string()));
    } else {
      drawn = true;
    }
  }
  // Stale files of an earlier run would contradict the new numbers.
  if (!drawn)
    for (const char* name : {"explain.png", "explain.md"}) fs::remove(out / name, err);
  s = publish(staging, out);
  if (!s.ok()) return fail(s);

  if (!config.quiet) {
    std::fprintf(stderr,
                 "bnorm explain: layer %lld of %lld (%zu: %s, %lld features) on a batch of %lld:\n"
                 "  batch mean %.3g..%.3g, batch variance %.3g..%.3g\n"
                 "  normalized: |mean| <= %.2g, variance %.6f..%.6f\n"
                 "  gamma %.3g..%.3g, beta %.3g..%.3g\n",
                 static_cast<long long>(config.layer), static_cast<long long>(layers), at,
                 module_name(bn_module).c_str(), static_cast<long long>(C),
                 static_cast<long long>(batch), S["batch_mean"]["min"].get<double>(),
                 S["batch_mean"]["max"].get<double>(), S["batch_var"]["min"].get<double>(),
                 S["batch_var"]["max"].get<double>(), max_abs(xhat_mean),
                 S["normalized_var"]["min"].get<double>(), S["normalized_var"]["max"].get<double>(),
                 S["gamma"]["min"].get<double>(), S["gamma"]["max"].get<double>(),
                 S["beta"]["min"].get<double>(), S["beta"]["max"].get<double>());
    if (tracked)
      std::fprintf(stderr,
                   "  running vs population (%lld images): mean gap median %.3g, max %.3g "
                   "population std; variance ratio %.3g..%.3g\n",
                   static_cast<long long>(train.count), median(abs_gap), max_abs(gap_mean),
                   *std::min_element(ratio_var.begin(), ratio_var.end()),
                   *std::max_element(ratio_var.begin(), ratio_var.end()));
    std::fprintf(stderr, "  -> %s\n", (out / (drawn ? "explain.md" : "explain.json")).c_str());
  }
  return Status();
}

}  // namespace bnorm::tools
