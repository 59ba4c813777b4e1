// InProcessGroup: K simulated ranks, one thread each, meeting in rounds under one mutex.
//
// A collective is a round. Each rank records its buffer and arrives; the last to arrive checks
// that every rank called the same collective with the same length, sums the buffers in rank
// order 0..K-1 into the round's result and wakes the others; each rank then copies the result
// back and departs. A new round starts only when every rank has departed the previous one, so
// the result buffer is never written while a rank still reads it (the copy runs outside the
// lock, ordered by it).
//
// Failures poison the group: after an abort or a timeout every pending and future collective on
// every rank fails with the same message, because the ranks can no longer agree on which round
// they are in. A length or kind mismatch only fails that round (every rank arrived and sees it).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "bnorm/comm.h"
#include "util/check.h"

namespace bnorm {
namespace {

enum class Op { kNone, kSumDouble, kSumFloat, kBarrier };

const char* op_name(Op op) {
  switch (op) {
    case Op::kSumDouble:
      return "allreduce_sum(double)";
    case Op::kSumFloat:
      return "allreduce_sum(float)";
    case Op::kBarrier:
      return "barrier";
    case Op::kNone:
      break;
  }
  return "nothing";
}

// Status keeps its constructor private: rebuild one with a new message and the same code.
Status with_message(const Status& s, std::string message) {
  switch (s.code()) {
    case StatusCode::kInvalidArgument:
      return Status::invalid_argument(std::move(message));
    case StatusCode::kNonFinite:
      return Status::non_finite(std::move(message));
    case StatusCode::kOk:
    case StatusCode::kInternal:
      break;
  }
  return Status::internal(std::move(message));
}

// Sum of the ranks' buffers in rank order: result = ((x0 + x1) + x2) + ..., starting from x0
// itself (not from +0.0) so that the result is exactly the IEEE sum of the K values.
template <typename T>
void sum_in_rank_order(const std::vector<const void*>& sources, size_t n, std::vector<T>* out) {
  out->resize(n);
  if (n == 0) return;
  std::memcpy(out->data(), sources[0], n * sizeof(T));
  T* acc = out->data();
  for (size_t r = 1; r < sources.size(); ++r) {
    const T* x = static_cast<const T*>(sources[r]);
    for (size_t i = 0; i < n; ++i) acc[i] += x[i];
  }
}

}  // namespace

struct InProcessGroup::State {
  explicit State(int k, double timeout) : size(k), timeout_seconds(timeout) {
    ops.assign(k, Op::kNone);
    lengths.assign(k, 0);
    sources.assign(k, nullptr);
    arrived_flags.assign(k, 0);
  }

  const int size;
  const double timeout_seconds;

  std::mutex mu;
  std::condition_variable cv;

  // Set once, by abort() or a timeout; then every collective returns it.
  Status failure;

  // The current round. Between rounds: arrived == 0 and departing == false.
  int arrived = 0;
  bool complete = false;  // the last rank has arrived; result and round_status are set
  int departed = 0;       // ranks that have left a complete round
  std::vector<Op> ops;    // per rank
  std::vector<size_t> lengths;
  std::vector<const void*> sources;
  std::vector<char> arrived_flags;
  Status round_status;
  std::vector<double> result_double;
  std::vector<float> result_float;

  // Runs one collective for `rank`. data/n: its buffer (null/0 for a barrier).
  Status collective(int rank, Op op, void* data, size_t n);

 private:
  void finish_round_locked();
  std::string missing_ranks_locked() const;
};

std::string InProcessGroup::State::missing_ranks_locked() const {
  std::string s;
  for (int r = 0; r < size; ++r) {
    if (arrived_flags[r]) continue;
    if (!s.empty()) s += ", ";
    s += std::to_string(r);
  }
  return s;
}

// Called with the lock held by the last rank to arrive.
void InProcessGroup::State::finish_round_locked() {
  round_status = Status();
  bool same_op = true;
  bool same_length = true;
  for (int r = 1; r < size; ++r) {
    same_op = same_op && ops[r] == ops[0];
    same_length = same_length && lengths[r] == lengths[0];
  }
  if (!same_op) {
    std::string m = "collective mismatch: the ranks called different collectives:";
    for (int r = 0; r < size; ++r) {
      m += std::string(r ? "," : "") + " rank " + std::to_string(r) + " " + op_name(ops[r]);
    }
    round_status = Status::invalid_argument(m);
  } else if (!same_length) {
    std::string m = std::string(op_name(ops[0])) + ": the ranks passed different lengths:";
    for (int r = 0; r < size; ++r) {
      m += std::string(r ? "," : "") + " rank " + std::to_string(r) + " " +
           std::to_string(lengths[r]);
    }
    round_status = Status::invalid_argument(m);
  } else if (ops[0] == Op::kSumDouble) {
    sum_in_rank_order<double>(sources, lengths[0], &result_double);
  } else if (ops[0] == Op::kSumFloat) {
    sum_in_rank_order<float>(sources, lengths[0], &result_float);
  }
  complete = true;
  departed = 0;
}

Status InProcessGroup::State::collective(int rank, Op op, void* data, size_t n) {
  std::unique_lock<std::mutex> lock(mu);
  // The previous round's ranks are copying its result: they are awake and leave promptly.
  cv.wait(lock, [&] { return !failure.ok() || !complete; });
  if (!failure.ok()) return failure;

  ops[rank] = op;
  lengths[rank] = n;
  sources[rank] = data;
  arrived_flags[rank] = 1;
  ++arrived;
  if (arrived == size) {
    finish_round_locked();
    cv.notify_all();
  } else {
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                              std::chrono::duration<double>(timeout_seconds));
    while (!complete && failure.ok()) {
      if (cv.wait_until(lock, deadline) == std::cv_status::timeout && !complete && failure.ok()) {
        const char* what = op == Op::kBarrier ? "barrier" : "all-reduce";
        failure = Status::internal(std::string(what) + ": rank(s) " + missing_ranks_locked() +
                                   " did not arrive within " +
                                   detail::format_number(timeout_seconds) + " s");
        cv.notify_all();
      }
    }
    if (!complete) return failure;
  }

  // The round is complete: copy the result out of the lock; the next round cannot begin (and
  // overwrite it) before this rank departs.
  Status status = round_status;
  lock.unlock();
  if (status.ok() && n > 0) {
    if (op == Op::kSumDouble) {
      std::memcpy(data, result_double.data(), n * sizeof(double));
    } else if (op == Op::kSumFloat) {
      std::memcpy(data, result_float.data(), n * sizeof(float));
    }
  }
  lock.lock();
  if (++departed == size) {
    arrived = 0;
    complete = false;
    std::fill(arrived_flags.begin(), arrived_flags.end(), 0);
    std::fill(sources.begin(), sources.end(), nullptr);
    cv.notify_all();
  }
  return status;
}

namespace {

class InProcessCommunicator final : public Communicator {
 public:
  InProcessCommunicator(InProcessGroup::State* state, int rank) : state_(state), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return state_->size; }
  std::string kind() const override { return "in-process"; }

  Status allreduce_sum(std::span<double> data) override {
    return timed(Op::kSumDouble, data.data(), data.size(), sizeof(double));
  }
  Status allreduce_sum(std::span<float> data) override {
    return timed(Op::kSumFloat, data.data(), data.size(), sizeof(float));
  }

  Status barrier() override { return state_->collective(rank_, Op::kBarrier, nullptr, 0); }

  void abort(const std::string& message, int code) override {
    (void)code;  // no process to end: the other ranks' collectives fail instead
    std::fprintf(stderr, "bnorm: rank %d: %s\n", rank_, message.c_str());
    std::fflush(stderr);
    std::lock_guard<std::mutex> lock(state_->mu);
    if (state_->failure.ok()) {
      state_->failure = Status::internal("rank " + std::to_string(rank_) + " aborted: " + message);
    }
    state_->cv.notify_all();
  }

 private:
  Status timed(Op op, void* data, size_t n, size_t element_bytes) {
    const auto start = std::chrono::steady_clock::now();
    Status s = state_->collective(rank_, op, data, n);
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
    counters_.allreduce_calls += 1;
    counters_.allreduce_bytes += static_cast<int64_t>(n * element_bytes);
    counters_.allreduce_seconds += took.count();
    return s;
  }

  InProcessGroup::State* state_;
  int rank_;
};

}  // namespace

Status InProcessGroup::create(int size, std::unique_ptr<InProcessGroup>* out,
                              double timeout_seconds) {
  if (out == nullptr) return Status::invalid_argument("out: must not be null");
  if (size < 1 || size > 1024) {
    return Status::invalid_argument("size: must be in [1, 1024], got " + std::to_string(size));
  }
  if (!(timeout_seconds > 0) || !std::isfinite(timeout_seconds)) {
    return Status::invalid_argument("timeout_seconds: must be finite and > 0, got " +
                                    detail::format_number(timeout_seconds));
  }
  std::unique_ptr<InProcessGroup> group(new InProcessGroup());
  group->state_ = std::make_unique<State>(size, timeout_seconds);
  group->ranks_.reserve(size);
  for (int r = 0; r < size; ++r) {
    group->ranks_.push_back(std::make_unique<InProcessCommunicator>(group->state_.get(), r));
  }
  *out = std::move(group);
  return Status();
}

InProcessGroup::~InProcessGroup() = default;

int InProcessGroup::size() const { return state_->size; }

Communicator& InProcessGroup::rank(int r) {
  if (r < 0 || r >= state_->size) {
    // A programming error with no Status to return: say so and stop, as an out-of-range index.
    std::fprintf(stderr, "bnorm: InProcessGroup::rank(%d): must be in [0, %d)\n", r, state_->size);
    std::abort();
  }
  return *ranks_[r];
}

Status InProcessGroup::run(const std::function<Status(Communicator&)>& fn) {
  const int k = state_->size;
  std::vector<Status> results(k);
  std::vector<std::thread> threads;
  threads.reserve(k);
  for (int r = 0; r < k; ++r) {
    threads.emplace_back([this, &fn, &results, r] {
      Communicator& comm = *ranks_[r];
      // An exception would end the process; turn it into this rank's error and abort the
      // group so the other ranks do not wait for it until the timeout.
      try {
        results[r] = fn(comm);
      } catch (const std::exception& e) {
        results[r] = Status::internal(std::string("exception: ") + e.what());
        comm.abort(results[r].message(), 1);
      } catch (...) {
        results[r] = Status::internal("exception of unknown type");
        comm.abort(results[r].message(), 1);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < k; ++r) {
    if (!results[r].ok()) {
      return with_message(results[r], "rank " + std::to_string(r) + ": " + results[r].message());
    }
  }
  return Status();
}

}  // namespace bnorm
