// Stress (label `stress`): a slow reader. A peer that sends 64 MiB to an echo server and reads
// nothing must hold the server's memory at its high watermark plus one read (backpressure stops
// reading, TCP stops the peer); once the peer reads, every byte comes back intact. Memory is
// measured as live heap bytes: this executable replaces the global operator new and delete to
// count them (as tests/allocation_test.cpp does; array forms reach them, or, under ASan, its own
// matching pair), so it holds nothing else.
#include <malloc.h>

#include <reactor.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <new>
#include <string>
#include <string_view>
#include <system_error>

#include "catch.hpp"
#include "heap_counter.hpp"
#include "loopback.hpp"
#include "stress.hpp"

namespace {

using namespace std::chrono_literals;

constexpr std::size_t kHighWater = 1 << 20;
constexpr std::size_t kLowWater = 256 << 10;
constexpr std::size_t kReadBuffer = 64 << 10;
// Allowed beyond high water + one read: chunk headers and rounding (16 KiB chunks), malloc's
// headers, and the odd small allocation of the loop.
constexpr std::size_t kSlack = 128 << 10;

struct State {
  std::size_t peak_pending = 0;
  std::size_t peak_heap = 0;
  std::size_t heap_offset = 0;  // live bytes that are the test's own (the client's buffer)
  bool reading = true;
  int closed = 0;
  std::error_code reason;

  void sample() {
    const std::size_t live = test::heap_live_bytes.load(std::memory_order_relaxed) - heap_offset;
    peak_heap = std::max(peak_heap, live);
  }
};

struct Echo {
  State* state;
  void on_data(auto& connection, std::string_view bytes) {
    connection.send(bytes);
    state->peak_pending = std::max(state->peak_pending, connection.pending_output_bytes());
    state->reading = connection.is_reading();
    state->sample();
  }
  void on_close(auto& /*connection*/, std::error_code reason) {
    ++state->closed;
    state->reason = reason;
  }
};

// Index of the first byte where `a` and `b` differ (the shorter's size if one is a prefix of the
// other), or npos when they are equal: prints usefully where comparing 64 MiB strings would not.
std::size_t first_difference(std::string_view a, std::string_view b) {
  const auto [ia, ib] = std::mismatch(a.begin(), a.end(), b.begin(), b.end());
  if (ia == a.end() && ib == b.end()) return std::string_view::npos;
  return static_cast<std::size_t>(ia - a.begin());
}

}  // namespace

TEMPLATE_TEST_CASE(
    "a peer that sends 64 MiB and never reads holds the server at its watermark, "
    "then reads every byte back intact",
    "[stress][memory][backpressure]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  constexpr std::size_t kTotal = 64 << 20;
  const std::string payload = test::pattern(kTotal, 31);
  State state;
  reactor::ReactorOptions reactor_options;
  reactor_options.read_buffer_size = kReadBuffer;
  reactor::Reactor<TestType> loop(reactor_options);
  reactor::ListenOptions options;
  options.connection.high_water = kHighWater;
  options.connection.low_water = kLowWater;
  reactor::Acceptor<Echo, reactor::Reactor<TestType>> acceptor(loop, stress::loopback(),
                                                               Echo{&state}, options);
  test::Peer client(reactor::connect(acceptor.local_endpoint()));
  client.to_send = payload;
  client.reading = false;
  REQUIRE(test::run_until(loop, [&] { return acceptor.accepted_count() == 1; }));
  const std::size_t baseline = test::heap_live_bytes.load();
  state.peak_heap = baseline;

  // Phase 1: the client writes what the kernel takes and reads nothing, until it has made no
  // progress for half a second: the server paused reading and TCP pushed back on the client.
  auto last_progress = std::chrono::steady_clock::now();
  std::size_t last_sent = 0;
  REQUIRE(test::run_until(
      loop,
      [&] {
        client.step();
        state.sample();
        const auto now = std::chrono::steady_clock::now();
        if (client.sent != last_sent) {
          last_sent = client.sent;
          last_progress = now;
        }
        return client.all_sent() || now - last_progress > 500ms;
      },
      30s));
  CAPTURE(client.sent, state.peak_pending, state.peak_heap - baseline);
  CHECK(client.sent < kTotal);  // the client was stopped: nothing buffered it all
  CHECK_FALSE(state.reading);   // by the server's backpressure
  CHECK(state.peak_pending >= kHighWater);
  CHECK(state.peak_pending <= kHighWater + kReadBuffer);
  CHECK(state.peak_heap - baseline <= kHighWater + kReadBuffer + kSlack);

  // Phase 2: the client reads; everything comes back, in order, with memory still bounded (the
  // client's own receive buffer is not the server's memory and is left out).
  client.reading = true;
  REQUIRE(test::run_until(
      loop,
      [&] {
        client.step();
        state.heap_offset = client.received.capacity();
        state.sample();
        return client.received.size() >= kTotal || client.eof || client.error != 0;
      },
      60s));
  CHECK(client.error == 0);
  CHECK(client.received.size() == kTotal);
  CHECK(first_difference(client.received, payload) == std::string_view::npos);
  CHECK(state.peak_pending <= kHighWater + kReadBuffer);
  CHECK(state.peak_heap - baseline <= kHighWater + kReadBuffer + kSlack);

  client.shutdown_write();
  REQUIRE(test::run_until(loop, [&] {
    client.step();
    return state.closed == 1 && client.eof;
  }));
  CHECK_FALSE(state.reason);
}
