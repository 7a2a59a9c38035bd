// Public: ReactorPool<Reactor>, one reactor per thread, run, stopped and shut down as one; and
// PoolAcceptor<Handler, Reactor>, a server whose connections are spread over a pool's reactors in
// one of four ways (Balance).
//
// Each reactor stays what it is alone: one thread drives it, its connections never leave it, and
// nothing is shared between reactors per message. Connections reach a reactor in one of four
// ways:
//   kReusePort         a listening socket per reactor (SO_REUSEPORT); the kernel hashes each new
//                      connection's addresses and ports to one of them. No hand-off at all, but
//                      the hash knows nothing of load: a few long-lived busy connections can land
//                      on one reactor. TCP only.
//   kRoundRobin        one listening socket, on reactor 0, whose acceptor hands each accepted
//   kLeastConnections  socket to a reactor in turn, or to the one with the fewest connections
//                      (its own, plus those handed to it and not yet opened). The hand-off is one
//                      posted task: no syscall beyond the eventfd write that wakes the target,
//                      one per burst; the connection is created on the target's thread.
//   kExclusive         one listening socket in every reactor's epoll set with EPOLLEXCLUSIVE:
//                      the kernel wakes one idle reactor per incoming connection (or more, which
//                      then race for it: the losers get EAGAIN). Wake-ups favour the reactors that
//                      registered first; every acceptor leaves and rejoins the wait queue after
//                      each 16 accepts, which moves it behind the others (as nginx does), and
//                      one that took 16 in a turn passes the next turn to the next reactor (a
//                      burst that arrived at once woke only one).
//
// Threading: construct a pool, its acceptors, signal sets and anything else registered with its
// reactors, then call run() on one thread; stop() may come from anywhere, a signal handler
// included. Reactor 0 runs on the thread that calls run() or shutdown(), the others on threads
// the pool starts for the call and joins before returning. Acceptors are created and destroyed
// while the pool is not running, and before it is destroyed.
#pragma once

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <barrier>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <latch>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "acceptor.hpp"
#include "connection.hpp"
#include "endpoint.hpp"
#include "error.hpp"
#include "fd.hpp"
#include "reactor.hpp"

namespace reactor {

struct PoolOptions {
  ReactorOptions reactor;    // for every reactor of the pool
  bool pin_threads = false;  // pin reactor i's thread to one CPU while it runs
  // The CPUs to pin to: reactor i gets cpus[i % cpus.size()]. Empty: the CPUs this process may run
  // on (sched_getaffinity), in order.
  std::vector<int> cpus;
};

template <class R = Reactor<>>
class ReactorPool {
  using Sys = typename R::syscalls;

 public:
  using reactor_type = R;

  // `threads` reactors (0: one per hardware thread). Throws std::system_error as Reactor's
  // constructor does, or naming "ReactorPool cpus" (invalid_argument) for a CPU this process may
  // not run on.
  explicit ReactorPool(std::size_t threads = 0, const PoolOptions& options = {}) {
    if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
    reactors_.reserve(threads);
    for (std::size_t i = 0; i < threads; ++i) {
      reactors_.push_back(std::make_unique<R>(options.reactor));
    }
    if (options.pin_threads) {
      const cpu_set_t allowed = process_cpus();
      cpus_ = options.cpus;
      if (cpus_.empty()) {
        for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
          if (CPU_ISSET(cpu, &allowed)) cpus_.push_back(cpu);
        }
      }
      for (const int cpu : cpus_) {
        if (cpu < 0 || cpu >= CPU_SETSIZE || !CPU_ISSET(cpu, &allowed)) {
          detail::throw_error(std::make_error_code(std::errc::invalid_argument),
                              "ReactorPool cpus");
        }
      }
    }
  }

  ReactorPool(const ReactorPool&) = delete;
  ReactorPool& operator=(const ReactorPool&) = delete;

  // Aborts the connections still open on every reactor (each gets on_close with
  // operation_canceled) while all the reactors exist, so an on_close may still post to another
  // reactor or use a handle of one; then destroys them. As for a Reactor, acceptors and watchers
  // go first, and nobody may be running the pool.
  ~ReactorPool() {
    for (const auto& loop : reactors_) loop->destroying_ = true;
    for (const auto& loop : reactors_) loop->abort_connections();
  }

  std::size_t size() const noexcept { return reactors_.size(); }
  R& operator[](std::size_t i) noexcept { return *reactors_[i]; }
  const R& operator[](std::size_t i) const noexcept { return *reactors_[i]; }

  // The index of the reactor whose loop the calling thread is running (inside one of its
  // callbacks, say), or size() on any other thread.
  std::size_t current() const noexcept {
    for (std::size_t i = 0; i < reactors_.size(); ++i) {
      if (reactors_[i]->on_loop_thread()) return i;
    }
    return reactors_.size();
  }

  // Connections owned by all the reactors; from any thread, a little stale while they run.
  std::size_t connection_count() const noexcept {
    std::size_t total = 0;
    for (const auto& loop : reactors_) total += loop->connection_count();
    return total;
  }

  // Queues `task` on reactor i (Reactor::post).
  template <class F>
  void post(std::size_t i, F&& task) {
    reactors_[i]->post(std::forward<F>(task));
  }

  // Runs every reactor, reactor 0 on the calling thread, until stop() is called, or until any
  // reactor's run() returns (its own stop(), or an epoll_wait failure): the others are then
  // stopped too. A stop() before run() makes it return at once; either way the pool can run
  // again. Throws std::system_error: device_or_resource_busy ("ReactorPool::run") while the pool
  // runs or shuts down elsewhere, a thread that could not be started, or the first reactor's
  // failure ("epoll_wait", or "run" when a reactor was already being run by some other thread).
  void run() {
    Claim claim(*this);
    if (!claim) detail::throw_error(busy(), "ReactorPool::run");
    error_ = {};
    error_call_ = "epoll_wait";
    std::vector<std::thread> threads;
    std::latch started(static_cast<std::ptrdiff_t>(reactors_.size() - 1));
    try {
      threads.reserve(reactors_.size() - 1);
      for (std::size_t i = 1; i < reactors_.size(); ++i) {
        threads.emplace_back([this, i, &started] {
          started.count_down();
          run_one(i);
        });
      }
    } catch (...) {
      stop();
      for (auto& thread : threads) thread.join();
      clear_stops();
      throw;
    }
    // Every thread runs before reactor 0 serves: a thread's start, which needs memory (and, under
    // UBSan's vptr check, a pipe), never competes for fds with the connections reactor 0 accepts.
    started.wait();
    run_one(0);
    for (auto& thread : threads) thread.join();
    // Reactors that had returned by themselves were stopped again by the others: forget that,
    // or the next run() would return at once.
    clear_stops();
    if (error_) detail::throw_error(error_, error_call_);
  }

  // Makes run() return, or ends a shutdown()'s grace (what is left is aborted). Any thread, and
  // signal handlers (atomic stores and eventfd writes). As with Reactor::stop(), the pool must
  // outlive the call: run() may return while another thread's stop() is still writing to the
  // later reactors, so an owner that destroys the pool when run() returns must first wait for the
  // stopping thread to be done with it.
  void stop() noexcept {
    for (const auto& loop : reactors_) loop->stop();
  }

  // Reactor::shutdown on every reactor at once, each on its own thread (reactor 0 on the calling
  // one), and the reports summed. Every reactor first closes its acceptors, each accepting what
  // its listen queue holds; then all of them serve out their connections, those just handed over
  // included, for at most `grace`. A stop() from any thread after shutdown() began aborts what is
  // left everywhere. A reactor whose connections are all gone keeps running its loop (signals,
  // timers, posted work) until every reactor is done. report.error: device_or_resource_busy while
  // the pool runs (nothing done then), or the first reactor's error (a reactor that some other
  // thread drives, or whose callback made this call, is skipped while the others shut down); if
  // threads cannot be started, the reactors shut down one after the other on the calling thread,
  // sharing the grace period.
  ShutdownReport shutdown(std::chrono::milliseconds grace,
                          std::chrono::milliseconds quiet = R::kDefaultQuietPeriod) noexcept {
    ShutdownReport total;
    Claim claim(*this);
    if (!claim) {
      total.error = busy();
      return total;
    }
    // Stops from before this call (the one that ended run(), or the pool's own from run()) are
    // spent; any stop() from now on is meant for this shutdown.
    clear_stops();
    const std::size_t n = reactors_.size();
    std::vector<ShutdownReport> reports;
    std::vector<std::thread> threads;
    std::atomic<int> gate{0};  // 1: go, 2: the threads could not all start
    // Reactors still serving connections. One with none left keeps its loop going (the signalfd
    // of a second SIGTERM may be on it, and its timers and posted work keep running) until the
    // last one is done and wakes it.
    std::atomic<std::size_t> serving{n};
    try {
      reports.resize(n);
      std::barrier listeners_closed(static_cast<std::ptrdiff_t>(n));
      threads.reserve(n - 1);
      const auto shut_one = [&](std::size_t i) {
        bool arrived = false;
        bool done = false;
        const auto finish = [&] {
          if (!std::exchange(done, true) && serving.fetch_sub(1, std::memory_order_acq_rel) == 1) {
            for (const auto& loop : reactors_) loop->wake();
          }
        };
        const auto keep_serving = [&](bool has_connections) {
          if (has_connections) {
            // Counted as done, then given a connection (by user code during the grace): count
            // it again, so that the others keep their loops (and signals) going meanwhile.
            if (std::exchange(done, false)) serving.fetch_add(1, std::memory_order_acq_rel);
            return true;
          }
          finish();
          return serving.load(std::memory_order_acquire) > 0;
        };
        reports[i] = reactors_[i]->shutdown_with(
            grace, quiet, false,
            [&] {
              listeners_closed.arrive_and_wait();
              arrived = true;
            },
            keep_serving);
        if (!arrived) listeners_closed.arrive_and_drop();  // refused before closing anything
        finish();  // (ended by the deadline, a stop() or an error: the others need not wait)
      };
      try {
        for (std::size_t i = 1; i < n; ++i) {
          threads.emplace_back([&, i] {
            gate.wait(0);
            if (gate.load() != 1) return;
            const PinScope pin(*this, i);
            shut_one(i);
          });
        }
      } catch (...) {
        gate.store(2);
        gate.notify_all();
        for (auto& thread : threads) thread.join();
        throw;
      }
      gate.store(1);
      gate.notify_all();
      {
        const PinScope pin(*this, 0);
        shut_one(0);
      }
      for (auto& thread : threads) thread.join();
    } catch (...) {  // out of memory or threads: one reactor after the other, here
      const auto deadline = detail::saturating_add(detail::clock_now<Sys>(), grace);
      const auto alone = [](bool has_connections) { return has_connections; };
      reports.assign(reports.size(), ShutdownReport{});
      for (std::size_t i = 0; i < reports.size(); ++i) {
        const auto left = detail::ms_until(deadline, detail::clock_now<Sys>());
        reports[i] = reactors_[i]->shutdown_with(
            left, quiet, false, [] {}, alone);
      }
      if (reports.empty()) {  // not even the reports: no counts, but every reactor is shut down
        for (const auto& loop : reactors_) {
          const auto left = detail::ms_until(deadline, detail::clock_now<Sys>());
          loop->shutdown_with(
              left, quiet, false, [] {}, alone);
        }
        total.error = std::make_error_code(std::errc::not_enough_memory);
      }
    }
    // A reactor that had nothing left to serve was done before a stop() that ended the others'
    // grace: that stop was meant for this shutdown, not for the next run().
    clear_stops();
    for (const ShutdownReport& report : reports) {
      total.flushed += report.flushed;
      total.failed += report.failed;
      total.aborted += report.aborted;
      if (!total.error) total.error = report.error;
    }
    return total;
  }

 private:
  // Marks the pool as running or shutting down for the scope's duration, or fails when it is.
  class Claim {
   public:
    explicit Claim(ReactorPool& pool) noexcept
        : pool_(pool), held_(!pool.busy_.exchange(true, std::memory_order_acquire)) {}
    Claim(const Claim&) = delete;
    Claim& operator=(const Claim&) = delete;
    ~Claim() {
      if (held_) pool_.busy_.store(false, std::memory_order_release);
    }
    explicit operator bool() const noexcept { return held_; }

   private:
    ReactorPool& pool_;
    bool held_;
  };

  // Pins the calling thread to reactor i's CPU for the scope's duration (pin_threads), then puts
  // its previous affinity back: the thread may be the caller's own.
  class PinScope {
   public:
    PinScope(const ReactorPool& pool, std::size_t i) noexcept {
      if (pool.cpus_.empty()) return;
      if (pthread_getaffinity_np(pthread_self(), sizeof saved_, &saved_) != 0) return;
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(pool.cpus_[i % pool.cpus_.size()], &set);
      pinned_ = pthread_setaffinity_np(pthread_self(), sizeof set, &set) == 0;
    }
    PinScope(const PinScope&) = delete;
    PinScope& operator=(const PinScope&) = delete;
    ~PinScope() {
      if (pinned_) pthread_setaffinity_np(pthread_self(), sizeof saved_, &saved_);
    }

   private:
    cpu_set_t saved_{};
    bool pinned_ = false;
  };

  static std::error_code busy() noexcept {
    return std::make_error_code(std::errc::device_or_resource_busy);
  }

  static cpu_set_t process_cpus() {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) != 0) {
      detail::throw_error(detail::last_errno_code(), "sched_getaffinity");
    }
    return set;
  }

  void run_one(std::size_t i) noexcept {
    const PinScope pin(*this, i);
    std::error_code ec;
    reactors_[i]->run(ec);
    if (ec) {
      const std::lock_guard lock(error_mutex_);
      if (!error_) {
        error_ = ec;
        if (&ec.category() == &std::generic_category()) error_call_ = "run";
      }
    }
    stop();  // one reactor returning ends the pool's run
  }

  void clear_stops() noexcept {
    for (const auto& loop : reactors_) {
      loop->stop_requested_.store(false, std::memory_order_release);
    }
  }

  std::vector<std::unique_ptr<R>> reactors_;
  std::vector<int> cpus_;  // empty: no pinning
  std::atomic<bool> busy_{false};
  std::mutex error_mutex_;
  std::error_code error_;
  const char* error_call_ = "epoll_wait";
};

// How a PoolAcceptor spreads connections over its pool's reactors (see the top of this file).
enum class Balance : std::uint8_t { kReusePort, kRoundRobin, kLeastConnections, kExclusive };

template <class Handler, class R = Reactor<>, class Transport = PlainTransport>
class PoolAcceptor {
  using Sys = typename R::syscalls;
  using Single = Acceptor<Handler, R, Transport>;

 public:
  // Listens on `endpoint` (port 0: an ephemeral port, the same for every listener of the
  // server) and spreads the connections over `pool`'s reactors as `balance` says; a pool of one
  // reactor gets one plain Acceptor whatever `balance` says. Throws std::system_error naming the
  // failed call as Acceptor does, or "SO_REUSEPORT needs TCP" (invalid_argument) for kReusePort on
  // a Unix socket.
  PoolAcceptor(ReactorPool<R>& pool, const Endpoint& endpoint, Handler prototype = Handler{},
               const ListenOptions& options = {}, Balance balance = Balance::kReusePort)
      : PoolAcceptor(pool, endpoint, Transport(), std::move(prototype), options, balance) {}

  // As above, each connection getting a copy of `transport` (TlsTransport: the server's
  // TlsContext, see reactor/tls.hpp), made on the thread of the reactor it joins.
  PoolAcceptor(ReactorPool<R>& pool, const Endpoint& endpoint, Transport transport,
               Handler prototype, const ListenOptions& options = {},
               Balance balance = Balance::kReusePort)
      : pool_(&pool),
        balance_(pool.size() == 1 ? Balance::kReusePort : balance),
        transport_(std::move(transport)) {
    const std::size_t n = pool.size();
    if (n == 1) {
      acceptors_.push_back(std::make_unique<Single>(pool[0], endpoint, Transport(transport_),
                                                    std::move(prototype), options));
      local_ = acceptors_[0]->local_endpoint();
      return;
    }
    if (balance_ == Balance::kRoundRobin || balance_ == Balance::kLeastConnections) {
      dispatch_ = std::make_shared<Dispatch>(pool, prototype, transport_, options.connection,
                                             !endpoint.is_unix(), balance_);
      detail::AcceptSink sink{&Dispatch::hand_off, dispatch_.get()};
      add(pool[0], nullptr, endpoint, std::move(prototype), options, sink);
      local_ = acceptors_[0]->local_endpoint();
      return;
    }
    if (balance_ == Balance::kReusePort) {
      if (endpoint.is_unix()) {
        detail::throw_error(std::make_error_code(std::errc::invalid_argument),
                            "SO_REUSEPORT needs TCP");
      }
      ListenOptions each = options;
      each.reuse_port = true;
      add(pool[0], nullptr, endpoint, prototype, each, {});
      local_ = acceptors_[0]->local_endpoint();
      for (std::size_t i = 1; i < n; ++i) add(pool[i], nullptr, local_, prototype, each, {});
      return;
    }
    shared_ = std::make_unique<detail::SharedListener>();
    turns_ = std::make_shared<Turns>();
    turns_->pool = &pool;
    turns_->acceptors.assign(n, nullptr);
    add(pool[0], shared_.get(), endpoint, prototype, options, {});
    local_ = acceptors_[0]->local_endpoint();
    for (std::size_t i = 1; i < n; ++i) add(pool[i], shared_.get(), local_, prototype, options, {});
    for (std::size_t i = 0; i < n; ++i) {
      turns_->acceptors[i] = acceptors_[i].get();
      acceptors_[i]->kick_ = {&Turns::next_turn, turns_.get(), i};
    }
  }

  PoolAcceptor(const PoolAcceptor&) = delete;
  PoolAcceptor& operator=(const PoolAcceptor&) = delete;

  ~PoolAcceptor() {
    close();
    if (turns_ != nullptr) turns_->acceptors.assign(turns_->acceptors.size(), nullptr);
  }

  // Stops listening everywhere (while the pool is not running); connections are unaffected.
  void close() noexcept {
    for (auto& acceptor : acceptors_) acceptor->close();
  }

  bool is_open() const noexcept {
    for (const auto& acceptor : acceptors_) {
      if (acceptor->is_open()) return true;
    }
    return false;
  }

  // The bound address, with the actual port when port 0 was asked for.
  const Endpoint& local_endpoint() const noexcept { return local_; }

  // The mode in use (kReusePort for a pool of one).
  Balance balance() const noexcept { return balance_; }

  // The counts below are plain counters of the reactors' threads: read them only while the pool
  // is not running (after run() or shutdown() returned), never while it runs.

  // Connections accepted, all reactors together.
  std::uint64_t accepted_count() const noexcept {
    std::uint64_t total = 0;
    for (const auto& acceptor : acceptors_) total += acceptor->accepted_count();
    return total;
  }

  // Connections that reactor i was given: accepted by its own acceptor, or handed to it.
  std::uint64_t accepted_count(std::size_t i) const noexcept {
    if (i >= pool_->size()) return 0;
    if (dispatch_ != nullptr) return dispatch_->slots[i].received.load(std::memory_order_relaxed);
    return i < acceptors_.size() ? acceptors_[i]->accepted_count() : 0;
  }

  // Accepts that failed for lack of fds or memory, and connections that could not be set up.
  std::uint64_t failed_count() const noexcept {
    std::uint64_t total = 0;
    for (const auto& acceptor : acceptors_) total += acceptor->failed_count();
    if (dispatch_ != nullptr) {
      for (std::size_t i = 0; i < pool_->size(); ++i) {
        total += dispatch_->slots[i].failed.load(std::memory_order_relaxed);
      }
    }
    return total;
  }

 private:
  // What the dispatching acceptor (on reactor 0) and the tasks it posts share. Tasks hold it by
  // shared_ptr: one still queued when this PoolAcceptor is gone opens its connection all the same.
  struct Dispatch : std::enable_shared_from_this<Dispatch> {
    // Written by reactor i's thread only, read by the acceptor's: a cache line each.
    struct alignas(64) Slot {
      std::atomic<std::uint64_t> received{0};  // sockets handed to reactor i that it took
      std::atomic<std::uint64_t> failed{0};    // ...and could not open
    };

    Dispatch(ReactorPool<R>& owner, const Handler& handler, const Transport& each_transport,
             const ConnectionOptions& each, bool is_tcp, Balance balance)
        : pool(&owner),
          prototype(handler),
          transport(each_transport),
          options(each),
          tcp(is_tcp),
          least(balance == Balance::kLeastConnections),
          sent(owner.size(), 0),
          slots(new Slot[owner.size()]) {}

    // The sink: runs on reactor 0's thread for every accepted socket.
    static void hand_off(void* context, int socket) noexcept {
      auto& self = *static_cast<Dispatch*>(context);
      const std::size_t target = self.pick();
      ++self.sent[target];
      if (target == 0) {  // the acceptor's own reactor: no hand-off
        self.open(0, socket);
        return;
      }
      BasicUniqueFd<Sys> owned(socket);
      try {
        // 16 + 8 + 4 bytes: stored inline in the posted task, no allocation per connection.
        (*self.pool)[target].post(
            [state = self.shared_from_this(), target, fd = std::move(owned)]() mutable {
              state->open(target, fd.release());
            });
      } catch (...) {  // no memory to queue it: the socket was closed by its owner on the way out
        --self.sent[target];
        self.slots[0].failed.store(self.slots[0].failed.load(std::memory_order_relaxed) + 1,
                                   std::memory_order_relaxed);
      }
    }

    // On reactor `target`'s thread.
    void open(std::size_t target, int socket) noexcept {
      Slot& slot = slots[target];
      slot.received.store(slot.received.load(std::memory_order_relaxed) + 1,
                          std::memory_order_relaxed);
      std::error_code ec;
      try {
        Handler handler = prototype;
        Connection<Handler, R, Transport>::open((*pool)[target], socket, std::move(handler),
                                                options, tcp, ec, false, Transport(transport));
      } catch (...) {  // copying a prototype threw
        Sys::close(socket);
        ec = make_error_code(Error::kHandlerException);
      }
      if (ec)
        slot.failed.store(slot.failed.load(std::memory_order_relaxed) + 1,
                          std::memory_order_relaxed);
    }

    // Round-robin, or the fewest connections counting those handed over and not yet opened;
    // ties go to the reactor after the last one picked.
    std::size_t pick() noexcept {
      const std::size_t n = sent.size();
      std::size_t best = next;
      if (least) {
        std::size_t best_load = SIZE_MAX;
        for (std::size_t k = 0; k < n; ++k) {
          const std::size_t i = (next + k) % n;
          const std::size_t load =
              (*pool)[i].connection_count() +
              static_cast<std::size_t>(sent[i] - slots[i].received.load(std::memory_order_relaxed));
          if (load < best_load) {
            best_load = load;
            best = i;
          }
        }
      }
      next = (best + 1) % n;
      return best;
    }

    ReactorPool<R>* pool;
    Handler prototype;
    [[no_unique_address]] Transport transport;
    ConnectionOptions options;
    bool tcp;
    bool least;
    std::size_t next = 0;             // the acceptor's thread only
    std::vector<std::uint64_t> sent;  // the acceptor's thread only
    std::unique_ptr<Slot[]> slots;
  };

  // kExclusive: an acceptor that stopped at its budget with connections perhaps still queued asks
  // the next reactor to take a turn (the kernel woke only one reactor for them). Tasks hold this by
  // shared_ptr; the acceptors' slots are cleared when the PoolAcceptor goes, and a closed acceptor
  // ignores its turn.
  struct Turns : std::enable_shared_from_this<Turns> {
    static void next_turn(void* context, std::size_t from) noexcept {
      auto& self = *static_cast<Turns*>(context);
      const std::size_t next = (from + 1) % self.acceptors.size();
      try {
        (*self.pool)[next].post([turns = self.shared_from_this(), next] {
          if (Single* acceptor = turns->acceptors[next]) acceptor->take_turn();
        });
      } catch (...) {  // no memory for the task: the queue waits for the next wake-up instead
      }
    }

    ReactorPool<R>* pool = nullptr;
    std::vector<Single*> acceptors;  // written only while the pool is not running
  };

  void add(R& loop, detail::SharedListener* shared, const Endpoint& endpoint, Handler prototype,
           const ListenOptions& options, detail::AcceptSink sink) {
    std::error_code ec;
    const char* what = "socket";
    acceptors_.push_back(
        std::unique_ptr<Single>(new Single(loop, shared, endpoint, Transport(transport_),
                                           std::move(prototype), options, sink, ec, what)));
    if (ec) detail::throw_error(ec, what);
  }

  ReactorPool<R>* pool_;
  Balance balance_;
  [[no_unique_address]] Transport transport_;
  Endpoint local_;
  std::unique_ptr<detail::SharedListener> shared_;  // kExclusive: the one listening socket
  std::shared_ptr<Dispatch> dispatch_;              // kRoundRobin, kLeastConnections
  std::shared_ptr<Turns> turns_;                    // kExclusive
  std::vector<std::unique_ptr<Single>> acceptors_;  // destroyed first: they use the above
};

}  // namespace reactor
