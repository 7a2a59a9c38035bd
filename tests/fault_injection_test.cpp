// Fault injection through the syscall seam (test::FaultSyscalls): EINTR, spurious EAGAIN, short
// writes, accept errors and epoll_ctl failures, each checked against the bytes, counts and error
// codes the public API promises. The real-EMFILE test uses the default policy and a lowered
// RLIMIT_NOFILE.
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "fault_syscalls.hpp"
#include "loopback.hpp"

namespace {

using namespace std::chrono_literals;
using test::at_most;
using test::Call;
using test::fail;
using test::FaultScript;

template <class Trigger>
using FaultReactor = reactor::Reactor<Trigger, test::FaultSyscalls>;
using LevelReactor = FaultReactor<reactor::LevelTriggered>;

constexpr std::size_t kKiB = 1024;

// What one connection (or every connection of an acceptor) saw. Declared before the reactor, so
// that it outlives the on_close calls of the reactor's destructor.
struct Record {
  std::string received;
  int opened = 0;
  int closed = 0;
  std::error_code reason;
};

// Records every callback into a Record; echoes input when asked.
struct Recorder {
  Record* record;
  bool echo = false;

  template <class C>
  void on_open(C&) {
    ++record->opened;
  }
  template <class C>
  void on_data(C& connection, std::string_view bytes) {
    record->received.append(bytes);
    if (echo)
      connection.send(bytes);
  }
  template <class C>
  void on_close(C&, std::error_code reason) {
    ++record->closed;
    record->reason = reason;
  }
};

std::error_code sys(int error) {
  return {error, std::system_category()};
}

// A connection adopted from one end of a socketpair, and the test's end as a Peer. Tests name
// the members with references, not a structured binding: clang before 16 cannot capture one.
template <class Loop>
struct Adopted {
  reactor::Connection<Recorder, Loop>* connection;
  test::Peer peer;
};

template <class Loop>
Adopted<Loop> adopt_pair(Loop& loop, Record& record, bool echo = false) {
  auto [ours, theirs] = test::socket_pair();
  return {&reactor::adopt(loop, std::move(ours), Recorder{&record, echo}),
          test::Peer(std::move(theirs))};
}

// A loopback client of `acceptor` (connected through the listen backlog, accepted or not).
template <class Acceptor>
test::Peer connect_client(const Acceptor& acceptor, std::string to_send) {
  test::Peer peer(reactor::connect(acceptor.local_endpoint()));
  peer.to_send = std::move(to_send);
  return peer;
}

// Runs the loop for `window` of wall time: an observation window for counting retries, never a
// way to wait for something.
template <class Loop>
void run_for(Loop& loop, std::chrono::milliseconds window) {
  const auto end = std::chrono::steady_clock::now() + window;
  while (std::chrono::steady_clock::now() < end)
    loop.run_once(50ms);
}

// Drives the loop and `peer` until the peer has received `size` bytes; then a few more rounds,
// so that a duplicated tail would show up too.
template <class Loop>
bool receive_all(Loop& loop, test::Peer& peer, std::size_t size) {
  const bool done = test::run_until(loop, [&] {
    peer.step();
    return peer.received.size() >= size || peer.eof || peer.error != 0;
  });
  for (int i = 0; i < 3; ++i) {
    loop.run_once(0ms);
    peer.step();
  }
  return done;
}

reactor::Endpoint loopback() {
  return reactor::Endpoint::from_host_port("127.0.0.1", 0);
}

}  // namespace

// --- EINTR ---------------------------------------------------------------------------------

TEST_CASE("EINTR from epoll_wait is retried and the event still arrives", "[fault][eintr]") {
  Record record;
  FaultScript script;
  LevelReactor loop;
  auto adopted = adopt_pair(loop, record);
  auto* connection = adopted.connection;
  test::Peer& peer = adopted.peer;
  REQUIRE(connection->is_open());

  SECTION("a pending event is delivered by the same run_once") {
    script.next(Call::kEpollWait, fail(EINTR), 3);
    peer.to_send = "hello";
    peer.step();
    REQUIRE(peer.all_sent());

    const std::size_t events = loop.run_once(5s);

    CHECK(events == 1);
    CHECK(record.received == "hello");
    CHECK(script.calls(Call::kEpollWait) == 4);
    CHECK(script.faults(Call::kEpollWait) == 3);
  }

  SECTION("with nothing to report, the retry waits out the rest of the timeout") {
    script.next(Call::kEpollWait, fail(EINTR), 2);
    const auto start = std::chrono::steady_clock::now();

    const std::size_t events = loop.run_once(60ms);

    // A lower bound only: an EINTR must not cut the wait short.
    CHECK(std::chrono::steady_clock::now() - start >= 55ms);
    CHECK(events == 0);
    CHECK(script.calls(Call::kEpollWait) == 3);
  }
}

TEMPLATE_TEST_CASE("EINTR from read is retried and every byte arrives once, in order",
                   "[fault][eintr][read]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  Record record;
  FaultScript script;
  FaultReactor<TestType> loop;
  auto adopted = adopt_pair(loop, record);
  auto* connection = adopted.connection;
  test::Peer& peer = adopted.peer;
  script.next(Call::kRead, fail(EINTR, connection->native_handle()), 5);
  peer.to_send = test::pattern(300 * kKiB, 2);

  REQUIRE(test::run_until(loop, [&] {
    peer.step();
    return record.received.size() >= peer.to_send.size();
  }));
  loop.run_once(0ms);

  CHECK(record.received == peer.to_send);
  CHECK(script.faults(Call::kRead) == 5);
  CHECK(script.pending(Call::kRead) == 0);
  CHECK(record.closed == 0);
}

TEMPLATE_TEST_CASE("EINTR from send and sendmsg is retried and every byte arrives once, in order",
                   "[fault][eintr][write]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  Record record;
  FaultScript script;
  FaultReactor<TestType> loop;
  auto adopted = adopt_pair(loop, record);
  auto* connection = adopted.connection;
  test::Peer& peer = adopted.peer;
  const int fd = connection->native_handle();

  SECTION("direct write from send()") {
    const std::string payload = test::pattern(1000, 3);
    script.next(Call::kSend, fail(EINTR, fd), 3);

    CHECK(connection->send(payload));
    CHECK(connection->pending_output_bytes() == 0);  // retried at once, not queued
    CHECK(script.calls(Call::kSend) == 4);
    REQUIRE(receive_all(loop, peer, payload.size()));
    CHECK(peer.received == payload);
  }

  SECTION("queued flush through sendmsg") {
    const std::string payload = test::pattern(256 * kKiB, 4);
    script.next(Call::kSend, at_most(100, fd));  // the rest is queued
    script.next(Call::kSendmsg, fail(EINTR, fd), 3);

    CHECK(connection->send(payload));
    CHECK(connection->pending_output_bytes() == payload.size() - 100);
    REQUIRE(receive_all(loop, peer, payload.size()));
    CHECK(peer.received == payload);
    CHECK(script.faults(Call::kSendmsg) == 3);
    CHECK(script.calls(Call::kSendmsg) > 3);
    CHECK(connection->pending_output_bytes() == 0);
  }
  CHECK(record.closed == 0);
}

// --- Short transfers and spurious EAGAIN ---------------------------------------------------

TEMPLATE_TEST_CASE("short writes of any size deliver every byte once, in order",
                   "[fault][short-write]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  const std::size_t cap = GENERATE(std::size_t{1}, 7, 100, 4095, 16 * kKiB + 1);
  CAPTURE(cap);
  Record record;
  FaultScript script;
  FaultReactor<TestType> loop;
  auto adopted = adopt_pair(loop, record);
  auto* connection = adopted.connection;
  test::Peer& peer = adopted.peer;
  const std::string payload = test::pattern(256 * kKiB, 5);
  script.always(Call::kSend, at_most(cap));
  script.always(Call::kSendmsg, at_most(cap));

  CHECK(connection->send(payload));
  REQUIRE(receive_all(loop, peer, payload.size()));

  CHECK(peer.received.size() == payload.size());
  CHECK(peer.received == payload);
  CHECK(connection->pending_output_bytes() == 0);
  // Every call moved at most `cap` bytes, so it took at least this many.
  CHECK(script.calls(Call::kSend) + script.calls(Call::kSendmsg) >= payload.size() / cap);
  CHECK(record.closed == 0);
}

TEMPLATE_TEST_CASE("a spurious EAGAIN from read loses no bytes once more arrive",
                   "[fault][eagain][read]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  Record record;
  FaultScript script;
  FaultReactor<TestType> loop;
  auto adopted = adopt_pair(loop, record);
  auto* connection = adopted.connection;
  test::Peer& peer = adopted.peer;
  script.next(Call::kRead, fail(EAGAIN, connection->native_handle()));
  peer.to_send = "first";
  peer.step();
  REQUIRE(test::run_until(loop, [&] { return script.faults(Call::kRead) == 1; }));

  peer.to_send += "second";
  REQUIRE(test::run_until(loop, [&] {
    peer.step();
    return record.received.size() >= 11;
  }));
  loop.run_once(0ms);

  CHECK(record.received == "firstsecond");
  CHECK(record.closed == 0);
}

namespace {

// Edge mode reads until EAGAIN or a short read, then waits for the next edge. When either comes
// while bytes are still queued, no edge is coming for them, and the peer here sends nothing more
// (think of a request waiting for its reply): the bytes must be delivered all the same.
// A short read with bytes left is real Linux behaviour: tcp_recvmsg stops at the urgent mark
// (MSG_OOB), unix_stream_read_generic after an skb that carried SCM_RIGHTS.
template <class Trigger>
void check_bytes_left_in_socket_are_delivered(const test::Outcome& first_read) {
  Record record;
  FaultScript script;
  FaultReactor<Trigger> loop;
  auto adopted = adopt_pair(loop, record);
  auto* connection = adopted.connection;
  test::Peer& peer = adopted.peer;
  loop.run_once(0ms);  // edge mode: take the initial EPOLLOUT edge out of the way
  test::Outcome outcome = first_read;
  outcome.fd = connection->native_handle();
  script.next(Call::kRead, outcome);
  std::string request;
  for (int i = 0; i < 20; ++i)
    request += "request-" + std::to_string(i) + ';';
  peer.to_send = request;
  peer.step();
  REQUIRE(peer.all_sent());

  // Generous: on a socketpair the bytes are there at once; a lost wakeup never recovers.
  CHECK(test::run_until(
      loop, [&] { return record.received.size() >= request.size(); }, 2s));
  CHECK(record.received == request);
  CHECK(script.faults(Call::kRead) == 1);
}

}  // namespace

TEMPLATE_TEST_CASE("bytes left in the socket after a short read are delivered",
                   "[fault][short-read][read]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  check_bytes_left_in_socket_are_delivered<TestType>(at_most(10));
}

// Linux does not return EAGAIN while bytes are queued for the only reader; this guards the
// policy-level contract (a seam, a TLS layer) rather than a kernel behaviour.
TEMPLATE_TEST_CASE("bytes left in the socket after a spurious EAGAIN are delivered",
                   "[fault][eagain][read]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  check_bytes_left_in_socket_are_delivered<TestType>(fail(EAGAIN));
}

// --- accept4 -------------------------------------------------------------------------------

TEST_CASE("EINTR from accept4 is retried and the connection is accepted",
          "[fault][eintr][accept]") {
  Record record;
  FaultScript script;
  LevelReactor loop;
  reactor::Acceptor<Recorder, LevelReactor> acceptor(loop, loopback(), Recorder{&record, true});
  script.next(Call::kAccept4, fail(EINTR), 2);
  test::Peer client = connect_client(acceptor, "ping");

  REQUIRE(receive_all(loop, client, 4));

  CHECK(client.received == "ping");
  CHECK(acceptor.accepted_count() == 1);
  CHECK(record.opened == 1);
  CHECK(script.faults(Call::kAccept4) == 2);
  CHECK(acceptor.failed_count() == 0);
  CHECK_FALSE(acceptor.last_error());
  CHECK_FALSE(acceptor.is_backing_off());
}

TEST_CASE("EMFILE from accept4 backs off without spinning and recovers",
          "[fault][emfile][accept]") {
  Record record;
  Record bystander_record;
  FaultScript script;
  LevelReactor loop;
  reactor::Acceptor<Recorder, LevelReactor> acceptor(loop, loopback(), Recorder{&record, true});
  auto bystander = adopt_pair(loop, bystander_record);
  script.always(Call::kAccept4, fail(EMFILE));
  test::Peer client = connect_client(acceptor, "ping");
  client.step();

  const auto iterations = loop.loop_iterations();
  run_for(loop, 250ms);

  // Backoff is 10 ms doubling: about five attempts in 250 ms. A spin would make thousands.
  const std::size_t attempts = script.calls(Call::kAccept4);
  CAPTURE(attempts, loop.loop_iterations() - iterations);
  CHECK(attempts >= 2);
  CHECK(attempts <= 12);
  CHECK(loop.loop_iterations() - iterations <= 40);
  CHECK(acceptor.is_backing_off());
  CHECK(acceptor.last_error() == sys(EMFILE));
  CHECK(acceptor.failed_count() == attempts);
  CHECK(acceptor.accepted_count() == 0);
  CHECK(acceptor.is_open());
  CHECK(record.opened == 0);

  script.clear(Call::kAccept4);  // fds are available again

  SECTION("after the backoff") {
    REQUIRE(receive_all(loop, client, 4));
    CHECK(client.received == "ping");
  }

  SECTION("as soon as one of the reactor's connections closes") {
    REQUIRE(acceptor.is_backing_off());
    bystander.connection->abort();  // close() would linger for the peer's FIN first
    loop.run_once(0ms);             // finalizes the bystander, then resumes the acceptor
    CHECK(bystander_record.closed == 1);
    CHECK(acceptor.accepted_count() == 1);
    REQUIRE(receive_all(loop, client, 4));
    CHECK(client.received == "ping");
  }

  CHECK(acceptor.accepted_count() == 1);
  CHECK(record.opened == 1);
  CHECK_FALSE(acceptor.is_backing_off());
}

TEST_CASE("a real EMFILE from a lowered RLIMIT_NOFILE backs off without spinning and recovers",
          "[fault][emfile][accept][rlimit]") {
  Record record;
  reactor::Reactor<> loop;  // the default policy: the kernel itself runs out of fds
  reactor::Acceptor<Recorder> acceptor(loop, loopback(), Recorder{&record, true});
  std::vector<test::Peer> clients;
  clients.reserve(3);
  for (int i = 0; i < 3; ++i)
    clients.push_back(connect_client(acceptor, "ping"));

  std::optional<test::FdLimit> limit;
  limit.emplace(test::open_fd_count() + 16);
  std::vector<reactor::UniqueFd> filler;
  for (;;) {
    const int fd = ::eventfd(0, EFD_CLOEXEC);
    if (fd < 0) {
      REQUIRE(errno == EMFILE);
      break;
    }
    filler.emplace_back(fd);
    REQUIRE(filler.size() < 1000);
  }

  const auto iterations = loop.loop_iterations();
  run_for(loop, 250ms);

  CAPTURE(acceptor.failed_count(), loop.loop_iterations() - iterations);
  CHECK(acceptor.is_backing_off());
  CHECK(acceptor.last_error() == sys(EMFILE));
  CHECK(acceptor.accepted_count() == 0);
  CHECK(acceptor.failed_count() >= 2);
  CHECK(acceptor.failed_count() <= 12);
  CHECK(loop.loop_iterations() - iterations <= 40);

  // The reactor cannot see either change: the backoff timer finds it.
  SECTION("after the limit is restored") {
    limit.reset();
    CHECK(acceptor.is_backing_off());
  }
  SECTION("after fds are freed") {
    filler.clear();
    CHECK(acceptor.is_backing_off());
  }

  REQUIRE(test::run_until(loop, [&] {
    bool all = true;
    for (auto& client : clients) {
      client.step();
      all = all && client.received == "ping";
    }
    return all;
  }));
  CHECK(acceptor.accepted_count() == 3);
  CHECK(record.opened == 3);
  CHECK_FALSE(acceptor.is_backing_off());
}

TEST_CASE("a transient accept4 error is skipped and the next connection is accepted",
          "[fault][accept]") {
  const int error = GENERATE(ECONNABORTED, EPROTO);
  CAPTURE(error);
  Record record;
  FaultScript script;
  LevelReactor loop;
  reactor::Acceptor<Recorder, LevelReactor> acceptor(loop, loopback(), Recorder{&record, true});
  script.next(Call::kAccept4, fail(error));
  test::Peer first = connect_client(acceptor, "one");
  test::Peer second = connect_client(acceptor, "two");

  REQUIRE(test::run_until(loop, [&] {
    first.step();
    second.step();
    return first.received == "one" && second.received == "two";
  }));

  CHECK(acceptor.accepted_count() == 2);
  CHECK(script.faults(Call::kAccept4) == 1);
  CHECK(acceptor.last_error() == sys(error));
  CHECK(acceptor.failed_count() == 0);
  CHECK_FALSE(acceptor.is_backing_off());
  CHECK(acceptor.is_open());
}

TEST_CASE("epoll_ctl failing for an accepted connection drops it and accepting goes on",
          "[fault][epoll_ctl][accept]") {
  Record record;
  FaultScript script;
  LevelReactor loop;
  reactor::Acceptor<Recorder, LevelReactor> acceptor(loop, loopback(), Recorder{&record, true});
  const std::size_t fds_before = test::open_fd_count();
  script.next(Call::kEpollCtl, fail(ENOMEM));  // the next one: adding the accepted socket
  test::Peer first = connect_client(acceptor, "one");

  REQUIRE(test::run_until(loop, [&] {
    first.step();
    return first.eof || first.error != 0;
  }));
  CHECK(first.received.empty());
  CHECK(acceptor.failed_count() == 1);
  CHECK(acceptor.last_error() == sys(ENOMEM));
  CHECK(record.opened == 0);
  CHECK(test::open_fd_count() == fds_before + 1);  // only the client's end

  test::Peer second = connect_client(acceptor, "two");
  REQUIRE(receive_all(loop, second, 3));
  CHECK(second.received == "two");
  CHECK(acceptor.accepted_count() == 2);
  CHECK(record.opened == 1);
  CHECK_FALSE(acceptor.is_backing_off());
}

TEST_CASE("epoll_ctl failing when a backed-off acceptor resumes does not strand it",
          "[fault][epoll_ctl][accept]") {
  Record record;
  FaultScript script;
  LevelReactor loop;
  reactor::Acceptor<Recorder, LevelReactor> acceptor(loop, loopback(), Recorder{&record, true});
  const int listener = acceptor.native_handle();
  script.next(Call::kAccept4, fail(ENOMEM));             // backs off ...
  script.next(Call::kEpollCtl, test::pass(listener));    // ... silencing the listener ...
  script.next(Call::kEpollCtl, fail(ENOMEM, listener));  // ... and re-arming it fails once
  test::Peer client = connect_client(acceptor, "ping");

  // Generous: backoff starts at 10 ms; an acceptor nobody will resume never recovers.
  const bool served = test::run_until(
      loop,
      [&] {
        client.step();
        return client.received == "ping";
      },
      3s);

  CHECK(script.faults(Call::kEpollCtl) == 1);
  CHECK(script.pending(Call::kEpollCtl) == 0);
  // Out of kernel memory means another backoff (acceptor.hpp); at the very least the acceptor
  // must not sit open, idle and not backing off, with nothing left to wake it.
  const bool gave_up_visibly = !acceptor.is_open() && acceptor.last_error() == sys(ENOMEM);
  CAPTURE(acceptor.is_open(), acceptor.is_backing_off(), acceptor.last_error().message());
  CHECK((served || gave_up_visibly));
}

// --- I/O errors close the connection -------------------------------------------------------

TEMPLATE_TEST_CASE("ECONNRESET from read closes the connection once with that error",
                   "[fault][close][read]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  Record record;
  FaultScript script;
  FaultReactor<TestType> loop;
  const std::size_t fds_before = test::open_fd_count();
  auto adopted = adopt_pair(loop, record);
  auto* connection = adopted.connection;
  test::Peer& peer = adopted.peer;
  REQUIRE(test::open_fd_count() == fds_before + 2);
  script.next(Call::kRead, fail(ECONNRESET, connection->native_handle()));
  peer.to_send = "doomed";
  peer.step();

  REQUIRE(test::run_until(loop, [&] { return record.closed > 0; }));
  loop.run_once(0ms);
  loop.run_once(0ms);

  CHECK(record.closed == 1);
  CHECK(record.reason == sys(ECONNRESET));
  CHECK(record.received.empty());
  CHECK(loop.connection_count() == 0);
  CHECK(test::open_fd_count() == fds_before + 1);  // only the test's end is left
  peer.step();
  CHECK((peer.eof || peer.error != 0));  // the peer sees the socket gone
}

TEMPLATE_TEST_CASE("EPIPE from a write closes the connection once with that error",
                   "[fault][close][write]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  Record record;
  FaultScript script;
  FaultReactor<TestType> loop;
  const std::size_t fds_before = test::open_fd_count();
  auto adopted = adopt_pair(loop, record);
  auto* connection = adopted.connection;
  test::Peer& peer = adopted.peer;
  const int fd = connection->native_handle();

  SECTION("direct write from send()") {
    script.next(Call::kSend, fail(EPIPE, fd));
    CHECK_FALSE(connection->send("lost"));
    CHECK_FALSE(connection->is_open());
  }

  SECTION("queued flush through sendmsg") {
    const std::string payload = test::pattern(1000, 6);
    script.next(Call::kSend, at_most(10, fd));
    script.next(Call::kSendmsg, fail(EPIPE, fd));
    CHECK(connection->send(payload));
    REQUIRE(receive_all(loop, peer, payload.size()));
    CHECK(peer.received == payload.substr(0, 10));
  }

  REQUIRE(test::run_until(loop, [&] { return record.closed > 0; }));
  loop.run_once(0ms);
  loop.run_once(0ms);

  CHECK(record.closed == 1);
  CHECK(record.reason == sys(EPIPE));
  CHECK(loop.connection_count() == 0);
  CHECK(test::open_fd_count() == fds_before + 1);
  peer.step();
  CHECK(peer.eof);
}

// --- epoll_ctl -----------------------------------------------------------------------------

TEST_CASE("epoll_ctl failing on adopt returns the error and leaks nothing",
          "[fault][epoll_ctl][adopt]") {
  const int error = GENERATE(ENOMEM, ENOSPC);
  CAPTURE(error);
  Record record;
  Record other_record;
  FaultScript script;
  LevelReactor loop;
  const std::size_t fds_before = test::open_fd_count();

  {
    auto [ours, theirs] = test::socket_pair();
    script.next(Call::kEpollCtl, fail(error, ours.get()));
    std::error_code ec;
    auto* connection = reactor::adopt(loop, std::move(ours), Recorder{&record}, {}, ec);

    CHECK(connection == nullptr);
    CHECK(ec == sys(error));
    CHECK(script.faults(Call::kEpollCtl) == 1);
    CHECK(loop.connection_count() == 0);
    CHECK(test::open_fd_count() == fds_before + 1);  // the adopted end was closed
    char byte;
    CHECK(::read(theirs.get(), &byte, 1) == 0);
  }
  CHECK(test::open_fd_count() == fds_before);
  CHECK(record.opened == 0);
  CHECK(record.closed == 0);

  // The reactor goes on working for other connections.
  auto other = adopt_pair(loop, other_record, /*echo=*/true);
  other.peer.to_send = "still here";
  REQUIRE(receive_all(loop, other.peer, other.peer.to_send.size()));
  CHECK(other.peer.received == "still here");
  CHECK(other_record.closed == 0);
}

TEST_CASE("epoll_ctl failing to arm EPOLLOUT closes that connection with the error",
          "[fault][epoll_ctl][write]") {
  const int error = GENERATE(ENOMEM, ENOSPC);
  CAPTURE(error);
  Record failing_record;
  Record other_record;
  FaultScript script;
  LevelReactor loop;
  auto failing = adopt_pair(loop, failing_record);
  auto other = adopt_pair(loop, other_record, /*echo=*/true);
  const std::size_t fds_before = test::open_fd_count();
  const int fd = failing.connection->native_handle();
  const std::string payload = test::pattern(1000, 7);
  script.next(Call::kSend, at_most(10, fd));      // output becomes pending ...
  script.next(Call::kEpollCtl, fail(error, fd));  // ... and arming EPOLLOUT fails

  failing.connection->send(payload);  // its return value: see the next test
  CHECK_FALSE(failing.connection->is_open());

  REQUIRE(test::run_until(loop, [&] { return failing_record.closed > 0; }));
  loop.run_once(0ms);
  CHECK(failing_record.closed == 1);
  CHECK(failing_record.reason == sys(error));
  CHECK(script.faults(Call::kEpollCtl) == 1);
  CHECK(test::open_fd_count() == fds_before - 1);
  REQUIRE(receive_all(loop, failing.peer, payload.size()));
  CHECK(failing.peer.received == payload.substr(0, 10));
  CHECK(failing.peer.eof);

  // The other connection is unaffected.
  other.peer.to_send = test::pattern(100 * kKiB, 8);
  REQUIRE(receive_all(loop, other.peer, other.peer.to_send.size()));
  CHECK(other.peer.received == other.peer.to_send);
  CHECK(other_record.closed == 0);
  CHECK(loop.connection_count() == 1);
}

TEST_CASE("send() returns false when arming EPOLLOUT fails and closes the connection",
          "[fault][epoll_ctl][write]") {
  Record record;
  FaultScript script;
  LevelReactor loop;
  auto adopted = adopt_pair(loop, record);
  auto* connection = adopted.connection;
  test::Peer& peer = adopted.peer;
  const int fd = connection->native_handle();
  script.next(Call::kSend, at_most(10, fd));
  script.next(Call::kEpollCtl, fail(ENOMEM, fd));

  const bool accepted = connection->send(test::pattern(1000, 10));

  // connection.hpp: send() "Returns false when the bytes were not accepted: ... or this send
  // failed and closed it". The bytes beyond the first 10 are gone.
  CHECK_FALSE(connection->is_open());
  CHECK_FALSE(accepted);
  loop.run_once(0ms);
  CHECK(record.closed == 1);
  CHECK(record.reason == sys(ENOMEM));
  peer.step();
  CHECK(peer.received.size() == 10);  // what the kernel took before the failure
  CHECK(peer.eof);
}
