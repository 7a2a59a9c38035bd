// Tests for include/reactor/handle.hpp and Reactor::post: work posted from other threads, and
// connection handles used from several threads while peers reset their connections. Run under the
// `tsan` preset too.
#include <reactor/handle.hpp>

#include <atomic>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include <reactor.hpp>

#include "catch.hpp"
#include "loopback.hpp"

namespace {

using namespace std::chrono_literals;
using Loop = reactor::Reactor<>;

// Counts eventfd wakeups (8-byte writes), to see post() coalesce them.
struct CountingSyscalls : reactor::LinuxSyscalls {
  static inline std::atomic<int> wakeups{0};
  static ssize_t write(int fd, const void* data, std::size_t size) noexcept {
    if (size == sizeof(std::uint64_t)) wakeups.fetch_add(1);
    return reactor::LinuxSyscalls::write(fd, data, size);
  }
};

}  // namespace

TEST_CASE("posted work runs on the loop in FIFO order with one wakeup", "[post]") {
  reactor::Reactor<reactor::LevelTriggered, CountingSyscalls> loop;
  std::vector<int> ran;
  CountingSyscalls::wakeups = 0;
  std::thread poster([&] {
    for (int i = 0; i < 1000; ++i) loop.post([&ran, i] { ran.push_back(i); });
  });
  poster.join();
  CHECK(CountingSyscalls::wakeups.load() == 1);  // coalesced: the loop had not run yet
  CHECK(ran.empty());                            // nothing runs off the loop thread
  loop.run_once(1s);
  REQUIRE(ran.size() == 1000);
  for (int i = 0; i < 1000; ++i) REQUIRE(ran[static_cast<std::size_t>(i)] == i);
}

TEST_CASE("work posted from four threads runs exactly once, each thread's in order", "[post]") {
  Loop loop;
  constexpr int kThreads = 4;
  constexpr int kTasks = 2000;
  std::vector<std::vector<int>> ran(kThreads);
  std::atomic<int> done{0};
  std::vector<std::thread> posters;
  for (int t = 0; t < kThreads; ++t) {
    posters.emplace_back([&, t] {
      for (int i = 0; i < kTasks; ++i) {
        loop.post([&ran, &done, t, i] {
          ran[static_cast<std::size_t>(t)].push_back(i);
          done.fetch_add(1, std::memory_order_relaxed);
        });
      }
    });
  }
  REQUIRE(test::run_until(loop, [&] { return done.load() == kThreads * kTasks; }));
  for (auto& poster : posters) poster.join();
  loop.run_once(0ms);
  for (const auto& sequence : ran) {
    REQUIRE(sequence.size() == kTasks);
    for (int i = 0; i < kTasks; ++i) REQUIRE(sequence[static_cast<std::size_t>(i)] == i);
  }
}

TEST_CASE("a task too large to store inline still runs", "[post]") {
  Loop loop;
  std::array<char, 256> big{};
  big[255] = 'z';
  char seen = 0;
  loop.post([big, &seen] { seen = big[255]; });
  loop.run_once(1s);
  CHECK(seen == 'z');
}

namespace {

struct Keeper {
  std::vector<reactor::ConnectionHandle<Loop>>* handles;
  void on_open(auto& connection) { handles->push_back(connection.handle()); }
  void on_data(auto& /*connection*/, std::string_view /*bytes*/) {}
};

}  // namespace

TEST_CASE("a handle to a closed connection is rejected, even after its slot is reused",
          "[handle]") {
  Loop loop;
  std::vector<reactor::ConnectionHandle<Loop>> handles;
  auto [a, peer_a] = test::socket_pair();
  auto& first = reactor::adopt(loop, std::move(a), Keeper{&handles});
  REQUIRE(handles.size() == 1);
  const auto stale = handles[0];
  CHECK(stale == first.handle());
  CHECK(stale.is_current());
  CHECK_FALSE(stale.send("hello"));
  char buffer[16];
  CHECK(::read(peer_a.get(), buffer, sizeof buffer) == 5);

  first.abort();
  loop.run_once(0ms);
  CHECK_FALSE(stale.is_current());
  CHECK(stale.send("x") == std::errc::not_connected);
  CHECK(stale.close() == std::errc::not_connected);

  auto [b, peer_b] = test::socket_pair();
  reactor::adopt(loop, std::move(b), Keeper{&handles});
  REQUIRE(handles.size() == 2);
  CHECK(test::open_fd_count() > 0);
  CHECK(reactor::ConnectionHandle<Loop>().send("x") == std::errc::not_connected);
  CHECK(stale.send("x") == std::errc::not_connected);  // same slot, new generation
  CHECK_FALSE(handles[1].send("fresh"));
  CHECK(::read(peer_b.get(), buffer, sizeof buffer) == 5);
}

namespace {

// Accepted connections publish their handles for the worker threads.
struct Published {
  std::mutex* mutex;
  std::vector<reactor::ConnectionHandle<Loop>>* handles;
  void on_open(auto& connection) {
    const std::lock_guard lock(*mutex);
    handles->push_back(connection.handle());
  }
  void on_data(auto& /*connection*/, std::string_view /*bytes*/) {}
};

}  // namespace

TEST_CASE("four threads send and close through handles while peers reset connections",
          "[handle][threads]") {
  Loop loop;
  std::mutex mutex;
  std::vector<reactor::ConnectionHandle<Loop>> handles;
  reactor::Acceptor<Published, Loop> acceptor(loop, reactor::Endpoint::parse("127.0.0.1:0"),
                                              Published{&mutex, &handles});
  constexpr int kConnections = 100;
  std::vector<reactor::UniqueFd> peers;
  for (int i = 0; i < kConnections; ++i)
    peers.push_back(reactor::connect(acceptor.local_endpoint()));
  REQUIRE(test::run_until(loop, [&] {
    const std::lock_guard lock(mutex);
    return handles.size() == kConnections;
  }));

  std::thread runner([&] { loop.run(); });
  std::atomic<int> accepted{0};
  std::atomic<int> refused{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < 4; ++t) {
    workers.emplace_back([&, t] {
      std::mt19937 random(static_cast<unsigned>(t));
      for (int i = 0; i < 2000; ++i) {
        reactor::ConnectionHandle<Loop> handle;
        {
          const std::lock_guard lock(mutex);
          handle = handles[random() % handles.size()];
        }
        const std::error_code ec = random() % 50 == 0 ? handle.close() : handle.send("token:42;");
        (ec ? refused : accepted).fetch_add(1, std::memory_order_relaxed);
      }
    });
  }
  // Meanwhile, reset every third peer and read from the others.
  for (int i = 0; i < kConnections; i += 3) {
    const linger reset{1, 0};
    ::setsockopt(peers[static_cast<std::size_t>(i)].get(), SOL_SOCKET, SO_LINGER, &reset,
                 sizeof reset);
    peers[static_cast<std::size_t>(i)].reset();
  }
  for (auto& worker : workers) worker.join();
  loop.post([&] { loop.close_all(); });
  // Drain what the live peers received: only whole tokens, never a torn or foreign byte.
  std::size_t tokens = 0;
  for (auto& peer : peers) {
    if (!peer) continue;
    std::string received;
    char buffer[4096];
    for (;;) {
      pollfd waiting{peer.get(), POLLIN, 0};
      if (::poll(&waiting, 1, 5000) <= 0) break;
      const ssize_t n = ::read(peer.get(), buffer, sizeof buffer);
      if (n <= 0) break;
      received.append(buffer, static_cast<std::size_t>(n));
    }
    REQUIRE(received.size() % 9 == 0);
    for (std::size_t k = 0; k < received.size(); k += 9)
      REQUIRE(received.compare(k, 9, "token:42;") == 0);
    tokens += received.size() / 9;
    peer.reset();  // the server lingers for our EOF before it closes
  }
  // The loop thread stops itself once every connection has closed (bounded by a deadline).
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  loop.post([&] {
    loop.schedule_every(1ms, [&] {
      if (loop.connection_count() == 0 || std::chrono::steady_clock::now() > deadline) loop.stop();
    });
  });
  runner.join();
  CHECK(accepted.load() + refused.load() == 4 * 2000);
  CHECK(tokens <= static_cast<std::size_t>(accepted.load()));
  CHECK(tokens > 0);
  CHECK(loop.connection_count() == 0);
  for (const auto& handle : handles) CHECK(handle.send("late") == std::errc::not_connected);
}
