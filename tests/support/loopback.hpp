// Test-only fixtures (not part of reactor): driving a reactor until a condition holds, socketpairs,
// non-blocking peers that the test itself plays, byte patterns, and fd counting.
#pragma once

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <utility>

#include <reactor.hpp>

namespace test {

using namespace std::chrono_literals;

// Runs the loop until `done()` is true or `limit` passes; returns done(). The limit is generous:
// it only stops a broken test from hanging, it never decides a result by timing.
template <class Loop, class Done>
bool run_until(Loop& loop, Done done, std::chrono::milliseconds limit = 20s) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!done()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    loop.run_once(10ms);
  }
  return true;
}

// A connected AF_UNIX stream pair; both ends non-blocking and close-on-exec.
inline std::pair<reactor::UniqueFd, reactor::UniqueFd> socket_pair() {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) != 0) {
    throw std::system_error(errno, std::system_category(), "socketpair");
  }
  return {reactor::UniqueFd(fds[0]), reactor::UniqueFd(fds[1])};
}

// `size` bytes of a pattern that differs per `seed` and never repeats with a short period, so a
// lost, duplicated or reordered chunk shows up as a mismatch.
inline std::string pattern(std::size_t size, std::uint32_t seed = 1) {
  std::string bytes(size, '\0');
  std::uint32_t state = seed * 2654435761u + 1;
  for (auto& byte : bytes) {
    state ^= state << 13;
    state ^= state >> 17;
    state ^= state << 5;
    byte = static_cast<char>(state);
  }
  return bytes;
}

// The test's side of a connection: a non-blocking fd it writes `to_send` into and reads
// everything from, one step at a time, between reactor iterations.
struct Peer {
  explicit Peer(reactor::UniqueFd socket) : fd(std::move(socket)) {}

  reactor::UniqueFd fd;
  std::string to_send;
  std::size_t sent = 0;
  std::string received;
  bool eof = false;
  int error = 0;
  bool reading = true;

  // Writes what it can and reads what is there; returns nothing, check the fields.
  void step() {
    while (sent < to_send.size()) {
      const ssize_t n =
          ::send(fd.get(), to_send.data() + sent, to_send.size() - sent, MSG_NOSIGNAL);
      if (n <= 0) {
        if (n < 0 && errno != EAGAIN && errno != EINTR) error = errno;
        break;
      }
      sent += static_cast<std::size_t>(n);
    }
    while (reading && !eof) {
      char buffer[65536];
      const ssize_t n = ::read(fd.get(), buffer, sizeof buffer);
      if (n > 0) {
        received.append(buffer, static_cast<std::size_t>(n));
      } else if (n == 0) {
        eof = true;
      } else {
        if (errno != EAGAIN && errno != EINTR) error = errno;
        break;
      }
    }
  }

  bool all_sent() const { return sent == to_send.size(); }
  void shutdown_write() { ::shutdown(fd.get(), SHUT_WR); }
};

// Number of open fds of this process.
inline std::size_t open_fd_count() {
  std::size_t count = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    ++count;
  }
  return count - 1;  // the directory iterator's own fd
}

// Sets the soft RLIMIT_NOFILE for its lifetime, restoring the previous limit afterwards.
class FdLimit {
 public:
  explicit FdLimit(rlim_t soft) {
    ::getrlimit(RLIMIT_NOFILE, &saved_);
    rlimit lowered = saved_;
    lowered.rlim_cur = std::min(soft, saved_.rlim_max);
    ::setrlimit(RLIMIT_NOFILE, &lowered);
  }
  FdLimit(const FdLimit&) = delete;
  FdLimit& operator=(const FdLimit&) = delete;
  ~FdLimit() { ::setrlimit(RLIMIT_NOFILE, &saved_); }

 private:
  rlimit saved_{};
};

}  // namespace test
