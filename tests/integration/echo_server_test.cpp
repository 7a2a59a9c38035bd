// Integration tests for examples/echo_server.cpp: each test runs the real binary as a child
// process (ECHO_SERVER_PATH, set by tests/CMakeLists.txt) and talks to it over loopback TCP,
// IPv6 or a Unix socket, playing the client with plain non-blocking sockets and poll().
//
// Waits are bounded by generous limits that only stop a broken test from hanging; no result is
// decided by a sleep. The child is always killed and reaped when a test ends (ServerProcess).
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "catch.hpp"
#include "loopback.hpp"
#include "server_process.hpp"

#ifndef ECHO_SERVER_PATH
// tests/CMakeLists.txt defines it through reactor_add_test(... PROGRAMS echo_server).
#error "ECHO_SERVER_PATH must name the echo_server binary"
#endif

// ServerProcess, exchange(), eventually(), kLimit, Clock and the other child-process and socket
// helpers; the chrono literals come with them.
using namespace test;

namespace {

// Asserts that `result` holds exactly `data`, echoed in order.
void check_echoed(const Exchange& result, std::string_view data) {
  CHECK_FALSE(result.timed_out);
  CHECK(result.error == 0);
  CHECK(result.sent == data.size());
  CHECK(result.received.size() == data.size());
  CHECK(first_difference(result.received, data) == std::string_view::npos);
}

}  // namespace

// --- Tests ---------------------------------------------------------------------------------------

TEST_CASE("echo_server prints exactly one line naming its address and port",
          "[echo_server][integration]") {
  ServerProcess server(ECHO_SERVER_PATH, {});
  const std::optional<std::string> line = server.read_line();
  REQUIRE(line.has_value());
  INFO("server said: " << *line);
  const std::string_view prefix = "listening on 127.0.0.1:";
  REQUIRE(line->rfind(prefix, 0) == 0);
  CHECK(parse_port(std::string_view(*line).substr(prefix.size())) != 0);

  // Its whole life long, nothing else reaches stdout.
  server.signal(SIGTERM);
  const std::optional<std::string> rest = server.read_to_eof();
  REQUIRE(rest.has_value());
  CHECK(*rest == "");
  const std::optional<int> status = server.wait_exit();
  REQUIRE(status.has_value());
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
}

TEST_CASE("echo_server echoes 1 MiB byte for byte and in order",
          "[echo_server][integration][echo]") {
  ServerProcess server(ECHO_SERVER_PATH, {});
  const reactor::Endpoint endpoint = listening_endpoint(server, "listening on 127.0.0.1:");
  const reactor::UniqueFd client = connect_to(endpoint);
  const std::string data = test::pattern(kMiB, 11);
  check_echoed(exchange(client.get(), data), data);
  stop_and_check_exit(server);
}

TEST_CASE("echo_server flushes every echoed byte and then closes after the client half-closes",
          "[echo_server][integration][close]") {
  ServerProcess server(ECHO_SERVER_PATH, {});
  const reactor::Endpoint endpoint = listening_endpoint(server, "listening on 127.0.0.1:");
  const reactor::UniqueFd client = connect_to(endpoint);
  const std::string data = test::pattern(kMiB, 12);
  ExchangeOptions options;
  options.shutdown_after_sending = true;
  options.until_eof = true;
  const Exchange result = exchange(client.get(), data, options);
  check_echoed(result, data);
  CHECK(result.eof);
}

TEST_CASE("echo_server in edge-triggered mode echoes 1 MiB byte for byte and in order",
          "[echo_server][integration][echo][edge]") {
  ServerProcess server(ECHO_SERVER_PATH, {"--edge"});
  const reactor::Endpoint endpoint = listening_endpoint(server, "listening on 127.0.0.1:");
  const reactor::UniqueFd client = connect_to(endpoint);
  const std::string data = test::pattern(kMiB, 13);
  ExchangeOptions options;
  options.shutdown_after_sending = true;
  options.until_eof = true;
  const Exchange result = exchange(client.get(), data, options);
  check_echoed(result, data);
  CHECK(result.eof);
  stop_and_check_exit(server);
}

TEST_CASE("echo_server serves a Unix socket given with --unix and removes it on exit",
          "[echo_server][integration][unix]") {
  const TempDir dir("echo_server_test");
  const std::string path = (dir.path() / "echo.sock").string();
  ServerProcess server(ECHO_SERVER_PATH, {"--unix", path});
  const reactor::Endpoint endpoint = listening_endpoint(server, "listening on unix:" + path);
  CHECK(endpoint.is_unix());
  CHECK(endpoint.host() == path);
  const reactor::UniqueFd client = connect_to(endpoint);
  const std::string data = test::pattern(kMiB, 14);
  check_echoed(exchange(client.get(), data), data);
  stop_and_check_exit(server);
  CHECK_FALSE(std::filesystem::exists(path));
}

TEST_CASE("echo_server serves IPv6 loopback given with --host ::1",
          "[echo_server][integration][ipv6]") {
  ServerProcess server(ECHO_SERVER_PATH, {"--host", "::1"});
  const reactor::Endpoint endpoint = listening_endpoint(server, "listening on [::1]:");
  CHECK(endpoint.family() == AF_INET6);
  CHECK(endpoint.port() != 0);
  const reactor::UniqueFd client = connect_to(endpoint);
  const std::string data = test::pattern(kMiB, 15);
  check_echoed(exchange(client.get(), data), data);
  stop_and_check_exit(server);
}

TEST_CASE("on SIGTERM echo_server flushes echoed bytes the client has not read yet and exits 0",
          "[echo_server][integration][signal]") {
  // The client sends more than the kernel's socket buffers hold without reading any echo, under a
  // high watermark above that: the server reads everything and queues what the kernel refuses.
  const std::string data = test::pattern(16 * kMiB, 16);
  ServerProcess server(ECHO_SERVER_PATH, {"--high-water", std::to_string(4 * data.size())});
  const reactor::Endpoint endpoint = listening_endpoint(server, "listening on 127.0.0.1:");
  const reactor::UniqueFd client = connect_to(endpoint);
  REQUIRE(send_without_reading(client.get(), data, kLimit) == data.size());

  // Signal only once the server has read every byte: bytes still unread when it closes would
  // make the kernel reset the connection (RFC 1122 4.2.2.13) instead of delivering the echo.
  const unsigned server_port = endpoint.port();
  const unsigned client_port = local_port_of(client.get());
  unsigned long server_send_queue = 0;
  REQUIRE(eventually([&] {
    const auto queues = tcp_queues(server_port, client_port);
    if (queues.has_value()) server_send_queue = queues->first;
    return queues.has_value() && queues->second == 0;
  }));
  int unread = 0;
  REQUIRE(::ioctl(client.get(), FIONREAD, &unread) == 0);
  CHECK(unread > 0);
  // What neither the client's receive queue nor the server's send queue holds waits in the
  // server's own output queue: that is what SIGTERM must not drop.
  const std::size_t in_kernel = static_cast<std::size_t>(unread) + server_send_queue;
  INFO("client unread " << unread << ", server send queue " << server_send_queue);
  REQUIRE(in_kernel < data.size());

  server.signal(SIGTERM);
  ExchangeOptions options;
  options.already_sent = data.size();
  options.until_eof = true;
  const Exchange result = exchange(client.get(), data, options);
  check_echoed(result, data);
  CHECK(result.eof);

  const std::optional<int> status = server.wait_exit();
  REQUIRE(status.has_value());
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
}

TEST_CASE("echo_server keeps its memory bounded while a client sends 8 MiB without reading",
          "[echo_server][integration][backpressure]") {
  ServerProcess server(ECHO_SERVER_PATH, {"--high-water", "65536"});
  const reactor::Endpoint endpoint = listening_endpoint(server, "listening on 127.0.0.1:");
  const reactor::UniqueFd client = connect_to(endpoint);

  // Warm up first, so the baseline includes the read buffer and the output chunks in use.
  const std::string warm_up = test::pattern(256 * 1024, 17);
  check_echoed(exchange(client.get(), warm_up), warm_up);
  const std::size_t before = server.resident_bytes();
  REQUIRE(before > 0);

  // Send until the server stops taking bytes (its reading paused, every buffer full) or all is
  // sent, whichever comes first.
  const std::string data = test::pattern(8 * kMiB, 18);
  const std::size_t sent = send_without_reading(client.get(), data, 500ms);
  // The server may still be catching up on what the kernel buffered: watch its peak for 0.5 s.
  std::size_t peak = server.resident_bytes();
  const auto watch_end = Clock::now() + 500ms;
  while (Clock::now() < watch_end) {
    ::poll(nullptr, 0, 10);
    peak = std::max(peak, server.resident_bytes());
  }
  INFO("sent " << sent << " bytes before stalling; VmRSS " << before << " -> peak " << peak);
  CHECK(peak < before + 16 * kMiB);
  // Tighter, and what actually tells backpressure from none (the loose bound above cannot fail
  // with 8 MiB sent): the server's own buffers hold at most the high watermark plus one 64 KiB
  // read, plus up to 1 MiB of cached output chunks; the rest waits in kernel socket buffers, which
  // RSS does not count. A server without backpressure holds what the kernel could not take.
  CHECK(peak < before + 2 * kMiB);

  // Reading resumes the flow: every byte comes back, in order.
  ExchangeOptions options;
  options.already_sent = sent;
  check_echoed(exchange(client.get(), data, options), data);
  stop_and_check_exit(server);
}

TEST_CASE("echo_server out of fds waits without spinning and recovers when clients leave",
          "[echo_server][integration][fd_limit]") {
  constexpr rlim_t kFdLimit = 32;
  constexpr std::size_t kClients = 60;
  ServerProcess server(ECHO_SERVER_PATH, {}, kFdLimit);
  const reactor::Endpoint endpoint = listening_endpoint(server, "listening on 127.0.0.1:");

  // The kernel completes every handshake (the listen backlog is large), so all connects succeed;
  // the server accepts until it has no fd left and the rest wait in the backlog.
  std::vector<reactor::UniqueFd> clients;
  std::vector<std::string> messages;
  for (std::size_t i = 0; i < kClients; ++i) {
    clients.push_back(connect_to(endpoint));
    messages.push_back("client " + std::to_string(i) + "\n");
    REQUIRE(send_without_reading(clients.back().get(), messages.back(), kLimit) ==
            messages.back().size());
  }

  // The first clients were accepted before the fds ran out: they get their echo.
  for (std::size_t i = 0; i < 10; ++i) {
    INFO("client " << i);
    ExchangeOptions options;
    options.already_sent = messages[i].size();
    check_echoed(exchange(clients[i].get(), messages[i], options), messages[i]);
  }
  REQUIRE(eventually([&] { return server.open_fds() == kFdLimit; }));

  // At the limit, with clients waiting in the backlog, the server must not spin on accept.
  const auto cpu_before = server.cpu_time();
  ::poll(nullptr, 0, 1000);  // a measuring interval, not a synchronisation
  const auto cpu_used = server.cpu_time() - cpu_before;
  INFO("server CPU time over 1 s at the fd limit: " << cpu_used.count() << " s");
  CHECK(cpu_used.count() < 0.3);

  // Once the clients leave, fds come back and a new client is served again.
  clients.clear();
  const reactor::UniqueFd late = connect_to(endpoint);
  const std::string data = "after the limit\n";
  check_echoed(exchange(late.get(), data), data);
  stop_and_check_exit(server);
}
