// The MPI communicator (bnorm_mpi, BNORM_MPI=ON): MPI_COMM_WORLD behind bnorm::Communicator.
//
// Every collective has a deadline: a plain MPI_Allreduce would wait forever for a rank that hangs,
// where these print which rank waited for how long and end the whole job (exit code 70), so a
// batch system sees a failed job instead of an idle one. All-reduces are blocking MPI_Allreduce
// calls under a watchdog thread (the fast path); the barrier and the set-up are non-blocking
// calls polled against the deadline.
//
// Threading: MPI is initialized with MPI_THREAD_FUNNELED, so mpi_world() and every call on the
// communicator must come from the thread that first called mpi_world() (normally main). bnorm's
// own kernel threads never call MPI.
//
// Bitwise identical results on every rank: MPI_SUM on MPI_IN_PLACE leaves the order of the
// additions to the implementation. OpenMPI's all-reduce algorithms (recursive doubling, ring,
// reduce + broadcast) either reduce each element on one rank and send it, or have two partners
// add the same two values (a + b == b + a in IEEE arithmetic), so every rank ends with the same
// bits; tests/mpi/mpi_comm_test.cc checks it for 2 and 3 ranks.
#define OMPI_SKIP_MPICXX 1  // the C API only: no deprecated C++ bindings
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

#include "bnorm/comm.h"

namespace bnorm {
namespace {

constexpr int kTimeoutExitCode = 70;  // EX_SOFTWARE
// Elements per MPI call: MPI counts are int.
constexpr size_t kMaxChunk = size_t{1} << 30;

Status mpi_error(const char* call, int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) len = 0;
  return Status::internal(std::string(call) + " failed: " + std::string(text, len));
}

// Set by abort() and by a timeout: MPI_Abort is under way, so exit must not finalize.
bool g_aborting = false;
bool g_we_initialized = false;

void finalize_at_exit() {
  if (!g_we_initialized || g_aborting) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

// Polls the request: tightly for the first millisecond (a balanced exchange completes in
// microseconds), then every ~100 us so that a rank waiting for a slow one leaves the core to it
// (runs with more ranks than cores). Past the deadline, prints which rank waited for what and
// aborts every rank.
Status wait_or_abort(MPI_Request* request, int rank, const char* what,
                     std::chrono::steady_clock::time_point start, double timeout_seconds) {
  using Clock = std::chrono::steady_clock;
  const auto spin_until = start + std::chrono::milliseconds(1);
  for (;;) {
    int flag = 0;
    const int rc = MPI_Test(request, &flag, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) return mpi_error("MPI_Test", rc);
    if (flag) return Status();
    const auto now = Clock::now();
    const double waited = std::chrono::duration<double>(now - start).count();
    if (waited > timeout_seconds) {
      std::fprintf(stderr,
                   "bnorm: rank %d: %s waited %.1f s for the other ranks; aborting every rank\n",
                   rank, what, waited);
      std::fflush(stderr);
      g_aborting = true;
      MPI_Abort(MPI_COMM_WORLD, kTimeoutExitCode);
      std::_Exit(kTimeoutExitCode);
    }
    if (now > spin_until) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

// Ends this process when a blocking collective outlives its deadline. The collective arms it on
// entry and disarms it on return; the thread sleeps until the armed deadline. Blocking
// MPI_Allreduce is about twice as fast here as MPI_Iallreduce polled with MPI_Test (Open MPI's
// non-blocking collectives progress only when polled), so the deadline lives in this thread
// instead of in a polling loop. It calls no MPI function (the thread level is FUNNELED): it
// prints and _exit()s, and mpirun, seeing a rank die, terminates the others.
class Watchdog {
 public:
  using Clock = std::chrono::steady_clock;

  void arm(int rank, const char* what, size_t values, double timeout_seconds) {
    std::lock_guard<std::mutex> lock(mu_);
    rank_ = rank;
    what_ = what;
    values_ = values;
    timeout_ = timeout_seconds;
    deadline_ = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                   std::chrono::duration<double>(timeout_seconds));
    armed_ = true;
    if (!started_) {
      started_ = true;
      std::thread([this] { run(); }).detach();
    }
    cv_.notify_one();
  }

  void disarm() {
    std::lock_guard<std::mutex> lock(mu_);
    armed_ = false;
  }

 private:
  void run() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (!armed_) {
        cv_.wait(lock);
        continue;
      }
      cv_.wait_until(lock, deadline_);
      if (armed_ && Clock::now() >= deadline_) {
        std::fprintf(stderr,
                     "bnorm: rank %d: %s of %zu values waited %.1f s for the other ranks; "
                     "aborting every rank\n",
                     rank_, what_, values_, timeout_);
        std::fflush(stderr);
        std::_Exit(kTimeoutExitCode);
      }
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  bool started_ = false, armed_ = false;
  int rank_ = 0;
  const char* what_ = "";
  size_t values_ = 0;
  double timeout_ = 0;
  Clock::time_point deadline_;
};

Watchdog* watchdog() {
  static Watchdog* w = new Watchdog();  // never destroyed: its thread may still be waiting at exit
  return w;
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, int rank, int size) : comm_(comm), rank_(rank), size_(size) {}

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string kind() const override { return "mpi"; }

  void set_timeout(double seconds) { timeout_seconds_ = seconds; }

  Status allreduce_sum(std::span<double> data) override {
    return allreduce(data.data(), data.size(), MPI_DOUBLE, sizeof(double));
  }
  Status allreduce_sum(std::span<float> data) override {
    return allreduce(data.data(), data.size(), MPI_FLOAT, sizeof(float));
  }

  Status barrier() override {
    MPI_Request request;
    const int rc = MPI_Ibarrier(comm_, &request);
    if (rc != MPI_SUCCESS) return mpi_error("MPI_Ibarrier", rc);
    return wait(&request, "barrier", std::chrono::steady_clock::now());
  }

  void abort(const std::string& message, int code) override {
    std::fprintf(stderr, "bnorm: rank %d: %s\n", rank_, message.c_str());
    std::fflush(stderr);
    g_aborting = true;
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);  // MPI_Abort does not return; should it, end this process anyway
  }

 private:
  Status allreduce(void* data, size_t n, MPI_Datatype type, size_t element_bytes) {
    const auto start = std::chrono::steady_clock::now();
    Status s;
    char* bytes = static_cast<char*>(data);
    size_t done = 0;
    watchdog()->arm(rank_, "all-reduce", n, timeout_seconds_);
    do {
      const size_t count = std::min(n - done, kMaxChunk);
      const int rc = MPI_Allreduce(MPI_IN_PLACE, bytes + done * element_bytes,
                                   static_cast<int>(count), type, MPI_SUM, comm_);
      if (rc != MPI_SUCCESS) {
        s = mpi_error("MPI_Allreduce", rc);
        break;
      }
      done += count;
    } while (done < n);
    watchdog()->disarm();
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
    counters_.allreduce_calls += 1;
    counters_.allreduce_bytes += static_cast<int64_t>(n * element_bytes);
    counters_.allreduce_seconds += took.count();
    return s;
  }

  Status wait(MPI_Request* request, const char* what, std::chrono::steady_clock::time_point start) {
    return wait_or_abort(request, rank_, what, start, timeout_seconds_);
  }

  const MPI_Comm comm_;
  const int rank_;
  const int size_;
  double timeout_seconds_ = 45.0;
};

std::mutex g_world_mu;
MpiCommunicator* g_world = nullptr;  // never deleted: the pointer handed out stays valid

}  // namespace

bool mpi_compiled() { return true; }

// The same check as mpi_absent.cc's: OpenMPI's launcher, then PMI/PMIx (MPICH, Slurm).
bool launched_by_mpi() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMI_SIZE") != nullptr ||
         std::getenv("PMIX_RANK") != nullptr;
}

Status mpi_world(int* argc, char*** argv, Communicator** out, double timeout_seconds) {
  if (out == nullptr) return Status::invalid_argument("out: must not be null");
  if (!(timeout_seconds > 0) || !std::isfinite(timeout_seconds)) {
    char text[64];
    std::snprintf(text, sizeof text, "%g", timeout_seconds);
    return Status::invalid_argument(std::string("timeout_seconds: must be finite and > 0, got ") +
                                    text);
  }
  std::lock_guard<std::mutex> lock(g_world_mu);
  if (g_world == nullptr) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      int provided = 0;
      const int rc = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
      if (rc != MPI_SUCCESS) return Status::internal("MPI_Init_thread failed");
      // Finalized at exit only when initialized here: a program that initialized MPI itself
      // also finalizes it.
      g_we_initialized = true;
      std::atexit(finalize_at_exit);
    }
    // A duplicate of MPI_COMM_WORLD (same ranks): bnorm's collectives never match the
    // program's own messages on MPI_COMM_WORLD, and its error handler stays the program's.
    // Errors on the duplicate come back as codes (turned into a Status).
    int rank = 0;
    int size = 0;
    int rc = MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (rc != MPI_SUCCESS) return mpi_error("MPI_Comm_rank", rc);
    rc = MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (rc != MPI_SUCCESS) return mpi_error("MPI_Comm_size", rc);
    // The duplication is a collective too: under the same deadline.
    MPI_Comm comm = MPI_COMM_NULL;
    MPI_Request request;
    rc = MPI_Comm_idup(MPI_COMM_WORLD, &comm, &request);
    if (rc != MPI_SUCCESS) return mpi_error("MPI_Comm_idup", rc);
    BNORM_RETURN_IF_ERROR(wait_or_abort(&request, rank, "mpi_world (MPI_Comm_idup)",
                                        std::chrono::steady_clock::now(), timeout_seconds));
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    g_world = new MpiCommunicator(comm, rank, size);
  }
  // Every call sets the timeout: the latest caller's applies to the next collectives.
  g_world->set_timeout(timeout_seconds);
  *out = g_world;
  return Status();
}

}  // namespace bnorm
