#include "bnorm/nn/models.h"

#include <cstdlib>
#include <cstdio>

namespace bnorm::nn {
namespace {

// The presets' arguments are constants known to be valid; a failure is a programming error.
void must(const Status& s) {
  if (!s.ok()) {
    std::fprintf(stderr, "bnorm::nn preset: %s\n", s.to_string().c_str());
    std::abort();
  }
}

template <class T>
void add(Sequential* seq, std::unique_ptr<T> m) {
  must(seq->add(std::move(m)));
}

std::unique_ptr<BatchNorm1d> bn1d(int64_t c) {
  BatchNormOptions o;
  o.num_features = c;
  std::unique_ptr<BatchNorm1d> m;
  must(BatchNorm1d::create(o, &m));
  return m;
}

std::unique_ptr<BatchNorm2d> bn2d(int64_t c) {
  BatchNormOptions o;
  o.num_features = c;
  std::unique_ptr<BatchNorm2d> m;
  must(BatchNorm2d::create(o, &m));
  return m;
}

}  // namespace

Sequential paper_mlp(bool batch_norm, uint64_t seed) {
  Rng rng(seed);
  Sequential seq;
  const int64_t widths[] = {784, 100, 100, 100, 10};
  for (int layer = 0; layer < 4; ++layer) {
    std::unique_ptr<Linear> lin;
    must(Linear::create(widths[layer], widths[layer + 1], true, rng, &lin));
    normal_(lin->weight(), 0.0, kPaperMlpInitStd, rng);
    constant_(lin->bias(), 0.0f);
    add(&seq, std::move(lin));
    if (layer == 3) break;
    if (batch_norm) add(&seq, bn1d(widths[layer + 1]));
    add(&seq, Sigmoid::create());
  }
  return seq;
}

Sequential cnn(bool batch_norm, uint64_t seed) {
  Rng rng(seed);
  Sequential seq;
  auto block = [&](int64_t in, int64_t out) {
    std::unique_ptr<Conv2d> conv;
    must(Conv2d::create(in, out, 3, 1, 1, !batch_norm, rng, &conv));
    kaiming_normal_(conv->weight(), out * 3 * 3, 0.0, rng);  // fan_out, relu (torchvision)
    constant_(conv->bias(), 0.0f);
    add(&seq, std::move(conv));
    if (batch_norm) add(&seq, bn2d(out));
    add(&seq, ReLU::create());
  };
  auto pool = [&] {
    std::unique_ptr<MaxPool2d> p;
    must(MaxPool2d::create(2, 2, &p));
    add(&seq, std::move(p));
  };
  block(1, 32);
  pool();
  block(32, 64);
  pool();
  block(64, 128);
  add(&seq, Flatten::create());
  // A hidden layer of kCnnHidden units in the head (Linear-BN-ReLU; no bias before BN).
  std::unique_ptr<Linear> hidden;
  must(Linear::create(128 * 7 * 7, kCnnHidden, !batch_norm, rng, &hidden));
  add(&seq, std::move(hidden));
  if (batch_norm) add(&seq, bn1d(kCnnHidden));
  add(&seq, ReLU::create());
  std::unique_ptr<Linear> head;
  must(Linear::create(kCnnHidden, 10, true, rng, &head));
  add(&seq, std::move(head));
  return seq;
}

}  // namespace bnorm::nn
