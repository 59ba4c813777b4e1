// Prints a hash of every output of every kernel pass, so that a refactoring of the kernels can
// prove that no bit changed: run it before and after and diff the outputs.
//
//   bnorm_kernel_hashes [--quick] [shapes.txt ...] > hashes.txt
//
// Cases: the shapes of the given files (bench/shapes/*.txt format: NxC[xHxW...] per line), or,
// without files, a fixed list of test cases (sizes around the vector widths, odd strides, tiny
// channels, large offsets, a constant channel); each in both layouts, with fixed seeds. For the
// fast kernels, every Highway target this CPU runs (hwy::SetSupportedTargetsForTest); the
// reference once. Passes: stats, apply, backward_reduce, backward_apply (training and
// eval), the whole passes (forward_train with and without running stats and affine, in place,
// forward_eval, backward training and eval with and without dweight/dbias, in place), and sync
// batch norm on two in-process ranks, both backends, and the fused activations (forward_train
// and forward_eval with ReLU and with the add, backward_relu with and without dz). One line per
// (case, target, pass) with an FNV-1a hash of the output bytes; the last line hashes all lines.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/comm.h"
#include "cpu/cpu.h"
#include "hwy/targets.h"
#include "kernels.h"
#include "reference/reference.h"

namespace {

using bnorm::Layout;
using bnorm::detail::Geometry;

uint64_t fnv(const void* data, size_t bytes, uint64_t h = 1469598103934665603ull) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < bytes; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

template <class T>
uint64_t hash_of(const std::vector<T>& v, uint64_t h = 1469598103934665603ull) {
  return fnv(v.data(), v.size() * sizeof(T), h);
}

struct Case {
  std::vector<int64_t> dims;
  double offset = 0;
  double scale = 1;
  bool constant_channel = false;
  uint32_t seed = 1;
};

std::string dims_name(const std::vector<int64_t>& dims) {
  std::string s;
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? "x" : "") + std::to_string(dims[i]);
  return s;
}

struct Data {
  Geometry g;
  std::vector<int64_t> dims;
  std::vector<float> x, dy, weight, bias, rm, rv;
  std::vector<double> weight64, bias64;
};

Data make_data(const Case& k, Layout layout) {
  Data d;
  d.dims = k.dims;
  d.g.layout = layout;
  d.g.n = k.dims[0];
  d.g.c = k.dims[1];
  d.g.s = 1;
  for (size_t i = 2; i < k.dims.size(); ++i) d.g.s *= k.dims[i];
  const int64_t numel = d.g.numel();
  std::mt19937 rng(k.seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> unit(0.5f, 1.5f);
  std::vector<float> off(static_cast<size_t>(d.g.c));
  for (auto& o : off) o = static_cast<float>(k.offset * (1.0 + unit(rng) - 0.5));
  d.x.resize(static_cast<size_t>(numel));
  d.dy.resize(static_cast<size_t>(numel));
  for (int64_t i = 0; i < d.g.n; ++i)
    for (int64_t c = 0; c < d.g.c; ++c)
      for (int64_t j = 0; j < d.g.s; ++j) {
        const int64_t at = d.g.index(i, c, j);
        d.x[at] = (k.constant_channel && c == 0)
                      ? 3.25f
                      : off[c] + static_cast<float>(k.scale) * normal(rng);
        d.dy[at] = normal(rng);
      }
  for (int64_t c = 0; c < d.g.c; ++c) {
    d.weight.push_back(unit(rng));
    d.bias.push_back(normal(rng));
    d.rm.push_back(0.1f * normal(rng));
    d.rv.push_back(unit(rng));
  }
  d.weight64.assign(d.weight.begin(), d.weight.end());
  d.bias64.assign(d.bias.begin(), d.bias.end());
  return d;
}

class Out {
 public:
  void line(const std::string& key, uint64_t h) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
    const std::string l = key + " " + buf;
    std::printf("%s\n", l.c_str());
    all_ = fnv(l.data(), l.size(), all_);
    ++lines_;
  }
  void total() const {
    std::printf("ALL %d lines %016llx\n", lines_, static_cast<unsigned long long>(all_));
  }

 private:
  uint64_t all_ = 1469598103934665603ull;
  int lines_ = 0;
};

// The per-pass kernels of one implementation, by function pointer so both namespaces share the
// driver.
struct Passes {
  void (*stats)(const Geometry&, const float*, double*, double*);
  void (*apply)(const Geometry&, const float*, const double*, const double*, const double*,
                const double*, float*);
  void (*backward_reduce)(const Geometry&, const float*, const float*, const double*,
                          const double*, double*, double*);
  void (*backward_apply)(const Geometry&, const float*, const float*, const double*,
                         const double*, const double*, const double*, const double*, bool, float*,
                         int64_t);
  void (*forward_train)(const bnorm::detail::TrainCall&);
  void (*forward_eval)(const bnorm::detail::EvalCall&);
  void (*backward)(const bnorm::detail::BackwardCall&);
};

const Passes kCpu{&bnorm::cpu::stats,           &bnorm::cpu::apply,
                  &bnorm::cpu::backward_reduce, &bnorm::cpu::backward_apply,
                  &bnorm::cpu::forward_train,   &bnorm::cpu::forward_eval,
                  &bnorm::cpu::backward};
const Passes kRef{&bnorm::ref::stats<float>,
                  &bnorm::ref::apply<float>,
                  &bnorm::ref::backward_reduce<float>,
                  &bnorm::ref::backward_apply<float>,
                  &bnorm::ref::forward_train,
                  &bnorm::ref::forward_eval,
                  &bnorm::ref::backward};

// The calls of the whole passes on d's tensors, with its weight and bias and, for training, the
// running statistics rm and rv (copies of d's), eps 1e-5 and momentum 0.1.
bnorm::detail::TrainCall train_call(const Data& d, float* y, std::vector<float>& rm,
                                    std::vector<float>& rv, std::vector<float>& save_mean,
                                    std::vector<float>& save_invstd) {
  bnorm::detail::TrainCall call;
  call.g = d.g;
  call.x = d.x.data();
  call.y = y;
  rm = d.rm;
  rv = d.rv;
  call.weight = d.weight.data();
  call.bias = d.bias.data();
  call.running_mean = rm.data();
  call.running_var = rv.data();
  call.factor = 0.1;
  call.eps = 1e-5;
  call.save_mean = save_mean.data();
  call.save_invstd = save_invstd.data();
  return call;
}

bnorm::detail::EvalCall eval_call(const Data& d, float* y) {
  bnorm::detail::EvalCall call;
  call.g = d.g;
  call.x = d.x.data();
  call.weight = d.weight.data();
  call.bias = d.bias.data();
  call.running_mean = d.rm.data();
  call.running_var = d.rv.data();
  call.eps = 1e-5;
  call.y = y;
  return call;
}

// Backward in training (save_*) or eval (d's running statistics) mode, dweight and dbias asked.
bnorm::detail::BackwardCall backward_call(const Data& d, bool training, float* dx,
                                          const std::vector<float>& save_mean,
                                          const std::vector<float>& save_invstd,
                                          std::vector<float>& dw, std::vector<float>& db) {
  bnorm::detail::BackwardCall call;
  call.g = d.g;
  call.dy = d.dy.data();
  call.x = d.x.data();
  call.weight = d.weight.data();
  call.training = training;
  call.save_mean = save_mean.data();
  call.save_invstd = save_invstd.data();
  call.running_mean = d.rm.data();
  call.running_var = d.rv.data();
  call.eps = 1e-5;
  call.dx = dx;
  dw.assign(d.weight.size(), -1.f);
  db.assign(d.weight.size(), -1.f);
  call.dweight = dw.data();
  call.dbias = db.data();
  return call;
}

// The fused activations (issue 14): y = relu(bn(x)) and y = relu(bn(x) + z) in training and
// eval, and their backward from the forward's y (with and without dz, training and eval); z is
// dy's values, the residual of a block.
void run_fused(const Passes& k, const Data& d, const std::string& prefix, Out& out) {
  const size_t c = static_cast<size_t>(d.g.c);
  std::vector<float> save_mean(c), save_invstd(c), y_relu(d.x.size()), y(d.x.size()), rm, rv;
  for (int add = 0; add < 2; ++add) {
    bnorm::detail::TrainCall call = train_call(d, y.data(), rm, rv, save_mean, save_invstd);
    call.relu = true;
    call.z = add ? d.dy.data() : nullptr;
    k.forward_train(call);
    out.line(prefix + " forward_train_relu" + (add ? "_add" : ""),
             hash_of(rv, hash_of(rm, hash_of(save_invstd, hash_of(save_mean, hash_of(y))))));
    if (!add) y_relu = y;

    bnorm::detail::EvalCall eval = eval_call(d, y.data());
    eval.relu = true;
    eval.z = add ? d.dy.data() : nullptr;
    k.forward_eval(eval);
    out.line(prefix + " forward_eval_relu" + (add ? "_add" : ""), hash_of(y));
  }
  for (int variant = 0; variant < 3; ++variant) {
    // 0: training; 1: training with dz; 2: eval with dz.
    std::vector<float> dx(d.x.size()), dz(d.x.size()), dw, db;
    bnorm::detail::BackwardCall call =
        backward_call(d, variant <= 1, dx.data(), save_mean, save_invstd, dw, db);
    call.y = y_relu.data();
    call.dz = variant >= 1 ? dz.data() : nullptr;
    k.backward(call);
    out.line(prefix + " backward_relu" + std::to_string(variant),
             hash_of(dz, hash_of(db, hash_of(dw, hash_of(dx)))));
  }
}

void run_passes(const Passes& k, const Data& d, const std::string& prefix, Out& out) {
  const Geometry& g = d.g;
  const size_t c = static_cast<size_t>(g.c);
  std::vector<double> mean(c), var(c), invstd(c);
  k.stats(g, d.x.data(), mean.data(), var.data());
  out.line(prefix + " stats", hash_of(var, hash_of(mean)));
  // finalize's invstd (the running statistics are hashed with the whole passes).
  for (size_t i = 0; i < c; ++i) invstd[i] = 1.0 / std::sqrt(var[i] + 1e-5);
  std::vector<float> rm, rv;

  std::vector<float> y(d.x.size());
  k.apply(g, d.x.data(), mean.data(), invstd.data(), d.weight64.data(), d.bias64.data(), y.data());
  out.line(prefix + " apply", hash_of(y));
  k.apply(g, d.x.data(), mean.data(), invstd.data(), nullptr, nullptr, y.data());
  out.line(prefix + " apply_noaffine", hash_of(y));

  std::vector<double> s0(c), s1(c);
  k.backward_reduce(g, d.dy.data(), d.x.data(), mean.data(), invstd.data(), s0.data(), s1.data());
  out.line(prefix + " backward_reduce", hash_of(s1, hash_of(s0)));
  std::vector<float> dx(d.x.size());
  k.backward_apply(g, d.dy.data(), d.x.data(), mean.data(), invstd.data(), d.weight64.data(),
                   s0.data(), s1.data(), true, dx.data(), 0);
  out.line(prefix + " backward_apply_train", hash_of(dx));
  k.backward_apply(g, d.dy.data(), d.x.data(), mean.data(), invstd.data(), d.weight64.data(),
                   s0.data(), s1.data(), false, dx.data(), 0);
  out.line(prefix + " backward_apply_eval", hash_of(dx));

  // Whole passes.
  std::vector<float> save_mean(c), save_invstd(c);
  for (int variant = 0; variant < 3; ++variant) {
    // 0: affine + running stats; 1: neither; 2: affine + running stats, in place.
    std::vector<float> buf = d.x;
    bnorm::detail::TrainCall call =
        train_call(d, variant == 2 ? buf.data() : y.data(), rm, rv, save_mean, save_invstd);
    if (variant == 2) call.x = buf.data();
    if (variant == 1) {
      call.weight = call.bias = nullptr;
      call.running_mean = call.running_var = nullptr;
    }
    k.forward_train(call);
    const std::vector<float>& yy = variant == 2 ? buf : y;
    out.line(prefix + " forward_train" + std::to_string(variant),
             hash_of(rv, hash_of(rm, hash_of(save_invstd, hash_of(save_mean, hash_of(yy))))));
  }
  {
    k.forward_eval(eval_call(d, y.data()));
    out.line(prefix + " forward_eval", hash_of(y));
  }
  for (int variant = 0; variant < 5; ++variant) {
    // 0: training; 1: training, in place over dy; 2: eval with grads; 3: eval without grads;
    // 4: eval with grads, in place over dy.
    std::vector<float> buf = d.dy;
    const bool in_place = variant == 1 || variant == 4;
    std::vector<float> dw, db;
    bnorm::detail::BackwardCall call = backward_call(
        d, variant <= 1, in_place ? buf.data() : dx.data(), save_mean, save_invstd, dw, db);
    if (in_place) call.dy = buf.data();
    if (variant == 3) call.dweight = call.dbias = nullptr;
    k.backward(call);
    const std::vector<float>& dd = in_place ? buf : dx;
    out.line(prefix + " backward" + std::to_string(variant), hash_of(db, hash_of(dw, hash_of(dd))));
  }
  run_fused(k, d, prefix, out);
}

void run_sync(const Data& d, const std::string& prefix, bnorm::Backend backend, Out& out) {
  const int ranks = 2;
  const Geometry& g = d.g;
  if (g.n < ranks) return;
  std::unique_ptr<bnorm::InProcessGroup> group;
  if (!bnorm::InProcessGroup::create(ranks, &group).ok()) std::abort();
  const size_t c = static_cast<size_t>(g.c);
  const int64_t per_sample = g.c * g.s;
  std::vector<std::vector<float>> y(ranks), dx(ranks), rm(ranks, d.rm), rv(ranks, d.rv);
  std::vector<std::vector<float>> sm(ranks, std::vector<float>(c)), si(ranks, std::vector<float>(c));
  std::vector<std::vector<float>> dw(ranks, std::vector<float>(c)), db(ranks, std::vector<float>(c));
  for (int mode = 0; mode < 2; ++mode) {
    const bnorm::Status st = group->run([&](bnorm::Communicator& comm) {
      const int r = comm.rank();
      const int64_t n0 = g.n * r / ranks, n1 = g.n * (r + 1) / ranks;
      std::vector<int64_t> dims = d.dims;
      dims[0] = n1 - n0;
      // Channels-last stores (N, S, C): a sample is still C*S contiguous floats.
      const float* x = d.x.data() + n0 * per_sample;
      const float* dyp = d.dy.data() + n0 * per_sample;
      y[r].assign(static_cast<size_t>((n1 - n0) * per_sample), 0.f);
      dx[r].assign(y[r].size(), 0.f);
      bnorm::CallOptions options;
      options.backend = backend;
      bnorm::SyncOptions sync;
      sync.mode = static_cast<bnorm::SyncMode>(mode);
      bnorm::ForwardTrainArgs fa;
      fa.x = bnorm::ConstTensorView(x, dims, g.layout);
      fa.weight = d.weight;
      fa.bias = d.bias;
      fa.running_mean = rm[r];
      fa.running_var = rv[r];
      fa.y = bnorm::TensorView(y[r].data(), dims, g.layout);
      fa.save_mean = sm[r];
      fa.save_invstd = si[r];
      bnorm::Status s = bnorm::sync_forward_train(comm, fa, options, sync);
      if (!s.ok()) return s;
      bnorm::BackwardArgs ba;
      ba.dy = bnorm::ConstTensorView(dyp, dims, g.layout);
      ba.x = fa.x;
      ba.weight = d.weight;
      ba.save_mean = sm[r];
      ba.save_invstd = si[r];
      ba.dx = bnorm::TensorView(dx[r].data(), dims, g.layout);
      ba.dweight = dw[r];
      ba.dbias = db[r];
      return bnorm::sync_backward(comm, ba, options, sync);
    });
    if (!st.ok()) {
      std::fprintf(stderr, "sync failed: %s\n", st.message().c_str());
      std::abort();
    }
    uint64_t h = 1469598103934665603ull;
    for (int r = 0; r < ranks; ++r)
      h = hash_of(db[r], hash_of(dw[r], hash_of(dx[r], hash_of(si[r], hash_of(sm[r],
          hash_of(rv[r], hash_of(rm[r], hash_of(y[r], h))))))));
    out.line(prefix + " sync" + std::to_string(mode), h);
  }
}

std::vector<Case> default_cases() {
  std::vector<Case> cases;
  uint32_t seed = 11;
  auto add = [&](std::vector<int64_t> dims, double offset = 0, double scale = 1,
                 bool constant = false) {
    cases.push_back(Case{std::move(dims), offset, scale, constant, seed++});
  };
  for (int64_t s : {1, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100})
    add({5, 3, s});
  for (int64_t c : {1, 2, 5, 8, 15, 16, 17, 31, 33, 64, 100, 129, 165, 600})
    add({37, c, 2, 3});
  add({2, 4, 9, 9}, 1e3, 1, true);
  add({64, 7, 300}, 1e6, 1);
  add({3, 40, 40}, 0, 1e-3, true);
  add({200, 24}, 50, 2);
  add({4, 3, 5, 6, 7});
  add({16, 32, 33, 33});    // several waves and blocks, channels-first
  add({2, 5, 20000});       // a row longer than a block
  add({300, 1, 1});         // one channel
  add({1, 64, 2}, 0, 1);    // small count: the fp64 lanes
  add({31, 9});             // count below kMinFp32LaneCount
  add({8, 4096, 3});        // wide channels-last rows
  return cases;
}

bool parse_shape(const std::string& line, std::vector<int64_t>* dims) {
  dims->clear();
  std::stringstream ss(line);
  std::string part;
  while (std::getline(ss, part, 'x')) {
    if (part.empty()) return false;
    dims->push_back(std::stoll(part));
  }
  return dims->size() >= 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<Case> cases;
  bool from_files = false;
  for (int i = 1; i < argc; ++i) {
    std::ifstream in(argv[i]);
    if (!in) {
      std::fprintf(stderr, "cannot read %s\n", argv[i]);
      return 2;
    }
    from_files = true;
    std::string line;
    uint32_t seed = 1000;
    while (std::getline(in, line)) {
      const size_t hash = line.find('#');
      if (hash != std::string::npos) line.resize(hash);
      while (!line.empty() && (line.back() == ' ' || line.back() == '\r')) line.pop_back();
      if (line.empty()) continue;
      Case k;
      if (!parse_shape(line, &k.dims)) continue;
      k.seed = seed++;
      cases.push_back(k);
    }
  }
  if (!from_files) cases = default_cases();

  std::vector<int64_t> targets = hwy::SupportedAndGeneratedTargets();
  Out out;
  for (const Case& k : cases) {
    for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast}) {
      const Data d = make_data(k, layout);
      const std::string name =
          dims_name(k.dims) + (layout == Layout::kChannelsLast ? " last" : " first");
      for (int64_t target : targets) {
        hwy::SetSupportedTargetsForTest(target);
        run_passes(kCpu, d, name + " " + hwy::TargetName(target), out);
        run_sync(d, name + " " + hwy::TargetName(target) + " cpu", bnorm::Backend::kAuto, out);
      }
      hwy::SetSupportedTargetsForTest(0);
      run_passes(kRef, d, name + " reference", out);
      run_sync(d, name + " reference", bnorm::Backend::kReference, out);
      std::fflush(stdout);
    }
  }
  out.total();
  return 0;
}
