#include <cstdlib>
#include <cstring>

#include "cpu/cpu.h"
#include "kernels.h"
#include "reference/reference.h"

namespace bnorm::detail {
namespace {

// Fastest first, the reference last.
const Implementation kImplementations[] = {
    {"cpu", &cpu::stats, &cpu::apply, &cpu::backward_reduce, &cpu::backward_apply,
     &cpu::forward_train, &cpu::forward_eval, &cpu::backward, &cpu::forward_train_bf16,
     &cpu::forward_eval_bf16, &cpu::backward_bf16, &cpu::forward_train_f16, &cpu::forward_eval_f16,
     &cpu::backward_f16},
    {"reference", &ref::stats<float>, &ref::apply<float>, &ref::backward_reduce<float>,
     &ref::backward_apply<float>, &ref::forward_train, &ref::forward_eval, &ref::backward,
     nullptr, nullptr, nullptr, nullptr, nullptr, nullptr},
};
constexpr size_t kCount = sizeof(kImplementations) / sizeof(kImplementations[0]);

bool reference_forced_by_environment() {
  const char* env = std::getenv("BNORM_BACKEND");
  return env != nullptr && std::strcmp(env, "reference") == 0;
}

}  // namespace

std::span<const Implementation> implementations() { return kImplementations; }

const Implementation& select_implementation(Backend backend) {
  if (backend == Backend::kReference || reference_forced_by_environment())
    return kImplementations[kCount - 1];
  return kImplementations[0];
}

}  // namespace bnorm::detail
