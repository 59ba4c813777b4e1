// Synchronized batch norm: the stats and backward_reduce passes of the global batch, exchanged
// in one all-reduce each, then finalize and apply on every rank's own part.
//
// Why it is bitwise independent of the split (SyncMode::kReproducible): the unit of reduction is
// one sample. Each sample's partials (mean and M2 over its S values, or its two backward sums)
// are computed by the same kernel on the same (1, C, S) shape whichever rank holds it, so they
// are the same bits. The all-reduce places each in its own slot (every other rank adds +0.0,
// which is exact), so every rank receives the same table of partials in global-batch order.
// Every rank then merges the table with the same fixed pairwise tree over the global batch, so
// the merged statistics depend on the global batch only, and so does everything computed from
// them: y, dx, the running statistics, dweight and dbias.
//
// The exchange of the forward is preceded by a small one of every rank's header (status, count,
// shape, options): the payload's size depends on the global batch, and a rank whose arguments
// are bad reports it there, so that every rank fails together instead of waiting forever.
#include <algorithm>
#include <cmath>
#include <array>
#include <exception>
#include <functional>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include "bnorm/comm.h"
#include "comm/sync_detail.h"
#include "kernels.h"
#include "util/check.h"
#include "util/staging.h"

namespace bnorm {
namespace {

using detail::Geometry;

// Per-rank header of the forward exchange, in doubles.
enum Header : int {
  kStatus,     // 0: OK, else 1 + StatusCode
  kCount,      // local N
  kChannels,   // C
  kSpatial,    // S
  kLayout,     // Layout
  kFlags,      // 1: weight, 2: bias, 4: running statistics
  kEps,        // eps
  kMomentum,   // momentum, -1 for none
  kMode,       // SyncMode
  kStateHash,  // 48 bits of the running statistics (and num_batches_tracked)
  kHeaderSize
};

// Per-rank header of the backward exchange.
enum BackwardHeader : int { kBStatus, kBCount, kBChannels, kBSpatial, kBLayout, kBHeaderSize };

// +0.0 for -0.0, x otherwise: the other ranks add +0.0 to this slot, which would turn -0.0 into
// +0.0 on some splits only.
double canonical(double v) { return v + 0.0; }

uint64_t fnv1a(uint64_t h, const void* data, size_t bytes) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ULL;
  return h;
}

// The statistics of one unit of the merge: count, mean and sum of squared deviations M2.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
};

// Chan, Golub & LeVeque's pairwise update; an empty side leaves the other unchanged.
Moments chan(const Moments& a, const Moments& b) {
  if (a.n == 0) return b;
  if (b.n == 0) return a;
  Moments r;
  r.n = a.n + b.n;
  const double delta = b.mean - a.mean;
  r.mean = a.mean + delta * (b.n / r.n);
  r.m2 = a.m2 + b.m2 + delta * delta * (a.n / r.n) * b.n;
  return r;
}

// Units [lo, hi) of every channel merged by the fixed tree that halves the range, into out (C
// values). A node works on all channels at once, on contiguous rows (scratch: two rows per
// depth; the halving tree over u units is ceil(log2 u) deep), so the table is read row by row;
// per channel it is the same tree of the same operations, hence the same bits.
template <class Row, class Leaf, class Combine>
void merge_tree(int64_t channels, int64_t lo, int64_t hi, size_t depth, std::vector<Row>* scratch,
                Row* out, const Leaf& leaf, const Combine& combine) {
  if (hi - lo == 1) {
    for (int64_t c = 0; c < channels; ++c) out[c] = leaf(lo, c);
    return;
  }
  Row* left = scratch->data() + (2 * depth) * static_cast<size_t>(channels);
  Row* right = left + channels;
  const int64_t mid = lo + (hi - lo) / 2;
  merge_tree(channels, lo, mid, depth + 1, scratch, left, leaf, combine);
  merge_tree(channels, mid, hi, depth + 1, scratch, right, leaf, combine);
  for (int64_t c = 0; c < channels; ++c) out[c] = combine(left[c], right[c]);
}

// Rows of scratch merge_tree needs for `units` units: two per level of the tree.
template <class Row>
std::vector<Row> tree_scratch(int64_t channels, int64_t units) {
  size_t depth = 0;
  for (int64_t span = 1; span < units; span *= 2) ++depth;
  return std::vector<Row>(2 * (depth + 1) * static_cast<size_t>(channels));
}

// The forward's table (units x C x {mean, M2}) merged: the global batch's moments per channel.
void merge_moments(const std::vector<double>& counts, const double* table, int64_t channels,
                   int64_t units, Moments* out) {
  std::vector<Moments> scratch = tree_scratch<Moments>(channels, units);
  merge_tree(
      channels, 0, units, 0, &scratch, out,
      [&](int64_t u, int64_t c) {
        const double* v = table + (u * channels + c) * 2;
        return Moments{counts[static_cast<size_t>(u)], v[0], v[1]};
      },
      [](const Moments& a, const Moments& b) { return chan(a, b); });
}

// The backward's table (units x C x {sum dy, sum dy * xhat}) summed by the same tree.
struct Sums {
  double dy = 0, dy_xhat = 0;
};
// Units [lo, hi) of the table; zeros when the range is empty.
void merge_sums(const double* table, int64_t channels, int64_t lo, int64_t hi, Sums* out) {
  if (hi <= lo) {
    std::fill(out, out + channels, Sums{});
    return;
  }
  std::vector<Sums> scratch = tree_scratch<Sums>(channels, hi - lo);
  merge_tree(
      channels, lo, hi, 0, &scratch, out,
      [&](int64_t u, int64_t c) {
        const double* v = table + (u * channels + c) * 2;
        return Sums{v[0], v[1]};
      },
      [](const Sums& a, const Sums& b) { return Sums{a.dy + b.dy, a.dy_xhat + b.dy_xhat}; });
}

// A tensor that may hold N = 0 samples: checked as check_tensor does with N = 1.
Status check_local_tensor(const char* name, ConstTensorView t, Geometry* g) {
  if (t.rank() >= 1 && t.rank() <= kMaxRank && t.dim(0) == 0) {
    std::array<int64_t, kMaxRank> dims{};
    for (int i = 0; i < t.rank(); ++i) dims[i] = t.dim(i);
    dims[0] = 1;
    static const float kProbe = 0;
    ConstTensorView probe(&kProbe, std::span<const int64_t>(dims.data(), t.rank()), t.layout());
    BNORM_RETURN_IF_ERROR(detail::check_tensor(name, probe, g));
    g->n = 0;
    return Status();
  }
  return detail::check_tensor(name, t, g);
}

// Same dims and layout as `like` (either may hold N = 0; data may then be null).
Status check_local_same_shape(const char* name, ConstTensorView t, const char* like_name,
                              ConstTensorView like) {
  if (like.batch() > 0) return detail::check_same_shape(name, t, like_name, like);
  bool same = t.rank() == like.rank() && t.layout() == like.layout();
  for (int i = 0; same && i < t.rank(); ++i) same = t.dim(i) == like.dim(i);
  if (!same)
    return Status::invalid_argument(std::string(name) + ": size " + t.size_string() + " (" +
                                    layout_name(t.layout()) + ") must equal " + like_name +
                                    "'s size " + like.size_string() + " (" +
                                    layout_name(like.layout()) + ")");
  return Status();
}


double encode(const Status& s) {
  return s.ok() ? 0.0 : 1.0 + static_cast<double>(static_cast<int>(s.code()));
}

Status with_code(StatusCode code, std::string message) {
  switch (code) {
    case StatusCode::kNonFinite:
      return Status::non_finite(std::move(message));
    case StatusCode::kInternal:
      return Status::internal(std::move(message));
    default:
      return Status::invalid_argument(std::move(message));
  }
}

// After an exchange of headers: OK if every rank's status is; else this rank's own error, or an
// error naming the lowest failed rank.
Status collective_status(const Status& mine, const double* headers, int size, int stride,
                         int status_index, int rank) {
  if (!mine.ok())
    return with_code(mine.code(), mine.message() + " (on rank " + std::to_string(rank) +
                                      "; every rank stops)");
  for (int r = 0; r < size; ++r) {
    const double code = headers[r * stride + status_index];
    if (code != 0)
      return Status::invalid_argument("sync batch norm: rank " + std::to_string(r) + " failed (" +
                                      status_code_name(static_cast<StatusCode>(code - 1)) +
                                      ", see its message); every rank stops");
  }
  return Status();
}

// Which units the payload has, and where this rank's go.
struct Split {
  std::vector<double> unit_counts;  // values per unit (sample or rank)
  int64_t units = 0;
  int64_t first_unit = 0;  // this rank's first unit
  int64_t global_n = 0;    // samples of the global batch
};

Split make_split(const std::vector<int64_t>& counts, int rank, int64_t spatial, SyncMode mode) {
  Split s;
  for (size_t r = 0; r < counts.size(); ++r) {
    if (static_cast<int>(r) < rank) s.first_unit += mode == SyncMode::kPerRank ? 1 : counts[r];
    s.global_n += counts[r];
  }
  if (mode == SyncMode::kPerRank) {
    s.units = static_cast<int64_t>(counts.size());
    s.first_unit = rank;
    for (int64_t c : counts) s.unit_counts.push_back(static_cast<double>(c * spatial));
  } else {
    s.units = s.global_n;
    s.unit_counts.assign(static_cast<size_t>(s.global_n), static_cast<double>(spatial));
  }
  return s;
}

// Runs partials(part, offset, out) over this rank's units: its whole part of the batch as one
// (per-rank mode) or each sample as a (1, C, S) part; offset is the part's first value in the
// tensors, out its slots (C x 2).
template <class Partials>
void for_each_unit(const Geometry& g, SyncMode mode, double* slots, const Partials& partials) {
  if (g.n == 0) return;
  if (mode == SyncMode::kPerRank) {
    partials(g, int64_t{0}, slots);
    return;
  }
  Geometry one = g;
  one.n = 1;
  for (int64_t i = 0; i < g.n; ++i) partials(one, i * g.c * g.s, slots + i * g.c * 2);
}

// This rank's stats partials (mean, M2) into its slots of the table (units x C x 2).
void local_stats(const Geometry& g, const float* x, const detail::Implementation& impl,
                 SyncMode mode, double* slots) {
  std::vector<double> mean(g.c), var(g.c);
  for_each_unit(g, mode, slots, [&](const Geometry& part, int64_t offset, double* out) {
    const float* data = x + offset;
    if (mode == SyncMode::kReproducible && g.s == 1) {  // one value: it is the mean, M2 is 0
      for (int64_t c = 0; c < g.c; ++c) {
        out[2 * c] = canonical(static_cast<double>(data[c]));
        out[2 * c + 1] = 0.0;
      }
      return;
    }
    impl.stats(part, data, mean.data(), var.data());
    const double n = static_cast<double>(part.count());
    for (int64_t c = 0; c < g.c; ++c) {
      out[2 * c] = canonical(mean[c]);
      out[2 * c + 1] = canonical(var[c] * n);
    }
  });
}

// This rank's backward partials (sum dy, sum dy * xhat) into its slots.
void local_backward_sums(const Geometry& g, const float* dy, const float* x, const double* mean,
                         const double* invstd, const detail::Implementation& impl,
                         SyncMode mode, double* slots) {
  std::vector<double> s0(g.c), s1(g.c);
  for_each_unit(g, mode, slots, [&](const Geometry& part, int64_t offset, double* out) {
    const float* d = dy + offset;
    const float* data = x + offset;
    if (mode == SyncMode::kReproducible && g.s == 1) {  // one value: the sums are its terms
      for (int64_t c = 0; c < g.c; ++c) {
        const double v = static_cast<double>(d[c]);
        out[2 * c] = canonical(v);
        out[2 * c + 1] = canonical(v * ((static_cast<double>(data[c]) - mean[c]) * invstd[c]));
      }
      return;
    }
    impl.backward_reduce(part, d, data, mean, invstd, s0.data(), s1.data());
    for (int64_t c = 0; c < g.c; ++c) {
      out[2 * c] = canonical(s0[c]);
      out[2 * c + 1] = canonical(s1[c]);
    }
  });
}

// What every rank must agree on, checked after the header exchange.
Status check_agreement(const double* h, int size, int stride,
                       std::initializer_list<std::pair<int, const char*>> fields) {
  for (const auto& [index, name] : fields)
    for (int r = 1; r < size; ++r) {
      const double a = h[index], b = h[r * stride + index];
      if (!(a == b) && !(std::isnan(a) && std::isnan(b)))
        return Status::invalid_argument(
            std::string("sync batch norm: ") + name + " differs between ranks: " +
            detail::format_number(a) + " on rank 0, " + detail::format_number(b) + " on rank " +
            std::to_string(r));
    }
  return Status();
}

// The headers with the layout of every rank that holds no samples replaced by that of the first
// rank that holds some: an empty part has no memory order (PyTorch calls an empty tensor
// contiguous in every memory format), and the layout changes nothing it computes.
std::vector<double> ignore_empty_layouts(const double* h, int size, int stride, int count_index,
                                         int layout_index) {
  std::vector<double> out(h, h + static_cast<size_t>(size) * static_cast<size_t>(stride));
  int first = -1;
  for (int r = 0; r < size && first < 0; ++r)
    if (h[r * stride + count_index] > 0) first = r;
  if (first < 0) return out;
  for (int r = 0; r < size; ++r)
    if (h[r * stride + count_index] == 0)
      out[static_cast<size_t>(r * stride + layout_index)] = h[first * stride + layout_index];
  return out;
}

// One pass's exchange: header_size doubles per rank (status first, local N second), then the
// table of units x C x {2 values}. When the units' layout is known before (a given split, or
// one unit per rank) header and table travel in one all-reduce; else the headers go first.
// On return, *table points at the merged table inside *buffer.
struct ExchangeArgs {
  int header_size = 0;
  std::function<void(double*)> fill_header;               // when the local status is OK
  std::function<Status(const double*)> check_headers;     // every rank's headers
  std::function<void(const Split&, double*)> fill_slots;  // this rank's slots
};

Status exchange(Communicator& comm, Status mine, const Geometry& g, const SyncOptions& sync,
                const ExchangeArgs& x, std::vector<double>* buffer, const double** table,
                Split* split) {
  const int size = comm.size(), rank = comm.rank();
  const int hs = x.header_size;
  const size_t header_values = static_cast<size_t>(size) * static_cast<size_t>(hs);
  if (mine.ok() && !sync.split.empty()) {
    if (sync.split.size() != static_cast<size_t>(size))
      mine = Status::invalid_argument("split: has " + std::to_string(sync.split.size()) +
                                      " counts for " + std::to_string(size) + " ranks");
    else if (sync.split[static_cast<size_t>(rank)] != g.n)
      mine = Status::invalid_argument(
          "split: says rank " + std::to_string(rank) + " holds " +
          std::to_string(sync.split[static_cast<size_t>(rank)]) + " samples, x has " +
          std::to_string(g.n));
  }
  std::vector<int64_t> counts(sync.split.begin(), sync.split.end());
  const bool fused = counts.size() == static_cast<size_t>(size) || sync.mode == SyncMode::kPerRank;
  auto read_counts = [&](const double* headers) {
    counts.assign(static_cast<size_t>(size), 0);
    for (int r = 0; r < size; ++r)
      counts[static_cast<size_t>(r)] = static_cast<int64_t>(headers[r * hs + 1]);
  };
  auto check = [&](const double* headers) -> Status {
    BNORM_RETURN_IF_ERROR(collective_status(mine, headers, size, hs, 0, rank));
    return x.check_headers(headers);
  };
  auto fill_header = [&](double* headers) {
    double* h = headers + static_cast<size_t>(rank) * hs;
    h[0] = encode(mine);
    if (mine.ok()) {
      h[1] = static_cast<double>(g.n);
      x.fill_header(h);
    }
  };
  auto table_values = [&](const Split& s) { return static_cast<size_t>(s.units * g.c * 2); };
  if (fused) {
    // The units' layout before the exchange: from the given counts, or one unit per rank (whose
    // counts arrive in the headers).
    std::vector<int64_t> provisional = counts;
    if (provisional.empty()) provisional.assign(static_cast<size_t>(size), 0);
    Split pre = make_split(provisional, rank, g.s, sync.mode);
    BNORM_RETURN_IF_ERROR(detail::run_kernels([&] {
      buffer->assign(header_values + table_values(pre), 0.0);
      fill_header(buffer->data());
      if (mine.ok()) x.fill_slots(pre, buffer->data() + header_values + pre.first_unit * g.c * 2);
    }));
    BNORM_RETURN_IF_ERROR(comm.allreduce_sum(*buffer));
    BNORM_RETURN_IF_ERROR(check(buffer->data()));
    read_counts(buffer->data());
  } else {
    std::vector<double> headers(header_values, 0.0);
    fill_header(headers.data());
    BNORM_RETURN_IF_ERROR(comm.allreduce_sum(headers));
    BNORM_RETURN_IF_ERROR(check(headers.data()));
    read_counts(headers.data());
  }
  *split = make_split(counts, rank, g.s, sync.mode);
  if (split->global_n * g.s <= 1)
    return Status::invalid_argument(
        "x: Expected more than 1 value per channel when training, got a global batch of " +
        std::to_string(split->global_n) + " samples x " + std::to_string(g.s) +
        " values per channel over " + std::to_string(size) + " ranks");
  if (!fused) {
    BNORM_RETURN_IF_ERROR(detail::run_kernels([&] {
      buffer->assign(table_values(*split), 0.0);
      x.fill_slots(*split, buffer->data() + split->first_unit * g.c * 2);
    }));
    BNORM_RETURN_IF_ERROR(comm.allreduce_sum(*buffer));
  }
  *table = buffer->data() + (fused ? header_values : 0);
  if (sync.split_out != nullptr) *sync.split_out = counts;
  return Status();
}

}  // namespace

Status sync_forward_train(Communicator& comm, const ForwardTrainArgs& a, const CallOptions& options,
                          const SyncOptions& sync) {
  return detail::sync_forward_train(comm, a, options, sync, Status());
}

Status sync_backward(Communicator& comm, const BackwardArgs& a, const CallOptions& options,
                     const SyncOptions& sync) {
  return detail::sync_backward(comm, a, options, sync, Status());
}

namespace {

Status forward_train_pass(Communicator& comm, const ForwardTrainArgs& a,
                          const CallOptions& options, const SyncOptions& sync,
                          const Status& prior);
Status backward_pass(Communicator& comm, const BackwardArgs& a, const CallOptions& options,
                     const SyncOptions& sync, const Status& prior);

// Out of memory anywhere in a pass (its scratch, a kernel's first plan for a shape) is this
// rank's error, with nothing written: the passes write their outputs only after the last
// allocation.
template <class Pass>
Status without_exceptions(Pass&& pass) {
  try {
    return pass();
  } catch (const std::bad_alloc&) {
    return Status::internal("out of memory");
  } catch (const std::exception& e) {
    return Status::internal(e.what());
  }
}

}  // namespace

namespace detail {

Status sync_forward_train(Communicator& comm, const ForwardTrainArgs& a, const CallOptions& options,
                          const SyncOptions& sync, const Status& prior) {
  return without_exceptions([&] { return forward_train_pass(comm, a, options, sync, prior); });
}

Status sync_backward(Communicator& comm, const BackwardArgs& a, const CallOptions& options,
                     const SyncOptions& sync, const Status& prior) {
  return without_exceptions([&] { return backward_pass(comm, a, options, sync, prior); });
}

}  // namespace detail

namespace {

Status forward_train_pass(Communicator& comm, const ForwardTrainArgs& a,
                          const CallOptions& options, const SyncOptions& sync,
                          const Status& prior) {
  const int size = comm.size();
  // Local validation; its result travels in the header. C as given, even when x is bad: the
  // size of a fused exchange depends on it.
  Geometry g;
  g.c = std::max<int64_t>(a.x.channels(), 0);
  double factor = 0;
  int64_t batches = 0;
  const bool tracking = !a.running_mean.empty() || !a.running_var.empty();
  auto validate = [&]() -> Status {
    BNORM_RETURN_IF_ERROR(check_local_tensor("x", a.x, &g));
    BNORM_RETURN_IF_ERROR(check_local_same_shape("y", a.y, "x", a.x));
    if (g.n > 0)
      BNORM_RETURN_IF_ERROR(
          detail::check_no_partial_overlap("y", a.y.raw(), "x", a.x.raw(), g.numel(), dtype_size(a.x.dtype())));
    BNORM_RETURN_IF_ERROR(detail::check_channel_vector("weight", a.weight.size(), g.c, false, a.x));
    BNORM_RETURN_IF_ERROR(detail::check_channel_vector("bias", a.bias.size(), g.c, false, a.x));
    BNORM_RETURN_IF_ERROR(detail::check_no_extensions_for_sync(a));
    BNORM_RETURN_IF_ERROR(detail::check_train_args(a, g, &factor, &batches));
    if (sync.mode != SyncMode::kReproducible && sync.mode != SyncMode::kPerRank)
      return Status::invalid_argument("sync mode: unknown value " +
                                      std::to_string(static_cast<int>(sync.mode)));
    if (options.check_finite && g.n > 0)
      BNORM_RETURN_IF_ERROR(detail::check_finite("x", a.x, g));
    return Status();
  };
  Status mine = prior.ok() ? validate() : prior;
  // bf16 / fp16 tensors: the pass runs on an fp32 copy of x (exact), y rounded at the end.
  detail::Fp32Copy staged;
  const bool half = mine.ok() && g.n > 0 && a.x.dtype() != DType::kFloat32;
  if (half) mine = detail::run_kernels([&] { detail::widen_to_fp32(a.x, g.numel(), &staged); });
  const float* xp = half ? staged.data() : a.x.data();
  float* yp = half ? staged.data() : a.y.data();

  uint64_t state_hash = 0;
  if (mine.ok() && tracking) {
    state_hash = 1469598103934665603ULL;
    state_hash = fnv1a(state_hash, a.running_mean.data(), a.running_mean.size_bytes());
    state_hash = fnv1a(state_hash, a.running_var.data(), a.running_var.size_bytes());
    state_hash = fnv1a(state_hash, &batches, sizeof batches);
  }
  const detail::Implementation& impl = detail::select_implementation(options.backend);
  ExchangeArgs ex;
  ex.header_size = kHeaderSize;
  ex.fill_header = [&](double* h) {
    h[kChannels] = static_cast<double>(g.c);
    h[kSpatial] = static_cast<double>(g.s);
    h[kLayout] = static_cast<double>(static_cast<int>(g.layout));
    h[kFlags] = (a.weight.empty() ? 0 : 1) + (a.bias.empty() ? 0 : 2) + (tracking ? 4 : 0);
    h[kEps] = a.eps;
    h[kMomentum] = a.momentum ? *a.momentum : -1.0;
    h[kMode] = static_cast<double>(static_cast<int>(sync.mode));
    h[kStateHash] = static_cast<double>(state_hash >> 16);  // 48 bits: exact in a double
  };
  ex.check_headers = [&](const double* all) {
    const std::vector<double> h = ignore_empty_layouts(all, size, kHeaderSize, kCount, kLayout);
    const double* headers = h.data();
    return check_agreement(
        headers, size, kHeaderSize,
        {{kChannels, "C (channels)"}, {kSpatial, "the product of the spatial dims"},
         {kLayout, "layout"}, {kFlags, "which of weight, bias and running statistics are given"},
         {kEps, "eps"}, {kMomentum, "momentum (-1: none)"}, {kMode, "sync mode"},
         {kStateHash, "a hash of the running statistics and num_batches_tracked"}});
  };
  ex.fill_slots = [&](const Split&, double* slots) {
    local_stats(g, xp, impl, sync.mode, slots);
  };
  std::vector<double> buffer;
  const double* table = nullptr;
  Split split;
  BNORM_RETURN_IF_ERROR(exchange(comm, mine, g, sync, ex, &buffer, &table, &split));

  const int64_t channels = g.c;
  Geometry global = g;
  global.n = split.global_n;
  std::vector<double> mean(channels), var(channels), invstd(channels);
  // From here on every rank computes the same values from the same table.
  std::vector<Moments> moments(static_cast<size_t>(channels));
  merge_moments(split.unit_counts, table, channels, split.units, moments.data());
  for (int64_t c = 0; c < channels; ++c) {
    mean[c] = moments[static_cast<size_t>(c)].mean;
    var[c] = moments[static_cast<size_t>(c)].m2 / moments[static_cast<size_t>(c)].n;
  }
  // The running statistics are finalized into copies and written back only after the apply,
  // which may still fail to allocate (its first plan for this shape): nothing written on error.
  std::vector<float> new_running_mean, new_running_var;
  if (tracking) {
    new_running_mean.assign(a.running_mean.begin(), a.running_mean.end());
    new_running_var.assign(a.running_var.begin(), a.running_var.end());
  }
  float* running_mean = tracking ? new_running_mean.data() : nullptr;
  float* running_var = tracking ? new_running_var.data() : nullptr;
  std::vector<double> weight, bias;
  if (!a.weight.empty()) weight.assign(a.weight.begin(), a.weight.end());
  if (!a.bias.empty()) bias.assign(a.bias.begin(), a.bias.end());
  BNORM_RETURN_IF_ERROR(detail::run_kernels([&] {
    detail::finalize(global, mean.data(), var.data(), a.eps, factor, invstd.data(), running_mean,
                     running_var);
    if (g.n > 0) {
      const double* w = weight.empty() ? nullptr : weight.data();
      const double* b = bias.empty() ? nullptr : bias.data();
      impl.apply(g, xp, mean.data(), invstd.data(), w, b, yp);
    }
  }));
  if (half) detail::narrow_from_fp32(staged, a.y);
  if (tracking) {
    std::copy(new_running_mean.begin(), new_running_mean.end(), a.running_mean.begin());
    std::copy(new_running_var.begin(), new_running_var.end(), a.running_var.begin());
  }
  for (int64_t c = 0; c < channels; ++c) {
    if (!a.save_mean.empty()) a.save_mean[c] = static_cast<float>(mean[c]);
    if (!a.save_invstd.empty()) a.save_invstd[c] = static_cast<float>(invstd[c]);
  }
  if (tracking && a.num_batches_tracked != nullptr) *a.num_batches_tracked = batches + 1;
  return Status();
}

Status backward_pass(Communicator& comm, const BackwardArgs& a, const CallOptions& options,
                     const SyncOptions& sync, const Status& prior) {
  const int size = comm.size();
  Geometry g;
  g.c = std::max<int64_t>(a.x.channels(), 0);
  auto validate = [&]() -> Status {
    if (!a.training)
      return Status::invalid_argument(
          "training: sync_backward is the training-mode backward (eval mode does not "
          "communicate: call backward), got false");
    BNORM_RETURN_IF_ERROR(check_local_tensor("x", a.x, &g));
    BNORM_RETURN_IF_ERROR(check_local_same_shape("dy", a.dy, "x", a.x));
    BNORM_RETURN_IF_ERROR(check_local_same_shape("dx", a.dx, "x", a.x));
    if (g.n > 0) {
      BNORM_RETURN_IF_ERROR(
          detail::check_no_partial_overlap("dx", a.dx.raw(), "dy", a.dy.raw(), g.numel(), dtype_size(a.x.dtype())));
      BNORM_RETURN_IF_ERROR(
          detail::check_no_partial_overlap("dx", a.dx.raw(), "x", a.x.raw(), g.numel(), dtype_size(a.x.dtype())));
    }
    BNORM_RETURN_IF_ERROR(detail::check_no_extensions_for_sync(a));
    BNORM_RETURN_IF_ERROR(detail::check_backward_args(a, g));
    if (sync.mode != SyncMode::kReproducible && sync.mode != SyncMode::kPerRank)
      return Status::invalid_argument("sync mode: unknown value " +
                                      std::to_string(static_cast<int>(sync.mode)));
    if (options.check_finite && g.n > 0) {
      BNORM_RETURN_IF_ERROR(detail::check_finite("dy", a.dy, g));
      BNORM_RETURN_IF_ERROR(detail::check_finite("x", a.x, g));
    }
    return Status();
  };
  Status mine = prior.ok() ? validate() : prior;
  // bf16 / fp16 tensors: the pass runs on fp32 copies of dy and x (exact), dx rounded at the end.
  detail::Fp32Copy staged_dy, staged_x;
  const bool half = mine.ok() && g.n > 0 && a.x.dtype() != DType::kFloat32;
  if (half)
    mine = detail::run_kernels([&] {
      detail::widen_to_fp32(a.dy, g.numel(), &staged_dy);
      detail::widen_to_fp32(a.x, g.numel(), &staged_x);
    });
  const float* dyp = half ? staged_dy.data() : a.dy.data();
  const float* xp = half ? staged_x.data() : a.x.data();
  float* dxp = half ? staged_dy.data() : a.dx.data();

  const detail::Implementation& impl = detail::select_implementation(options.backend);
  const int64_t channels = g.c;
  std::vector<double> mean(a.save_mean.begin(), a.save_mean.end());
  std::vector<double> invstd(a.save_invstd.begin(), a.save_invstd.end());
  std::vector<double> sum_dy(channels), sum_dy_xhat(channels), weight;
  if (!a.weight.empty()) weight.assign(a.weight.begin(), a.weight.end());
  ExchangeArgs ex;
  ex.header_size = kBHeaderSize;
  ex.fill_header = [&](double* h) {
    h[kBChannels] = static_cast<double>(g.c);
    h[kBSpatial] = static_cast<double>(g.s);
    h[kBLayout] = static_cast<double>(static_cast<int>(g.layout));
  };
  ex.check_headers = [&](const double* all) {
    const std::vector<double> h = ignore_empty_layouts(all, size, kBHeaderSize, kBCount, kBLayout);
    const double* headers = h.data();
    return check_agreement(headers, size, kBHeaderSize,
                           {{kBChannels, "C (channels)"},
                            {kBSpatial, "the product of the spatial dims"},
                            {kBLayout, "layout"}});
  };
  ex.fill_slots = [&](const Split&, double* slots) {
    local_backward_sums(g, dyp, xp, mean.data(), invstd.data(), impl, sync.mode,
                        slots);
  };
  std::vector<double> buffer;
  const double* table = nullptr;
  Split split;
  BNORM_RETURN_IF_ERROR(exchange(comm, mine, g, sync, ex, &buffer, &table, &split));
  std::vector<Sums> sums(static_cast<size_t>(channels));
  merge_sums(table, channels, 0, split.units, sums.data());
  for (int64_t c = 0; c < channels; ++c) {
    sum_dy[c] = sums[static_cast<size_t>(c)].dy;
    sum_dy_xhat[c] = sums[static_cast<size_t>(c)].dy_xhat;
  }
  // dweight and dbias of this rank's part only: its own units (its samples, or its one unit in
  // the per-rank mode), merged by the same tree. With one rank they are the global sums.
  if (sync.local_weight_grads && (!a.dweight.empty() || !a.dbias.empty())) {
    const int64_t own = sync.mode == SyncMode::kPerRank ? (g.n > 0 ? 1 : 0) : g.n;
    merge_sums(table, channels, split.first_unit, split.first_unit + own, sums.data());
  }

  if (g.n > 0) {
    const double* w = weight.empty() ? nullptr : weight.data();
    const int64_t global_count = split.global_n * g.s;
    BNORM_RETURN_IF_ERROR(detail::run_kernels([&] {
      impl.backward_apply(g, dyp, xp, mean.data(), invstd.data(), w,
                          sum_dy.data(), sum_dy_xhat.data(), true, dxp, global_count);
    }));
    if (half) detail::narrow_from_fp32(staged_dy, a.dx);
  }
  for (int64_t c = 0; c < channels; ++c) {
    if (!a.dweight.empty()) a.dweight[c] = static_cast<float>(sums[static_cast<size_t>(c)].dy_xhat);
    if (!a.dbias.empty()) a.dbias[c] = static_cast<float>(sums[static_cast<size_t>(c)].dy);
  }
  return Status();
}

}  // namespace
}  // namespace bnorm
