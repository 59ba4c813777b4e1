/* The C API from a C99 program: the header compiles as C, the library links without C++, and a
   training step, an eval step, a backward and a rejected call behave as documented. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "bnorm/c_api.h"

static int failures = 0;

/* bf16 <-> float by bits: the top half of a float (narrowing by truncation is exact for the
   values used here, which have at most 8 significant bits). */
static float bf16_to_float(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
static uint16_t float_to_bf16_exact(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return (uint16_t)(u >> 16);
}

static void expect(int ok, const char* what) {
  if (!ok) {
    ++failures;
    printf("FAILED: %s\n", what);
  }
}

int main(void) {
  /* (N, C) = (4, 2): channel 0 holds 1 2 3 4, channel 1 holds 10 10 10 10 (constant). */
  const float x[8] = {1, 10, 2, 10, 3, 10, 4, 10};
  float y[8], mean[2], invstd[2], rm[2] = {0, 0}, rv[2] = {1, 1};
  int64_t batches = 0;
  int rc = bnorm_forward_train(BNORM_CHANNELS_FIRST, 4, 2, 1, x, NULL, NULL, rm, rv, &batches,
                               0.1, 1e-5, y, mean, invstd);
  expect(rc == BNORM_OK, "forward_train returns BNORM_OK");
  expect(mean[0] == 2.5f && mean[1] == 10.0f, "batch means 2.5 and 10");
  /* biased var 1.25; invstd = 1/sqrt(1.25 + 1e-5) */
  expect(fabs(invstd[0] - 1.0 / sqrt(1.25 + 1e-5)) < 1e-6, "invstd of channel 0");
  expect(y[1] == 0.0f && y[3] == 0.0f, "a constant channel normalizes to exactly 0");
  /* running: 0.9 * 0 + 0.1 * 2.5; 0.9 * 1 + 0.1 * 1.25 * 4 / 3 */
  expect(fabsf(rm[0] - 0.25f) < 1e-7f && fabsf(rv[0] - (0.9f + 0.1f * 5.0f / 3.0f)) < 1e-6f,
         "running statistics with the unbiased variance");
  expect(batches == 1, "num_batches_tracked incremented");

  float ye[8];
  rc = bnorm_forward_eval(BNORM_CHANNELS_FIRST, 4, 2, 1, x, NULL, NULL, rm, rv, 1e-5, ye);
  expect(rc == BNORM_OK && fabs(ye[0] - (1 - rm[0]) / sqrt(rv[0] + 1e-5)) < 1e-6,
         "forward_eval uses the running statistics");

  const float dy[8] = {1, 1, 1, 1, 1, 1, 1, 1};
  float dx[8], dw[2], db[2];
  rc = bnorm_backward(BNORM_CHANNELS_FIRST, 4, 2, 1, dy, x, NULL, mean, invstd, NULL, NULL, 1e-5,
                      1, dx, dw, db);
  expect(rc == BNORM_OK && db[0] == 4.0f && fabsf(dx[0]) < 1e-6f,
         "backward: a constant dy gives dx = 0 and dbias = N");

  /* Fused BN + add + ReLU: channel 0's xhat is (-1.34, -0.45, 0.45, 1.34); with z = 0.5 the
     first element is clamped, the others pass; channel 1 is 0 + z. */
  const float z[8] = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, -0.5f, 0.5f, 0.5f};
  float yf[8], mf[2], sf[2];
  rc = bnorm_forward_train_relu(BNORM_CHANNELS_FIRST, 4, 2, 1, x, NULL, NULL, NULL, NULL, NULL,
                                0.1, 1e-5, z, yf, mf, sf);
  expect(rc == BNORM_OK && yf[0] == 0.0f && fabsf(yf[2] - (y[2] + 0.5f)) < 1e-6f,
         "forward_train_relu: relu(bn(x) + z)");
  expect(yf[1] == 0.5f && yf[5] == 0.0f, "a constant channel gives relu(z)");
  float dxf[8], dwf[2], dbf[2], dzf[8];
  rc = bnorm_backward_relu(BNORM_CHANNELS_FIRST, 4, 2, 1, dy, x, yf, NULL, mf, sf, NULL, NULL,
                           1e-5, 1, dxf, dwf, dbf, dzf);
  expect(rc == BNORM_OK && dzf[0] == 0.0f && dzf[2] == 1.0f && dzf[5] == 0.0f && dbf[0] == 3.0f,
         "backward_relu: dz = dy * (y > 0), dbias = sum of it");
  rc = bnorm_backward_relu(BNORM_CHANNELS_FIRST, 4, 2, 1, dy, x, NULL, NULL, mf, sf, NULL, NULL,
                           1e-5, 1, dxf, dwf, dbf, dzf);
  expect(rc == BNORM_ERROR_INVALID_ARGUMENT && strstr(bnorm_last_error(), "y") != NULL,
         "backward_relu without y is refused");

  /* One value per channel in training: refused, nothing written. */
  float y1[2] = {-7, -7};
  rc = bnorm_forward_train(BNORM_CHANNELS_FIRST, 1, 2, 1, x, NULL, NULL, rm, rv, &batches, 0.1,
                           1e-5, y1, NULL, NULL);
  expect(rc == BNORM_ERROR_INVALID_ARGUMENT, "n*s == 1 in training is refused");
  expect(strstr(bnorm_last_error(), "Expected more than 1 value per channel when training") != NULL,
         "PyTorch's message");
  expect(y1[0] == -7 && y1[1] == -7 && batches == 1, "nothing written on error");
  expect(strlen(bnorm_version()) > 0, "version string");

  /* bf16 tensors through the *_dt entry points: the same step as above, y within bf16's
     rounding (2^-8 relative) of the fp32 result, the fp32 statistics equal. */
  uint16_t xh[8], yh[8], dyh[8], dxh[8];
  for (int i = 0; i < 8; ++i) {
    xh[i] = float_to_bf16_exact(x[i]);
    dyh[i] = float_to_bf16_exact(dy[i]);
  }
  float mh[2], sh[2], rmh[2] = {0, 0}, rvh[2] = {1, 1};
  int64_t batches_h = 0;
  rc = bnorm_forward_train_dt(BNORM_CHANNELS_FIRST, BNORM_BFLOAT16, 4, 2, 1, xh, NULL, NULL, rmh,
                              rvh, &batches_h, 0.1, 1e-5, yh, mh, sh);
  expect(rc == BNORM_OK, "forward_train_dt (bf16) returns BNORM_OK");
  expect(mh[0] == mean[0] && sh[0] == invstd[0] && rmh[0] == rm[0] && batches_h == 1,
         "bf16 statistics are those of the same values in fp32");
  int close = 1;
  for (int i = 0; i < 8; ++i)
    if (fabsf(bf16_to_float(yh[i]) - y[i]) > ldexpf(1.0f, -8) * fabsf(y[i])) close = 0;
  expect(close, "bf16 y within 2^-8 of the fp32 y");
  float dwh[2], dbh[2];
  rc = bnorm_backward_dt(BNORM_CHANNELS_FIRST, BNORM_BFLOAT16, 4, 2, 1, dyh, xh, NULL, mh, sh,
                         NULL, NULL, 1e-5, 1, dxh, dwh, dbh);
  expect(rc == BNORM_OK && dbh[0] == 4.0f && fabsf(bf16_to_float(dxh[0])) < 1e-6f,
         "backward_dt (bf16): dbias = N, dx = 0");
  /* fp64 is not a dtype: refused, its value named, nothing written. */
  uint16_t yb[8] = {7, 7, 7, 7, 7, 7, 7, 7};
  rc = bnorm_forward_train_dt(BNORM_CHANNELS_FIRST, 3, 4, 2, 1, xh, NULL, NULL, rmh, rvh,
                              &batches_h, 0.1, 1e-5, yb, NULL, NULL);
  expect(rc == BNORM_ERROR_INVALID_ARGUMENT &&
             strstr(bnorm_last_error(), "dtype 3 is not one of float32 (0), bfloat16 (1), "
                                        "float16 (2); float64 tensors are not supported") != NULL,
         "dtype 3 refused with its message");
  expect(yb[0] == 7 && yb[7] == 7 && batches_h == 1 && rmh[0] == rm[0],
         "nothing written for a bad dtype");

  printf("bnorm %s from C: %d failed\n", bnorm_version(), failures);
  return failures == 0 ? 0 : 1;
}
