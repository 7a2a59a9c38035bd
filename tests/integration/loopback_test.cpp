// Loopback TCP integration tests: an Acceptor and many clients in one reactor, bulk transfers in
// both trigger modes, resets, and fd accounting.
#include <reactor.hpp>

#include <memory>
#include <vector>

#include "catch.hpp"
#include "loopback.hpp"

namespace {

using namespace std::chrono_literals;

struct Echo {
  int* closes;
  void on_data(auto& connection, std::string_view bytes) { connection.send(bytes); }
  void on_close(auto& /*connection*/, std::error_code /*reason*/) { ++*closes; }
};

}  // namespace

TEMPLATE_TEST_CASE("16 MiB round trip over loopback TCP arrives byte for byte",
                   "[integration][bulk]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  reactor::Reactor<TestType> loop;
  int closes = 0;
  reactor::Acceptor<Echo, decltype(loop)> acceptor(loop, reactor::Endpoint::parse("127.0.0.1:0"),
                                                   Echo{&closes});
  test::Peer peer(reactor::connect(acceptor.local_endpoint()));
  peer.to_send = test::pattern(16 << 20, 21);
  REQUIRE(test::run_until(loop, [&] {
    peer.step();
    if (peer.all_sent() && peer.sent != 0 && !peer.to_send.empty()) peer.shutdown_write();
    return peer.eof || peer.error != 0;
  }));
  CHECK(peer.error == 0);
  CHECK(peer.received.size() == peer.to_send.size());
  CHECK(peer.received == peer.to_send);
  REQUIRE(test::run_until(loop, [&] { return closes == 1; }));
  CHECK(loop.connection_count() == 0);
}

TEMPLATE_TEST_CASE("200 concurrent clients are each echoed their own bytes",
                   "[integration][concurrency]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  reactor::Reactor<TestType> loop;
  int closes = 0;
  reactor::Acceptor<Echo, decltype(loop)> acceptor(loop, reactor::Endpoint::parse("127.0.0.1:0"),
                                                   Echo{&closes});
  const std::size_t fds_before = test::open_fd_count();
  std::vector<std::unique_ptr<test::Peer>> peers;
  for (std::uint32_t i = 0; i < 200; ++i) {
    peers.push_back(std::make_unique<test::Peer>(reactor::connect(acceptor.local_endpoint())));
    peers.back()->to_send = test::pattern(32 * 1024, i + 100);
  }
  REQUIRE(test::run_until(loop, [&] {
    bool done = true;
    for (auto& peer : peers) {
      peer->step();
      done = done && peer->received.size() >= peer->to_send.size();
    }
    return done;
  }));
  for (auto& peer : peers) CHECK(peer->received == peer->to_send);
  peers.clear();
  REQUIRE(test::run_until(loop, [&] { return closes == 200; }));
  CHECK(loop.connection_count() == 0);
  CHECK(test::open_fd_count() == fds_before);
}

namespace {

struct Resetter {
  void on_data(auto& connection, std::string_view /*bytes*/) { connection.abort(true); }
};

}  // namespace

TEST_CASE("abort with reset sends RST: the peer reads ECONNRESET", "[integration][close]") {
  reactor::Reactor<> loop;
  reactor::Acceptor acceptor(loop, reactor::Endpoint::parse("127.0.0.1:0"), Resetter{});
  test::Peer peer(reactor::connect(acceptor.local_endpoint()));
  peer.to_send = "please reset me";
  REQUIRE(test::run_until(loop, [&] {
    peer.step();
    return peer.error != 0 || peer.eof;
  }));
  CHECK(peer.error == ECONNRESET);
  CHECK_FALSE(peer.eof);
}

namespace {

struct Recorder {
  std::error_code* reason;
  void on_data(auto& connection, std::string_view bytes) { connection.send(bytes); }
  void on_close(auto& /*connection*/, std::error_code error) { *reason = error; }
};

}  // namespace

TEST_CASE("a peer that resets mid-transfer closes the connection with its error",
          "[integration][errors]") {
  reactor::Reactor<> loop;
  std::error_code reason;
  reactor::Acceptor acceptor(loop, reactor::Endpoint::parse("127.0.0.1:0"), Recorder{&reason});
  const std::size_t fds_before = test::open_fd_count();
  {
    test::Peer peer(reactor::connect(acceptor.local_endpoint()));
    peer.to_send = test::pattern(4 << 20);
    peer.reading = false;
    REQUIRE(test::run_until(loop, [&] {
      peer.step();
      return loop.connection_count() == 1 && peer.sent > (1 << 20);
    }));
    const linger reset{1, 0};
    ::setsockopt(peer.fd.get(), SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
  }  // closing with unread data and linger 0 sends RST
  REQUIRE(test::run_until(loop, [&] { return loop.connection_count() == 0; }));
  CHECK((reason == std::errc::connection_reset || reason == std::errc::broken_pipe));
  CHECK(test::open_fd_count() == fds_before);
}
