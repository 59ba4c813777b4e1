// checkpoint_tool: the C++ side of tests/torch/checkpoint_roundtrip.py.
//
//   checkpoint_tool save --preset paper-mlp|cnn --bn 0|1 --seed S --steps K
//                        --checkpoint C --io OUT
//     builds the preset, trains it K SGD steps on random data (so the running statistics and
//     num_batches_tracked are non-trivial), saves checkpoint C (metadata: architecture, preset,
//     batch_norm, bnorm_version), then evaluates a fixed random input batch in eval mode and
//     writes OUT (safetensors) with the tensors "input" and "logits".
//   checkpoint_tool load --preset P --bn 0|1 --checkpoint C --input IN --io OUT
//     builds the preset with another seed, loads C into it (strict: every name, shape and dtype),
//     evaluates IN's "input" in eval mode and writes OUT with "input", "logits" and the loaded
//     state as "state.<name>".
// Exit status 0 on success, 1 with a one-line message on stderr on any error, 2 on bad usage.
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/nn/layers.h"
#include "bnorm/nn/loss.h"
#include "bnorm/nn/models.h"
#include "bnorm/nn/optim.h"
#include "bnorm/io/idx.h"
#include "bnorm/io/safetensors.h"

namespace {

using bnorm::Status;
using bnorm::nn::Sequential;
using bnorm::nn::StateEntry;
using bnorm::nn::Tensor;

constexpr int64_t kBatch = 16;

int usage() {
  std::fprintf(stderr,
               "usage: checkpoint_tool save --preset P --bn 0|1 --seed S --steps K --checkpoint C "
               "--io OUT\n"
               "       checkpoint_tool load --preset P --bn 0|1 --checkpoint C --input IN --io OUT\n");
  return 2;
}

int fail(const Status& s) {
  std::fprintf(stderr, "checkpoint_tool: %s\n", s.message().c_str());
  return 1;
}

Status build(const std::string& preset, bool bn, uint64_t seed, Sequential* model,
             std::vector<int64_t>* input_shape) {
  if (preset == "paper-mlp") {
    *model = bnorm::nn::paper_mlp(bn, seed);
    *input_shape = {kBatch, 784};
  } else if (preset == "cnn") {
    *model = bnorm::nn::cnn(bn, seed);
    *input_shape = {kBatch, 1, 28, 28};
  } else {
    return Status::invalid_argument("--preset: unknown preset '" + preset +
                                    "' (expected paper-mlp or cnn)");
  }
  return Status();
}

void fill_uniform(bnorm::io::SplitMix64& rng, Tensor* t) {
  for (int64_t i = 0; i < t->numel(); ++i) {
    (*t)[i] = static_cast<float>(static_cast<double>(rng.next() >> 40) / 16777216.0);
  }
}

StateEntry f32_entry(const std::string& name, Tensor& t) {
  StateEntry e;
  e.name = name;
  e.shape = t.shape();
  e.data = t.data();
  return e;
}

Status write_io(const std::string& path, Tensor& input, Tensor& logits,
                const std::vector<StateEntry>& state) {
  std::vector<StateEntry> out = {f32_entry("input", input), f32_entry("logits", logits)};
  for (StateEntry e : state) {
    e.name = "state." + e.name;
    out.push_back(e);
  }
  return bnorm::io::save_safetensors(path, out, {});
}

int run(int argc, char** argv) {
  if (argc < 2) return usage();
  const std::string mode = argv[1];
  std::map<std::string, std::string> args;
  for (int i = 2; i < argc; i += 2) {
    if (i + 1 >= argc || std::strncmp(argv[i], "--", 2) != 0) return usage();
    args[argv[i] + 2] = argv[i + 1];
  }
  for (const char* required : {"preset", "bn", "checkpoint", "io"}) {
    if (args.count(required) == 0) return usage();
  }
  const bool bn = args["bn"] == "1";
  Sequential model;
  std::vector<int64_t> input_shape;

  if (mode == "save") {
    if (args.count("seed") == 0 || args.count("steps") == 0) return usage();
    const uint64_t seed = std::stoull(args["seed"]);
    if (Status s = build(args["preset"], bn, seed, &model, &input_shape); !s.ok()) return fail(s);
    bnorm::nn::SgdOptions sgd_options;
    sgd_options.lr = 0.01;
    sgd_options.momentum = 0.9;
    bnorm::nn::Sgd sgd;
    if (Status s = bnorm::nn::Sgd::create(model.parameters(), sgd_options, &sgd); !s.ok()) {
      return fail(s);
    }
    bnorm::io::SplitMix64 rng(seed ^ 0x5eed);
    Tensor x(input_shape), logits, dlogits;
    std::vector<int32_t> labels(kBatch);
    model.train(true);
    for (int step = 0, steps = std::stoi(args["steps"]); step < steps; ++step) {
      fill_uniform(rng, &x);
      for (int32_t& l : labels) l = static_cast<int32_t>(rng.uniform(10));
      bnorm::nn::CrossEntropyResult ce;
      model.zero_grad();
      if (Status s = model.forward(x, &logits); !s.ok()) return fail(s);
      if (Status s = bnorm::nn::softmax_cross_entropy(logits, labels, &ce, &dlogits); !s.ok()) {
        return fail(s);
      }
      if (Status s = model.backward(dlogits, nullptr); !s.ok()) return fail(s);
      sgd.step();
    }
    const std::map<std::string, std::string> metadata = {
        {"architecture", model.architecture()},
        {"preset", args["preset"]},
        {"batch_norm", bn ? "true" : "false"},
        {"bnorm_version", bnorm::version()}};
    if (Status s = bnorm::io::save_safetensors(args["checkpoint"], model.state_dict(), metadata);
        !s.ok()) {
      return fail(s);
    }
    model.eval();
    fill_uniform(rng, &x);
    if (Status s = model.forward(x, &logits); !s.ok()) return fail(s);
    if (Status s = write_io(args["io"], x, logits, {}); !s.ok()) return fail(s);
    return 0;
  }

  if (mode == "load") {
    if (args.count("input") == 0) return usage();
    if (Status s = build(args["preset"], bn, 987654321, &model, &input_shape); !s.ok()) return fail(s);
    std::vector<StateEntry> state = model.state_dict();
    if (Status s = bnorm::io::load_safetensors(args["checkpoint"], state); !s.ok()) return fail(s);
    std::vector<bnorm::io::OwnedTensor> tensors;
    if (Status s = bnorm::io::read_safetensors(args["input"], &tensors); !s.ok()) return fail(s);
    Tensor x;
    for (const auto& t : tensors) {
      if (t.name != "input") continue;
      if (t.dtype != "F32" || t.shape != input_shape) {
        return fail(Status::invalid_argument(args["input"] + ": \"input\" must be F32 " +
                                             bnorm::nn::shape_string(input_shape)));
      }
      x.resize(t.shape);
      std::memcpy(x.data(), t.bytes.data(), t.bytes.size());
    }
    if (x.empty()) return fail(Status::invalid_argument(args["input"] + ": no tensor \"input\""));
    model.eval();
    Tensor logits;
    if (Status s = model.forward(x, &logits); !s.ok()) return fail(s);
    if (Status s = write_io(args["io"], x, logits, state); !s.ok()) return fail(s);
    return 0;
  }
  return usage();
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {  // std::stoi on a bad number
    std::fprintf(stderr, "checkpoint_tool: %s\n", e.what());
    return 2;
  }
}
