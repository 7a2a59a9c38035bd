// Stress (label `stress`): many connections at once, connection churn, and an idle loop, over
// loopback TCP in both trigger modes. Each asserts bytes, counts and fds, never speed; the limits
// passed to run_until only stop a broken run from hanging. docs/reliability.md maps each test to
// the guarantee it proves.
#include <reactor.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "catch.hpp"
#include "loopback.hpp"
#include "stress.hpp"

namespace {

using namespace std::chrono_literals;

// What the server's connections saw, all of them together.
struct Tally {
  std::size_t opened = 0;
  std::size_t closed = 0;
  std::size_t errors = 0;      // on_close with a non-empty reason
  std::size_t late_calls = 0;  // on_data on a closed connection: must stay 0
  std::size_t bytes = 0;
  std::error_code last_error;
};

// Echoes; with close_after_reply, closes after the first reply (close() flushes, half-closes and
// lingers until the client's EOF).
struct Echo {
  Tally* tally;
  bool close_after_reply = false;

  void on_open(auto& /*connection*/) { ++tally->opened; }
  void on_data(auto& connection, std::string_view bytes) {
    if (!connection.is_open()) ++tally->late_calls;
    tally->bytes += bytes.size();
    connection.send(bytes);
    if (close_after_reply) connection.close();
  }
  void on_close(auto& /*connection*/, std::error_code reason) {
    ++tally->closed;
    if (reason) {
      ++tally->errors;
      tally->last_error = reason;
    }
  }
};

// Opens `count` client connections to `acceptor` into `peers` (empty), keeping at most 256 of
// them unaccepted so that the listen backlog never overflows (a dropped SYN costs a 1 s
// retransmit), and runs the loop until every one is accepted.
template <class Loop, class Acceptor>
bool connect_all(Loop& loop, const Acceptor& acceptor, std::vector<test::Peer>& peers,
                 std::size_t count) {
  peers.reserve(count);
  const std::uint64_t accepted_before = acceptor.accepted_count();
  return test::run_until(
      loop,
      [&] {
        const std::size_t accepted = acceptor.accepted_count() - accepted_before;
        while (peers.size() < count && peers.size() - accepted < 256) {
          peers.emplace_back(stress::connect_nonblocking(acceptor.local_endpoint()));
        }
        return accepted == count;
      },
      60s);
}

}  // namespace

TEMPLATE_TEST_CASE("5000 concurrent connections each echo 5 x 1 KiB and leave no fd behind",
                   "[stress][connections]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  constexpr std::size_t kClients = 5000;
  constexpr std::size_t kMessages = 5;
  constexpr std::size_t kMessage = 1024;
  INFO("RLIMIT_NOFILE soft limit: " << stress::fd_limit());
  REQUIRE(stress::raise_fd_limit(2 * kClients + 256));
  Tally tally;
  reactor::Reactor<TestType> loop;
  reactor::Acceptor<Echo, reactor::Reactor<TestType>> acceptor(loop, stress::loopback(),
                                                               Echo{&tally});
  stress::create_timer_fd(loop);
  const std::size_t fds_before = test::open_fd_count();

  std::vector<test::Peer> peers;
  REQUIRE(connect_all(loop, acceptor, peers, kClients));
  CHECK(loop.connection_count() == kClients);
  CHECK(tally.opened == kClients);

  // Every client at once: each sends its next message when the previous one has come back.
  std::vector<std::string> expected;
  expected.reserve(kClients);
  for (std::size_t i = 0; i < kClients; ++i) {
    expected.push_back(test::pattern(kMessages * kMessage, static_cast<std::uint32_t>(i + 1)));
  }
  REQUIRE(test::run_until(
      loop,
      [&] {
        bool done = true;
        for (std::size_t i = 0; i < kClients; ++i) {
          test::Peer& peer = peers[i];
          if (peer.received.size() == peer.to_send.size() &&
              peer.to_send.size() < expected[i].size()) {
            peer.to_send.append(expected[i], peer.to_send.size(), kMessage);
          }
          peer.step();
          done =
              done && (peer.received.size() >= expected[i].size() || peer.eof || peer.error != 0);
        }
        return done;
      },
      90s));

  std::size_t intact = 0;
  for (std::size_t i = 0; i < kClients; ++i) {
    if (peers[i].received == expected[i] && peers[i].error == 0 && !peers[i].eof) ++intact;
  }
  CHECK(intact == kClients);
  CHECK(tally.bytes == kClients * kMessages * kMessage);
  CHECK(loop.connection_count() == kClients);  // all of them open at the same time

  // The clients close; the server sees each EOF and closes its side at once.
  peers.clear();
  REQUIRE(test::run_until(
      loop, [&] { return tally.closed == kClients; }, 60s));
  loop.run_once(0ms);
  CHECK(tally.errors == 0);
  CHECK(tally.late_calls == 0);
  CHECK(loop.connection_count() == 0);
  CHECK(test::open_fd_count() == fds_before);
}

TEMPLATE_TEST_CASE("20000 connect, 1 byte, close cycles, 32 at a time, leave no fd behind",
                   "[stress][churn]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  constexpr std::size_t kCycles = 20000;
  constexpr std::size_t kParallel = 32;
  Tally tally;
  reactor::Reactor<TestType> loop;
  reactor::Acceptor<Echo, reactor::Reactor<TestType>> acceptor(
      loop, stress::loopback(), Echo{&tally, /*close_after_reply=*/true});
  stress::create_timer_fd(loop);
  const std::size_t fds_before = test::open_fd_count();

  // A cycle: connect, send one byte, read it back and the server's FIN, close. The server closes
  // first, so the TIME_WAIT sockets are the server's and the client's ephemeral ports are free
  // for reuse at once.
  std::vector<test::Peer> slots;
  std::vector<std::size_t> cycle_of;
  std::size_t started = 0;
  std::size_t completed = 0;
  std::size_t wrong = 0;
  const auto start_cycle = [&](std::size_t slot) {
    test::Peer peer(stress::connect_nonblocking(acceptor.local_endpoint()));
    peer.to_send.assign(1, static_cast<char>(started * 7 + 1));
    if (slot == slots.size()) {
      slots.push_back(std::move(peer));
      cycle_of.push_back(started);
    } else {
      slots[slot] = std::move(peer);
      cycle_of[slot] = started;
    }
    ++started;
  };
  for (std::size_t slot = 0; slot < kParallel; ++slot) start_cycle(slot);

  REQUIRE(test::run_until(
      loop,
      [&] {
        for (std::size_t slot = 0; slot < slots.size(); ++slot) {
          test::Peer& peer = slots[slot];
          if (!peer.fd) continue;
          peer.step();
          if (!peer.eof && peer.error == 0) continue;
          if (peer.error != 0 || peer.received != peer.to_send) ++wrong;
          ++completed;
          peer.fd.reset();
          if (started < kCycles) start_cycle(slot);
        }
        return completed == kCycles;
      },
      120s));
  REQUIRE(test::run_until(
      loop, [&] { return tally.closed == kCycles; }, 30s));
  loop.run_once(0ms);

  CHECK(wrong == 0);
  CHECK(acceptor.accepted_count() == kCycles);
  CHECK(tally.opened == kCycles);
  CHECK(tally.bytes == kCycles);
  CHECK(tally.errors == 0);
  CHECK(tally.late_calls == 0);
  CHECK(loop.connection_count() == 0);
  CHECK(test::open_fd_count() == fds_before);
}

TEMPLATE_TEST_CASE("1000 idle connections for 2 s wake the loop at most a handful of times",
                   "[stress][idle]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  constexpr std::size_t kClients = 1000;
  const bool with_timeouts = GENERATE(false, true);
  CAPTURE(with_timeouts);
  REQUIRE(stress::raise_fd_limit(2 * kClients + 256));
  Tally tally;
  reactor::Reactor<TestType> loop;
  reactor::ListenOptions options;
  if (with_timeouts) {
    // One timer per connection, due long after the window: none may wake the loop.
    options.connection.idle_timeout = 60s;
    options.connection.read_timeout = 60s;
  }
  reactor::Acceptor<Echo, reactor::Reactor<TestType>> acceptor(loop, stress::loopback(),
                                                               Echo{&tally}, options);
  stress::create_timer_fd(loop);
  const std::size_t fds_before = test::open_fd_count();
  std::vector<test::Peer> peers;
  REQUIRE(connect_all(loop, acceptor, peers, kClients));
  while (loop.run_once(200ms) > 0) {
  }  // edge mode: each new connection's first EPOLLOUT edge

  const auto iterations = loop.loop_iterations();
  std::size_t events = 0;
  const auto end = std::chrono::steady_clock::now() + 2s;
  for (auto now = std::chrono::steady_clock::now(); now < end;
       now = std::chrono::steady_clock::now()) {
    events += loop.run_once(std::chrono::ceil<std::chrono::milliseconds>(end - now));
  }

  const auto woken = loop.loop_iterations() - iterations;
  CAPTURE(woken, events);
  CHECK(woken <= 3);  // one run_once per 2 s window; a stray timeout or EINTR could add one
  CHECK(events == 0);
  CHECK(loop.connection_count() == kClients);
  CHECK(tally.bytes == 0);

  peers.clear();
  REQUIRE(test::run_until(
      loop, [&] { return tally.closed == kClients; }, 30s));
  loop.run_once(0ms);
  CHECK(tally.errors == 0);
  CHECK(test::open_fd_count() == fds_before);
}
