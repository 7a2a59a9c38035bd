// Integration tests for examples/echo_load.cpp's connect phase: the real binary (ECHO_LOAD_PATH)
// runs as a child process against a child echo_server (ECHO_SERVER_PATH), or against sockets the
// test holds itself: a port that refuses (bound, not listening), a listener whose accept queue is
// full (so the kernel drops new SYNs and a connect can only time out), and a name that does not
// resolve. Each case asserts the exit status, the exact stderr line(s) and the summary line.
//
// Waits are bounded by generous limits; the two time bounds asserted (a refusal reported within
// 2 s, a timeout no sooner than --connect-timeout and within 5 s) are far from what is expected.
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "server_process.hpp"

#ifndef ECHO_LOAD_PATH
#error "ECHO_LOAD_PATH must name the echo_load binary (tests/CMakeLists.txt, PROGRAMS echo_load)"
#endif
#ifndef ECHO_SERVER_PATH
#error "ECHO_SERVER_PATH must name the echo_server binary (tests/CMakeLists.txt)"
#endif

using namespace test;

namespace {

// What one echo_load run left behind.
struct Outcome {
  int exit_status = -1;  // -1: killed by a signal
  std::string out;
  std::string err;
  Clock::duration elapsed{};  // from start to exit
};

// Runs echo_load with `args` to completion (at most `limit`), capturing stdout and stderr.
Outcome run_echo_load(const std::vector<std::string>& args, Clock::duration limit = 60s) {
  const auto start = Clock::now();
  ServerProcess process(ECHO_LOAD_PATH, args, 0, StderrMode::kCapture);
  Outcome outcome;
  const std::optional<std::string> out = process.read_to_eof(limit);
  REQUIRE(out.has_value());
  outcome.out = *out;
  const std::optional<std::string> err = process.read_stderr_to_eof();
  REQUIRE(err.has_value());
  outcome.err = *err;
  const std::optional<int> status = process.wait_exit();
  REQUIRE(status.has_value());
  outcome.elapsed = Clock::now() - start;
  if (WIFEXITED(*status)) outcome.exit_status = WEXITSTATUS(*status);
  return outcome;
}

std::size_t count_lines(std::string_view text) {
  return static_cast<std::size_t>(std::count(text.begin(), text.end(), '\n'));
}

// The parts joined. (Appending, not `"text" + std::to_string(n) + ...`: GCC 12 reports a false
// -Wrestrict on that in Release builds.)
std::string join(std::initializer_list<std::string_view> parts) {
  std::string text;
  for (const std::string_view part : parts) text.append(part);
  return text;
}

bool contains(std::string_view text, std::string_view part) {
  return text.find(part) != std::string_view::npos;
}

// The run's arguments, after --host/--port or --unix.
std::vector<std::string> load_args(std::vector<std::string> args, std::string_view conns = "4") {
  for (const char* word : {"--size", "64", "--seconds", "0.3", "--conns"}) args.emplace_back(word);
  args.emplace_back(conns);
  return args;
}

// A TCP socket bound to `host`, port 0 (an ephemeral port), listening with `backlog` unless that
// is negative; and its port.
std::pair<reactor::UniqueFd, std::uint16_t> bound_socket(std::string_view host, int backlog) {
  const reactor::Endpoint any = reactor::Endpoint::from_host_port(host, 0);
  reactor::UniqueFd fd(::socket(any.family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(fd);
  REQUIRE(::bind(fd.get(), any.data(), any.size()) == 0);
  if (backlog >= 0) REQUIRE(::listen(fd.get(), backlog) == 0);
  sockaddr_storage bound{};
  socklen_t length = sizeof bound;
  REQUIRE(::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&bound), &length) == 0);
  const std::uint16_t port =
      reactor::Endpoint::from_sockaddr(reinterpret_cast<sockaddr*>(&bound), length).port();
  REQUIRE(port != 0);
  return {std::move(fd), port};
}

// A port on `host` that refuses connections for as long as the returned socket lives: bound, not
// listening, so a SYN to it is answered with RST.
std::pair<reactor::UniqueFd, std::uint16_t> refusing_port(std::string_view host) {
  return bound_socket(host, -1);
}

// A listener on 127.0.0.1 with a backlog of 0 whose accept queue already holds one connection
// that nobody accepts: the queue is full (Linux: more than `backlog` queued), so the kernel drops
// every further SYN (tcp_conn_request, LINUX_MIB_LISTENOVERFLOWS) and a connect can only time out.
struct FullListener {
  FullListener() {
    std::tie(listener, port) = bound_socket("127.0.0.1", 0);
    filler = connect_to(reactor::Endpoint::from_host_port("127.0.0.1", port));
    // The filler is in the accept queue once the listener is readable.
    REQUIRE((poll_one(listener.get(), POLLIN, Clock::now() + kLimit) & POLLIN) != 0);
  }

  reactor::UniqueFd listener;
  std::uint16_t port = 0;
  reactor::UniqueFd filler;
};

// Starts echo_server with `args` and returns it with the endpoint it printed.
std::pair<std::unique_ptr<ServerProcess>, reactor::Endpoint> start_echo_server(
    const std::vector<std::string>& args, std::string_view expected_prefix) {
  auto server = std::make_unique<ServerProcess>(ECHO_SERVER_PATH, args);
  const reactor::Endpoint endpoint = listening_endpoint(*server, expected_prefix);
  return {std::move(server), endpoint};
}

// Asserts a clean run of `conns` connections: exit 0, nothing on stderr, and a summary naming them.
void check_clean_run(const Outcome& run, std::string_view conns) {
  INFO("stdout: " << run.out << "stderr: " << run.err);
  CHECK(run.exit_status == 0);
  CHECK(run.err.empty());
  REQUIRE(contains(run.out, "summary: "));
  CHECK(contains(run.out, join({", ", conns, " connections, 0 errors, 0 mismatches\n"})));
}

}  // namespace

TEST_CASE("echo_load resolves --host localhost and runs against echo_server",
          "[echo_load][connect]") {
  auto [server, endpoint] = start_echo_server({"--port", "0"}, "listening on 127.0.0.1:");
  const Outcome run = run_echo_load(
      load_args({"--host", "localhost", "--port", std::to_string(endpoint.port())}, "8"));
  check_clean_run(run, "8");
  stop_and_check_exit(*server);
}

TEST_CASE("echo_load opens 500 connections at once and runs over all of them",
          "[echo_load][connect]") {
  auto [server, endpoint] = start_echo_server({"--port", "0"}, "listening on 127.0.0.1:");
  const Outcome run = run_echo_load(
      load_args({"--host", "127.0.0.1", "--port", std::to_string(endpoint.port())}, "500"));
  check_clean_run(run, "500");
  stop_and_check_exit(*server);
}

TEST_CASE("echo_load still connects to a Unix socket given with --unix", "[echo_load][connect]") {
  TempDir dir("echo_load_test");
  const std::string path = (dir.path() / "echo.sock").string();
  auto [server, endpoint] = start_echo_server({"--unix", path}, "listening on unix:");
  const Outcome run = run_echo_load(load_args({"--unix", path}, "50"));
  check_clean_run(run, "50");
  stop_and_check_exit(*server);
}

TEST_CASE("echo_load reports a refused port in one line and exits 1 without a run",
          "[echo_load][connect]") {
  const auto [fd, port] = refusing_port("127.0.0.1");
  const Outcome run =
      run_echo_load(load_args({"--host", "127.0.0.1", "--port", std::to_string(port)}, "20"));
  INFO("stdout: " << run.out << "stderr: " << run.err);
  CHECK(run.exit_status == 1);
  CHECK(run.elapsed < 2s);
  REQUIRE(count_lines(run.err) == 1);
  CHECK(run.err.rfind(
            join({"echo_load: connect to 127.0.0.1:", std::to_string(port), " (connection "}), 0) ==
        0);
  CHECK(contains(run.err, "): Connection refused\n"));
  // Only the first failure is reported, and no load ran: the summary counts that one error.
  CHECK(count_lines(run.out) == 1);
  CHECK(contains(run.out, "summary: 0 messages in 0.00 s"));
  CHECK(contains(run.out, " connections, 1 errors, 0 mismatches\n"));
}

TEST_CASE("echo_load names an IPv6 address in brackets when its connect fails",
          "[echo_load][connect]") {
  // A refusing port on ::1 where the machine has IPv6; otherwise any port: connecting to ::1 then
  // fails for want of the address, and the line names it all the same.
  std::error_code ec;
  reactor::UniqueFd probe(::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0));
  const reactor::Endpoint v6 = reactor::Endpoint::from_host_port("::1", 0, ec);
  const bool have_v6 = probe && !ec && ::bind(probe.get(), v6.data(), v6.size()) == 0;
  probe.reset();
  std::optional<std::pair<reactor::UniqueFd, std::uint16_t>> refusing;
  if (have_v6) refusing.emplace(refusing_port("::1"));
  const std::uint16_t port = have_v6 ? refusing->second : 9;
  const Outcome run = run_echo_load(load_args({"--host", "[::1]", "--port", std::to_string(port)}));
  INFO("stderr: " << run.err);
  CHECK(run.exit_status == 1);
  REQUIRE(count_lines(run.err) == 1);
  CHECK(run.err.rfind(join({"echo_load: connect to [::1]:", std::to_string(port), " (connection "}),
                      0) == 0);
  if (have_v6) CHECK(contains(run.err, "): Connection refused\n"));
}

TEST_CASE("echo_load gives up on unanswered SYNs after --connect-timeout", "[echo_load][connect]") {
  const FullListener full;
  const Outcome run = run_echo_load(load_args(
      {"--host", "127.0.0.1", "--port", std::to_string(full.port), "--connect-timeout", "300"}));
  INFO("stdout: " << run.out << "stderr: " << run.err);
  CHECK(run.exit_status == 1);
  CHECK(run.elapsed >= 300ms);
  CHECK(run.elapsed < 5s);
  REQUIRE(count_lines(run.err) == 1);
  CHECK(run.err.rfind(join({"echo_load: connect to 127.0.0.1:", std::to_string(full.port), " ("}),
                      0) == 0);
  CHECK(contains(run.err, "timed out"));
  CHECK(contains(run.out, " 0 connections, 1 errors, 0 mismatches\n"));
}

TEST_CASE("echo_load reports only the failure when some connections were made before it",
          "[echo_load][connect]") {
  // A listener that never accepts, with room for a few connections in its accept queue (backlog
  // 3): those connect, the kernel drops the SYNs of the others, which time out. The ones made are
  // closed at exit without a line of their own.
  const auto [listener, port] = bound_socket("127.0.0.1", 3);
  const Outcome run = run_echo_load(load_args(
      {"--host", "127.0.0.1", "--port", std::to_string(port), "--connect-timeout", "300"}, "20"));
  INFO("stdout: " << run.out << "stderr: " << run.err);
  CHECK(run.exit_status == 1);
  REQUIRE(count_lines(run.err) == 1);
  CHECK(contains(run.err, "timed out"));
  // How many the kernel let through (4 on Linux: backlog + 1) is its business; that some did, and
  // that the summary counts them, is the point.
  const std::size_t at = run.out.find(" connections, 1 errors, 0 mismatches\n");
  REQUIRE(at != std::string::npos);
  const std::size_t start = run.out.rfind(' ', at - 1) + 1;
  unsigned made = 0;
  const auto [end, error] = std::from_chars(run.out.data() + start, run.out.data() + at, made);
  REQUIRE(error == std::errc{});
  REQUIRE(end == run.out.data() + at);
  CHECK(made >= 1);
  CHECK(made < 20);
}

TEST_CASE("echo_load reports a host name that does not resolve", "[echo_load][connect]") {
  // .invalid never resolves (RFC 6761); without DNS the lookup fails or times out (3 s), and
  // either way the one line names the host.
  const Outcome run = run_echo_load(
      load_args({"--host", "nosuch.invalid", "--port", "9", "--connect-timeout", "3000"}));
  INFO("stdout: " << run.out << "stderr: " << run.err);
  CHECK(run.exit_status == 1);
  REQUIRE(count_lines(run.err) == 1);
  CHECK(run.err.rfind("echo_load: resolve nosuch.invalid: ", 0) == 0);
  CHECK(contains(run.out, "0 connections, 1 errors, 0 mismatches\n"));
}

TEST_CASE("echo_load rejects a bad --connect-timeout with usage and exit status 2",
          "[echo_load][usage]") {
  for (const char* bad : {"0", "abc", "-5", "", "1.5", "4294967296"}) {
    const Outcome run =
        run_echo_load(load_args({"--host", "127.0.0.1", "--port", "9", "--connect-timeout", bad}));
    INFO("value '" << bad << "', stderr: " << run.err);
    CHECK(run.exit_status == 2);
    CHECK(run.out.empty());
    CHECK(run.err.rfind(join({"echo_load: bad value for --connect-timeout: '", bad, "'\n"}), 0) ==
          0);
    CHECK(contains(run.err, "usage: "));
    CHECK(contains(run.err, "--connect-timeout MS"));
  }
  const Outcome run = run_echo_load(
      {"--port", "9", "--conns", "1", "--size", "1", "--seconds", "1", "--connect-timeout"});
  CHECK(run.exit_status == 2);
  CHECK(run.err.rfind("echo_load: --connect-timeout needs a value\n", 0) == 0);
}
