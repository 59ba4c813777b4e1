#include <cstdlib>
#include <cstring>

#include "cpu/cpu.h"
#include "kernels.h"
#include "reference/reference.h"

namespace bnorm::detail {
namespace {

// Fastest first, the reference last.
const Implementation kImplementations[] = {
    {"cpu", &cpu::forward_train, &cpu::forward_eval, &cpu::backward},
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
