// Public: the library's own error codes and the one helper that turns an error into an exception.
//
// Run-time I/O errors reach handlers as std::error_code values in the system category (ECONNRESET,
// EPIPE, ...). The conditions below are the ones the library itself decides on; they have their own
// category so that `ec == reactor::Error::kOutputLimit` reads as what happened.
#pragma once

#include <cerrno>
#include <string>
#include <system_error>

namespace reactor {

// Reasons the library closes a connection on its own.
enum class Error {
  kOutputLimit = 1,   // pending output would exceed ConnectionOptions::max_pending_output
  kInputLimit,        // unconsumed input would exceed ConnectionOptions::max_pending_input
  kHandlerException,  // a handler callback threw; the connection was aborted
  kPeerHangup,        // EPOLLHUP with nothing left to read or write
  kFileTruncated,     // a file given to send_file() ended before the range it was to send
};

namespace detail {

class ErrorCategory final : public std::error_category {
 public:
  const char* name() const noexcept override { return "reactor"; }
  std::string message(int value) const override {
    switch (static_cast<Error>(value)) {
      case Error::kOutputLimit:
        return "pending output exceeds the connection's hard cap";
      case Error::kInputLimit:
        return "unconsumed input exceeds the connection's limit";
      case Error::kHandlerException:
        return "a handler callback threw an exception";
      case Error::kPeerHangup:
        return "peer hung up";
      case Error::kFileTruncated:
        return "file ended before the range send_file() was to send";
    }
    return "unknown reactor error";
  }
};

}  // namespace detail

// The category of reactor::Error values. Thread-safe; lives for the whole program.
inline const std::error_category& error_category() noexcept {
  static const detail::ErrorCategory category;
  return category;
}

inline std::error_code make_error_code(Error e) noexcept {
  return {static_cast<int>(e), error_category()};
}

namespace detail {

// The system error code for an errno value.
inline std::error_code errno_code(int err) noexcept {
  return {err, std::system_category()};
}

inline std::error_code last_errno_code() noexcept {
  return errno_code(errno);
}

// The only place the library throws: every throwing overload forwards its error_code here, with
// the name of the syscall or operation that failed.
[[noreturn]] inline void throw_error(const std::error_code& ec, const char* what) {
  throw std::system_error(ec, what);
}

inline void throw_if(const std::error_code& ec, const char* what) {
  if (ec) throw_error(ec, what);
}

}  // namespace detail
}  // namespace reactor

template <>
struct std::is_error_code_enum<reactor::Error> : std::true_type {};
