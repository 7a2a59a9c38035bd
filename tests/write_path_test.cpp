// Tests for the write path of include/reactor/connection.hpp: sends made inside the loop coalesce
// (the small sends of one callback step to one connection leave in one write), large sends go out
// at once with what was held, gather sends, cork()/uncork(), partial writes, and the close paths
// that must still write what was held. Each case checks the exact bytes the peer reads and the
// write syscalls the connection made, counted through the syscall seam (WriteLog below), in both
// trigger modes where readiness matters.
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <reactor/connection.hpp>

#include "catch.hpp"
#include "fault_syscalls.hpp"
#include "loopback.hpp"

namespace {

using namespace std::chrono_literals;

// One write-side syscall: send, sendmsg (a gathered write) or write.
struct WriteCall {
  int fd = -1;
  bool gathered = false;    // sendmsg, not send or write
  std::size_t buffers = 0;  // iovecs offered (1 for send and write)
  std::size_t offered = 0;  // bytes offered
  ssize_t result = 0;       // bytes taken, or -1
  std::string taken;        // the bytes taken, in order
};

// Records every write-side syscall CountingSyscalls makes on this thread while it lives; one at a
// time. Declare it before the reactor, so that it outlives the reactor's last writes.
class WriteLog {
 public:
  WriteLog() {
    assert(active() == nullptr && "one WriteLog per thread at a time");
    active() = this;
  }
  WriteLog(const WriteLog&) = delete;
  WriteLog& operator=(const WriteLog&) = delete;
  ~WriteLog() { active() = nullptr; }

  // The calls on `fd`, oldest first.
  std::vector<WriteCall> on(int fd) const {
    std::vector<WriteCall> calls;
    for (const WriteCall& call : calls_) {
      if (call.fd == fd) calls.push_back(call);
    }
    return calls;
  }
  std::size_t count(int fd) const { return on(fd).size(); }
  // Bytes the kernel took from writes on `fd`.
  std::size_t bytes(int fd) const {
    std::size_t total = 0;
    for (const WriteCall& call : on(fd)) total += call.result > 0 ? std::size_t(call.result) : 0;
    return total;
  }
  // Which of `fds` each call wrote to, in call order (calls on other fds left out).
  std::vector<int> order(std::initializer_list<int> fds) const {
    std::vector<int> written;
    for (const WriteCall& call : calls_) {
      if (std::find(fds.begin(), fds.end(), call.fd) != fds.end()) written.push_back(call.fd);
    }
    return written;
  }
  void clear() { calls_.clear(); }

  // Used by CountingSyscalls. Keeps errno as the call left it.
  static void record(int fd, bool gathered, const iovec* vectors, std::size_t count,
                     ssize_t result) noexcept {
    WriteLog* log = active();
    if (log == nullptr) return;
    const int saved = errno;
    try {
      WriteCall call{fd, gathered, count, 0, result, {}};
      std::size_t left = result > 0 ? std::size_t(result) : 0;
      for (std::size_t i = 0; i < count; ++i) {
        call.offered += vectors[i].iov_len;
        const std::size_t n = std::min(left, vectors[i].iov_len);
        call.taken.append(static_cast<const char*>(vectors[i].iov_base), n);
        left -= n;
      }
      log->calls_.push_back(std::move(call));
    } catch (...) {
      // Out of memory in a test: the log misses one call.
    }
    errno = saved;
  }

 private:
  static WriteLog*& active() noexcept {
    static thread_local WriteLog* log = nullptr;
    return log;
  }

  std::vector<WriteCall> calls_;
};

// The syscall policy under test: FaultSyscalls (faults only while a test::FaultScript is
// installed, else the kernel's calls), with every write-side call logged in the WriteLog.
struct CountingSyscalls : test::FaultSyscalls {
  using Base = test::FaultSyscalls;

  static ssize_t send(int fd, const void* buffer, std::size_t size, int flags) noexcept {
    const ssize_t n = Base::send(fd, buffer, size, flags);
    const iovec vector{const_cast<void*>(buffer), size};
    WriteLog::record(fd, false, &vector, 1, n);
    return n;
  }
  static ssize_t sendmsg(int fd, const msghdr* message, int flags) noexcept {
    const ssize_t n = Base::sendmsg(fd, message, flags);
    WriteLog::record(fd, true, message->msg_iov, message->msg_iovlen, n);
    return n;
  }
  static ssize_t write(int fd, const void* buffer, std::size_t size) noexcept {
    const ssize_t n = Base::write(fd, buffer, size);
    const iovec vector{const_cast<void*>(buffer), size};
    WriteLog::record(fd, false, &vector, 1, n);
    return n;
  }
};

template <class Mode>
using Loop = reactor::Reactor<Mode, CountingSyscalls>;

template <class Mode>
constexpr bool kEdge = Loop<Mode>::kEdgeTriggered;

// What a handler saw, shared with the test.
struct Record {
  std::string data;  // every byte on_data was given, in order
  int data_calls = 0;
  int eofs = 0;
  int closes = 0;
  std::error_code reason;
};

// Records its input and answers each on_data with respond(connection, bytes). Coalesce = false
// opts its connections out of coalescing.
template <class Respond, bool Coalesce = true>
struct Responder {
  static constexpr bool coalesce_sends = Coalesce;
  Record* record;
  Respond respond;

  void on_data(auto& connection, std::string_view bytes) {
    ++record->data_calls;
    record->data += bytes;
    respond(connection, bytes);
  }
  void on_close(auto& /*connection*/, std::error_code reason) {
    ++record->closes;
    record->reason = reason;
  }
};

template <bool Coalesce = true, class Respond>
Responder<Respond, Coalesce> responder(Record& record, Respond respond) {
  return {&record, std::move(respond)};
}

// Ignores its input.
constexpr auto kIgnore = [](auto& /*connection*/, std::string_view /*bytes*/) {};

// A connection adopted from one end of a socketpair, the test's end as a Peer, and the
// connection's fd (for the WriteLog; native_handle() is -1 once it closed).
template <class Connection>
struct Opened {
  Connection* connection;
  test::Peer peer;
  int fd;
};

template <class L, class Handler>
auto open_pair(L& loop, Handler handler, const reactor::ConnectionOptions& options = {}) {
  auto sockets = test::socket_pair();
  auto& connection = reactor::adopt(loop, std::move(sockets.first), std::move(handler), options);
  using Connection = std::remove_reference_t<decltype(connection)>;
  return Opened<Connection>{&connection, test::Peer(std::move(sockets.second)),
                            connection.native_handle()};
}

// Runs the loop (stepping `peer`) until the peer has received `size` bytes in all.
template <class L>
bool receive(L& loop, test::Peer& peer, std::size_t size) {
  return test::run_until(loop, [&] {
    peer.step();
    return peer.received.size() >= size || peer.error != 0;
  });
}

// Makes `connection` hold its sends from the first of a step on. The first send of a step goes
// out at once until the connection has once sent twice in one step (Connection::send); posted
// work sending twice does that. Leaves the peer's received bytes and the log empty.
template <class L, class C>
void prime(L& loop, C& connection, test::Peer& peer, WriteLog& log) {
  loop.post([&connection] {
    connection.send("p1");
    connection.send("p2");
  });
  REQUIRE(receive(loop, peer, 4));
  REQUIRE(peer.received == "p1p2");
  peer.received.clear();
  log.clear();
}

// "" when `got` equals `expected`, else their sizes and the first byte where they differ (Catch
// would print both, up to megabytes of binary).
std::string mismatch(std::string_view got, std::string_view expected) {
  if (got == expected) return {};
  const std::size_t common = std::min(got.size(), expected.size());
  std::size_t at = 0;
  while (at < common && got[at] == expected[at]) ++at;
  return "got " + std::to_string(got.size()) + " bytes, expected " +
         std::to_string(expected.size()) + ", first difference at byte " + std::to_string(at);
}

// 40 bytes, different for every (tag, index).
std::string response(char tag, int index) {
  return test::pattern(40,
                       static_cast<std::uint32_t>(tag) * 100 + static_cast<std::uint32_t>(index));
}

std::string responses(char tag, int count) {
  std::string all;
  for (int i = 0; i < count; ++i) all += response(tag, i);
  return all;
}

// Sends `count` responses to the request tagged by its first byte, one send each.
template <int Count>
struct SendResponses {
  void operator()(auto& connection, std::string_view bytes) const {
    for (int i = 0; i < Count; ++i) connection.send(response(bytes[0], i));
  }
};

}  // namespace

// --- Many sends from one on_data -----------------------------------------------------------------

TEMPLATE_TEST_CASE("sixteen responses sent from one on_data leave in one write",
                   "[connection][coalesce]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  WriteLog log;
  Record record;
  Loop<TestType> loop;
  auto opened = open_pair(loop, responder(record, SendResponses<16>{}));
  test::Peer& peer = opened.peer;
  prime(loop, *opened.connection, peer, log);

  std::string expected;
  for (char tag = 'a'; tag <= 'h'; ++tag) {
    const std::size_t before = log.count(opened.fd);
    const int calls_before = record.data_calls;
    peer.to_send += tag;
    expected += responses(tag, 16);
    REQUIRE(receive(loop, peer, expected.size()));
    CHECK(record.data_calls == calls_before + 1);
    CHECK(log.count(opened.fd) == before + 1);  // one write for the 16 sends
    CHECK(log.on(opened.fd).back().result == 16 * 40);
  }
  CHECK(mismatch(peer.received, expected) == "");
  CHECK(opened.connection->pending_output_bytes() == 0);
}

TEMPLATE_TEST_CASE("a fresh connection writes its first send at once and holds from the second",
                   "[connection][coalesce]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  WriteLog log;
  Record record;
  Loop<TestType> loop;
  auto opened = open_pair(loop, responder(record, SendResponses<16>{}));
  opened.peer.to_send = "a";
  REQUIRE(receive(loop, opened.peer, 16 * 40));
  CHECK(opened.peer.received == responses('a', 16));
  CHECK(record.data_calls == 1);
  // Until a connection first sends twice in one step its sends are written at once; from the
  // second send of that step on they are held (Connection::send).
  const std::vector<WriteCall> calls = log.on(opened.fd);
  REQUIRE(calls.size() == 2);
  CHECK(calls[0].taken == response('a', 0));
  CHECK(calls[1].taken == responses('a', 16).substr(40));
  // From then on the connection holds from the first send: the next request is one write.
  opened.peer.to_send += "b";
  REQUIRE(receive(loop, opened.peer, 2 * 16 * 40));
  CHECK(opened.peer.received == responses('a', 16) + responses('b', 16));
  REQUIRE(log.count(opened.fd) == 3);
  CHECK(log.on(opened.fd)[2].taken == responses('b', 16));
}

TEMPLATE_TEST_CASE("with coalesce_sends false every send is its own write",
                   "[connection][coalesce]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  WriteLog log;
  Record record;
  Loop<TestType> loop;
  auto opened = open_pair(loop, responder<false>(record, SendResponses<16>{}));
  test::Peer& peer = opened.peer;

  std::string expected;
  for (char tag = 'a'; tag <= 'd'; ++tag) {
    const std::size_t before = log.count(opened.fd);
    peer.to_send += tag;
    expected += responses(tag, 16);
    REQUIRE(receive(loop, peer, expected.size()));
    const std::vector<WriteCall> calls = log.on(opened.fd);
    REQUIRE(calls.size() == before + 16);
    for (std::size_t i = before; i < calls.size(); ++i) {
      CHECK_FALSE(calls[i].gathered);
      CHECK(calls[i].taken == response(tag, static_cast<int>(i - before)));
    }
  }
  CHECK(mismatch(peer.received, expected) == "");
  CHECK(record.data_calls == 4);
}

TEMPLATE_TEST_CASE("small sends past the cork buffer's 16 KiB leave in two writes",
                   "[connection][coalesce]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  WriteLog log;
  Record record;
  Loop<TestType> loop;
  auto opened = open_pair(loop, responder(record, SendResponses<500>{}));  // 20000 bytes
  prime(loop, *opened.connection, opened.peer, log);
  opened.peer.to_send = "z";
  REQUIRE(receive(loop, opened.peer, 500 * 40));
  CHECK(mismatch(opened.peer.received, responses('z', 500)) == "");
  const std::vector<WriteCall> calls = log.on(opened.fd);
  REQUIRE(calls.size() == 2);
  // 409 responses fill 16360 of the 16384 bytes; the 410th goes out with them in one writev.
  CHECK(calls[0].gathered);
  CHECK(calls[0].buffers == 2);
  CHECK(calls[0].offered == 410 * 40);
  CHECK(calls[0].result == 410 * 40);
  CHECK(calls[1].result == 90 * 40);
}

// --- One send per on_data, and echoing on_data's own bytes ---------------------------------------

TEMPLATE_TEST_CASE("one send per on_data is one plain send", "[connection][coalesce]",
                   reactor::LevelTriggered, reactor::EdgeTriggered) {
  WriteLog log;
  Record record;
  Loop<TestType> loop;
  auto echo = [](auto& connection, std::string_view bytes) { connection.send(bytes); };
  auto opened = open_pair(loop, responder(record, echo));
  test::Peer& peer = opened.peer;

  const auto exchange_eight = [&] {
    std::string expected;
    for (int i = 0; i < 8; ++i) {
      const std::string message = test::pattern(100 + i * 300, 40 + i);
      const std::size_t before = log.count(opened.fd);
      const int calls_before = record.data_calls;
      peer.to_send += message;
      expected += message;
      REQUIRE(receive(loop, peer, expected.size()));
      CHECK(record.data_calls == calls_before + 1);
      const std::vector<WriteCall> calls = log.on(opened.fd);
      REQUIRE(calls.size() == before + 1);
      CHECK_FALSE(calls.back().gathered);
      CHECK(mismatch(calls.back().taken, message) == "");
    }
    return expected;
  };

  SECTION("on a fresh connection") {
    const std::string expected = exchange_eight();
    CHECK(mismatch(peer.received, expected) == "");
  }
  SECTION("on a connection that holds from the first send") {
    prime(loop, *opened.connection, peer, log);
    const std::string expected = exchange_eight();  // each echo held, pointing into the read buffer
    CHECK(mismatch(peer.received, expected) == "");
  }
}

TEMPLATE_TEST_CASE("echoing on_data's bytes survives the reads that follow in one wakeup",
                   "[connection][coalesce]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  WriteLog log;
  Record record;
  reactor::ReactorOptions options;
  options.read_buffer_size = 1024;  // 64 reads of 1 KiB; edge mode makes 16 per wakeup
  Loop<TestType> loop(options);
  auto echo = [](auto& connection, std::string_view bytes) { connection.send(bytes); };
  auto opened = open_pair(loop, responder(record, echo));
  test::Peer& peer = opened.peer;
  prime(loop, *opened.connection, peer, log);

  const std::string input = test::pattern(64 * 1024, 9);
  peer.to_send = input;
  peer.step();  // all of it is in the socket before the loop looks
  REQUIRE(peer.all_sent());
  REQUIRE(receive(loop, peer, input.size()));
  CHECK(mismatch(peer.received, input) == "");
  CHECK(record.data_calls == 64);
  if constexpr (kEdge<TestType>) {
    // 16 reads per wakeup, each echo held (the first only pointed at, copied out before the next
    // read): 16 KiB, the cork buffer's size, in one write per wakeup.
    CHECK(log.count(opened.fd) == 4);
  } else {
    CHECK(log.count(opened.fd) == 64);  // one read per event, one write per read
  }
  for (const WriteCall& call : log.on(opened.fd)) CHECK_FALSE(call.gathered);
}

TEMPLATE_TEST_CASE("two connections relaying each other's input keep both streams intact",
                   "[connection][coalesce]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  WriteLog log;
  Record record_a;
  Record record_b;
  reactor::ReactorOptions options;
  options.read_buffer_size = 1024;
  Loop<TestType> loop(options);
  // Each forwards what it reads to the other: the bytes held for the other connection lie in the
  // read buffer the other then reads into.
  std::function<bool(std::string_view)> to_a;
  std::function<bool(std::string_view)> to_b;
  auto a =
      open_pair(loop, responder(record_a, [&to_b](auto&, std::string_view bytes) { to_b(bytes); }));
  auto b =
      open_pair(loop, responder(record_b, [&to_a](auto&, std::string_view bytes) { to_a(bytes); }));
  to_a = [c = a.connection](std::string_view bytes) { return c->send(bytes); };
  to_b = [c = b.connection](std::string_view bytes) { return c->send(bytes); };
  prime(loop, *a.connection, a.peer, log);
  prime(loop, *b.connection, b.peer, log);

  const std::string from_a = test::pattern(8 * 1024, 21);
  const std::string from_b = test::pattern(8 * 1024, 22);
  a.peer.to_send = from_a;
  b.peer.to_send = from_b;
  a.peer.step();
  b.peer.step();
  REQUIRE(a.peer.all_sent());
  REQUIRE(b.peer.all_sent());
  REQUIRE(test::run_until(loop, [&] {
    a.peer.step();
    b.peer.step();
    return a.peer.received.size() >= from_b.size() && b.peer.received.size() >= from_a.size();
  }));
  CHECK(mismatch(a.peer.received, from_b) == "");
  CHECK(mismatch(b.peer.received, from_a) == "");
  if constexpr (kEdge<TestType>) {
    // One wakeup reads all 8 KiB of a connection: held for the other, one write.
    CHECK(log.count(b.fd) == 1);
    CHECK(log.count(a.fd) == 1);
  } else {
    // One read per event; what it forwarded is written when the event is done.
    CHECK(log.count(b.fd) == static_cast<std::size_t>(record_a.data_calls));
    CHECK(log.count(a.fd) == static_cast<std::size_t>(record_b.data_calls));
    CHECK(record_a.data_calls == 8);
    CHECK(record_b.data_calls == 8);
  }
}

// --- A large send after small ones ---------------------------------------------------------------

TEMPLATE_TEST_CASE("a large send after small ones goes out with them in one writev",
                   "[connection][coalesce]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  WriteLog log;
  Record record;
  Loop<TestType> loop;
  const std::string small = test::pattern(300, 31);
  const std::string large = test::pattern(100 * 1024, 32);
  const std::string header = test::pattern(64, 33);
  bool gather = false;
  std::size_t held_before_large = 0;
  auto respond = [&](auto& connection, std::string_view /*bytes*/) {
    connection.send(std::string_view(small).substr(0, 100));
    connection.send(std::string_view(small).substr(100, 100));
    connection.send(std::string_view(small).substr(200, 100));
    held_before_large = connection.pending_output_bytes();
    if (gather) {
      connection.send({header, large});
    } else {
      connection.send(large);
    }
  };
  auto opened = open_pair(loop, responder(record, respond));
  prime(loop, *opened.connection, opened.peer, log);

  SECTION("a plain large send") {
    opened.peer.to_send = "go";
    REQUIRE(receive(loop, opened.peer, small.size() + large.size()));
    CHECK(mismatch(opened.peer.received, small + large) == "");
    CHECK(held_before_large == 300);
    const std::vector<WriteCall> calls = log.on(opened.fd);
    REQUIRE_FALSE(calls.empty());
    CHECK(calls[0].gathered);
    CHECK(calls[0].buffers == 2);  // the held bytes, then the large buffer
    CHECK(calls[0].offered == small.size() + large.size());
    CHECK(calls[0].result > 300);
    CHECK(mismatch(calls[0].taken, (small + large).substr(0, calls[0].taken.size())) == "");
  }
  SECTION("a large gather send") {
    gather = true;
    opened.peer.to_send = "go";
    REQUIRE(receive(loop, opened.peer, small.size() + header.size() + large.size()));
    CHECK(mismatch(opened.peer.received, small + header + large) == "");
    CHECK(held_before_large == 300);
    const std::vector<WriteCall> calls = log.on(opened.fd);
    REQUIRE_FALSE(calls.empty());
    CHECK(calls[0].gathered);
    CHECK(calls[0].buffers == 3);
    CHECK(calls[0].offered == small.size() + header.size() + large.size());
    CHECK(calls[0].result > 300 + 64);
    CHECK(mismatch(calls[0].taken, (small + header + large).substr(0, calls[0].taken.size())) ==
          "");
  }
}

// --- Gather sends --------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("a gather send outside the loop is one sendmsg per group of sixteen buffers",
                   "[connection][gather]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  WriteLog log;
  Record record;
  Loop<TestType> loop;
  auto opened = open_pair(loop, responder(record, kIgnore));
  auto& connection = *opened.connection;

  SECTION("a header and a body") {
    const std::string header = "HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n";
    const std::string body = test::pattern(2000, 41);
    CHECK(connection.send({header, body}));
    const std::vector<WriteCall> calls = log.on(opened.fd);
    REQUIRE(calls.size() == 1);
    CHECK(calls[0].gathered);
    CHECK(calls[0].buffers == 2);
    CHECK(mismatch(calls[0].taken, header + body) == "");
    CHECK(connection.pending_output_bytes() == 0);
    REQUIRE(receive(loop, opened.peer, header.size() + body.size()));
    CHECK(mismatch(opened.peer.received, header + body) == "");
  }
  SECTION("38 buffers of which two are empty") {
    std::vector<std::string> storage;
    std::vector<std::string_view> buffers;
    std::string expected;
    for (int i = 0; i < 38; ++i) {
      storage.push_back(i == 5 || i == 20 ? std::string() : test::pattern(10 + i, 50 + i));
    }
    for (const std::string& s : storage) {
      buffers.push_back(s);
      expected += s;
    }
    CHECK(connection.send(std::span<const std::string_view>(buffers)));
    const std::vector<WriteCall> calls = log.on(opened.fd);
    REQUIRE(calls.size() == 3);  // 36 non-empty buffers: 16, 16, 4
    CHECK(calls[0].buffers == 16);
    CHECK(calls[1].buffers == 16);
    CHECK(calls[2].buffers == 4);
    std::string written;
    for (const WriteCall& call : calls) {
      CHECK(call.gathered);
      CHECK(call.result == static_cast<ssize_t>(call.offered));
      written += call.taken;
    }
    CHECK(mismatch(written, expected) == "");
    REQUIRE(receive(loop, opened.peer, expected.size()));
    CHECK(mismatch(opened.peer.received, expected) == "");
  }
}

TEMPLATE_TEST_CASE("gather sends inside a callback below the limit coalesce into one write",
                   "[connection][gather][coalesce]", reactor::LevelTriggered,
                   reactor::EdgeTriggered) {
  WriteLog log;
  Record record;
  Loop<TestType> loop;
  std::vector<std::string> storage;
  for (int i = 0; i < 20; ++i) storage.push_back(test::pattern(7 + i, 60 + i));
  const std::vector<std::string_view> many(storage.begin(), storage.end());
  auto respond = [&](auto& connection, std::string_view /*bytes*/) {
    connection.send({"H1:", "body-one;"});
    connection.send({"H2:", "", "body-two;"});
    connection.send(std::span<const std::string_view>(many));  // 20 buffers: two groups
  };
  auto opened = open_pair(loop, responder(record, respond));
  prime(loop, *opened.connection, opened.peer, log);

  std::string expected = "H1:body-one;H2:body-two;";
  for (const std::string& s : storage) expected += s;
  for (int round = 1; round <= 3; ++round) {
    opened.peer.to_send += "x";
    REQUIRE(receive(loop, opened.peer, expected.size() * static_cast<std::size_t>(round)));
    const std::vector<WriteCall> calls = log.on(opened.fd);
    REQUIRE(calls.size() == static_cast<std::size_t>(round));  // one write per on_data
    CHECK_FALSE(calls.back().gathered);  // copied together into the cork buffer
    CHECK(mismatch(calls.back().taken, expected) == "");
  }
  CHECK(mismatch(opened.peer.received, expected + expected + expected) == "");
}

// --- Partial writes ------------------------------------------------------------------------------

namespace {

// One on_data step with every kind of send: sixteen small sends, a small gather send, then a large
// gather send; records pending_output_bytes() after each part.
struct MixedStep {
  std::string large;
  std::vector<std::size_t>* pending;
  std::size_t* taken_in_step;  // bytes the log says the kernel took during the step
  WriteLog* log;
  int fd = -1;

  void operator()(auto& connection, std::string_view bytes) const {
    if (bytes != "go") return;
    for (int i = 0; i < 16; ++i) connection.send(response('m', i));
    pending->push_back(connection.pending_output_bytes());
    connection.send({std::string_view("HEADER:"), std::string_view(body())});
    pending->push_back(connection.pending_output_bytes());
    const std::string_view all(large);  // a large gather send: two halves
    connection.send({all.substr(0, all.size() / 2), all.substr(all.size() / 2)});
    pending->push_back(connection.pending_output_bytes());
    *taken_in_step = log->bytes(fd);
  }
  static std::string body() { return test::pattern(300, 71); }
  std::string expected() const { return responses('m', 16) + "HEADER:" + body() + large; }
};

}  // namespace

TEMPLATE_TEST_CASE("writes cut short deliver held and gathered bytes complete and in order",
                   "[connection][partial]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  WriteLog log;
  test::FaultScript script;
  Record record;
  Loop<TestType> loop;
  std::vector<std::size_t> pending;
  std::size_t taken_in_step = 0;
  MixedStep step{test::pattern(20 * 1024, 72), &pending, &taken_in_step, &log};
  auto opened = open_pair(loop, responder(record, std::ref(step)));
  step.fd = opened.fd;
  prime(loop, *opened.connection, opened.peer, log);
  // Every write of the connection takes at most 100 bytes from now on.
  script.always(test::Call::kSend, test::at_most(100, opened.fd));
  script.always(test::Call::kSendmsg, test::at_most(100, opened.fd));

  const std::string expected = step.expected();
  opened.peer.to_send = "go";
  REQUIRE(receive(loop, opened.peer, expected.size()));
  CHECK(mismatch(opened.peer.received, expected) == "");
  REQUIRE(pending.size() == 3);
  CHECK(pending[0] == 16 * 40);                // held
  CHECK(pending[1] == 16 * 40 + 7 + 300);      // held
  CHECK(pending[2] == expected.size() - 100);  // one writev took 100, the rest is queued
  CHECK(taken_in_step == 100);
  const std::vector<WriteCall> calls = log.on(opened.fd);
  REQUIRE_FALSE(calls.empty());
  CHECK(calls[0].gathered);
  CHECK(calls[0].buffers == 3);  // the held bytes, then the two halves
  CHECK(calls[0].offered == expected.size());
  for (const WriteCall& call : calls) CHECK(call.result <= 100);
  CHECK(log.bytes(opened.fd) == expected.size());
  CHECK(calls.size() >= expected.size() / 100);
  CHECK(opened.connection->pending_output_bytes() == 0);
  CHECK(record.closes == 0);
}

TEMPLATE_TEST_CASE("a peer that does not read leaves the rest queued until it does",
                   "[connection][partial]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  WriteLog log;
  Record record;
  Loop<TestType> loop;
  std::vector<std::size_t> pending;
  std::size_t taken_in_step = 0;
  MixedStep step{test::pattern(512 * 1024, 73), &pending, &taken_in_step, &log};
  auto opened = open_pair(loop, responder(record, std::ref(step)));
  step.fd = opened.fd;
  const int size = 4096;  // the kernel doubles it, and keeps a minimum
  REQUIRE(::setsockopt(opened.fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size) == 0);
  prime(loop, *opened.connection, opened.peer, log);

  const std::string expected = step.expected();
  opened.peer.reading = false;
  opened.peer.to_send = "go";
  REQUIRE(test::run_until(loop, [&] {
    opened.peer.step();
    return record.data_calls == 1;
  }));
  for (int i = 0; i < 5; ++i) loop.run_once(0ms);  // nothing more can be written
  REQUIRE(pending.size() == 3);
  CHECK(pending[0] == 16 * 40);
  CHECK(pending[1] == 16 * 40 + 7 + 300);
  CHECK(taken_in_step > 0);
  CHECK(taken_in_step < expected.size());
  CHECK(pending[2] == expected.size() - taken_in_step);
  CHECK(log.bytes(opened.fd) == taken_in_step);
  CHECK(opened.connection->pending_output_bytes() == expected.size() - taken_in_step);

  opened.peer.reading = true;
  REQUIRE(receive(loop, opened.peer, expected.size()));
  CHECK(mismatch(opened.peer.received, expected) == "");
  CHECK(log.bytes(opened.fd) == expected.size());
  CHECK(opened.connection->pending_output_bytes() == 0);
  CHECK(record.closes == 0);
}

// --- Sends from timers and posted work, to one or two connections --------------------------------

TEMPLATE_TEST_CASE("sends from a timer or from posted work coalesce into one write",
                   "[connection][coalesce]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  WriteLog log;
  Record record;
  Loop<TestType> loop;
  auto opened = open_pair(loop, responder(record, kIgnore));
  auto* connection = opened.connection;
  prime(loop, *connection, opened.peer, log);
  std::size_t held = 0;
  bool ran = false;
  const auto three_sends = [connection, &held, &ran] {
    connection->send("one,");
    connection->send("two,");
    connection->send(std::string_view("three"));
    held = connection->pending_output_bytes();
    ran = true;
  };

  SECTION("a timer") {
    loop.schedule_after(0ms, three_sends);
    REQUIRE(receive(loop, opened.peer, 13));
    CHECK(ran);
    CHECK(opened.peer.received == "one,two,three");
    CHECK(held == 13);
    REQUIRE(log.count(opened.fd) == 1);
    CHECK(log.on(opened.fd)[0].taken == "one,two,three");
  }
  SECTION("posted work") {
    loop.post(three_sends);
    REQUIRE(receive(loop, opened.peer, 13));
    CHECK(ran);
    CHECK(opened.peer.received == "one,two,three");
    CHECK(held == 13);
    REQUIRE(log.count(opened.fd) == 1);
    CHECK(log.on(opened.fd)[0].taken == "one,two,three");
  }
}

TEMPLATE_TEST_CASE("sends alternating between two connections keep each one's order",
                   "[connection][coalesce]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  WriteLog log;
  Record record_a;
  Record record_b;
  Loop<TestType> loop;
  auto a = open_pair(loop, responder(record_a, kIgnore));
  auto b = open_pair(loop, responder(record_b, kIgnore));
  prime(loop, *a.connection, a.peer, log);
  prime(loop, *b.connection, b.peer, log);
  auto* ca = a.connection;
  auto* cb = b.connection;

  SECTION("runs of sends: a a a b b a") {
    loop.schedule_after(0ms, [ca, cb] {
      ca->send("a1,");
      ca->send("a2,");
      ca->send("a3,");
      cb->send("b1,");
      cb->send("b2");
      ca->send("a4");
    });
    REQUIRE(test::run_until(loop, [&] {
      a.peer.step();
      b.peer.step();
      return a.peer.received.size() >= 11 && b.peer.received.size() >= 5;
    }));
    CHECK(a.peer.received == "a1,a2,a3,a4");
    CHECK(b.peer.received == "b1,b2");
    // Two switches: what a held leaves when b begins, b's when a begins again, a's at the end.
    CHECK(log.order({a.fd, b.fd}) == std::vector<int>{a.fd, b.fd, a.fd});
    CHECK(log.on(a.fd)[0].taken == "a1,a2,a3,");
  }
  SECTION("one send each in turn") {
    loop.post([ca, cb] {
      for (int i = 0; i < 4; ++i) {
        ca->send("a" + std::to_string(i));
        cb->send("b" + std::to_string(i));
      }
    });
    REQUIRE(test::run_until(loop, [&] {
      a.peer.step();
      b.peer.step();
      return a.peer.received.size() >= 8 && b.peer.received.size() >= 8;
    }));
    CHECK(a.peer.received == "a0a1a2a3");
    CHECK(b.peer.received == "b0b1b2b3");
    CHECK(log.count(a.fd) + log.count(b.fd) <= 8);  // 7 switches: at most one write each, + 1
    CHECK(log.count(a.fd) == 4);
    CHECK(log.count(b.fd) == 4);
  }
}

// --- Sends followed by close(), shutdown(), abort() or a throw -----------------------------------

TEMPLATE_TEST_CASE("bytes sent before close shutdown abort or a throw in one step still go out",
                   "[connection][close][coalesce]", reactor::LevelTriggered,
                   reactor::EdgeTriggered) {
  enum class End { kClose, kShutdown, kAbort, kEchoAbort, kThrow };
  WriteLog log;
  Record record;
  Loop<TestType> loop;
  End end = End::kClose;
  auto respond = [&end](auto& connection, std::string_view bytes) {
    if (bytes != "go") return;  // after shutdown(), later input is only recorded
    connection.send(bytes);     // held, pointing into the read buffer
    if (end != End::kEchoAbort) {
      connection.send("-one");
      connection.send("-two");
    }
    switch (end) {
      case End::kClose:
        connection.close();
        break;
      case End::kShutdown:
        connection.shutdown();
        break;
      case End::kAbort:
      case End::kEchoAbort:
        connection.abort();
        break;
      case End::kThrow:
        throw std::runtime_error("handler failed after sending");
    }
  };
  auto opened = open_pair(loop, responder(record, respond));
  test::Peer& peer = opened.peer;
  prime(loop, *opened.connection, peer, log);
  const auto send_go = [&] {
    peer.to_send = "go";
    return test::run_until(loop, [&] {
      peer.step();
      return peer.eof || peer.error != 0;
    });
  };

  SECTION("close") {
    end = End::kClose;
    REQUIRE(send_go());
    CHECK(peer.received == "go-one-two");  // then EOF
    CHECK(log.count(opened.fd) == 1);
    CHECK(record.closes == 0);  // lingering for the peer's EOF
    peer.shutdown_write();
    REQUIRE(test::run_until(loop, [&] { return record.closes == 1; }));
    CHECK_FALSE(record.reason);
  }
  SECTION("shutdown") {
    end = End::kShutdown;
    REQUIRE(send_go());
    CHECK(peer.received == "go-one-two");  // then FIN
    CHECK(log.count(opened.fd) == 1);
    CHECK(opened.connection->state() == reactor::ConnectionState::kShuttingDown);
    peer.to_send += "after";  // reading goes on
    REQUIRE(test::run_until(loop, [&] {
      peer.step();
      return record.data == "goafter";
    }));
    peer.shutdown_write();
    REQUIRE(test::run_until(loop, [&] { return record.closes == 1; }));
    CHECK_FALSE(record.reason);
  }
  SECTION("abort") {
    end = End::kAbort;
    REQUIRE(send_go());
    CHECK(peer.received == "go-one-two");
    CHECK(log.count(opened.fd) == 1);
    REQUIRE(test::run_until(loop, [&] { return record.closes == 1; }));
    CHECK_FALSE(record.reason);
  }
  SECTION("abort right after echoing the input") {
    end = End::kEchoAbort;
    REQUIRE(send_go());
    CHECK(peer.received == "go");
    CHECK(log.count(opened.fd) == 1);
    REQUIRE(test::run_until(loop, [&] { return record.closes == 1; }));
    CHECK_FALSE(record.reason);
  }
  SECTION("a throw") {
    end = End::kThrow;
    REQUIRE(send_go());
    CHECK(peer.received == "go-one-two");
    CHECK(log.count(opened.fd) == 1);
    REQUIRE(test::run_until(loop, [&] { return record.closes == 1; }));
    CHECK(record.reason == reactor::make_error_code(reactor::Error::kHandlerException));
  }
}

// --- cork() and uncork() -------------------------------------------------------------------------

TEMPLATE_TEST_CASE("cork outside the loop holds every send until uncork or close",
                   "[connection][cork]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  WriteLog log;
  Record record;
  Loop<TestType> loop;
  auto opened = open_pair(loop, responder(record, kIgnore));
  auto& connection = *opened.connection;
  test::Peer& peer = opened.peer;
  const std::string large = test::pattern(40 * 1024, 81);

  SECTION("without cork each send writes at once") {
    CHECK(connection.send("first,"));
    CHECK(connection.send("second"));
    CHECK(log.count(opened.fd) == 2);
    REQUIRE(receive(loop, peer, 12));
    CHECK(peer.received == "first,second");
  }
  SECTION("uncork writes all of it with one write") {
    connection.cork();
    CHECK(connection.send("first,"));
    CHECK(connection.send({"second,", "third,"}));
    CHECK(connection.send(large));
    CHECK(log.count(opened.fd) == 0);
    CHECK(connection.pending_output_bytes() == 19 + large.size());
    loop.run_once(0ms);  // the loop writes nothing either
    CHECK(log.count(opened.fd) == 0);
    connection.uncork();
    const std::vector<WriteCall> calls = log.on(opened.fd);
    REQUIRE(calls.size() == 1);
    CHECK(calls[0].offered == 19 + large.size());
    CHECK(calls[0].result == static_cast<ssize_t>(19 + large.size()));
    CHECK(connection.pending_output_bytes() == 0);
    REQUIRE(receive(loop, peer, 19 + large.size()));
    CHECK(mismatch(peer.received, "first,second,third," + large) == "");
  }
  SECTION("close while corked flushes then closes") {
    connection.cork();
    CHECK(connection.send("last "));
    CHECK(connection.send("words"));
    CHECK(log.count(opened.fd) == 0);
    connection.close();
    CHECK(log.count(opened.fd) == 1);
    REQUIRE(test::run_until(loop, [&] {
      peer.step();
      return peer.eof;
    }));
    CHECK(peer.received == "last words");
    peer.shutdown_write();
    REQUIRE(test::run_until(loop, [&] { return record.closes == 1; }));
    CHECK_FALSE(record.reason);
  }
  SECTION("shutdown while corked flushes then sends FIN") {
    connection.cork();
    CHECK(connection.send("bye"));
    connection.shutdown();
    CHECK(log.count(opened.fd) == 1);
    REQUIRE(test::run_until(loop, [&] {
      peer.step();
      return peer.eof;
    }));
    CHECK(peer.received == "bye");
    CHECK(connection.state() == reactor::ConnectionState::kShuttingDown);
  }
}

TEMPLATE_TEST_CASE("cork and uncork inside one callback keep the held bytes first",
                   "[connection][cork][coalesce]", reactor::LevelTriggered,
                   reactor::EdgeTriggered) {
  WriteLog log;
  Record record;
  Loop<TestType> loop;
  auto respond = [](auto& connection, std::string_view /*bytes*/) {
    connection.send("status;");  // held until the step ends
    connection.send("headers;");
    connection.cork();
    connection.send("body");  // queued behind the cork
    connection.uncork();
  };
  auto opened = open_pair(loop, responder(record, respond));
  prime(loop, *opened.connection, opened.peer, log);
  opened.peer.to_send = "request";
  REQUIRE(receive(loop, opened.peer, 19));
  CHECK(opened.peer.received == "status;headers;body");
  CHECK(log.bytes(opened.fd) == 19);
}

TEMPLATE_TEST_CASE("a held write cut short stays ahead of bytes corked after it",
                   "[connection][cork][partial]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  WriteLog log;
  test::FaultScript script;
  Record record;
  Loop<TestType> loop;
  auto respond = [](auto& connection, std::string_view bytes) {
    if (bytes == "uncork") {
      connection.uncork();
      return;
    }
    connection.send("first-");
    connection.send("second-");
    connection.cork();
    connection.send("third");
  };
  auto opened = open_pair(loop, responder(record, respond));
  prime(loop, *opened.connection, opened.peer, log);
  script.next(test::Call::kSend, test::at_most(4, opened.fd));  // the held bytes' write
  opened.peer.to_send = "request";
  REQUIRE(test::run_until(loop, [&] {
    opened.peer.step();
    return record.data_calls == 1 && opened.peer.received.size() >= 4;
  }));
  opened.peer.to_send += "uncork";
  REQUIRE(receive(loop, opened.peer, 18));
  CHECK(opened.peer.received == "first-second-third");
}

// Output the kernel was refusing at cork() keeps going out (what was sent after it rides along
// in the same writes, in order); once the queue is empty, cork() holds what is sent.
TEMPLATE_TEST_CASE("cork lets queued output drain then holds what is sent",
                   "[connection][cork][partial]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  WriteLog log;
  Record record;
  Loop<TestType> loop;
  auto opened = open_pair(loop, responder(record, kIgnore));
  auto& connection = *opened.connection;
  test::Peer& peer = opened.peer;
  const std::string large = test::pattern(1024 * 1024, 91);  // more than the socket takes
  CHECK(connection.send(large));
  REQUIRE(connection.pending_output_bytes() > 0);
  connection.cork();
  CHECK(connection.send("tail"));
  CHECK(connection.pending_output_bytes() > 4);
  REQUIRE(receive(loop, peer, large.size() + 4));  // while corked
  CHECK(mismatch(peer.received, large + "tail") == "");
  CHECK(connection.pending_output_bytes() == 0);
  CHECK(connection.send("held"));
  for (int i = 0; i < 10; ++i) {
    peer.step();
    loop.run_once(0ms);
  }
  peer.step();
  CHECK(connection.pending_output_bytes() == 4);
  CHECK(peer.received.size() == large.size() + 4);
  connection.uncork();
  REQUIRE(receive(loop, peer, large.size() + 8));
  CHECK(mismatch(peer.received, large + "tailheld") == "");
}

// --- on_eof sending a goodbye --------------------------------------------------------------------

namespace {

// Says goodbye when the peer half-closes (two sends: held together), then closes, shuts down, or
// leaves the connection open, as `then` says.
struct Goodbye {
  enum class Then { kClose, kShutdown, kNothing };
  Record* record;
  Then then;

  void on_data(auto& connection, std::string_view bytes) {
    ++record->data_calls;
    record->data += bytes;
    connection.send(bytes);
  }
  void on_eof(auto& connection) {
    ++record->eofs;
    connection.send("good");
    connection.send("bye");
    if (then == Then::kClose) connection.close();
    if (then == Then::kShutdown) connection.shutdown();
  }
  void on_close(auto& /*connection*/, std::error_code reason) {
    ++record->closes;
    record->reason = reason;
  }
};

// The peer half-closes after one echoed message; `then` says what on_eof does after its goodbye.
template <class Mode>
void say_goodbye(Goodbye::Then then) {
  using Then = Goodbye::Then;
  WriteLog log;
  Record record;
  Loop<Mode> loop;
  auto opened = open_pair(loop, Goodbye{&record, then});
  test::Peer& peer = opened.peer;
  prime(loop, *opened.connection, peer, log);
  peer.to_send = "hello ";
  REQUIRE(receive(loop, peer, 6));
  peer.shutdown_write();

  // A bounded number of iterations, each waiting at most 10 ms: the goodbye, then EOF (or, left
  // open, nothing).
  const bool closes = then != Then::kNothing;
  const auto finished = [&] {
    return peer.received == "hello goodbye" && (!closes || (peer.eof && record.closes == 1));
  };
  int iterations = 0;
  while (!finished() && iterations < 200) {
    loop.run_once(10ms);
    peer.step();
    ++iterations;
  }
  CHECK(finished());
  CHECK(iterations < 200);
  CHECK(record.eofs == 1);
  REQUIRE(log.count(opened.fd) == 2);  // the echo, then the goodbye's two sends together
  CHECK(log.on(opened.fd).back().taken == "goodbye");
  // Nothing is left to do. Edge mode may still report one last edge (EPOLLOUT, from the peer's
  // read of the goodbye); after that, any event would be one that comes on every iteration.
  for (int i = 0; i < 3; ++i) loop.run_once(0ms);
  std::size_t events = 0;
  for (int i = 0; i < 20; ++i) events += loop.run_once(0ms);
  CHECK(events == 0);
  if (!closes) {
    CHECK(record.closes == 0);
    CHECK_FALSE(peer.eof);
    opened.connection->close();  // the peer's EOF was read: it closes at once
    REQUIRE(test::run_until(loop, [&] { return record.closes == 1; }));
    peer.step();
    CHECK(peer.eof);
  }
  CHECK(record.closes == 1);
  CHECK_FALSE(record.reason);
  CHECK(peer.received == "hello goodbye");
}

}  // namespace

TEMPLATE_TEST_CASE("on_eof sending a goodbye delivers it and the loop does not spin",
                   "[connection][eof][coalesce]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  SECTION("then close") {
    say_goodbye<TestType>(Goodbye::Then::kClose);
  }
  SECTION("then shutdown") {
    say_goodbye<TestType>(Goodbye::Then::kShutdown);
  }
  SECTION("then nothing") {
    say_goodbye<TestType>(Goodbye::Then::kNothing);
  }
}

// --- pause_reading() after a send ----------------------------------------------------------------

TEMPLATE_TEST_CASE("pause_reading after a send in one step still sends and stops on_data",
                   "[connection][coalesce][pause]", reactor::LevelTriggered,
                   reactor::EdgeTriggered) {
  WriteLog log;
  Record record;
  Loop<TestType> loop;
  auto respond = [](auto& connection, std::string_view bytes) {
    connection.send("got:");
    connection.send(bytes);
    if (bytes == "pause") connection.pause_reading();
  };
  auto opened = open_pair(loop, responder(record, respond));
  test::Peer& peer = opened.peer;
  auto& connection = *opened.connection;
  prime(loop, connection, peer, log);

  peer.to_send = "pause";
  REQUIRE(receive(loop, peer, 9));
  CHECK(peer.received == "got:pause");
  CHECK(log.count(opened.fd) == 1);
  CHECK_FALSE(connection.is_reading());

  peer.to_send += "more";
  peer.step();
  REQUIRE(peer.all_sent());
  std::size_t events = 0;
  for (int i = 0; i < 5; ++i) events += loop.run_once(0ms);  // the bytes are there to be read
  CHECK(record.data_calls == 1);
  CHECK(record.data == "pause");
  if constexpr (!kEdge<TestType>) CHECK(events == 0);  // EPOLLIN is off: no event, no spin

  connection.resume_reading();
  REQUIRE(receive(loop, peer, 17));
  CHECK(record.data_calls == 2);
  CHECK(record.data == "pausemore");
  CHECK(peer.received == "got:pausegot:more");
  CHECK(log.count(opened.fd) == 2);
}
