// Helpers shared by the nn sources (not installed).
#ifndef BNORM_SRC_NN_COMMON_H_
#define BNORM_SRC_NN_COMMON_H_

#include <cstdint>
#include <string>

#include "bnorm/nn/tensor.h"
#include "bnorm/status.h"

namespace bnorm::nn::detail {

// Shortest text that reads back as the same double, as Python's repr prints it ("1e-05", "0.1").
std::string format_double(double v);

// "<who>: <what>: expected <expected>, got <shape>", as an InvalidArgument status.
Status shape_error(const std::string& who, const char* what, const std::string& expected,
                   const Tensor& got);

// Row-major sgemm: C[m,n] = alpha * op(A) op(B) + beta * C, with op a transpose when trans_*.
void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
           const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
           int64_t ldc);

}  // namespace bnorm::nn::detail

#endif  // BNORM_SRC_NN_COMMON_H_
