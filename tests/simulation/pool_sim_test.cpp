// Scenarios for ReactorPool and PoolAcceptor (include/reactor/pool.hpp) in the simulated world
// (tests/support/sim_kernel.hpp), from seeds, in virtual time: every Balance mode in both trigger
// modes, remote peers that connect, send, half-close or wait to be closed, and a graceful shutdown
// that finds connections on every reactor, in the listen queues and in hand-offs not yet run.
//
// The simulation is single-threaded, and ReactorPool::run() and shutdown() start threads, so the
// pool's reactors are driven here as its threads would drive them, on this one thread:
//   - serving: drive() gives each reactor one run_once(0) per round, in an order drawn from the
//     seed; when a round received no event and moved nothing, every thread would block, and the
//     kernel's clock moves to the next timer or world action (Kernel::block_all(), which also
//     takes every idle epoll set as a waiter, as EPOLLEXCLUSIVE's wakeup needs);
//   - shutting down: shutdown_phases() runs Reactor::shutdown_with, the pool's own hook, on each
//     reactor nested in the previous one's `listeners_closed` callback, in an order drawn from the
//     seed. So every reactor closes its acceptors (each accepting its listen queue) before any of
//     them serves out, which is the order ReactorPool::shutdown's barrier guarantees; the serving
//     out then runs one reactor after the other (innermost first) instead of at once: one of the
//     schedules the pool's threads may take, except that each reactor's grace period starts when
//     its own serving out does (so no test here asserts the pool's total shutdown time).
// The simulated kernel reports a spin or a hang itself (and aborts with its last calls).
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <reactor.hpp>

#include "catch.hpp"
#include "sim_kernel.hpp"

namespace pool_sim {

// The tag of the ReactorPool specialization below.
struct Phases {};

}  // namespace pool_sim

namespace reactor {

// Test-only access to Reactor::shutdown_with(), which Reactor keeps private for ReactorPool: it
// befriends every ReactorPool<R>, and this explicit specialization for a test tag is one of them.
// It drives the pool's shutdown phases on one thread; it is no pool.
template <>
class ReactorPool<pool_sim::Phases> {
 public:
  template <class R, class F>
  static ShutdownReport shutdown_with(R& loop, std::chrono::milliseconds grace,
                                      std::chrono::milliseconds quiet, F&& listeners_closed) {
    // consume_stop false, as the pool calls it (it clears the reactors' stops itself).
    return loop.shutdown_with(grace, quiet, false, std::forward<F>(listeners_closed),
                              [](bool serving) { return serving; });
  }
  // ReactorPool::clear_stops(), which the pool's shutdown() does before and after its reactors'.
  template <class R>
  static void clear_stop(R& loop) {
    loop.stop_requested_.store(false, std::memory_order_release);
  }
};

}  // namespace reactor

namespace pool_sim {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using reactor::Balance;

template <class Trigger>
using SimLoop = reactor::Reactor<Trigger, sim::SimSyscalls>;
template <class Trigger>
using SimPool = reactor::ReactorPool<SimLoop<Trigger>>;

constexpr std::uint16_t kPort = 7000;
constexpr std::size_t kNone = std::numeric_limits<std::size_t>::max();

const char* mode_name(Balance balance) {
  switch (balance) {
    case Balance::kReusePort:
      return "reuse port";
    case Balance::kRoundRobin:
      return "round robin";
    case Balance::kLeastConnections:
      return "least connections";
    case Balance::kExclusive:
      return "exclusive";
  }
  return "?";
}

bool dispatches(Balance balance) {
  return balance == Balance::kRoundRobin || balance == Balance::kLeastConnections;
}

// Seeded draws; std::mt19937_64 is the same everywhere, unlike the standard distributions.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : engine_(seed * 0x9e3779b97f4a7c15ULL + 1) {}
  std::size_t below(std::size_t n) { return n == 0 ? 0 : static_cast<std::size_t>(engine_() % n); }
  bool chance(std::size_t percent) { return below(100) < percent; }
  // A permutation of 0..n-1 (Fisher-Yates).
  std::vector<std::size_t> order(std::size_t n) {
    std::vector<std::size_t> result(n);
    std::iota(result.begin(), result.end(), std::size_t{0});
    for (std::size_t i = n; i > 1; --i) std::swap(result[i - 1], result[below(i)]);
    return result;
  }

 private:
  std::mt19937_64 engine_;
};

// `size` bytes that differ from peer to peer and from offset to offset.
std::string request_bytes(std::size_t peer, std::size_t size) {
  std::string bytes(size, '\0');
  for (std::size_t i = 0; i < size; ++i) {
    bytes[i] = static_cast<char>('a' + (i * 7 + peer * 13 + (i >> 9)) % 26);
  }
  return bytes;
}

// --- the server --------------------------------------------------------------------------------

// What the pool's connections went through, per reactor. Declared before the pool, so that the
// on_close calls of the pool's destructor find it.
template <class Loop>
struct Tally {
  void attach(reactor::ReactorPool<Loop>& pool) {
    for (std::size_t i = 0; i < pool.size(); ++i) reactors.push_back(&pool[i]);
    opened.assign(pool.size(), 0);
    closed.assign(pool.size(), 0);
  }
  std::size_t index(const Loop& loop) const {
    const auto it = std::find(reactors.begin(), reactors.end(), &loop);
    return it == reactors.end() ? kNone : static_cast<std::size_t>(it - reactors.begin());
  }
  std::size_t total_opened() const {
    return std::accumulate(opened.begin(), opened.end(), std::size_t{0});
  }
  std::size_t total_closed() const {
    return std::accumulate(closed.begin(), closed.end(), std::size_t{0});
  }

  std::vector<const Loop*> reactors;
  std::vector<std::size_t> opened;                       // on_open per reactor
  std::vector<std::size_t> closed;                       // on_close per reactor
  std::map<std::uint16_t, std::size_t> reactor_of_port;  // the peer's port -> its reactor
  std::size_t clean = 0;
  bool shutting_down = false;
  std::size_t closed_in_shutdown = 0;
  bool expect_clean = true;         // an on_close with an error is a fault
  std::vector<std::string> faults;  // broken promises, as text
};

// Echoes everything; records where it runs and how it ends.
template <class Loop>
struct Echo {
  using Conn = reactor::Connection<Echo, Loop>;

  Tally<Loop>* tally;
  std::size_t home = kNone;  // the index of its reactor, set by on_open
  bool closed = false;

  void on_open(Conn& c) {
    home = tally->index(c.reactor());
    if (home == kNone) {
      tally->faults.emplace_back("on_open on a reactor not the pool's");
      return;
    }
    if (!reactor::detail::running_in_this_thread(&c.reactor())) {
      tally->faults.emplace_back("on_open off its loop thread");
    }
    ++tally->opened[home];
    tally->reactor_of_port[c.remote_endpoint().port()] = home;
  }
  void on_data(Conn& c, std::string_view bytes) {
    if (!c.send(bytes.data(), bytes.size())) tally->faults.emplace_back("send refused");
  }
  void on_close(Conn& c, std::error_code reason) {
    if (home == kNone || closed) {
      tally->faults.emplace_back(closed ? "on_close twice" : "on_close without on_open");
      return;
    }
    if (tally->index(c.reactor()) != home) tally->faults.emplace_back("moved reactor");
    closed = true;
    ++tally->closed[home];
    if (!reason) {
      ++tally->clean;
    } else if (tally->expect_clean) {
      tally->faults.emplace_back("closed with " + reason.message());
    }
    if (tally->shutting_down) ++tally->closed_in_shutdown;
  }
};

// --- the peers ---------------------------------------------------------------------------------

// Remote peers, pumped by a world action every `period` (another thread, to the library): each
// sends its request as the stream takes it, reads what comes back, half-closes when its plan
// says, and closes once it has read EOF.
class Crowd {
 public:
  enum class Plan {
    kHalfClose,    // half-close once the request is sent
    kHalfCloseAt,  // ...but not before `shut_at`
    kWait,         // never half-close: wait for the server to close
  };
  struct Peer {
    std::optional<sim::PeerId> id;
    std::string request;
    Plan plan = Plan::kHalfClose;
    sim::TimePoint shut_at{};
    std::size_t sent = 0;
    std::string received;
    bool shut = false;
    bool eof = false;
    bool closed = false;
    int error = 0;  // errno of a failed send or recv
  };

  Crowd(sim::Kernel& kernel, Clock::duration period) : kernel_(kernel), period_(period) {}
  Crowd(const Crowd&) = delete;
  Crowd& operator=(const Crowd&) = delete;

  // A peer with `request` to send, connecting now or at `when` (a world action).
  std::size_t add(std::string request, Plan plan, sim::TimePoint shut_at = {}) {
    Peer peer;
    peer.request = std::move(request);
    peer.plan = plan;
    peer.shut_at = shut_at;
    peers_.push_back(std::move(peer));
    return peers_.size() - 1;
  }
  void connect_now(std::size_t i) {
    const std::optional<sim::PeerId> id = kernel_.connect(kPort);
    if (!id) {
      peers_[i].error = ECONNREFUSED;
      return;
    }
    peers_[i].id = id;
    step(peers_[i]);
    pump();
  }
  void connect_at(std::size_t i, sim::TimePoint when) {
    ++scheduled_;
    kernel_.at(when, [this, i] {
      --scheduled_;
      connect_now(i);
    });
  }

  // The peer closes now (FIN), whatever its plan.
  void close_now(std::size_t i) {
    kernel_.peer_close(*peers_[i].id);
    peers_[i].closed = true;
  }

  // One pass over every peer (also what the world action does).
  void step_all() {
    for (Peer& peer : peers_) step(peer);
  }

  bool finished(std::size_t i) const { return peers_[i].closed || peers_[i].error == ECONNREFUSED; }
  bool all_finished() const {
    if (scheduled_ > 0) return false;
    for (std::size_t i = 0; i < peers_.size(); ++i) {
      if (!finished(i)) return false;
    }
    return true;
  }
  std::size_t size() const { return peers_.size(); }
  const Peer& operator[](std::size_t i) const { return peers_[i]; }
  std::uint16_t port_of(std::size_t i) const { return kernel_.peer_port(*peers_[i].id); }

 private:
  void step(Peer& peer) {
    if (!peer.id || peer.closed) return;
    const sim::PeerId id = *peer.id;
    if (peer.sent < peer.request.size() && peer.error == 0) {
      const ssize_t n = kernel_.peer_send(id, std::string_view(peer.request).substr(peer.sent));
      if (n > 0) {
        peer.sent += static_cast<std::size_t>(n);
      } else if (errno != EAGAIN) {
        peer.error = errno;
      }
    }
    while (peer.error == 0 && !peer.eof) {
      const ssize_t n = kernel_.peer_recv(id, peer.received);
      if (n > 0) continue;
      if (n == 0) {
        peer.eof = true;
      } else if (errno != EAGAIN) {
        peer.error = errno;
      }
      break;
    }
    const bool plan_says = peer.plan == Plan::kHalfClose ||
                           (peer.plan == Plan::kHalfCloseAt && kernel_.now() >= peer.shut_at);
    if (!peer.shut && peer.error == 0 && peer.sent == peer.request.size() && plan_says) {
      if (kernel_.peer_shutdown(id) != 0) peer.error = errno;
      peer.shut = true;
    }
    if ((peer.eof || peer.error != 0) && !peer.closed) {
      kernel_.peer_close(id);
      peer.closed = true;
    }
  }

  // Keeps the world action going while a connected peer is not finished.
  void pump() {
    if (pumping_) return;
    pumping_ = true;
    kernel_.after(period_, [this] {
      pumping_ = false;
      step_all();
      bool busy = false;
      for (const Peer& peer : peers_) busy = busy || (peer.id && !peer.closed);
      if (busy) pump();
    });
  }

  sim::Kernel& kernel_;
  Clock::duration period_;
  std::vector<Peer> peers_;
  std::size_t scheduled_ = 0;
  bool pumping_ = false;
};

// --- driving the pool ----------------------------------------------------------------------------

// Runs the pool's reactors as its threads would, until `done()`: rounds of one run_once(0) each,
// in an order drawn from `rng`; when a round got no event and moved nothing, every thread would
// block, so the clock moves to the next timer or world action. False if not done in `rounds`.
template <class Pool, class Done>
bool drive(sim::Kernel& kernel, Pool& pool, Rng& rng, Done done, int rounds = 200000) {
  for (int round = 0; round < rounds; ++round) {
    if (done()) return true;
    const std::uint64_t before = kernel.progress_marks();
    std::size_t events = 0;
    for (const std::size_t i : rng.order(pool.size())) events += pool[i].run_once(0ms);
    if (events == 0 && kernel.progress_marks() == before && !done()) kernel.block_all();
  }
  return done();
}

// ReactorPool::shutdown on one thread: its stops cleared, then reactor order[0]'s shutdown_with,
// whose listeners_closed callback runs order[1]'s, and so on (the innermost serves out first),
// then the stops cleared again (a stop() that ended one reactor's grace after another had finished
// is spent: ReactorPool::shutdown since 4e1e119). `arrived` counts the callbacks that ran (each
// reactor's must, once). Returns the summed report.
template <class Pool>
reactor::ShutdownReport shutdown_phases(Pool& pool, const std::vector<std::size_t>& order,
                                        std::chrono::milliseconds grace,
                                        std::chrono::milliseconds quiet, std::size_t& arrived,
                                        std::vector<reactor::ShutdownReport>& reports) {
  using Driver = reactor::ReactorPool<Phases>;
  reports.assign(pool.size(), reactor::ShutdownReport{});
  for (std::size_t i = 0; i < pool.size(); ++i) Driver::clear_stop(pool[i]);
  std::function<void(std::size_t)> shut = [&](std::size_t k) {
    if (k == order.size()) return;
    reports[order[k]] = Driver::shutdown_with(pool[order[k]], grace, quiet, [&shut, &arrived, k] {
      ++arrived;
      shut(k + 1);
    });
  };
  shut(0);
  for (std::size_t i = 0; i < pool.size(); ++i) Driver::clear_stop(pool[i]);
  reactor::ShutdownReport total;
  for (const reactor::ShutdownReport& report : reports) {
    total.flushed += report.flushed;
    total.failed += report.failed;
    total.aborted += report.aborted;
    if (!total.error) total.error = report.error;
  }
  return total;
}

// Checks that peer i got exactly its request back, then EOF, and was never reset.
void check_echoed(const sim::Kernel& kernel, const Crowd& crowd, std::size_t i) {
  CAPTURE(i);
  const Crowd::Peer& peer = crowd[i];
  REQUIRE(peer.id.has_value());
  CHECK(peer.error == 0);
  CHECK(peer.eof);
  CHECK(peer.received.size() == peer.request.size());
  CHECK(peer.received == peer.request);
  CHECK_FALSE(kernel.peer_was_reset(*peer.id));
}

template <class Loop>
void check_no_faults(const Tally<Loop>& tally) {
  for (const std::string& fault : tally.faults) FAIL_CHECK(fault);
  CHECK(tally.faults.empty());
}

// Faults that lose nothing, on about one call in eight, drawn from `seed`: EINTR from epoll_wait,
// reads, sends and accept4, epoll_wait batches of 1 to 3 events, accept4's ECONNABORTED (the
// connection is taken by the next call here), and, in level mode, short reads and writes (edge
// mode takes a short transfer on TCP for "drained", as the syscall contract allows).
void install_harmless_faults(sim::Kernel& kernel, std::uint64_t seed, bool edge) {
  auto rng = std::make_shared<Rng>(seed ^ 0xfa017ULL);
  kernel.set_faults([rng, edge](sim::Op op, int) -> sim::Fault {
    if (!rng->chance(12)) return {};
    const bool eintr = rng->chance(50);
    switch (op) {
      case sim::Op::kEpollWait:
        return eintr ? sim::Fault{EINTR} : sim::Fault{0, 1 + rng->below(3)};
      case sim::Op::kRead:
      case sim::Op::kSend:
      case sim::Op::kSendmsg:
        if (eintr) return {EINTR};
        return edge ? sim::Fault{} : sim::Fault{0, 1 + rng->below(700)};
      case sim::Op::kAccept4:
        return {eintr ? EINTR : ECONNABORTED};
      default:
        return {};
    }
  });
}

}  // namespace
}  // namespace pool_sim

using namespace pool_sim;

// --- serving -------------------------------------------------------------------------------------

// Every mode, both trigger modes, 2 or 3 reactors, peers arriving over 48 ms with requests of up
// to 12 KiB through streams of 1 to 64 KiB, with and without harmless faults: each peer gets
// exactly its bytes back, each connection lives on one reactor from on_open to on_close, and what
// each reactor opened is what the acceptor says it gave it. Round robin hands peer j to reactor j
// mod n exactly; least connections and reuse port give every reactor some (the first counts live
// connections, and peers here leave while others arrive; the second hashes). Exclusive mode favours
// the reactors that joined the listener's wait queue first, 16 accepts at a time: its own test
// below.
TEMPLATE_TEST_CASE("every peer of a pool gets exactly its bytes back, in every balance mode",
                   "[pool][simulation]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  const Balance balance = GENERATE(Balance::kReusePort, Balance::kRoundRobin,
                                   Balance::kLeastConnections, Balance::kExclusive);
  const bool faults = GENERATE(false, true);
  const std::uint64_t seed = GENERATE(range(0, 5));
  CAPTURE(mode_name(balance), faults, seed);
  Rng rng(seed * 8 + static_cast<std::uint64_t>(balance));
  constexpr std::size_t kCapacities[] = {1024, 4096, 65536};
  sim::Kernel kernel(kCapacities[rng.below(3)]);
  if (faults) install_harmless_faults(kernel, seed, TestType::kEdge);
  const std::size_t n = 2 + rng.below(2);
  constexpr std::size_t kPeers = 24;
  Crowd crowd(kernel, std::chrono::milliseconds(1 + rng.below(3)));
  Tally<Loop> tally;
  {
    SimPool<TestType> pool(n);
    tally.attach(pool);
    {
      reactor::PoolAcceptor<Echo<Loop>, Loop> acceptor(
          pool, reactor::Endpoint::parse("127.0.0.1:7000"), Echo<Loop>{&tally}, {}, balance);
      REQUIRE(acceptor.balance() == balance);
      // Round robin: peer j connects j-th (one listener: accepted j-th).
      const bool in_order = balance == Balance::kRoundRobin;
      for (std::size_t j = 0; j < kPeers; ++j) {
        const auto plan = rng.chance(70) ? Crowd::Plan::kHalfClose : Crowd::Plan::kWait;
        const std::size_t i = crowd.add(request_bytes(j, 1 + rng.below(12288)), plan);
        const std::size_t at_ms = in_order ? 2 * j : rng.below(48);
        crowd.connect_at(i, kernel.now() + std::chrono::milliseconds(at_ms));
      }
      // Until every peer that half-closes is done and every one that waits has its echo.
      REQUIRE(drive(kernel, pool, rng, [&] {
        for (std::size_t i = 0; i < crowd.size(); ++i) {
          if (crowd[i].plan == Crowd::Plan::kWait && !crowd[i].closed) {
            if (crowd[i].received.size() < crowd[i].request.size()) return false;
          } else if (!crowd.finished(i)) {
            return false;
          }
        }
        return tally.total_opened() == kPeers;
      }));
      // The waiting peers have their echo: now they half-close too.
      for (std::size_t i = 0; i < crowd.size(); ++i) {
        if (crowd[i].plan == Crowd::Plan::kWait && !crowd[i].closed) {
          REQUIRE(kernel.peer_shutdown(*crowd[i].id) == 0);
        }
      }
      REQUIRE(drive(kernel, pool, rng, [&] {
        crowd.step_all();
        return crowd.all_finished() && pool.connection_count() == 0;
      }));

      for (std::size_t i = 0; i < crowd.size(); ++i) check_echoed(kernel, crowd, i);
      check_no_faults(tally);
      CHECK(tally.total_opened() == kPeers);
      CHECK(tally.clean == kPeers);
      CHECK(acceptor.accepted_count() == kPeers);
      CHECK(acceptor.failed_count() == 0);
      for (std::size_t r = 0; r < n; ++r) {
        CAPTURE(r);
        CHECK(acceptor.accepted_count(r) == tally.opened[r]);
        CHECK(tally.closed[r] == tally.opened[r]);
        if (balance != Balance::kExclusive) CHECK(tally.opened[r] > 0);
      }
      if (in_order) {
        for (std::size_t j = 0; j < kPeers; ++j) {
          CAPTURE(j);
          CHECK(tally.reactor_of_port[crowd.port_of(j)] == j % n);
        }
      }
    }
  }
  CHECK(kernel.open_fds() == 0);
}

// Least connections counts live connections, and hand-offs not yet opened: after the peers on one
// reactor leave, the next burst of arrivals all go there, even though reactor 0 accepts the whole
// burst before the target runs a single hand-off.
TEMPLATE_TEST_CASE("least connections sends a burst of arrivals to the reactor whose peers left",
                   "[pool][simulation]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  const std::uint64_t seed = GENERATE(range(0, 3));
  CAPTURE(seed);
  Rng rng(seed);
  sim::Kernel kernel;
  const std::size_t n = 3;
  Crowd crowd(kernel, 1ms);
  Tally<Loop> tally;
  {
    SimPool<TestType> pool(n);
    tally.attach(pool);
    reactor::PoolAcceptor<Echo<Loop>, Loop> acceptor(
        pool, reactor::Endpoint::parse("127.0.0.1:7000"), Echo<Loop>{&tally}, {},
        Balance::kLeastConnections);
    // 3 n peers that stay: 3 on each reactor, in turn (ties go to the one after the last picked).
    for (std::size_t j = 0; j < 3 * n; ++j) {
      crowd.connect_at(crowd.add("hello", Crowd::Plan::kWait),
                       kernel.now() + std::chrono::milliseconds(j));
    }
    REQUIRE(drive(kernel, pool, rng, [&] {
      for (std::size_t i = 0; i < crowd.size(); ++i) {
        if (crowd[i].received.size() < 5) return false;
      }
      return true;
    }));
    for (std::size_t r = 0; r < n; ++r) CHECK(acceptor.accepted_count(r) == 3);
    // The peers on reactor 1 leave.
    const std::size_t emptied = 1;
    for (std::size_t i = 0; i < crowd.size(); ++i) {
      if (tally.reactor_of_port[crowd.port_of(i)] == emptied) crowd.close_now(i);
    }
    REQUIRE(drive(kernel, pool, rng, [&] { return pool[emptied].connection_count() == 0; }));
    // A burst of six, all connected before any reactor runs: reactor 0 accepts them in one go,
    // so the three it hands to reactor 1 are still queued there when it picks for the rest,
    // which then go one to each, in turn after the last one picked.
    for (std::size_t j = 0; j < 6; ++j) crowd.connect_now(crowd.add("again", Crowd::Plan::kWait));
    REQUIRE(drive(kernel, pool, rng, [&] { return tally.total_opened() == 3 * n + 6; }));
    CHECK(acceptor.accepted_count(0) == 4);
    CHECK(acceptor.accepted_count(emptied) == 3 + 4);
    CHECK(acceptor.accepted_count(2) == 4);
    check_no_faults(tally);
    tally.expect_clean = false;  // the pool's destructor aborts the rest
  }
  CHECK(kernel.open_fds() == 0);
}

// EPOLLEXCLUSIVE wakes the first idle reactor in the listener's wait queue, and each acceptor
// rejoins the queue's back after 16 accepts: peers arriving one at a time, with every reactor
// idle, go to reactor 0 sixteen times, then reactor 1 sixteen times, and so on around. A burst
// that arrives at once wakes up to one reactor per connection while reactors wait (each woken
// one leaves the wait queue), each takes at most 16 per turn and passes the next turn on: no
// reactor takes the whole burst, none more than two turns (its wake-up and a turn passed to it).
TEMPLATE_TEST_CASE("exclusive mode hands sixteen arrivals to each idle reactor in turn",
                   "[pool][simulation]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  const std::size_t n = GENERATE(2, 3);
  CAPTURE(n);
  Rng rng(n);
  sim::Kernel kernel;
  Crowd crowd(kernel, 1ms);
  Tally<Loop> tally;
  {
    SimPool<TestType> pool(n);
    tally.attach(pool);
    reactor::PoolAcceptor<Echo<Loop>, Loop> acceptor(pool,
                                                     reactor::Endpoint::parse("127.0.0.1:7000"),
                                                     Echo<Loop>{&tally}, {}, Balance::kExclusive);
    const std::size_t peers = 16 * n * 2;
    for (std::size_t j = 0; j < peers; ++j) {
      crowd.connect_at(crowd.add("", Crowd::Plan::kWait),
                       kernel.now() + std::chrono::milliseconds(j));
    }
    REQUIRE(drive(kernel, pool, rng, [&] { return tally.total_opened() == peers; }));
    for (std::size_t j = 0; j < peers; ++j) {
      CAPTURE(j);
      CHECK(tally.reactor_of_port[crowd.port_of(j)] == (j / 16) % n);
    }
    for (std::size_t r = 0; r < n; ++r) CHECK(acceptor.accepted_count(r) == 32);

    // A burst: 16 n peers queued at once, while every reactor waits.
    const std::size_t burst = 16 * n;
    for (std::size_t j = 0; j < burst; ++j) {
      crowd.connect_at(crowd.add("", Crowd::Plan::kWait), kernel.now() + 5ms);
    }
    REQUIRE(drive(kernel, pool, rng, [&] { return tally.total_opened() == peers + burst; }));
    std::vector<std::size_t> share(n, 0);
    for (std::size_t j = peers; j < peers + burst; ++j) {
      ++share[tally.reactor_of_port[crowd.port_of(j)]];
    }
    CAPTURE(share);
    for (std::size_t r = 0; r < n; ++r) CHECK(share[r] <= 32);
    CHECK(*std::max_element(share.begin(), share.end()) < burst);
    check_no_faults(tally);
    tally.expect_clean = false;  // the pool's destructor aborts them
  }
  CHECK(kernel.open_fds() == 0);
}

// --- graceful shutdown ---------------------------------------------------------------------------

// The pool's graceful shutdown, with connections open on every reactor (some peers half-closed
// already, some half-close during the grace, some wait for the server to close), peers sitting in
// the listen queues, and, in the dispatch modes, hand-offs posted to reactors that have not run
// them yet: every peer that sent gets its whole echo and a FIN, none is reset or refused; the
// summed report counts each connection once, all flushed; no fd is left once the pool is gone.
// The shutdown runs as the pool's phases (every reactor closes its acceptors, each accepting its
// queue, then all serve out), in an order drawn from the seed; or, for comparison, as plain
// Reactor::shutdown() calls from reactor 0 up, which suffices when the dispatching reactor goes
// first (its hand-offs reach the others' queues before they start).
TEMPLATE_TEST_CASE("a pool's graceful shutdown serves every connection, queued ones included",
                   "[pool][simulation][shutdown]", reactor::LevelTriggered,
                   reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  const Balance balance = GENERATE(Balance::kReusePort, Balance::kRoundRobin,
                                   Balance::kLeastConnections, Balance::kExclusive);
  const bool phases = GENERATE(true, false);
  // Connections open on every reactor when the shutdown starts, or none anywhere: then only the
  // listen queues and the hand-offs hold work, which reactors with no connection of their own
  // must still serve out (their loop would end at once).
  const bool busy = GENERATE(true, false);
  const std::uint64_t seed = GENERATE(range(0, 4));
  CAPTURE(mode_name(balance), phases, busy, seed);
  Rng rng(seed * 32 + static_cast<std::uint64_t>(balance) * 4 + (phases ? 2 : 0) + (busy ? 1 : 0));
  constexpr std::size_t kCapacities[] = {1024, 8192, 65536};
  sim::Kernel kernel(kCapacities[rng.below(3)]);
  if (seed == 1 || seed == 2) install_harmless_faults(kernel, seed, TestType::kEdge);
  const std::size_t n = 2 + rng.below(2);
  Crowd crowd(kernel, 1ms);
  Tally<Loop> tally;
  {
    SimPool<TestType> pool(n);
    tally.attach(pool);
    reactor::PoolAcceptor<Echo<Loop>, Loop> acceptor(
        pool, reactor::Endpoint::parse("127.0.0.1:7000"), Echo<Loop>{&tally}, {}, balance);
    // Served before the shutdown: 4 n peers (exclusive mode: 16 n, as a reactor takes 16 in a
    // row when it is idle); the late ones half-close 0-300 ms after the shutdown starts.
    const std::size_t first_served = !busy ? 0 : balance == Balance::kExclusive ? 16 * n : 4 * n;
    const sim::TimePoint shutdown_at = kernel.now() + 100ms;
    for (std::size_t j = 0; j < first_served; ++j) {
      const std::size_t kind = rng.below(3);
      const auto plan = kind == 0   ? Crowd::Plan::kHalfClose
                        : kind == 1 ? Crowd::Plan::kHalfCloseAt
                                    : Crowd::Plan::kWait;
      const std::size_t i = crowd.add(request_bytes(j, 1 + rng.below(6000)), plan,
                                      shutdown_at + std::chrono::milliseconds(rng.below(300)));
      crowd.connect_at(i, kernel.now() + std::chrono::milliseconds(rng.below(30)));
    }
    REQUIRE(drive(kernel, pool, rng, [&] {
      if (tally.total_opened() < first_served) return false;
      for (std::size_t i = 0; i < crowd.size(); ++i) {
        if (crowd[i].plan != Crowd::Plan::kHalfClose &&
            crowd[i].received.size() < crowd[i].request.size()) {
          return false;
        }
      }
      return true;
    }));
    // Until every reactor has a connection open, one more peer that waits for the server's close
    // (the modes that do not take turns may have left one out, or its peers may have left).
    const auto every_reactor_busy = [&] {
      for (std::size_t r = 0; r < n; ++r) {
        if (pool[r].connection_count() == 0) return false;
      }
      return true;
    };
    std::size_t served = first_served;
    for (; busy && !every_reactor_busy() && served < first_served + 64; ++served) {
      crowd.connect_now(crowd.add(request_bytes(served, 1 + rng.below(6000)), Crowd::Plan::kWait));
      REQUIRE(drive(kernel, pool, rng, [&] { return tally.total_opened() == served + 1; }));
    }
    REQUIRE(every_reactor_busy() == busy);

    // Arrivals the reactors have not seen: some accepted by reactor 0 (in the dispatch modes
    // handed to the others by posted tasks not yet run), then more left in the listen queues.
    const std::size_t queued = 3 * n + rng.below(3 * n);
    // Seeds 0 and 1: reactor 0 runs once on the way, accepting (and handing off) at least n of
    // them; seeds 2 and 3: nothing is accepted before the shutdown.
    const bool run_on_the_way = seed % 4 < 2;
    const std::size_t handed_first = run_on_the_way ? n + rng.below(n) : queued;
    for (std::size_t j = 0; j < queued; ++j) {
      if (j == handed_first) pool[0].run_once(0ms);
      crowd.connect_now(
          crowd.add(request_bytes(served + j, 1 + rng.below(6000)), Crowd::Plan::kHalfClose));
    }
    const std::size_t total = served + queued;
    std::size_t in_listen_queues = 0;
    for (std::size_t i = served; i < total; ++i) {
      if (!kernel.peer_accepted(*crowd[i].id)) ++in_listen_queues;
    }
    CHECK(in_listen_queues >= queued - handed_first);
    if (!run_on_the_way) CHECK(in_listen_queues == queued);
    if (dispatches(balance) && run_on_the_way) {
      CHECK(acceptor.accepted_count() > tally.total_opened());  // hand-offs not run yet
    }

    kernel.advance_to(shutdown_at);  // the pump keeps going meanwhile; the reactors do not run
    tally.shutting_down = true;
    const std::size_t open_before = pool.connection_count();
    const std::size_t closed_before = tally.total_closed();
    reactor::ShutdownReport report;
    std::size_t arrived = 0;
    std::vector<reactor::ShutdownReport> reports;
    if (phases) {
      // Odd seeds: the dispatching reactor closes its acceptor last, after the others' phase one.
      std::vector<std::size_t> order = rng.order(n);
      if (seed % 2 == 1) {
        std::rotate(order.begin(), std::find(order.begin(), order.end(), std::size_t{0}) + 1,
                    order.end());
      }
      CAPTURE(order);
      report = shutdown_phases(pool, order, 30s, 100ms, arrived, reports);
      CHECK(arrived == n);
    } else {
      for (std::size_t r = 0; r < n; ++r) {
        reports.push_back(pool[r].shutdown(30s, 100ms));
        report.flushed += reports.back().flushed;
        report.failed += reports.back().failed;
        report.aborted += reports.back().aborted;
        if (!report.error) report.error = reports.back().error;
      }
    }
    tally.shutting_down = false;
    CHECK_FALSE(report.error);
    CHECK(kernel.now() - shutdown_at < 5s);

    // Every connection, accepted before or during the shutdown, was served out and counted once.
    CHECK(tally.total_opened() == total);
    CHECK(acceptor.accepted_count() == total);
    CHECK(acceptor.failed_count() == 0);
    CHECK_FALSE(acceptor.is_open());
    CHECK(pool.connection_count() == 0);
    CHECK(report.flushed + report.failed + report.aborted == tally.closed_in_shutdown);
    CHECK(report.flushed == total - closed_before);
    CHECK(report.failed == 0);
    CHECK(report.aborted == 0);
    CHECK(open_before <= total - closed_before);
    for (std::size_t r = 0; r < n; ++r) {
      CAPTURE(r);
      CHECK(acceptor.accepted_count(r) == tally.opened[r]);
      CHECK(tally.closed[r] == tally.opened[r]);
    }
    // The peers finish (each closes after its EOF) without the reactors.
    kernel.advance(10ms);
    crowd.step_all();
    REQUIRE(crowd.all_finished());
    for (std::size_t i = 0; i < crowd.size(); ++i) check_echoed(kernel, crowd, i);
    check_no_faults(tally);
  }
  CHECK(kernel.open_fds() == 0);
}

// A stop() from another thread during the pool's shutdown (a second Ctrl-C) ends every grace
// period: what is left anywhere is aborted, every connection is counted once, by how it ended,
// and no reactor keeps the stop pending for its next run.
TEMPLATE_TEST_CASE("a stop during a pool's shutdown aborts what is left everywhere, counted once",
                   "[pool][simulation][shutdown]", reactor::LevelTriggered,
                   reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  const Balance balance = GENERATE(Balance::kReusePort, Balance::kRoundRobin,
                                   Balance::kLeastConnections, Balance::kExclusive);
  const std::uint64_t seed = GENERATE(range(0, 3));
  CAPTURE(mode_name(balance), seed);
  Rng rng(seed * 4 + static_cast<std::uint64_t>(balance) + 1000);
  sim::Kernel kernel(4096);
  Crowd crowd(kernel, 1ms);
  Tally<Loop> tally;
  tally.expect_clean = false;
  const std::size_t n = 2 + rng.below(2);
  {
    SimPool<TestType> pool(n);
    tally.attach(pool);
    reactor::PoolAcceptor<Echo<Loop>, Loop> acceptor(
        pool, reactor::Endpoint::parse("127.0.0.1:7000"), Echo<Loop>{&tally}, {}, balance);
    // Peers that send a lot and then wait for the server to close: the quiet period (100 ms) is
    // far from over at the stop (0-49 ms in).
    for (std::size_t j = 0; j < 6 * n; ++j) {
      crowd.connect_at(crowd.add(request_bytes(j, 20000 + rng.below(40000)), Crowd::Plan::kWait),
                       kernel.now() + std::chrono::milliseconds(rng.below(5)));
    }
    REQUIRE(drive(kernel, pool, rng, [&] { return tally.total_opened() == 6 * n; }));
    tally.shutting_down = true;
    const std::size_t open_before = pool.connection_count();
    const std::size_t closed_before = tally.total_closed();
    kernel.after(std::chrono::milliseconds(rng.below(50)), [&] { pool.stop(); });
    std::size_t arrived = 0;
    std::vector<reactor::ShutdownReport> reports;
    const reactor::ShutdownReport report =
        shutdown_phases(pool, rng.order(n), 30s, 100ms, arrived, reports);
    tally.shutting_down = false;
    CHECK_FALSE(report.error);
    CHECK(arrived == n);
    CHECK(pool.connection_count() == 0);
    for (std::size_t r = 0; r < n; ++r) CHECK_FALSE(pool[r].stop_requested());
    CHECK(report.flushed + report.failed + report.aborted == tally.closed_in_shutdown);
    CHECK(tally.total_closed() - closed_before == tally.closed_in_shutdown);
    CHECK(tally.total_opened() == tally.total_closed());
    CHECK(tally.closed_in_shutdown >= open_before);
    CHECK(report.aborted > 0);
    CHECK(acceptor.accepted_count() == tally.total_opened());
  }
  CHECK(kernel.open_fds() == 0);
}

// Reactor::shutdown() alone on each reactor in turn, the dispatching reactor last: the others
// have finished by the time it accepts its listen queue, so the hand-offs it posts wait in queues
// nobody runs, and their peers are reset when the pool goes (each socket closed by the dropped
// task, none leaked). ReactorPool::shutdown's barrier exists for this; shutdown_phases, above,
// passes in every order.
TEMPLATE_TEST_CASE("plain shutdowns with the dispatching reactor last strand its hand-offs",
                   "[pool][simulation][shutdown]", reactor::LevelTriggered,
                   reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  sim::Kernel kernel;
  const std::size_t n = 3;
  constexpr std::size_t kQueued = 6;
  Crowd crowd(kernel, 1ms);
  Tally<Loop> tally;
  {
    SimPool<TestType> pool(n);
    tally.attach(pool);
    {
      reactor::PoolAcceptor<Echo<Loop>, Loop> acceptor(
          pool, reactor::Endpoint::parse("127.0.0.1:7000"), Echo<Loop>{&tally}, {},
          Balance::kRoundRobin);
      for (std::size_t j = 0; j < kQueued; ++j) {
        crowd.connect_now(crowd.add(request_bytes(j, 100), Crowd::Plan::kHalfClose));
      }
      for (std::size_t r = n; r-- > 0;) CHECK_FALSE(pool[r].shutdown(5s).error);
      CHECK(acceptor.accepted_count() == kQueued);
      CHECK(tally.total_opened() == kQueued / n);  // reactor 0's own share only
      CHECK(acceptor.accepted_count(0) == kQueued / n);
    }
    crowd.step_all();
    std::size_t stranded = 0;
    for (std::size_t i = 0; i < crowd.size(); ++i) {
      if (kernel.fd_open(kernel.peer_server_fd(*crowd[i].id))) ++stranded;
    }
    CHECK(stranded == kQueued - kQueued / n);
    check_no_faults(tally);
  }
  CHECK(kernel.open_fds() == 0);
  crowd.step_all();
  std::size_t reset = 0;
  for (std::size_t i = 0; i < crowd.size(); ++i) {
    if (crowd[i].error == ECONNRESET) ++reset;
  }
  CHECK(reset == kQueued - kQueued / n);
}

// A hand-off is a posted task that owns the accepted socket: dropped unrun when its reactor is
// destroyed, it closes the socket; run after the PoolAcceptor is gone, it still opens the
// connection (the task keeps what it needs alive).
TEMPLATE_TEST_CASE("a queued hand-off closes its socket if dropped and opens it if run late",
                   "[pool][simulation]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  const bool run_late = GENERATE(false, true);
  CAPTURE(run_late);
  sim::Kernel kernel;
  Crowd crowd(kernel, 1ms);
  int handed_fd = -1;
  Tally<Loop> tally;
  {
    SimPool<TestType> pool(2);
    tally.attach(pool);
    {
      reactor::PoolAcceptor<Echo<Loop>, Loop> acceptor(
          pool, reactor::Endpoint::parse("127.0.0.1:7000"), Echo<Loop>{&tally}, {},
          Balance::kRoundRobin);
      crowd.connect_now(crowd.add("kept", Crowd::Plan::kHalfClose));    // reactor 0's
      crowd.connect_now(crowd.add("handed", Crowd::Plan::kHalfClose));  // reactor 1's
      pool[0].run_once(0ms);  // accepts both; the second is posted to reactor 1
      CHECK(acceptor.accepted_count() == 2);
      CHECK(acceptor.accepted_count(1) == 0);  // not taken yet
      CHECK(tally.opened[0] == 1);
      CHECK(tally.opened[1] == 0);
      handed_fd = kernel.peer_server_fd(*crowd[1].id);
      REQUIRE(handed_fd >= 0);
    }
    if (run_late) {
      Rng rng(1);
      REQUIRE(drive(kernel, pool, rng, [&] {
        crowd.step_all();
        return crowd.all_finished() && pool.connection_count() == 0;
      }));
      CHECK(tally.opened[1] == 1);
      for (std::size_t i = 0; i < crowd.size(); ++i) check_echoed(kernel, crowd, i);
    } else {
      CHECK(kernel.fd_open(handed_fd));
    }
    check_no_faults(tally);
  }
  CHECK_FALSE(kernel.fd_open(handed_fd));
  CHECK(kernel.open_fds() == 0);
  if (!run_late) {
    crowd.step_all();
    CHECK(crowd[1].error == ECONNRESET);  // its request was never read
    CHECK(crowd[1].received.empty());
  }
}

// accept(2): Linux passes network errors pending on a new connection (ENETDOWN, EPROTO,
// ENOPROTOOPT, EHOSTDOWN, ENONET, EHOSTUNREACH, EOPNOTSUPP, ENETUNREACH) to accept(), and "the
// application should ... treat them like EAGAIN by retrying"; EPERM comes from firewall rules.
// Accepting skips them (Acceptor::accept_failed). Here one such error meets the first accept4 of
// a queue of peers: while serving, it is skipped and every peer is served.
TEMPLATE_TEST_CASE("a network error from accept4 while serving skips one connection, no more",
                   "[pool][simulation][accept]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  const int error = GENERATE(EHOSTUNREACH, ENETUNREACH, EPERM);
  CAPTURE(error);
  sim::Kernel kernel;
  Crowd crowd(kernel, 1ms);
  Tally<Loop> tally;
  {
    SimPool<TestType> pool(2);
    tally.attach(pool);
    reactor::PoolAcceptor<Echo<Loop>, Loop> acceptor(pool,
                                                     reactor::Endpoint::parse("127.0.0.1:7000"),
                                                     Echo<Loop>{&tally}, {}, Balance::kRoundRobin);
    for (std::size_t j = 0; j < 4; ++j) {
      crowd.connect_now(crowd.add(request_bytes(j, 100), Crowd::Plan::kHalfClose));
    }
    bool injected = false;
    kernel.set_faults([&](sim::Op op, int) {
      if (op != sim::Op::kAccept4 || std::exchange(injected, true)) return sim::Fault{};
      return sim::Fault{error};
    });
    Rng rng(1);
    REQUIRE(drive(kernel, pool, rng,
                  [&] { return crowd.all_finished() && pool.connection_count() == 0; }));
    CHECK(injected);
    for (std::size_t i = 0; i < crowd.size(); ++i) check_echoed(kernel, crowd, i);
    check_no_faults(tally);
  }
  CHECK(kernel.open_fds() == 0);
}

// The same error meeting the drain of a graceful shutdown: Acceptor::accept_all() once retried
// only EINTR, ECONNABORTED and EPROTO, so it stopped at the first of these errors, closed the
// listener, and the kernel reset every connection still queued. It now skips what accept_failed()
// skips while serving.
TEMPLATE_TEST_CASE(
    "a network error from accept4 during a shutdown's drain skips one connection, "
    "no more",
    "[pool][simulation][accept][shutdown]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  const int error = GENERATE(EHOSTUNREACH, ENETUNREACH, EPERM);
  CAPTURE(error);
  sim::Kernel kernel;
  Crowd crowd(kernel, 1ms);
  Tally<Loop> tally;
  {
    SimPool<TestType> pool(2);
    tally.attach(pool);
    reactor::PoolAcceptor<Echo<Loop>, Loop> acceptor(pool,
                                                     reactor::Endpoint::parse("127.0.0.1:7000"),
                                                     Echo<Loop>{&tally}, {}, Balance::kRoundRobin);
    for (std::size_t j = 0; j < 4; ++j) {
      crowd.connect_now(crowd.add(request_bytes(j, 100), Crowd::Plan::kHalfClose));
    }
    bool injected = false;
    kernel.set_faults([&](sim::Op op, int) {
      if (op != sim::Op::kAccept4 || std::exchange(injected, true)) return sim::Fault{};
      return sim::Fault{error};
    });
    std::size_t arrived = 0;
    std::vector<reactor::ShutdownReport> reports;
    const reactor::ShutdownReport report =
        shutdown_phases(pool, {0, 1}, 5s, 100ms, arrived, reports);
    CHECK(injected);
    CHECK_FALSE(report.error);
    crowd.step_all();
    kernel.advance(10ms);
    crowd.step_all();
    CHECK(report.flushed == 4);                                                     // is 0
    for (std::size_t i = 0; i < crowd.size(); ++i) check_echoed(kernel, crowd, i);  // all reset
    check_no_faults(tally);
  }
  CHECK(kernel.open_fds() == 0);
}

// --- setup ---------------------------------------------------------------------------------------

// A PoolAcceptor whose setup fails at any of its calls, on any reactor's listener, throws a
// std::system_error naming that call and leaves no fd behind (the reactors' own two each are
// all that is open); the pool then takes a PoolAcceptor that works.
TEMPLATE_TEST_CASE(
    "a PoolAcceptor whose setup fails anywhere throws naming the call and leaks "
    "nothing",
    "[pool][simulation][setup]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  using Loop = SimLoop<TestType>;
  const Balance balance = GENERATE(Balance::kReusePort, Balance::kRoundRobin,
                                   Balance::kLeastConnections, Balance::kExclusive);
  const sim::Op op =
      GENERATE(sim::Op::kSocket, sim::Op::kSetsockopt, sim::Op::kOther, sim::Op::kEpollCtl);
  const std::size_t nth = GENERATE(range<std::size_t>(0, 6));
  CAPTURE(mode_name(balance), static_cast<int>(op), nth);
  const std::size_t n = 3;
  sim::Kernel kernel;
  Crowd crowd(kernel, 1ms);
  Tally<Loop> tally;
  {
    SimPool<TestType> pool(n);
    tally.attach(pool);
    const std::size_t pool_fds = kernel.open_fds();
    REQUIRE(pool_fds == 2 * n);
    std::size_t seen = 0;
    bool constructing = true;  // the constructor's calls only, not the destructor's
    std::string failed_call;
    kernel.set_faults([&](sim::Op call, int) {
      if (!constructing || call != op || seen++ != nth) return sim::Fault{};
      return sim::Fault{op == sim::Op::kEpollCtl ? ENOMEM : EMFILE};
    });
    try {
      reactor::PoolAcceptor<Echo<Loop>, Loop> acceptor(
          pool, reactor::Endpoint::parse("127.0.0.1:7000"), Echo<Loop>{&tally}, {}, balance);
      constructing = false;
      CHECK(seen <= nth);  // that call was not made: this setup has fewer of them
    } catch (const std::system_error& e) {
      failed_call = e.what();
    }
    constructing = false;
    kernel.set_faults(nullptr);
    if (seen > nth) {
      CAPTURE(failed_call);
      const char* expected = op == sim::Op::kSocket       ? "socket"
                             : op == sim::Op::kSetsockopt ? "setsockopt"
                             : op == sim::Op::kEpollCtl   ? "epoll_ctl"
                             : nth % 2 == 0               ? "bind"
                                                          : "listen";
      CHECK(failed_call.rfind(expected, 0) == 0);
    }
    CHECK(kernel.open_fds() == pool_fds);

    reactor::PoolAcceptor<Echo<Loop>, Loop> acceptor(
        pool, reactor::Endpoint::parse("127.0.0.1:7000"), Echo<Loop>{&tally}, {}, balance);
    crowd.connect_now(crowd.add("still serving", Crowd::Plan::kHalfClose));
    Rng rng(nth);
    REQUIRE(drive(kernel, pool, rng,
                  [&] { return crowd.all_finished() && pool.connection_count() == 0; }));
    check_echoed(kernel, crowd, 0);
    check_no_faults(tally);
  }
  CHECK(kernel.open_fds() == 0);
}
