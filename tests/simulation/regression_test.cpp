// Regression tests for the fixes of a0b7a57, found by a new user's pass over the library in the
// simulated world (tests/support/sim_kernel.hpp): timeouts stamped from a stale clock outside the
// loop, level-mode input lost or failed around the peer's FIN while paused, saturating_add's
// overflow for negative delays, a stop() left pending by shutdown(), and UniqueFd closing a
// simulated fd with the real close(). Each case runs in virtual time, where times are exact;
// bugs 1 and 2 also have a loopback variant (LinuxSyscalls, the real kernel), with generous bounds.
// Every case failed on the headers before a0b7a57; the comment above it says how.
#include <fcntl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <reactor.hpp>

#include "catch.hpp"
#include "loopback.hpp"
#include "sim_kernel.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

template <class Trigger>
using SimLoop = reactor::Reactor<Trigger, sim::SimSyscalls>;

// The clock of the world `Loop` runs in: the simulated kernel's, or the real steady clock.
template <class Loop>
Clock::time_point world_now() {
  if constexpr (std::is_same_v<typename Loop::syscalls, sim::SimSyscalls>) {
    return sim::Kernel::current().now();
  } else {
    return Clock::now();
  }
}

template <class Loop>
struct Probe;
template <class Loop>
using ProbeConnection = reactor::Connection<Probe<Loop>, Loop>;

// What a Probe's connection went through.
template <class Loop>
struct ProbeLog {
  ProbeConnection<Loop>* connection = nullptr;  // from on_open until on_close
  std::string input;                            // the bytes on_data consumed, in order
  int eofs = 0;
  int closes = 0;
  std::error_code reason;  // on_close's
  Clock::time_point closed_at{};
};

// A handler that records into a ProbeLog; each behaviour is opt-in.
template <class Loop>
struct Probe {
  static constexpr std::size_t kAll = std::numeric_limits<std::size_t>::max();

  ProbeLog<Loop>* log;
  bool pause_on_open = false;
  bool shutdown_on_open = false;  // our FIN goes out before anything is read
  // Bytes consumed per on_data call; when limited, reading pauses after each call (a slow
  // consumer that a timer resumes).
  std::size_t chunk = kAll;

  void on_open(ProbeConnection<Loop>& c) {
    log->connection = &c;
    if (pause_on_open) c.pause_reading();
    if (shutdown_on_open) c.shutdown();
  }
  std::size_t on_data(ProbeConnection<Loop>& c, std::string_view bytes) {
    const std::size_t taken = std::min(chunk, bytes.size());
    log->input.append(bytes.substr(0, taken));
    if (chunk != kAll) c.pause_reading();
    return taken;
  }
  void on_eof(ProbeConnection<Loop>& c) {
    ++log->eofs;
    c.close();
  }
  void on_close(ProbeConnection<Loop>&, std::error_code reason) {
    ++log->closes;
    log->reason = reason;
    log->closed_at = world_now<Loop>();
    log->connection = nullptr;
  }
};

// Milliseconds from `from` to `to`, as a number Catch2 prints.
double ms_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double, std::milli>(to - from).count();
}

// `size` printable bytes ('a' to 'z') of test::pattern, so that a mismatch prints readably.
std::string letters(std::size_t size) {
  std::string bytes = test::pattern(size);
  for (char& byte : bytes) byte = static_cast<char>('a' + static_cast<unsigned char>(byte) % 26);
  return bytes;
}

reactor::ListenOptions timeout_options(std::chrono::milliseconds idle,
                                       std::chrono::milliseconds read) {
  reactor::ListenOptions options;
  options.connection.idle_timeout = idle;
  options.connection.read_timeout = read;
  options.connection.linger_timeout = 0ms;  // close at once: on_close comes at the timeout
  return options;
}

// Runs a simulated loop until `done()`; at most `iterations` run_once calls, each waiting for the
// next event or timer (virtual time: no wall-clock cost).
template <class Loop, class Done>
bool run_sim_until(Loop& loop, Done done, int iterations = 1000) {
  for (int i = 0; i < iterations && !done(); ++i) loop.run_once(-1ms);
  return done();
}

// A real fd (of /dev/null) at the number the simulated kernel of this thread hands out next;
// simulated eventfds fill the numbers below it. Closes the real fd, if it is still open, when it
// goes; the fillers go with the Kernel.
class FdCollision {
 public:
  FdCollision() {
    const int next = sim::SimSyscalls::eventfd(0, EFD_CLOEXEC);
    REQUIRE(next >= 0);
    sim::SimSyscalls::close(next);
    const int any = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    REQUIRE(any >= 0);
    real_ = ::fcntl(any, F_DUPFD_CLOEXEC, next);  // the lowest free real number >= next
    ::close(any);
    REQUIRE(real_ >= next);
    while (true) {
      const int fd = sim::SimSyscalls::eventfd(0, EFD_CLOEXEC);
      REQUIRE(fd >= 0);
      if (fd == real_) {
        sim::SimSyscalls::close(fd);
        break;
      }
      ++fillers_;
    }
  }
  FdCollision(const FdCollision&) = delete;
  FdCollision& operator=(const FdCollision&) = delete;
  ~FdCollision() {
    if (real_open()) ::close(real_);
  }

  int number() const { return real_; }
  std::size_t fillers() const { return fillers_; }
  bool real_open() const { return ::fcntl(real_, F_GETFD) >= 0; }

 private:
  int real_ = -1;
  std::size_t fillers_ = 0;
};

}  // namespace

// --- 1. Activity stamped outside the loop --------------------------------------------------------

// Guards: Connection::send() that writes at once and resume_reading(), called between run_once()
// calls, stamp the connection's activity with the clock, not with the loop's cached one. Before
// a0b7a57 they used the cached clock of the last iteration, 600 ms old here, so the idle timeout
// closed the connection 400 ms after the write and the read timeout 400 ms after the resume,
// instead of 1000 ms.
TEMPLATE_TEST_CASE(
    "idle and read timeouts count from a send or a resume made between run_once calls",
    "[regression][simulation][timeout]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  sim::Kernel kernel;  // before the loop: the loop's syscalls go to it
  ProbeLog<Loop> idle_log;
  ProbeLog<Loop> read_log;
  Loop loop;
  reactor::Acceptor<Probe<Loop>, Loop> idle_acceptor(
      loop, reactor::Endpoint::parse("127.0.0.1:7000"), Probe<Loop>{&idle_log},
      timeout_options(1000ms, 0ms));
  reactor::Acceptor<Probe<Loop>, Loop> read_acceptor(
      loop, reactor::Endpoint::parse("127.0.0.1:7001"),
      Probe<Loop>{.log = &read_log, .pause_on_open = true}, timeout_options(0ms, 1000ms));
  const sim::PeerId idle_peer = *kernel.connect(7000);
  const sim::PeerId read_peer = *kernel.connect(7001);
  loop.run_once(0ms);
  REQUIRE(idle_log.connection != nullptr);
  REQUIRE(read_log.connection != nullptr);

  kernel.advance(600ms);  // the application was busy elsewhere; the loop did not run
  const Clock::time_point outside = kernel.now();
  REQUIRE(idle_log.connection->send("x", 1));  // written at once: nothing was queued
  REQUIRE(kernel.process_io_at(idle_peer) == outside);
  read_log.connection->resume_reading();

  REQUIRE(run_sim_until(loop, [&] { return idle_log.closes == 1 && read_log.closes == 1; }));
  CHECK(idle_log.reason == std::errc::timed_out);
  CHECK(ms_between(outside, idle_log.closed_at) == 1000.0);  // was 400
  CHECK(read_log.reason == std::errc::timed_out);
  CHECK(ms_between(outside, read_log.closed_at) == 1000.0);  // was 400
  std::string delivered;
  kernel.peer_recv(idle_peer, delivered);
  CHECK(delivered == "x");
  CHECK(kernel.peer_readable(read_peer) == 0);
}

// Guards the same on the real kernel (LinuxSyscalls, steady_clock): the early timeout was the
// library's, not the simulator's. The sleep stands for an application busy outside the loop,
// which is the scenario. Before a0b7a57 both timeouts fired about 200 ms after the send and the
// resume (400 ms counted from the last iteration before the sleep); they must not fire before
// 400 ms.
TEMPLATE_TEST_CASE(
    "idle and read timeouts count from a send or a resume made between run_once "
    "calls on loopback",
    "[regression][integration][timeout]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  using Loop = reactor::Reactor<TestType>;
  constexpr auto kTimeout = 400ms;
  constexpr double kTimeoutMs = 400.0;
  ProbeLog<Loop> idle_log;
  ProbeLog<Loop> read_log;
  Loop loop;
  reactor::Acceptor<Probe<Loop>, Loop> idle_acceptor(loop, reactor::Endpoint::parse("127.0.0.1:0"),
                                                     Probe<Loop>{&idle_log},
                                                     timeout_options(kTimeout, 0ms));
  reactor::Acceptor<Probe<Loop>, Loop> read_acceptor(
      loop, reactor::Endpoint::parse("127.0.0.1:0"),
      Probe<Loop>{.log = &read_log, .pause_on_open = true}, timeout_options(0ms, kTimeout));
  test::Peer idle_peer(reactor::connect(idle_acceptor.local_endpoint()));
  test::Peer read_peer(reactor::connect(read_acceptor.local_endpoint()));
  REQUIRE(test::run_until(
      loop, [&] { return idle_log.connection != nullptr && read_log.connection != nullptr; }));

  std::this_thread::sleep_for(200ms);  // busy elsewhere: the loop's clock goes stale
  const Clock::time_point outside = Clock::now();
  REQUIRE(idle_log.connection->send("x", 1));
  read_log.connection->resume_reading();

  REQUIRE(test::run_until(loop, [&] {
    idle_peer.step();
    return idle_log.closes == 1 && read_log.closes == 1;
  }));
  CHECK(idle_log.reason == std::errc::timed_out);
  CHECK(ms_between(outside, idle_log.closed_at) >= kTimeoutMs);  // never early; was 200
  CHECK(ms_between(outside, idle_log.closed_at) < kTimeoutMs + 5000.0);
  CHECK(read_log.reason == std::errc::timed_out);
  CHECK(ms_between(outside, read_log.closed_at) >= kTimeoutMs);  // never early; was 200
  CHECK(ms_between(outside, read_log.closed_at) < kTimeoutMs + 5000.0);
  idle_peer.step();
  CHECK(idle_peer.received == "x");
}

// --- 2. Level mode: a paused consumer around the peer's FIN --------------------------------------

// Guards: input a paused handler left unconsumed reaches on_data after resume_reading(), before
// the EOF behind it; and when our FIN went out first (shutdown()), the EPOLLHUP that both FINs
// raise while the handler is paused does not fail the connection. The handler takes 100 bytes per
// call and pauses; a timer resumes it every 10 ms; the peer sent 1000 bytes and its FIN. Before
// a0b7a57, in level mode, the EPOLLIN that the resume re-armed came before the redelivery and read
// the EOF, which dropped the kept 900 bytes (on_data saw 100); with our FIN first, the connection
// failed with Error::kPeerHangup after 100 bytes and no on_eof. Edge mode passed both.
TEMPLATE_TEST_CASE("a paused consumer gets every byte before the peer's FIN after resume_reading",
                   "[regression][simulation][pause]", reactor::LevelTriggered,
                   reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  const bool our_fin_first = GENERATE(false, true);  // shutdown() in on_open: our FIN first
  CAPTURE(our_fin_first);

  sim::Kernel kernel;
  ProbeLog<Loop> log;
  Loop loop;
  reactor::Acceptor<Probe<Loop>, Loop> acceptor(
      loop, reactor::Endpoint::parse("127.0.0.1:7000"),
      Probe<Loop>{.log = &log, .shutdown_on_open = our_fin_first, .chunk = 100});
  const sim::PeerId peer = *kernel.connect(7000);
  const std::string sent = letters(1000);
  REQUIRE(kernel.peer_send(peer, sent) == 1000);
  REQUIRE(kernel.peer_shutdown(peer) == 0);
  const reactor::TimerId resumer = loop.schedule_every(10ms, [&] {
    if (log.connection != nullptr) log.connection->resume_reading();
  });

  REQUIRE(run_sim_until(loop, [&] { return log.closes == 1; }));
  loop.cancel(resumer);
  CHECK(log.input.size() == 1000);  // was 100
  CHECK(log.input == sent);
  CHECK(log.eofs == 1);  // with our FIN first: was 0
  CHECK(log.closes == 1);
  CHECK_FALSE(log.reason);  // with our FIN first: was Error::kPeerHangup
  CHECK_FALSE(kernel.peer_was_reset(peer));
  std::string rest;
  CHECK(kernel.peer_recv(peer, rest) == 0);  // our FIN arrived, and nothing else
  CHECK(rest.empty());
}

// Guards the same on the real kernel: loopback TCP raises EPOLLHUP once both FINs are through,
// and the level-mode ordering was the library's. Before a0b7a57, level mode delivered 100 of the
// 1000 bytes (and failed with kPeerHangup when our FIN went first).
TEMPLATE_TEST_CASE(
    "a paused consumer gets every byte before the peer's FIN after resume_reading "
    "on loopback",
    "[regression][integration][pause]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  using Loop = reactor::Reactor<TestType>;
  const bool our_fin_first = GENERATE(false, true);  // shutdown() in on_open: our FIN first
  CAPTURE(our_fin_first);

  ProbeLog<Loop> log;
  Loop loop;
  reactor::Acceptor<Probe<Loop>, Loop> acceptor(
      loop, reactor::Endpoint::parse("127.0.0.1:0"),
      Probe<Loop>{.log = &log, .shutdown_on_open = our_fin_first, .chunk = 100});
  test::Peer peer(reactor::connect(acceptor.local_endpoint()));
  peer.to_send = letters(1000);
  peer.step();
  REQUIRE(peer.all_sent());
  peer.shutdown_write();
  const reactor::TimerId resumer = loop.schedule_every(10ms, [&] {
    if (log.connection != nullptr) log.connection->resume_reading();
  });

  REQUIRE(test::run_until(loop, [&] {
    peer.step();
    return log.closes == 1;
  }));
  loop.cancel(resumer);
  REQUIRE(test::run_until(loop, [&] {
    peer.step();
    return peer.eof || peer.error != 0;
  }));
  CHECK(log.input.size() == 1000);  // level mode: was 100
  CHECK(log.input == peer.to_send);
  CHECK(log.eofs == 1);
  CHECK_FALSE(log.reason);  // level mode, our FIN first: was Error::kPeerHangup
  CHECK(peer.eof);
  CHECK(peer.error == 0);  // no RST
  CHECK(peer.received.empty());
}

// --- 3. Negative delays --------------------------------------------------------------------------

// Guards: saturating_add takes delays of either sign. Before a0b7a57 a negative delay computed
// `time_point::min() - start`, a signed overflow (UB; UBSan reports it in chrono.h). Where it
// wrapped, every negative delay saturated to time_point::min(): schedule_after(-1s) and
// schedule_after(-5s) tied and ran in scheduling order instead of earliest first, and
// shutdown(-1ms) computed its time left as `min() - now`, overflowing again into a wait of
// centuries, so it served the connection out (closed it after the 100 ms quiet period, then
// lingered 2 s for the peer's FIN: flushed, 2100 ms) instead of aborting it at once.
// schedule_every(-1s) behaved as documented either way: that part fails only under UBSan
// (-fno-sanitize-recover=undefined or UBSAN_OPTIONS=halt_on_error=1).
TEMPLATE_TEST_CASE("negative delays lie in the past without overflowing",
                   "[regression][simulation][timer]", reactor::LevelTriggered,
                   reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  sim::Kernel kernel;
  ProbeLog<Loop> log;
  Loop loop;
  const Clock::time_point start = kernel.now();

  // Deadlines in the past run on the next iteration, earliest first.
  std::vector<std::string> fired;
  loop.schedule_after(-1s, [&] { fired.emplace_back("after -1 s"); });
  loop.schedule_after(-5s, [&] { fired.emplace_back("after -5 s"); });
  loop.schedule_at(start - 3s, [&] { fired.emplace_back("at -3 s"); });
  loop.run_once(0ms);
  CHECK(fired == std::vector<std::string>{"after -5 s", "at -3 s", "after -1 s"});
  CHECK(ms_between(start, kernel.now()) == 0.0);

  // A negative period is raised to 1 µs: the timer runs on every iteration.
  int ticks = 0;
  const reactor::TimerId every = loop.schedule_every(-1s, [&] { ++ticks; });
  for (int i = 0; i < 3; ++i) loop.run_once(1ms);
  CHECK(ticks == 3);
  CHECK(kernel.now() - start == 3us);
  CHECK(loop.cancel(every));

  // A negative grace: the deadline has passed, so what is open is aborted at once.
  reactor::Acceptor<Probe<Loop>, Loop> acceptor(loop, reactor::Endpoint::parse("127.0.0.1:7000"),
                                                Probe<Loop>{&log});
  const sim::PeerId peer = *kernel.connect(7000);
  loop.run_once(0ms);
  REQUIRE(log.connection != nullptr);
  // milliseconds::min() saturates to the clock's minimum; time left was then `min() - now`,
  // overflowing (found after a0b7a57; detail::ms_until never subtracts such a deadline).
  const auto grace = GENERATE(std::chrono::milliseconds(-1), std::chrono::milliseconds::min());
  CAPTURE(grace.count());
  const Clock::time_point before_shutdown = kernel.now();
  const reactor::ShutdownReport report = loop.shutdown(grace);
  CHECK_FALSE(report.error);
  CHECK(report.aborted == 1);  // was 0
  CHECK(report.flushed == 0);  // was 1
  CHECK(report.failed == 0);
  CHECK(log.closes == 1);
  CHECK(log.reason == std::errc::operation_canceled);
  CHECK(ms_between(before_shutdown, kernel.now()) == 0.0);  // was 2100
  CHECK(loop.connection_count() == 0);
  std::string none;
  CHECK(kernel.peer_recv(peer, none) == 0);  // closed, with nothing to send: FIN
}

// --- 4. A stop() during shutdown() ---------------------------------------------------------------

// Guards: a stop() that arrives during shutdown(grace) is consumed by it even when the last
// connection closed in the same iteration, so that the next run() runs. Here a world action (as
// another thread) closes the peer and calls stop() at +50 ms. Before a0b7a57 the stop stayed
// pending (stop_requested() true after shutdown returned) and the next run() returned at once,
// before its 100 ms timer.
TEMPLATE_TEST_CASE(
    "a stop during shutdown does not stop the next run when the last connection "
    "closes with it",
    "[regression][simulation][shutdown]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  sim::Kernel kernel;
  ProbeLog<Loop> log;
  Loop loop;
  reactor::Acceptor<Probe<Loop>, Loop> acceptor(loop, reactor::Endpoint::parse("127.0.0.1:7000"),
                                                Probe<Loop>{&log});
  const sim::PeerId peer = *kernel.connect(7000);
  loop.run_once(0ms);
  REQUIRE(log.connection != nullptr);

  const Clock::time_point start = kernel.now();
  kernel.after(50ms, [&] {
    kernel.peer_close(peer);  // the last connection goes...
    loop.stop();              // ...in the iteration that sees a second Ctrl-C
  });
  const reactor::ShutdownReport report = loop.shutdown(5s);
  CHECK_FALSE(report.error);
  CHECK(report.flushed == 1);
  CHECK(report.aborted == 0);
  CHECK(log.eofs == 1);
  CHECK_FALSE(log.reason);
  CHECK(ms_between(start, kernel.now()) == 50.0);
  CHECK_FALSE(loop.stop_requested());  // was still pending

  bool timer_ran = false;
  loop.schedule_after(100ms, [&] {
    timer_ran = true;
    loop.stop();
  });
  loop.run();
  CHECK(timer_ran);                                 // was false: run() returned at once
  CHECK(ms_between(start, kernel.now()) == 150.0);  // was 50
}

// --- 5. A simulated fd's owner closes it in the simulation ---------------------------------------

// Guards: the fd owner that connect<sim::SimSyscalls>() returns, and that adopt() takes, closes
// through the simulated kernel (BasicUniqueFd<Sys>). Before a0b7a57 UniqueFd always called the
// real ::close(): a simulated fd number dropped on connect()'s failure path, by the owner's
// destructor, or on adopt()'s failure path closed the test process's real fd of the same number,
// and the simulated fd leaked. Here a real /dev/null fd takes that number. The owner's type is
// taken from connect<sim::SimSyscalls>() (BasicUniqueFd<sim::SimSyscalls> now, UniqueFd before),
// so that the case also builds on the old headers and shows the failure.
TEST_CASE("an fd of the simulated kernel is never closed with the real close",
          "[regression][simulation][fd]") {
  using SimFd = decltype(reactor::connect<sim::SimSyscalls>(
      std::declval<const reactor::Endpoint&>(), std::declval<std::error_code&>()));
  using Loop = SimLoop<reactor::LevelTriggered>;

  SECTION("connect's failure path") {
    sim::Kernel kernel;
    const FdCollision collision;
    std::error_code ec;
    const SimFd socket =
        reactor::connect<sim::SimSyscalls>(reactor::Endpoint::parse("127.0.0.1:7999"), ec);
    CHECK(ec == std::errc::connection_refused);  // nothing listens; socket() took the number
    CHECK_FALSE(socket);
    CHECK_FALSE(kernel.fd_open(collision.number()));  // was leaked
    CHECK(kernel.open_fds() == collision.fillers());
    CHECK(collision.real_open());  // was closed
  }
  SECTION("the owner's destructor") {
    sim::Kernel kernel;
    const FdCollision collision;
    const auto [fd, peer] = kernel.open_connected();
    REQUIRE(fd == collision.number());
    { const SimFd owner(fd); }
    CHECK_FALSE(kernel.fd_open(fd));  // was leaked
    CHECK(collision.real_open());     // was closed
    std::string none;
    CHECK(kernel.peer_recv(peer, none) == 0);  // the simulated socket sent its FIN
  }
  SECTION("adopt's failure path") {
    sim::Kernel kernel;
    ProbeLog<Loop> log;
    Loop loop;
    const FdCollision collision;
    const auto [fd, peer] = kernel.open_connected();
    REQUIRE(fd == collision.number());
    kernel.set_faults(
        [](sim::Op op, int) { return op == sim::Op::kFcntl ? sim::Fault{EBADF} : sim::Fault{}; });
    std::error_code ec;
    const auto* connection = reactor::adopt(loop, SimFd(fd), Probe<Loop>{&log}, {}, ec);
    kernel.set_faults(nullptr);
    CHECK(connection == nullptr);
    CHECK(ec == std::errc::bad_file_descriptor);
    CHECK(log.closes == 0);           // no hook ran
    CHECK_FALSE(kernel.fd_open(fd));  // was leaked
    CHECK(collision.real_open());     // was closed
    std::string none;
    CHECK(kernel.peer_recv(peer, none) == 0);
  }
}

// --- Found by review of the fixes above
// -----------------------------------------------------------

template <class Loop>
struct Closer;
template <class Loop>
using CloserConnection = reactor::Connection<Closer<Loop>, Loop>;

// Half-closes and pauses in on_open (pause_on_open), or closes from on_data (close_on_data).
template <class Loop>
struct Closer {
  CloserConnection<Loop>** slot;
  ProbeLog<Loop>* log;
  bool pause_on_open = false;
  bool close_on_data = false;
  void on_open(CloserConnection<Loop>& c) {
    *slot = &c;
    c.shutdown();
    if (pause_on_open) c.pause_reading();
  }
  void on_data(CloserConnection<Loop>& c, std::string_view bytes) {
    log->input.append(bytes);
    if (close_on_data) c.close();
  }
  void on_close(CloserConnection<Loop>&, std::error_code reason) {
    ++log->closes;
    log->reason = reason;
    log->closed_at = world_now<Loop>();
    *slot = nullptr;
  }
};

// Guards: a level-mode connection that left the epoll set on EPOLLHUP (paused, both FINs through)
// and is then closed reads the peer's EOF at once. Before, its linger read once and waited for an
// EPOLLIN that could not come, closing only when linger_timeout (2 s) ran out.
TEMPLATE_TEST_CASE("closing a paused connection after both FINs does not wait out the linger",
                   "[regression][simulation][close]", reactor::LevelTriggered,
                   reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  sim::Kernel kernel;
  ProbeLog<Loop> log;
  CloserConnection<Loop>* connection = nullptr;
  Loop loop;
  reactor::Acceptor<Closer<Loop>, Loop> acceptor(loop, reactor::Endpoint::parse("127.0.0.1:7000"),
                                                 Closer<Loop>{&connection, &log, true, false});
  const sim::PeerId peer = *kernel.connect(7000);
  loop.run_once(0ms);
  REQUIRE(connection != nullptr);
  CHECK(kernel.peer_send(peer, std::string(1000, 'x')) == 1000);
  CHECK(kernel.peer_shutdown(peer) == 0);
  for (int i = 0; i < 5; ++i) {
    kernel.external_step();
    loop.run_once(0ms);
  }
  REQUIRE(connection != nullptr);  // paused: still open, and not spinning
  const Clock::time_point closed_from = kernel.now();
  connection->close();
  for (int i = 0; i < 10 && log.closes == 0; ++i) loop.run_once(-1ms);
  CHECK(log.closes == 1);
  CHECK_FALSE(log.reason);
  CHECK(ms_between(closed_from, log.closed_at) == 0.0);  // was 2000 (the linger timeout), level
}

// Guards: close() from on_data, during an event that carries EPOLLHUP (our FIN out, the peer's
// data and FIN in), is an orderly close. Level mode reported kPeerHangup: the hang-up check ran
// after on_data had made the connection linger.
TEMPLATE_TEST_CASE("close from on_data during an EPOLLHUP event is an orderly close",
                   "[regression][simulation][close]", reactor::LevelTriggered,
                   reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  sim::Kernel kernel;
  ProbeLog<Loop> log;
  CloserConnection<Loop>* connection = nullptr;
  Loop loop;
  reactor::Acceptor<Closer<Loop>, Loop> acceptor(loop, reactor::Endpoint::parse("127.0.0.1:7000"),
                                                 Closer<Loop>{&connection, &log, false, true});
  const sim::PeerId peer = *kernel.connect(7000);
  loop.run_once(0ms);
  CHECK(kernel.peer_send(peer, std::string(100, 'x')) == 100);
  CHECK(kernel.peer_shutdown(peer) == 0);
  for (int i = 0; i < 10 && log.closes == 0; ++i) loop.run_once(-1ms);
  CHECK(log.closes == 1);
  CHECK_FALSE(log.reason);  // was reactor::Error::kPeerHangup in level mode
  CHECK(log.input == std::string(100, 'x'));
}

// Guards: delays of any representation saturate correctly. The first rewrite of saturating_add
// compared in the delay's own representation: an unsigned count made every positive delay "below
// the clock's minimum" (the timer fired at once), an int count of microseconds wrapped the maximum
// (the timer never fired).
TEST_CASE("delays with unsigned and narrow representations keep their deadline",
          "[regression][simulation][timer]") {
  using Loop = SimLoop<reactor::LevelTriggered>;
  sim::Kernel kernel;
  Loop loop;
  const Clock::time_point start = kernel.now();
  std::vector<std::pair<std::string, double>> fired;
  const auto record = [&](std::string name) {
    return [&fired, &kernel, start, name] {
      fired.emplace_back(name, ms_between(start, kernel.now()));
    };
  };
  loop.schedule_after(std::chrono::duration<unsigned, std::milli>(30), record("unsigned 30 ms"));
  loop.schedule_after(std::chrono::duration<int, std::micro>(10'000), record("int 10000 us"));
  loop.schedule_after(std::chrono::duration<short, std::milli>(20), record("short 20 ms"));
  loop.schedule_after(std::chrono::duration<std::uint64_t, std::nano>(40'000'000),
                      record("uint64 40000000 ns"));
  for (int i = 0; i < 10 && fired.size() < 4; ++i) loop.run_once(-1ms);
  CHECK(fired == std::vector<std::pair<std::string, double>>{{"int 10000 us", 10.0},
                                                             {"short 20 ms", 20.0},
                                                             {"unsigned 30 ms", 30.0},
                                                             {"uint64 40000000 ns", 40.0}});
  // At the edges of the range: saturated, never wrapped.
  loop.schedule_after(std::chrono::duration<std::uint64_t, std::ratio<3600>>::max(),
                      record("never"));
  loop.schedule_after(std::chrono::duration<std::int64_t, std::ratio<3600>>::min(),
                      record("at once"));
  loop.run_once(0ms);
  REQUIRE(fired.size() == 5);
  CHECK(fired.back().first == "at once");
  CHECK(loop.pending_timers() == 1);
}

// Guards: a paused connection whose peer is gone (both FINs through: EPOLLHUP, which level mode
// reports on every epoll_wait) leaves the epoll set; when that EPOLL_CTL_DEL fails, it closes with
// the error. It ignored the failure and believed itself out of the set, so the EPOLLHUP came back
// at once, forever: sim_fuzzer found the loop spinning in shutdown() with an injected ENOMEM
// (tests/fuzz/corpus/sim_fuzzer/regression-shutdown-paused-hup-del-enomem).
TEST_CASE("a paused connection whose EPOLL_CTL_DEL fails on EPOLLHUP closes instead of spinning",
          "[regression][simulation][close]") {
  using Loop = SimLoop<reactor::LevelTriggered>;
  sim::Kernel kernel;
  ProbeLog<Loop> log;
  Loop loop;
  Probe<Loop> probe{&log};
  probe.pause_on_open = true;
  probe.shutdown_on_open = true;
  reactor::Acceptor<Probe<Loop>, Loop> acceptor(loop, reactor::Endpoint::parse("127.0.0.1:7000"),
                                                probe);
  const sim::PeerId peer = *kernel.connect(7000);
  REQUIRE(run_sim_until(
      loop, [&] { return log.connection != nullptr; }, 10));
  const int fd = log.connection->native_handle();
  int failed_ctls = 0;
  kernel.set_faults([&](sim::Op op, int on_fd) {
    if (op != sim::Op::kEpollCtl || on_fd != fd) return sim::Fault{};
    ++failed_ctls;
    return sim::Fault{ENOMEM};
  });
  CHECK(kernel.peer_send(peer, "unread") == 6);
  CHECK(kernel.peer_shutdown(peer) == 0);
  for (int i = 0; i < 50 && log.closes == 0; ++i) {
    kernel.external_step();
    loop.run_once(0ms);
  }
  kernel.set_faults(nullptr);  // the acceptor's EPOLL_CTL_DEL at scope exit must not see them
  CHECK(failed_ctls == 1);
  CHECK(log.closes == 1);
  CHECK(log.reason == std::error_code(ENOMEM, std::system_category()));
  CHECK(log.input.empty());
}

namespace {

// Sends its greeting in two pieces from on_open, then reads nothing of interest.
template <class Loop>
struct Greeter {
  void on_open(auto& c) {
    c.send("hel");
    c.send("lo\n");
  }
  void on_data(auto&, std::string_view) {}
};

}  // namespace

// Guards: a connection accepted by the retry after EMFILE (run_fd_waiters, at the end of the loop
// step) gets what its on_open sent, all of it. The second send was held for the end of the step
// and nothing wrote it there: the peer got "hel", then nothing until some other event.
TEMPLATE_TEST_CASE("on_open sends of a connection accepted after EMFILE are written at once",
                   "[regression][simulation][coalescing]", reactor::LevelTriggered,
                   reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  sim::Kernel kernel;
  Loop loop;
  reactor::Acceptor<Greeter<Loop>, Loop> acceptor(loop, reactor::Endpoint::parse("127.0.0.1:7000"),
                                                  Greeter<Loop>{});
  bool refused = false;
  kernel.set_faults([&](sim::Op op, int) {
    if (op != sim::Op::kAccept4 || refused) return sim::Fault{};
    refused = true;
    return sim::Fault{EMFILE};
  });
  const sim::PeerId peer = *kernel.connect(7000);
  std::string received;
  for (int i = 0; i < 20 && received.size() < 6; ++i) {
    loop.run_once(-1ms);
    kernel.peer_recv(peer, received);
  }
  CHECK(refused);
  CHECK(received == "hello\n");
}

// Guards: a graceful shutdown serves out what cork() held. The cork was never released, so the
// connection never looked quiet and was aborted at the deadline with its bytes.
TEMPLATE_TEST_CASE("a graceful shutdown writes what cork held",
                   "[regression][simulation][coalescing]", reactor::LevelTriggered,
                   reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  sim::Kernel kernel;
  ProbeLog<Loop> log;
  Loop loop;
  reactor::Acceptor<Probe<Loop>, Loop> acceptor(loop, reactor::Endpoint::parse("127.0.0.1:7000"),
                                                Probe<Loop>{&log});
  const sim::PeerId peer = *kernel.connect(7000);
  REQUIRE(run_sim_until(
      loop, [&] { return log.connection != nullptr; }, 10));
  log.connection->cork();
  CHECK(log.connection->send("held-by-cork"));
  const reactor::ShutdownReport report = loop.shutdown(1000ms);
  std::string received;
  kernel.peer_recv(peer, received);
  CHECK(received == "held-by-cork");
  CHECK(report.flushed == 1);
  CHECK(report.aborted == 0);
  CHECK(log.closes == 1);
  CHECK_FALSE(log.reason);
}

namespace {

using SimFd = reactor::BasicUniqueFd<sim::SimSyscalls>;

// A relays: each on_data sends `first` and `second` to itself, then `to_other` (a gather send) to
// the other connection, or only forwards what it got to the other connection.
template <class Loop>
struct Relay;
template <class Loop>
using RelayConnection = reactor::Connection<Relay<Loop>, Loop>;
template <class Loop>
struct Relay {
  RelayConnection<Loop>** other;
  bool gather;
  std::string* held_when_forwarded;
  void on_data(RelayConnection<Loop>& c, std::string_view bytes) {
    if (other == nullptr) return;
    if (gather) {
      c.send("x1");
      c.send("x2");  // held in the loop's cork buffer
      const std::string body(5000, 'B');
      const std::string_view parts[] = {"hdr:", body};
      (*other)->send(std::span<const std::string_view>(parts));  // >= 4 KiB: written at once
    } else {
      (*other)->send(bytes);
      *held_when_forwarded += std::to_string((*other)->pending_output_bytes());
    }
  }
};

}  // namespace

// Guards (review of the coalescing change): a gather send of 4 KiB or more to one connection,
// written at once, emptied the loop's cork buffer, which held another connection's bytes: A's "x2"
// was lost, silently.
TEST_CASE("a large gather send to one connection keeps the bytes another connection holds",
          "[regression][simulation][coalescing]") {
  using Loop = SimLoop<reactor::LevelTriggered>;
  sim::Kernel kernel;
  Loop loop;
  auto [fa, pa] = kernel.open_connected();
  auto [fb, pb] = kernel.open_connected();
  RelayConnection<Loop>* b = nullptr;
  reactor::adopt(loop, SimFd(fa), Relay<Loop>{&b, true, nullptr});
  b = &reactor::adopt(loop, SimFd(fb), Relay<Loop>{nullptr, false, nullptr});
  CHECK(kernel.peer_send(pa, "go") == 2);
  for (int i = 0; i < 3; ++i) loop.run_once(0ms);
  std::string at_a;
  std::string at_b;
  kernel.peer_recv(pa, at_a);
  kernel.peer_recv(pb, at_b);
  CHECK(at_a == "x1x2");  // was "x1"
  CHECK(at_b == "hdr:" + std::string(5000, 'B'));
}

// Guards (review): a connection that forwards one message per on_data to another never holds:
// the "sent in this step" mark belonged to the receiving connection until its own event, so the
// second forwarded message counted as a second send in one step and the loop learned to hold.
TEST_CASE("forwarding one message per callback to another connection writes it at once",
          "[regression][simulation][coalescing]") {
  using Loop = SimLoop<reactor::LevelTriggered>;
  sim::Kernel kernel;
  Loop loop;
  auto [fa, pa] = kernel.open_connected();
  auto [fb, pb] = kernel.open_connected();
  RelayConnection<Loop>* b = nullptr;
  std::string held;
  reactor::adopt(loop, SimFd(fa), Relay<Loop>{&b, false, &held});
  b = &reactor::adopt(loop, SimFd(fb), Relay<Loop>{nullptr, false, nullptr});
  for (int i = 0; i < 3; ++i) {
    CHECK(kernel.peer_send(pa, "m") == 1);
    loop.run_once(0ms);
  }
  CHECK(held == "000");  // was "011": held from the second message on
  std::string at_b;
  kernel.peer_recv(pb, at_b);
  CHECK(at_b == "mmm");
}

// Guards (review): cork() with output already queued, level mode, left EPOLLOUT armed while the
// EPOLLOUT flush skipped the corked output: every epoll_wait returned at once until uncork().
// (Since the break-it pass, queued output keeps going out while corked: the EPOLLOUTs write it,
// then the drained queue holds and wants no EPOLLOUT.)
TEST_CASE("cork with queued output does not keep a level-triggered loop awake",
          "[regression][simulation][coalescing]") {
  using Loop = SimLoop<reactor::LevelTriggered>;
  sim::Kernel kernel(4096);
  ProbeLog<Loop> log;  // before the loop: the loop's destructor reports on_close into it
  Loop loop;
  auto [fa, pa] = kernel.open_connected();
  auto& a = reactor::adopt(loop, SimFd(fa), Probe<Loop>{&log});
  CHECK(a.send(std::string(10000, 'x')));  // outside the loop: 4096 written, the rest queued
  CHECK(a.pending_output_bytes() == 10000 - 4096);
  std::string got;
  kernel.peer_recv(pa, got);  // the socket drains: writable
  a.cork();
  int busy = 0;
  for (int i = 0; i < 20; ++i) busy += loop.run_once(10ms) > 0 ? 1 : 0;
  CHECK(busy <= 2);  // was 20; the EPOLLOUTs that write the queued bytes
  CHECK(a.pending_output_bytes() == 0);
  a.uncork();
  for (int i = 0; i < 10 && got.size() < 10000; ++i) {
    kernel.peer_recv(pa, got);
    loop.run_once(0ms);
  }
  CHECK(got == std::string(10000, 'x'));
}

// Guards (second review): cork()/uncork() on a socket the peer stopped reading keeps the write
// timeout. Each uncork restamped the timeout's clock, so a connection corking more often than
// write_timeout never timed out. Bytes corked onto an empty queue still get no timeout while held.
TEST_CASE("cork and uncork do not restart the write timeout of refused bytes",
          "[regression][simulation][coalescing]") {
  using Loop = SimLoop<reactor::LevelTriggered>;
  sim::Kernel kernel(4096);
  Loop loop;
  auto [fa, pa] = kernel.open_connected();
  ProbeLog<Loop> log;
  reactor::ConnectionOptions options;
  options.write_timeout = 1000ms;
  options.linger_timeout = 0ms;
  auto& a = reactor::adopt(loop, SimFd(fa), Probe<Loop>{&log}, options);
  const Clock::time_point start = kernel.now();
  CHECK(a.send(std::string(10000, 'x')));  // 4096 written, the rest queued; the peer never reads
  for (int i = 0; i < 20 && log.closes == 0; ++i) {
    kernel.advance(300ms);
    loop.run_once(0ms);
    if (log.closes != 0) break;
    a.cork();
    CHECK(a.send("tick"));
    a.uncork();
  }
  CHECK(log.closes == 1);  // was 0: every uncork restarted the clock
  CHECK(log.reason == std::errc::timed_out);
  CHECK(ms_between(start, log.closed_at) <= 1500.0);
}

// --- Break-it pass over the write path (issue 13) -----------------------------------------------

// Guards: uncork() between run_once calls stamps the write it makes with the clock. flush() took
// the loop's cached clock, here 1000 ms old, so the 300 ms write timeout fired at the next
// iteration although the peer was reading: the connection closed with 4096 of 10000 bytes out.
TEMPLATE_TEST_CASE("uncork between run_once calls does not time out a reading peer",
                   "[regression][simulation][coalescing][timeout]", reactor::LevelTriggered,
                   reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  sim::Kernel kernel(4096);
  ProbeLog<Loop> log;
  Loop loop;
  auto [fd, peer] = kernel.open_connected();
  reactor::ConnectionOptions options;
  options.write_timeout = 300ms;
  options.linger_timeout = 0ms;
  auto& c = reactor::adopt(loop, SimFd(fd), Probe<Loop>{&log}, options);
  loop.run_once(0ms);
  CHECK(c.send(letters(4096)));  // fills the peer's side of the stream
  c.cork();
  CHECK(c.send(letters(10000)));
  kernel.advance(1000ms);  // busy elsewhere: the loop's clock goes stale
  c.uncork();              // 4096 bytes written now, the socket is full
  loop.run_once(0ms);      // the connection's timer is due: it checks the write timeout
  std::string received;
  for (int i = 0; i < 20 && received.size() < 14096 && log.closes == 0; ++i) {
    kernel.advance(100ms);
    kernel.peer_recv(peer, received);
    loop.run_once(0ms);
  }
  CHECK(log.closes == 0);  // was 1, timed_out
  kernel.peer_recv(peer, received);
  CHECK(received == letters(4096) + letters(10000));
}

// Guards: close() between run_once calls lingers for linger_timeout from the clock. The deadline
// came from the loop's cached clock (now() returns it while a timer is pending), 1500 ms old
// here, so on_close came at once instead of 1000 ms later.
TEMPLATE_TEST_CASE("close between run_once calls lingers for the whole linger timeout",
                   "[regression][simulation][timeout]", reactor::LevelTriggered,
                   reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  sim::Kernel kernel;
  ProbeLog<Loop> log;
  Loop loop;
  auto [fd, peer] = kernel.open_connected();
  reactor::ConnectionOptions options;
  options.linger_timeout = 1000ms;
  auto& c = reactor::adopt(loop, SimFd(fd), Probe<Loop>{&log}, options);
  const reactor::TimerId unrelated = loop.schedule_after(1h, [] {});
  loop.run_once(0ms);
  kernel.advance(1500ms);
  const Clock::time_point outside = kernel.now();
  CHECK(c.send("bye"));
  c.close();  // our FIN goes out; the peer never sends its own
  REQUIRE(run_sim_until(loop, [&] { return log.closes == 1; }));
  CHECK(ms_between(outside, log.closed_at) == 1000.0);  // was 0
  std::string received;
  kernel.peer_recv(peer, received);
  CHECK(received == "bye");
  loop.cancel(unrelated);
}

// Guards: cork() holds what is sent after it, not the output the kernel was already refusing.
// Level mode dropped EPOLLOUT and edge mode ignored it while corked, so the queued bytes stopped
// although the peer kept reading, and their write timeout closed a healthy connection with 4096
// of 10000 bytes delivered.
TEMPLATE_TEST_CASE("cork keeps writing output queued before it",
                   "[regression][simulation][coalescing][timeout]", reactor::LevelTriggered,
                   reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  sim::Kernel kernel(4096);
  ProbeLog<Loop> log;
  Loop loop;
  auto [fd, peer] = kernel.open_connected();
  reactor::ConnectionOptions options;
  options.write_timeout = 300ms;
  options.linger_timeout = 0ms;
  auto& c = reactor::adopt(loop, SimFd(fd), Probe<Loop>{&log}, options);
  loop.run_once(0ms);
  CHECK(c.send(letters(10000)));  // 4096 written, the rest queued
  c.cork();
  std::string received;
  for (int i = 0; i < 20 && received.size() < 10000 && log.closes == 0; ++i) {
    kernel.advance(100ms);
    kernel.peer_recv(peer, received);
    loop.run_once(0ms);
  }
  CHECK(log.closes == 0);  // was 1, timed_out
  kernel.peer_recv(peer, received);
  CHECK(received == letters(10000));
  // The queue drained while corked: what is sent now is held until uncork().
  CHECK(c.send("held"));
  for (int i = 0; i < 3; ++i) loop.run_once(0ms);
  CHECK(c.pending_output_bytes() == 4);
  CHECK(kernel.peer_readable(peer) == 0);
  c.uncork();
  kernel.peer_recv(peer, received);
  CHECK(received == letters(10000) + "held");
}

// Guards: a gather send of no buffers on a closing connection returns false, as every other send
// there does (it returned true: the empty span was taken as sent).
TEST_CASE("an empty gather send on a closing connection returns false",
          "[regression][simulation][gather]") {
  using Loop = SimLoop<reactor::LevelTriggered>;
  sim::Kernel kernel(4096);
  ProbeLog<Loop> log;
  Loop loop;
  auto [fd, peer] = kernel.open_connected();
  auto& c = reactor::adopt(loop, SimFd(fd), Probe<Loop>{&log});
  CHECK(c.send(std::span<const std::string_view>()));  // open: nothing to send is sent
  CHECK(c.send(letters(10000)));                       // the rest waits for the socket
  c.close();                                           // closing: flushing first
  REQUIRE(log.closes == 0);
  CHECK_FALSE(c.send(std::span<const std::string_view>()));  // was true
  CHECK_FALSE(c.send(""));
  CHECK_FALSE(c.send({std::string_view("a")}));
  static_cast<void>(peer);
}
