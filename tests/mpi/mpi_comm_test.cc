// The MPI communicator under mpirun: rank and size, all-reduce sums of doubles and floats (the
// exact sum of each possible order of the additions, and bitwise the same on every rank),
// gathering through single contributors, a large exchange, barriers, counters. Exits 0 only if
// every check passed on every rank.
//
//   mpirun -np K bnorm_mpi_comm_test K                 the checks above, K = expected size
//   mpirun -np K bnorm_mpi_comm_test K timeout-fault   rank 0 waits alone: must abort the job
//   mpirun -np K bnorm_mpi_comm_test K abort-fault     rank 1 calls abort(): must end the job
// (tests/mpi/run_mpi.sh adds the flags a container or root needs.)
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "bnorm/comm.h"

namespace {

using bnorm::Communicator;
using bnorm::Status;

int g_rank = -1;
int g_failures = 0;

void check(bool ok, const std::string& what) {
  if (ok) return;
  ++g_failures;
  std::fprintf(stderr, "mpi_comm_test: rank %d: FAILED: %s\n", g_rank, what.c_str());
}

bool check_ok(const Status& s, const std::string& what) {
  check(s.ok(), what + ": " + s.to_string());
  return s.ok();
}

// Rank r's values: magnitudes 1e-8..1e8 of both signs, so that the order of additions shows.
template <typename T>
std::vector<T> rank_data(int rank, size_t n) {
  std::mt19937_64 rng(12345 + 7919 * rank);
  std::uniform_real_distribution<double> mantissa(-1.0, 1.0);
  std::uniform_int_distribution<int> exponent(-8, 8);
  std::vector<T> v(n);
  for (size_t i = 0; i < n; ++i)
    v[i] = static_cast<T>(mantissa(rng) * std::pow(10.0, exponent(rng)));
  return v;
}

template <typename T>
uint64_t bits_of(T x) {
  if constexpr (sizeof(T) == 8) {
    uint64_t b;
    std::memcpy(&b, &x, 8);
    return b;
  } else {
    uint32_t b;
    std::memcpy(&b, &x, 4);
    return b;
  }
}

// True when every rank holds the same bit patterns as rank 0. Gathers them through the
// one-contributor property: each 64-bit pattern as four 16-bit integers (exact in a double),
// each rank filling only its own slot.
bool identical_on_every_rank(Communicator& c, const std::vector<uint64_t>& bits) {
  const size_t n = bits.size();
  const int k = c.size();
  std::vector<double> all(static_cast<size_t>(k) * n * 4, 0.0);
  for (size_t i = 0; i < n; ++i) {
    for (int q = 0; q < 4; ++q) {
      all[(c.rank() * n + i) * 4 + q] = static_cast<double>((bits[i] >> (16 * q)) & 0xffff);
    }
  }
  if (!check_ok(c.allreduce_sum(std::span<double>(all)), "gather of bit patterns")) return false;
  for (int r = 1; r < k; ++r) {
    if (std::memcmp(&all[r * n * 4], &all[0], n * 4 * sizeof(double)) != 0) return false;
  }
  return true;
}

// The sums of every order of additions MPI may use: for 2 ranks x0 + x1 (== x1 + x0); for 3
// ranks the three trees (x0 + x1) + x2, (x0 + x2) + x1, (x1 + x2) + x0. For more ranks only a
// rounding bound is checked.
template <typename T>
bool is_an_exact_sum(const std::vector<std::vector<T>>& x, size_t i, T got) {
  const size_t k = x.size();
  if (k == 1) return bits_of(got) == bits_of(x[0][i]);
  if (k == 2) return bits_of(got) == bits_of(static_cast<T>(x[0][i] + x[1][i]));
  if (k == 3) {
    const T a = x[0][i], b = x[1][i], c = x[2][i];
    for (T s :
         {static_cast<T>(static_cast<T>(a + b) + c), static_cast<T>(static_cast<T>(a + c) + b),
          static_cast<T>(static_cast<T>(b + c) + a)}) {
      if (bits_of(got) == bits_of(s)) return true;
    }
    return false;
  }
  long double exact = 0, magnitude = 0;
  for (size_t r = 0; r < k; ++r) {
    exact += x[r][i];
    magnitude += std::fabs(static_cast<long double>(x[r][i]));
  }
  const long double eps = std::numeric_limits<T>::epsilon();
  return std::fabs(static_cast<long double>(got) - exact) <= k * eps * magnitude;
}

template <typename T>
void check_sums(Communicator& c, size_t n, const char* type) {
  std::vector<std::vector<T>> x(c.size());
  for (int r = 0; r < c.size(); ++r) x[r] = rank_data<T>(r, n);
  std::vector<T> v = x[c.rank()];
  if (!check_ok(c.allreduce_sum(std::span<T>(v)), std::string("allreduce_sum(") + type + ")")) {
    return;
  }
  int wrong = 0;
  for (size_t i = 0; i < n; ++i) wrong += !is_an_exact_sum(x, i, v[i]);
  check(wrong == 0, std::string(type) + " sums of " + std::to_string(n) + " values: " +
                        std::to_string(wrong) + " are not a sum of the ranks' values");
  std::vector<uint64_t> bits(n);
  for (size_t i = 0; i < n; ++i) bits[i] = bits_of(v[i]);
  check(identical_on_every_rank(c, bits),
        std::string(type) + " sums of " + std::to_string(n) + " values differ between ranks");
}

void run_checks(Communicator& c, int expected_size) {
  check(bnorm::mpi_compiled(), "mpi_compiled() is false");
  check(bnorm::launched_by_mpi(), "launched_by_mpi() is false under mpirun");
  check(c.kind() == "mpi", "kind() is '" + c.kind() + "'");
  check(c.size() == expected_size,
        "size() is " + std::to_string(c.size()) + ", expected " + std::to_string(expected_size));
  check(c.rank() >= 0 && c.rank() < c.size(), "rank() out of range");
  if (const char* env = std::getenv("OMPI_COMM_WORLD_RANK")) {
    check(std::atoi(env) == c.rank(),
          std::string("rank() differs from OMPI_COMM_WORLD_RANK ") + env);
  }
  Communicator* again = nullptr;
  check(bnorm::mpi_world(nullptr, nullptr, &again, 30.0).ok() && again == &c,
        "a second mpi_world() returns another communicator");

  // Gather: every rank's slot holds its rank exactly, so the ranks are 0..size-1, once each.
  {
    std::vector<double> slots(c.size(), 0.0);
    slots[c.rank()] = c.rank() + 0.5;
    if (check_ok(c.allreduce_sum(std::span<double>(slots)), "gather of ranks")) {
      for (int r = 0; r < c.size(); ++r) {
        check(slots[r] == r + 0.5,
              "slot " + std::to_string(r) + " holds " + std::to_string(slots[r]));
      }
    }
  }

  for (size_t n : {size_t{1}, size_t{7}, size_t{1000}}) {
    check_sums<double>(c, n, "double");
    check_sums<float>(c, n, "float");
  }

  // A zero-length all-reduce is a valid, empty collective.
  {
    std::vector<double> none;
    check_ok(c.allreduce_sum(std::span<double>(none)), "zero-length allreduce_sum");
  }

  // Large enough for the shared-memory transport's single-copy path and the ring algorithm:
  // integer values, so the sum is exact in any order.
  {
    const size_t n = size_t{1} << 19;  // 4 MiB of doubles
    std::vector<double> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = static_cast<double>(c.rank() + 1 + i % 1000);
    if (check_ok(c.allreduce_sum(std::span<double>(v)), "large allreduce_sum")) {
      const double k = c.size();
      size_t wrong = 0;
      for (size_t i = 0; i < n; ++i) wrong += v[i] != k * (k + 1) / 2 + k * (i % 1000);
      check(wrong == 0, "large all-reduce: " + std::to_string(wrong) + " wrong sums");
    }
    std::vector<float> f(n, 1.0f);
    if (check_ok(c.allreduce_sum(std::span<float>(f)), "large float allreduce_sum")) {
      size_t wrong = 0;
      for (float x : f) wrong += x != static_cast<float>(c.size());
      check(wrong == 0, "large float all-reduce: " + std::to_string(wrong) + " wrong sums");
    }
  }

  // Barrier: the others wait for a late rank 0.
  {
    check_ok(c.barrier(), "barrier");
    if (c.rank() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(300));
    const auto start = std::chrono::steady_clock::now();
    check_ok(c.barrier(), "barrier after a late rank");
    const double waited =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (c.rank() != 0) {
      check(waited > 0.2,
            "barrier returned after " + std::to_string(waited) + " s while rank 0 was 0.3 s late");
    }
    for (int i = 0; i < 100; ++i) check_ok(c.barrier(), "barrier " + std::to_string(i));
  }

  // Counters: this rank's calls and payload bytes; barriers are not all-reduces.
  {
    c.reset_counters();
    std::vector<double> d(10, 1.0);
    std::vector<float> f(4, 1.0f);
    check_ok(c.allreduce_sum(std::span<double>(d)), "counted allreduce");
    check_ok(c.allreduce_sum(std::span<double>(d)), "counted allreduce");
    check_ok(c.allreduce_sum(std::span<float>(f)), "counted allreduce");
    check_ok(c.barrier(), "barrier");
    const bnorm::CommCounters& n = c.counters();
    check(n.allreduce_calls == 3, "allreduce_calls " + std::to_string(n.allreduce_calls));
    check(n.allreduce_bytes == 2 * 80 + 16, "allreduce_bytes " + std::to_string(n.allreduce_bytes));
    check(n.allreduce_seconds >= 0 && n.allreduce_seconds < 30, "allreduce_seconds");
  }
}

}  // namespace

int main(int argc, char** argv) {
  Communicator* comm = nullptr;
  const std::string mode = argc > 2 ? argv[2] : "";
  const double timeout = mode == "timeout-fault" ? 1.0 : 30.0;
  const Status s = bnorm::mpi_world(&argc, &argv, &comm, timeout);
  if (!s.ok()) {
    std::fprintf(stderr, "mpi_comm_test: mpi_world: %s\n", s.to_string().c_str());
    return 1;
  }
  g_rank = comm->rank();
  const int expected_size = argc > 1 ? std::atoi(argv[1]) : comm->size();

  if (mode == "timeout-fault") {
    // Rank 0 all-reduces alone; the others are busy for longer than its timeout. Rank 0 must
    // print the timeout and abort the job (mpirun exits with 70) well before they return.
    if (comm->rank() == 0) {
      std::vector<double> v(3, 1.0);
      (void)comm->allreduce_sum(std::span<double>(v));
      std::fprintf(stderr, "mpi_comm_test: FAILED: the all-reduce returned\n");
      return 1;
    }
    std::this_thread::sleep_for(std::chrono::seconds(30));
    std::fprintf(stderr, "mpi_comm_test: FAILED: rank %d was not ended by the abort\n", g_rank);
    return 1;
  }
  if (mode == "abort-fault") {
    // Rank 1 gives up; the others wait in a barrier that must not hang the job.
    if (comm->rank() == 1) comm->abort("deliberate abort from the test", 3);
    (void)comm->barrier();
    std::fprintf(stderr, "mpi_comm_test: FAILED: rank %d passed the barrier\n", g_rank);
    return 1;
  }
  if (!mode.empty()) {
    std::fprintf(stderr, "mpi_comm_test: unknown mode '%s'\n", mode.c_str());
    return 2;
  }

  run_checks(*comm, expected_size);

  // Every rank learns the total: exit 0 only if no rank failed.
  double failures = g_failures;
  const Status total = comm->allreduce_sum(std::span<double>(&failures, 1));
  if (!total.ok()) {
    std::fprintf(stderr, "mpi_comm_test: rank %d: summing the failures: %s\n", g_rank,
                 total.to_string().c_str());
    return 1;
  }
  if (comm->rank() == 0) {
    std::printf("mpi_comm_test: %d ranks: %s\n", comm->size(),
                failures == 0 ? "all checks passed" : "FAILED (see above)");
  }
  return failures == 0 ? 0 : 1;
}
