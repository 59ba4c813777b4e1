#include "fold.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "bnorm/io/idx.h"
#include "bnorm/io/safetensors.h"
#include "bnorm/nn/fold.h"
#include "bnorm/nn/layers.h"
#include "bnorm/nn/loss.h"
#include "training.h"

namespace bnorm::tools {

Status run_fold(const FoldConfig& config) {
  if (config.batch_size < 1)
    return Status::invalid_argument("--batch-size: " + std::to_string(config.batch_size) +
                                    " is not >= 1");
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(config.out, ec) && fs::equivalent(config.checkpoint, config.out, ec))
    return Status::invalid_argument("--out: " + config.out + " is the input checkpoint");
  if (config.threads > 0) nn::set_num_threads(config.threads);

  EvalConfig load;
  load.checkpoint = config.checkpoint;
  nn::Sequential model;
  CheckpointInfo info;
  BNORM_RETURN_IF_ERROR(load_checkpoint(load, &model, &info));
  if (!info.batch_norm)
    return Status::invalid_argument(config.checkpoint + ": a " + info.preset +
                                    " without batch norm: nothing to fold");
  model.train(false);
  nn::Sequential folded;
  nn::FoldReport report;
  BNORM_RETURN_IF_ERROR(nn::fold_batch_norm(model, &folded, &report));

  io::Dataset test;
  io::DataOptions data_options;
  data_options.normalize = info.normalize;
  BNORM_RETURN_IF_ERROR(io::load_fashion_mnist_test(config.data_dir, data_options, &test));

  // Both models over the test set: logits side by side.
  nn::Tensor x, logits, folded_logits;
  double max_diff = 0, max_logit = 0;
  int64_t correct = 0, folded_correct = 0, changed = 0;
  for (int64_t start = 0; start < test.count; start += config.batch_size) {
    const int64_t rows = std::min(config.batch_size, test.count - start);
    x.resize(input_shape(info.preset, rows));
    std::copy_n(test.images.data() + start * test.image_size(), rows * test.image_size(),
                x.data());
    BNORM_RETURN_IF_ERROR(model.forward(x, &logits));
    BNORM_RETURN_IF_ERROR(folded.forward(x, &folded_logits));
    const int64_t k = logits.numel() / rows;
    for (int64_t r = 0; r < rows; ++r) {
      const float* a = logits.data() + r * k;
      const float* b = folded_logits.data() + r * k;
      for (int64_t j = 0; j < k; ++j) {
        max_diff = std::max(max_diff, std::abs(static_cast<double>(a[j]) - b[j]));
        max_logit = std::max(max_logit, std::abs(static_cast<double>(a[j])));
      }
      const int64_t pa = std::max_element(a, a + k) - a, pb = std::max_element(b, b + k) - b;
      const int32_t label = test.labels[static_cast<size_t>(start + r)];
      correct += pa == label;
      folded_correct += pb == label;
      changed += pa != pb;
    }
  }

  std::map<std::string, std::string> meta = info.metadata;
  meta["architecture"] = folded.architecture();
  meta["batch_norm"] = "false";
  meta["folded_from"] = fs::path(config.checkpoint).filename().string();
  meta["folded_batch_norm_layers"] = std::to_string(report.folded.size());
  meta["bnorm_version"] = bnorm::version();
  BNORM_RETURN_IF_ERROR(io::save_safetensors(config.out, folded.state_dict(), meta));

  const double n = static_cast<double>(test.count);
  std::printf(
      "%s: folded %zu batch-norm layers of %s into the layers before them -> %s\n"
      "  test set (%lld images, eval mode): largest logit difference %.3g (largest |logit| %.3g), "
      "accuracy %.2f%% -> %.2f%%, %lld predictions changed\n",
      config.checkpoint.c_str(), report.folded.size(), info.preset.c_str(), config.out.c_str(),
      static_cast<long long>(test.count), max_diff, max_logit, 100 * correct / n,
      100 * folded_correct / n, static_cast<long long>(changed));
  return Status();
}

}  // namespace bnorm::tools
