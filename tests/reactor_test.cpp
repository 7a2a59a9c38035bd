// Tests for include/reactor/reactor.hpp (and the watchers of watcher.hpp and signals.hpp): running
// and stopping, the event batch, stale events, interest masking, signals, setup errors.
#include <reactor/reactor.hpp>

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

#include <reactor/connection.hpp>
#include <reactor/signals.hpp>
#include <reactor/watcher.hpp>

#include "catch.hpp"
#include "loopback.hpp"

namespace {

using namespace std::chrono_literals;
using Loop = reactor::Reactor<>;

// A pipe whose read end is readable until drained.
struct Pipe {
  Pipe() {
    int fds[2];
    REQUIRE(::pipe2(fds, O_NONBLOCK | O_CLOEXEC) == 0);
    read_end.reset(fds[0]);
    write_end.reset(fds[1]);
  }
  void fill() const { REQUIRE(::write(write_end.get(), "x", 1) == 1); }
  reactor::UniqueFd read_end;
  reactor::UniqueFd write_end;
};

}  // namespace

TEST_CASE("stop from another thread makes run return", "[reactor][threads]") {
  Loop loop;
  std::thread stopper([&] { loop.stop(); });
  loop.run();
  stopper.join();
  CHECK_FALSE(loop.stop_requested());  // run consumed the request
}

TEST_CASE("stop from a callback ends run after the batch, and run can be called again",
          "[reactor]") {
  Loop loop;
  Pipe pipe;
  int calls = 0;
  reactor::FdWatcher watcher(loop, pipe.read_end.get(), EPOLLIN, [&](std::uint32_t events) {
    CHECK(events == EPOLLIN);
    char byte;
    REQUIRE(::read(pipe.read_end.get(), &byte, 1) == 1);
    ++calls;
    loop.stop();
  });
  pipe.fill();
  loop.run();
  CHECK(calls == 1);
  pipe.fill();
  loop.run();
  CHECK(calls == 2);
}

TEST_CASE("run_once returns no events when its timeout passes", "[reactor]") {
  Loop loop;
  const auto start = std::chrono::steady_clock::now();
  CHECK(loop.run_once(20ms) == 0);
  CHECK(std::chrono::steady_clock::now() - start >= 15ms);
  CHECK(loop.loop_iterations() == 1);
}

TEST_CASE("the event batch doubles when it comes back full, up to its maximum", "[reactor]") {
  reactor::ReactorOptions options;
  options.initial_events = 2;
  options.max_events = 8;
  Loop loop(options);
  std::vector<Pipe> pipes(10);
  std::vector<std::unique_ptr<reactor::FdWatcher<void (*)(std::uint32_t)>>> watchers;
  for (auto& pipe : pipes) {
    pipe.fill();  // level-triggered and never drained: ready every time
    watchers.push_back(std::make_unique<reactor::FdWatcher<void (*)(std::uint32_t)>>(
        loop, pipe.read_end.get(), EPOLLIN, [](std::uint32_t) {}));
  }
  CHECK(loop.run_once(0ms) == 2);
  CHECK(loop.run_once(0ms) == 4);
  CHECK(loop.run_once(0ms) == 8);
  CHECK(loop.run_once(0ms) == 8);
}

namespace {

struct Destroyer {
  std::unique_ptr<reactor::FdWatcher<Destroyer>>* other;
  int* calls;
  void operator()(std::uint32_t /*events*/) const {
    ++*calls;
    other->reset();  // removed while its own event may still be queued in this batch
  }
};

}  // namespace

TEST_CASE("a watcher destroyed during dispatch gets no stale event from the batch", "[reactor]") {
  Loop loop;
  Pipe a;
  Pipe b;
  a.fill();
  b.fill();
  int calls = 0;
  std::unique_ptr<reactor::FdWatcher<Destroyer>> watcher_a;
  std::unique_ptr<reactor::FdWatcher<Destroyer>> watcher_b;
  watcher_a = std::make_unique<reactor::FdWatcher<Destroyer>>(loop, a.read_end.get(), EPOLLIN,
                                                              Destroyer{&watcher_b, &calls});
  watcher_b = std::make_unique<reactor::FdWatcher<Destroyer>>(loop, b.read_end.get(), EPOLLIN,
                                                              Destroyer{&watcher_a, &calls});
  CHECK(loop.run_once(1s) == 2);
  CHECK(calls == 1);
  CHECK((watcher_a == nullptr) != (watcher_b == nullptr));
}

namespace {

struct Pausing;
using PausingConnection = reactor::Connection<Pausing, Loop>;

struct Pausing {
  std::array<PausingConnection*, 2>* connections;
  std::array<int, 2>* data_calls;
  int index;
  void on_data(PausingConnection& /*connection*/, std::string_view /*bytes*/) {
    ++(*data_calls)[index];
    (*connections)[1 - index]->pause_reading();
  }
};

}  // namespace

TEST_CASE("an event is masked by the interest registered when it is dispatched", "[reactor]") {
  Loop loop;
  std::array<PausingConnection*, 2> connections{};
  std::array<int, 2> data_calls{};
  auto [a, peer_a] = test::socket_pair();
  auto [b, peer_b] = test::socket_pair();
  connections[0] = &reactor::adopt(loop, std::move(a), Pausing{&connections, &data_calls, 0});
  connections[1] = &reactor::adopt(loop, std::move(b), Pausing{&connections, &data_calls, 1});
  REQUIRE(::write(peer_a.get(), "a", 1) == 1);
  REQUIRE(::write(peer_b.get(), "b", 1) == 1);
  CHECK(loop.run_once(1s) == 2);
  CHECK(data_calls[0] + data_calls[1] == 1);  // the paused one's queued EPOLLIN was dropped
  const int paused = data_calls[0] == 1 ? 1 : 0;
  connections[paused]->resume_reading();
  REQUIRE(test::run_until(loop, [&] { return data_calls[paused] == 1; }));
}

TEST_CASE("a signal arrives as an event through signalfd, and the mask is restored",
          "[reactor][signals]") {
  Loop loop;
  std::vector<int> received;
  {
    reactor::SignalSet signals(loop, {SIGUSR1, SIGUSR2},
                               [&](int signal) { received.push_back(signal); });
    sigset_t current;
    ::pthread_sigmask(SIG_BLOCK, nullptr, &current);
    CHECK(sigismember(&current, SIGUSR1) == 1);
    REQUIRE(::pthread_kill(::pthread_self(), SIGUSR2) == 0);
    REQUIRE(test::run_until(loop, [&] { return !received.empty(); }));
    CHECK(received == std::vector<int>{SIGUSR2});
  }
  sigset_t after;
  ::pthread_sigmask(SIG_BLOCK, nullptr, &after);
  CHECK(sigismember(&after, SIGUSR1) == 0);
  CHECK(sigismember(&after, SIGUSR2) == 0);
}

TEST_CASE("a reactor owns exactly its epoll fd and eventfd", "[reactor]") {
  const std::size_t before = test::open_fd_count();
  {
    Loop loop;
    CHECK(test::open_fd_count() == before + 2);
  }
  CHECK(test::open_fd_count() == before);
}

namespace {

struct NoEpoll : reactor::LinuxSyscalls {
  static int epoll_create1(int /*flags*/) noexcept {
    errno = EMFILE;
    return -1;
  }
};

}  // namespace

TEST_CASE("a reactor that cannot be created throws naming the syscall", "[reactor][errors]") {
  try {
    reactor::Reactor<reactor::LevelTriggered, NoEpoll> loop;
    FAIL("no exception");
  } catch (const std::system_error& e) {
    CHECK(e.code() == std::errc::too_many_files_open);
    CHECK(std::string(e.what()).find("epoll_create1") != std::string::npos);
  }
  std::error_code ec;
  reactor::Reactor<reactor::LevelTriggered, NoEpoll> loop({}, ec);
  CHECK(ec == std::errc::too_many_files_open);
}

namespace {

// Sends a large block as soon as it opens.
struct Greeter {
  const std::string* block;
  void on_open(auto& connection) { connection.send(*block); }
  void on_data(auto& /*connection*/, std::string_view /*bytes*/) {}
};

}  // namespace

TEST_CASE("graceful shutdown flushes what peers read and aborts the rest at the deadline",
          "[reactor][shutdown]") {
  Loop loop;
  const std::string block = test::pattern(4 << 20, 13);
  reactor::Acceptor<Greeter, Loop> acceptor(loop, reactor::Endpoint::parse("127.0.0.1:0"),
                                            Greeter{&block});
  reactor::UniqueFd reader = reactor::connect(acceptor.local_endpoint());
  reactor::UniqueFd stuck = reactor::connect(acceptor.local_endpoint());
  REQUIRE(test::run_until(loop, [&] { return loop.connection_count() == 2; }));

  std::string received;
  std::thread draining([&] {  // a peer that reads everything, then closes at EOF
    char buffer[65536];
    for (;;) {
      pollfd waiting{reader.get(), POLLIN, 0};
      if (::poll(&waiting, 1, 10000) <= 0) break;
      const ssize_t n = ::read(reader.get(), buffer, sizeof buffer);
      if (n <= 0) break;
      received.append(buffer, static_cast<std::size_t>(n));
    }
    reader.reset();
  });
  const reactor::ShutdownReport report = loop.shutdown(500ms);
  draining.join();
  CHECK(report.flushed == 1);
  CHECK(report.aborted == 1);
  CHECK(received == block);
  CHECK_FALSE(acceptor.is_open());
  CHECK(loop.connection_count() == 0);
}

// --- Per-loop state: local<T>() ----------------------------------------------------------------

namespace {

struct Tally {
  int value = 0;
};

// Counts into the loop's Tally in on_data and on_close, and records the Tally it saw at close.
struct TallyUser {
  std::vector<int>* seen_at_close;
  void on_data(auto& c, std::string_view bytes) {
    c.reactor().template local<Tally>().value += static_cast<int>(bytes.size());
  }
  void on_close(auto& c, std::error_code) {
    seen_at_close->push_back(++c.reactor().template local<Tally>().value);
  }
};

struct Named {
  explicit Named(std::string text, std::vector<std::string>* log)
      : name(std::move(text)), out(log) {}
  ~Named() { out->push_back("destroyed " + name); }
  std::string name;
  std::vector<std::string>* out;
};

}  // namespace

TEST_CASE("local state is one object per reactor shared by its connections and outlives on_close",
          "[reactor][local]") {
  std::vector<int> seen_at_close;
  auto [a, peer_a] = test::socket_pair();
  auto [b, peer_b] = test::socket_pair();
  {
    Loop loop;
    Loop other;
    CHECK(loop.find_local<Tally>() == nullptr);
    Tally& tally = loop.local<Tally>();
    CHECK(&loop.local<Tally>() == &tally);
    CHECK(loop.find_local<Tally>() == &tally);
    CHECK(&other.local<Tally>() != &tally);  // each reactor its own
    reactor::adopt(loop, std::move(a), TallyUser{&seen_at_close});
    reactor::adopt(loop, std::move(b), TallyUser{&seen_at_close});
    REQUIRE(::write(peer_a.get(), "abc", 3) == 3);
    REQUIRE(::write(peer_b.get(), "defgh", 5) == 5);
    REQUIRE(test::run_until(loop, [&] { return tally.value == 8; }));
    CHECK(other.local<Tally>().value == 0);
  }  // the reactor aborts both connections; their on_close still finds the Tally
  CHECK(seen_at_close == std::vector<int>{9, 10});
}

TEST_CASE("emplace_local constructs from arguments and replaces and destroys newest first",
          "[reactor][local]") {
  std::vector<std::string> log;
  {
    Loop loop;
    loop.emplace_local<Named>("first", &log);
    loop.emplace_local<Tally>(Tally{7});
    CHECK(loop.find_local<Named>()->name == "first");
    Named& second = loop.emplace_local<Named>("second", &log);
    CHECK(log == std::vector<std::string>{"destroyed first"});
    CHECK(loop.find_local<Named>() == &second);
    CHECK(loop.local<Tally>().value == 7);
  }
  CHECK(log == std::vector<std::string>{"destroyed first", "destroyed second"});
}
