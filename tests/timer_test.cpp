// Tests for include/reactor/timer.hpp and the Reactor's timers: ordering, cancelling (also from
// inside callbacks), periodic timers without drift, and the connection timeouts built on them.
#include <reactor/timer.hpp>

#include <random>
#include <vector>

#include <reactor/connection.hpp>
#include <reactor/reactor.hpp>

#include "catch.hpp"
#include "loopback.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using Loop = reactor::Reactor<>;

}  // namespace

TEST_CASE("the timer queue fires in deadline order, ties in scheduling order", "[timer]") {
  reactor::detail::TimerQueue queue;
  std::vector<int> fired;
  const auto base = Clock::time_point(1s);
  std::mt19937 random(7);
  std::vector<int> deadlines(200);
  for (int i = 0; i < 200; ++i) {
    deadlines[static_cast<std::size_t>(i)] = static_cast<int>(random() % 50);
    queue.add(base + std::chrono::milliseconds(deadlines[static_cast<std::size_t>(i)]),
              Clock::duration::zero(), [&fired, i] { fired.push_back(i); });
  }
  CHECK(queue.size() == 200);
  CHECK(queue.run_due(base + 49ms) == 200);
  REQUIRE(fired.size() == 200);
  for (std::size_t k = 1; k < fired.size(); ++k) {
    const auto a = static_cast<std::size_t>(fired[k - 1]);
    const auto b = static_cast<std::size_t>(fired[k]);
    REQUIRE((deadlines[a] < deadlines[b] || (deadlines[a] == deadlines[b] && a < b)));
  }
  CHECK(queue.empty());
}

TEST_CASE("a cancelled timer never fires and its id stays dead after slot reuse", "[timer]") {
  reactor::detail::TimerQueue queue;
  int fired = 0;
  const auto base = Clock::time_point(1s);
  const reactor::TimerId first = queue.add(base, {}, [&] { fired += 1; });
  const reactor::TimerId second = queue.add(base + 1ms, {}, [&] { fired += 10; });
  CHECK(queue.cancel(first));
  CHECK_FALSE(queue.cancel(first));
  const reactor::TimerId reused = queue.add(base, {}, [&] { fired += 100; });
  CHECK(reused.index == first.index);  // the slot came back...
  CHECK_FALSE(queue.cancel(first));    // ...but the old id does not name it
  queue.run_due(base + 5ms);
  CHECK(fired == 110);
  CHECK_FALSE(queue.cancel(second));  // already fired
}

TEST_CASE("a timer can cancel another one that is due in the same pass", "[timer]") {
  reactor::detail::TimerQueue queue;
  const auto base = Clock::time_point(1s);
  std::vector<int> fired;
  reactor::TimerId victim;
  queue.add(base, {}, [&] {
    fired.push_back(1);
    CHECK(queue.cancel(victim));
  });
  victim = queue.add(base, {}, [&] { fired.push_back(2); });
  queue.add(base, {}, [&] { fired.push_back(3); });
  CHECK(queue.run_due(base) == 2);
  CHECK(fired == std::vector<int>{1, 3});
}

TEST_CASE("a periodic timer keeps its phase and skips periods it missed", "[timer]") {
  reactor::detail::TimerQueue queue;
  const auto base = Clock::time_point(1s);
  int fired = 0;
  const reactor::TimerId id = queue.add(base + 10ms, 10ms, [&] { ++fired; });
  queue.run_due(base + 10ms);
  CHECK(queue.next_due() == base + 20ms);
  queue.run_due(base + 55ms);  // late: 20, 30, 40 and 50 were due; it runs once
  CHECK(fired == 2);
  CHECK(queue.next_due() == base + 60ms);  // still on the 10 ms grid
  CHECK(queue.cancel(id));
  CHECK(queue.empty());
}

TEST_CASE("a periodic timer can cancel itself from its own callback", "[timer]") {
  reactor::detail::TimerQueue queue;
  const auto base = Clock::time_point(1s);
  int fired = 0;
  reactor::TimerId id;
  id = queue.add(base, 1ms, [&] {
    if (++fired == 3) CHECK(queue.cancel(id));
  });
  for (int i = 0; i < 10; ++i) queue.run_due(base + std::chrono::milliseconds(i));
  CHECK(fired == 3);
  CHECK(queue.empty());
}

TEST_CASE("reactor timers fire on the loop after their delay, in order", "[timer][reactor]") {
  Loop loop;
  std::vector<int> fired;
  const auto start = Clock::now();
  loop.schedule_after(30ms, [&] { fired.push_back(3); });
  loop.schedule_after(10ms, [&] { fired.push_back(1); });
  loop.schedule_after(20ms, [&] { fired.push_back(2); });
  const reactor::TimerId cancelled = loop.schedule_after(15ms, [&] { fired.push_back(99); });
  CHECK(loop.cancel(cancelled));
  CHECK(loop.pending_timers() == 3);
  REQUIRE(test::run_until(loop, [&] { return fired.size() == 3; }));
  CHECK(fired == std::vector<int>{1, 2, 3});
  CHECK(Clock::now() - start >= 30ms);
  CHECK(loop.pending_timers() == 0);
}

TEST_CASE("a periodic reactor timer fires at start + k * period without drift",
          "[timer][reactor]") {
  Loop loop;
  std::vector<Clock::time_point> ticks;
  const auto start = Clock::now();
  constexpr auto kPeriod = 20ms;
  reactor::TimerId id;
  id = loop.schedule_every(kPeriod, [&] {
    ticks.push_back(Clock::now());
    if (ticks.size() == 10) loop.cancel(id);
  });
  REQUIRE(test::run_until(loop, [&] { return ticks.size() == 10; }));
  for (std::size_t k = 0; k < ticks.size(); ++k) {
    const auto ideal = start + kPeriod * static_cast<int>(k + 1);
    // Never early; late by less than a generous scheduling bound, not accumulating.
    CHECK(ticks[k] >= ideal);
    CHECK(ticks[k] - ideal < 15ms);
  }
  CHECK(loop.pending_timers() == 0);
}

namespace {

struct Quiet {
  int* closes;
  std::error_code* reason;
  Clock::time_point* closed_at;
  void on_data(auto& connection, std::string_view bytes) { connection.send(bytes); }
  void on_close(auto& /*connection*/, std::error_code error) {
    ++*closes;
    *reason = error;
    *closed_at = Clock::now();
  }
};

}  // namespace

TEST_CASE("an idle connection is closed after its idle timeout, not before", "[timer][timeout]") {
  Loop loop;
  int closes = 0;
  std::error_code reason;
  Clock::time_point closed_at;
  reactor::ConnectionOptions options;
  options.idle_timeout = 100ms;
  auto [mine, theirs] = test::socket_pair();
  const auto start = Clock::now();
  reactor::adopt(loop, std::move(mine), Quiet{&closes, &reason, &closed_at}, options);
  // Traffic every 40 ms keeps it alive well past one timeout.
  test::Peer peer(std::move(theirs));
  for (int i = 0; i < 5; ++i) {
    const auto next = Clock::now() + 40ms;
    peer.to_send += "ping";
    REQUIRE(test::run_until(loop, [&] {
      peer.step();
      return Clock::now() >= next;
    }));
  }
  CHECK(closes == 0);
  peer.to_send += "last";
  REQUIRE(test::run_until(loop, [&] {
    peer.step();
    return peer.received.size() == peer.to_send.size();
  }));
  CHECK(peer.received == peer.to_send);
  const auto last_traffic = Clock::now();
  REQUIRE(test::run_until(loop, [&] {
    peer.step();
    return peer.eof;  // the idle close flushed and sent FIN
  }));
  const auto eof_at = Clock::now();
  CHECK(eof_at - last_traffic >= 90ms);  // the loop clock is read once per iteration
  CHECK(eof_at - last_traffic < 100ms + 50ms);
  CHECK(eof_at - start >= 300ms);
  peer.fd.reset();  // the connection lingers until the peer closes too
  REQUIRE(test::run_until(loop, [&] { return closes == 1; }));
  CHECK(reason == std::errc::timed_out);
  CHECK(closed_at >= eof_at);
}

TEST_CASE("a read timeout aborts a connection whose peer goes silent", "[timer][timeout]") {
  Loop loop;
  int closes = 0;
  std::error_code reason;
  Clock::time_point closed_at;
  reactor::ConnectionOptions options;
  options.read_timeout = 50ms;
  auto [mine, theirs] = test::socket_pair();
  const auto start = Clock::now();
  reactor::adopt(loop, std::move(mine), Quiet{&closes, &reason, &closed_at}, options);
  REQUIRE(test::run_until(loop, [&] { return closes == 1; }));
  CHECK(reason == std::errc::timed_out);
  CHECK(closed_at - start >= 50ms);
  CHECK(closed_at - start < 50ms + 50ms);
}

TEST_CASE("a write timeout aborts a connection whose peer stops reading", "[timer][timeout]") {
  Loop loop;
  int closes = 0;
  std::error_code reason;
  Clock::time_point closed_at;
  reactor::ConnectionOptions options;
  options.write_timeout = 50ms;
  options.high_water = 64 << 20;  // keep reading: only the write side may time out
  options.max_pending_output = 128 << 20;
  auto [mine, theirs] = test::socket_pair();
  reactor::adopt(loop, std::move(mine), Quiet{&closes, &reason, &closed_at}, options);
  test::Peer peer(std::move(theirs));
  peer.reading = false;
  peer.to_send = test::pattern(4 << 20);
  Clock::time_point stalled{};
  REQUIRE(test::run_until(loop, [&] {
    const std::size_t before = peer.sent;
    peer.step();
    if (peer.sent == before && stalled == Clock::time_point{}) stalled = Clock::now();
    return closes == 1;
  }));
  CHECK(reason == std::errc::timed_out);
  CHECK(closed_at - stalled < 50ms + 100ms);
}
