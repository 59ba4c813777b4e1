// Consumer (b) of the installed package: the paper's MLP with batch norm (bnorm::bnorm_nn) is
// trained a few SGD steps on one fixed random batch, whose loss must fall; its checkpoint
// (bnorm::bnorm_io) is saved, loaded into a network built with another seed, and both must give
// the same logits in eval mode, bit for bit.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "bnorm/io/idx.h"
#include "bnorm/io/safetensors.h"
#include "bnorm/nn/loss.h"
#include "bnorm/nn/models.h"
#include "bnorm/nn/optim.h"

namespace {

int fail(const char* what, const bnorm::Status& s) {
  std::fprintf(stderr, "nn_consumer: %s: %s\n", what, s.to_string().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: nn_consumer CHECKPOINT\n");
    return 2;
  }
  const std::string checkpoint = argv[1];
  constexpr int64_t kBatch = 16;
  bnorm::nn::Sequential model = bnorm::nn::paper_mlp(/*batch_norm=*/true, /*seed=*/1);
  bnorm::nn::SgdOptions sgd_options;
  sgd_options.lr = 0.1;
  bnorm::nn::Sgd sgd;
  if (auto s = bnorm::nn::Sgd::create(model.parameters(), sgd_options, &sgd); !s.ok())
    return fail("Sgd::create", s);

  bnorm::io::SplitMix64 rng(7);
  bnorm::nn::Tensor x({kBatch, 784}), logits, dlogits;
  for (int64_t i = 0; i < x.numel(); ++i) x[i] = static_cast<float>(rng.uniform(256)) / 255.0f;
  std::vector<int32_t> labels(kBatch);
  for (int32_t& l : labels) l = static_cast<int32_t>(rng.uniform(10));

  model.train(true);
  double first_loss = 0, last_loss = 0;
  for (int step = 0; step < 20; ++step) {
    bnorm::nn::CrossEntropyResult ce;
    model.zero_grad();
    if (auto s = model.forward(x, &logits); !s.ok()) return fail("forward", s);
    if (auto s = bnorm::nn::softmax_cross_entropy(logits, labels, &ce, &dlogits); !s.ok())
      return fail("softmax_cross_entropy", s);
    if (auto s = model.backward(dlogits, nullptr); !s.ok()) return fail("backward", s);
    sgd.step();
    (step == 0 ? first_loss : last_loss) = ce.loss;
  }
  std::printf("nn_consumer: loss %.4f -> %.4f in 20 steps\n", first_loss, last_loss);
  if (!(last_loss < 0.5 * first_loss)) {
    std::fprintf(stderr, "nn_consumer: the loss did not fall on a batch the network can learn\n");
    return 1;
  }

  if (auto s = bnorm::io::save_safetensors(checkpoint, model.state_dict(), {{"preset", "paper-mlp"}});
      !s.ok())
    return fail("save_safetensors", s);
  bnorm::nn::Sequential loaded = bnorm::nn::paper_mlp(true, /*seed=*/2);
  if (auto s = bnorm::io::load_safetensors(checkpoint, loaded.state_dict()); !s.ok())
    return fail("load_safetensors", s);
  model.eval();
  loaded.eval();
  bnorm::nn::Tensor a, b;
  if (auto s = model.forward(x, &a); !s.ok()) return fail("forward (eval)", s);
  if (auto s = loaded.forward(x, &b); !s.ok()) return fail("forward (eval, loaded)", s);
  if (a.numel() != kBatch * 10 || b.numel() != a.numel() ||
      std::memcmp(a.data(), b.data(), sizeof(float) * a.numel()) != 0) {
    std::fprintf(stderr, "nn_consumer: the loaded checkpoint gives other logits\n");
    return 1;
  }
  std::printf("nn_consumer: checkpoint %s loaded, eval logits identical: OK\n", checkpoint.c_str());
  return 0;
}
