// Test-only helpers (not part of reactor) for integration tests that run an example program as a
// child process and talk to it over sockets: ServerProcess (start, signal, read stdout, wait for
// exit, read /proc; stderr too, on request), bounded poll() waits, eventually(), TempDir, and the
// client side (connect_to, exchange(), send_without_reading(), /proc/net/tcp queues).
//
// Waits are bounded by generous limits (kLimit) that only stop a broken test from hanging; none
// decides a result by timing.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <reactor.hpp>

#include "catch.hpp"

namespace test {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// The most any single wait in these tests may take; normally each takes milliseconds.
inline constexpr Clock::duration kLimit = 10s;
inline constexpr std::size_t kMiB = std::size_t{1024} * 1024;

// Milliseconds left until `deadline`, rounded up, for poll(); 0 once it has passed.
inline int ms_until(Clock::time_point deadline) {
  const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
  return static_cast<int>(std::clamp<std::int64_t>(left.count(), 0, 1 << 30));
}

// poll() on one fd, retrying EINTR with the time left; returns revents (0 on timeout).
inline short poll_one(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    pollfd entry{fd, events, 0};
    const int n = ::poll(&entry, 1, ms_until(deadline));
    if (n > 0) return entry.revents;
    if (n == 0) return 0;
    if (errno != EINTR) return POLLERR;
  }
}

// Checks `condition` until it holds or `limit` passes, with 10 ms waits in between (for state
// that only /proc shows, which no fd can wait on). Returns whether it held.
template <class Condition>
bool eventually(Condition condition, Clock::duration limit = kLimit) {
  const auto deadline = Clock::now() + limit;
  for (;;) {
    if (condition()) return true;
    if (Clock::now() >= deadline) return false;
    ::poll(nullptr, 0, 10);
  }
}

// Waits for child `pid` to exit and reaps it; its wait status, or nullopt if it still runs at
// `deadline` (or waitpid fails). A pidfd (Linux 5.3) becomes readable when the process exits;
// without one, it looks again every 10 ms.
inline std::optional<int> reap(pid_t pid, Clock::time_point deadline) {
  reactor::UniqueFd pidfd;
#ifdef SYS_pidfd_open
  pidfd.reset(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0u)));
#endif
  for (;;) {
    int status = 0;
    const pid_t result = ::waitpid(pid, &status, WNOHANG);
    if (result == pid) return status;
    if ((result < 0 && errno != EINTR) || Clock::now() >= deadline) return std::nullopt;
    if (pidfd) {
      poll_one(pidfd.get(), POLLIN, std::min(deadline, Clock::now() + 100ms));
    } else {
      ::poll(nullptr, 0, 10);
    }
  }
}

// --- The server process --------------------------------------------------------------------------

// Where a ServerProcess's stderr goes: the test's own (the default), or a pipe the test reads
// (ServerProcess::read_stderr_to_eof).
enum class StderrMode { kInherit, kCapture };

// A program running as a child, its stdout on a pipe. The destructor kills (SIGKILL) and reaps
// it unless it was already reaped, so no test leaves a process behind, whatever it REQUIREs.
class ServerProcess {
 public:
  // Starts `program` with `args`; a nonzero fd_limit sets RLIMIT_NOFILE (soft and hard) in the
  // child before exec. StderrMode::kCapture puts its stderr on a second pipe.
  ServerProcess(std::string program, const std::vector<std::string>& args, rlim_t fd_limit = 0,
                StderrMode stderr_mode = StderrMode::kInherit) {
    std::vector<std::string> words{std::move(program)};
    words.insert(words.end(), args.begin(), args.end());
    std::vector<char*> argv;
    argv.reserve(words.size() + 1);
    for (auto& word : words) argv.push_back(word.data());
    argv.push_back(nullptr);

    int pipe_fds[2];
    if (::pipe2(pipe_fds, O_CLOEXEC) != 0) FAIL("pipe2: " << std::strerror(errno));
    reactor::UniqueFd read_end(pipe_fds[0]);
    reactor::UniqueFd write_end(pipe_fds[1]);
    reactor::UniqueFd stderr_read_end;
    reactor::UniqueFd stderr_write_end;
    if (stderr_mode == StderrMode::kCapture) {
      if (::pipe2(pipe_fds, O_CLOEXEC) != 0) FAIL("pipe2: " << std::strerror(errno));
      stderr_read_end.reset(pipe_fds[0]);
      stderr_write_end.reset(pipe_fds[1]);
    }

    const pid_t parent = ::getpid();
    pid_ = ::fork();
    if (pid_ < 0) FAIL("fork: " << std::strerror(errno));
    if (pid_ == 0) {
      // Child: only async-signal-safe calls from here to exec. If the test process dies without
      // running destructors (killed by a ctest timeout, say), the server goes with it.
      if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || ::getppid() != parent) ::_exit(126);
      if (fd_limit != 0) {
        const rlimit limit{fd_limit, fd_limit};
        if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) ::_exit(126);
      }
      if (write_end.get() == STDOUT_FILENO) {
        ::fcntl(STDOUT_FILENO, F_SETFD, 0);  // dup2 onto itself would keep close-on-exec
      } else if (::dup2(write_end.get(), STDOUT_FILENO) < 0) {
        ::_exit(126);
      }
      if (stderr_write_end) {
        if (stderr_write_end.get() == STDERR_FILENO) {
          ::fcntl(STDERR_FILENO, F_SETFD, 0);
        } else if (::dup2(stderr_write_end.get(), STDERR_FILENO) < 0) {
          ::_exit(126);
        }
      }
      // Only stdin, stdout and stderr go to the server: any fd of the test process that is not
      // close-on-exec would count against its fd limit. close_range needs Linux 5.9.
      long closed = -1;
#ifdef SYS_close_range
      closed = ::syscall(SYS_close_range, 3u, ~0u, 0u);
#endif
      if (closed != 0) {
        for (int fd = 3; fd < 1024; ++fd) ::close(fd);
      }
      sigset_t none;
      sigemptyset(&none);
      ::sigprocmask(SIG_SETMASK, &none, nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    stdout_ = std::move(read_end);
    ::fcntl(stdout_.get(), F_SETFL, ::fcntl(stdout_.get(), F_GETFL) | O_NONBLOCK);
    if (stderr_read_end) {
      stderr_ = std::move(stderr_read_end);
      ::fcntl(stderr_.get(), F_SETFL, ::fcntl(stderr_.get(), F_GETFL) | O_NONBLOCK);
    }
  }

  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  ~ServerProcess() {
    if (pid_ <= 0 || reaped_) return;
    ::kill(pid_, SIGKILL);
    while (::waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
    }
  }

  pid_t pid() const {
    return pid_;
  }

  void signal(int number) const {
    ::kill(pid_, number);
  }

  // The next line of the server's stdout, without its '\n'; nullopt on EOF or timeout.
  std::optional<std::string> read_line(Clock::duration limit = kLimit) {
    const auto deadline = Clock::now() + limit;
    for (;;) {
      const auto newline = output_.find('\n');
      if (newline != std::string::npos) {
        std::string line = output_.substr(0, newline);
        output_.erase(0, newline + 1);
        return line;
      }
      if (!read_some(stdout_.get(), output_, stdout_eof_, deadline)) return std::nullopt;
    }
  }

  // Everything the server writes to stdout from now until it closes it (exits); nullopt on
  // timeout.
  std::optional<std::string> read_to_eof(Clock::duration limit = kLimit) {
    const auto deadline = Clock::now() + limit;
    while (read_some(stdout_.get(), output_, stdout_eof_, deadline)) {
    }
    if (!stdout_eof_) return std::nullopt;
    return std::exchange(output_, {});
  }

  // Everything the server writes to stderr from now until it closes it (exits), when started
  // with StderrMode::kCapture; nullopt on timeout, or when stderr was not captured.
  std::optional<std::string> read_stderr_to_eof(Clock::duration limit = kLimit) {
    if (!stderr_) return std::nullopt;
    const auto deadline = Clock::now() + limit;
    while (read_some(stderr_.get(), stderr_output_, stderr_eof_, deadline)) {
    }
    if (!stderr_eof_) return std::nullopt;
    return std::exchange(stderr_output_, {});
  }

  // Waits for the server to exit; its wait status, or nullopt if it still runs after `limit`.
  std::optional<int> wait_exit(Clock::duration limit = kLimit) {
    const std::optional<int> status = reap(pid_, Clock::now() + limit);
    if (status) reaped_ = true;
    return status;
  }

  // utime + stime so far, from /proc/PID/stat.
  std::chrono::duration<double> cpu_time() const {
    std::ifstream file("/proc/" + std::to_string(pid_) + "/stat");
    std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    // Fields after the command name (which may hold spaces, so skip to its last ')'): state is
    // field 3, utime 14, stime 15 (proc(5)).
    std::istringstream fields(text.substr(text.rfind(')') + 2));
    std::string field;
    unsigned long long utime = 0;
    unsigned long long stime = 0;
    for (int number = 3; number <= 15 && (fields >> field); ++number) {
      if (number == 14) utime = std::stoull(field);
      if (number == 15) stime = std::stoull(field);
    }
    return std::chrono::duration<double>(static_cast<double>(utime + stime) /
                                         static_cast<double>(::sysconf(_SC_CLK_TCK)));
  }

  // Resident set size in bytes, from VmRSS in /proc/PID/status.
  std::size_t resident_bytes() const {
    std::ifstream file("/proc/" + std::to_string(pid_) + "/status");
    std::string line;
    while (std::getline(file, line)) {
      if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
    }
    return 0;
  }

  // Number of open fds, from /proc/PID/fd.
  std::size_t open_fds() const {
    std::error_code ec;
    std::size_t count = 0;
    for (std::filesystem::directory_iterator it("/proc/" + std::to_string(pid_) + "/fd", ec), end;
         !ec && it != end; it.increment(ec)) {
      ++count;
    }
    return count;
  }

 private:
  // Appends what the pipe `fd` has to `output`, waiting until `deadline` for something; false on
  // EOF (setting `eof`) or timeout.
  static bool read_some(int fd, std::string& output, bool& eof, Clock::time_point deadline) {
    if (eof) return false;
    for (;;) {
      char buffer[4096];
      const ssize_t n = ::read(fd, buffer, sizeof buffer);
      if (n > 0) {
        output.append(buffer, static_cast<std::size_t>(n));
        return true;
      }
      if (n == 0) {
        eof = true;
        return false;
      }
      if (errno == EINTR) continue;
      if (errno != EAGAIN) return false;
      if (poll_one(fd, POLLIN, deadline) == 0) return false;
    }
  }

  pid_t pid_ = -1;
  bool reaped_ = false;
  reactor::UniqueFd stdout_;
  std::string output_;  // read from stdout, not yet returned
  bool stdout_eof_ = false;
  reactor::UniqueFd stderr_;  // StderrMode::kCapture only
  std::string stderr_output_;
  bool stderr_eof_ = false;
};

// Reads the server's "listening on ..." line and returns the endpoint it names.
inline reactor::Endpoint listening_endpoint(ServerProcess& server,
                                            std::string_view expected_prefix) {
  const std::optional<std::string> line = server.read_line();
  REQUIRE(line.has_value());
  INFO("server said: " << *line);
  REQUIRE(line->rfind(expected_prefix, 0) == 0);
  std::error_code ec;
  const reactor::Endpoint endpoint =
      reactor::Endpoint::parse(std::string_view(*line).substr(std::strlen("listening on ")), ec);
  REQUIRE_FALSE(ec);
  return endpoint;
}

// A TCP port as printed: digits only, 1..65535; 0 when malformed.
inline unsigned parse_port(std::string_view text) {
  if (text.empty() || text.size() > 5) return 0;
  unsigned port = 0;
  for (const char c : text) {
    if (c < '0' || c > '9') return 0;
    port = port * 10 + static_cast<unsigned>(c - '0');
  }
  return port <= 65535 ? port : 0;
}

// Sends SIGTERM and asserts a clean exit (status 0) within `limit`.
inline void stop_and_check_exit(ServerProcess& server, Clock::duration limit = kLimit) {
  server.signal(SIGTERM);
  const std::optional<int> status = server.wait_exit(limit);
  REQUIRE(status.has_value());
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
}

// A fresh directory under the system's temp dir (named `prefix`.XXXXXX), removed with everything
// in it at scope exit.
class TempDir {
 public:
  explicit TempDir(std::string_view prefix = "reactor_test") {
    std::string templ =
        (std::filesystem::temp_directory_path() / (std::string(prefix) + ".XXXXXX")).string();
    if (::mkdtemp(templ.data()) == nullptr) FAIL("mkdtemp: " << std::strerror(errno));
    path_ = templ;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// --- The client side -----------------------------------------------------------------------------

// A connected, non-blocking client socket (reactor::connect blocks only until it is connected).
inline reactor::UniqueFd connect_to(const reactor::Endpoint& endpoint) {
  std::error_code ec;
  reactor::UniqueFd socket = reactor::connect(endpoint, ec);
  INFO("connect to " << endpoint.to_string() << ": " << ec.message());
  REQUIRE_FALSE(ec);
  return socket;
}

struct Exchange {
  std::size_t sent = 0;
  std::string received;
  bool eof = false;
  int error = 0;  // errno of a failed send or read
  bool timed_out = false;
};

struct ExchangeOptions {
  std::size_t already_sent = 0;  // bytes of `data` sent before (not read back yet)
  bool shutdown_after_sending = false;
  bool until_eof = false;  // after data.size() bytes came back, go on reading until EOF
  Clock::duration limit = kLimit;
};

// Sends data[already_sent..] while reading whatever comes back, until data.size() bytes came back
// (and EOF, with until_eof), the peer closed, an error, or the time limit.
inline Exchange exchange(int fd, std::string_view data, const ExchangeOptions& options = {}) {
  Exchange result;
  result.sent = options.already_sent;
  bool shut = false;
  const auto deadline = Clock::now() + options.limit;
  for (;;) {
    if (options.shutdown_after_sending && !shut && result.sent == data.size()) {
      if (::shutdown(fd, SHUT_WR) != 0) {
        result.error = errno;
        return result;
      }
      shut = true;
    }
    if (result.eof || (result.received.size() >= data.size() && !options.until_eof)) break;
    const short events = result.sent < data.size() ? POLLIN | POLLOUT : POLLIN;
    const short revents = poll_one(fd, events, deadline);
    if (revents == 0) {
      result.timed_out = true;
      break;
    }
    if ((revents & (POLLOUT | POLLERR)) != 0 && result.sent < data.size()) {
      const ssize_t n =
          ::send(fd, data.data() + result.sent, data.size() - result.sent, MSG_NOSIGNAL);
      if (n > 0) {
        result.sent += static_cast<std::size_t>(n);
      } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
        result.error = errno;
        break;
      }
    }
    if ((revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
      char buffer[65536];
      const ssize_t n = ::read(fd, buffer, sizeof buffer);
      if (n > 0) {
        result.received.append(buffer, static_cast<std::size_t>(n));
      } else if (n == 0) {
        result.eof = true;
      } else if (errno != EAGAIN && errno != EINTR) {
        result.error = errno;
        break;
      }
    }
  }
  return result;
}

// Index of the first byte where `a` and `b` differ (the shorter one's size if one is a prefix of
// the other), or npos when they are equal.
inline std::size_t first_difference(std::string_view a, std::string_view b) {
  const std::size_t common = std::min(a.size(), b.size());
  for (std::size_t i = 0; i < common; ++i) {
    if (a[i] != b[i]) return i;
  }
  return a.size() == b.size() ? std::string_view::npos : common;
}

// Sends all of `data` without reading anything back, waiting up to `stall` whenever the socket is
// full; returns how much was sent (less than data.size() when the peer stopped taking bytes).
inline std::size_t send_without_reading(int fd, std::string_view data, Clock::duration stall) {
  std::size_t sent = 0;
  while (sent < data.size()) {
    const ssize_t n = ::send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<std::size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno != EAGAIN) break;
    if ((poll_one(fd, POLLOUT, Clock::now() + stall) & POLLOUT) == 0) break;
  }
  return sent;
}

// The (tx_queue, rx_queue) of the IPv4 TCP socket local_port <-> remote_port, from
// /proc/net/tcp (proc(5)); rx_queue is the bytes received that the owner has not read yet.
inline std::optional<std::pair<unsigned long, unsigned long>> tcp_queues(unsigned local_port,
                                                                         unsigned remote_port) {
  std::ifstream file("/proc/net/tcp");
  std::string line;
  std::getline(file, line);  // header
  while (std::getline(file, line)) {
    unsigned local = 0;
    unsigned remote = 0;
    unsigned state = 0;
    unsigned long tx = 0;
    unsigned long rx = 0;
    if (std::sscanf(line.c_str(), " %*u: %*[0-9A-Fa-f]:%x %*[0-9A-Fa-f]:%x %x %lx:%lx", &local,
                    &remote, &state, &tx, &rx) == 5 &&
        local == local_port && remote == remote_port) {
      return std::pair{tx, rx};
    }
  }
  return std::nullopt;
}

// The local port of a connected TCP socket; 0 on failure.
inline unsigned local_port_of(int fd) {
  sockaddr_storage storage{};
  socklen_t length = sizeof storage;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&storage), &length) != 0) return 0;
  return reactor::Endpoint::from_sockaddr(reinterpret_cast<sockaddr*>(&storage), length).port();
}

}  // namespace test
