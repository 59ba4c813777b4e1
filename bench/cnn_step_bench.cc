// The training step of the cnn preset (conv-BN-ReLU blocks, include/bnorm/nn/models.h) with its
// BN + ReLU pairs fused (Sequential's default) and unfused (set_fuse_batch_norm_relu(false)):
// forward, softmax cross-entropy, backward and an SGD step on a fixed random batch, the two
// models alternating step by step so that a busy machine slows both alike. Prints the median
// and minimum step time of each and their ratio.
//
//   bnorm_cnn_step_bench [--batch N] [--steps K] [--threads T]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/nn/init.h"
#include "bnorm/nn/loss.h"
#include "bnorm/nn/models.h"
#include "bnorm/nn/optim.h"

namespace {

void must(const bnorm::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "cnn_step_bench: %s: %s\n", what, s.to_string().c_str());
    std::exit(1);
  }
}

struct Model {
  bnorm::nn::Sequential net;
  bnorm::nn::Sgd sgd;
  std::vector<double> ms;
};

}  // namespace

int main(int argc, char** argv) {
  int64_t batch = 128;
  int steps = 20, threads = 2;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--batch") batch = std::atoll(argv[i + 1]);
    else if (a == "--steps") steps = std::atoi(argv[i + 1]);
    else if (a == "--threads") threads = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "usage: bnorm_cnn_step_bench [--batch N] [--steps K] [--threads T]\n");
      return 2;
    }
  }
  bnorm::set_num_threads(threads);
  bnorm::nn::Rng rng(1);
  bnorm::nn::Tensor x({batch, 1, 28, 28});
  bnorm::nn::uniform_(x.span(), -1.0, 1.0, rng);
  std::vector<int32_t> labels(static_cast<size_t>(batch));
  for (size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<int32_t>(i % 10);

  Model models[2];
  for (int m = 0; m < 2; ++m) {
    models[m].net = bnorm::nn::cnn(true, 7);
    models[m].net.set_fuse_batch_norm_relu(m == 0);
    bnorm::nn::SgdOptions o;
    o.lr = 0.01;
    o.momentum = 0.9;
    must(bnorm::nn::Sgd::create(models[m].net.parameters(), o, &models[m].sgd), "sgd");
  }
  bnorm::nn::Tensor logits, dlogits;
  bnorm::nn::CrossEntropyResult loss;
  for (int step = 0; step < steps + 2; ++step)
    for (int m = 0; m < 2; ++m) {
      Model& model = models[m];
      const auto t0 = std::chrono::steady_clock::now();
      model.sgd.zero_grad();
      must(model.net.forward(x, &logits), "forward");
      must(bnorm::nn::softmax_cross_entropy(logits, labels, &loss, &dlogits), "loss");
      must(model.net.backward(dlogits, nullptr), "backward");
      model.sgd.step();
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (step >= 2) model.ms.push_back(ms);  // two warm-up steps
    }
  double median[2];
  for (int m = 0; m < 2; ++m) {
    std::vector<double> v = models[m].ms;
    std::sort(v.begin(), v.end());
    median[m] = v[v.size() / 2];
    std::printf("cnn step, batch %lld, %d threads, BN+ReLU %s: median %.2f ms, min %.2f ms (%d steps)\n",
                static_cast<long long>(batch), bnorm::num_threads(), m == 0 ? "fused  " : "unfused",
                median[m], v.front(), static_cast<int>(v.size()));
  }
  std::printf("unfused / fused (median): %.3f\n", median[1] / median[0]);
  return 0;
}
