#include "bnorm/nn/fold.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common.h"

namespace bnorm::nn {
namespace {

const char* type_name(const Module& m) {
  if (dynamic_cast<const Linear*>(&m)) return "Linear";
  if (dynamic_cast<const Conv2d*>(&m)) return "Conv2d";
  if (dynamic_cast<const MaxPool2d*>(&m)) return "MaxPool2d";
  if (dynamic_cast<const ReLU*>(&m)) return "ReLU";
  if (dynamic_cast<const Sigmoid*>(&m)) return "Sigmoid";
  if (dynamic_cast<const Flatten*>(&m)) return "Flatten";
  if (dynamic_cast<const BatchNorm1d*>(&m)) return "BatchNorm1d";
  if (dynamic_cast<const BatchNorm2d*>(&m)) return "BatchNorm2d";
  if (dynamic_cast<const Sequential*>(&m)) return "Sequential";
  return nullptr;
}

// The eval-mode map of a batch-norm layer, a[c] x + b[c], in fp64.
struct Affine {
  std::vector<double> a, b;
};

Status bn_affine(const std::string& where, const BatchNormNd& bn, Affine* out) {
  const bnorm::BatchNorm& layer = bn.layer();
  const BatchNormOptions& o = layer.options();
  if (!o.track_running_stats)
    return Status::invalid_argument(
        where + ": keeps no running statistics (track_running_stats=false), so eval mode "
                "normalizes with the batch's: not foldable");
  const int64_t c = layer.num_features();
  Affine r;
  r.a.resize(static_cast<size_t>(c));
  r.b.resize(static_cast<size_t>(c));
  for (int64_t k = 0; k < c; ++k) {
    const size_t i = static_cast<size_t>(k);
    const double mean = layer.running_mean()[i];
    const double var = layer.running_var()[i];
    const double w = o.affine ? layer.weight()[i] : 1.0;
    const double bias = o.affine ? layer.bias()[i] : 0.0;
    const double denom = var + o.eps;
    if (!std::isfinite(mean) || !std::isfinite(w) || !std::isfinite(bias) ||
        !std::isfinite(denom) || !(denom > 0.0))
      return Status::invalid_argument(
          where + ": channel " + std::to_string(k) + " cannot be folded (running_mean " +
          detail::format_double(mean) + ", running_var " + detail::format_double(var) +
          ", weight " + detail::format_double(w) + ", bias " + detail::format_double(bias) +
          "): running_var + eps must be finite and > 0, the others finite");
    r.a[i] = w / std::sqrt(denom);
    r.b[i] = bias - mean * r.a[i];
  }
  *out = std::move(r);
  return Status();
}

// Scales rows of w (rows of `row` values each) by a and returns the folded bias.
void fold_rows(const Affine& f, std::span<const float> w, std::span<const float> bias, int64_t row,
               std::span<float> w_out, std::span<float> bias_out) {
  for (size_t c = 0; c < f.a.size(); ++c) {
    for (int64_t j = 0; j < row; ++j) {
      const size_t i = c * static_cast<size_t>(row) + static_cast<size_t>(j);
      w_out[i] = static_cast<float>(f.a[c] * static_cast<double>(w[i]));
    }
    const double b = bias.empty() ? 0.0 : static_cast<double>(bias[c]);
    bias_out[c] = static_cast<float>(f.a[c] * b + f.b[c]);
  }
}

void copy(std::span<const float> from, std::span<float> to) {
  std::copy(from.begin(), from.end(), to.begin());
}

// Checks `model` (recursively) and, when out != nullptr, builds the folded copy. Two passes with
// the same code: the first only validates, so that nothing is built on error.
Status fold(Sequential& model, const std::string& prefix, Sequential* out,
            std::vector<FoldedLayer>* folded) {
  Rng rng(0);  // the layers' create() initializes them; every value is overwritten below
  const size_t n = model.size();
  for (size_t i = 0; i < n; ++i) {
    Module& m = model.at(i);
    const char* type = type_name(m);
    const std::string where = "module " + prefix + std::to_string(i) + " (" +
                              (type != nullptr ? type : "unknown type") + ")";
    if (type == nullptr)
      return Status::invalid_argument(where + ": a module fold_batch_norm cannot copy (" +
                                      m.repr() + ")");
    auto* bn = dynamic_cast<BatchNormNd*>(&m);
    // A Linear or Conv2d followed by a batch norm: the pair becomes one layer.
    const bool absorbs = dynamic_cast<Linear*>(&m) != nullptr || dynamic_cast<Conv2d*>(&m) != nullptr;
    const bool next_bn =
        absorbs && i + 1 < n && dynamic_cast<BatchNormNd*>(&model.at(i + 1)) != nullptr;
    if (bn != nullptr) {
      // Reached only when the module before it could not absorb it.
      if (i == 0)
        return Status::invalid_argument(where + ": is the first module, nothing before it to "
                                        "fold into (a Linear or Conv2d)");
      const char* before = type_name(model.at(i - 1));
      return Status::invalid_argument(where + ": follows " + before + " (module " + prefix +
                                      std::to_string(i - 1) + "), not a Linear or Conv2d");
    }
    if (auto* seq = dynamic_cast<Sequential*>(&m)) {
      std::unique_ptr<Sequential> inner;
      if (out != nullptr) inner = std::make_unique<Sequential>();
      BNORM_RETURN_IF_ERROR(fold(*seq, prefix + std::to_string(i) + ".", inner.get(), folded));
      if (out != nullptr) BNORM_RETURN_IF_ERROR(out->add(std::move(inner)));
      continue;
    }
    Affine f;
    BatchNormNd* next = next_bn ? dynamic_cast<BatchNormNd*>(&model.at(i + 1)) : nullptr;
    const std::string next_where =
        next != nullptr ? "module " + prefix + std::to_string(i + 1) + " (" +
                              type_name(model.at(i + 1)) + ")"
                        : std::string();
    if (auto* lin = dynamic_cast<Linear*>(&m)) {
      if (next != nullptr) {
        if (dynamic_cast<BatchNorm1d*>(next) == nullptr)
          return Status::invalid_argument(next_where + ": follows a Linear, which only a "
                                          "BatchNorm1d over its features can fold into");
        if (next->num_features() != lin->out_features())
          return Status::invalid_argument(
              next_where + ": " + std::to_string(next->num_features()) +
              " features after a Linear with " + std::to_string(lin->out_features()) +
              " outputs");
        BNORM_RETURN_IF_ERROR(bn_affine(next_where, *next, &f));
      }
      if (out != nullptr) {
        std::unique_ptr<Linear> copy_of;
        BNORM_RETURN_IF_ERROR(Linear::create(lin->in_features(), lin->out_features(),
                                             lin->has_bias() || next != nullptr, rng, &copy_of));
        if (next != nullptr)
          fold_rows(f, lin->weight(), lin->bias(), lin->in_features(), copy_of->weight(),
                    copy_of->bias());
        else {
          copy(lin->weight(), copy_of->weight());
          copy(lin->bias(), copy_of->bias());
        }
        BNORM_RETURN_IF_ERROR(out->add(std::move(copy_of)));
      }
    } else if (auto* conv = dynamic_cast<Conv2d*>(&m)) {
      if (next != nullptr) {
        if (dynamic_cast<BatchNorm2d*>(next) == nullptr)
          return Status::invalid_argument(next_where + ": follows a Conv2d, which only a "
                                          "BatchNorm2d over its channels can fold into");
        if (next->num_features() != conv->out_channels())
          return Status::invalid_argument(
              next_where + ": " + std::to_string(next->num_features()) +
              " channels after a Conv2d with " + std::to_string(conv->out_channels()) +
              " output channels");
        BNORM_RETURN_IF_ERROR(bn_affine(next_where, *next, &f));
      }
      if (out != nullptr) {
        std::unique_ptr<Conv2d> copy_of;
        BNORM_RETURN_IF_ERROR(Conv2d::create(conv->in_channels(), conv->out_channels(),
                                             conv->kernel(), conv->stride(), conv->padding(),
                                             conv->has_bias() || next != nullptr, rng, &copy_of));
        if (next != nullptr)
          fold_rows(f, conv->weight(), conv->bias(),
                    conv->in_channels() * conv->kernel() * conv->kernel(), copy_of->weight(),
                    copy_of->bias());
        else {
          copy(conv->weight(), copy_of->weight());
          copy(conv->bias(), copy_of->bias());
        }
        BNORM_RETURN_IF_ERROR(out->add(std::move(copy_of)));
      }
    } else if (out != nullptr) {
      if (auto* pool = dynamic_cast<MaxPool2d*>(&m)) {
        std::unique_ptr<MaxPool2d> p;
        BNORM_RETURN_IF_ERROR(MaxPool2d::create(pool->kernel(), pool->stride(), &p));
        BNORM_RETURN_IF_ERROR(out->add(std::move(p)));
      } else if (dynamic_cast<ReLU*>(&m)) {
        BNORM_RETURN_IF_ERROR(out->add(ReLU::create()));
      } else if (dynamic_cast<Sigmoid*>(&m)) {
        BNORM_RETURN_IF_ERROR(out->add(Sigmoid::create()));
      } else {
        BNORM_RETURN_IF_ERROR(out->add(Flatten::create()));
      }
    }
    if (next != nullptr) {
      if (out == nullptr && folded != nullptr) {
        FoldedLayer fl;
        fl.batch_norm_index = i + 1;
        fl.into_index = i;
        fl.into = type;
        auto* as_linear = dynamic_cast<Linear*>(&m);
        fl.added_bias = as_linear != nullptr ? !as_linear->has_bias()
                                             : !dynamic_cast<Conv2d*>(&m)->has_bias();
        folded->push_back(fl);
      }
      ++i;  // the batch norm is absorbed
    }
  }
  return Status();
}

}  // namespace

Status fold_batch_norm(Sequential& model, Sequential* out, FoldReport* report) {
  if (out == nullptr) return Status::invalid_argument("fold_batch_norm: out: is null");
  if (out == &model) return Status::invalid_argument("fold_batch_norm: out: must not be model");
  std::vector<FoldedLayer> folded;
  // Validate everything first; then build (same walk), so that an error leaves *out untouched.
  Status s = fold(model, "", nullptr, &folded);
  if (!s.ok()) return Status::invalid_argument("fold_batch_norm: " + s.message());
  Sequential result;
  s = fold(model, "", &result, nullptr);
  if (!s.ok()) return Status::invalid_argument("fold_batch_norm: " + s.message());
  result.eval();
  *out = std::move(result);
  if (report != nullptr) report->folded = std::move(folded);
  return Status();
}

}  // namespace bnorm::nn
