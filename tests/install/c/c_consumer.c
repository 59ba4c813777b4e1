/* Consumer (c) of the installed package: the C API through pkg-config, linked against
 * libbnorm.so and against libbnorm.a. A training-mode forward over an (N, C) = (4, 2) batch:
 * each channel of the output must have mean 0 and variance 1 (the biased variance, up to eps),
 * and the running mean must have moved by momentum 0.1 towards the batch mean. */
#include <math.h>
#include <stdio.h>

#include "bnorm/c_api.h"

int main(void) {
  enum { N = 4, C = 2 };
  const float x[N * C] = {1, 10, 2, 20, 3, 30, 4, 40}; /* channel 0: 1..4, channel 1: 10..40 */
  float y[N * C], running_mean[C] = {0, 0}, running_var[C] = {1, 1};
  int64_t tracked = 0;
  int c, i, rc;
  printf("c_consumer: bnorm %s\n", bnorm_version());
  rc = bnorm_forward_train(BNORM_CHANNELS_FIRST, N, C, 1, x, NULL, NULL, running_mean,
                           running_var, &tracked, 0.1, 1e-5, y, NULL, NULL);
  if (rc != BNORM_OK) {
    fprintf(stderr, "c_consumer: bnorm_forward_train: %s\n", bnorm_last_error());
    return 1;
  }
  for (c = 0; c < C; ++c) {
    double mean = 0, var = 0;
    for (i = 0; i < N; ++i) mean += y[i * C + c] / N;
    for (i = 0; i < N; ++i) var += (y[i * C + c] - mean) * (y[i * C + c] - mean) / N;
    if (fabs(mean) > 1e-6 || fabs(var - 1) > 1e-4) {
      fprintf(stderr, "c_consumer: channel %d: mean %g var %g, expected 0 and 1\n", c, mean, var);
      return 1;
    }
  }
  /* Batch means 2.5 and 25: running_mean = 0.9 * 0 + 0.1 * mean. */
  if (fabs(running_mean[0] - 0.25) > 1e-6 || fabs(running_mean[1] - 2.5) > 1e-5 || tracked != 1) {
    fprintf(stderr, "c_consumer: running_mean %g %g (tracked %lld), expected 0.25 2.5 (1)\n",
            running_mean[0], running_mean[1], (long long)tracked);
    return 1;
  }
  /* An error is reported, not ignored: eps <= 0 is rejected and y is left as it was. */
  if (bnorm_forward_train(BNORM_CHANNELS_FIRST, N, C, 1, x, NULL, NULL, NULL, NULL, NULL, 0.1,
                          -1.0, y, NULL, NULL) != BNORM_ERROR_INVALID_ARGUMENT) {
    fprintf(stderr, "c_consumer: eps = -1 was accepted\n");
    return 1;
  }
  printf("c_consumer: forward_train OK; the error for eps = -1: %s\n", bnorm_last_error());
  return 0;
}
