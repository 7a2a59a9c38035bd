// Integration tests for examples/line_client.cpp: the real binary (LINE_CLIENT_PATH) runs as a
// child process whose stdin, stdout and stderr are pipes the test holds, against a server the test
// plays itself with plain sockets: a listener on 127.0.0.1 whose connections it accepts, echoes
// (on a thread, or only after the client's EOF) or drops; a port that refuses; a listener whose
// accept queue is full. Each case asserts stdout byte for byte, the exact stderr lines and the
// exit status.
//
// Every wait is an event (poll on a pipe, a socket or a pidfd) bounded by a generous limit that
// only stops a broken test from hanging.
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "catch.hpp"
#include "server_process.hpp"

#ifndef LINE_CLIENT_PATH
#error "LINE_CLIENT_PATH must name the line_client binary (tests/CMakeLists.txt, PROGRAMS)"
#endif

extern char** environ;

using namespace test;

namespace {

// The parts joined. (Appending, not `"text" + std::to_string(n) + ...`: GCC 12 reports a false
// -Wrestrict on that in Release builds.)
std::string join(std::initializer_list<std::string_view> parts) {
  std::string text;
  for (const std::string_view part : parts) text.append(part);
  return text;
}

// A close-on-exec pipe whose ends are both above stdin/stdout/stderr (so that dup2 onto 0, 1 or 2
// in the child always makes a new descriptor, without close-on-exec).
std::pair<reactor::UniqueFd, reactor::UniqueFd> make_pipe() {
  int fds[2];
  REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
  reactor::UniqueFd ends[2] = {reactor::UniqueFd(fds[0]), reactor::UniqueFd(fds[1])};
  for (reactor::UniqueFd& end : ends) {
    if (end.get() > 2) continue;
    end.reset(::fcntl(end.get(), F_DUPFD_CLOEXEC, 3));
    REQUIRE(end);
  }
  return {std::move(ends[0]), std::move(ends[1])};
}

// line_client running as a child, its stdin, stdout and stderr on pipes. The destructor kills
// (SIGKILL) and reaps it unless it has exited and was reaped already.
class LineClient {
 public:
  explicit LineClient(const std::vector<std::string>& args) {
    auto [in_read, in_write] = make_pipe();
    auto [out_read, out_write] = make_pipe();
    auto [err_read, err_write] = make_pipe();
    std::vector<std::string> words{LINE_CLIENT_PATH};
    words.insert(words.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& word : words) argv.push_back(word.data());
    argv.push_back(nullptr);
    // A write to the stdin of a client that has exited fails the test with EPIPE rather than
    // killing it: SIGPIPE is ignored here, and back to its default in the client.
    static const bool sigpipe_ignored = ::signal(SIGPIPE, SIG_IGN) != SIG_ERR;
    REQUIRE(sigpipe_ignored);
    posix_spawn_file_actions_t actions;
    REQUIRE(::posix_spawn_file_actions_init(&actions) == 0);
    ::posix_spawn_file_actions_adddup2(&actions, in_read.get(), STDIN_FILENO);
    ::posix_spawn_file_actions_adddup2(&actions, out_write.get(), STDOUT_FILENO);
    ::posix_spawn_file_actions_adddup2(&actions, err_write.get(), STDERR_FILENO);
    posix_spawnattr_t attributes;
    REQUIRE(::posix_spawnattr_init(&attributes) == 0);
    sigset_t defaults;
    sigemptyset(&defaults);
    sigaddset(&defaults, SIGPIPE);
    ::posix_spawnattr_setsigdefault(&attributes, &defaults);
    ::posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGDEF);
    const int error = ::posix_spawn(&pid_, argv[0], &actions, &attributes, argv.data(), environ);
    ::posix_spawnattr_destroy(&attributes);
    ::posix_spawn_file_actions_destroy(&actions);
    REQUIRE(error == 0);
    stdin_ = std::move(in_write);
    stdout_ = std::move(out_read);
    stderr_ = std::move(err_read);
  }

  LineClient(const LineClient&) = delete;
  LineClient& operator=(const LineClient&) = delete;

  ~LineClient() {
    if (reaped_) return;
    ::kill(pid_, SIGKILL);
    while (::waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
    }
  }

  // Writes all of `text` to the client's stdin (a few KiB at most: the pipe holds 64 KiB).
  void write_stdin(std::string_view text) {
    while (!text.empty()) {
      const ssize_t n = ::write(stdin_.get(), text.data(), text.size());
      if (n < 0 && errno == EINTR) continue;
      INFO("write to line_client's stdin: " << std::strerror(errno));
      REQUIRE(n > 0);
      text.remove_prefix(static_cast<std::size_t>(n));
    }
  }

  void close_stdin() { stdin_.reset(); }

  // The next line of stdout or stderr, without its '\n'; nullopt on EOF or after kLimit.
  std::optional<std::string> stdout_line() { return read_line(stdout_.get(), out_, out_eof_); }
  std::optional<std::string> stderr_line() { return read_line(stderr_.get(), err_, err_eof_); }

  // Everything still to come on stdout or stderr, until the client closes it (exits); nullopt
  // after kLimit.
  std::optional<std::string> stdout_to_eof() { return to_eof(stdout_.get(), out_, out_eof_); }
  std::optional<std::string> stderr_to_eof() { return to_eof(stderr_.get(), err_, err_eof_); }

  // The exit status once the client has exited (-1: killed by a signal); nullopt after kLimit.
  std::optional<int> wait_exit() {
    const std::optional<int> status = reap(pid_, Clock::now() + kLimit);
    if (!status) return std::nullopt;
    reaped_ = true;
    return WIFEXITED(*status) ? WEXITSTATUS(*status) : -1;
  }

 private:
  // Appends what `fd` has to `buffer`, waiting until `deadline`; false on EOF or timeout.
  static bool read_some(int fd, std::string& buffer, bool& eof, Clock::time_point deadline) {
    if (eof) return false;
    if ((poll_one(fd, POLLIN, deadline) & (POLLIN | POLLHUP | POLLERR)) == 0) return false;
    char chunk[4096];
    const ssize_t n = ::read(fd, chunk, sizeof chunk);
    if (n > 0) buffer.append(chunk, static_cast<std::size_t>(n));
    if (n == 0) eof = true;
    return n > 0 || (n < 0 && errno == EINTR);
  }

  static std::optional<std::string> read_line(int fd, std::string& buffer, bool& eof) {
    const auto deadline = Clock::now() + kLimit;
    for (;;) {
      if (const auto newline = buffer.find('\n'); newline != std::string::npos) {
        std::string line = buffer.substr(0, newline);
        buffer.erase(0, newline + 1);
        return line;
      }
      if (!read_some(fd, buffer, eof, deadline)) return std::nullopt;
    }
  }

  static std::optional<std::string> to_eof(int fd, std::string& buffer, bool& eof) {
    const auto deadline = Clock::now() + kLimit;
    while (read_some(fd, buffer, eof, deadline)) {
    }
    if (!eof) return std::nullopt;
    return std::exchange(buffer, {});
  }

  pid_t pid_ = -1;
  bool reaped_ = false;
  reactor::UniqueFd stdin_;  // the write end
  reactor::UniqueFd stdout_;
  reactor::UniqueFd stderr_;
  std::string out_, err_;  // read, not yet returned
  bool out_eof_ = false, err_eof_ = false;
};

// --- The server side, played with plain blocking sockets ---------------------------------------

// A listening socket on 127.0.0.1 (an ephemeral port) with `backlog`.
struct Listener {
  explicit Listener(int backlog = 16) {
    const reactor::Endpoint any = reactor::Endpoint::parse("127.0.0.1:0");
    fd.reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    REQUIRE(fd);
    REQUIRE(::bind(fd.get(), any.data(), any.size()) == 0);
    REQUIRE(::listen(fd.get(), backlog) == 0);
    sockaddr_storage bound{};
    socklen_t length = sizeof bound;
    REQUIRE(::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&bound), &length) == 0);
    port = reactor::Endpoint::from_sockaddr(reinterpret_cast<sockaddr*>(&bound), length).port();
  }

  // The next connection, waiting up to kLimit for it.
  reactor::UniqueFd accept_one() const {
    REQUIRE((poll_one(fd.get(), POLLIN, Clock::now() + kLimit) & POLLIN) != 0);
    reactor::UniqueFd connection(::accept4(fd.get(), nullptr, nullptr, SOCK_CLOEXEC));
    REQUIRE(connection);
    return connection;
  }

  std::string port_text() const { return std::to_string(port); }

  reactor::UniqueFd fd;
  std::uint16_t port = 0;
};

// Reads from `fd` until `size` bytes or EOF arrived (or kLimit passed); returns them.
std::string read_from(int fd, std::size_t size = std::string::npos) {
  const auto deadline = Clock::now() + kLimit;
  std::string received;
  while (received.size() < size) {
    if ((poll_one(fd, POLLIN, deadline) & (POLLIN | POLLHUP | POLLERR)) == 0) break;
    char chunk[65536];
    const ssize_t n = ::read(fd, chunk, std::min(sizeof chunk, size - received.size()));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    received.append(chunk, static_cast<std::size_t>(n));
  }
  return received;
}

bool send_all(int fd, std::string_view bytes) {
  while (!bytes.empty()) {
    const ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    bytes.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

// Echoes what arrives on `connection` as it comes, until the client's EOF; then closes it (which
// ends the client's run). On its own thread; the caller joins it.
void echo_until_eof(reactor::UniqueFd connection) {
  const auto deadline = Clock::now() + kLimit;
  for (;;) {
    if ((poll_one(connection.get(), POLLIN, deadline) & (POLLIN | POLLHUP | POLLERR)) == 0) return;
    char chunk[65536];
    const ssize_t n = ::read(connection.get(), chunk, sizeof chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0 || !send_all(connection.get(), std::string_view(chunk, static_cast<std::size_t>(n))))
      return;
  }
}

// Lines "line 0\n" .. "line N-1\n".
std::string numbered_lines(int count) {
  std::string text;
  for (int i = 0; i < count; ++i) text.append(join({"line ", std::to_string(i), "\n"}));
  return text;
}

}  // namespace

TEST_CASE("line_client sends stdin's lines and prints the echoes then exits 0 at EOF",
          "[line_client]") {
  const Listener listener;
  std::jthread server;  // joined after the client is gone (declared first, destroyed last)
  LineClient client({"--host", "localhost", "--port", listener.port_text()});
  server = std::jthread(echo_until_eof, listener.accept_one());
  // One line first, and its echo before the rest: lines go out as they are read.
  client.write_stdin("hello\n");
  REQUIRE(client.stdout_line() == "hello");
  const std::string rest = numbered_lines(500);
  client.write_stdin(rest);
  client.write_stdin("no newline at the end");
  client.close_stdin();
  const std::optional<std::string> out = client.stdout_to_eof();
  REQUIRE(out.has_value());
  CHECK(*out == rest + "no newline at the end");
  CHECK(client.stderr_to_eof() == "");
  CHECK(client.wait_exit() == 0);
}

TEST_CASE("line_client prints replies that arrive after its stdin ended", "[line_client]") {
  const Listener listener;
  LineClient client({"--host", "127.0.0.1", "--port", listener.port_text()});
  const reactor::UniqueFd connection = listener.accept_one();
  const std::string lines = numbered_lines(1000);  // about 9 KiB: the pipe takes it at once
  client.write_stdin(lines);
  client.close_stdin();
  // Everything, then the client's FIN (EOF), before the server answers anything.
  CHECK(read_from(connection.get()) == lines);
  REQUIRE(send_all(connection.get(), lines));
  REQUIRE(::shutdown(connection.get(), SHUT_WR) == 0);
  const std::optional<std::string> out = client.stdout_to_eof();
  REQUIRE(out.has_value());
  CHECK(*out == lines);
  CHECK(client.stderr_to_eof() == "");
  CHECK(client.wait_exit() == 0);
}

TEST_CASE("line_client reports a refused connect in one line and exits 1", "[line_client]") {
  // Bound and not listening: a SYN to it is answered with RST.
  std::uint16_t port = 0;
  reactor::UniqueFd bound(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  {
    const reactor::Endpoint any = reactor::Endpoint::parse("127.0.0.1:0");
    REQUIRE(::bind(bound.get(), any.data(), any.size()) == 0);
    sockaddr_storage address{};
    socklen_t length = sizeof address;
    REQUIRE(::getsockname(bound.get(), reinterpret_cast<sockaddr*>(&address), &length) == 0);
    port = reactor::Endpoint::from_sockaddr(reinterpret_cast<sockaddr*>(&address), length).port();
  }
  LineClient client({"--host", "127.0.0.1", "--port", std::to_string(port)});
  // Stdin stays open: the failure alone ends the client.
  CHECK(client.stderr_to_eof() == join({"line_client: connect to 127.0.0.1:", std::to_string(port),
                                        ": Connection refused\n"}));
  CHECK(client.stdout_to_eof() == "");
  CHECK(client.wait_exit() == 1);
}

TEST_CASE("line_client gives up after --connect-timeout when SYNs go unanswered", "[line_client]") {
  // A full accept queue (backlog 0, one connection queued): the kernel drops every further SYN.
  const Listener listener(0);
  const reactor::UniqueFd filler =
      connect_to(reactor::Endpoint::from_host_port("127.0.0.1", listener.port));
  REQUIRE((poll_one(listener.fd.get(), POLLIN, Clock::now() + kLimit) & POLLIN) != 0);
  const auto start = Clock::now();
  LineClient client(
      {"--host", "127.0.0.1", "--port", listener.port_text(), "--connect-timeout", "300"});
  const std::optional<std::string> err = client.stderr_to_eof();
  const auto elapsed = Clock::now() - start;
  CHECK(err == join({"line_client: connect to 127.0.0.1:", listener.port_text(),
                     ": Connection timed out\n"}));
  CHECK(elapsed >= 300ms);
  CHECK(elapsed < 5s);
  CHECK(client.wait_exit() == 1);
}

TEST_CASE("line_client with --reconnect connects again after the server drops it",
          "[line_client][reconnect]") {
  const Listener listener;
  LineClient client({"--host", "127.0.0.1", "--port", listener.port_text(), "--reconnect",
                     "--connect-timeout", "10000"});
  {
    const reactor::UniqueFd first = listener.accept_one();
    client.write_stdin("one\n");
    REQUIRE(read_from(first.get(), 4) == "one\n");
    REQUIRE(send_all(first.get(), "one\n"));
    REQUIRE(client.stdout_line() == "one");
  }  // the server drops the connection
  REQUIRE(client.stderr_line() == "line_client: connection lost: peer closed, reconnecting");
  // Written while the client is disconnected or reconnecting: kept, and sent once connected.
  client.write_stdin("two\n");
  const reactor::UniqueFd second = listener.accept_one();
  REQUIRE(read_from(second.get(), 4) == "two\n");
  REQUIRE(send_all(second.get(), "two\n"));
  REQUIRE(client.stdout_line() == "two");
  client.close_stdin();
  CHECK(read_from(second.get()).empty());  // the client's FIN, after nothing more
  REQUIRE(::shutdown(second.get(), SHUT_WR) == 0);
  CHECK(client.stdout_to_eof() == "");
  CHECK(client.stderr_to_eof() == "");
  CHECK(client.wait_exit() == 0);
}

TEST_CASE("line_client without --reconnect exits 1 when the server drops it", "[line_client]") {
  const Listener listener;
  LineClient client({"--host", "127.0.0.1", "--port", listener.port_text()});
  {
    const reactor::UniqueFd connection = listener.accept_one();
    client.write_stdin("one\n");
    REQUIRE(read_from(connection.get(), 4) == "one\n");
  }
  CHECK(client.stderr_to_eof() == "line_client: connection lost: peer closed\n");
  CHECK(client.stdout_to_eof() == "");
  CHECK(client.wait_exit() == 1);
}

TEST_CASE("line_client rejects bad usage with exit status 2", "[line_client][usage]") {
  const std::vector<std::vector<std::string>> bad = {
      {},
      {"--host", "127.0.0.1"},
      {"--port", "80"},
      {"--host", "127.0.0.1", "--port", "0"},
      {"--host", "127.0.0.1", "--port", "65536"},
      {"--host", "127.0.0.1", "--port", "x"},
      {"--host", "127.0.0.1", "--port", "80", "--connect-timeout", "0"},
      {"--host", "127.0.0.1", "--port", "80", "--connect-timeout", "abc"},
      {"--host", "127.0.0.1", "--port", "80", "--bogus"},
  };
  for (const auto& args : bad) {
    LineClient client(args);
    const std::optional<std::string> err = client.stderr_to_eof();
    INFO("stderr: " << err.value_or("(none)"));
    CHECK(err == "usage: line_client --host H --port N [--connect-timeout MS] [--reconnect]\n");
    CHECK(client.wait_exit() == 2);
  }
}
