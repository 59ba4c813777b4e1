// Batch normalization (Ioffe & Szegedy, 2015) with PyTorch's semantics, exactly.
//
// Per channel c, over the n = N * S elements that share c (S = product of the spatial dims):
//   training:  mean m, biased variance v = (1/n) sum (x - m)^2, invstd = 1 / sqrt(v + eps),
//              y = weight * (x - m) * invstd + bias
//   running:   num_batches_tracked += 1; f = momentum, or 1 / num_batches_tracked if momentum
//              is none (cumulative average);
//              running_mean = (1 - f) * running_mean + f * m
//              running_var  = (1 - f) * running_var  + f * v * n / (n - 1)   (unbiased)
//   inference: y = a * x + b, a = weight / sqrt(running_var + eps), b = bias - running_mean * a
//   backward:  dbias = sum dy, dweight = sum dy * xhat,
//              training: dx = weight * invstd / n * (n * dy - sum dy - xhat * sum dy * xhat)
//              eval:     dx = dy * weight / sqrt(running_var + eps)
// docs/batch_norm.md derives all of it. State is named as PyTorch names it: weight, bias,
// running_mean, running_var, num_batches_tracked.
//
// Two levels of API:
//   * functional passes (forward_train, forward_eval, backward) on caller-owned buffers, which
//     the C API and the layer object both call;
//   * the stateful layer BatchNorm, which owns its parameters and buffers.
//
// Errors: every call validates all its arguments before it writes anything. On error it returns
// a non-OK Status naming the argument and its value, and every output and state buffer is
// bit-for-bit unchanged.
//
// Thread safety: functional calls on disjoint output buffers may run concurrently. A BatchNorm
// object is not safe for concurrent use.
#ifndef BNORM_BATCH_NORM_H_
#define BNORM_BATCH_NORM_H_

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "bnorm/status.h"
#include "bnorm/tensor.h"

namespace bnorm {

class Communicator;       // bnorm/comm.h
enum class SyncMode : int;  // bnorm/comm.h

// Library version, "MAJOR.MINOR.PATCH".
const char* version();

// Which kernels run. kAuto picks the fastest implementation compiled in; kReference forces the
// scalar reference (fp64 accumulation, two-pass statistics): the oracle for tests and debugging.
enum class Backend : int { kAuto = 0, kReference = 1 };

// Threads the fast kernels use for one call (the reference is single-threaded).
// The default is the environment variable BNORM_NUM_THREADS when set to a positive integer,
// else the number of cores available to the process. n >= 1 sets it; n <= 0 restores the
// default. Results are bitwise identical for every thread count. Safe to call from any thread;
// calls already running keep the count they started with.
void set_num_threads(int n);
int num_threads();

// Process-wide, off by default. On, the fast kernels' parallel jobs run on the OpenMP runtime
// (libgomp) already loaded in the process, e.g. by PyTorch, instead of bnorm's own workers:
// between its parallel regions the host's idle OpenMP threads spin on the cores, and bnorm's
// workers would wait for those cores; on its team they take the work at once. bnorm never
// loads or links OpenMP: returns true when that runtime is in use now, false when off or when
// no libgomp is loaded (bnorm's own workers then run the jobs). The thread count stays
// num_threads(); results are bitwise the same either way. bnorm.torch turns it on.
bool use_openmp_threads(bool on);

// Options of a single functional call.
struct CallOptions {
  // Reject NaN/Inf in x (and dy in backward) with a kNonFinite status naming the channel and the
  // first bad index. Off by default: it costs one extra read of the input.
  bool check_finite = false;
  Backend backend = Backend::kAuto;
};

// An absent per-channel vector is an empty span; a present one must hold exactly C values.

struct ForwardTrainArgs {
  ConstTensorView x;              // required
  std::span<const float> weight;  // gamma; empty: 1 (affine=false)
  std::span<const float> bias;    // beta; empty: 0 (affine=false)
  std::span<float> running_mean;  // both empty (track_running_stats=false) or both C values;
  std::span<float> running_var;   //   updated in place when present
  int64_t* num_batches_tracked = nullptr;  // incremented when running stats are present and it
                                           // is not null; required if momentum is none
  std::optional<double> momentum = 0.1;    // in [0, 1]; nullopt: cumulative average
  double eps = 1e-5;                       // finite, > 0
  TensorView y;                  // required; same shape and layout as x; may alias x exactly
  std::span<float> save_mean;    // optional output: batch mean
  std::span<float> save_invstd;  // optional output: 1 / sqrt(biased var + eps)

  // ---- Extensions (docs/batch_norm.md). Their defaults are PyTorch's batch norm above.

  // Stateless update, for functional transforms that cannot mutate: when running_mean_out and
  // running_var_out are given (both or neither, C values each, each equal to or disjoint from
  // the other per-channel buffers), the updated running statistics are written there and
  // running_mean / running_var are only read; num_batches_tracked_out (optional, only with
  // them) receives the incremented counter and *num_batches_tracked is only read.
  std::span<float> running_mean_out;
  std::span<float> running_var_out;
  int64_t* num_batches_tracked_out = nullptr;

  // Batch renormalization (Ioffe 2017): with mu = running_mean, sigma = sqrt(running_var + eps)
  // as the call finds them, and the batch's m and sigma_B = sqrt(v + eps),
  //   r = clip(sigma_B / sigma, 1 / rmax, rmax), d = clip((m - mu) / sigma, -dmax, dmax),
  //   y = weight * (xhat * r + d) + bias.
  // The running statistics are then updated as in batch norm (PyTorch's running_mean and
  // unbiased running_var). Requires running statistics. rmax >= 1 (inf: no clip), dmax >= 0;
  // rmax = 1 and dmax = 0 is batch norm. The backward needs r and d (save_r, save_d).
  bool batch_renorm = false;
  double rmax = 3.0;
  double dmax = 5.0;
  std::span<float> save_r;  // optional output, C values: r
  std::span<float> save_d;  // optional output, C values: d

  // Ghost batch norm (Hoffer 2017): 0 is off; G >= 2 normalizes each chunk of G consecutive
  // samples with its own statistics (the last chunk has N mod G samples when G does not divide
  // N, and must hold more than one value per channel); G <= N. The running statistics get one
  // update per chunk, in order (num_batches_tracked += the number of chunks K = ceil(N / G)).
  // save_mean / save_invstd then hold K * C values, chunk k's at [k * C, (k + 1) * C).
  // Cannot be combined with batch_renorm.
  int64_t ghost_batch = 0;
};

// Training forward: normalizes x with its batch statistics, updates the running statistics.
// Requires N * S > 1 ("Expected more than 1 value per channel when training, ...").
// Also what PyTorch runs in eval mode when track_running_stats=false (no running stats).
Status forward_train(const ForwardTrainArgs& args, const CallOptions& options = {});

struct ForwardEvalArgs {
  ConstTensorView x;                    // required
  std::span<const float> weight;        // empty: 1
  std::span<const float> bias;          // empty: 0
  std::span<const float> running_mean;  // required, C values
  std::span<const float> running_var;   // required, C values
  double eps = 1e-5;                    // finite, > 0
  TensorView y;                         // required; same shape and layout; may alias x exactly
};

// Inference forward with the running statistics: y = a * x + b per channel.
Status forward_eval(const ForwardEvalArgs& args, const CallOptions& options = {});

struct BackwardArgs {
  ConstTensorView dy;                   // required, same shape and layout as x
  ConstTensorView x;                    // required, the forward's input
  std::span<const float> weight;        // empty: 1
  bool training = true;                 // true: through the batch statistics (save_*);
                                        // false: statistics constant (running_*)
  std::span<const float> save_mean;     // required when training (from forward_train)
  std::span<const float> save_invstd;   // required when training
  std::span<const float> running_mean;  // required when !training
  std::span<const float> running_var;   // required when !training
  double eps = 1e-5;                    // finite, > 0; used when !training
  TensorView dx;                        // required; may alias dy or x exactly
  std::span<float> dweight;             // optional output (overwritten, not accumulated)
  std::span<float> dbias;               // optional output (overwritten, not accumulated)

  // Batch renormalization's backward (training only): both or neither, C values each, the
  // forward's save_r and save_d. r and d are constants: dx is the batch-norm backward with
  // weight * r, dweight = sum dy * (xhat * r + d), dbias = sum dy.
  std::span<const float> renorm_r;
  std::span<const float> renorm_d;
  // Ghost batch norm's backward (training only): the forward's G (0: off); save_mean and
  // save_invstd then hold the forward's K * C chunk statistics. dweight and dbias are the
  // sums over the chunks.
  int64_t ghost_batch = 0;
};

// Backward: dx and, when asked, dweight and dbias.
Status backward(const BackwardArgs& args, const CallOptions& options = {});

// ---- Fused activations: y = relu(bn(x)) and y = relu(bn(x) + z) ----
//
// What a ResNet runs after every convolution (BN then ReLU) and at the end of every residual
// block (BN, add the shortcut z, ReLU), in one pass over the data instead of two or three: no
// intermediate tensor is written or read. relu(v) = max(v, 0) with NaN kept, as torch.relu.
//
// z: the added tensor, optional: a view with null data means no add (y = relu(bn(x))). When
// given, same shape and layout as x; it may alias y exactly (the sum written over the shortcut)
// or x, but must not partially overlap y. Everything else (arguments, validation, statistics,
// running-stat updates, aliasing of y and x, errors with nothing written) is as forward_train /
// forward_eval. With options.check_finite, z is checked too. The extensions (batch_renorm,
// ghost_batch, the *_out outputs; renorm_r, renorm_d, ghost_batch in the backward) are refused.
Status forward_train_relu(const ForwardTrainArgs& args, ConstTensorView z = {},
                          const CallOptions& options = {});
Status forward_eval_relu(const ForwardEvalArgs& args, ConstTensorView z = {},
                         const CallOptions& options = {});

// Backward of the fused forms, from dy and the forward's output y: the ReLU's mask is y > 0, so
// nothing but y is kept between the passes. g = dy * (y > 0) is the gradient of bn(x) + z, and
// the call returns what backward() returns for g (dx, dweight, dbias; args as backward()), and,
// when dz has data, dz = g, the gradient of z. y: required, same shape and layout as x; dx may
// alias dy, x or y exactly. dz: optional output; it may alias dy exactly and must not overlap x,
// y or dx.
Status backward_relu(const BackwardArgs& args, ConstTensorView y, TensorView dz = {},
                     const CallOptions& options = {});

// Options of the layer, PyTorch's names and defaults.
struct BatchNormOptions {
  int64_t num_features = 0;              // C, > 0
  double eps = 1e-5;                     // finite, > 0
  std::optional<double> momentum = 0.1;  // in [0, 1]; nullopt: cumulative average
  bool affine = true;                    // learnable weight and bias
  bool track_running_stats = true;       // keep running_mean, running_var, num_batches_tracked
  bool check_finite = false;             // see CallOptions
  Backend backend = Backend::kAuto;

  // Freeze switches, three orthogonal ones, each off by default (PyTorch); they act in
  // training mode (eval mode is unchanged). Their functional equivalents: forward_eval with
  // backward(training = false); no running_* in forward_train; no dweight / dbias in backward.
  //   normalize_with_running_stats: normalize with the running statistics (as they were before
  //     this forward), constants in the backward. Requires track_running_stats.
  //   freeze_running_stats: leave running_mean, running_var, num_batches_tracked as they are.
  //   freeze_affine: weight and bias get no gradients (weight_grad / bias_grad not touched).
  // normalize_with_running_stats without freeze_running_stats still updates the running
  // statistics from the batch (after using them). All three: PyTorch's FrozenBatchNorm2d.
  bool normalize_with_running_stats = false;
  bool freeze_running_stats = false;
  bool freeze_affine = false;

  // Batch renormalization (ForwardTrainArgs::batch_renorm) in training mode; rmax and dmax
  // change per step with set_renorm_limits. Requires track_running_stats; not with
  // normalize_with_running_stats or ghost_batch.
  bool batch_renorm = false;
  double renorm_rmax = 3.0;
  double renorm_dmax = 5.0;

  // Ghost batch norm (ForwardTrainArgs::ghost_batch) in training mode: 0 off, else G >= 2
  // (checked against N at each forward).
  int64_t ghost_batch = 0;
};

// The stateful layer, PyTorch's nn.BatchNorm1d/2d/3d in one class (the rank comes from x).
// Starts in training mode, with weight = 1, bias = 0, running_mean = 0, running_var = 1,
// num_batches_tracked = 0.
class BatchNorm {
 public:
  // Validates the options (num_features > 0, eps, momentum) and builds the layer.
  static Status create(const BatchNormOptions& options, BatchNorm* out);

  // An empty layer (num_features 0); only assignment from create's result makes it usable.
  BatchNorm() = default;

  const BatchNormOptions& options() const { return options_; }
  int64_t num_features() const { return options_.num_features; }

  // Training mode: batch statistics, running statistics updated. Eval mode: running statistics
  // (or batch statistics without tracking, as PyTorch does).
  void train(bool on = true) { training_ = on; }
  void eval() { training_ = false; }
  bool is_training() const { return training_; }

  // Forward. x has C == num_features channels; y has x's shape and layout and may alias x.
  // Remembers the statistics it used, for a following backward.
  Status forward(ConstTensorView x, TensorView y);

  // Backward of the last forward (x is that forward's input; the layer keeps no copy of it).
  // Writes dx (may alias dy or x) and ACCUMULATES dweight and dbias into weight_grad() and
  // bias_grad() when affine, as PyTorch accumulates .grad. Fails if no forward ran yet or the
  // shape differs from the last forward's.
  Status backward(ConstTensorView dy, ConstTensorView x, TensorView dx);

  // The fused forms (forward_train_relu, forward_eval_relu, backward_relu): forward gives
  // y = relu(bn(x)), or y = relu(bn(x) + z) when z has data, and backward takes the forward's
  // output y (the ReLU's mask y > 0) and writes dz = dy * (y > 0) when dz has data. Otherwise
  // as forward and backward. Not on a synchronized layer in training (set_sync): fails, nothing
  // written.
  Status forward_relu(ConstTensorView x, TensorView y, ConstTensorView z = {});
  Status backward_relu(ConstTensorView dy, ConstTensorView x, ConstTensorView y, TensorView dx,
                       TensorView dz = {});

  // Sets the gradients to zero.
  void zero_grad();

  // The momentum of the next forwards (BatchNormOptions::momentum): in [0, 1], or nullopt for a
  // cumulative average. Fails (nothing changed) otherwise.
  Status set_momentum(std::optional<double> momentum);
  // The freeze switches (BatchNormOptions), for the next forwards. Fails (nothing changed) if
  // normalize_with_running_stats is asked without track_running_stats.
  Status set_freeze(bool normalize_with_running_stats, bool freeze_running_stats,
                    bool freeze_affine);
  // Batch renorm's limits for the next forwards (a schedule sets them per step): rmax >= 1,
  // dmax >= 0. Fails (nothing changed) otherwise.
  Status set_renorm_limits(double rmax, double dmax);
  // Batch renormalization on or off for the next forwards (BatchNormOptions::batch_renorm; the
  // limits stay as set). Fails (nothing changed) on turning it on without track_running_stats,
  // with normalize_with_running_stats or with ghost_batch.
  Status set_batch_renorm(bool on);
  // Ghost batch size for the next forwards: 0 (off) or >= 2. Fails (nothing changed) otherwise.
  Status set_ghost_batch(int64_t ghost_batch);

  // Synchronized batch norm (bnorm/comm.h): in training mode, forward and backward normalize
  // over the global batch of every rank of comm (each rank passes its part), and the gradients
  // accumulated into weight_grad() / bias_grad() are the GLOBAL batch's, identical on every
  // rank. Eval mode does not communicate. nullptr (the default) turns it off. comm is not owned
  // and must outlive the layer's use of it; every rank's layer must make the same calls.
  void set_sync(Communicator* comm, SyncMode mode);
  Communicator* sync_communicator() const { return comm_; }
  // The per-rank sample counts of the next forwards, when every rank knows them (e.g. a fixed
  // sharding): each forward then makes one exchange instead of two. Empty: exchanged.
  void set_sync_split(std::vector<int64_t> split) { sync_split_ = std::move(split); }

  // weight = 1, bias = 0 and reset_running_stats(), as PyTorch's reset_parameters.
  void reset_parameters();
  // running_mean = 0, running_var = 1, num_batches_tracked = 0.
  void reset_running_stats();

  // Parameters and buffers, PyTorch's names. Empty spans when absent (affine=false /
  // track_running_stats=false).
  std::span<float> weight() { return weight_; }
  std::span<float> bias() { return bias_; }
  std::span<float> weight_grad() { return weight_grad_; }
  std::span<float> bias_grad() { return bias_grad_; }
  std::span<float> running_mean() { return running_mean_; }
  std::span<float> running_var() { return running_var_; }
  std::span<const float> weight() const { return weight_; }
  std::span<const float> bias() const { return bias_; }
  std::span<const float> running_mean() const { return running_mean_; }
  std::span<const float> running_var() const { return running_var_; }
  // Meaningful only with track_running_stats.
  int64_t num_batches_tracked() const { return num_batches_tracked_; }
  void set_num_batches_tracked(int64_t value) { num_batches_tracked_ = value; }

  // The state_dict entries in PyTorch's order: "weight", "bias" (when affine), "running_mean",
  // "running_var" (when tracking); num_batches_tracked is the int64 above.
  std::vector<std::pair<std::string, std::span<float>>> named_tensors();

  // Statistics the last forward used (batch mean / invstd, or running ones in eval).
  std::span<const float> saved_mean() const { return save_mean_; }
  std::span<const float> saved_invstd() const { return save_invstd_; }

 private:
  CallOptions call_options() const;

  BatchNormOptions options_;
  bool training_ = true;
  std::vector<float> weight_, bias_, weight_grad_, bias_grad_;
  std::vector<float> running_mean_, running_var_;
  int64_t num_batches_tracked_ = 0;
  // What the last forward used, for backward.
  std::vector<float> save_mean_, save_invstd_;
  std::vector<float> dweight_scratch_, dbias_scratch_;
  // Extensions: the running statistics a frozen-statistics forward used, their update, and
  // batch renorm's r and d; the ghost batch size of the last forward.
  std::vector<float> frozen_mean_, frozen_var_, new_mean_, new_var_, save_r_, save_d_;
  std::vector<float> y_scratch_;  // an in-place frozen-statistics forward's update pass
  int64_t last_ghost_ = 0;
  bool last_renorm_ = false;
  bool last_freeze_affine_ = false;
  Communicator* comm_ = nullptr;
  int sync_mode_ = 0;
  std::vector<int64_t> sync_split_;       // given by set_sync_split
  std::vector<int64_t> last_split_;       // the last synchronized forward's
  bool last_forward_synced_ = false;
  bool have_forward_ = false;
  bool last_forward_training_ = true;  // whether batch statistics were used
  std::array<int64_t, kMaxRank> last_dims_{};
  int last_rank_ = 0;
  Layout last_layout_ = Layout::kChannelsFirst;
  // Set by forward_relu / backward_relu for the duration of the call they delegate to.
  struct Fused {
    bool on = false;
    ConstTensorView z, y;
    TensorView dz;
  } fused_;
};

}  // namespace bnorm

#endif  // BNORM_BATCH_NORM_H_
