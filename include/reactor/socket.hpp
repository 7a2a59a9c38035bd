// Public: a blocking connect() that returns a connected, non-blocking socket ready for adopt(),
// for tools and tests that want one socket before any loop runs. It blocks the calling thread
// until the connection is made or fails; on a loop thread use Connector (connector.hpp), which
// does not block, resolves names, and has timeouts and retries.
#pragma once

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <system_error>

#include "concepts.hpp"
#include "endpoint.hpp"
#include "error.hpp"
#include "fd.hpp"
#include "syscalls.hpp"

namespace reactor {

// Connects a new stream socket to `endpoint`, blocking until the connection is established or
// fails; the returned socket is non-blocking and close-on-exec, with TCP_NODELAY for TCP, owned by
// a BasicUniqueFd<Sys> (UniqueFd for the default policy). Returns an empty one with `ec` set on
// failure (connection_refused, ...).
template <SyscallPolicy Sys = LinuxSyscalls>
BasicUniqueFd<Sys> connect(const Endpoint& endpoint, std::error_code& ec) noexcept {
  ec.clear();
  if (endpoint.empty()) {
    ec = std::make_error_code(std::errc::address_family_not_supported);
    return {};
  }
  BasicUniqueFd<Sys> socket(Sys::socket(endpoint.family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!socket) {
    ec = detail::last_errno_code();
    return {};
  }
  if (Sys::connect(socket.get(), endpoint.data(), endpoint.size()) != 0) {
    if (errno != EINTR && errno != EINPROGRESS) {
      ec = detail::last_errno_code();
      return {};
    }
    // Interrupted: the connection goes on asynchronously (connect(2)); wait for it and fetch
    // the outcome instead of calling connect again (which would fail with EALREADY).
    pollfd waiting{socket.get(), POLLOUT, 0};
    while (Sys::poll(&waiting, 1, -1) < 0) {
      if (errno != EINTR) {
        ec = detail::last_errno_code();
        return {};
      }
    }
    int error = 0;
    socklen_t length = sizeof error;
    if (Sys::getsockopt(socket.get(), SOL_SOCKET, SO_ERROR, &error, &length) != 0) {
      error = errno;
    }
    if (error != 0) {
      ec = detail::errno_code(error);
      return {};
    }
  }
  const int flags = Sys::fcntl(socket.get(), F_GETFL, 0);
  if (flags < 0 || Sys::fcntl(socket.get(), F_SETFL, flags | O_NONBLOCK) != 0) {
    ec = detail::last_errno_code();
    return {};
  }
  if (!endpoint.is_unix()) {
    const int on = 1;
    Sys::setsockopt(socket.get(), IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
  }
  return socket;
}

// Throwing overload: std::system_error naming "connect".
template <SyscallPolicy Sys = LinuxSyscalls>
BasicUniqueFd<Sys> connect(const Endpoint& endpoint) {
  std::error_code ec;
  BasicUniqueFd<Sys> socket = connect<Sys>(endpoint, ec);
  detail::throw_if(ec, "connect");
  return socket;
}

}  // namespace reactor
