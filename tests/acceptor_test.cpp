// Tests for include/reactor/acceptor.hpp and socket.hpp: listening on IPv4, IPv6 and Unix
// sockets, ephemeral ports, setup errors, and an acceptor destroyed from inside a callback.
#include <reactor/acceptor.hpp>

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <vector>

#include <reactor/socket.hpp>

#include "catch.hpp"
#include "loopback.hpp"

namespace {

using namespace std::chrono_literals;
using Loop = reactor::Reactor<>;

struct Echo {
  int* opens;
  void on_open(auto& /*connection*/) { ++*opens; }
  void on_data(auto& connection, std::string_view bytes) { connection.send(bytes); }
};

// Connects a client to `acceptor` and checks that `text` comes back.
template <class A>
void check_round_trip(Loop& loop, A& acceptor, const std::string& text) {
  test::Peer peer(reactor::connect(acceptor.local_endpoint()));
  peer.to_send = text;
  REQUIRE(test::run_until(loop, [&] {
    peer.step();
    return peer.received.size() >= text.size() || peer.error != 0;
  }));
  CHECK(peer.received == text);
}

}  // namespace

TEST_CASE("an IPv4 acceptor on port 0 reports its ephemeral port and echoes", "[acceptor]") {
  Loop loop;
  int opens = 0;
  reactor::Acceptor acceptor(loop, reactor::Endpoint::parse("127.0.0.1:0"), Echo{&opens});
  CHECK(acceptor.is_open());
  CHECK(acceptor.local_endpoint().family() == AF_INET);
  CHECK(acceptor.local_endpoint().port() != 0);
  check_round_trip(loop, acceptor, "over IPv4");
  CHECK(opens == 1);
  CHECK(acceptor.accepted_count() == 1);
}

TEST_CASE("an IPv6 acceptor listens on [::1]", "[acceptor][ipv6]") {
  Loop loop;
  int opens = 0;
  std::error_code ec;
  reactor::Acceptor acceptor(loop, reactor::Endpoint::parse("[::1]:0"), Echo{&opens}, {}, ec);
  if (ec == std::errc::address_not_available || ec == std::errc::address_family_not_supported) {
    WARN("no IPv6 loopback on this machine: " << ec.message());
    return;
  }
  REQUIRE_FALSE(ec);
  CHECK(acceptor.local_endpoint().to_string().starts_with("[::1]:"));
  check_round_trip(loop, acceptor, "over IPv6");
  CHECK(opens == 1);
}

TEST_CASE("a Unix socket acceptor serves a path and removes it when closed", "[acceptor][unix]") {
  const auto directory =
      std::filesystem::temp_directory_path() / ("reactor-test-" + std::to_string(::getpid()));
  std::filesystem::create_directories(directory);
  const std::string path = (directory / "echo.sock").string();
  Loop loop;
  int opens = 0;
  {
    reactor::Acceptor acceptor(loop, reactor::Endpoint::unix_path(path), Echo{&opens});
    CHECK(acceptor.local_endpoint().to_string() == "unix:" + path);
    CHECK(std::filesystem::is_socket(path));
    check_round_trip(loop, acceptor, test::pattern(100'000));
    CHECK(opens == 1);
  }
  CHECK_FALSE(std::filesystem::exists(path));
  std::filesystem::remove_all(directory);
}

TEST_CASE("an abstract Unix socket needs no file", "[acceptor][unix]") {
  Loop loop;
  int opens = 0;
  const std::string name = "@reactor-test-" + std::to_string(::getpid());
  reactor::Acceptor acceptor(loop, reactor::Endpoint::unix_path(name), Echo{&opens});
  CHECK(acceptor.local_endpoint().to_string() == "unix:" + name);
  check_round_trip(loop, acceptor, "abstract");
}

TEST_CASE("binding an address in use fails naming bind", "[acceptor][errors]") {
  Loop loop;
  int opens = 0;
  reactor::ListenOptions exclusive;
  exclusive.reuse_address = false;
  reactor::Acceptor first(loop, reactor::Endpoint::parse("127.0.0.1:0"), Echo{&opens}, exclusive);
  const std::size_t fds_before = test::open_fd_count();
  try {
    reactor::Acceptor second(loop, first.local_endpoint(), Echo{&opens}, exclusive);
    FAIL("no exception");
  } catch (const std::system_error& e) {
    CHECK(e.code() == std::errc::address_in_use);
    CHECK(std::string(e.what()).find("bind") != std::string::npos);
  }
  std::error_code ec;
  reactor::Acceptor third(loop, first.local_endpoint(), Echo{&opens}, exclusive, ec);
  CHECK(ec == std::errc::address_in_use);
  CHECK_FALSE(third.is_open());
  CHECK(test::open_fd_count() == fds_before);  // the failed sockets were closed
}

TEST_CASE("connecting to a port nobody listens on reports connection_refused",
          "[acceptor][errors]") {
  reactor::Endpoint closed;
  {
    Loop loop;
    int opens = 0;
    reactor::Acceptor probe(loop, reactor::Endpoint::parse("127.0.0.1:0"), Echo{&opens});
    closed = probe.local_endpoint();
  }
  std::error_code ec;
  const reactor::UniqueFd socket = reactor::connect(closed, ec);
  CHECK_FALSE(socket);
  CHECK(ec == std::errc::connection_refused);
  CHECK_THROWS_AS(reactor::connect(closed), std::system_error);
}

namespace {

struct SelfDestruct;
using SelfDestructAcceptor = reactor::Acceptor<SelfDestruct, Loop>;

// The first connection's on_open destroys the acceptor that is accepting it; it then echoes.
struct SelfDestruct {
  std::unique_ptr<SelfDestructAcceptor>* acceptor;
  int* opens;
  std::uint16_t* accepted_port;
  void on_open(auto& connection) {
    ++*opens;
    *accepted_port = connection.remote_endpoint().port();
    acceptor->reset();
  }
  void on_data(auto& connection, std::string_view bytes) { connection.send(bytes); }
};

std::uint16_t local_port(int fd) {
  sockaddr_storage address{};
  socklen_t length = sizeof address;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
  return reactor::Endpoint::from_sockaddr(reinterpret_cast<sockaddr*>(&address), length).port();
}

}  // namespace

TEST_CASE("an acceptor destroyed inside on_open stops accepting without touching freed memory",
          "[acceptor][lifetime]") {
  int opens = 0;
  std::uint16_t accepted_port = 0;
  Loop loop;
  std::unique_ptr<SelfDestructAcceptor> acceptor;
  acceptor =
      std::make_unique<SelfDestructAcceptor>(loop, reactor::Endpoint::parse("127.0.0.1:0"),
                                             SelfDestruct{&acceptor, &opens, &accepted_port});
  const reactor::Endpoint endpoint = acceptor->local_endpoint();
  std::vector<reactor::UniqueFd> clients;
  for (int i = 0; i < 3; ++i) clients.push_back(reactor::connect(endpoint));
  REQUIRE(test::run_until(loop, [&] { return acceptor == nullptr; }));
  REQUIRE(opens == 1);
  // The two clients still in the backlog were reset when the listening socket closed (Linux
  // resets what is left in the accept queue: inet_csk_listen_stop), so nothing can accept them
  // later. The accepted one is served: its echo, after the acceptor is gone, shows that the loop
  // has run on and still opened nothing else.
  int resets = 0;
  std::string echoed;
  for (const auto& client : clients) {
    if (local_port(client.get()) == accepted_port) {
      REQUIRE(::send(client.get(), "m", 1, MSG_NOSIGNAL) == 1);
      REQUIRE(test::run_until(loop, [&] {
        char byte;
        if (::read(client.get(), &byte, 1) == 1) echoed += byte;
        return !echoed.empty();
      }));
      continue;
    }
    pollfd waiting{client.get(), POLLIN, 0};
    REQUIRE(::poll(&waiting, 1, 5000) == 1);
    char byte;
    const ssize_t n = ::read(client.get(), &byte, 1);
    CHECK(n == -1);
    if (n == -1 && errno == ECONNRESET) ++resets;
  }
  CHECK(echoed == "m");
  CHECK(resets == 2);
  CHECK(opens == 1);
  CHECK(loop.connection_count() == 1);
}

namespace {

struct Probe {
  int* nodelay;
  void on_open(auto& connection) {
    socklen_t length = sizeof *nodelay;
    ::getsockopt(connection.native_handle(), IPPROTO_TCP, TCP_NODELAY, nodelay, &length);
  }
  void on_data(auto& /*connection*/, std::string_view /*bytes*/) {}
};

}  // namespace

TEST_CASE("accepted TCP connections have TCP_NODELAY set", "[acceptor]") {
  Loop loop;
  int nodelay = -1;
  reactor::Acceptor acceptor(loop, reactor::Endpoint::parse("127.0.0.1:0"), Probe{&nodelay});
  const reactor::UniqueFd client = reactor::connect(acceptor.local_endpoint());
  REQUIRE(test::run_until(loop, [&] { return nodelay != -1; }));
  CHECK(nodelay == 1);
}
