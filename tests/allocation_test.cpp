// Counts heap allocations on the echo path: the steady state must make none per message, both when
// the reply is written directly and when it is queued (chunks come back from the reactor's pool).
// This executable replaces the global operator new, so it holds nothing else.
#include <reactor.hpp>

#include <atomic>
#include <cstdlib>
#include <new>

#include "catch.hpp"
#include "heap_counter.hpp"
#include "loopback.hpp"

namespace {

using namespace std::chrono_literals;

struct Echo {
  void on_data(auto& connection, std::string_view bytes) { connection.send(bytes); }
};

// One request/response round: `size` bytes out, the same bytes back.
template <class Loop>
bool round_trip(Loop& loop, int fd, const char* message, char* reply, std::size_t size) {
  std::size_t sent = 0;
  std::size_t received = 0;
  while (received < size) {
    if (sent < size) {
      const ssize_t n = ::send(fd, message + sent, size - sent, MSG_NOSIGNAL);
      if (n > 0) sent += static_cast<std::size_t>(n);
    }
    loop.run_once(100ms);
    const ssize_t n = ::read(fd, reply + received, size - received);
    if (n > 0) received += static_cast<std::size_t>(n);
    if (n == 0) return false;
  }
  return std::memcmp(message, reply, size) == 0;
}

template <class Loop>
std::size_t allocations_per_round(std::size_t size) {
  Loop loop;
  auto [mine, theirs] = test::socket_pair();
  reactor::adopt(loop, std::move(mine), Echo{});
  const std::string message = test::pattern(size);
  std::string reply(size, '\0');
  for (int i = 0; i < 50; ++i) {  // warm up: the pool fills, the event batch settles
    REQUIRE(round_trip(loop, theirs.get(), message.data(), reply.data(), size));
  }
  const std::size_t before = test::heap_allocations.load();
  constexpr int kRounds = 500;
  for (int i = 0; i < kRounds; ++i) {
    REQUIRE(round_trip(loop, theirs.get(), message.data(), reply.data(), size));
  }
  return test::heap_allocations.load() - before;
}

}  // namespace

TEMPLATE_TEST_CASE("the steady-state echo path allocates nothing per message",
                   "[connection][memory]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  using Loop = reactor::Reactor<TestType>;
  CHECK(allocations_per_round<Loop>(64) == 0);
  // 512 KiB does not fit the socket buffer at once: replies are queued, then flushed with writev.
  CHECK(allocations_per_round<Loop>(512 * 1024) == 0);
}
