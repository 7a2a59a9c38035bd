// Public: Reactor, the event loop. It owns one epoll set, one eventfd (wakeups from other threads),
// a timerfd (created with the first timer), and every connection it runs; it dispatches readiness
// events to the watchers registered with it (connections, acceptors, signal and fd watchers), runs
// timers and work posted from other threads.
//
// Threading: a reactor is driven by one thread at a time, the one inside run(), run_once() or
// shutdown(); a second thread calling them meanwhile gets device_or_resource_busy, a callback
// calling them gets resource_deadlock_would_occur. stop() and post() may be called from any
// thread, and ConnectionHandle's members too; everything else, including every callback, happens
// on the loop thread.
#pragma once

#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <sys/uio.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "buffer.hpp"
#include "concepts.hpp"
#include "detail/file_queue.hpp"
#include "detail/handle_table.hpp"
#include "detail/intrusive_list.hpp"
#include "detail/task.hpp"
#include "detail/watcher.hpp"
#include "error.hpp"
#include "syscalls.hpp"
#include "timer.hpp"
#include "trigger.hpp"

namespace reactor {

template <class Handler, class R, class Transport>
class Connection;
template <class Handler, class R, class Transport>
class Acceptor;
template <class R>
class ConnectionHandle;
template <class R>
class ReactorPool;

struct ReactorOptions {
  // Size of the buffer every connection of this reactor reads into (one buffer, shared).
  std::size_t read_buffer_size = 64 * 1024;
  // Edge-triggered mode: reads one connection may do per wakeup before yielding to the others.
  int max_reads_per_wakeup = 16;
  // The epoll_wait batch starts at initial_events and doubles, up to max_events, whenever a batch
  // comes back full.
  int initial_events = 64;
  int max_events = 4096;
  // Free output chunks kept for reuse instead of returned to the heap: 16 KiB ones, and 512-byte
  // ones (what a connection with a few pending bytes holds, see buffer.hpp).
  std::size_t cached_chunks = 64;
  std::size_t cached_small_chunks = 256;
};

// What a graceful shutdown did with each connection open when it started (or opened during it):
// flushed + failed + aborted counts every one of them exactly once.
struct ShutdownReport {
  std::size_t flushed = 0;  // closed in an orderly way (empty on_close reason): output delivered
  std::size_t failed = 0;   // closed with an error within the grace (reset, limit, timeout, ...)
  std::size_t aborted = 0;  // still serving at the deadline or at a stop(): aborted
  // Set when shutdown() could not run: resource_deadlock_would_occur from inside a callback,
  // device_or_resource_busy while another thread drives the loop, or epoll_wait's error.
  std::error_code error;
};

namespace detail {

// A distinct address per type: the key of Reactor::local<T>().
template <class T>
struct TypeKey {
  static constexpr char id = 0;
};

// `start + delay`, saturated at the clock's range instead of overflowing, for delays of either
// sign and any integer representation. The delay is first compared with the clock's range in its
// own period but a wide representation, so neither hours::max() nor an unsigned or narrow count
// can wrap; then the tick counts are added with an overflow check.
template <class Rep, class Period>
std::chrono::steady_clock::time_point saturating_add(
    std::chrono::steady_clock::time_point start,
    std::chrono::duration<Rep, Period> delay) noexcept {
  using Clock = std::chrono::steady_clock;
  using Ticks = Clock::duration;
  using Delay = std::chrono::duration<Rep, Period>;
  static_assert(std::is_convertible_v<Delay, Ticks>,
                "reactor: durations finer than the steady clock's are not supported");
  // (Implicitly convertible means an integer count: floating durations are refused above.)
  using Wide = std::chrono::duration<std::intmax_t, Period>;
  constexpr std::intmax_t kMax = std::chrono::duration_cast<Wide>(Ticks::max()).count();
  constexpr std::intmax_t kMin = std::chrono::duration_cast<Wide>(Ticks::min()).count();
  if (std::cmp_greater_equal(delay.count(), kMax)) return Clock::time_point::max();
  if (std::cmp_less_equal(delay.count(), kMin)) return Clock::time_point::min();
  const Ticks::rep ticks = std::chrono::duration_cast<Ticks>(delay).count();
  Ticks::rep sum = 0;
  if (__builtin_add_overflow(start.time_since_epoch().count(), ticks, &sum)) {
    return ticks > 0 ? Clock::time_point::max() : Clock::time_point::min();
  }
  return Clock::time_point(Ticks(sum));
}

// Whole milliseconds from `now` until `deadline`, rounded up; 0 once it has passed. Never
// subtracts a deadline saturated at the clock's minimum (that would overflow).
inline std::chrono::milliseconds ms_until(std::chrono::steady_clock::time_point deadline,
                                          std::chrono::steady_clock::time_point now) noexcept {
  if (deadline <= now) return std::chrono::milliseconds(0);
  return std::chrono::ceil<std::chrono::milliseconds>(deadline - now);
}

// The reactors this thread is running, innermost first (asio's call_stack): "am I on the loop
// thread?" is "is this reactor on my stack?", true exactly while inside its run(), run_once() or
// shutdown(), whichever thread created it.
struct RunFrame {
  const void* reactor;
  RunFrame* next;
};
inline thread_local RunFrame* running_reactors = nullptr;

inline bool running_in_this_thread(const void* reactor) noexcept {
  for (const RunFrame* frame = running_reactors; frame != nullptr; frame = frame->next) {
    if (frame->reactor == reactor) return true;
  }
  return false;
}

}  // namespace detail

template <TriggerMode Trigger = LevelTriggered, SyscallPolicy Sys = LinuxSyscalls>
class Reactor {
 public:
  using trigger_mode = Trigger;
  using syscalls = Sys;
  using Clock = std::chrono::steady_clock;
  static constexpr bool kEdgeTriggered = Trigger::kEdge;

  // Creates the epoll set and the wakeup eventfd. Throws std::system_error naming what failed
  // ("epoll_create1", "eventfd", "epoll_ctl", or "reactor buffers" with not_enough_memory).
  explicit Reactor(const ReactorOptions& options = {})
      : options_(options), chunk_pool_(options.cached_chunks, options.cached_small_chunks) {
    const char* what = nullptr;
    if (const std::error_code ec = open(what)) {
      close_fds();
      detail::throw_error(ec, what);
    }
  }

  // As above, reporting failure through `ec`; a reactor that failed to open must only be destroyed.
  Reactor(const ReactorOptions& options, std::error_code& ec) noexcept
      : options_(options), chunk_pool_(options.cached_chunks, options.cached_small_chunks) {
    const char* what = nullptr;
    ec = open(what);
  }

  Reactor(const Reactor&) = delete;
  Reactor& operator=(const Reactor&) = delete;

  // Aborts every connection still open (each gets on_close with operation_canceled, or with an
  // empty reason if it was only lingering for the peer's FIN and the kernel had delivered all its
  // output: SIOCOUTQ, TCP), drops
  // posted work that has not run and pending timers, then closes its fds. Acceptors and watchers
  // must be destroyed before their reactor.
  // on_close callbacks run as inside the loop (run_once()/shutdown() from them are refused), and a
  // connection they try to adopt meanwhile is refused with operation_canceled.
  ~Reactor() {
    abort_connections();
    while (!locals_.empty()) {  // after on_close, which may use them; newest first
      const LocalSlot slot = locals_.back();
      locals_.pop_back();
      slot.destroy(slot.object);
    }
    close_fds();
  }

  // Runs the loop until stop() is called. A stop() that happened before run() makes it return at
  // once; either way the stop request is consumed, so run() can be called again. Throws
  // std::system_error ("epoll_wait", or "run" when called from a callback or while another thread
  // runs the loop).
  void run() {
    std::error_code ec;
    run(ec);
    if (ec) throw_run_error(ec, "run");
  }

  // As above; returns with `ec` set if epoll_wait fails with anything but EINTR, or at once with
  // resource_deadlock_would_occur (called from one of this reactor's callbacks) or
  // device_or_resource_busy (another thread is running it).
  void run(std::error_code& ec) noexcept {
    RunScope scope(*this, ec);
    if (ec) return;
    int events = 0;
    while (!stop_requested_.exchange(false, std::memory_order_acq_rel)) {
      if (const int error = poll_once(-1, events)) {
        ec = detail::errno_code(error);
        return;
      }
    }
  }

  // Waits up to `timeout` (negative: forever) for events, dispatches them, then runs deferred work
  // (the ready list, due timers, posted work, accept retries, close callbacks), and returns the
  // number of epoll events received. EINTR is retried with the remaining time. Throws
  // std::system_error ("epoll_wait") on failure, or ("run_once") when called from a callback or
  // while another thread runs the loop.
  std::size_t run_once(std::chrono::milliseconds timeout = std::chrono::milliseconds(-1)) {
    std::error_code ec;
    const std::size_t n = run_once(timeout, ec);
    if (ec) throw_run_error(ec, "run_once");
    return n;
  }

  // As above, reporting failure through `ec` (as run(ec) does).
  std::size_t run_once(std::chrono::milliseconds timeout, std::error_code& ec) noexcept {
    RunScope scope(*this, ec);
    if (ec) return 0;
    int events = 0;
    const int error = poll_once(timeout.count() < 0 ? -1 : clamp_ms(timeout), events);
    ec = error != 0 ? detail::errno_code(error) : std::error_code();
    return static_cast<std::size_t>(events);
  }

  // Makes run() return after the current batch, or run_once() return early. Safe from any thread
  // and from signal handlers (an atomic store and an eventfd write). As with post(), the reactor
  // must outlive the call: run() may return before the eventfd write, so an owner that destroys
  // the reactor when run() returns must first wait for the stopping thread to be done with it.
  void stop() noexcept {
    stop_requested_.store(true, std::memory_order_release);
    wake();
  }

  // Whether a stop() is pending (not yet consumed by run()).
  bool stop_requested() const noexcept { return stop_requested_.load(std::memory_order_acquire); }

  // Queues `task` (any callable taking no arguments) to run on the loop thread, after the current
  // batch of events, in FIFO order with other posted work. Safe from any thread; wakes the loop
  // with one eventfd write however many tasks are queued before it runs. Callables of up to 48
  // bytes are stored without allocating (the queue itself grows once and is reused). Work still
  // queued when the reactor is destroyed is dropped without running. Exceptions from a task are
  // dropped.
  template <class F>
  void post(F&& task) {
    {
      const std::lock_guard lock(post_mutex_);
      posted_.emplace_back(std::forward<F>(task));
    }
    // A load first: while a wakeup is pending, posting writes nothing the loop thread reads.
    if (!wakeup_pending_.load(std::memory_order_acquire) &&
        !wakeup_pending_.exchange(true, std::memory_order_acq_rel)) {
      wake();
    }
  }

  // Per-loop state: one T per reactor, shared by everything that runs on it (the connections of
  // every acceptor, timers, posted work), reached from a handler as conn.reactor().local<T>()
  // instead of a pointer copied into each handler. local<T>() default-constructs it on first use;
  // emplace_local<T>(args...) constructs it from arguments (or replaces it: references to the old
  // one dangle), for types without a default constructor found by find_local<T>(). Both return a
  // reference that stays valid until the reactor is destroyed, which destroys these objects after
  // its connections' on_close (in reverse order of construction). With a ReactorPool each reactor
  // has its own: thread-local state without locks (a scratch buffer, a cache, a chat room per
  // thread). Lookup is a linear search over the types used, cheap for the few a program has.
  // Throws what T's constructor throws, or std::bad_alloc. Loop thread only.
  template <std::default_initializable T>
  T& local() {
    if (T* found = find_local<T>()) return *found;
    return emplace_local<T>();
  }
  template <class T, class... Args>
  T& emplace_local(Args&&... args) {
    auto object = std::make_unique<T>(std::forward<Args>(args)...);
    T& result = *object;
    for (LocalSlot& slot : locals_) {
      if (slot.key == &detail::TypeKey<T>::id) {  // replaced: references to the old one dangle
        slot.destroy(std::exchange(slot.object, object.release()));
        return result;
      }
    }
    locals_.push_back({&detail::TypeKey<T>::id, object.get(),
                       [](void* p) noexcept { delete static_cast<T*>(p); }});
    object.release();  // after push_back, which may throw: then the unique_ptr frees it
    return result;
  }
  // The T of local<T>(), or nullptr when none was made.
  template <class T>
  T* find_local() noexcept {
    for (const LocalSlot& slot : locals_) {
      if (slot.key == &detail::TypeKey<T>::id) return static_cast<T*>(slot.object);
    }
    return nullptr;
  }

  // Timers run on the loop thread, earliest first; ties run in scheduling order; never before
  // their deadline (a deadline past the clock's range saturates: never). They cost O(log n) to
  // schedule, cancel and fire, and one timerfd for all of them, created with the first timer. When
  // no timerfd can be had (out of fds), epoll_wait's timeout stands in for it (millisecond
  // resolution) and each later schedule tries again. Throw std::bad_alloc only: there is no
  // error_code overload. Loop thread only.
  template <class Rep, class Period, class F>
  TimerId schedule_after(std::chrono::duration<Rep, Period> delay, F&& callback) {
    return schedule(detail::saturating_add(detail::clock_now<Sys>(), delay),
                    Clock::duration::zero(), std::forward<F>(callback));
  }
  template <class F>
  TimerId schedule_at(Clock::time_point due, F&& callback) {
    return schedule(due, Clock::duration::zero(), std::forward<F>(callback));
  }
  // Runs every `period` (first after one period) at start + k * period, without drift. When the
  // loop was busy past one or more deadlines, the timer runs once, late, and goes on at the next
  // start + k * period still ahead: missed periods are not made up. A period under 1 µs (zero or
  // negative included) is raised to 1 µs: such a timer runs on every loop iteration. A period past
  // the clock's range never fires.
  template <class Rep, class Period, class F>
  TimerId schedule_every(std::chrono::duration<Rep, Period> every, F&& callback) {
    const auto now = detail::clock_now<Sys>();
    if (detail::saturating_add(now, every) == Clock::time_point::max()) {
      return schedule(Clock::time_point::max(), Clock::duration::max(), std::forward<F>(callback));
    }
    const Clock::duration period = std::max<Clock::duration>(
        std::chrono::duration_cast<Clock::duration>(every), std::chrono::microseconds(1));
    return schedule(now + period, period, std::forward<F>(callback));
  }

  // Cancels a timer; returns false if it already ran (one-shot) or was cancelled. Safe from any
  // timer callback, the timer's own included.
  bool cancel(TimerId id) noexcept { return timers_.cancel(id); }

  // Timers waiting to run: those scheduled here and not yet run or cancelled, plus one for each
  // connection whose timer is set (timeouts, a handshake or linger deadline; docs/design.md).
  std::size_t pending_timers() const noexcept { return timers_.size(); }

  // The loop's clock: read once per iteration after epoll_wait while timers are pending (what
  // connection timeouts use), otherwise read now.
  Clock::time_point now() const noexcept {
    return timers_.empty() && fd_waiters_.empty() ? detail::clock_now<Sys>() : now_;
  }

  // Connections currently owned by this reactor (open, or closed and awaiting on_close). Safe from
  // any thread (another thread may see a count a few connections old): a pool's least-connections
  // balance reads it from the accepting thread.
  std::size_t connection_count() const noexcept {
    return connection_count_.load(std::memory_order_relaxed);
  }

  // Number of run_once() iterations so far (each is one epoll_wait).
  std::uint64_t loop_iterations() const noexcept { return iterations_; }

  // Asks every connection to close gracefully (flush pending output, then close). Connections
  // then leave one by one as their output drains; connection_count() reaches 0 when all are gone.
  void close_all() noexcept { for_each_open_connection(detail::WatcherOp::kClose); }

  // How long a connection must stay quiet (nothing received, nothing left to send) during a
  // graceful shutdown before it is closed.
  static constexpr std::chrono::milliseconds kDefaultQuietPeriod{100};

  // Graceful shutdown, called on the thread that drives the loop, outside any callback. It
  // consumes any pending stop(), closes every acceptor (each first accepts the connections its
  // listen queue holds: the kernel had completed them), runs the work posted before the call, and
  // keeps serving the open connections — reading, calling on_data, writing — so that bytes the
  // peers sent before the shutdown are still handled. Each connection is closed (flush, FIN,
  // linger) once it is quiet: nothing pending to send and nothing received for `quiet`, or its peer
  // half-closed. A handler with an on_shutdown(conn) hook decides instead: the hook is called once,
  // and the connection stays until the handler closes it. Timers and posted work keep running
  // meanwhile. At the deadline, or as soon as stop() is called during the grace period (a second
  // signal, say), what is left is aborted (on_close gets operation_canceled); a stop() made during
  // it is consumed by it. Returns the counts; report.error is set, and nothing done, when called
  // from a callback or while another thread runs the loop.
  ShutdownReport shutdown(std::chrono::milliseconds grace,
                          std::chrono::milliseconds quiet = kDefaultQuietPeriod) noexcept {
    return shutdown_with(
        grace, quiet, true, [] {}, [](bool serving) { return serving; });
  }

  // Whether a graceful shutdown is in progress (connections check it when they open).
  bool draining() const noexcept { return shutdown_report_ != nullptr; }

  // Low-level registration of a watcher's fd (events as for epoll_ctl). Return the error, if any;
  // they never throw. remove() also drops any event for the watcher still queued in the batch
  // being dispatched, so a watcher may be destroyed right after removing itself.
  std::error_code add(detail::Watcher& watcher, std::uint32_t events) noexcept {
    return control(EPOLL_CTL_ADD, watcher, events);
  }
  std::error_code modify(detail::Watcher& watcher, std::uint32_t events) noexcept {
    return control(EPOLL_CTL_MOD, watcher, events);
  }
  void remove(detail::Watcher& watcher) noexcept {
    deregister(watcher);
    forget(watcher);
  }

  // Takes the watcher's fd out of the epoll set, leaving the batch alone: for connections, whose
  // queued events are dropped by their fd of -1 until they are freed after the batch (a paused
  // connection that leaves the set on EPOLLHUP keeps its fd: epoll reported it once in this
  // batch, and that event is the one being handled).
  // Returns the error of EPOLL_CTL_DEL, if any; the watcher counts as out of the set either way
  // (a caller about to close the fd needs nothing more; one that keeps it must act on the error).
  std::error_code deregister(detail::Watcher& watcher) noexcept {
    if (!watcher.registered) return {};
    epoll_event event{};
    const int result = Sys::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, watcher.fd, &event);
    watcher.registered = false;
    watcher.interest = 0;
    return result < 0 ? detail::last_errno_code() : std::error_code{};
  }

  // Drops any event for `watcher` still queued in the batch being dispatched (for a watcher about
  // to be destroyed whose fd left the epoll set some other way).
  void forget(detail::Watcher& watcher) noexcept {
    for (int i = batch_index_ + 1; i < batch_size_; ++i) {
      if (events_[static_cast<std::size_t>(i)].data.ptr == &watcher) {
        events_[static_cast<std::size_t>(i)].data.ptr = nullptr;
      }
    }
  }

 private:
  template <class Handler, class R, class Transport>
  friend class Connection;
  template <class Handler, class R, class Transport>
  friend class Acceptor;
  template <class R>
  friend class ConnectionHandle;
  template <class R>
  friend class ReactorPool;

  using ConnectionList = detail::IntrusiveList<detail::OwnedWatcher, detail::AllConnectionsTag>;
  using ReadyList = detail::IntrusiveList<detail::OwnedWatcher, detail::ReadyTag>;
  using FdWaiterList = detail::IntrusiveList<detail::FdWaiter, detail::FdWaitTag>;
  using ListenerList = detail::IntrusiveList<detail::ListenerNode, detail::ListenerTag>;

  // shutdown(), for it and for ReactorPool: `consume_stop` false keeps a stop() made before the
  // call (a pool's stop() between its reactors' starts must still end every grace period);
  // `listeners_closed()` runs once the acceptors are closed and before serving out begins (a pool
  // waits there until every reactor has closed its acceptors, so that connections handed over
  // while closing are queued before any reactor decides it has nothing left to serve); and the
  // loop goes on while `keep_serving(connections left)` (a pool's reactor with none left keeps
  // running its signals, timers and posted work until every reactor is done).
  template <class Closed, class Serving>
  ShutdownReport shutdown_with(std::chrono::milliseconds grace, std::chrono::milliseconds quiet,
                               bool consume_stop, Closed&& listeners_closed,
                               Serving&& keep_serving) noexcept {
    ShutdownReport report;
    RunScope scope(*this, report.error);
    if (report.error) return report;
    if (consume_stop) stop_requested_.store(false, std::memory_order_release);  // this is the stop
    // Each acceptor accepts what its queue holds before closing: those clients are served out.
    for (auto* node = listeners_.front(); node != nullptr; node = listeners_.front()) {
      node->unlink();  // the acceptor's close() would unlink it too; never loop on one
      node->watcher->function(*node->watcher, detail::WatcherOp::kClose, 0, nullptr);
    }
    listeners_closed();
    now_ = detail::clock_now<Sys>();
    drain_started_ = now_;
    drain_quiet_ = std::clamp(quiet, std::chrono::milliseconds(0),
                              std::chrono::milliseconds(std::chrono::hours(24 * 365)));
    shutdown_report_ = &report;
    for_each_open_connection(detail::WatcherOp::kDrain);
    // Work posted before the shutdown (a connection handed over by another reactor's acceptor,
    // say) runs now: what it opens is served out like the rest, not dropped for want of a turn.
    run_posted();
    finalize_closed();
    const auto deadline = detail::saturating_add(now_, grace);
    int events = 0;
    while (keep_serving(connection_count() > 0) &&
           !stop_requested_.exchange(false, std::memory_order_acq_rel)) {
      const auto left = detail::ms_until(deadline, detail::clock_now<Sys>());
      if (left.count() <= 0) break;
      if (const int error = poll_once(clamp_ms(left), events)) {
        report.error = detail::errno_code(error);
        break;
      }
    }
    // A stop() that came during the grace was meant for this shutdown, even when the last
    // connection closed in the same iteration and nothing was left to abort: it must not make
    // the next run() return at once.
    stop_requested_.store(false, std::memory_order_release);
    aborting_ = true;
    for_each_open_connection(detail::WatcherOp::kAbort);
    finalize_closed();
    aborting_ = false;
    shutdown_report_ = nullptr;
    return report;
  }

  // The destructor's first half, and ReactorPool's: every reactor of a pool aborts its connections
  // before any is destroyed, so an on_close that posts to another reactor, or uses a handle of
  // one, finds it alive.
  void abort_connections() noexcept {
    std::error_code running;  // set only if destroyed from inside its own loop: undefined anyway
    RunScope scope(*this, running);
    destroying_ = true;
    while (!connections_.empty()) {
      for_each_open_connection(detail::WatcherOp::kAbort);
      finalize_closed();
    }
  }

  // Kinds of deferred work, one bit each in deferred_, so that an iteration with none of it costs
  // one test after the dispatch.
  enum Deferred : std::uint8_t {
    kReadyWork = 1,      // connections on the ready list
    kClosedWork = 2,     // connections awaiting on_close
    kTimerWork = 4,      // timers pending
    kPostedWork = 8,     // the wakeup eventfd fired: posted work may be queued
    kFdWaiterWork = 16,  // acceptors waiting for fds
  };

  // One iteration: wait (timeout_ms < 0: forever), dispatch, run deferred work. Returns 0 or the
  // errno of a failed epoll_wait; `events` gets the number of events received.
  [[gnu::always_inline]] inline int poll_once(int timeout_ms, int& events) noexcept {
    ++iterations_;
    const int error = wait(wait_timeout(timeout_ms), events);
    // The clock is read only while something is timed (a timer, a connection timeout, an accept
    // backoff): an untimed echo loop pays no clock_gettime per iteration.
    if ((deferred_ & (kTimerWork | kFdWaiterWork)) != 0) now_ = detail::clock_now<Sys>();
    if (error != 0) return error;
    dispatch(events);
    if (events == batch_capacity_ && events < options_.max_events) grow_events();
    if (deferred_ != 0) run_deferred();
    return 0;
  }

  void run_deferred() noexcept {
    if ((deferred_ & kReadyWork) != 0) run_ready();
    if ((deferred_ & kTimerWork) != 0) run_timers();
    if ((deferred_ & kPostedWork) != 0) run_posted();
    end_step();
    finalize_closed();
    if (!fd_waiters_.empty() && (fds_freed_ || fd_waiters_due())) {
      run_fd_waiters();
      end_step();  // what on_open sent
      finalize_closed();
    }
    deferred_ = static_cast<std::uint8_t>((ready_.empty() ? 0 : kReadyWork) |
                                          (timers_.empty() ? 0 : kTimerWork) |
                                          (fd_waiters_.empty() ? 0 : kFdWaiterWork));
  }

  // Marks this reactor as run by the calling thread for the scope's duration, or sets `ec` (and
  // marks nothing) when it is already running: on this thread (a callback calling run_once()) or
  // on another.
  class RunScope {
   public:
    RunScope(Reactor& loop, std::error_code& ec) noexcept : loop_(loop) {
      ec.clear();
      if (detail::running_in_this_thread(&loop)) {
        ec = std::make_error_code(std::errc::resource_deadlock_would_occur);
        return;
      }
      if (loop.in_use_.exchange(true, std::memory_order_acquire)) {
        ec = std::make_error_code(std::errc::device_or_resource_busy);
        return;
      }
      frame_ = {&loop, detail::running_reactors};
      detail::running_reactors = &frame_;
      loop.inside_ = true;
      loop.sent_in_step_ = nullptr;  // sends made outside the loop are no step's
      active_ = true;
    }
    RunScope(const RunScope&) = delete;
    RunScope& operator=(const RunScope&) = delete;
    ~RunScope() {
      if (!active_) return;
      detail::running_reactors = frame_.next;
      loop_.inside_ = false;
      loop_.in_use_.store(false, std::memory_order_release);
    }

   private:
    Reactor& loop_;
    detail::RunFrame frame_{};
    bool active_ = false;
  };

  // run()/run_once() failed: "epoll_wait" for its errors, `call` for being refused. Only on
  // failure, and comparing categories by address: no call on the category object, which UBSan's
  // vptr check would probe through a pipe (impossible while the process is out of fds).
  [[noreturn]] static void throw_run_error(const std::error_code& ec, const char* call) {
    detail::throw_error(ec, &ec.category() == &std::generic_category() ? call : "epoll_wait");
  }

  // Something is about to be timed. While nothing was, the loop did not refresh now_ (and now()
  // read the clock instead); refresh it, so that now() and the connections' stamps are current.
  void start_timing() noexcept {
    if (timers_.empty() && fd_waiters_.empty()) now_ = detail::clock_now<Sys>();
  }

  static int clamp_ms(std::chrono::milliseconds timeout) noexcept {
    return static_cast<int>(std::min<std::int64_t>(timeout.count(), 1 << 30));
  }

  // `what` names the step that failed.
  std::error_code open(const char*& what) noexcept {
    options_.initial_events = std::clamp(options_.initial_events, 1, 1 << 20);
    options_.max_events = std::max(options_.max_events, options_.initial_events);
    options_.read_buffer_size = std::max<std::size_t>(options_.read_buffer_size, 1024);
    options_.max_reads_per_wakeup = std::max(options_.max_reads_per_wakeup, 1);
    now_ = detail::clock_now<Sys>();
    what = "epoll_create1";
    epoll_fd_ = Sys::epoll_create1(EPOLL_CLOEXEC);
    if (epoll_fd_ < 0) return detail::last_errno_code();
    what = "eventfd";
    wakeup_.fd = Sys::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wakeup_.fd < 0) return detail::last_errno_code();
    what = "epoll_ctl";
    if (auto ec = add(wakeup_, EPOLLIN)) return ec;
    what = "reactor buffers";
    read_buffer_.reset(new (std::nothrow) char[options_.read_buffer_size]);
    if (!read_buffer_) return std::make_error_code(std::errc::not_enough_memory);
    cork_buffer_.reset(new (std::nothrow) char[kCorkBytes]);
    if (!cork_buffer_) return std::make_error_code(std::errc::not_enough_memory);
    try {
      events_.resize(static_cast<std::size_t>(options_.initial_events));
    } catch (const std::bad_alloc&) {
      return std::make_error_code(std::errc::not_enough_memory);
    }
    batch_capacity_ = options_.initial_events;
    return {};
  }

  void close_fds() noexcept {
    if (timer_.fd >= 0) Sys::close(std::exchange(timer_.fd, -1));
    if (wakeup_.fd >= 0) Sys::close(std::exchange(wakeup_.fd, -1));
    if (epoll_fd_ >= 0) Sys::close(std::exchange(epoll_fd_, -1));
  }

  void wake() noexcept {
    const std::uint64_t one = 1;
    // EAGAIN would mean the counter is saturated, so a wakeup is pending anyway.
    [[maybe_unused]] const ssize_t n = Sys::write(wakeup_.fd, &one, sizeof one);
  }

  // Applies `op` to every connection that is still open; connections may close (or open) others
  // meanwhile.
  void for_each_open_connection(detail::WatcherOp op) noexcept {
    ConnectionList pending;
    pending.splice_back(connections_);
    for (auto* node = pending.pop_front(); node != nullptr; node = pending.pop_front()) {
      connections_.push_back(*node);
      if (node->fd >= 0) node->function(*node, op, 0, nullptr);
      end_step();  // what on_shutdown sent
    }
  }

  std::error_code control(int op, detail::Watcher& watcher, std::uint32_t events) noexcept {
    epoll_event event{};
    event.events = events;
    event.data.ptr = &watcher;
    if (Sys::epoll_ctl(epoll_fd_, op, watcher.fd, &event) != 0) return detail::last_errno_code();
    watcher.registered = true;
    watcher.interest = events;
    return {};
  }

  // The epoll_wait timeout: 0 while work is queued or a stop is pending (run() then returns;
  // shutdown() checks for it before waiting), else the caller's, cut short by an acceptor's
  // backoff and, while the timerfd cannot be armed, by the earliest timer.
  [[gnu::always_inline]] inline int wait_timeout(int timeout_ms) noexcept {
    if ((deferred_ & (kReadyWork | kClosedWork)) != 0 || stop_requested()) return 0;
    if (fd_waiters_.empty() && !timerfd_unarmed_) return timeout_ms;
    return shortened_timeout(timeout_ms);
  }

  int shortened_timeout(int timeout_ms) noexcept {
    auto due = Clock::time_point::max();
    fd_waiters_.for_each([&](const detail::FdWaiter& w) { due = std::min(due, w.due); });
    if (timerfd_unarmed_ && !timers_.empty()) due = std::min(due, timers_.next_due());
    if (due == Clock::time_point::max()) return timeout_ms;
    const auto left = detail::ms_until(due, detail::clock_now<Sys>());
    const auto limit =
        timeout_ms < 0 ? std::chrono::milliseconds::max() : std::chrono::milliseconds(timeout_ms);
    return clamp_ms(std::clamp(left, std::chrono::milliseconds(0), limit));
  }

  // epoll_wait, retrying EINTR with the remaining time. Returns 0 or the errno of a failure.
  int wait(int timeout_ms, int& events) noexcept {
    Clock::time_point deadline{};
    if (timeout_ms > 0) deadline = detail::clock_now<Sys>() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      events = Sys::epoll_wait(epoll_fd_, events_.data(), batch_capacity_, timeout_ms);
      if (events >= 0) return 0;
      events = 0;
      if (errno != EINTR) return errno;
      if (timeout_ms > 0) {
        const auto left = detail::ms_until(deadline, detail::clock_now<Sys>());
        timeout_ms = static_cast<int>(std::max<std::int64_t>(left.count(), 0));
      }
    }
  }

  void dispatch(int n) noexcept {
    batch_size_ = n;
    for (batch_index_ = 0; batch_index_ < batch_size_; ++batch_index_) {
      const epoll_event& event = events_[static_cast<std::size_t>(batch_index_)];
      auto* watcher = static_cast<detail::Watcher*>(event.data.ptr);
      // A watcher closed earlier in this batch has fd -1 (connections, freed only after the
      // batch) or had its entries cleared by remove()/forget() (everything else).
      if (watcher == nullptr || watcher->fd < 0) continue;
      if (watcher == &wakeup_ || watcher == &timer_) {
        std::uint64_t count;  // drain: the work itself runs after the batch
        [[maybe_unused]] const ssize_t r = Sys::read(watcher->fd, &count, sizeof count);
        if (watcher == &wakeup_) {
          deferred_ |= kPostedWork;
        } else {
          deferred_ |= kTimerWork;
          armed_due_ = Clock::time_point::max();  // it expired: the timerfd holds no deadline now
        }
        continue;
      }
      // Interest may have changed since the kernel queued this event (another handler paused
      // this connection, say): deliver only what the watcher still asks for.
      const std::uint32_t events = event.events & (watcher->interest | EPOLLERR | EPOLLHUP);
      if (events != 0) watcher->function(*watcher, detail::WatcherOp::kEvent, events, nullptr);
      end_step();  // what the handler sent, before the next read
    }
    batch_index_ = -1;
    batch_size_ = 0;
  }

  void grow_events() noexcept {
    try {
      events_.resize(std::min(events_.size() * 2, static_cast<std::size_t>(options_.max_events)));
      batch_capacity_ = static_cast<int>(events_.size());
    } catch (const std::bad_alloc&) {
      // Keep the current size: a full batch only means more epoll_wait calls.
    }
  }

  // Runs, once, every connection that asked to be run again before this call; those that ask
  // again while running wait for the next iteration.
  void run_ready() noexcept {
    if (ready_.empty()) return;
    ReadyList batch;
    batch.splice_back(ready_);
    for (auto* node = batch.pop_front(); node != nullptr; node = batch.pop_front()) {
      if (node->fd >= 0) node->function(*node, detail::WatcherOp::kResume, 0, nullptr);
      end_step();
    }
  }

  template <class F>
  TimerId schedule(Clock::time_point due, Clock::duration period, F&& callback) {
    if (timer_.fd < 0) open_timerfd();
    start_timing();
    const TimerId id = timers_.add(due, period, detail::Task(std::forward<F>(callback)));
    deferred_ |= kTimerWork;
    arm_timer();
    return id;
  }

  // Without a timerfd (none could be created or registered: out of fds or memory) timers still
  // run: arm_timer() then leaves them to epoll_wait's timeout. Losing them, or the connections
  // whose timeouts need them, over one fd would turn a shortage into lost data at shutdown.
  void open_timerfd() noexcept {
    timer_.fd = Sys::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (timer_.fd >= 0 && add(timer_, EPOLLIN)) Sys::close(std::exchange(timer_.fd, -1));
    armed_due_ = Clock::time_point::max();  // a new timerfd holds nothing yet
  }

  // Keeps the timerfd no later than the earliest deadline, reasoning only from what the timerfd
  // holds (armed_due_: the deadline it was last set to, or max() once its expiry has been read),
  // never from a clock (asio's epoll_reactor::update_timeout). It is re-armed whenever the
  // earliest deadline is earlier than what it holds; a deadline that moved later (a cancel) is
  // left alone and costs one early wakeup, after which run_timers() re-arms from the heap. If
  // timerfd_settime fails, epoll_wait's timeout stands in for it until an arm succeeds.
  void arm_timer() noexcept {
    if (timers_.empty()) return;
    if (timer_.fd < 0) {
      timerfd_unarmed_ = true;
      return;
    }
    const auto due = timers_.next_due();
    if (due >= armed_due_) return;
    const auto since_epoch = std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::max(due, Clock::time_point(std::chrono::nanoseconds(1))).time_since_epoch());
    itimerspec spec{};
    spec.it_value.tv_sec = static_cast<time_t>(since_epoch.count() / 1'000'000'000);
    spec.it_value.tv_nsec = static_cast<long>(since_epoch.count() % 1'000'000'000);
    // steady_clock is CLOCK_MONOTONIC on Linux (libstdc++ and libc++), so the clocks agree.
    if (Sys::timerfd_settime(timer_.fd, TFD_TIMER_ABSTIME, &spec, nullptr) != 0) {
      timerfd_unarmed_ = true;
      return;
    }
    timerfd_unarmed_ = false;
    armed_due_ = due;
  }

  void run_timers() noexcept {
    const auto due = timers_.next_due_or_max();  // max(): none
    if (due > now_) {
      // Nothing due (every iteration of a loop with timeouts): what arm_timer() would decide,
      // without looking at the two heaps again.
      if (due >= armed_due_ && timer_.fd >= 0) return;
      arm_timer();
      return;
    }
    timers_.run_due(now_);
    if (timer_.fd < 0) open_timerfd();  // out of fds when it was first needed: try again
    arm_timer();
  }

  void run_posted() noexcept {
    if (!wakeup_pending_.load(std::memory_order_acquire)) return;
    wakeup_pending_.store(false, std::memory_order_release);
    {
      const std::lock_guard lock(post_mutex_);
      running_.swap(posted_);
    }
    for (auto& task : running_) {
      try {
        task();
      } catch (...) {
        // Dropped: posted work has nobody to report to.
      }
    }
    running_.clear();  // keeps the capacity: the next swap reuses it
  }

  bool fd_waiters_due() noexcept {
    bool any = false;
    fd_waiters_.for_each([&](const detail::FdWaiter& w) { any = any || w.due <= now_; });
    return any;
  }

  // Resumes every fd waiter when fds were freed since the last call, else those whose time has
  // come. A resumed waiter that is still short of fds queues itself again.
  void run_fd_waiters() noexcept {
    const bool all = std::exchange(fds_freed_, false);
    FdWaiterList pending;
    pending.splice_back(fd_waiters_);
    for (auto* waiter = pending.pop_front(); waiter != nullptr; waiter = pending.pop_front()) {
      if (all || waiter->due <= now_) {
        waiter->watcher->function(*waiter->watcher, detail::WatcherOp::kResume, 0, nullptr);
      } else {
        fd_waiters_.push_back(*waiter);
      }
    }
  }

  // Called by an acceptor out of fds: resume it at `due` or when a connection closes.
  void wait_for_fds(detail::FdWaiter& waiter, Clock::time_point due) noexcept {
    start_timing();
    waiter.unlink();
    waiter.due = due;
    fd_waiters_.push_back(waiter);
    deferred_ |= kFdWaiterWork;
  }

  void add_listener(detail::ListenerNode& node) noexcept { listeners_.push_back(node); }

  // Connection bookkeeping, used by Connection.

  // Arms (or moves) a connection's deadline: it fires in due order with the timers, as one of
  // them would. Returns false, with the deadline disarmed, when the heap had no room and none
  // could be allocated (a connection then acts as when schedule_at() threw).
  bool arm_deadline(detail::Deadline& deadline, Clock::time_point due) noexcept {
    if (timer_.fd < 0) open_timerfd();
    start_timing();
    if (!timers_.arm(deadline, due)) return false;
    deferred_ |= kTimerWork;
    arm_timer();
    return true;
  }
  void disarm_deadline(detail::Deadline& deadline) noexcept { timers_.disarm(deadline); }
  // The timer queue's one function for the deadlines it fires: all are TimedWatchers' (arm_deadline
  // is reached only from Connection).
  static void fire_deadline(detail::Deadline& deadline) noexcept {
    auto& watcher = static_cast<detail::TimedWatcher&>(deadline);
    watcher.function(watcher, detail::WatcherOp::kTimer, 0, nullptr);
  }

  void link_connection(detail::OwnedWatcher& node) noexcept {
    connections_.push_back(node);
    // One writer (this thread), any number of readers: a load and a store, no read-modify-write.
    connection_count_.store(connection_count_.load(std::memory_order_relaxed) + 1,
                            std::memory_order_relaxed);
  }

  void schedule_ready(detail::OwnedWatcher& node) noexcept {
    if (!static_cast<detail::ListHook<detail::ReadyTag>&>(node).is_linked()) ready_.push_back(node);
    deferred_ |= kReadyWork;
  }

  // The connection closed its fd: run its last callback and free it after this dispatch.
  void schedule_finalize(detail::OwnedWatcher& node) noexcept {
    static_cast<detail::ListHook<detail::ReadyTag>&>(node).unlink();
    node.next_closed = nullptr;
    if (closed_tail_ == nullptr) {
      closed_head_ = &node;
    } else {
      closed_tail_->next_closed = &node;
    }
    closed_tail_ = &node;
    fds_freed_ = true;
    deferred_ |= kClosedWork;
  }

  // Runs on_close for every connection closed so far, in closing order, and frees it. Callbacks
  // may close further connections; they are finalized in the same pass.
  void finalize_closed() noexcept {
    while (closed_head_ != nullptr) {
      detail::OwnedWatcher* node = closed_head_;
      closed_head_ = node->next_closed;
      if (closed_head_ == nullptr) closed_tail_ = nullptr;
      static_cast<detail::ListHook<detail::AllConnectionsTag>&>(*node).unlink();
      connection_count_.store(connection_count_.load(std::memory_order_relaxed) - 1,
                              std::memory_order_relaxed);
      node->function(*node, detail::WatcherOp::kFinalize, 0, nullptr);
      end_step();  // what on_close sent to other connections
    }
  }

  // Output coalescing (Connection::send inside the loop). One connection at a time, with no
  // output queued, collects the small sends made to it in the loop's cork buffer; they are written
  // when the callbacks of this step are done. A send to another connection first writes the one
  // held before, so sends to one connection in a row leave in one write, and one buffer serves
  // the loop. Every step of the loop (the events, the ready list, timers, posted work, on_close)
  // ends with end_step().
  void cork(detail::Watcher& watcher) noexcept {
    if (corked_ == &watcher) return;
    if (corked_ != nullptr) flush_corked();
    corked_ = &watcher;
  }
  // The connection closed or wrote its coalesced bytes itself: nothing to flush for it.
  void uncork(detail::Watcher& watcher) noexcept {
    if (corked_ == &watcher) corked_ = nullptr;
  }
  // Writes the coalesced output (a flush's on_drain may coalesce again: then that too).
  void flush_corked() noexcept {
    while (corked_ != nullptr) {
      detail::Watcher* watcher = std::exchange(corked_, nullptr);
      watcher->function(*watcher, detail::WatcherOp::kFlush, 0, nullptr);
    }
  }
  // True while the owner thread runs the loop (callbacks included): sends coalesce.
  bool inside() const noexcept { return inside_; }
  // Whether a connection of this loop has sent twice in one step: from then on every small send
  // inside the loop is held from the first (before, the first of a step is written at once).
  bool holds_sends() const noexcept { return holds_sends_; }
  void learn_to_hold_sends() noexcept { holds_sends_ = true; }
  // The connection whose send was written at once in this step (a second one in the step is
  // what teaches the loop to hold); every step ends with end_step().
  bool sent_in_step(const detail::Watcher& watcher) const noexcept {
    return sent_in_step_ == &watcher;
  }
  void mark_sent(detail::Watcher& watcher) noexcept { sent_in_step_ = &watcher; }
  void end_step() noexcept {
    sent_in_step_ = nullptr;
    if (corked_ != nullptr) flush_corked();
  }
  // The corked connection's bytes. A first send of bytes that lie in the read buffer (on_data's,
  // echoed or forwarded) is only pointed at, not copied: nothing writes there before the next
  // read, and read_buffer() copies them out first.
  static constexpr std::size_t kCorkBytes = 16 * 1024;
  const char* cork_data() const noexcept {
    return cork_borrowed_ != nullptr ? cork_borrowed_ : cork_buffer_.get();
  }
  std::size_t cork_size() const noexcept { return cork_size_; }
  std::size_t cork_room() const noexcept { return kCorkBytes - cork_size_; }
  void cork_append(const iovec* pieces, int count) noexcept {
    if (cork_size_ == 0 && count == 1) {
      const char* bytes = static_cast<const char*>(pieces[0].iov_base);
      const char* buffer = read_buffer_.get();
      if (bytes >= buffer && bytes + pieces[0].iov_len <= buffer + options_.read_buffer_size) {
        cork_borrowed_ = bytes;
        cork_size_ = pieces[0].iov_len;
        return;
      }
    }
    if (cork_borrowed_ != nullptr) own_cork();
    for (int i = 0; i < count; ++i) {
      std::memcpy(cork_buffer_.get() + cork_size_, pieces[i].iov_base, pieces[i].iov_len);
      cork_size_ += pieces[i].iov_len;
    }
  }
  void reset_cork() noexcept {
    cork_size_ = 0;
    cork_borrowed_ = nullptr;
  }
  void own_cork() noexcept {
    std::memcpy(cork_buffer_.get(), std::exchange(cork_borrowed_, nullptr), cork_size_);
  }

  // The clock as of this iteration's epoll_wait; stale while nothing is timed, when nothing reads
  // it.
  Clock::time_point cached_now() const noexcept { return now_; }
  // For activity stamps: the cached clock inside the loop, the policy's clock outside it (between
  // run_once() calls the cached one is as old as the last iteration, and a timeout measured from
  // it would fire early by that much). Outside the loop only its owner thread may call in. A
  // plain bool, not in_use_: on the send path an atomic load cost 4-10 instructions per message.
  Clock::time_point activity_now() const noexcept {
    if (inside_) [[likely]]
      return now_;
    return detail::clock_now<Sys>();
  }

  // True on the thread inside this reactor's run(), run_once() or shutdown() (callbacks
  // included), false everywhere else, the creating thread included while the loop is not run.
  bool on_loop_thread() const noexcept { return detail::running_in_this_thread(this); }

  // True while the destructor runs (Connection::open refuses new connections then).
  bool destroying() const noexcept { return destroying_; }

  // A connection closed during shutdown(): count it in the report.
  void count_shutdown_close(const std::error_code& reason) noexcept {
    if (shutdown_report_ == nullptr) return;
    // Aborted: cut off by the deadline or a stop(). A connection that lingered to the deadline
    // after an idle timeout keeps its timed_out reason and counts as failed, as on_close says,
    // if the kernel had delivered everything; if not, the abort's operation_canceled replaces it.
    if (!reason) {
      ++shutdown_report_->flushed;
    } else if (aborting_ && reason == std::errc::operation_canceled) {
      ++shutdown_report_->aborted;
    } else {
      ++shutdown_report_->failed;
    }
  }
  Clock::time_point drain_started() const noexcept { return drain_started_; }
  std::chrono::milliseconds drain_quiet_period() const noexcept { return drain_quiet_; }

  // The buffer every read of this loop goes to (bytes coalesced from it are copied out first).
  char* read_buffer() noexcept {
    if (cork_borrowed_ != nullptr) [[unlikely]]
      own_cork();
    return read_buffer_.get();
  }
  std::size_t read_buffer_size() const noexcept { return options_.read_buffer_size; }
  int max_reads_per_wakeup() const noexcept { return options_.max_reads_per_wakeup; }
  ChunkPool& chunk_pool() noexcept { return chunk_pool_; }

  // send_file()'s queues, by connection. Kept here rather than as a pointer in each Connection:
  // 8 bytes that every connection would carry for the few that send files. A lookup costs a hash
  // of a pointer, next to a sendfile per socket buffer.
  detail::FileQueue* file_queue(const void* owner) const noexcept {
    const auto found = file_queues_.find(owner);
    return found == file_queues_.end() ? nullptr : found->second;
  }
  // False when the map could not grow (out of memory): nothing was attached then.
  bool attach_file_queue(const void* owner, detail::FileQueue* files) noexcept {
    try {
      return file_queues_.emplace(owner, files).second;
    } catch (...) {
      return false;
    }
  }
  void detach_file_queue(const void* owner) noexcept { file_queues_.erase(owner); }
  detail::HandleTable& handles() noexcept { return handles_; }

  static void ignore_event(detail::Watcher&, detail::WatcherOp, std::uint32_t, void*) noexcept {}

  ReactorOptions options_;
  int epoll_fd_ = -1;
  detail::Watcher wakeup_{&ignore_event};
  detail::Watcher timer_{&ignore_event};
  std::atomic<bool> stop_requested_{false};
  std::atomic<bool> wakeup_pending_{false};
  std::vector<epoll_event> events_;
  int batch_capacity_ = 0;     // events_.size(), kept as an int: epoll_wait's type, and no division
  std::uint8_t deferred_ = 0;  // Deferred bits
  int batch_index_ = -1;
  int batch_size_ = 0;
  Clock::time_point now_{};
  bool inside_ = false;  // the owner thread is inside run(), run_once() or shutdown()
  struct LocalSlot {
    const void* key;  // &detail::TypeKey<T>::id
    void* object;     // the T
    void (*destroy)(void*) noexcept;
  };
  std::vector<LocalSlot> locals_;        // local<T>()
  detail::Watcher* corked_ = nullptr;    // the connection whose coalesced output waits, if any
  std::unique_ptr<char[]> cork_buffer_;  // its bytes: kCorkBytes
  std::size_t cork_size_ = 0;
  bool holds_sends_ = false;                       // holds_sends()
  const detail::Watcher* sent_in_step_ = nullptr;  // sent_in_step()
  const char* cork_borrowed_ = nullptr;  // the corked bytes lie here (in read_buffer_), if set
  std::atomic<bool> in_use_{false};      // some thread is inside run(), run_once() or shutdown()
  std::unique_ptr<char[]> read_buffer_;
  ChunkPool chunk_pool_;
  std::unordered_map<const void*, detail::FileQueue*> file_queues_;  // see file_queue()
  ConnectionList connections_;
  std::atomic<std::size_t> connection_count_{0};  // written here only; read from any thread
  ReadyList ready_;
  detail::OwnedWatcher* closed_head_ = nullptr;
  detail::OwnedWatcher* closed_tail_ = nullptr;
  bool fds_freed_ = false;
  FdWaiterList fd_waiters_;
  ListenerList listeners_;
  detail::TimerQueue timers_{&fire_deadline};
  Clock::time_point armed_due_ = Clock::time_point::max();  // what the timerfd holds; max: nothing
  bool timerfd_unarmed_ =
      false;  // no timerfd, or its last arm failed: epoll_wait's timeout stands in
  ShutdownReport* shutdown_report_ = nullptr;  // set while shutdown() runs
  bool aborting_ = false;                      // shutdown() is aborting what is left
  bool destroying_ = false;                    // the destructor runs
  Clock::time_point drain_started_{};
  std::chrono::milliseconds drain_quiet_{kDefaultQuietPeriod};
  std::mutex post_mutex_;
  std::vector<detail::Task> posted_;
  std::vector<detail::Task> running_;
  detail::HandleTable handles_;
  std::uint64_t iterations_ = 0;
};

}  // namespace reactor
