// The C API: builds views from raw pointers, calls the functional passes, keeps the last error
// message per thread. Never lets a C++ exception cross into C.
#include "bnorm/c_api.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "bnorm/batch_norm.h"
#include "bnorm/comm.h"
#include "comm/sync_detail.h"
#include "util/check.h"

namespace {

thread_local std::string last_error;

int report(const bnorm::Status& status) {
  if (status.ok()) return BNORM_OK;
  last_error = status.message();
  return static_cast<int>(status.code());
}

// The C API has no options argument: BNORM_CHECK_FINITE=1 turns the finiteness check on.
bnorm::CallOptions options_from_environment() {
  bnorm::CallOptions options;
  const char* env = std::getenv("BNORM_CHECK_FINITE");
  options.check_finite = env != nullptr && env[0] != '\0' && std::strcmp(env, "0") != 0;
  return options;
}

// The layout as the caller passed it. A C or ctypes caller can pass any int, and loading a
// bnorm_layout outside 0..1 as the enum is undefined in C++, so read its bytes.
int raw_layout(const bnorm_layout& layout) {
  static_assert(sizeof(bnorm_layout) == sizeof(int), "bnorm_layout is passed as an int");
  int raw;
  std::memcpy(&raw, &layout, sizeof raw);
  return raw;
}

// n, c, s and the layout, before any view is made of them.
bnorm::Status check_dims(const bnorm_layout& layout, int64_t n, int64_t c, int64_t s) {
  const int raw = raw_layout(layout);
  if (raw != BNORM_CHANNELS_FIRST && raw != BNORM_CHANNELS_LAST)
    return bnorm::Status::invalid_argument(
        "layout: must be BNORM_CHANNELS_FIRST (0) or BNORM_CHANNELS_LAST (1), got " +
        std::to_string(raw));
  if (n == 0) return bnorm::Status::invalid_argument("n: empty batch, got n = 0");
  if (n < 0) return bnorm::Status::invalid_argument("n: must be > 0, got " + std::to_string(n));
  if (c <= 0) return bnorm::Status::invalid_argument("c: must be > 0, got " + std::to_string(c));
  if (s <= 0) return bnorm::Status::invalid_argument("s: must be > 0, got " + std::to_string(s));
  return bnorm::Status();
}

// The dtype as the caller passed it (an int: any value can arrive from C or ctypes), checked
// before anything else of a *_dt call.
bnorm::Status check_dtype(int dtype) {
  if (dtype == BNORM_FLOAT32 || dtype == BNORM_BFLOAT16 || dtype == BNORM_FLOAT16)
    return bnorm::Status();
  return bnorm::Status::invalid_argument(
      "dtype " + std::to_string(dtype) +
      " is not one of float32 (0), bfloat16 (1), float16 (2); float64 tensors are not "
      "supported");
}

// A tensor of the C API: its data (fp32, bf16 or fp16 elements) and their dtype.
using CTensor = const void*;
using MTensor = void*;

// (N, C) when s == 1, else (N, C, S): the rank only shows in messages. dtype: already checked.
template <class Raw>
auto view(Raw* data, int dtype, const bnorm_layout& layout, int64_t n, int64_t c, int64_t s) {
  using T = std::conditional_t<std::is_const_v<Raw>, const float, float>;
  const auto l = static_cast<bnorm::Layout>(raw_layout(layout));
  const auto dt = static_cast<bnorm::DType>(dtype);
  const int64_t dims2[2] = {n, c};
  const int64_t dims3[3] = {n, c, s};
  if (s == 1) return bnorm::BasicTensorView<T>(data, dt, std::span<const int64_t>(dims2, 2), l);
  return bnorm::BasicTensorView<T>(data, dt, std::span<const int64_t>(dims3, 3), l);
}

template <class T>
std::span<T> vec(T* p, int64_t c) {
  return p == nullptr ? std::span<T>() : std::span<T>(p, static_cast<size_t>(c));
}

// ceil(n / G) statistics chunks of a ghost pass; 1 when G is off or out of range, or when the
// chunk vectors' size would overflow (the pass then rejects the call).
int64_t ghost_chunks(int64_t n, int64_t c, int64_t ghost_batch) {
  if (ghost_batch < 2 || n < ghost_batch) return 1;
  const int64_t chunks = (n + ghost_batch - 1) / ghost_batch;
  return c > std::numeric_limits<int64_t>::max() / chunks ? 1 : chunks;
}

// A view of an optional tensor (the fused passes' z and dz): empty when p is NULL.
template <class Raw>
auto optional_view(Raw* p, int dtype, const bnorm_layout& layout, int64_t n, int64_t c,
                   int64_t s) {
  using View = decltype(view(p, dtype, layout, n, c, s));
  return p == nullptr ? View() : view(p, dtype, layout, n, c, s);
}

// What the C API checks of a training forward's running statistics and momentum before any
// view is made (the pass checks the rest).
bnorm::Status check_train_state(const float* running_mean, const float* running_var,
                                double momentum) {
  if ((running_mean == nullptr) != (running_var == nullptr))
    return bnorm::Status::invalid_argument(
        std::string("running_mean and running_var: give both (tracking) or neither, got ") +
        (running_mean ? "running_var NULL" : "running_mean NULL"));
  if (std::isnan(momentum))
    return bnorm::Status::invalid_argument(
        "momentum: must be in [0, 1], or < 0 for none, got nan");
  return bnorm::Status();
}

// The arguments of every training forward but save_mean and save_invstd (whose size depends on
// the ghost batch), from dimensions and state already checked.
void fill_train_args(const bnorm_layout& layout, int dtype, int64_t n, int64_t c, int64_t s,
                     CTensor x, const float* weight, const float* bias, float* running_mean,
                     float* running_var, int64_t* num_batches_tracked, double momentum,
                     double eps, MTensor y, bnorm::ForwardTrainArgs& a) {
  a.x = view(x, dtype, layout, n, c, s);
  a.weight = vec(weight, c);
  a.bias = vec(bias, c);
  a.running_mean = vec(running_mean, c);
  a.running_var = vec(running_var, c);
  a.num_batches_tracked = num_batches_tracked;
  if (momentum < 0)
    a.momentum = std::nullopt;
  else
    a.momentum = momentum;
  a.eps = eps;
  a.y = view(y, dtype, layout, n, c, s);
}

// fill_train_args after the checks of a local (not synchronized) call.
bnorm::Status train_args(const bnorm_layout& layout, int dtype, int64_t n, int64_t c, int64_t s,
                         CTensor x, const float* weight, const float* bias,
                         float* running_mean, float* running_var, int64_t* num_batches_tracked,
                         double momentum, double eps, MTensor y, bnorm::ForwardTrainArgs& a) {
  BNORM_RETURN_IF_ERROR(check_dtype(dtype));
  BNORM_RETURN_IF_ERROR(check_dims(layout, n, c, s));
  BNORM_RETURN_IF_ERROR(check_train_state(running_mean, running_var, momentum));
  fill_train_args(layout, dtype, n, c, s, x, weight, bias, running_mean, running_var,
                  num_batches_tracked, momentum, eps, y, a);
  return bnorm::Status();
}

// The arguments of an eval forward; train_entry names the entry point to call instead when
// there are no running statistics.
bnorm::Status eval_args(const char* train_entry, const bnorm_layout& layout, int dtype,
                        int64_t n, int64_t c, int64_t s, CTensor x, const float* weight,
                        const float* bias, const float* running_mean, const float* running_var,
                        double eps, MTensor y, bnorm::ForwardEvalArgs& a) {
  BNORM_RETURN_IF_ERROR(check_dtype(dtype));
  BNORM_RETURN_IF_ERROR(check_dims(layout, n, c, s));
  if (running_mean == nullptr || running_var == nullptr)
    return bnorm::Status::invalid_argument(
        std::string(running_mean == nullptr ? "running_mean" : "running_var") +
        ": is NULL; eval needs running statistics (with track_running_stats=false, call " +
        train_entry + " with running_* NULL)");
  a.x = view(x, dtype, layout, n, c, s);
  a.weight = vec(weight, c);
  a.bias = vec(bias, c);
  a.running_mean = vec(running_mean, c);
  a.running_var = vec(running_var, c);
  a.eps = eps;
  a.y = view(y, dtype, layout, n, c, s);
  return bnorm::Status();
}

// The arguments of every backward: save_* are required in training, running_* in eval.
bnorm::Status backward_args(const bnorm_layout& layout, int dtype, int64_t n, int64_t c,
                            int64_t s, CTensor dy, CTensor x, const float* weight,
                            const float* save_mean, const float* save_invstd,
                            const float* running_mean, const float* running_var, double eps,
                            int training, MTensor dx, float* dweight, float* dbias,
                            bnorm::BackwardArgs& a) {
  BNORM_RETURN_IF_ERROR(check_dtype(dtype));
  BNORM_RETURN_IF_ERROR(check_dims(layout, n, c, s));
  const char* missing = nullptr;
  if (training) {
    if (save_mean == nullptr)
      missing = "save_mean";
    else if (save_invstd == nullptr)
      missing = "save_invstd";
  } else {
    if (running_mean == nullptr)
      missing = "running_mean";
    else if (running_var == nullptr)
      missing = "running_var";
  }
  if (missing != nullptr)
    return bnorm::Status::invalid_argument(
        std::string(missing) + ": is NULL; required when training = " + std::to_string(training));
  a.dy = view(dy, dtype, layout, n, c, s);
  a.x = view(x, dtype, layout, n, c, s);
  a.weight = vec(weight, c);
  a.training = training != 0;
  a.save_mean = vec(save_mean, c);
  a.save_invstd = vec(save_invstd, c);
  a.running_mean = vec(running_mean, c);
  a.running_var = vec(running_var, c);
  a.eps = eps;
  a.dx = view(dx, dtype, layout, n, c, s);
  a.dweight = vec(dweight, c);
  a.dbias = vec(dbias, c);
  return bnorm::Status();
}

template <class Fn>
int guard(Fn&& fn) {
  try {
    return report(fn());
  } catch (const std::exception& e) {
    return report(bnorm::Status::internal(e.what()));
  } catch (...) {
    return report(bnorm::Status::internal("unknown exception"));
  }
}

// The caller's bnorm_comm as a bnorm::Communicator. Only the double all-reduce is used by the
// synchronized passes; the rest of the interface is there to be complete.
class CallbackCommunicator final : public bnorm::Communicator {
 public:
  explicit CallbackCommunicator(const bnorm_comm& comm) : comm_(comm) {}
  int rank() const override { return comm_.rank; }
  int size() const override { return comm_.size; }
  std::string kind() const override { return "callback"; }

  bnorm::Status allreduce_sum(std::span<double> data) override {
    if (comm_.allreduce_sum_f64 == nullptr || data.empty()) return bnorm::Status();  // size 1
    const auto start = std::chrono::steady_clock::now();
    const int rc = comm_.allreduce_sum_f64(comm_.ctx, data.data(), static_cast<int64_t>(data.size()));
    counters_.allreduce_calls += 1;
    counters_.allreduce_bytes += static_cast<int64_t>(data.size_bytes());
    counters_.allreduce_seconds +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (rc != 0)
      return bnorm::Status::internal(
          "comm: the allreduce_sum_f64 callback failed (returned " + std::to_string(rc) +
          ") on an all-reduce of " + std::to_string(data.size()) + " doubles, rank " +
          std::to_string(comm_.rank) + " of " + std::to_string(comm_.size) +
          "; nothing was written");
    return bnorm::Status();
  }
  bnorm::Status allreduce_sum(std::span<float> data) override {
    if (comm_.size == 1 || data.empty()) return bnorm::Status();
    return bnorm::Status::internal("comm: a bnorm_comm has no float all-reduce");
  }
  bnorm::Status barrier() override {
    double zero = 0;
    return allreduce_sum(std::span<double>(&zero, 1));
  }
  // A bnorm_comm cannot end the caller's group: the message goes to stderr, the caller's engine
  // ends the group (the synchronized passes never call this).
  void abort(const std::string& message, int code) override {
    std::fprintf(stderr, "bnorm: rank %d: %s (code %d)\n", comm_.rank, message.c_str(), code);
  }

 private:
  bnorm_comm comm_;
};

// What is wrong with comm, or OK. These errors are local: without a valid comm nothing can be
// exchanged.
bnorm::Status check_comm(const bnorm_comm* comm) {
  if (comm == nullptr) return bnorm::Status::invalid_argument("comm: is NULL");
  if (comm->size < 1)
    return bnorm::Status::invalid_argument("comm: size must be >= 1, got " +
                                           std::to_string(comm->size));
  if (comm->rank < 0 || comm->rank >= comm->size)
    return bnorm::Status::invalid_argument("comm: rank must be in [0, " +
                                           std::to_string(comm->size) + "), got " +
                                           std::to_string(comm->rank));
  if (comm->size > 1 && comm->allreduce_sum_f64 == nullptr)
    return bnorm::Status::invalid_argument("comm: allreduce_sum_f64 is NULL with size " +
                                           std::to_string(comm->size) + " (> 1)");
  return bnorm::Status();
}

// n (>= 0 here: a rank may hold no samples), c, s and the layout of a synchronized pass.
bnorm::Status check_sync_dims(const bnorm_layout& layout, int64_t n, int64_t c, int64_t s) {
  if (n < 0) return bnorm::Status::invalid_argument("n: must be >= 0, got " + std::to_string(n));
  return check_dims(layout, n == 0 ? 1 : n, c, s);
}

bnorm::SyncOptions sync_options(const bnorm_sync_options* o, const bnorm_comm& comm,
                                std::vector<int64_t>* split_out) {
  bnorm::SyncOptions sync;
  if (o == nullptr) return sync;
  sync.mode = static_cast<bnorm::SyncMode>(o->mode);
  if (o->split != nullptr) sync.split = std::span<const int64_t>(o->split, static_cast<size_t>(comm.size));
  sync.local_weight_grads = o->local_weight_grads != 0;
  if (o->split_out != nullptr) sync.split_out = split_out;
  return sync;
}

}  // namespace

extern "C" {

// The fp32 entry points are the *_dt ones with BNORM_FLOAT32.

int bnorm_forward_train(bnorm_layout layout, int64_t n, int64_t c, int64_t s, const float* x,
                        const float* weight, const float* bias, float* running_mean,
                        float* running_var, int64_t* num_batches_tracked, double momentum,
                        double eps, float* y, float* save_mean, float* save_invstd) {
  return bnorm_forward_train_ext_dt(layout, BNORM_FLOAT32, n, c, s, x, weight, bias,
                                    running_mean, running_var, num_batches_tracked, momentum, eps,
                                    y, save_mean, save_invstd, nullptr);
}

int bnorm_forward_train_dt(bnorm_layout layout, int dtype, int64_t n, int64_t c, int64_t s,
                           const void* x, const float* weight, const float* bias,
                           float* running_mean, float* running_var, int64_t* num_batches_tracked,
                           double momentum, double eps, void* y, float* save_mean,
                           float* save_invstd) {
  return bnorm_forward_train_ext_dt(layout, dtype, n, c, s, x, weight, bias, running_mean,
                                    running_var, num_batches_tracked, momentum, eps, y, save_mean,
                                    save_invstd, nullptr);
}

int bnorm_forward_train_ext(bnorm_layout layout, int64_t n, int64_t c, int64_t s, const float* x,
                            const float* weight, const float* bias, float* running_mean,
                            float* running_var, int64_t* num_batches_tracked, double momentum,
                            double eps, float* y, float* save_mean, float* save_invstd,
                            const bnorm_train_extensions* ext) {
  return bnorm_forward_train_ext_dt(layout, BNORM_FLOAT32, n, c, s, x, weight, bias,
                                    running_mean, running_var, num_batches_tracked, momentum, eps,
                                    y, save_mean, save_invstd, ext);
}

int bnorm_forward_train_ext_dt(bnorm_layout layout, int dtype, int64_t n, int64_t c, int64_t s,
                               const void* x, const float* weight, const float* bias,
                               float* running_mean, float* running_var,
                               int64_t* num_batches_tracked, double momentum, double eps, void* y,
                               float* save_mean, float* save_invstd,
                               const bnorm_train_extensions* ext) {
  return guard([&]() -> bnorm::Status {
    bnorm::ForwardTrainArgs a;
    BNORM_RETURN_IF_ERROR(train_args(layout, dtype, n, c, s, x, weight, bias, running_mean,
                                     running_var, num_batches_tracked, momentum, eps, y, a));
    int64_t chunks = 1;
    if (ext != nullptr) {
      BNORM_RETURN_IF_ERROR(bnorm::detail::check_ghost_batch(ext->ghost_batch));
      chunks = ghost_chunks(n, c, ext->ghost_batch);
      a.running_mean_out = vec(ext->running_mean_out, c);
      a.running_var_out = vec(ext->running_var_out, c);
      a.num_batches_tracked_out = ext->num_batches_tracked_out;
      a.batch_renorm = ext->batch_renorm != 0;
      a.rmax = ext->rmax;
      a.dmax = ext->dmax;
      a.save_r = vec(ext->save_r, c);
      a.save_d = vec(ext->save_d, c);
      a.ghost_batch = ext->ghost_batch;
    }
    a.save_mean = vec(save_mean, c * chunks);
    a.save_invstd = vec(save_invstd, c * chunks);
    return bnorm::forward_train(a, options_from_environment());
  });
}

int bnorm_forward_eval(bnorm_layout layout, int64_t n, int64_t c, int64_t s, const float* x,
                       const float* weight, const float* bias, const float* running_mean,
                       const float* running_var, double eps, float* y) {
  return bnorm_forward_eval_dt(layout, BNORM_FLOAT32, n, c, s, x, weight, bias, running_mean,
                               running_var, eps, y);
}

int bnorm_forward_eval_dt(bnorm_layout layout, int dtype, int64_t n, int64_t c, int64_t s,
                          const void* x, const float* weight, const float* bias,
                          const float* running_mean, const float* running_var, double eps,
                          void* y) {
  return guard([&]() -> bnorm::Status {
    bnorm::ForwardEvalArgs a;
    BNORM_RETURN_IF_ERROR(eval_args(dtype == BNORM_FLOAT32 ? "bnorm_forward_train"
                                                           : "bnorm_forward_train_dt",
                                    layout, dtype, n, c, s, x, weight, bias, running_mean,
                                    running_var, eps, y, a));
    return bnorm::forward_eval(a, options_from_environment());
  });
}

int bnorm_backward(bnorm_layout layout, int64_t n, int64_t c, int64_t s, const float* dy,
                   const float* x, const float* weight, const float* save_mean,
                   const float* save_invstd, const float* running_mean, const float* running_var,
                   double eps, int training, float* dx, float* dweight, float* dbias) {
  return bnorm_backward_ext_dt(layout, BNORM_FLOAT32, n, c, s, dy, x, weight, save_mean,
                               save_invstd, running_mean, running_var, eps, training, dx, dweight,
                               dbias, nullptr);
}

int bnorm_backward_dt(bnorm_layout layout, int dtype, int64_t n, int64_t c, int64_t s,
                      const void* dy, const void* x, const float* weight, const float* save_mean,
                      const float* save_invstd, const float* running_mean,
                      const float* running_var, double eps, int training, void* dx,
                      float* dweight, float* dbias) {
  return bnorm_backward_ext_dt(layout, dtype, n, c, s, dy, x, weight, save_mean, save_invstd,
                               running_mean, running_var, eps, training, dx, dweight, dbias,
                               nullptr);
}

int bnorm_backward_ext(bnorm_layout layout, int64_t n, int64_t c, int64_t s, const float* dy,
                       const float* x, const float* weight, const float* save_mean,
                       const float* save_invstd, const float* running_mean,
                       const float* running_var, double eps, int training, float* dx,
                       float* dweight, float* dbias, const bnorm_backward_extensions* ext) {
  return bnorm_backward_ext_dt(layout, BNORM_FLOAT32, n, c, s, dy, x, weight, save_mean,
                               save_invstd, running_mean, running_var, eps, training, dx, dweight,
                               dbias, ext);
}

int bnorm_backward_ext_dt(bnorm_layout layout, int dtype, int64_t n, int64_t c, int64_t s,
                          const void* dy, const void* x, const float* weight,
                          const float* save_mean, const float* save_invstd,
                          const float* running_mean, const float* running_var, double eps,
                          int training, void* dx, float* dweight, float* dbias,
                          const bnorm_backward_extensions* ext) {
  return guard([&]() -> bnorm::Status {
    bnorm::BackwardArgs a;
    BNORM_RETURN_IF_ERROR(backward_args(layout, dtype, n, c, s, dy, x, weight, save_mean,
                                        save_invstd, running_mean, running_var, eps, training, dx,
                                        dweight, dbias, a));
    if (ext != nullptr) {
      BNORM_RETURN_IF_ERROR(bnorm::detail::check_ghost_batch(ext->ghost_batch));
      const int64_t chunks = ghost_chunks(n, c, ext->ghost_batch);
      a.renorm_r = vec(ext->renorm_r, c);
      a.renorm_d = vec(ext->renorm_d, c);
      a.ghost_batch = ext->ghost_batch;
      a.save_mean = vec(save_mean, c * chunks);
      a.save_invstd = vec(save_invstd, c * chunks);
    }
    return bnorm::backward(a, options_from_environment());
  });
}

int bnorm_forward_train_relu(bnorm_layout layout, int64_t n, int64_t c, int64_t s, const float* x,
                             const float* weight, const float* bias, float* running_mean,
                             float* running_var, int64_t* num_batches_tracked, double momentum,
                             double eps, const float* z, float* y, float* save_mean,
                             float* save_invstd) {
  return bnorm_forward_train_relu_dt(layout, BNORM_FLOAT32, n, c, s, x, weight, bias,
                                     running_mean, running_var, num_batches_tracked, momentum,
                                     eps, z, y, save_mean, save_invstd);
}

int bnorm_forward_train_relu_dt(bnorm_layout layout, int dtype, int64_t n, int64_t c, int64_t s,
                                const void* x, const float* weight, const float* bias,
                                float* running_mean, float* running_var,
                                int64_t* num_batches_tracked, double momentum, double eps,
                                const void* z, void* y, float* save_mean, float* save_invstd) {
  return guard([&]() -> bnorm::Status {
    bnorm::ForwardTrainArgs a;
    BNORM_RETURN_IF_ERROR(train_args(layout, dtype, n, c, s, x, weight, bias, running_mean,
                                     running_var, num_batches_tracked, momentum, eps, y, a));
    a.save_mean = vec(save_mean, c);
    a.save_invstd = vec(save_invstd, c);
    return bnorm::forward_train_relu(a, optional_view(z, dtype, layout, n, c, s),
                                     options_from_environment());
  });
}

int bnorm_forward_eval_relu(bnorm_layout layout, int64_t n, int64_t c, int64_t s, const float* x,
                            const float* weight, const float* bias, const float* running_mean,
                            const float* running_var, double eps, const float* z, float* y) {
  return bnorm_forward_eval_relu_dt(layout, BNORM_FLOAT32, n, c, s, x, weight, bias,
                                    running_mean, running_var, eps, z, y);
}

int bnorm_forward_eval_relu_dt(bnorm_layout layout, int dtype, int64_t n, int64_t c, int64_t s,
                               const void* x, const float* weight, const float* bias,
                               const float* running_mean, const float* running_var, double eps,
                               const void* z, void* y) {
  return guard([&]() -> bnorm::Status {
    bnorm::ForwardEvalArgs a;
    BNORM_RETURN_IF_ERROR(eval_args(dtype == BNORM_FLOAT32 ? "bnorm_forward_train_relu"
                                                           : "bnorm_forward_train_relu_dt",
                                    layout, dtype, n, c, s, x, weight, bias, running_mean,
                                    running_var, eps, y, a));
    return bnorm::forward_eval_relu(a, optional_view(z, dtype, layout, n, c, s),
                                    options_from_environment());
  });
}

int bnorm_backward_relu(bnorm_layout layout, int64_t n, int64_t c, int64_t s, const float* dy,
                        const float* x, const float* y, const float* weight,
                        const float* save_mean, const float* save_invstd,
                        const float* running_mean, const float* running_var, double eps,
                        int training, float* dx, float* dweight, float* dbias, float* dz) {
  return bnorm_backward_relu_dt(layout, BNORM_FLOAT32, n, c, s, dy, x, y, weight, save_mean,
                                save_invstd, running_mean, running_var, eps, training, dx,
                                dweight, dbias, dz);
}

int bnorm_backward_relu_dt(bnorm_layout layout, int dtype, int64_t n, int64_t c, int64_t s,
                           const void* dy, const void* x, const void* y, const float* weight,
                           const float* save_mean, const float* save_invstd,
                           const float* running_mean, const float* running_var, double eps,
                           int training, void* dx, float* dweight, float* dbias, void* dz) {
  return guard([&]() -> bnorm::Status {
    BNORM_RETURN_IF_ERROR(check_dtype(dtype));
    BNORM_RETURN_IF_ERROR(check_dims(layout, n, c, s));
    if (y == nullptr)
      return bnorm::Status::invalid_argument("y: is NULL; required when training = " +
                                             std::to_string(training));
    bnorm::BackwardArgs a;
    BNORM_RETURN_IF_ERROR(backward_args(layout, dtype, n, c, s, dy, x, weight, save_mean,
                                        save_invstd, running_mean, running_var, eps, training, dx,
                                        dweight, dbias, a));
    return bnorm::backward_relu(a, view(y, dtype, layout, n, c, s),
                                optional_view(dz, dtype, layout, n, c, s),
                                options_from_environment());
  });
}

int bnorm_sync_forward_train(const bnorm_comm* comm, const bnorm_sync_options* options,
                             bnorm_layout layout, int64_t n, int64_t c, int64_t s, const float* x,
                             const float* weight, const float* bias, float* running_mean,
                             float* running_var, int64_t* num_batches_tracked, double momentum,
                             double eps, float* y, float* save_mean, float* save_invstd) {
  return bnorm_sync_forward_train_dt(comm, options, layout, BNORM_FLOAT32, n, c, s, x, weight,
                                     bias, running_mean, running_var, num_batches_tracked,
                                     momentum, eps, y, save_mean, save_invstd);
}

int bnorm_sync_forward_train_dt(const bnorm_comm* comm, const bnorm_sync_options* options,
                                bnorm_layout layout, int dtype, int64_t n, int64_t c, int64_t s,
                                const void* x, const float* weight, const float* bias,
                                float* running_mean, float* running_var,
                                int64_t* num_batches_tracked, double momentum, double eps,
                                void* y, float* save_mean, float* save_invstd) {
  return guard([&]() -> bnorm::Status {
    BNORM_RETURN_IF_ERROR(check_comm(comm));
    CallbackCommunicator communicator(*comm);
    std::vector<int64_t> used;
    const bnorm::SyncOptions sync = sync_options(options, *comm, &used);
    // Errors from here on travel in the exchange.
    bnorm::Status prior = check_dtype(dtype);
    if (prior.ok()) prior = check_sync_dims(layout, n, c, s);
    if (prior.ok()) prior = check_train_state(running_mean, running_var, momentum);
    bnorm::ForwardTrainArgs a;
    if (!prior.ok()) {  // only C, for the size of a fused exchange
      a.x = bnorm::ConstTensorView(nullptr, {0, c > 0 ? c : 0});
      return bnorm::detail::sync_forward_train(communicator, a, options_from_environment(), sync,
                                               prior);
    }
    fill_train_args(layout, dtype, n, c, s, x, weight, bias, running_mean, running_var,
                    num_batches_tracked, momentum, eps, y, a);
    a.save_mean = vec(save_mean, c);
    a.save_invstd = vec(save_invstd, c);
    BNORM_RETURN_IF_ERROR(bnorm::detail::sync_forward_train(communicator, a,
                                                            options_from_environment(), sync,
                                                            prior));
    if (options != nullptr && options->split_out != nullptr)
      std::copy(used.begin(), used.end(), options->split_out);
    return bnorm::Status();
  });
}

int bnorm_sync_backward(const bnorm_comm* comm, const bnorm_sync_options* options,
                        bnorm_layout layout, int64_t n, int64_t c, int64_t s, const float* dy,
                        const float* x, const float* weight, const float* save_mean,
                        const float* save_invstd, float* dx, float* dweight, float* dbias) {
  return bnorm_sync_backward_dt(comm, options, layout, BNORM_FLOAT32, n, c, s, dy, x, weight,
                                save_mean, save_invstd, dx, dweight, dbias);
}

int bnorm_sync_backward_dt(const bnorm_comm* comm, const bnorm_sync_options* options,
                           bnorm_layout layout, int dtype, int64_t n, int64_t c, int64_t s,
                           const void* dy, const void* x, const float* weight,
                           const float* save_mean, const float* save_invstd, void* dx,
                           float* dweight, float* dbias) {
  return guard([&]() -> bnorm::Status {
    BNORM_RETURN_IF_ERROR(check_comm(comm));
    CallbackCommunicator communicator(*comm);
    bnorm::SyncOptions sync = sync_options(options, *comm, nullptr);
    sync.split_out = nullptr;
    bnorm::Status prior = check_dtype(dtype);
    if (prior.ok()) prior = check_sync_dims(layout, n, c, s);
    if (prior.ok() && (save_mean == nullptr || save_invstd == nullptr))
      prior = bnorm::Status::invalid_argument(
          std::string(save_mean == nullptr ? "save_mean" : "save_invstd") +
          ": is NULL; the training backward needs the forward's saved statistics");
    bnorm::BackwardArgs a;
    if (!prior.ok()) {
      a.x = bnorm::ConstTensorView(nullptr, {0, c > 0 ? c : 0});
      return bnorm::detail::sync_backward(communicator, a, options_from_environment(), sync,
                                          prior);
    }
    a.dy = view(dy, dtype, layout, n, c, s);
    a.x = view(x, dtype, layout, n, c, s);
    a.weight = vec(weight, c);
    a.training = true;
    a.save_mean = vec(save_mean, c);
    a.save_invstd = vec(save_invstd, c);
    a.dx = view(dx, dtype, layout, n, c, s);
    a.dweight = vec(dweight, c);
    a.dbias = vec(dbias, c);
    return bnorm::detail::sync_backward(communicator, a, options_from_environment(), sync, prior);
  });
}

const char* bnorm_last_error(void) { return last_error.c_str(); }

const char* bnorm_version(void) { return bnorm::version(); }

void bnorm_set_num_threads(int n) { bnorm::set_num_threads(n); }

int bnorm_num_threads(void) { return bnorm::num_threads(); }

int bnorm_use_openmp_threads(int on) { return bnorm::use_openmp_threads(on != 0) ? 1 : 0; }

}  // extern "C"
