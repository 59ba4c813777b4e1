/* bnorm C API: batch normalization with PyTorch's semantics, for C callers and Python ctypes.
 *
 * Data are dense, fp32 (the functions below taking float*), or fp32, bf16 or fp16 (the *_dt
 * functions, which take the tensors as void* and their element type as a bnorm_dtype; see
 * "Element types" below), in one of two layouts:
 *   BNORM_CHANNELS_FIRST: x[i][c][j]  (N, C, S)   -- PyTorch's contiguous (N,C,...) tensors
 *   BNORM_CHANNELS_LAST:  x[i][j][c]  (N, S, C)   -- PyTorch's channels_last / NHWC tensors
 * where n is the batch, c the channels and s the product of the spatial dims (1 for (N,C)).
 * Per-channel vectors (weight, bias, running_*, save_*, dweight, dbias) hold c floats.
 *
 * Every function returns 0 (BNORM_OK) on success and a nonzero bnorm_status otherwise. On error
 * nothing was written: every output and state buffer is bit-for-bit unchanged, and
 * bnorm_last_error() gives a message naming the argument and its value.
 *
 * Thread safety: calls on disjoint buffers may run concurrently; the error message is per thread.
 * Environment: BNORM_CHECK_FINITE=1 makes every call reject NaN/Inf in x (and dy), naming the
 * channel and the first bad index (off by default: it costs one extra read of the input).
 */
#ifndef BNORM_C_API_H_
#define BNORM_C_API_H_

#include <stdint.h>

#if defined(_WIN32)
#define BNORM_C_EXPORT __declspec(dllexport)
#else
#define BNORM_C_EXPORT __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { BNORM_CHANNELS_FIRST = 0, BNORM_CHANNELS_LAST = 1 } bnorm_layout;

/* The element type of the tensors (x, y, dy, dx, z, dz) of a *_dt call: IEEE binary32,
   bfloat16 (1 sign, 8 exponent, 7 mantissa bits: the top half of a float) or IEEE binary16,
   as PyTorch's torch.float32, torch.bfloat16 and torch.float16 store them. Every tensor of a
   call has that type; the per-channel vectors (weight, bias, running_*, save_*, dweight,
   dbias) are always fp32. The statistics of 16-bit data are accumulated as for fp32 data (the
   elements widened exactly), and 16-bit outputs are rounded once, to nearest even. fp64
   tensors are not supported: any other value (e.g. 3, or -1) is rejected with
   BNORM_ERROR_INVALID_ARGUMENT and a message naming it, nothing written. */
typedef enum { BNORM_FLOAT32 = 0, BNORM_BFLOAT16 = 1, BNORM_FLOAT16 = 2 } bnorm_dtype;

/* Status codes returned by every call that can fail. */
typedef enum {
  BNORM_OK = 0,
  BNORM_ERROR_INVALID_ARGUMENT = 1, /* shape, pointer, eps, momentum, ... */
  BNORM_ERROR_NON_FINITE = 2,       /* NaN/Inf found while BNORM_CHECK_FINITE is on */
  BNORM_ERROR_INTERNAL = 3          /* out of memory or another unexpected failure */
} bnorm_status;

/* Training forward: batch statistics, y = weight * (x - mean) / sqrt(var + eps) + bias.
   n: batch, c: channels, s: product of the spatial dims (1 for (N,C) input).
   weight/bias NULL: affine=false (each may be NULL on its own: weight 1, bias 0).
   running_* NULL: no tracking (both or neither). When tracking, running_mean and running_var
   are updated in place with the biased mean and the unbiased (n*s/(n*s-1)) variance, and
   *num_batches_tracked (if not NULL) is incremented.
   momentum in [0,1]; momentum < 0: none (cumulative average over num_batches_tracked, which is
   then required). save_* may be NULL; else they receive the batch mean and 1/sqrt(var + eps).
   y may alias x exactly (in-place). n*s must be > 1. */
BNORM_C_EXPORT int bnorm_forward_train(bnorm_layout layout, int64_t n, int64_t c, int64_t s,
                                       const float* x, const float* weight, const float* bias,
                                       float* running_mean, float* running_var,
                                       int64_t* num_batches_tracked, double momentum, double eps,
                                       float* y, float* save_mean, float* save_invstd);

/* Inference forward with the running statistics: y = a*x + b per channel, with
   a = weight / sqrt(running_var + eps), b = bias - running_mean * a. running_* are required
   (with track_running_stats=false, PyTorch uses batch statistics in eval: call
   bnorm_forward_train with running_* NULL). y may alias x exactly. */
BNORM_C_EXPORT int bnorm_forward_eval(bnorm_layout layout, int64_t n, int64_t c, int64_t s,
                                      const float* x, const float* weight, const float* bias,
                                      const float* running_mean, const float* running_var,
                                      double eps, float* y);

/* training != 0: gradients through the batch statistics given by save_mean/save_invstd;
   training == 0: statistics constant, taken from running_mean/running_var.
   dweight/dbias may be NULL (not wanted); they are overwritten, not accumulated.
   weight NULL means weight = 1. dx is required and may alias dy or x exactly. */
BNORM_C_EXPORT int bnorm_backward(bnorm_layout layout, int64_t n, int64_t c, int64_t s,
                                  const float* dy, const float* x, const float* weight,
                                  const float* save_mean, const float* save_invstd,
                                  const float* running_mean, const float* running_var, double eps,
                                  int training, float* dx, float* dweight, float* dbias);

/* ---- Extensions: stateless update, batch renormalization, ghost batch norm ----
 *
 * The bnorm::ForwardTrainArgs / BackwardArgs fields of the same names (bnorm/batch_norm.h and
 * docs/batch_norm.md say what each computes). A zeroed struct, or NULL, is PyTorch's batch norm:
 * the call is then bnorm_forward_train / bnorm_backward. */
typedef struct bnorm_train_extensions {
  /* Stateless update: both or neither (c floats each). When given, the updated running
     statistics go there and running_mean / running_var are only read; *num_batches_tracked_out
     (may be NULL) receives the incremented counter and *num_batches_tracked is only read. */
  float* running_mean_out;
  float* running_var_out;
  int64_t* num_batches_tracked_out;
  /* Batch renormalization when nonzero (needs running_mean / running_var): rmax >= 1 (INFINITY:
     no clip), dmax >= 0; save_r / save_d (c floats each, may be NULL) receive r and d, which
     the backward needs. */
  int batch_renorm;
  double rmax;
  double dmax;
  float* save_r;
  float* save_d;
  /* Ghost batch norm: 0 off, else G in [2, n], statistics per chunk of G consecutive samples;
     save_mean / save_invstd then hold ceil(n / G) * c floats (chunk-major). Not with
     batch_renorm. */
  int64_t ghost_batch;
} bnorm_train_extensions;

typedef struct bnorm_backward_extensions {
  /* Batch renorm's r and d from the forward (both or neither, c floats each; training only). */
  const float* renorm_r;
  const float* renorm_d;
  /* The forward's ghost_batch (training only); save_mean / save_invstd hold its chunk
     statistics. */
  int64_t ghost_batch;
} bnorm_backward_extensions;

/* bnorm_forward_train with the extensions in ext (NULL: none). */
BNORM_C_EXPORT int bnorm_forward_train_ext(bnorm_layout layout, int64_t n, int64_t c, int64_t s,
                                           const float* x, const float* weight, const float* bias,
                                           float* running_mean, float* running_var,
                                           int64_t* num_batches_tracked, double momentum,
                                           double eps, float* y, float* save_mean,
                                           float* save_invstd, const bnorm_train_extensions* ext);

/* bnorm_backward with the extensions in ext (NULL: none). save_mean / save_invstd hold
   ceil(n / G) * c floats with ext->ghost_batch = G. */
BNORM_C_EXPORT int bnorm_backward_ext(bnorm_layout layout, int64_t n, int64_t c, int64_t s,
                                      const float* dy, const float* x, const float* weight,
                                      const float* save_mean, const float* save_invstd,
                                      const float* running_mean, const float* running_var,
                                      double eps, int training, float* dx, float* dweight,
                                      float* dbias, const bnorm_backward_extensions* ext);

/* ---- Fused activations: y = relu(bn(x)) and y = relu(bn(x) + z) ----
 *
 * As bnorm_forward_train / bnorm_forward_eval, then y = max(bn(x) + z, 0) in the same pass
 * (NaN kept, as torch.relu). z NULL: no add (y = relu(bn(x))); else z has x's shape and layout
 * and may alias y or x exactly. */
BNORM_C_EXPORT int bnorm_forward_train_relu(bnorm_layout layout, int64_t n, int64_t c, int64_t s,
                                            const float* x, const float* weight,
                                            const float* bias, float* running_mean,
                                            float* running_var, int64_t* num_batches_tracked,
                                            double momentum, double eps, const float* z, float* y,
                                            float* save_mean, float* save_invstd);

BNORM_C_EXPORT int bnorm_forward_eval_relu(bnorm_layout layout, int64_t n, int64_t c, int64_t s,
                                           const float* x, const float* weight, const float* bias,
                                           const float* running_mean, const float* running_var,
                                           double eps, const float* z, float* y);

/* Backward of the fused forms from dy and the forward's output y (the mask is y > 0; nothing
   else is kept): as bnorm_backward for g = dy * (y > 0), and dz = g (the gradient of z) when dz
   is not NULL. y is required; dx may alias dy, x or y exactly; dz may alias dy exactly and must
   not overlap x, y or dx. */
BNORM_C_EXPORT int bnorm_backward_relu(bnorm_layout layout, int64_t n, int64_t c, int64_t s,
                                       const float* dy, const float* x, const float* y,
                                       const float* weight, const float* save_mean,
                                       const float* save_invstd, const float* running_mean,
                                       const float* running_var, double eps, int training,
                                       float* dx, float* dweight, float* dbias, float* dz);

/* ---- Element types: the functions above for fp32, bf16 or fp16 tensors ----
 *
 * Each *_dt function is the function of the same name without the suffix, with `int dtype` (a
 * bnorm_dtype) right after `layout`, and the tensors x, y, dy, dx, z and dz given as void
 * pointers to elements of that type (n * c * s of them, in the layout). Everything else, the
 * per-channel float vectors included, is as documented above. With dtype = BNORM_FLOAT32 a
 * *_dt call is the fp32 call (the fp32 functions are these with BNORM_FLOAT32). dtype is
 * checked first: a value outside the bnorm_dtype enumerators fails with
 * BNORM_ERROR_INVALID_ARGUMENT, "dtype 3 is not one of float32 (0), bfloat16 (1), float16 (2);
 * float64 tensors are not supported", nothing written. */
BNORM_C_EXPORT int bnorm_forward_train_dt(bnorm_layout layout, int dtype, int64_t n, int64_t c,
                                          int64_t s, const void* x, const float* weight,
                                          const float* bias, float* running_mean,
                                          float* running_var, int64_t* num_batches_tracked,
                                          double momentum, double eps, void* y, float* save_mean,
                                          float* save_invstd);

BNORM_C_EXPORT int bnorm_forward_eval_dt(bnorm_layout layout, int dtype, int64_t n, int64_t c,
                                         int64_t s, const void* x, const float* weight,
                                         const float* bias, const float* running_mean,
                                         const float* running_var, double eps, void* y);

BNORM_C_EXPORT int bnorm_backward_dt(bnorm_layout layout, int dtype, int64_t n, int64_t c,
                                     int64_t s, const void* dy, const void* x,
                                     const float* weight, const float* save_mean,
                                     const float* save_invstd, const float* running_mean,
                                     const float* running_var, double eps, int training,
                                     void* dx, float* dweight, float* dbias);

BNORM_C_EXPORT int bnorm_forward_train_ext_dt(bnorm_layout layout, int dtype, int64_t n,
                                              int64_t c, int64_t s, const void* x,
                                              const float* weight, const float* bias,
                                              float* running_mean, float* running_var,
                                              int64_t* num_batches_tracked, double momentum,
                                              double eps, void* y, float* save_mean,
                                              float* save_invstd,
                                              const bnorm_train_extensions* ext);

BNORM_C_EXPORT int bnorm_backward_ext_dt(bnorm_layout layout, int dtype, int64_t n, int64_t c,
                                         int64_t s, const void* dy, const void* x,
                                         const float* weight, const float* save_mean,
                                         const float* save_invstd, const float* running_mean,
                                         const float* running_var, double eps, int training,
                                         void* dx, float* dweight, float* dbias,
                                         const bnorm_backward_extensions* ext);

BNORM_C_EXPORT int bnorm_forward_train_relu_dt(bnorm_layout layout, int dtype, int64_t n,
                                               int64_t c, int64_t s, const void* x,
                                               const float* weight, const float* bias,
                                               float* running_mean, float* running_var,
                                               int64_t* num_batches_tracked, double momentum,
                                               double eps, const void* z, void* y,
                                               float* save_mean, float* save_invstd);

BNORM_C_EXPORT int bnorm_forward_eval_relu_dt(bnorm_layout layout, int dtype, int64_t n,
                                              int64_t c, int64_t s, const void* x,
                                              const float* weight, const float* bias,
                                              const float* running_mean, const float* running_var,
                                              double eps, const void* z, void* y);

BNORM_C_EXPORT int bnorm_backward_relu_dt(bnorm_layout layout, int dtype, int64_t n, int64_t c,
                                          int64_t s, const void* dy, const void* x,
                                          const void* y, const float* weight,
                                          const float* save_mean, const float* save_invstd,
                                          const float* running_mean, const float* running_var,
                                          double eps, int training, void* dx, float* dweight,
                                          float* dbias, void* dz);

/* ---- Synchronized batch norm over the caller's communicator ----
 *
 * Batch norm over the global batch of a group of ranks (processes, or threads), each holding a
 * part of it: the library computes each rank's partial statistics and merges them, the caller's
 * engine (torch.distributed, MPI, NCCL, ...) does the all-reduce, through one callback. Every
 * rank of the group calls the same bnorm_sync_* functions in the same order; a call returns
 * when every rank has made it. The results are those of batch norm on the concatenation of the
 * ranks' parts in rank order; comm.h and docs/distributed.md describe the algorithm.
 *
 * Errors are collective: a rank whose arguments are bad still takes part in the exchange, and
 * every rank's call fails (the bad rank's message names the argument, the others' name the
 * rank); nothing is written on any rank. Two kinds of error are local, because no exchange can
 * happen: an invalid bnorm_comm (NULL, size < 1, rank outside [0, size), no callback with
 * size > 1) and a failed callback. A callback that returns nonzero makes the call return
 * BNORM_ERROR_INTERNAL at once with nothing written, its message naming the return value; the
 * engine is expected to fail the collective on the other ranks too (gloo, NCCL and MPI do, at a
 * dead peer or a timeout). */

/* The caller's communicator: this rank, the group's size and the all-reduce. */
typedef struct bnorm_comm {
  void* ctx; /* passed back to the callback as is */
  int rank;  /* this rank, in [0, size) */
  int size;  /* ranks in the group, >= 1 */
  /* Element-wise sum over all ranks, in place, of count doubles at data (count > 0, the same
     on every rank for the same call). Called on the thread that called the bnorm function, one
     or two times per pass, never concurrently for one bnorm call. Return 0 on success, nonzero
     on failure. The library puts each value in a slot to which one rank contributes and every
     other adds +0.0, so any summation order gives the exact, same result on every rank. May be
     NULL when size == 1 (then nothing is exchanged). */
  int (*allreduce_sum_f64)(void* ctx, double* data, int64_t count);
} bnorm_comm;

/* How the partials are exchanged (the C++ bnorm::SyncMode). */
typedef enum {
  /* Per-sample partials, merged in a fixed order over the global batch: every output is
     bitwise the same for any number of ranks and any split of the same global batch. Payload:
     (global batch) x c x 2 doubles per pass. The default. */
  BNORM_SYNC_REPRODUCIBLE = 0,
  /* Per-rank partials (count, mean, M2), merged in rank order: deterministic for a given
     split, within rounding of the reproducible mode otherwise. Payload: size x c x 2 doubles. */
  BNORM_SYNC_PER_RANK = 1
} bnorm_sync_mode;

/* Options of a synchronized pass; NULL for all defaults (a zeroed struct is the defaults). */
typedef struct bnorm_sync_options {
  int mode; /* a bnorm_sync_mode */
  /* NULL, or comm->size per-rank sample counts of this call's global batch (the same on every
     rank): the pass then makes one exchange instead of two (reproducible mode). Give the
     forward's split_out to its backward. A rank whose own count is not its n fails every rank. */
  const int64_t* split;
  /* NULL, or room for comm->size counts: receives the per-rank counts (forward only; written on
     success only). */
  int64_t* split_out;
  /* Backward only. 0: dweight/dbias are the global batch's sums, identical on every rank.
     Nonzero: this rank's part (the sums over its own samples), as torch.nn.SyncBatchNorm gives
     them, for a data-parallel step (PyTorch DDP) that then sums them over the ranks. dx is the
     same either way. */
  int local_weight_grads;
} bnorm_sync_options;

/* Training forward over the global batch: as bnorm_forward_train, with this rank's part in
   x/y (n >= 0 samples; n = 0 is allowed, x and y may then be NULL, as long as the global batch
   has more than one value per channel). Every rank must pass the same layout (any, on a rank
   with n = 0), c, s, eps,
   momentum, the same presence of weight, bias and running statistics, and running statistics
   identical bit for bit (checked: a difference fails every rank, naming it). running_* and
   *num_batches_tracked are updated identically on every rank, with the global count's
   Bessel factor; save_mean/save_invstd receive the global batch's statistics, identical on
   every rank. The caller keeps ownership of every buffer and of comm. */
BNORM_C_EXPORT int bnorm_sync_forward_train(const bnorm_comm* comm,
                                            const bnorm_sync_options* options,
                                            bnorm_layout layout, int64_t n, int64_t c, int64_t s,
                                            const float* x, const float* weight,
                                            const float* bias, float* running_mean,
                                            float* running_var, int64_t* num_batches_tracked,
                                            double momentum, double eps, float* y,
                                            float* save_mean, float* save_invstd);

/* Training backward over the global batch (eval mode does not communicate: call
   bnorm_backward with training = 0). save_mean/save_invstd are the forward's (the global
   statistics); dx (required unless n = 0) receives this rank's part, which is bitwise the same
   for any split in the reproducible mode. dweight/dbias (each may be NULL) are overwritten with
   the global sums, or this rank's part when options->local_weight_grads. weight NULL means 1.
   dx may alias dy or x exactly. */
BNORM_C_EXPORT int bnorm_sync_backward(const bnorm_comm* comm, const bnorm_sync_options* options,
                                       bnorm_layout layout, int64_t n, int64_t c, int64_t s,
                                       const float* dy, const float* x, const float* weight,
                                       const float* save_mean, const float* save_invstd,
                                       float* dx, float* dweight, float* dbias);

/* bnorm_sync_forward_train and bnorm_sync_backward for fp32, bf16 or fp16 tensors: `int dtype`
   (a bnorm_dtype) right after `layout`, x, y, dy and dx as void pointers to elements of that
   type (see "Element types" above). Every rank passes the same dtype. A rank whose dtype is
   not a bnorm_dtype fails every rank's call (collective, like any argument error), its own
   message naming the value. */
BNORM_C_EXPORT int bnorm_sync_forward_train_dt(const bnorm_comm* comm,
                                               const bnorm_sync_options* options,
                                               bnorm_layout layout, int dtype, int64_t n,
                                               int64_t c, int64_t s, const void* x,
                                               const float* weight, const float* bias,
                                               float* running_mean, float* running_var,
                                               int64_t* num_batches_tracked, double momentum,
                                               double eps, void* y, float* save_mean,
                                               float* save_invstd);

BNORM_C_EXPORT int bnorm_sync_backward_dt(const bnorm_comm* comm,
                                          const bnorm_sync_options* options, bnorm_layout layout,
                                          int dtype, int64_t n, int64_t c, int64_t s,
                                          const void* dy, const void* x, const float* weight,
                                          const float* save_mean, const float* save_invstd,
                                          void* dx, float* dweight, float* dbias);

/* Message of this thread's last failed call ("" if none failed yet). Valid until the next
   failing call on the same thread. */
BNORM_C_EXPORT const char* bnorm_last_error(void);

/* Threads of the fast kernels (bnorm::set_num_threads): n >= 1 sets the count, n <= 0 restores
   the default (BNORM_NUM_THREADS, else the cores). Results are bitwise the same for every count. */
BNORM_C_EXPORT void bnorm_set_num_threads(int n);
BNORM_C_EXPORT int bnorm_num_threads(void);

/* on != 0: run the kernels' parallel jobs on the OpenMP runtime (libgomp) already loaded in the
   process, e.g. PyTorch's, so that they share its threads instead of competing with its idle,
   spinning ones for the cores (bnorm::use_openmp_threads). Returns 1 when that runtime is in use
   now, 0 when off or when no libgomp is loaded. Process-wide. */
BNORM_C_EXPORT int bnorm_use_openmp_threads(int on);

/* Library version, "MAJOR.MINOR.PATCH". */
BNORM_C_EXPORT const char* bnorm_version(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* BNORM_C_API_H_ */
