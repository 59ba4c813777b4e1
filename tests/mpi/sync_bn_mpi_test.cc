// Synchronized batch norm over MPI ranks (run under mpirun -np K): for several shapes, layouts
// and uneven splits (a rank with one sample, a rank with none), every output of a forward and
// backward over K MPI processes must be bitwise identical to the same global batch on one rank
// (an in-process group of 1) and on three in-process ranks split another way; the per-rank mode
// within 1e-5 of it (tests/comm compares both with plain batch norm on the whole batch). Exits 0
// only if every check passes on every rank.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/comm.h"

namespace {

using bnorm::Communicator;
using bnorm::Layout;
using bnorm::Status;
using bnorm::SyncMode;

struct Problem {
  std::vector<int64_t> dims;
  Layout layout;
  std::vector<float> x, dy, weight, bias;
  int64_t sample() const {
    int64_t s = 1;
    for (size_t i = 1; i < dims.size(); ++i) s *= dims[i];
    return s;
  }
};

Problem make_problem(std::vector<int64_t> dims, Layout layout, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  Problem p{std::move(dims), layout, {}, {}, {}, {}};
  const int64_t n = p.dims[0] * p.sample();
  for (int64_t i = 0; i < n; ++i) {
    p.x.push_back(static_cast<float>(-2.0 + 3.0 * normal(rng)));
    p.dy.push_back(static_cast<float>(normal(rng)));
  }
  for (int64_t c = 0; c < p.dims[1]; ++c) {
    p.weight.push_back(static_cast<float>(1.0 + 0.3 * normal(rng)));
    p.bias.push_back(static_cast<float>(normal(rng)));
  }
  return p;
}

// Everything one forward + backward produced, as float bit patterns: y and dx of the whole
// batch (each rank fills its part, the rest stays 0), then the per-channel outputs.
using Bits = std::vector<uint32_t>;

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Rank `rank` of a group of split.size() runs its part of p; returns its contribution.
Status run_part(Communicator& comm, const Problem& p, const std::vector<int64_t>& split,
                SyncMode mode, Bits* out) {
  const int r = comm.rank();
  int64_t offset = 0;
  for (int i = 0; i < r; ++i) offset += split[static_cast<size_t>(i)];
  std::vector<int64_t> dims = p.dims;
  dims[0] = split[static_cast<size_t>(r)];
  const int64_t begin = offset * p.sample(), count = dims[0] * p.sample();
  const size_t c = static_cast<size_t>(p.dims[1]);
  std::vector<float> y(static_cast<size_t>(count)), dx(static_cast<size_t>(count));
  std::vector<float> mean(c), invstd(c), rm(c, 0.5f), rv(c, 2.0f), dw(c), db(c);
  int64_t batches = 3;
  bnorm::ForwardTrainArgs f;
  f.x = bnorm::ConstTensorView(count ? p.x.data() + begin : nullptr, dims, p.layout);
  f.weight = p.weight;
  f.bias = p.bias;
  f.running_mean = rm;
  f.running_var = rv;
  f.num_batches_tracked = &batches;
  f.y = bnorm::TensorView(count ? y.data() : nullptr, dims, p.layout);
  f.save_mean = mean;
  f.save_invstd = invstd;
  bnorm::SyncOptions sync;
  sync.mode = mode;
  std::vector<int64_t> used;
  sync.split_out = &used;
  BNORM_RETURN_IF_ERROR(bnorm::sync_forward_train(comm, f, {}, sync));
  bnorm::BackwardArgs b;
  b.dy = bnorm::ConstTensorView(count ? p.dy.data() + begin : nullptr, dims, p.layout);
  b.x = f.x;
  b.weight = p.weight;
  b.save_mean = mean;
  b.save_invstd = invstd;
  b.dx = bnorm::TensorView(count ? dx.data() : nullptr, dims, p.layout);
  b.dweight = dw;
  b.dbias = db;
  bnorm::SyncOptions back;
  back.mode = mode;
  back.split = used;
  BNORM_RETURN_IF_ERROR(bnorm::sync_backward(comm, b, {}, back));
  const size_t total = p.x.size();
  out->assign(2 * total, 0);
  for (int64_t i = 0; i < count; ++i) {
    (*out)[static_cast<size_t>(begin + i)] = bits(y[static_cast<size_t>(i)]);
    (*out)[total + static_cast<size_t>(begin + i)] = bits(dx[static_cast<size_t>(i)]);
  }
  for (const std::vector<float>* v : {&mean, &invstd, &rm, &rv, &dw, &db})
    for (float value : *v) out->push_back(r == 0 ? bits(value) : 0u);
  return Status();
}

// The whole result of a group: every rank's contribution summed (each element has one
// contributor, so the sum is that value exactly).
Status gather(Communicator& comm, const Bits& mine, Bits* all) {
  std::vector<double> values(mine.begin(), mine.end());  // 32-bit patterns are exact doubles
  BNORM_RETURN_IF_ERROR(comm.allreduce_sum(values));
  all->assign(values.size(), 0);
  for (size_t i = 0; i < values.size(); ++i) (*all)[i] = static_cast<uint32_t>(values[i]);
  return Status();
}

// The same problem on an in-process group with the given split.
Status run_in_process(const Problem& p, const std::vector<int64_t>& split, SyncMode mode,
                      Bits* all) {
  std::unique_ptr<bnorm::InProcessGroup> group;
  BNORM_RETURN_IF_ERROR(bnorm::InProcessGroup::create(static_cast<int>(split.size()), &group));
  std::vector<Bits> parts(split.size());
  return group->run([&](Communicator& comm) -> Status {
    Bits mine;
    BNORM_RETURN_IF_ERROR(run_part(comm, p, split, mode, &mine));
    Bits result;
    BNORM_RETURN_IF_ERROR(gather(comm, mine, &result));
    if (comm.rank() == 0) *all = result;
    return Status();
  });
}

// K ranks' split of n samples, uneven on purpose: rank 0 gets one sample, rank 1 none (when
// K >= 3), the last the rest.
std::vector<int64_t> split_for(int k, int64_t n) {
  std::vector<int64_t> s(static_cast<size_t>(k), 0);
  if (k == 1) return {n};
  s[0] = 1;
  int64_t left = n - 1;
  for (int r = 2; r < k - 1; ++r) {
    s[static_cast<size_t>(r)] = left / 3;
    left -= left / 3;
  }
  s[static_cast<size_t>(k - 1)] = left;
  return s;
}

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  Communicator* comm = nullptr;
  Status s = bnorm::mpi_world(&argc, &argv, &comm, 60.0);
  if (!s.ok()) {
    std::fprintf(stderr, "sync_bn_mpi_test: %s\n", s.message().c_str());
    return 1;
  }
  const int k = comm->size(), rank = comm->rank();
  struct Case {
    std::vector<int64_t> dims;
    Layout layout;
  };
  const Case cases[] = {{{13, 6, 5, 7}, Layout::kChannelsFirst},
                        {{13, 6, 5, 7}, Layout::kChannelsLast},
                        {{11, 256}, Layout::kChannelsFirst},
                        {{9, 32, 28, 28}, Layout::kChannelsFirst},
                        {{7, 3, 33}, Layout::kChannelsLast}};
  int failures = 0, checked = 0;
  double worst_vs_plain = 0;
  for (const Case& c : cases) {
    for (SyncMode mode : {SyncMode::kReproducible, SyncMode::kPerRank}) {
      const bool reproducible = mode == SyncMode::kReproducible;
      const Problem p = make_problem(c.dims, c.layout, 17 + static_cast<uint64_t>(c.dims[1]));
      const std::vector<int64_t> split = split_for(k, c.dims[0]);
      std::string name = std::to_string(c.dims[0]) + "x" + std::to_string(c.dims[1]) + " " +
                         (c.layout == Layout::kChannelsLast ? "channels_last" : "channels_first") +
                         (reproducible ? " reproducible" : " per-rank");
      Bits mine, mpi_result, one, three;
      s = run_part(*comm, p, split, mode, &mine);
      if (s.ok()) s = gather(*comm, mine, &mpi_result);
      if (s.ok()) s = run_in_process(p, {c.dims[0]}, mode, &one);
      if (s.ok()) s = run_in_process(p, {c.dims[0] - 4, 3, 1}, mode, &three);
      if (!s.ok()) {
        std::fprintf(stderr, "rank %d: %s: %s\n", rank, name.c_str(), s.message().c_str());
        ++failures;
        continue;
      }
      ++checked;
      // Bitwise: K MPI ranks == 1 rank == 3 in-process ranks (reproducible mode); per-rank mode
      // is deterministic for a split, and within rounding of the others.
      double worst = 0;
      size_t differing = 0;
      for (size_t i = 0; i < one.size(); ++i) {
        const double a = from_bits(mpi_result[i]), b = from_bits(one[i]);
        if (mpi_result[i] != one[i] || (reproducible && three[i] != one[i])) ++differing;
        worst = std::max(worst, std::abs(a - b) / (1.0 + std::abs(b)));
      }
      worst_vs_plain = std::max(worst_vs_plain, worst);
      const bool ok = reproducible ? differing == 0 : worst <= 1e-5;
      if (!ok) ++failures;
      if (rank == 0)
        std::printf("%s %s over %d MPI rank(s): %zu of %zu values differ from 1 rank "
                    "(largest relative difference %.3g)\n",
                    ok ? "ok  " : "FAIL", name.c_str(), k, differing, one.size(), worst);
    }
  }
  std::vector<double> total = {static_cast<double>(failures)};
  s = comm->allreduce_sum(total);
  if (!s.ok() || total[0] != 0) {
    if (rank == 0) std::printf("FAIL: %g check(s) failed over %d ranks\n", total[0], k);
    return 1;
  }
  if (rank == 0)
    std::printf("sync batch norm over %d MPI ranks: %d cases, reproducible mode bitwise identical "
                "to 1 and 3 ranks\n", k, checked);
  return 0;
}
