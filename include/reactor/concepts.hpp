// Public: every compile-time policy the library accepts, as named C++20 concepts in one place —
// the trigger mode, the syscall policy and the connection handler with its optional hooks.
#pragma once

#include <sys/epoll.h>
#include <sys/socket.h>

#include <concepts>
#include <cstddef>
#include <string_view>
#include <system_error>

namespace reactor {

// A trigger mode: LevelTriggered or EdgeTriggered (see trigger.hpp).
template <class T>
concept TriggerMode = requires {
  { T::kEdge } -> std::convertible_to<bool>;
};

// A syscall policy: static functions with the kernel's signatures and errno convention
// (see syscalls.hpp). Checked on the calls the reactor's core needs.
template <class S>
concept SyscallPolicy = requires(int fd, void* buffer, const void* data, std::size_t size,
                                 epoll_event* event, const msghdr* message, sockaddr* address,
                                 socklen_t* length) {
  { S::epoll_create1(0) } -> std::same_as<int>;
  { S::epoll_ctl(fd, 0, fd, event) } -> std::same_as<int>;
  { S::epoll_wait(fd, event, 1, 0) } -> std::same_as<int>;
  { S::eventfd(0u, 0) } -> std::same_as<int>;
  { S::read(fd, buffer, size) } -> std::same_as<ssize_t>;
  { S::write(fd, data, size) } -> std::same_as<ssize_t>;
  { S::send(fd, data, size, 0) } -> std::same_as<ssize_t>;
  { S::sendmsg(fd, message, 0) } -> std::same_as<ssize_t>;
  { S::accept4(fd, address, length, 0) } -> std::same_as<int>;
  { S::shutdown(fd, 0) } -> std::same_as<int>;
  { S::close(fd) } -> std::same_as<int>;
};

// A connection handler: the one required hook is
//   on_data(Connection& c, std::string_view bytes)
// returning void (every byte consumed) or std::size_t (the bytes consumed; the rest is kept and
// handed over again, followed by new bytes, on the next call).
template <class H, class Conn>
concept ConnectionHandler = requires(H& handler, Conn& connection, std::string_view bytes) {
  handler.on_data(connection, bytes);
};

// Optional hooks, detected by name and signature.
// on_open(c): the connection is registered; may send or close.
template <class H, class Conn>
concept HasOnOpen = requires(H& handler, Conn& connection) {
  handler.on_open(connection);
};

// on_drain(c): pending output fell to the low watermark after it had passed the high watermark.
template <class H, class Conn>
concept HasOnDrain = requires(H& handler, Conn& connection) {
  handler.on_drain(connection);
};

// on_eof(c): the peer half-closed. Without this hook the connection closes after flushing; with
// it, the handler decides (it may go on sending, then call shutdown() or close()).
template <class H, class Conn>
concept HasOnEof = requires(H& handler, Conn& connection) {
  handler.on_eof(connection);
};

// on_close(c, reason): called exactly once, after the fd is closed; reason is empty for an
// orderly close. The connection is freed when the hook returns.
template <class H, class Conn>
concept HasOnClose = requires(H& handler, Conn& connection, std::error_code reason) {
  handler.on_close(connection, reason);
};

}  // namespace reactor
