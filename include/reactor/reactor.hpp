// Public: Reactor, the event loop. It owns one epoll set and one eventfd (for wakeups from other
// threads), dispatches readiness events to the watchers registered with it (connections,
// acceptors, signal and fd watchers), and owns the connections it runs.
//
// Threading: a reactor is driven by one thread, the one calling run() or run_once(). Only stop() may
// be called from other threads. Everything else, including every callback, happens on the loop
// thread.
#pragma once

#include <sys/epoll.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <system_error>
#include <vector>

#include "buffer.hpp"
#include "concepts.hpp"
#include "detail/intrusive_list.hpp"
#include "detail/watcher.hpp"
#include "error.hpp"
#include "syscalls.hpp"
#include "trigger.hpp"

namespace reactor {

template <class Handler, class R>
class Connection;
template <class Handler, class R>
class Acceptor;

struct ReactorOptions {
  // Size of the buffer every connection of this reactor reads into (one buffer, shared).
  std::size_t read_buffer_size = 64 * 1024;
  // Edge-triggered mode: reads one connection may do per wakeup before yielding to the others.
  int max_reads_per_wakeup = 16;
  // The epoll_wait batch starts at initial_events and doubles, up to max_events, whenever a batch
  // comes back full.
  int initial_events = 64;
  int max_events = 4096;
  // Free output chunks (16 KiB each) kept for reuse instead of returned to the heap.
  std::size_t cached_chunks = 64;
};

template <TriggerMode Trigger = LevelTriggered, SyscallPolicy Sys = LinuxSyscalls>
class Reactor {
 public:
  using trigger_mode = Trigger;
  using syscalls = Sys;
  using Clock = std::chrono::steady_clock;
  static constexpr bool kEdgeTriggered = Trigger::kEdge;

  // Creates the epoll set and the wakeup eventfd. Throws std::system_error naming the syscall
  // ("epoll_create1", "eventfd", "epoll_ctl") on failure.
  explicit Reactor(const ReactorOptions& options = {})
      : options_(options), chunk_pool_(options.cached_chunks) {
    if (const std::error_code ec = open()) {
      const char* what = epoll_fd_ < 0 ? "epoll_create1" : wakeup_.fd < 0 ? "eventfd" : "epoll_ctl";
      close_fds();
      detail::throw_error(ec, what);
    }
  }

  // As above, reporting failure through `ec`; a reactor that failed to open must only be destroyed.
  Reactor(const ReactorOptions& options, std::error_code& ec) noexcept
      : options_(options), chunk_pool_(options.cached_chunks) {
    ec = open();
  }

  Reactor(const Reactor&) = delete;
  Reactor& operator=(const Reactor&) = delete;

  // Aborts every connection still open (each gets on_close with operation_canceled), then closes
  // the epoll set. Acceptors and watchers must be destroyed before their reactor.
  ~Reactor() {
    // on_close callbacks could adopt new connections; a bounded number of rounds catches those.
    for (int round = 0; round < 8 && !connections_.empty(); ++round) {
      for_each_open_connection(detail::WatcherOp::kAbort);
      finalize_closed();
    }
    close_fds();
  }

  // Runs the loop until stop() is called. A stop() that happened before run() makes it return at
  // once; either way the stop request is consumed, so run() can be called again.
  void run() {
    std::error_code ec;
    run(ec);
    detail::throw_if(ec, "epoll_wait");
  }

  // As above; returns with `ec` set if epoll_wait fails with anything but EINTR.
  void run(std::error_code& ec) noexcept {
    ec.clear();
    while (!stop_requested_.exchange(false, std::memory_order_acq_rel)) {
      run_once(std::chrono::milliseconds(-1), ec);
      if (ec) return;
    }
  }

  // Waits up to `timeout` (negative: forever) for events, dispatches them, runs deferred work (the
  // ready list, accept retries, close callbacks), and returns the number of epoll events received.
  // EINTR is retried with the remaining time. Throws std::system_error ("epoll_wait") on failure.
  std::size_t run_once(std::chrono::milliseconds timeout = std::chrono::milliseconds(-1)) {
    std::error_code ec;
    const std::size_t n = run_once(timeout, ec);
    detail::throw_if(ec, "epoll_wait");
    return n;
  }

  std::size_t run_once(std::chrono::milliseconds timeout, std::error_code& ec) noexcept {
    ec.clear();
    ++iterations_;
    const int n = wait(wait_timeout(timeout), ec);
    if (ec) return 0;
    dispatch(n);
    if (n == static_cast<int>(events_.size()) && n < options_.max_events) grow_events();
    run_ready();
    finalize_closed();
    if (!fd_waiters_.empty() && (fds_freed_ || fd_waiters_due())) {
      run_fd_waiters();
      finalize_closed();
    }
    return static_cast<std::size_t>(n);
  }

  // Makes run() return after the current batch, or run_once() return early. Safe from any thread
  // and from signal handlers (an atomic store and an eventfd write).
  void stop() noexcept {
    stop_requested_.store(true, std::memory_order_release);
    const std::uint64_t one = 1;
    // The eventfd counter cannot overflow in practice; EAGAIN would mean a wakeup is pending anyway.
    [[maybe_unused]] const ssize_t n = Sys::write(wakeup_.fd, &one, sizeof one);
  }

  // Whether a stop() is pending (not yet consumed by run()).
  bool stop_requested() const noexcept { return stop_requested_.load(std::memory_order_acquire); }

  // Connections currently owned by this reactor (open, or closed and awaiting on_close).
  std::size_t connection_count() const noexcept { return connection_count_; }

  // Number of run_once() iterations so far (each is one epoll_wait).
  std::uint64_t loop_iterations() const noexcept { return iterations_; }

  // Asks every connection to close gracefully (flush pending output, then close). Connections
  // then leave one by one as their output drains; connection_count() reaches 0 when all are gone.
  void close_all() noexcept { for_each_open_connection(detail::WatcherOp::kClose); }

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
    if (watcher.registered) {
      epoll_event event{};
      Sys::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, watcher.fd, &event);
      watcher.registered = false;
      watcher.interest = 0;
    }
    forget(watcher);
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
  template <class Handler, class R>
  friend class Connection;
  template <class Handler, class R>
  friend class Acceptor;

  using ConnectionList = detail::IntrusiveList<detail::OwnedWatcher, detail::AllConnectionsTag>;
  using ReadyList = detail::IntrusiveList<detail::OwnedWatcher, detail::ReadyTag>;
  using FdWaiterList = detail::IntrusiveList<detail::FdWaiter, detail::FdWaitTag>;

  std::error_code open() noexcept {
    options_.initial_events = std::clamp(options_.initial_events, 1, 1 << 20);
    options_.max_events = std::max(options_.max_events, options_.initial_events);
    options_.read_buffer_size = std::max<std::size_t>(options_.read_buffer_size, 1024);
    options_.max_reads_per_wakeup = std::max(options_.max_reads_per_wakeup, 1);
    epoll_fd_ = Sys::epoll_create1(EPOLL_CLOEXEC);
    if (epoll_fd_ < 0) return detail::last_errno_code();
    wakeup_.fd = Sys::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wakeup_.fd < 0) return detail::last_errno_code();
    if (auto ec = add(wakeup_, EPOLLIN)) return ec;
    read_buffer_.reset(new (std::nothrow) char[options_.read_buffer_size]);
    if (!read_buffer_) return std::make_error_code(std::errc::not_enough_memory);
    try {
      events_.resize(static_cast<std::size_t>(options_.initial_events));
    } catch (const std::bad_alloc&) {
      return std::make_error_code(std::errc::not_enough_memory);
    }
    return {};
  }

  void close_fds() noexcept {
    if (wakeup_.fd >= 0) Sys::close(std::exchange(wakeup_.fd, -1));
    if (epoll_fd_ >= 0) Sys::close(std::exchange(epoll_fd_, -1));
  }

  // Applies `op` to every connection that is still open; connections may close (or open) others
  // meanwhile.
  void for_each_open_connection(detail::WatcherOp op) noexcept {
    ConnectionList pending;
    pending.splice_back(connections_);
    for (auto* node = pending.pop_front(); node != nullptr; node = pending.pop_front()) {
      connections_.push_back(*node);
      if (node->fd >= 0) node->function(*node, op, 0);
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

  int wait_timeout(std::chrono::milliseconds timeout) noexcept {
    if (!ready_.empty() || closed_head_ != nullptr || stop_requested()) return 0;
    auto ms = timeout.count() < 0 ? std::chrono::milliseconds::max() : timeout;
    if (!fd_waiters_.empty()) {
      auto due = Clock::time_point::max();
      fd_waiters_.for_each([&](const detail::FdWaiter& w) { due = std::min(due, w.due); });
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(due - Clock::now());
      ms = std::clamp(left, std::chrono::milliseconds(0), ms);
    }
    if (ms == std::chrono::milliseconds::max()) return -1;
    return static_cast<int>(std::min<std::int64_t>(ms.count(), 1 << 30));
  }

  int wait(int timeout_ms, std::error_code& ec) noexcept {
    Clock::time_point deadline{};
    if (timeout_ms > 0) deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      const int n = Sys::epoll_wait(epoll_fd_, events_.data(), static_cast<int>(events_.size()),
                                    timeout_ms);
      if (n >= 0) return n;
      if (errno != EINTR) {
        ec = detail::last_errno_code();
        return 0;
      }
      if (timeout_ms > 0) {
        const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
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
      if (watcher == &wakeup_) {
        std::uint64_t count;
        [[maybe_unused]] const ssize_t r = Sys::read(wakeup_.fd, &count, sizeof count);
        continue;
      }
      // Interest may have changed since the kernel queued this event (another handler paused
      // this connection, say): deliver only what the watcher still asks for.
      const std::uint32_t events = event.events & (watcher->interest | EPOLLERR | EPOLLHUP);
      if (events != 0) watcher->function(*watcher, detail::WatcherOp::kEvent, events);
    }
    batch_index_ = -1;
    batch_size_ = 0;
  }

  void grow_events() noexcept {
    try {
      events_.resize(std::min(events_.size() * 2, static_cast<std::size_t>(options_.max_events)));
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
      if (node->fd >= 0) node->function(*node, detail::WatcherOp::kResume, 0);
    }
  }

  bool fd_waiters_due() noexcept {
    const auto now = Clock::now();
    bool any = false;
    fd_waiters_.for_each([&](const detail::FdWaiter& w) { any = any || w.due <= now; });
    return any;
  }

  // Resumes every fd waiter when fds were freed since the last call, else those whose time has
  // come. A resumed waiter that is still short of fds queues itself again.
  void run_fd_waiters() noexcept {
    const auto now = Clock::now();
    const bool all = std::exchange(fds_freed_, false);
    FdWaiterList pending;
    pending.splice_back(fd_waiters_);
    for (auto* waiter = pending.pop_front(); waiter != nullptr; waiter = pending.pop_front()) {
      if (all || waiter->due <= now) {
        waiter->watcher->function(*waiter->watcher, detail::WatcherOp::kResume, 0);
      } else {
        fd_waiters_.push_back(*waiter);
      }
    }
  }

  // Called by an acceptor out of fds: resume it at `due` or when a connection closes.
  void wait_for_fds(detail::FdWaiter& waiter, Clock::time_point due) noexcept {
    waiter.unlink();
    waiter.due = due;
    fd_waiters_.push_back(waiter);
  }

  // Connection bookkeeping, used by Connection.
  void link_connection(detail::OwnedWatcher& node) noexcept {
    connections_.push_back(node);
    ++connection_count_;
  }

  void schedule_ready(detail::OwnedWatcher& node) noexcept {
    if (!static_cast<detail::ListHook<detail::ReadyTag>&>(node).is_linked()) ready_.push_back(node);
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
  }

  // Runs on_close for every connection closed so far, in closing order, and frees it. Callbacks
  // may close further connections; they are finalized in the same pass.
  void finalize_closed() noexcept {
    while (closed_head_ != nullptr) {
      detail::OwnedWatcher* node = closed_head_;
      closed_head_ = node->next_closed;
      if (closed_head_ == nullptr) closed_tail_ = nullptr;
      static_cast<detail::ListHook<detail::AllConnectionsTag>&>(*node).unlink();
      --connection_count_;
      node->function(*node, detail::WatcherOp::kFinalize, 0);
    }
  }

  char* read_buffer() noexcept { return read_buffer_.get(); }
  std::size_t read_buffer_size() const noexcept { return options_.read_buffer_size; }
  int max_reads_per_wakeup() const noexcept { return options_.max_reads_per_wakeup; }
  ChunkPool& chunk_pool() noexcept { return chunk_pool_; }

  static void ignore_event(detail::Watcher&, detail::WatcherOp, std::uint32_t) noexcept {}

  ReactorOptions options_;
  int epoll_fd_ = -1;
  detail::Watcher wakeup_{&ignore_event};
  std::atomic<bool> stop_requested_{false};
  std::vector<epoll_event> events_;
  int batch_index_ = -1;
  int batch_size_ = 0;
  std::unique_ptr<char[]> read_buffer_;
  ChunkPool chunk_pool_;
  ConnectionList connections_;
  std::size_t connection_count_ = 0;
  ReadyList ready_;
  detail::OwnedWatcher* closed_head_ = nullptr;
  detail::OwnedWatcher* closed_tail_ = nullptr;
  bool fds_freed_ = false;
  FdWaiterList fd_waiters_;
  std::uint64_t iterations_ = 0;
};

}  // namespace reactor
