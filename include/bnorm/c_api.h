/* bnorm C API: batch normalization with PyTorch's semantics, for C callers and Python ctypes.
 *
 * Data are fp32, dense, in one of two layouts:
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

/* Message of this thread's last failed call ("" if none failed yet). Valid until the next
   failing call on the same thread. */
BNORM_C_EXPORT const char* bnorm_last_error(void);

/* Library version, "MAJOR.MINOR.PATCH". */
BNORM_C_EXPORT const char* bnorm_version(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* BNORM_C_API_H_ */
