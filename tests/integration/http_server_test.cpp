// Integration tests for examples/http_server.cpp: each test runs the real binary as a child
// process (HTTP_SERVER_PATH, set by tests/CMakeLists.txt) and talks HTTP/1.1 to it over loopback
// TCP with plain non-blocking sockets and poll(), checking the exact bytes of every response.
//
// Waits are bounded by generous limits that only stop a broken test from hanging; none decides a
// result by timing. The child is always killed and reaped when a test ends (ServerProcess).
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "catch.hpp"
#include "loopback.hpp"
#include "server_process.hpp"

#ifndef HTTP_SERVER_PATH
// tests/CMakeLists.txt defines it through reactor_add_test(... PROGRAMS http_server).
#error "HTTP_SERVER_PATH must name the http_server binary"
#endif

// ServerProcess, listening_endpoint(), connect_to(), poll_one(), eventually(), tcp_queues(),
// kLimit and Clock; pattern() from loopback.hpp.
using namespace test;

namespace {

constexpr std::string_view kPlaintextResponse =
    "HTTP/1.1 200 OK\r\nServer: reactor\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\n"
    "Hello, World!";
constexpr std::string_view kJsonResponse =
    "HTTP/1.1 200 OK\r\nServer: reactor\r\nContent-Type: application/json\r\n"
    "Content-Length: 27\r\n\r\n{\"message\":\"Hello, World!\"}";

std::string get(std::string_view target, std::string_view more_headers = "") {
  return "GET " + std::string(target) + " HTTP/1.1\r\nHost: test\r\n" + std::string(more_headers) +
         "\r\n";
}

std::string post_echo(std::string_view body) {
  return "POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: " + std::to_string(body.size()) +
         "\r\n\r\n" + std::string(body);
}

std::string echo_response(std::string_view body) {
  return "HTTP/1.1 200 OK\r\nServer: reactor\r\nContent-Type: application/octet-stream\r\n"
         "Content-Length: " +
         std::to_string(body.size()) + "\r\n\r\n" + std::string(body);
}

// The response to bad input: the status as a text body, then the connection closes.
std::string error_response(std::string_view status) {
  return "HTTP/1.1 " + std::string(status) +
         "\r\nServer: reactor\r\nContent-Type: text/plain\r\nContent-Length: " +
         std::to_string(status.size()) + "\r\nConnection: close\r\n\r\n" + std::string(status);
}

// http_server started with `args`, and where it listens.
struct Server {
  explicit Server(std::vector<std::string> args = {})
      : process(HTTP_SERVER_PATH, args),
        endpoint(listening_endpoint(process, "listening on 127.0.0.1:")) {}

  ServerProcess process;
  reactor::Endpoint endpoint;
};

// A connected client socket with Nagle off, so each small send leaves at once.
reactor::UniqueFd connect_client(const reactor::Endpoint& endpoint) {
  reactor::UniqueFd fd = connect_to(endpoint);
  const int on = 1;
  REQUIRE(::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &on, sizeof on) == 0);
  return fd;
}

void send_all(int fd, std::string_view data) {
  REQUIRE(send_without_reading(fd, data, kLimit) == data.size());
}

// Reads until `size` bytes came, or EOF, an error or kLimit; returns what came.
std::string read_bytes(int fd, std::size_t size) {
  std::string received;
  const auto deadline = Clock::now() + kLimit;
  while (received.size() < size && poll_one(fd, POLLIN, deadline) != 0) {
    char buffer[65536];
    const ssize_t n = ::read(fd, buffer, std::min(sizeof buffer, size - received.size()));
    if (n > 0) {
      received.append(buffer, static_cast<std::size_t>(n));
    } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
      break;
    }
  }
  return received;
}

// Everything until the server's EOF; nullopt on a reset or after kLimit without EOF.
std::optional<std::string> read_to_eof(int fd) {
  std::string received;
  const auto deadline = Clock::now() + kLimit;
  while (poll_one(fd, POLLIN, deadline) != 0) {
    char buffer[65536];
    const ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n > 0) {
      received.append(buffer, static_cast<std::size_t>(n));
    } else if (n == 0) {
      return received;
    } else if (errno != EAGAIN && errno != EINTR) {
      return std::nullopt;
    }
  }
  return std::nullopt;
}

// Whether bytes (or EOF) are waiting to be read, without waiting.
bool readable_now(int fd) {
  return (poll_one(fd, POLLIN, Clock::now()) & POLLIN) != 0;
}

// 16 requests and their responses, in order: plaintext, json and echo (with its index) in turn.
std::pair<std::string, std::string> pipelined_batch() {
  std::string requests;
  std::string responses;
  for (int i = 0; i < 16; ++i) {
    if (i % 3 == 0) {
      requests += get("/plaintext");
      responses += kPlaintextResponse;
    } else if (i % 3 == 1) {
      requests += get("/json?i=" + std::to_string(i));
      responses += kJsonResponse;
    } else {
      const std::string body = "request " + std::to_string(i);
      requests += post_echo(body);
      responses += echo_response(body);
    }
  }
  return {requests, responses};
}

std::vector<std::string> mode_args(const std::string& mode) {
  if (mode.empty()) return {};
  return {mode};
}

}  // namespace

TEST_CASE("GET /plaintext and /json get their exact responses on one connection", "[http_server]") {
  Server server;
  reactor::UniqueFd client = connect_client(server.endpoint);
  send_all(client.get(), get("/plaintext"));
  CHECK(read_bytes(client.get(), kPlaintextResponse.size()) == kPlaintextResponse);
  send_all(client.get(), get("/json"));
  CHECK(read_bytes(client.get(), kJsonResponse.size()) == kJsonResponse);
  CHECK_FALSE(readable_now(client.get()));  // nothing more, and still open
  client.reset();
  stop_and_check_exit(server.process);
}

TEST_CASE("16 pipelined requests in one write get 16 responses in order", "[http_server]") {
  const std::string mode = GENERATE(as<std::string>(), "", "--edge");
  INFO("mode: " << (mode.empty() ? "level-triggered" : mode));
  Server server(mode_args(mode));
  const auto [requests, responses] = pipelined_batch();
  reactor::UniqueFd client = connect_client(server.endpoint);
  REQUIRE(::send(client.get(), requests.data(), requests.size(), MSG_NOSIGNAL) ==
          static_cast<ssize_t>(requests.size()));
  const std::string received = read_bytes(client.get(), responses.size());
  CHECK(first_difference(received, responses) == std::string_view::npos);
  CHECK_FALSE(readable_now(client.get()));
  client.reset();
  stop_and_check_exit(server.process);
}

TEST_CASE("a request sent byte by byte is answered once its last byte arrives", "[http_server]") {
  const std::string mode = GENERATE(as<std::string>(), "", "--edge");
  INFO("mode: " << (mode.empty() ? "level-triggered" : mode));
  Server server(mode_args(mode));
  reactor::UniqueFd client = connect_client(server.endpoint);
  const unsigned client_port = local_port_of(client.get());
  const std::string request = post_echo("abc");
  for (std::size_t i = 0; i < request.size(); ++i) {
    send_all(client.get(), request.substr(i, 1));
    if (i + 1 == request.size()) break;
    // The server has read this byte (its receive queue is empty) and answered nothing yet.
    INFO("byte " << i);
    REQUIRE(eventually([&] {
      const auto queues = tcp_queues(server.endpoint.port(), client_port);
      return queues && queues->second == 0;
    }));
    REQUIRE_FALSE(readable_now(client.get()));
  }
  CHECK(read_bytes(client.get(), echo_response("abc").size()) == echo_response("abc"));
  client.reset();
  stop_and_check_exit(server.process);
}

TEST_CASE("POST /echo with a 100 KiB body gets the body back", "[http_server]") {
  Server server;
  reactor::UniqueFd client = connect_client(server.endpoint);
  const std::string body = pattern(100 * 1024, 7);
  send_all(client.get(), post_echo(body));
  const std::string expected = echo_response(body);
  const std::string received = read_bytes(client.get(), expected.size());
  CHECK(received.size() == expected.size());
  CHECK(first_difference(received, expected) == std::string_view::npos);
  client.reset();
  stop_and_check_exit(server.process);
}

TEST_CASE("Connection close gets the response and then EOF", "[http_server]") {
  Server server;
  reactor::UniqueFd client = connect_client(server.endpoint);
  // The request after the one that says close is never answered.
  send_all(client.get(), get("/plaintext", "Connection: close\r\n") + get("/json"));
  const std::optional<std::string> received = read_to_eof(client.get());
  REQUIRE(received.has_value());
  CHECK(*received ==
        "HTTP/1.1 200 OK\r\nServer: reactor\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
        "Connection: close\r\n\r\nHello, World!");
  client.reset();  // the server lingers for our FIN
  stop_and_check_exit(server.process);
}

TEST_CASE("HTTP/1.0 closes unless the client asks for keep-alive", "[http_server]") {
  Server server;
  {
    reactor::UniqueFd client = connect_client(server.endpoint);
    send_all(client.get(), "GET /plaintext HTTP/1.0\r\n\r\n");
    const std::optional<std::string> received = read_to_eof(client.get());
    REQUIRE(received.has_value());
    CHECK(*received ==
          "HTTP/1.1 200 OK\r\nServer: reactor\r\nContent-Type: text/plain\r\n"
          "Content-Length: 13\r\nConnection: close\r\n\r\nHello, World!");
  }
  reactor::UniqueFd client = connect_client(server.endpoint);
  const std::string keep_alive_response =
      "HTTP/1.1 200 OK\r\nServer: reactor\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
      "Connection: keep-alive\r\n\r\nHello, World!";
  for (int i = 0; i < 2; ++i) {
    send_all(client.get(), "GET /plaintext HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    CHECK(read_bytes(client.get(), keep_alive_response.size()) == keep_alive_response);
  }
  CHECK_FALSE(readable_now(client.get()));
  client.reset();
  stop_and_check_exit(server.process);
}

TEST_CASE("unknown paths get 404 and other methods 405 with Allow on a kept connection",
          "[http_server]") {
  Server server;
  reactor::UniqueFd client = connect_client(server.endpoint);
  const std::string expected =
      "HTTP/1.1 404 Not Found\r\nServer: reactor\r\nContent-Type: text/plain\r\n"
      "Content-Length: 13\r\n\r\n404 Not Found"
      "HTTP/1.1 405 Method Not Allowed\r\nServer: reactor\r\nAllow: GET\r\n"
      "Content-Type: text/plain\r\nContent-Length: 22\r\n\r\n405 Method Not Allowed"
      "HTTP/1.1 405 Method Not Allowed\r\nServer: reactor\r\nAllow: POST\r\n"
      "Content-Type: text/plain\r\nContent-Length: 22\r\n\r\n405 Method Not Allowed" +
      std::string(kPlaintextResponse);
  send_all(client.get(), get("/missing") + "POST /json HTTP/1.1\r\nHost: t\r\n\r\n" + get("/echo") +
                             get("/plaintext"));
  CHECK(read_bytes(client.get(), expected.size()) == expected);
  CHECK_FALSE(readable_now(client.get()));
  client.reset();
  stop_and_check_exit(server.process);
}

TEST_CASE("bad input gets its error status and then EOF", "[http_server][errors]") {
  struct Case {
    std::string request;
    std::string status;
  };
  const std::vector<Case> cases = {
      {"GET /plaintext\r\nHost: t\r\n\r\n", "400 Bad Request"},
      {"GET /plaintext HTTP/1.1\nHost: t\n\n", "400 Bad Request"},
      {"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
       "400 Bad Request"},
      {"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1048577\r\n\r\n",
       "413 Content Too Large"},
      {"GET /plaintext HTTP/1.1\r\nHost: t\r\nX: " + std::string(9000, 'a') + "\r\n\r\n",
       "431 Request Header Fields Too Large"},
      {"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
       "501 Not Implemented"},
      {"GET /plaintext HTTP/2.0\r\nHost: t\r\n\r\n", "505 HTTP Version Not Supported"},
  };
  Server server;
  for (const Case& c : cases) {
    INFO("expecting " << c.status);
    reactor::UniqueFd client = connect_client(server.endpoint);
    // A good request before the bad one is answered; the one after it is not.
    send_all(client.get(), get("/plaintext") + c.request + get("/json"));
    const std::optional<std::string> received = read_to_eof(client.get());
    REQUIRE(received.has_value());
    CHECK(*received == std::string(kPlaintextResponse) + error_response(c.status));
  }
  stop_and_check_exit(server.process);
}

TEST_CASE("SIGTERM with a pipelined batch in flight delivers every response and exits 0",
          "[http_server][shutdown]") {
  const std::string mode = GENERATE(as<std::string>(), "", "--edge");
  INFO("mode: " << (mode.empty() ? "level-triggered" : mode));
  Server server(mode_args(mode));
  const reactor::UniqueFd idle = connect_client(server.endpoint);
  const reactor::UniqueFd busy = connect_client(server.endpoint);
  // Both connections are open on the server's side once each had a response.
  for (const int fd : {idle.get(), busy.get()}) {
    send_all(fd, get("/plaintext"));
    REQUIRE(read_bytes(fd, kPlaintextResponse.size()) == kPlaintextResponse);
  }
  const auto [requests, responses] = pipelined_batch();
  send_all(busy.get(), requests);
  server.process.signal(SIGTERM);
  const std::optional<std::string> received = read_to_eof(busy.get());
  REQUIRE(received.has_value());
  CHECK(first_difference(*received, responses) == std::string_view::npos);
  const std::optional<std::string> idle_received = read_to_eof(idle.get());
  REQUIRE(idle_received.has_value());
  CHECK(idle_received->empty());
  // Our FINs end the server's wait for them (it lingers after closing).
  ::shutdown(busy.get(), SHUT_WR);
  ::shutdown(idle.get(), SHUT_WR);
  const std::optional<int> status = server.process.wait_exit();
  REQUIRE(status.has_value());
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
}

TEST_CASE("a bad command line exits 2 with a usage line", "[http_server][usage]") {
  const std::vector<std::vector<std::string>> command_lines = {
      {"--port", "70000"}, {"--port", "x"}, {"--port", "-1"}, {"--port", "80x"},
      {"--port"},          {"--host"},      {"--bogus"},      {"extra"}};
  for (const auto& args : command_lines) {
    INFO("args: " << args.front() << (args.size() > 1 ? " " + args[1] : ""));
    ServerProcess server(HTTP_SERVER_PATH, args, 0, StderrMode::kCapture);
    const std::optional<std::string> out = server.read_to_eof();
    REQUIRE(out.has_value());
    CHECK(out->empty());
    const std::optional<std::string> err = server.read_stderr_to_eof();
    REQUIRE(err.has_value());
    CHECK(err->find("usage: ") != std::string::npos);
    CHECK(err->find("[--host ADDR] [--port N] [--edge]\n") != std::string::npos);
    const std::optional<int> status = server.wait_exit();
    REQUIRE(status.has_value());
    CHECK(WIFEXITED(*status));
    CHECK(WEXITSTATUS(*status) == 2);
  }
}
