// bnorm::Status: the one error type of the library.
//
// Every public call that can fail returns a Status. A failed call has written nothing: outputs,
// running statistics and num_batches_tracked are bit-for-bit what they were before the call.
// The message names the offending argument and its value, e.g.
//   "eps: must be finite and > 0, got -1e-05".
#ifndef BNORM_STATUS_H_
#define BNORM_STATUS_H_

#include <string>
#include <utility>

namespace bnorm {

// Numeric values are the C API's bnorm_status codes.
enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,  // shape, layout, pointer, eps, momentum, ...
  kNonFinite = 2,        // NaN/Inf found by the opt-in finiteness check
  kInternal = 3,         // out of memory or another unexpected failure
};

// [[nodiscard]]: a call whose Status is ignored draws a warning (-Wunused-result); to drop one
// on purpose, cast it to void.
class [[nodiscard]] Status {
 public:
  // A default-constructed Status is OK.
  Status() = default;

  static Status invalid_argument(std::string message) {
    return Status(StatusCode::kInvalidArgument, std::move(message));
  }
  static Status non_finite(std::string message) {
    return Status(StatusCode::kNonFinite, std::move(message));
  }
  static Status internal(std::string message) {
    return Status(StatusCode::kInternal, std::move(message));
  }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  // Empty for an OK status.
  const std::string& message() const { return message_; }
  // "OK", or "InvalidArgument: <message>" and so on.
  std::string to_string() const;

 private:
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// Name of a code: "OK", "InvalidArgument", "NonFinite", "Internal".
const char* status_code_name(StatusCode code);

}  // namespace bnorm

// Returns the status from the enclosing function if it is not OK.
#define BNORM_RETURN_IF_ERROR(expr)                        \
  do {                                                     \
    ::bnorm::Status bnorm_status_tmp_ = (expr);            \
    if (!bnorm_status_tmp_.ok()) return bnorm_status_tmp_; \
  } while (0)

#endif  // BNORM_STATUS_H_
