// Public: the transport seam between Connection and the syscall policy, and PlainTransport, the
// default (TCP or a Unix socket, bytes as they are).
//
// A Connection reads, writes (one buffer or gathered) and half-closes through its transport, as
// Seastar's data_source/data_sink sit under its connected_socket. The transport is a member of the
// connection ([[no_unique_address]]: the plain one costs no byte) and its functions are templates
// on the syscall policy, so the plain one inlines to exactly the syscalls Connection made before
// (docs/performance.md: instructions and syscalls per message unchanged). reactor/tls.hpp adds
// TlsTransport (OpenSSL), which also has a handshake.
//
// Contract shared by every transport (all members noexcept, called on the reactor's thread):
// - read(fd, buffer, size): bytes read (> 0), 0 at the peer's orderly end, or -1 with errno set:
//   EAGAIN/EWOULDBLOCK to wait for readiness, EINTR to call again, anything else a failure that
//   error() describes.
// - send(fd, data, size) and sendv(fd, vectors, count): bytes taken (a prefix of the input, maybe
//   short), or -1 as for read. A transport that keeps bytes of a write it could not finish (TLS
//   records) must accept the same bytes again, at the same or another address.
// - shutdown_write(fd): ends our direction (FIN, after close_notify for TLS); 0 or -1 with errno.
// - before_close(fd): an orderly close is about to close the socket without shutdown_write (the
//   peer ended first, or no lingering): TLS sends close_notify; plain TCP has nothing to do.
// - error(): the error behind the last -1 that was not EAGAIN or EINTR.
// - has_buffered_input(): bytes the transport read from the socket but did not return yet (the
//   socket's readiness will not announce them).
// - kHandshake: whether handshake() must finish before on_open (see Connection); kShortReadDrains:
//   whether, on TCP, a read shorter than asked means the socket is empty (edge mode stops there);
//   kEagainIsFinal: whether a read's EAGAIN can be taken as the kernel's last word after a wakeup
//   (false when the transport may have consumed bytes first, a partial TLS record).
// - kSendFile (optional, false when absent): the transport writes bytes to the socket as they
//   are, so Connection::send_file() may hand file ranges to the kernel with sendfile(2). Without
//   it (TLS encrypts in user space), file bytes are read with pread and go through send().
#pragma once

#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <system_error>

#include "error.hpp"

namespace reactor {

// What a transport's handshake() reports.
enum class HandshakeStatus : std::uint8_t {
  kDone,       // the connection is ready for data: on_open runs
  kWantRead,   // call again when the socket is readable
  kWantWrite,  // call again when the socket is writable
  kFailed,     // error() says why; the connection closes
};

struct PlainTransport {
  static constexpr bool kHandshake = false;
  static constexpr bool kShortReadDrains = true;
  static constexpr bool kEagainIsFinal = true;
  static constexpr bool kSendFile = true;

  template <class Sys>
  ssize_t read(int fd, char* buffer, std::size_t size) noexcept {
    return Sys::read(fd, buffer, size);
  }

  template <class Sys>
  ssize_t send(int fd, const char* data, std::size_t size) noexcept {
    return Sys::send(fd, data, size, MSG_NOSIGNAL);
  }

  template <class Sys>
  ssize_t sendv(int fd, iovec* vectors, int count) noexcept {
    msghdr message{};
    message.msg_iov = vectors;
    message.msg_iovlen = static_cast<std::size_t>(count);
    return Sys::sendmsg(fd, &message, MSG_NOSIGNAL);
  }

  template <class Sys>
  int shutdown_write(int fd) noexcept {
    return Sys::shutdown(fd, SHUT_WR);
  }

  template <class Sys>
  void before_close(int /*fd*/) noexcept {}

  std::error_code error() const noexcept { return detail::last_errno_code(); }
  bool has_buffered_input() const noexcept { return false; }
};

// Checked where a Connection is instantiated.
template <class T, class Sys>
concept Transport = std::move_constructible<T> &&
    requires(T t, int fd, char* buffer, const char* data, std::size_t size, iovec* vectors) {
  { T::kHandshake } -> std::convertible_to<bool>;
  { T::kShortReadDrains } -> std::convertible_to<bool>;
  { T::kEagainIsFinal } -> std::convertible_to<bool>;
  { t.template read<Sys>(fd, buffer, size) } -> std::same_as<ssize_t>;
  { t.template send<Sys>(fd, data, size) } -> std::same_as<ssize_t>;
  { t.template sendv<Sys>(fd, vectors, 1) } -> std::same_as<ssize_t>;
  { t.template shutdown_write<Sys>(fd) } -> std::same_as<int>;
  t.template before_close<Sys>(fd);
  { t.error() } -> std::same_as<std::error_code>;
  { t.has_buffered_input() } -> std::same_as<bool>;
};

namespace detail {

// Transport T's kSendFile, false when it does not say.
template <class T>
constexpr bool transport_sends_files() noexcept {
  if constexpr (requires { T::kSendFile; }) {
    return T::kSendFile;
  } else {
    return false;
  }
}

}  // namespace detail

// A transport with a handshake also has these (TlsTransport).
template <class T, class Sys>
concept HandshakeTransport = Transport<T, Sys> && T::kHandshake &&
    requires(T t, int fd, std::error_code& ec) {
  { t.template start<Sys>(fd, ec) } -> std::same_as<void>;
  { t.template handshake<Sys>(fd) } -> std::same_as<HandshakeStatus>;
  { t.handshake_timeout() } -> std::convertible_to<std::chrono::milliseconds>;
};

}  // namespace reactor
