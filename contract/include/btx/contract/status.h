// Error values for everything in model/ that can fail on user input (files, configs, jobs).
// Our own type rather than absl::Status: the library must also build against a pip LibTorch, which
// may use the pre-C++11 string ABI that a system absl would not link with.
#pragma once

#include <string>
#include <utility>
#include <variant>

namespace btx {

// kUnavailable: something could not be read (EIO, ESTALE, EACCES, ...), which says nothing about its content.
enum class StatusCode {
  kOk = 0,
  kInvalidArgument,
  kNotFound,
  kDataLoss,
  kFailedPrecondition,
  kInternal,
  kCancelled,
  kUnavailable
};

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}
  static Status Ok() { return {}; }
  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // Prefixes context so errors read like a path: "loading /x: model.safetensors: header: ...".
  Status With(const std::string& context) const {
    return ok() ? *this : Status(code_, context + ": " + message_);
  }
  std::string ToString() const { return ok() ? "OK" : message_; }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status InvalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status NotFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
inline Status DataLoss(std::string m) { return {StatusCode::kDataLoss, std::move(m)}; }
inline Status FailedPrecondition(std::string m) { return {StatusCode::kFailedPrecondition, std::move(m)}; }
inline Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }
inline Status Cancelled(std::string m) { return {StatusCode::kCancelled, std::move(m)}; }
inline Status Unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }

template <typename T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(T value) : v_(std::move(value)) {}          // NOLINT(google-explicit-constructor)
  StatusOr(Status status) : v_(std::move(status)) {}   // NOLINT(google-explicit-constructor)
  bool ok() const { return std::holds_alternative<T>(v_); }
  Status status() const { return ok() ? Status::Ok() : std::get<Status>(v_); }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T value_or(T other) const& { return ok() ? value() : std::move(other); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace btx

#define BTX_CONCAT_INNER(a, b) a##b
#define BTX_CONCAT(a, b) BTX_CONCAT_INNER(a, b)
#define BTX_RETURN_IF_ERROR(expr)            \
  do {                                       \
    ::btx::Status _btx_st = (expr);          \
    if (!_btx_st.ok()) return _btx_st;       \
  } while (0)
#define BTX_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()
#define BTX_ASSIGN_OR_RETURN(lhs, expr) BTX_ASSIGN_OR_RETURN_IMPL(BTX_CONCAT(_btx_so_, __LINE__), lhs, expr)
