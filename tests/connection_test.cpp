// Tests for include/reactor/connection.hpp: the handler hooks, sending and queuing, close paths,
// backpressure, partial frames, errors — in both trigger modes, over socketpairs.
#include <reactor/connection.hpp>

#include <array>
#include <string>
#include <vector>

#include "catch.hpp"
#include "loopback.hpp"

namespace {

using namespace std::chrono_literals;

// What a handler saw, shared with the test.
struct Record {
  std::string data;
  int opens = 0;
  int data_calls = 0;
  int drains = 0;
  int eofs = 0;
  int closes = 0;
  std::error_code reason;
};

// Echoes everything and records every hook.
struct Echo {
  Record* record;
  void on_open(auto& /*connection*/) { ++record->opens; }
  void on_data(auto& connection, std::string_view bytes) {
    ++record->data_calls;
    record->data += bytes;
    connection.send(bytes);
  }
  void on_drain(auto& /*connection*/) { ++record->drains; }
  void on_close(auto& /*connection*/, std::error_code reason) {
    ++record->closes;
    record->reason = reason;
  }
};

template <class Mode>
using Loop = reactor::Reactor<Mode>;

// A second connection on the loop under test, echoing. A byte echoed by it after the test wrote
// to the connection under test proves the loop has since waited on both sockets and dispatched
// what was ready, so "nothing happened there" is decided by an event, not by waiting a while.
struct Marker {
  Record record;
  reactor::UniqueFd peer;

  template <class L>
  void attach(L& loop) {
    auto [mine, theirs] = test::socket_pair();
    reactor::adopt(loop, std::move(mine), Echo{&record});
    peer = std::move(theirs);
  }

  // Writes one byte and runs the loop until its echo is back; false if it never came.
  template <class L>
  bool round_trip(L& loop) {
    const std::size_t expected = record.data.size() + 1;
    if (::write(peer.get(), "m", 1) != 1) return false;
    std::string echoed;
    return test::run_until(loop, [&] {
      char byte;
      if (::read(peer.get(), &byte, 1) == 1) echoed += byte;
      return echoed == "m" && record.data.size() == expected;
    });
  }
};

}  // namespace

TEMPLATE_TEST_CASE("an adopted connection echoes bytes back unchanged", "[connection]",
                   reactor::LevelTriggered, reactor::EdgeTriggered) {
  Record record;
  Loop<TestType> loop;
  auto [mine, theirs] = test::socket_pair();
  auto& connection = reactor::adopt(loop, std::move(mine), Echo{&record});
  CHECK(record.opens == 1);
  CHECK(connection.is_open());
  CHECK(connection.is_reading());
  CHECK(loop.connection_count() == 1);

  test::Peer peer{std::move(theirs)};
  peer.to_send = "hello, reactor";
  REQUIRE(test::run_until(loop, [&] {
    peer.step();
    return peer.received.size() == peer.to_send.size();
  }));
  CHECK(peer.received == "hello, reactor");
  CHECK(record.data == "hello, reactor");
  CHECK(record.closes == 0);
}

TEMPLATE_TEST_CASE("16 MiB is echoed byte for byte", "[connection][bulk]", reactor::LevelTriggered,
                   reactor::EdgeTriggered) {
  Record record;
  Loop<TestType> loop;
  auto [mine, theirs] = test::socket_pair();
  reactor::adopt(loop, std::move(mine), Echo{&record});
  test::Peer peer{std::move(theirs)};
  peer.to_send = test::pattern(16 << 20, 7);
  REQUIRE(test::run_until(loop, [&] {
    peer.step();
    return peer.received.size() >= peer.to_send.size() || peer.error != 0;
  }));
  CHECK(peer.error == 0);
  CHECK(peer.received.size() == peer.to_send.size());
  CHECK(peer.received == peer.to_send);
  CHECK(record.closes == 0);
}

TEMPLATE_TEST_CASE("after the peer's half-close, pending output is flushed before closing",
                   "[connection][close]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  Record record;
  Loop<TestType> loop;
  auto [mine, theirs] = test::socket_pair();
  reactor::adopt(loop, std::move(mine), Echo{&record});
  test::Peer peer{std::move(theirs)};
  peer.to_send = test::pattern(3 << 20, 3);
  peer.reading = false;  // let output pile up on the server side first
  REQUIRE(test::run_until(loop, [&] {
    peer.step();
    return peer.all_sent() || record.data.size() > (1 << 20);
  }));
  peer.reading = true;
  REQUIRE(test::run_until(loop, [&] {
    peer.step();
    if (peer.all_sent() && peer.sent != 0) {
      peer.shutdown_write();
      peer.sent = 0;  // shut down once
      peer.to_send.clear();
    }
    return peer.eof;
  }));
  CHECK(peer.received == test::pattern(3 << 20, 3));
  CHECK(record.closes == 1);
  CHECK(!record.reason);
  CHECK(loop.connection_count() == 0);
}

namespace {

// Replies once, then closes itself from inside on_data.
struct ReplyAndClose {
  Record* record;
  std::string reply;
  void on_data(auto& connection, std::string_view bytes) {
    ++record->data_calls;
    record->data += bytes;
    connection.send(reply);
    connection.close();
    record->opens = connection.send("after close") ? 1 : 0;  // must be refused
  }
  void on_close(auto& /*connection*/, std::error_code reason) {
    ++record->closes;
    record->reason = reason;
  }
};

}  // namespace

TEMPLATE_TEST_CASE("a handler can close its own connection and queued output is flushed first",
                   "[connection][close]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  Record record;
  Loop<TestType> loop;
  auto [mine, theirs] = test::socket_pair();
  const std::string reply = test::pattern(2 << 20, 5);  // more than the socket takes at once
  reactor::adopt(loop, std::move(mine), ReplyAndClose{&record, reply});
  test::Peer peer{std::move(theirs)};
  peer.to_send = "request";
  REQUIRE(test::run_until(loop, [&] {
    peer.step();
    return peer.eof;
  }));
  // The connection sent FIN and lingers, reading, until the peer closes too (no RST).
  CHECK(record.closes == 0);
  peer.fd.reset();
  REQUIRE(test::run_until(loop, [&] { return record.closes == 1; }));
  CHECK(peer.received == reply);
  CHECK(record.data_calls == 1);
  CHECK(record.opens == 0);  // the send after close() was refused
  CHECK(record.closes == 1);
  CHECK(!record.reason);
}

namespace {

// Each connection, when it reads, aborts the other one.
struct Rivals {
  std::array<reactor::Connection<struct Rival, Loop<reactor::LevelTriggered>>*, 2> connections{};
  std::array<int, 2> data_calls{};
  std::array<int, 2> closes{};
};

struct Rival {
  Rivals* rivals;
  int index;
  void on_data(auto& /*connection*/, std::string_view /*bytes*/) {
    ++rivals->data_calls[index];
    if (auto* other = rivals->connections[1 - index]) other->abort();
  }
  void on_close(auto& /*connection*/, std::error_code /*reason*/) {
    ++rivals->closes[index];
    rivals->connections[index] = nullptr;
  }
};

}  // namespace

TEST_CASE("closing another connection in the same epoll batch drops its queued event",
          "[connection][close]") {
  Rivals rivals;
  Loop<reactor::LevelTriggered> loop;
  auto [a, peer_a] = test::socket_pair();
  auto [b, peer_b] = test::socket_pair();
  rivals.connections[0] = &reactor::adopt(loop, std::move(a), Rival{&rivals, 0});
  rivals.connections[1] = &reactor::adopt(loop, std::move(b), Rival{&rivals, 1});
  // Both become readable before the reactor looks: one epoll_wait returns both events.
  REQUIRE(::write(peer_a.get(), "a", 1) == 1);
  REQUIRE(::write(peer_b.get(), "b", 1) == 1);
  CHECK(loop.run_once(1s) == 2);
  CHECK(rivals.data_calls[0] + rivals.data_calls[1] == 1);  // the second event was dropped
  CHECK(rivals.closes[0] + rivals.closes[1] == 1);
  CHECK(loop.connection_count() == 1);
}

TEMPLATE_TEST_CASE("backpressure pauses reading at the high watermark and resumes at the low",
                   "[connection][backpressure]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  Marker marker;
  Record record;
  Loop<TestType> loop;
  reactor::ConnectionOptions options;
  options.high_water = 64 * 1024;
  options.low_water = 16 * 1024;
  auto [mine, theirs] = test::socket_pair();
  auto& connection = reactor::adopt(loop, std::move(mine), Echo{&record}, options);
  test::Peer peer{std::move(theirs)};
  peer.to_send = test::pattern(4 << 20, 11);
  peer.reading = false;
  REQUIRE(test::run_until(loop, [&] {
    peer.step();
    return !connection.is_reading();
  }));
  CHECK(connection.pending_output_bytes() >= options.high_water);
  // Paused: bytes wait unread in the socket, and a marker connection's echo, written after them,
  // comes back (the loop saw both sockets) while the paused one reads nothing.
  const std::size_t echoed = record.data.size();
  marker.attach(loop);
  for (int i = 0; i < 3; ++i) {
    peer.step();
    CHECK(peer.sent > echoed);  // unread bytes are waiting on the paused connection
    REQUIRE(marker.round_trip(loop));
    CHECK(record.data.size() == echoed);
  }
  CHECK(record.drains == 0);
  CHECK_FALSE(connection.is_reading());

  peer.reading = true;
  REQUIRE(test::run_until(loop, [&] {
    peer.step();
    return peer.received.size() == peer.to_send.size();
  }));
  CHECK(record.drains >= 1);
  CHECK(peer.received == peer.to_send);
  CHECK(connection.is_reading());
}

namespace {

// Sends `size` bytes once, on open.
struct Blast {
  Record* record;
  std::size_t size;
  void on_open(auto& connection) { record->opens = connection.send(test::pattern(size)) ? 1 : 0; }
  void on_data(auto& /*connection*/, std::string_view /*bytes*/) {}
  void on_close(auto& /*connection*/, std::error_code reason) {
    ++record->closes;
    record->reason = reason;
  }
};

}  // namespace

TEST_CASE("the hard cap closes a connection instead of queuing without bound",
          "[connection][backpressure]") {
  Record record;
  Loop<reactor::LevelTriggered> loop;
  reactor::ConnectionOptions options;
  options.high_water = 64 * 1024;
  options.max_pending_output = 256 * 1024;
  auto [mine, theirs] = test::socket_pair();
  const std::size_t fds_before = test::open_fd_count();
  reactor::adopt(loop, std::move(mine), Blast{&record, 4 << 20}, options);
  CHECK(record.opens == 0);  // send refused
  loop.run_once(0ms);
  CHECK(record.closes == 1);
  CHECK(record.reason == reactor::Error::kOutputLimit);
  CHECK(record.reason.message().find("hard cap") != std::string::npos);
  CHECK(test::open_fd_count() == fds_before - 1);
}

namespace {

// Consumes complete lines only.
struct Lines {
  std::vector<std::string>* lines;
  std::size_t on_data(auto& /*connection*/, std::string_view bytes) {
    std::size_t consumed = 0;
    for (auto end = bytes.find('\n'); end != std::string_view::npos;
         end = bytes.find('\n', consumed)) {
      lines->emplace_back(bytes.substr(consumed, end - consumed));
      consumed = end + 1;
    }
    return consumed;
  }
};

}  // namespace

TEMPLATE_TEST_CASE("bytes a handler leaves unconsumed come back with the next read",
                   "[connection][frames]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  std::vector<std::string> lines;
  Loop<TestType> loop;
  auto [mine, theirs] = test::socket_pair();
  auto& connection = reactor::adopt(loop, std::move(mine), Lines{&lines});
  for (const char* piece : {"ab", "c\nde", "f\ng", "", "h\n"}) {
    REQUIRE(::write(theirs.get(), piece, std::strlen(piece)) == std::ssize(std::string(piece)));
    loop.run_once(50ms);
  }
  REQUIRE(test::run_until(loop, [&] { return lines.size() == 3; }));
  CHECK(lines == std::vector<std::string>{"abc", "def", "gh"});
  CHECK(connection.pending_input_bytes() == 0);
}

namespace {

struct Hoarder {
  Record* record;
  std::size_t on_data(auto& /*connection*/, std::string_view bytes) {
    record->data_calls += 1;
    record->data.assign(bytes);
    return 0;
  }
  void on_close(auto& /*connection*/, std::error_code reason) {
    ++record->closes;
    record->reason = reason;
  }
};

}  // namespace

TEST_CASE("unconsumed input past its limit closes the connection", "[connection][frames]") {
  Record record;
  Loop<reactor::LevelTriggered> loop;
  reactor::ConnectionOptions options;
  options.max_pending_input = 1024;
  auto [mine, theirs] = test::socket_pair();
  reactor::adopt(loop, std::move(mine), Hoarder{&record}, options);
  const std::string bytes = test::pattern(600);
  REQUIRE(::write(theirs.get(), bytes.data(), bytes.size()) == 600);
  REQUIRE(test::run_until(loop, [&] { return record.data_calls == 1; }));
  CHECK(record.data == bytes);
  REQUIRE(::write(theirs.get(), bytes.data(), bytes.size()) == 600);
  REQUIRE(test::run_until(loop, [&] { return record.closes == 1; }));
  // The handler saw all 1200 bytes once more, left them all, and that broke the limit.
  CHECK(record.data_calls == 2);
  CHECK(record.data == bytes + bytes);
  CHECK(record.reason == reactor::Error::kInputLimit);
}

namespace {

// Answers the peer's half-close, then half-closes too.
struct Goodbye {
  Record* record;
  void on_data(auto& /*connection*/, std::string_view bytes) { record->data += bytes; }
  void on_eof(auto& connection) {
    ++record->eofs;
    connection.send("got " + std::to_string(record->data.size()) + " bytes");
    connection.shutdown();
  }
  void on_close(auto& /*connection*/, std::error_code reason) {
    ++record->closes;
    record->reason = reason;
  }
};

}  // namespace

TEMPLATE_TEST_CASE("on_eof lets a handler reply after the peer half-closed", "[connection][close]",
                   reactor::LevelTriggered, reactor::EdgeTriggered) {
  Record record;
  Loop<TestType> loop;
  auto [mine, theirs] = test::socket_pair();
  reactor::adopt(loop, std::move(mine), Goodbye{&record});
  test::Peer peer{std::move(theirs)};
  peer.to_send = "12345";
  peer.step();
  peer.shutdown_write();
  REQUIRE(test::run_until(loop, [&] {
    peer.step();
    return peer.eof && record.closes == 1;
  }));
  CHECK(peer.received == "got 5 bytes");
  CHECK(record.eofs == 1);
  CHECK(!record.reason);
}

namespace {

// Sends a block then shuts down its side, but keeps reading.
struct SendThenShutdown {
  Record* record;
  std::string block;
  void on_open(auto& connection) {
    connection.send(block);
    connection.shutdown();
    record->opens = connection.send("x") ? 1 : 0;  // refused after shutdown
  }
  void on_data(auto& /*connection*/, std::string_view bytes) { record->data += bytes; }
  void on_close(auto& /*connection*/, std::error_code reason) {
    ++record->closes;
    record->reason = reason;
  }
};

}  // namespace

TEMPLATE_TEST_CASE("shutdown flushes, sends FIN and keeps reading until the peer's EOF",
                   "[connection][close]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  Record record;
  Loop<TestType> loop;
  auto [mine, theirs] = test::socket_pair();
  const std::string block = test::pattern(1 << 20, 9);
  reactor::adopt(loop, std::move(mine), SendThenShutdown{&record, block});
  CHECK(record.opens == 0);
  test::Peer peer{std::move(theirs)};
  REQUIRE(test::run_until(loop, [&] {
    peer.step();
    return peer.eof;
  }));
  CHECK(peer.received == block);
  peer.to_send = "late words";
  REQUIRE(test::run_until(loop, [&] {
    peer.step();
    return record.data == "late words";
  }));
  CHECK(record.closes == 0);
  peer.shutdown_write();
  REQUIRE(test::run_until(loop, [&] { return record.closes == 1; }));
  CHECK(!record.reason);
}

namespace {

struct Thrower {
  Record* record;
  void on_data(auto& connection, std::string_view bytes) {
    if (bytes.starts_with("throw")) throw std::runtime_error("handler failure");
    connection.send(bytes);
  }
  void on_close(auto& /*connection*/, std::error_code reason) {
    ++record->closes;
    record->reason = reason;
  }
};

}  // namespace

TEST_CASE("a handler that throws closes only its own connection", "[connection][errors]") {
  Record bad;
  Record good;
  Loop<reactor::LevelTriggered> loop;
  auto [a, peer_a] = test::socket_pair();
  auto [b, peer_b] = test::socket_pair();
  reactor::adopt(loop, std::move(a), Thrower{&bad});
  reactor::adopt(loop, std::move(b), Thrower{&good});
  test::Peer thrower{std::move(peer_a)};
  test::Peer echoer{std::move(peer_b)};
  thrower.to_send = "throw now";
  echoer.to_send = "fine";
  REQUIRE(test::run_until(loop, [&] {
    thrower.step();
    echoer.step();
    return thrower.eof && echoer.received == "fine";
  }));
  CHECK(bad.closes == 1);
  CHECK(bad.reason == reactor::Error::kHandlerException);
  CHECK(good.closes == 0);
}

namespace {

// Pauses itself after each message until the test resumes it.
struct Pauser {
  Record* record;
  std::size_t on_data(auto& connection, std::string_view bytes) {
    ++record->data_calls;
    const auto end = bytes.find('\n');
    if (end == std::string_view::npos) return 0;
    record->data += bytes.substr(0, end + 1);
    connection.pause_reading();
    return end + 1;
  }
};

}  // namespace

TEMPLATE_TEST_CASE("pause_reading holds data back until resume_reading delivers it",
                   "[connection][pause]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  Marker marker;
  Record record;
  Loop<TestType> loop;
  auto [mine, theirs] = test::socket_pair();
  auto& connection = reactor::adopt(loop, std::move(mine), Pauser{&record});
  const std::string text = "one\ntwo\n";
  REQUIRE(::write(theirs.get(), text.data(), text.size()) == std::ssize(text));
  REQUIRE(test::run_until(loop, [&] { return record.data_calls == 1; }));
  CHECK(record.data == "one\n");
  CHECK_FALSE(connection.is_reading());
  CHECK(connection.pending_input_bytes() == 4);  // "two\n" waits, already read
  REQUIRE(::write(theirs.get(), "three\n", 6) == 6);
  // Written after "three\n": once its echo is back, the loop has seen "three\n" readable.
  marker.attach(loop);
  REQUIRE(marker.round_trip(loop));
  CHECK(record.data == "one\n");
  CHECK(record.data_calls == 1);
  CHECK(connection.pending_input_bytes() == 4);  // "three\n" was not even read

  connection.resume_reading();
  REQUIRE(test::run_until(loop, [&] { return record.data == "one\ntwo\n"; }));
  connection.resume_reading();
  REQUIRE(test::run_until(loop, [&] { return record.data == "one\ntwo\nthree\n"; }));
}

TEST_CASE("sending to a peer that has gone reports EPIPE in on_close", "[connection][errors]") {
  Record record;
  Loop<reactor::LevelTriggered> loop;
  auto [mine, theirs] = test::socket_pair();
  reactor::adopt(loop, std::move(mine), Echo{&record});
  REQUIRE(::write(theirs.get(), "ping", 4) == 4);
  theirs.reset();  // gone before the echo is written; no SIGPIPE may kill us
  REQUIRE(test::run_until(loop, [&] { return record.closes == 1; }));
  CHECK(record.data == "ping");
  CHECK(record.reason == std::errc::broken_pipe);
}

TEST_CASE("destroying the reactor closes open connections with operation_canceled",
          "[connection][close]") {
  Record record;
  const std::size_t fds_before = test::open_fd_count();
  {
    auto [mine, theirs] = test::socket_pair();
    Loop<reactor::EdgeTriggered> loop;
    reactor::adopt(loop, std::move(mine), Echo{&record});
  }
  CHECK(record.closes == 1);
  CHECK(record.reason == std::errc::operation_canceled);
  CHECK(test::open_fd_count() == fds_before);
}

namespace {

struct Empty {
  void on_data(auto& /*connection*/, std::string_view /*bytes*/) {}
};

}  // namespace

TEST_CASE("an idle connection costs at most 256 bytes beyond its handler", "[connection][memory]") {
  // malloc adds 8 bytes of header and rounds to 16 (glibc): count the worst case.
  constexpr std::size_t kMallocOverhead = 16;
  STATIC_REQUIRE(sizeof(reactor::Connection<Empty>) + kMallocOverhead <= 256);
  STATIC_REQUIRE(
      sizeof(reactor::Connection<Empty, Loop<reactor::EdgeTriggered>>) + kMallocOverhead <= 256);
  Loop<reactor::LevelTriggered> loop;
  auto [mine, theirs] = test::socket_pair();
  auto& connection = reactor::adopt(loop, std::move(mine), Empty{});
  CHECK(connection.pending_output_bytes() == 0);
  CHECK(connection.pending_input_bytes() == 0);
}

TEST_CASE("a connection with timeouts costs at most 256 bytes beyond its handler",
          "[connection][memory][timer]") {
  // Its timer is the deadline inside it (no TimerQueue slot, no Task) and one pointer in the
  // reactor's deadline heap, a vector that grows by doubling: count that pointer twice.
  constexpr std::size_t kMallocOverhead = 16;
  constexpr std::size_t kHeapEntry = 2 * sizeof(void*);
  // The deadline (20 bytes, its tail padding reused) keeps the connection in glibc's 208-byte
  // chunk (200 + 8 bytes of header), where it was with a TimerId (bench/idle_rss: 208 B/conn).
  STATIC_REQUIRE(sizeof(reactor::Connection<Empty>) <= 200);
  STATIC_REQUIRE(sizeof(reactor::Connection<Empty>) + kMallocOverhead + kHeapEntry <= 256);
  STATIC_REQUIRE(sizeof(reactor::Connection<Empty, Loop<reactor::EdgeTriggered>>) +
                     kMallocOverhead + kHeapEntry <=
                 256);
  Loop<reactor::LevelTriggered> loop;
  auto [mine, theirs] = test::socket_pair();
  reactor::ConnectionOptions options;
  options.idle_timeout = std::chrono::seconds(60);
  options.read_timeout = std::chrono::seconds(30);
  reactor::adopt(loop, std::move(mine), Empty{}, options);
  CHECK(loop.pending_timers() == 1);  // one deadline serves all its timeouts
}
