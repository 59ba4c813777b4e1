#include <cstdlib>
#include <cstring>

#include "kernels.h"
#include "reference/reference.h"

namespace bnorm::detail {
namespace {

// Fastest first, the reference last. The fast CPU kernels slot in above the reference.
const Implementation kImplementations[] = {
    {"reference", &ref::forward_train, &ref::forward_eval, &ref::backward},
};
constexpr size_t kCount = sizeof(kImplementations) / sizeof(kImplementations[0]);

bool reference_forced_by_environment() {
  const char* env = std::getenv("BNORM_BACKEND");
  return env != nullptr && std::strcmp(env, "reference") == 0;
}

}  // namespace

const Implementation& select_implementation(Backend backend) {
  if (backend == Backend::kReference || reference_forced_by_environment())
    return kImplementations[kCount - 1];
  return kImplementations[0];
}

}  // namespace bnorm::detail
