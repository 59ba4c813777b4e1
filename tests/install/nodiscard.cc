// Compiled by run_install_test.sh against the installed headers with -Werror=unused-result:
// ignoring the Status of a call must not compile (bnorm::Status is [[nodiscard]]), and the same
// call whose Status is used, or cast to void, must.
#include "bnorm/batch_norm.h"

bnorm::Status create(bnorm::BatchNorm* bn) {
  bnorm::BatchNormOptions options;
  options.num_features = 4;
#if defined(BNORM_IGNORE_STATUS)
  bnorm::BatchNorm::create(options, bn);  // the error is dropped: -Wunused-result
  return bnorm::Status();
#elif defined(BNORM_VOID_STATUS)
  (void)bnorm::BatchNorm::create(options, bn);
  return bnorm::Status();
#else
  return bnorm::BatchNorm::create(options, bn);
#endif
}
