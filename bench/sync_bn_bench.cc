// What synchronized batch norm costs, under mpirun: for each batch-norm layer of the `cnn`
// preset, with the global batch split across the ranks, the time of sync_forward_train +
// sync_backward against the plain local forward_train + backward on the same local tensor, the
// all-reduce calls, bytes and time the communicator counted, and a bare all-reduce
// (Communicator::allreduce_sum) of the same sizes, which is the transfer alone, without waiting
// for a slower rank. Also the bare all-reduce of the cnn preset's fused gradient buffer, the
// one exchange per step of data-parallel training.
//
//   mpirun -np K bnorm_sync_bn_bench [--reps 50] [--warmup 5] [--threads 1]
//                                    [--global-batch 128] [--json PATH]
//
// Every timed repetition starts after a barrier, on every rank; the tables show rank 0's median
// and min and the largest median over the ranks. Rank 0 prints Markdown tables (and writes JSON
// with --json). Built with MPI's headers, the bare all-reduces are also timed with MPI_Allreduce
// and MPI_Iallreduce themselves. scripts/distributed_bench.sh runs it.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/comm.h"

// With MPI's headers (bench/CMakeLists.txt defines it when MPI was found), the bare all-reduces
// are also timed with MPI itself on MPI_COMM_WORLD: blocking MPI_Allreduce, and MPI_Iallreduce
// polled by MPI_Test in a tight loop. The communicator uses the latter (polled against a
// deadline, sleeping between polls after a millisecond), so the columns separate the transfer
// from the communicator's own overhead.
#ifdef BNORM_SYNC_BENCH_RAW_MPI
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  int reps = 50;
  int warmup = 5;
  int threads = 1;
  int64_t global_batch = 128;
  std::string json;
};

[[noreturn]] void usage(const std::string& error) {
  std::fprintf(stderr,
               "bnorm_sync_bn_bench: %s\n"
               "usage: mpirun -np K bnorm_sync_bn_bench [--reps N] [--warmup N] [--threads N]\n"
               "                                        [--global-batch N] [--json PATH]\n",
               error.c_str());
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    auto positive = [&](const std::string& v) {
      char* end = nullptr;
      const long long n = std::strtoll(v.c_str(), &end, 10);
      if (end == v.c_str() || *end != '\0' || n <= 0) usage(a + ": expected a positive integer, got '" + v + "'");
      return n;
    };
    if (a == "--reps") o.reps = static_cast<int>(positive(value()));
    else if (a == "--warmup") o.warmup = static_cast<int>(positive(value()));
    else if (a == "--threads") o.threads = static_cast<int>(positive(value()));
    else if (a == "--global-batch") o.global_batch = positive(value());
    else if (a == "--json") o.json = value();
    else if (a == "-h" || a == "--help") usage("help");
    else usage("unknown argument '" + a + "'");
  }
  return o;
}

bnorm::Communicator* g_comm = nullptr;

void check(const bnorm::Status& s, const char* what) {
  if (s.ok()) return;
  g_comm->abort(std::string(what) + ": " + s.to_string(), 1);
}

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

struct Summary {
  double median = 0, min = 0, max_rank_median = 0;  // rank 0's median and min; max over ranks
};

double median_of(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t k = v.size();
  return k % 2 ? v[k / 2] : 0.5 * (v[k / 2 - 1] + v[k / 2]);
}

// Every rank's value, in rank order (an all-reduce where each rank fills its own slot).
std::vector<double> gather(double v) {
  std::vector<double> all(static_cast<size_t>(g_comm->size()), 0.0);
  all[static_cast<size_t>(g_comm->rank())] = v;
  check(g_comm->allreduce_sum(all), "gather");
  return all;
}

Summary summarize(const std::vector<double>& samples) {
  Summary s;
  s.median = median_of(samples);
  s.min = samples.empty() ? 0 : *std::min_element(samples.begin(), samples.end());
  const std::vector<double> medians = gather(s.median);
  s.max_rank_median = *std::max_element(medians.begin(), medians.end());
  return s;  // this rank's median and min (rank 0 prints its own)
}

// The global batch's share of rank r (as `bnorm train` splits it).
int64_t shard_begin(int64_t n, int k, int r) { return n / k * r + std::min<int64_t>(r, n % k); }

// ---------------------------------------------------------------------------------------------
// A bare all-reduce of `count` values, barrier before every call.
enum class Via { kCommunicator, kMpiAllreduce, kMpiIallreduce };

template <class T>
Summary time_allreduce(size_t count, const Options& o, Via via = Via::kCommunicator) {
  std::vector<T> buf(count);
  std::vector<double> ms;
  for (int rep = 0; rep < o.warmup + o.reps; ++rep) {
    // Keep the values bounded: every call adds K copies.
    std::fill(buf.begin(), buf.end(), static_cast<T>(0.5));
    check(g_comm->barrier(), "barrier");
    const auto t0 = Clock::now();
    if (via == Via::kCommunicator) {
      check(g_comm->allreduce_sum(std::span<T>(buf)), "allreduce_sum");
    } else {
#ifdef BNORM_SYNC_BENCH_RAW_MPI
      const MPI_Datatype type = sizeof(T) == 8 ? MPI_DOUBLE : MPI_FLOAT;
      const int n = static_cast<int>(count);
      int rc;
      if (via == Via::kMpiAllreduce) {
        rc = MPI_Allreduce(MPI_IN_PLACE, buf.data(), n, type, MPI_SUM, MPI_COMM_WORLD);
      } else {
        MPI_Request request;
        rc = MPI_Iallreduce(MPI_IN_PLACE, buf.data(), n, type, MPI_SUM, MPI_COMM_WORLD, &request);
        for (int done = 0; rc == MPI_SUCCESS && !done;)
          rc = MPI_Test(&request, &done, MPI_STATUS_IGNORE);
      }
      if (rc != MPI_SUCCESS) g_comm->abort("raw MPI all-reduce failed", 1);
#endif
    }
    const double t = ms_since(t0);
    if (rep >= o.warmup) ms.push_back(t);
  }
  return summarize(ms);
}

#ifdef BNORM_SYNC_BENCH_RAW_MPI
constexpr bool kRawMpi = true;
#else
constexpr bool kRawMpi = false;
#endif

struct Bare {
  std::string what;
  int64_t bytes = 0;
  bool is_float = false;
  Summary t;
  Summary mpi_blocking, mpi_nonblocking;  // when kRawMpi
};

template <class T>
void time_raw(Bare* b, const Options& o) {
  if (!kRawMpi) return;
  const size_t count = static_cast<size_t>(b->bytes) / sizeof(T);
  b->mpi_blocking = time_allreduce<T>(count, o, Via::kMpiAllreduce);
  b->mpi_nonblocking = time_allreduce<T>(count, o, Via::kMpiIallreduce);
}

// Times (once) and returns the bare all-reduce of `bytes` of doubles.
std::vector<Bare> g_bare;
const Bare& bare_doubles(int64_t bytes, const std::string& what, const Options& o) {
  for (const Bare& b : g_bare)
    if (b.bytes == bytes && !b.is_float) return b;
  Bare b;
  b.what = what;
  b.bytes = bytes;
  b.t = time_allreduce<double>(static_cast<size_t>(bytes / 8), o);
  time_raw<double>(&b, o);
  g_bare.push_back(b);
  return g_bare.back();
}

// ---------------------------------------------------------------------------------------------
struct Layer {
  std::string name;
  int64_t c;
  std::vector<int64_t> spatial;
};

// The cnn preset's batch-norm layers (include/bnorm/nn/models.h).
const std::vector<Layer> kLayers = {
    {"BN2d(32) after conv1", 32, {28, 28}},
    {"BN2d(64) after conv2", 64, {14, 14}},
    {"BN2d(128) after conv3", 128, {7, 7}},
    {"BN1d(256) after the hidden Linear", 256, {}},
};

struct Mode {
  const char* name;
  bnorm::SyncMode mode;
  bool give_split;
};
const Mode kModes[] = {
    {"reproducible", bnorm::SyncMode::kReproducible, false},
    {"reproducible + split", bnorm::SyncMode::kReproducible, true},
    {"per-rank", bnorm::SyncMode::kPerRank, false},
};
constexpr int kNumModes = 3;

struct ModeResult {
  Summary sync, sync_fwd, sync_bwd;
  Summary ar_fwd, ar_bwd, ar_total;  // all-reduce ms from the counters: per pass, both
  int64_t calls_fwd = 0, calls_bwd = 0, bytes_fwd = 0, bytes_bwd = 0;
  std::vector<int64_t> call_bytes_fwd, call_bytes_bwd;  // the calls' sizes, from the formulas
  std::vector<std::string> call_what_fwd, call_what_bwd;  // what each call holds
  double bare_fwd = 0, bare_bwd = 0;  // sum of the bare medians of those calls
  bool counters_match = true;
};

struct LayerResult {
  std::string name, local_shape, global_shape;
  Summary local, local_fwd, local_bwd;
  ModeResult modes[kNumModes];
};

std::string shape_string(int64_t n, const Layer& l) {
  // Appended piece by piece (GCC 12 warns, wrongly, on "(" + std::to_string(n)).
  std::string s = "(";
  s += std::to_string(n);
  for (int64_t d : {l.c}) s.append(", ").append(std::to_string(d));
  for (int64_t d : l.spatial) s.append(", ").append(std::to_string(d));
  s += ")";
  return s;
}

LayerResult run_layer(const Layer& layer, const Options& o) {
  const int size = g_comm->size(), rank = g_comm->rank();
  std::vector<int64_t> split(static_cast<size_t>(size));
  for (int r = 0; r < size; ++r)
    split[static_cast<size_t>(r)] =
        shard_begin(o.global_batch, size, r + 1) - shard_begin(o.global_batch, size, r);
  const int64_t n = split[static_cast<size_t>(rank)];
  int64_t s = 1;
  for (int64_t d : layer.spatial) s *= d;
  const int64_t c = layer.c;
  const size_t numel = static_cast<size_t>(n * c * s);
  std::vector<int64_t> dims = {n, c};
  dims.insert(dims.end(), layer.spatial.begin(), layer.spatial.end());

  LayerResult res;
  res.name = layer.name;
  res.local_shape = shape_string(split[0], layer);
  res.global_shape = shape_string(o.global_batch, layer);

  // Each rank its own data (the rank in the seed).
  std::mt19937 rng(1234u + 7919u * static_cast<unsigned>(rank) + static_cast<unsigned>(c));
  std::normal_distribution<float> normal(0.5f, 1.0f);
  std::vector<float> x(numel), dy(numel), y(numel), dx(numel);
  for (float& v : x) v = normal(rng);
  for (float& v : dy) v = normal(rng);
  std::vector<float> weight(static_cast<size_t>(c)), bias(static_cast<size_t>(c));
  for (int64_t i = 0; i < c; ++i) {
    weight[static_cast<size_t>(i)] = 1.0f + 0.01f * static_cast<float>(i % 5);
    bias[static_cast<size_t>(i)] = 0.02f * static_cast<float>(i % 3);
  }
  // Running statistics: one set synchronized (identical on every rank, as sync BN requires),
  // one for the local passes (which diverge between ranks).
  std::vector<float> rm_sync(static_cast<size_t>(c), 0.0f), rv_sync(static_cast<size_t>(c), 1.0f);
  std::vector<float> rm_local(rm_sync), rv_local(rv_sync);
  int64_t nbt_sync = 0, nbt_local = 0;
  std::vector<float> save_mean(static_cast<size_t>(c)), save_invstd(static_cast<size_t>(c));
  std::vector<float> dweight(static_cast<size_t>(c)), dbias(static_cast<size_t>(c));

  bnorm::ConstTensorView xv(x.data(), std::span<const int64_t>(dims));
  bnorm::ConstTensorView dyv(dy.data(), std::span<const int64_t>(dims));
  bnorm::TensorView yv(y.data(), std::span<const int64_t>(dims));
  bnorm::TensorView dxv(dx.data(), std::span<const int64_t>(dims));

  auto fwd_args = [&](bool sync) {
    bnorm::ForwardTrainArgs a;
    a.x = xv;
    a.weight = weight;
    a.bias = bias;
    a.running_mean = sync ? std::span<float>(rm_sync) : std::span<float>(rm_local);
    a.running_var = sync ? std::span<float>(rv_sync) : std::span<float>(rv_local);
    a.num_batches_tracked = sync ? &nbt_sync : &nbt_local;
    a.y = yv;
    a.save_mean = save_mean;
    a.save_invstd = save_invstd;
    return a;
  };
  auto bwd_args = [&] {
    bnorm::BackwardArgs a;
    a.dy = dyv;
    a.x = xv;
    a.weight = weight;
    a.training = true;
    a.save_mean = save_mean;
    a.save_invstd = save_invstd;
    a.dx = dxv;
    a.dweight = dweight;
    a.dbias = dbias;
    return a;
  };

  // One local forward + backward; returns {fwd ms, bwd ms}.
  auto local_pass = [&](double* fwd_ms, double* bwd_ms) {
    const auto t0 = Clock::now();
    check(bnorm::forward_train(fwd_args(false)), "forward_train");
    *fwd_ms = ms_since(t0);
    const auto t1 = Clock::now();
    check(bnorm::backward(bwd_args()), "backward");
    *bwd_ms = ms_since(t1);
  };
  struct Sample {
    double fwd_ms, bwd_ms, ar_fwd_ms, ar_bwd_ms;
    int64_t calls_fwd, calls_bwd, bytes_fwd, bytes_bwd;
  };
  std::vector<int64_t> split_used;
  // One synchronized forward + backward, as the layer makes them: the backward gets the
  // forward's split (so it never exchanges a header of its own).
  auto sync_pass = [&](const Mode& m) {
    Sample smp{};
    bnorm::SyncOptions fs;
    fs.mode = m.mode;
    if (m.give_split) fs.split = split;
    fs.split_out = &split_used;
    const bnorm::CommCounters c0 = g_comm->counters();
    const auto t0 = Clock::now();
    check(bnorm::sync_forward_train(*g_comm, fwd_args(true), {}, fs), "sync_forward_train");
    smp.fwd_ms = ms_since(t0);
    const bnorm::CommCounters c1 = g_comm->counters();
    bnorm::SyncOptions bs;
    bs.mode = m.mode;
    bs.split = split_used;
    const auto t1 = Clock::now();
    check(bnorm::sync_backward(*g_comm, bwd_args(), {}, bs), "sync_backward");
    smp.bwd_ms = ms_since(t1);
    const bnorm::CommCounters c2 = g_comm->counters();
    smp.ar_fwd_ms = 1e3 * (c1.allreduce_seconds - c0.allreduce_seconds);
    smp.ar_bwd_ms = 1e3 * (c2.allreduce_seconds - c1.allreduce_seconds);
    smp.calls_fwd = c1.allreduce_calls - c0.allreduce_calls;
    smp.calls_bwd = c2.allreduce_calls - c1.allreduce_calls;
    smp.bytes_fwd = c1.allreduce_bytes - c0.allreduce_bytes;
    smp.bytes_bwd = c2.allreduce_bytes - c1.allreduce_bytes;
    return smp;
  };

  std::vector<double> local_ms, local_fwd, local_bwd;
  std::vector<Sample> samples[kNumModes];
  // Warm-up, then the repetitions interleaved: the local pass and the three modes under the
  // same machine state, each after a barrier.
  for (int rep = 0; rep < o.warmup + o.reps; ++rep) {
    const bool timed = rep >= o.warmup;
    double f = 0, b = 0;
    check(g_comm->barrier(), "barrier");
    local_pass(&f, &b);
    if (timed) {
      local_ms.push_back(f + b);
      local_fwd.push_back(f);
      local_bwd.push_back(b);
    }
    for (int m = 0; m < kNumModes; ++m) {
      check(g_comm->barrier(), "barrier");
      const Sample smp = sync_pass(kModes[m]);
      if (timed) samples[m].push_back(smp);
    }
  }
  res.local = summarize(local_ms);
  res.local_fwd = summarize(local_fwd);
  res.local_bwd = summarize(local_bwd);

  const int64_t global_n = o.global_batch;
  for (int m = 0; m < kNumModes; ++m) {
    ModeResult& r = res.modes[m];
    const std::vector<Sample>& v = samples[m];
    std::vector<double> total, fwd, bwd, arf, arb, art;
    for (const Sample& smp : v) {
      total.push_back(smp.fwd_ms + smp.bwd_ms);
      fwd.push_back(smp.fwd_ms);
      bwd.push_back(smp.bwd_ms);
      arf.push_back(smp.ar_fwd_ms);
      arb.push_back(smp.ar_bwd_ms);
      art.push_back(smp.ar_fwd_ms + smp.ar_bwd_ms);
    }
    r.sync = summarize(total);
    r.sync_fwd = summarize(fwd);
    r.sync_bwd = summarize(bwd);
    r.ar_fwd = summarize(arf);
    r.ar_bwd = summarize(arb);
    r.ar_total = summarize(art);
    r.calls_fwd = v.front().calls_fwd;
    r.calls_bwd = v.front().calls_bwd;
    r.bytes_fwd = v.front().bytes_fwd;
    r.bytes_bwd = v.front().bytes_bwd;
    for (const Sample& smp : v)
      if (smp.calls_fwd != r.calls_fwd || smp.calls_bwd != r.calls_bwd ||
          smp.bytes_fwd != r.bytes_fwd || smp.bytes_bwd != r.bytes_bwd)
        r.counters_match = false;
    // The calls' sizes as src/comm/sync_batch_norm.cc makes them (doubles): a header of 10
    // (forward) or 5 (backward) values per rank, and a table of units x C x 2 values, units =
    // the global batch (reproducible) or the ranks (per-rank). Header and table travel in one
    // call when the units' layout is known before: a given split, or per-rank; else the
    // forward sends the headers first.
    const int64_t units = kModes[m].mode == bnorm::SyncMode::kPerRank ? size : global_n;
    const int64_t table = units * c * 2 * 8;
    const int64_t fwd_header = int64_t{size} * 10 * 8, bwd_header = int64_t{size} * 5 * 8;
    const bool fused = kModes[m].give_split || kModes[m].mode == bnorm::SyncMode::kPerRank;
    const std::string k = std::to_string(size), cs = std::to_string(c);
    const std::string table_what = std::to_string(units) + " x " + cs + " x 2 doubles";
    if (fused) {
      r.call_bytes_fwd = {fwd_header + table};
      r.call_what_fwd = {"fwd: " + k + " x 10 header + " + table_what};
    } else {
      r.call_bytes_fwd = {fwd_header, table};
      r.call_what_fwd = {"fwd header: " + k + " x 10 doubles", "fwd table: " + table_what};
    }
    r.call_bytes_bwd = {bwd_header + table};  // the backward always has the forward's split
    r.call_what_bwd = {"bwd: " + k + " x 5 header + " + table_what};
    int64_t sum_f = 0, sum_b = 0;
    for (int64_t b : r.call_bytes_fwd) sum_f += b;
    for (int64_t b : r.call_bytes_bwd) sum_b += b;
    if (sum_f != r.bytes_fwd || sum_b != r.bytes_bwd ||
        static_cast<int64_t>(r.call_bytes_fwd.size()) != r.calls_fwd ||
        static_cast<int64_t>(r.call_bytes_bwd.size()) != r.calls_bwd)
      r.counters_match = false;
  }
  return res;
}

// ---------------------------------------------------------------------------------------------
// Formatting.
std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}
std::string ms3(double v) { return fmt("%.3f", v); }
std::string bytes_text(int64_t b) {
  if (b >= 1024 * 1024) return fmt("%.2f MiB", static_cast<double>(b) / (1024.0 * 1024.0));
  if (b >= 1024) return fmt("%.1f KiB", static_cast<double>(b) / 1024.0);
  return std::to_string(b) + " B";
}
std::string join_bytes(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? " + " : "") + bytes_text(v[i]);
  return s;
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') out += '\\';
    out += ch;
  }
  return out;
}
std::string json_summary(const Summary& s) {
  return "{\"median_ms\": " + fmt("%.6f", s.median) + ", \"min_ms\": " + fmt("%.6f", s.min) +
         ", \"max_rank_median_ms\": " + fmt("%.6f", s.max_rank_median) + "}";
}

}  // namespace

int main(int argc, char** argv) {
  bnorm::Communicator* comm = nullptr;
  const bnorm::Status st = bnorm::mpi_world(&argc, &argv, &comm);
  if (!st.ok()) {
    std::fprintf(stderr, "bnorm_sync_bn_bench: %s\n", st.to_string().c_str());
    return 1;
  }
  g_comm = comm;
  const Options o = parse(argc, argv);
  const int size = comm->size(), rank = comm->rank();
  if (o.global_batch < size) usage("--global-batch must be at least the number of ranks");
  bnorm::set_num_threads(o.threads);
  const bool lead = rank == 0;
  if (lead)
    std::fprintf(stderr, "sync_bn_bench: %d ranks (%s) x %d threads, global batch %lld, %d reps\n",
                 size, comm->kind().c_str(), o.threads, static_cast<long long>(o.global_batch),
                 o.reps);

  std::vector<LayerResult> layers;
  for (const Layer& l : kLayers) {
    if (lead) std::fprintf(stderr, "  %s\n", l.name.c_str());
    layers.push_back(run_layer(l, o));
  }

  // Bare all-reduces of every call size above, then of the fused gradient buffers.
  for (LayerResult& lr : layers)
    for (int m = 0; m < kNumModes; ++m) {
      ModeResult& r = lr.modes[m];
      for (size_t i = 0; i < r.call_bytes_fwd.size(); ++i)
        r.bare_fwd += bare_doubles(r.call_bytes_fwd[i], r.call_what_fwd[i], o).t.median;
      for (size_t i = 0; i < r.call_bytes_bwd.size(); ++i)
        r.bare_bwd += bare_doubles(r.call_bytes_bwd[i], r.call_what_bwd[i], o).t.median;
    }
  // The cnn preset's fused gradient buffer (nn::DataParallel: the gradients the ranks must sum,
  // then the loss and the number correct), from the architecture of nn::cnn(true, seed):
  //   conv1 1*32*3*3 = 288, conv2 32*64*3*3 = 18,432, conv3 64*128*3*3 = 73,728 (no biases
  //   before BN), hidden Linear 6272*256 = 1,605,632 (no bias), head Linear 256*10 + 10 = 2,570:
  //   1,700,650 parameters outside batch norm, + 2 floats (loss, correct) = 1,700,652 floats.
  // With --sync-bn the batch-norm weights and biases are already global (not in the buffer).
  // Without --sync-bn the buffer also holds them, 2*(32+64+128+256) = 960, and rank 0's
  // running means and variances, another 960: 1,702,572 floats.
  const int64_t kFusedSync = 288 + 18432 + 73728 + 1605632 + 2570 + 2;
  const int64_t kFusedPlain = kFusedSync + 960 + 960;
  for (const auto& [what, count] :
       {std::pair<std::string, int64_t>{"fused gradients, --sync-bn (1,700,652 floats)", kFusedSync},
        std::pair<std::string, int64_t>{"fused gradients + BN params and buffers, no --sync-bn "
                                        "(1,702,572 floats)",
                                        kFusedPlain}}) {
    Bare b;
    b.what = what;
    b.bytes = count * 4;
    b.is_float = true;
    b.t = time_allreduce<float>(static_cast<size_t>(count), o);
    time_raw<float>(&b, o);
    g_bare.push_back(b);
  }

  if (!lead) return 0;

  // ---- Markdown.
  std::printf("### Synchronized batch norm, %d ranks (%s) x %d thread%s, global batch %lld\n\n",
              size, comm->kind().c_str(), o.threads, o.threads == 1 ? "" : "s",
              static_cast<long long>(o.global_batch));
  std::printf(
      "Per layer of the `cnn` preset, forward_train + backward, %d repetitions after %d warm-up, "
      "each after a barrier; rank 0's median (min), and the largest median over the ranks. "
      "*local*: forward_train + backward on the rank's own part only (what unsynchronized BN "
      "costs); *exchange cost*: sync median - local median, of which *all-reduce* is the time "
      "inside the all-reduce calls (comm->counters(), fwd + bwd, median) and *rest* the "
      "remainder (per-sample or per-rank partials, the merge, the buffers).\n\n",
      o.reps, o.warmup);
  std::printf("| layer | local shape (rank 0) | mode | sync fwd+bwd ms | max over ranks | "
              "local fwd+bwd ms | exchange cost ms | all-reduce ms | rest ms | "
              "sync fwd / bwd ms |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  for (const LayerResult& lr : layers)
    for (int m = 0; m < kNumModes; ++m) {
      const ModeResult& r = lr.modes[m];
      const double cost = r.sync.median - lr.local.median;
      std::printf("| %s | %s | %s | %s (%s) | %s | %s (%s) | %s | %s | %s | %s / %s |\n",
                  lr.name.c_str(), lr.local_shape.c_str(), kModes[m].name,
                  ms3(r.sync.median).c_str(), ms3(r.sync.min).c_str(),
                  ms3(r.sync.max_rank_median).c_str(), ms3(lr.local.median).c_str(),
                  ms3(lr.local.min).c_str(), ms3(cost).c_str(), ms3(r.ar_total.median).c_str(),
                  ms3(cost - r.ar_total.median).c_str(), ms3(r.sync_fwd.median).c_str(),
                  ms3(r.sync_bwd.median).c_str());
    }
  std::printf(
      "\nThe exchange: all-reduce calls and payload per pass (from comm->counters(); bytes/call "
      "= bytes / calls), the all-reduce time the counters measured per pass (median, includes "
      "waiting for the other ranks to arrive), and a bare all-reduce of the same call sizes "
      "after a barrier (the transfer alone, median; summed over the pass's calls).\n\n");
  std::printf("| layer | mode | calls fwd / bwd | bytes per pass fwd / bwd | bytes/call fwd / bwd | "
              "all-reduce ms fwd / bwd (counters) | bare all-reduce ms fwd / bwd |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  bool all_match = true;
  for (const LayerResult& lr : layers)
    for (int m = 0; m < kNumModes; ++m) {
      const ModeResult& r = lr.modes[m];
      all_match = all_match && r.counters_match;
      std::printf("| %s | %s | %lld / %lld | %s / %s | %s / %s | %s / %s | %s / %s |\n",
                  lr.name.c_str(), kModes[m].name, static_cast<long long>(r.calls_fwd),
                  static_cast<long long>(r.calls_bwd), join_bytes(r.call_bytes_fwd).c_str(),
                  join_bytes(r.call_bytes_bwd).c_str(),
                  bytes_text(r.calls_fwd ? r.bytes_fwd / r.calls_fwd : 0).c_str(),
                  bytes_text(r.calls_bwd ? r.bytes_bwd / r.calls_bwd : 0).c_str(),
                  ms3(r.ar_fwd.median).c_str(), ms3(r.ar_bwd.median).c_str(),
                  ms3(r.bare_fwd).c_str(), ms3(r.bare_bwd).c_str());
    }
  if (!all_match)
    std::printf("\n**Warning**: the counters' calls or bytes differ from the sizes "
                "src/comm/sync_batch_norm.cc documents, or between repetitions.\n");
  std::printf("\nBare all-reduce (Communicator::allreduce_sum, in place), barrier before each "
              "call, %d repetitions; rank 0's median (min) and the largest median over the ranks%s:"
              "\n\n",
              o.reps,
              kRawMpi ? ". The MPI columns time MPI itself on the same buffers: blocking "
                        "MPI_Allreduce, and MPI_Iallreduce + MPI_Test in a tight loop (what the "
                        "communicator calls, without its deadline and its sleeps)"
                      : "");
  std::printf("| payload | bytes | type | communicator ms | max over ranks ms | GB/s (bytes / "
              "median)%s |\n",
              kRawMpi ? " | MPI_Allreduce ms | MPI_Iallreduce + MPI_Test ms" : "");
  std::printf("|---|---|---|---|---|---|%s\n", kRawMpi ? "---|---|" : "");
  std::vector<const Bare*> sorted;
  for (const Bare& b : g_bare) sorted.push_back(&b);
  std::stable_sort(sorted.begin(), sorted.end(),
                   [](const Bare* a, const Bare* b) { return a->bytes < b->bytes; });
  for (const Bare* b : sorted) {
    std::printf("| %s | %lld (%s) | %s | %s (%s) | %s | %.2f |", b->what.c_str(),
                static_cast<long long>(b->bytes), bytes_text(b->bytes).c_str(),
                b->is_float ? "float" : "double", ms3(b->t.median).c_str(), ms3(b->t.min).c_str(),
                ms3(b->t.max_rank_median).c_str(),
                b->t.median > 0 ? static_cast<double>(b->bytes) / (b->t.median * 1e6) : 0.0);
    if (kRawMpi)
      std::printf(" %s (%s) | %s (%s) |", ms3(b->mpi_blocking.median).c_str(),
                  ms3(b->mpi_blocking.min).c_str(), ms3(b->mpi_nonblocking.median).c_str(),
                  ms3(b->mpi_nonblocking.min).c_str());
    std::printf("\n");
  }
  std::fflush(stdout);

  // ---- JSON.
  if (!o.json.empty()) {
    FILE* f = std::fopen(o.json.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "bnorm_sync_bn_bench: cannot write %s\n", o.json.c_str());
      return 1;
    }
    std::fprintf(f, "{\n  \"tool\": \"bnorm_sync_bn_bench\",\n  \"bnorm_version\": \"%s\",\n",
                 bnorm::version());
    std::fprintf(f,
                 "  \"ranks\": %d,\n  \"communicator\": \"%s\",\n  \"threads_per_rank\": %d,\n"
                 "  \"global_batch\": %lld,\n  \"reps\": %d,\n  \"warmup\": %d,\n"
                 "  \"counters_match_formulas\": %s,\n  \"layers\": [\n",
                 size, comm->kind().c_str(), o.threads, static_cast<long long>(o.global_batch),
                 o.reps, o.warmup, all_match ? "true" : "false");
    for (size_t i = 0; i < layers.size(); ++i) {
      const LayerResult& lr = layers[i];
      std::fprintf(f,
                   "    {\"layer\": \"%s\", \"local_shape_rank0\": \"%s\", \"global_shape\": "
                   "\"%s\",\n     \"local\": %s, \"local_fwd\": %s, \"local_bwd\": %s,\n"
                   "     \"modes\": [\n",
                   json_escape(lr.name).c_str(), lr.local_shape.c_str(), lr.global_shape.c_str(),
                   json_summary(lr.local).c_str(), json_summary(lr.local_fwd).c_str(),
                   json_summary(lr.local_bwd).c_str());
      for (int m = 0; m < kNumModes; ++m) {
        const ModeResult& r = lr.modes[m];
        std::fprintf(
            f,
            "      {\"mode\": \"%s\", \"sync\": %s, \"sync_fwd\": %s, \"sync_bwd\": %s,\n"
            "       \"exchange_cost_ms\": %.6f, \"allreduce_fwd\": %s, \"allreduce_bwd\": %s, \"allreduce_total\": %s,\n"
            "       \"calls_fwd\": %lld, \"calls_bwd\": %lld, \"bytes_fwd\": %lld, "
            "\"bytes_bwd\": %lld, \"bare_allreduce_fwd_ms\": %.6f, \"bare_allreduce_bwd_ms\": "
            "%.6f}%s\n",
            kModes[m].name, json_summary(r.sync).c_str(), json_summary(r.sync_fwd).c_str(),
            json_summary(r.sync_bwd).c_str(), r.sync.median - lr.local.median,
            json_summary(r.ar_fwd).c_str(), json_summary(r.ar_bwd).c_str(),
            json_summary(r.ar_total).c_str(),
            static_cast<long long>(r.calls_fwd), static_cast<long long>(r.calls_bwd),
            static_cast<long long>(r.bytes_fwd), static_cast<long long>(r.bytes_bwd), r.bare_fwd,
            r.bare_bwd, m + 1 < kNumModes ? "," : "");
      }
      std::fprintf(f, "     ]}%s\n", i + 1 < layers.size() ? "," : "");
    }
    std::fprintf(f, "  ],\n  \"bare_allreduce\": [\n");
    for (size_t i = 0; i < sorted.size(); ++i)
      std::fprintf(f,
                   "    {\"payload\": \"%s\", \"bytes\": %lld, \"type\": \"%s\", \"time\": %s%s%s%s%s}%s\n",
                   json_escape(sorted[i]->what).c_str(), static_cast<long long>(sorted[i]->bytes),
                   sorted[i]->is_float ? "float" : "double", json_summary(sorted[i]->t).c_str(),
                   kRawMpi ? ", \"mpi_allreduce\": " : "",
                   kRawMpi ? json_summary(sorted[i]->mpi_blocking).c_str() : "",
                   kRawMpi ? ", \"mpi_iallreduce_test\": " : "",
                   kRawMpi ? json_summary(sorted[i]->mpi_nonblocking).c_str() : "",
                   i + 1 < sorted.size() ? "," : "");
    std::fprintf(f, "  ]\n}\n");
    std::fclose(f);
  }
  return 0;
}
