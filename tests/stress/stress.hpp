// Test-only (not part of reactor): helpers shared by the stress tests — raising the fd limit,
// non-blocking loopback connects that never wait on the listen backlog, and percentiles.
#pragma once

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <system_error>
#include <vector>

#include <reactor.hpp>

namespace stress {

// Raises the soft RLIMIT_NOFILE to at least `needed` (the hard limit too, when the process may).
// Returns false when the hard limit is below `needed` and cannot be raised: the test then says
// which limit it needs instead of failing somewhere inside.
inline bool raise_fd_limit(rlim_t needed) {
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0) return false;
  if (limit.rlim_cur >= needed) return true;
  if (limit.rlim_max < needed) {
    rlimit raised{needed, needed};
    if (::setrlimit(RLIMIT_NOFILE, &raised) == 0) return true;  // root (CAP_SYS_RESOURCE)
    return false;
  }
  limit.rlim_cur = needed;
  return ::setrlimit(RLIMIT_NOFILE, &limit) == 0;
}

// The current soft RLIMIT_NOFILE, for failure messages.
inline rlim_t fd_limit() {
  rlimit limit{};
  ::getrlimit(RLIMIT_NOFILE, &limit);
  return limit.rlim_cur;
}

// Makes `loop` create its timerfd now (it does so with the first timer, lingering closes and
// timeouts included, and keeps it), so that fd counts taken afterwards compare like with like.
template <class Loop>
void create_timer_fd(Loop& loop) {
  loop.cancel(loop.schedule_after(std::chrono::hours(1), [] {}));
}

inline reactor::Endpoint loopback() {
  return reactor::Endpoint::from_host_port("127.0.0.1", 0);
}

// A non-blocking TCP socket whose connect to `endpoint` is under way (on loopback it completes
// in the connect call unless the listen backlog is full: keep the unaccepted count low). Reads
// and writes say EAGAIN until it is established. receive_buffer > 0 sets SO_RCVBUF first (the
// window the server may fill before the client reads).
inline reactor::UniqueFd connect_nonblocking(const reactor::Endpoint& endpoint,
                                             int receive_buffer = 0) {
  reactor::UniqueFd socket(
      ::socket(endpoint.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!socket) throw std::system_error(errno, std::system_category(), "socket");
  if (receive_buffer > 0 && ::setsockopt(socket.get(), SOL_SOCKET, SO_RCVBUF, &receive_buffer,
                                         sizeof receive_buffer) != 0) {
    throw std::system_error(errno, std::system_category(), "setsockopt");
  }
  if (::connect(socket.get(), endpoint.data(), endpoint.size()) != 0 && errno != EINPROGRESS) {
    throw std::system_error(errno, std::system_category(), "connect");
  }
  return socket;
}

// The p-th percentile (0 < p <= 100) of `samples`, nearest rank; zero for no samples.
template <class Duration>
Duration percentile(std::vector<Duration> samples, double p) {
  if (samples.empty()) return Duration::zero();
  std::sort(samples.begin(), samples.end());
  const auto rank = static_cast<std::size_t>(p / 100.0 * static_cast<double>(samples.size()) + 0.5);
  return samples[std::clamp<std::size_t>(rank, 1, samples.size()) - 1];
}

}  // namespace stress
