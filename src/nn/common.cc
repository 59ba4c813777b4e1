#include "common.h"

#include <cblas.h>

#include <algorithm>
#include <charconv>
#include <mutex>

#include "bnorm/batch_norm.h"
#include "bnorm/nn/layers.h"
#include "bnorm/nn/module.h"
#include "parallel.h"

namespace bnorm::nn {
namespace detail {

std::string format_double(double v) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  if (ec != std::errc()) return std::to_string(v);
  std::string s(buf, end);
  // Python prints integral floats with ".0" (1.0, not 1).
  if (s.find_first_of(".eE") == std::string::npos && s.find_first_of("0123456789") == 0)
    s += ".0";
  return s;
}

Status shape_error(const std::string& who, const char* what, const std::string& expected,
                   const Tensor& got) {
  return Status::invalid_argument(who + ": " + what + ": expected " + expected + ", got " +
                                  got.size_string());
}

namespace {

void sgemm_serial(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                  const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                  int64_t ldc) {
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, static_cast<blasint>(m),
              static_cast<blasint>(n), static_cast<blasint>(k), alpha, a,
              static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta, c,
              static_cast<blasint>(ldc));
}

// OpenBLAS runs single-threaded inside each share: the nn pool provides the parallelism, so
// the two never compete for the cores.
std::once_flag g_openblas_serial;

}  // namespace

void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
           const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
           int64_t ldc) {
  std::call_once(g_openblas_serial, [] { openblas_set_num_threads(1); });
  const int threads = nn_threads();
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  if (threads <= 1 || flops < 4.0e6 || (m < 32 && n < 64)) {
    sgemm_serial(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  // Disjoint blocks of C: split the larger of m and n (n in multiples of 16 columns).
  if (n >= m || m < 32) {
    const int64_t blocks = (n + 15) / 16;
    parallel_for(blocks, (blocks + 2 * threads - 1) / (2 * threads), [&](int64_t b0, int64_t b1) {
      const int64_t j0 = b0 * 16, j1 = std::min(n, b1 * 16);
      const float* bj = trans_b ? b + j0 * ldb : b + j0;
      sgemm_serial(trans_a, trans_b, m, j1 - j0, k, alpha, a, lda, bj, ldb, beta, c + j0, ldc);
    });
  } else {
    const int64_t blocks = (m + 7) / 8;
    parallel_for(blocks, (blocks + 2 * threads - 1) / (2 * threads), [&](int64_t b0, int64_t b1) {
      const int64_t i0 = b0 * 8, i1 = std::min(m, b1 * 8);
      const float* ai = trans_a ? a + i0 : a + i0 * lda;
      sgemm_serial(trans_a, trans_b, i1 - i0, n, k, alpha, ai, lda, b, ldb, beta, c + i0 * ldc,
                   ldc);
    });
  }
}

}  // namespace detail

void set_num_threads(int n) {
  // OpenBLAS itself stays single-threaded; detail::sgemm splits the GEMMs over the nn pool.
  std::call_once(detail::g_openblas_serial, [] {});
  openblas_set_num_threads(1);
  // One count for the kernels and the layers (one pool): n, or the default for n <= 0.
  detail::set_nn_threads(n >= 1 ? n : 0);
}

std::vector<StateEntry> Module::state_dict() {
  std::vector<StateEntry> out;
  append_state("", &out);
  return out;
}

std::vector<StateEntry> Module::parameters() {
  std::vector<StateEntry> out;
  for (StateEntry& e : state_dict())
    if (e.is_parameter) out.push_back(std::move(e));
  return out;
}

void Module::zero_grad() {
  for (const StateEntry& e : parameters())
    if (e.grad != nullptr) std::fill_n(e.grad, e.numel(), 0.0f);
}

}  // namespace bnorm::nn
