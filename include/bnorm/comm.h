// Communicators and synchronized batch norm: batch norm over a global batch split across ranks.
//
// A Communicator is a group of `size()` ranks that call the same collectives in the same order
// (as MPI requires). Two implementations:
//   * InProcessGroup: K simulated ranks in one process, one thread each (tests, experiments);
//   * MPI (mpi_world(), in the bnorm_mpi library when built with BNORM_MPI=ON): one rank per
//     process under mpirun. No MPI type appears in this header.
//
// Synchronized batch norm (sync_forward_train / sync_backward) computes, on every rank, exactly
// what batch norm computes on the concatenation of all ranks' batches in rank order: each rank
// reduces its local part, one all-reduce exchanges the partial statistics, every rank merges
// them and applies to its own part. The merge depends on the global batch only (not on how it is
// split), so with SyncMode::kReproducible every output is bitwise identical for any number of
// ranks and any split of the same global batch. docs/distributed.md has the design and costs.
//
// Errors are collective: when one rank's arguments are bad, every rank's call returns an error
// (the bad rank's own message names the argument; the others name the rank), so no rank is left
// waiting in a collective.
#ifndef BNORM_COMM_H_
#define BNORM_COMM_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/status.h"

namespace bnorm {

// What a communicator has done so far (for benchmarks and reports).
struct CommCounters {
  int64_t allreduce_calls = 0;
  int64_t allreduce_bytes = 0;  // payload bytes of this rank's calls
  double allreduce_seconds = 0; // wall time spent inside all-reduce calls
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  // This rank, in [0, size()).
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // "in-process" or "mpi".
  virtual std::string kind() const = 0;

  // Element-wise sum over all ranks, in place. Every rank must pass the same number of values.
  // Every rank receives bitwise the same result. An element to which only one rank contributes
  // a non-zero value (the others 0) is that value exactly, so the call also gathers.
  // Fails (on every rank that can still tell) when the group was aborted or a rank did not
  // arrive within the group's timeout.
  virtual Status allreduce_sum(std::span<double> data) = 0;
  virtual Status allreduce_sum(std::span<float> data) = 0;

  // Returns when every rank has called it.
  virtual Status barrier() = 0;

  // Ends the group because this rank cannot go on: message goes to stderr prefixed with the
  // rank, and every other rank's pending and future collectives fail (in-process) or every
  // process is terminated with exit code `code` (MPI, does not return).
  virtual void abort(const std::string& message, int code) = 0;

  const CommCounters& counters() const { return counters_; }
  void reset_counters() { counters_ = CommCounters(); }

 protected:
  CommCounters counters_;
};

// K ranks in one process. Collectives block until every rank's thread has called them; a rank
// that does not arrive within `timeout_seconds` fails the collective on every waiting rank.
class InProcessGroup {
 public:
  // size in [1, 1024]; timeout_seconds > 0.
  static Status create(int size, std::unique_ptr<InProcessGroup>* out,
                       double timeout_seconds = 60.0);
  ~InProcessGroup();

  int size() const;
  // The communicator of rank r (r in [0, size())); owned by the group. Each is used by one
  // thread at a time.
  Communicator& rank(int r);

  // Runs fn(rank r's communicator) on size() threads, one per rank, and joins them. Returns
  // the OK status if every rank returned OK, else the lowest rank's error prefixed "rank r: ".
  Status run(const std::function<Status(Communicator&)>& fn);

  struct State;

 private:
  InProcessGroup() = default;
  std::unique_ptr<State> state_;
  std::vector<std::unique_ptr<Communicator>> ranks_;
};

// MPI, defined in the bnorm_mpi library (CMake option BNORM_MPI, target bnorm::bnorm_mpi).
// Whether this build has MPI at all.
bool mpi_compiled();
// True when the process was started by mpirun/mpiexec (OpenMPI's or PMI's environment).
bool launched_by_mpi();
// The ranks of MPI_COMM_WORLD (on a duplicate of it, so that bnorm's collectives never mix with
// the program's own messages), initializing MPI at thread level FUNNELED on the first call (only
// the thread that made that call may use the communicator); argc/argv may be null. MPI is
// finalized at exit. Every collective waits at most timeout_seconds for the other ranks (later
// calls reset it), then prints an error naming the rank and the collective and ends the process
// with exit code 70, which makes mpirun terminate the others: a killed or hung rank ends the job
// instead of hanging it. Fails when built without MPI.
Status mpi_world(int* argc, char*** argv, Communicator** out, double timeout_seconds = 45.0);

// How synchronized batch norm makes its exchange.
enum class SyncMode : int {
  // Partials per sample, merged in a fixed order over the global batch: bitwise identical for
  // any split. Payload per pass: (global batch) x C x 2 doubles.
  kReproducible = 0,
  // Partials per rank (count, mean, M2), merged with Chan's formula in rank order: deterministic
  // for a given split, within rounding of kReproducible otherwise. Payload: size() x C x 2.
  kPerRank = 1,
};

struct SyncOptions {
  SyncMode mode = SyncMode::kReproducible;
  // The per-rank sample counts of this call's global batch, when every rank knows them (the same
  // vector on every rank, e.g. from a deterministic sharding, or the forward's for its
  // backward). Given, a pass makes one exchange; empty, kReproducible first exchanges a small
  // header with the counts (two exchanges). A rank whose own count differs fails every rank.
  std::span<const int64_t> split;
  // When not null, receives the per-rank counts the call used (give them to the backward).
  std::vector<int64_t>* split_out = nullptr;
  // sync_backward's dweight and dbias: false (the default), the global batch's sums, identical
  // on every rank; true, this rank's part only (the sums over its own samples, merged by the
  // same tree), as torch.nn.SyncBatchNorm gives them, for a data-parallel step that sums them
  // over the ranks with the other gradients (PyTorch DDP). dx is the same either way. With one
  // rank the parts are the global sums; a rank with no samples gets zeros.
  bool local_weight_grads = false;
};

// Training forward over the global batch. args is this rank's part: x may hold N = 0 samples
// (then y is empty too) as long as the global count N_global * S is > 1. Every rank must pass
// the same C, spatial dims, layout (any, on a rank with N = 0), eps, momentum, weight/bias presence and identical running
// statistics; running statistics use the global count's Bessel factor n / (n - 1).
// save_mean / save_invstd receive the global batch's statistics (identical on every rank).
Status sync_forward_train(Communicator& comm, const ForwardTrainArgs& args,
                          const CallOptions& options = {}, const SyncOptions& sync = {});

// Training backward over the global batch (args.training must be true; eval-mode backward does
// not communicate: call backward()). dx is this rank's part; dweight and dbias, when asked, are
// the GLOBAL batch's sums, identical on every rank (do not all-reduce them again), unless
// sync.local_weight_grads asks for this rank's part.
Status sync_backward(Communicator& comm, const BackwardArgs& args, const CallOptions& options = {},
                     const SyncOptions& sync = {});

}  // namespace bnorm

#endif  // BNORM_COMM_H_
