// A replacement of the global operator new for the tests that watch allocations: it counts them
// (bnorm_test::alloc::count) and, when told, fails one (bnorm_test::alloc::fail_in = k > 0: the
// k-th allocation from now on throws std::bad_alloc). Include it in exactly ONE source file of a
// test binary: it defines the process's operator new and delete.
#ifndef BNORM_TESTS_REPLACED_NEW_H_
#define BNORM_TESTS_REPLACED_NEW_H_

#include <atomic>
#include <cstdlib>
#include <new>

namespace bnorm_test::alloc {
inline std::atomic<long> count{0};
inline std::atomic<long> fail_in{0};
}  // namespace bnorm_test::alloc

void* operator new(std::size_t size) {
  bnorm_test::alloc::count.fetch_add(1, std::memory_order_relaxed);
  if (bnorm_test::alloc::fail_in.load(std::memory_order_relaxed) > 0 &&
      bnorm_test::alloc::fail_in.fetch_sub(1, std::memory_order_relaxed) == 1)
    throw std::bad_alloc();
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
// GCC pairs the inlined deletes with operator new's semantics and warns about free(); here both
// sides are malloc/free.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // BNORM_TESTS_REPLACED_NEW_H_
