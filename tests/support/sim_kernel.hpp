// Test-only (not part of reactor): a simulated kernel and clock, and SimSyscalls, the syscall
// policy that runs the library against it: `reactor::Reactor<Trigger, sim::SimSyscalls>`.
// Everything is in memory and single-threaded, so a run is a pure function of what the test does:
// the same seed gives the same run, bit for bit (Kernel::trace_hash() says so), and time is
// virtual, advancing only when the loop would block, straight to the next timer deadline or world
// action.
//
// The world: TCP stream sockets (AF_INET, AF_INET6) whose two ends each hold a bounded receive
// queue, with FIN, RST and the errors Linux reports for them; listening sockets with an accept
// queue and backlog; an fd table that hands out the lowest free number; eventfd, timerfd (on the
// virtual clock), signalfd; and epoll with Linux's level/edge rules. Peers outside the process are
// "remote ends" the test drives through Kernel (connect, send, recv, shutdown, close, reset); they
// hold no fd. Faults: a chooser the test installs can fail any call with any errno or cut a
// transfer short (an EINTR or EINPROGRESS given to connect() starts the connect first, as the
// kernel does: the attempt goes on without the caller).
//
// Why tests/support and not a public reactor/testing/ header: the model is shaped by what the
// library calls today and by what the scenario fuzzer checks, and it will change with every
// feature that adds scenarios (multi-core, connector, TLS). A public header would freeze that as
// API before it has met a user; promoting it is left to the API-reference work.
//
// Knowingly different from Linux (docs/reliability.md has the list):
//   - each end has a send queue and a receive queue of `stream_capacity` bytes each (counted in
//     payload bytes, not in skb truesize as Linux counts); nothing is in flight or unacknowledged:
//     bytes move from a send queue to the other end's receive queue the moment it has room (as on
//     loopback, minus the ACK clock), and EPOLLOUT is reported while the send queue is at most 2/3
//     full (tcp_poll's sk_stream_min_wspace rule); no Nagle, no delayed ACK, no window scaling;
//   - a SYN that finds the accept queue full waits, and is queued as soon as accept() makes room
//     (Linux retransmits it after 1 s, 3 s, ...), and a connecting socket of the process is
//     writable from then on; a listener that closes refuses the SYNs waiting for it, unless it was
//     one of a SO_REUSEPORT group, whose other members then get them (Linux: the retransmitted SYN
//     is hashed over what is left of the group). As on Linux, a connecting socket closed while its
//     SYN waits is forgotten: nothing reaches the listener later (tcp_close in SYN_SENT sends
//     nothing and stops the retransmissions);
//   - SO_REUSEPORT: listeners bound to one port with it form a group in listen() order, and each
//     SYN goes to the member that reciprocal_scale(hash, members) picks, as reuseport_select_sock
//     does, but the hash is a fixed mix of the two ports (Linux: a jhash of addresses and ports
//     keyed at boot, so which member gets a connection differs from run to run). A member that
//     closes leaves the group as Linux's does (the last member takes its slot) and resets the
//     connections in its accept queue: they are not moved to another member
//     (net.ipv4.tcp_migrate_req=0, the default). There are no half-open connections here to be
//     reset with them;
//   - no AF_UNIX, no UDP, no dup()/fork(): closing an fd closes its file, and epoll forgets it;
//   - data reaching an end whose owner closed it is answered by an RST at once (on loopback the
//     RST comes back within the same send); the sender then reports EPIPE if the closed end's FIN
//     had arrived, else ECONNRESET (tcp_reset);
//   - sigprocmask changes nothing; signals reach signalfds only through Kernel::raise_signal();
//   - EPOLLEXCLUSIVE as Linux's do_epoll_ctl checks it: EPOLL_CTL_ADD only (a MOD that asks for
//     it, or a MOD of an item added with it, fails with EINVAL), beside EPOLLIN, EPOLLOUT,
//     EPOLLERR, EPOLLHUP, EPOLLET and EPOLLWAKEUP only, never for an epoll fd (EINVAL). Its
//     wakeup reaches the epoll sets watching the file in the order they added it (a DEL and ADD
//     moves a set to the back) up to and including the first set that a thread waits on
//     (ep_poll_callback, __wake_up_common): a waiter here is the epoll_wait that blocks now, or,
//     during block_all(), every set whose last epoll_wait found nothing. With no waiter every
//     set gets the readiness, as on Linux when no thread waits. Level-triggered items stay on the
//     ready lists they reached;
//   - EPOLLWAKEUP and nested epoll sets are accepted and ignored;
//   - SIOCOUTQ counts the send queue and an undelivered FIN: nothing is unacknowledged here, while
//     Linux counts sent bytes until their ACK and our FIN until the peer's (delayed) ACK of it;
//   - signals, eventfd writes and timerfd expiries are not progress to the spin detector: a post
//     or timer that keeps waking the loop at one virtual instant is reported as a spin.
#pragma once

#include <linux/sockios.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/uio.h>

#include <reactor/reactor.hpp>
#include <reactor/syscalls.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace sim {

using Clock = std::chrono::steady_clock;
using TimePoint = Clock::time_point;
using std::chrono::milliseconds;

// The calls a fault chooser sees.
enum class Op : std::uint8_t {
  kEpollWait,
  kEpollCtl,
  kRead,
  kWrite,
  kSend,
  kSendmsg,
  kAccept4,
  kShutdown,
  kClose,
  kSocket,
  kEventfd,
  kTimerfdCreate,
  kTimerfdSettime,
  kSignalfd,
  kSetsockopt,
  kGetsockopt,
  kConnect,
  kFcntl,
  kOther,
};

// What a call does: fail with `error` (errno), or run with transfers cut to `limit` bytes
// (epoll_wait: events). A failed close still closes, as on Linux.
struct Fault {
  int error = 0;
  std::size_t limit = static_cast<std::size_t>(-1);
};

// A remote peer: an index the Kernel hands out.
using PeerId = std::size_t;

class Kernel {
  friend struct SimSyscalls;  // traces each call (traced, note)

 public:
  // Installs itself as this thread's kernel (one at a time).
  explicit Kernel(std::size_t stream_capacity = 64 * 1024) : capacity_(stream_capacity) {
    if (current_ != nullptr) die("a sim::Kernel is already installed on this thread");
    current_ = this;
    table_.resize(3);  // 0, 1, 2: stdio, never handed out
  }
  ~Kernel() { current_ = nullptr; }
  Kernel(const Kernel&) = delete;
  Kernel& operator=(const Kernel&) = delete;

  static Kernel& current() {
    if (current_ == nullptr) {
      die("SimSyscalls used on a thread with no sim::Kernel installed (the simulation is "
          "single-threaded: stand for other threads with Kernel::at or Kernel::after)");
    }
    return *current_;
  }

  // --- configuration ------------------------------------------------------------------------

  // Calls fail with EMFILE once this many fds are open (stdio's three included).
  void set_fd_limit(std::size_t limit) noexcept { fd_limit_ = limit; }
  void set_stream_capacity(std::size_t bytes) noexcept { capacity_ = bytes; }
  // Decides each call's fault; none installed: every call behaves.
  void set_faults(std::function<Fault(Op, int fd)> chooser) { faults_ = std::move(chooser); }
  // Called when the simulation finds the library spinning or waiting forever; it must not return
  // (the default prints the recent calls and aborts).
  void set_failure_handler(std::function<void(const std::string&)> handler) {
    on_failure_ = std::move(handler);
  }
  // epoll_wait calls at one virtual instant with nothing moving in between that count as a spin.
  void set_spin_limit(std::size_t calls) noexcept { spin_limit_ = calls; }
  // Prints every call to stderr (also with REACTOR_SIM_TRACE=1 in the environment).
  void set_tracing(bool on) noexcept { tracing_ = on; }

  // --- the clock ------------------------------------------------------------------------------

  TimePoint now() const noexcept { return now_; }
  // Moves the clock forward to `when` (never back), expiring timerfds and running world actions.
  void advance_to(TimePoint when) {
    if (when < now_) return;
    while (true) {
      const TimePoint next = std::min(next_timerfd_due(), next_action_due());
      if (next > when) break;
      set_now(std::max(next, now_));
      expire_timerfds();
      run_due_actions();
    }
    set_now(when);
    expire_timerfds();
  }
  void advance(Clock::duration by) { advance_to(now_ + by); }

  // A world action: `action` runs at virtual time `when`, from inside the epoll_wait that is
  // blocked then (or from advance_to), as if on another thread: the library's "am I on the loop
  // thread?" says no while it runs, so post(), stop() and handle sends behave as from outside.
  void at(TimePoint when, std::function<void()> action) {
    actions_.emplace(std::make_pair(std::max(when, now_), action_serial_++), std::move(action));
  }
  void after(Clock::duration delay, std::function<void()> action) {
    at(now_ + delay, std::move(action));
  }
  std::size_t pending_actions() const noexcept { return actions_.size(); }

  // --- remote peers ---------------------------------------------------------------------------

  // Connects a remote peer to a listening socket bound to `port` (family AF_INET or AF_INET6).
  // Returns the peer, or nothing with errno ECONNREFUSED when nothing listens there. A full accept
  // queue leaves the peer waiting for room (peer_established() says when it is in).
  std::optional<PeerId> connect(std::uint16_t port, int family = AF_INET) {
    File* listener = find_listener(port, family, next_port_);  // the port this peer gets
    if (listener == nullptr) {
      errno = ECONNREFUSED;
      trace("peer_connect", port, -1, ECONNREFUSED);
      return std::nullopt;
    }
    const PeerId id = new_stream(family);
    Stream& s = *streams_[id];
    s.end[kRemote].port = next_port_++;
    s.end[kLocal].port = port;
    route_syn(*listener, id);
    progress();
    trace("peer_connect", port, static_cast<long>(id), 0);
    return id;
  }

  // A connected pair: returns {fd, peer}, the fd an established non-blocking socket (as
  // socketpair() gives, to adopt()). -1 with errno EMFILE when the table is full.
  std::pair<int, PeerId> open_connected(int family = AF_INET) {
    const int fd = allocate_fd();
    if (fd < 0) return {-1, 0};
    const PeerId id = new_stream(family);
    Stream& s = *streams_[id];
    s.end[kRemote].port = next_port_++;
    s.end[kLocal].port = next_port_++;
    s.established = true;
    File& f = install(fd, FileKind::kSocket);
    f.domain = family;
    f.nonblock = true;
    f.stream = id;
    s.end[kLocal].fd = fd;
    progress();
    trace("open_connected", fd, static_cast<long>(id), 0);
    return {fd, id};
  }

  // The peer's connection was accepted (or opened) by the process: it has an fd there.
  bool peer_accepted(PeerId p) const { return streams_.at(p)->end[kLocal].fd >= 0; }
  // The fd the process holds for this peer's connection, or -1.
  int peer_server_fd(PeerId p) const { return streams_.at(p)->end[kLocal].fd; }
  bool peer_established(PeerId p) const { return !streams_.at(p)->syn_waiting; }
  std::uint16_t peer_port(PeerId p) const { return streams_.at(p)->end[kRemote].port; }

  // send() from the peer: bytes accepted, or -1 with errno (EAGAIN: the queue is full or the
  // connection is not established yet; EPIPE after its own shutdown or close; ECONNRESET once
  // after an RST).
  ssize_t peer_send(PeerId p, std::string_view bytes,
                    std::size_t limit = static_cast<std::size_t>(-1)) {
    Stream& s = *streams_.at(p);
    if (s.syn_waiting) return fail_errno(EAGAIN);
    const ssize_t n = end_send(s, kRemote, bytes.data(), bytes.size(), limit);
    if (n > 0) trace_bytes(bytes.data(), static_cast<std::size_t>(n));
    trace("peer_send", static_cast<long>(p), static_cast<long>(bytes.size()), n);
    return n;
  }
  // recv() by the peer into `out` (appended): bytes read, 0 at EOF, or -1 with errno (EAGAIN,
  // ECONNRESET once after an RST).
  ssize_t peer_recv(PeerId p, std::string& out, std::size_t max = static_cast<std::size_t>(-1)) {
    Stream& s = *streams_.at(p);
    if (s.syn_waiting) return fail_errno(EAGAIN);
    if (max == 0) return 0;
    const std::size_t before = out.size();
    const std::size_t want = std::min(max, available(s.end[kRemote]));
    out.resize(before + want);
    char probe = 0;  // nothing queued: the call only reports EOF, an error or EAGAIN
    const ssize_t n =
        end_recv(s, kRemote, want == 0 ? &probe : out.data() + before, want == 0 ? 1 : want);
    out.resize(before + (want == 0 ? 0 : static_cast<std::size_t>(std::max<ssize_t>(n, 0))));
    if (n > 0) trace_bytes(out.data() + before, static_cast<std::size_t>(n));
    trace("peer_recv", static_cast<long>(p), static_cast<long>(max), n);
    return n;
  }
  // Bytes waiting for the peer to read.
  std::size_t peer_readable(PeerId p) const { return available(streams_.at(p)->end[kRemote]); }
  // shutdown(SHUT_WR) by the peer: the process reads EOF after what was sent.
  int peer_shutdown(PeerId p) {
    Stream& s = *streams_.at(p);
    const int r = end_shutdown(s, kRemote);
    trace("peer_shutdown", static_cast<long>(p), 0, r);
    return r;
  }
  // close() by the peer: FIN, or RST when it left bytes unread (as Linux does).
  void peer_close(PeerId p) {
    Stream& s = *streams_.at(p);
    trace("peer_close", static_cast<long>(p), 0, 0);
    if (s.syn_waiting) return drop_syn(p);
    end_close(s, kRemote);
  }
  // close() with SO_LINGER {1, 0}: RST, unread bytes on both sides lost.
  void peer_reset(PeerId p) {
    Stream& s = *streams_.at(p);
    trace("peer_reset", static_cast<long>(p), 0, 0);
    if (s.syn_waiting) return drop_syn(p);
    s.end[kRemote].linger_zero = true;
    end_close(s, kRemote);
  }
  // The last virtual time the process read (any result but an error) or wrote (any bytes) on
  // this peer's connection.
  TimePoint process_io_at(PeerId p) const { return streams_.at(p)->end[kLocal].io_at; }
  bool peer_closed(PeerId p) const { return streams_.at(p)->end[kRemote].closed; }
  // The peer's end was reset by the process (an RST arrived).
  bool peer_was_reset(PeerId p) const { return streams_.at(p)->end[kRemote].got_reset; }

  // Delivers `signo` to every signalfd whose mask holds it.
  void raise_signal(int signo) {
    for (auto& file : table_) {
      if (file && file->kind == FileKind::kSignalfd && sigismember(&file->mask, signo) == 1) {
        sigaddset(&file->pending, signo);
        wake(*file, EPOLLIN);
      }
    }
    progress();
  }

  // --- observation ----------------------------------------------------------------------------

  // Open fds, stdio not counted.
  std::size_t open_fds() const {
    return static_cast<std::size_t>(std::count_if(table_.begin() + 3, table_.end(),
                                                  [](const auto& f) { return f != nullptr; }));
  }
  bool fd_open(int fd) const {
    return fd >= 0 && static_cast<std::size_t>(fd) < table_.size() && table_[fd] != nullptr;
  }
  // A connect() the process made: when, on which fd, to which family and port, and how it ended
  // (0, or its errno: EINPROGRESS for a non-blocking connect that goes on).
  struct ConnectCall {
    TimePoint at;
    int fd;
    int family;
    std::uint16_t port;
    int error;
  };
  // Every connect() so far, oldest first.
  const std::vector<ConnectCall>& connect_calls() const noexcept { return connect_calls_; }
  // An epoll_ctl() or close() the process made: which (Op::kEpollCtl or Op::kClose), when, on
  // which fd, epoll_ctl's op (EPOLL_CTL_ADD, _MOD or _DEL; 0 for a close), and how it ended (0,
  // or its errno; a close that failed closed all the same).
  struct FdCall {
    TimePoint at;
    Op op;
    int fd;
    int epoll_op;
    int error;
  };
  // From now on, logs each epoll_ctl() and close() in fd_calls(), in call order: for tests that
  // check an order the fd table alone cannot show (a socket out of the epoll set before its
  // close). Off by default (a long run makes many).
  void record_fd_calls(bool on = true) noexcept { recording_fd_calls_ = on; }
  const std::vector<FdCall>& fd_calls() const noexcept { return fd_calls_; }
  // SYNs waiting for room in the accept queue of the listeners bound to `port` in `family`.
  std::size_t waiting_syns(std::uint16_t port, int family = AF_INET) const {
    std::size_t n = 0;
    for (const auto& f : table_) {
      if (f && f->kind == FileKind::kSocket && f->listening && f->port == port &&
          f->domain == family) {
        n += f->syn_queue.size();
      }
    }
    return n;
  }
  // Connections in the accept queues of the listeners bound to `port` in `family`.
  std::size_t queued_connections(std::uint16_t port, int family = AF_INET) const {
    std::size_t n = 0;
    for (const auto& f : table_) {
      if (f && f->kind == FileKind::kSocket && f->listening && f->port == port &&
          f->domain == family) {
        n += f->accept_queue.size();
      }
    }
    return n;
  }

  // A hash of every call, its arguments and results, and the clock: equal for equal runs.
  std::uint64_t trace_hash() const noexcept { return hash_; }
  std::uint64_t calls() const noexcept { return calls_; }
  // The last calls, oldest first, for a failure report.
  std::string recent_calls() const {
    std::string out;
    for (const std::string& line : recent_) out += line + '\n';
    return out;
  }
  // Tells the spin detector that the test itself did something (a step of a driver).
  void external_step() noexcept { progress(); }
  // How often something the spin detector counts as progress has happened (a byte moved, an fd
  // opened or closed, the clock moved, a world action or external step ran). A driver of several
  // loops compares it across a round of their run_once(0) calls to tell whether the round did
  // anything.
  std::uint64_t progress_marks() const noexcept { return progress_marks_; }

  // For several loops driven in turn on this thread, standing for a reactor pool's threads: none
  // of them had anything to do in their last run_once(0), so each would now block in epoll_wait.
  // Moves the clock to the next timerfd expiry or world action, no later than `limit`, and runs
  // what is due then, with every epoll set whose last epoll_wait returned nothing taken as having
  // a waiter (an EPOLLEXCLUSIVE wakeup stops at the first of them). Reports a hang, like
  // epoll_wait(-1), when nothing is due ever and `limit` is max().
  void block_all(TimePoint limit = TimePoint::max()) {
    const TimePoint next = std::min({limit, next_timerfd_due(), next_action_due()});
    if (next == TimePoint::max()) {
      failure(
          "every loop would block forever: nothing is ready, no timerfd is armed and no world "
          "action is pending (a lost timer, or a driver that forgot its end)");
    }
    for (auto& f : table_) {
      if (f && f->kind == FileKind::kEpoll) f->waiting = f->idle;
    }
    trace("block_all", 0, 0, 0);
    advance_to(next);
    for (auto& f : table_) {
      if (f && f->kind == FileKind::kEpoll) f->waiting = false;
    }
  }

  // --- the syscalls (SimSyscalls forwards here) ---------------------------------------------

  int sys_epoll_create1(int /*flags*/) {
    if (const int e = fault(Op::kOther, -1).error) return fail_errno(e);
    const int fd = allocate_fd();
    if (fd < 0) return -1;
    install(fd, FileKind::kEpoll);
    return fd;
  }

  int sys_epoll_ctl(int epfd, int op, int fd, epoll_event* event) {
    const Fault f = fault(Op::kEpollCtl, fd);
    int result = 0;
    if (f.error != 0) {
      result = fail_errno(f.error);
    } else if (!fd_open(epfd) || !fd_open(fd)) {
      result = fail_errno(EBADF);
    } else if (!is(epfd, FileKind::kEpoll)) {
      result = fail_errno(EINVAL);
    } else if (epfd == fd) {
      result = fail_errno(EINVAL);
    } else {
      result = epoll_control(*table_[epfd], op, *table_[fd], event);
    }
    note(event != nullptr ? event->events : 0);
    if (recording_fd_calls_) {
      fd_calls_.push_back({now_, Op::kEpollCtl, fd, op, result < 0 ? errno : 0});
    }
    return result;
  }

  int sys_epoll_wait(int epfd, epoll_event* events, int max_events, int timeout_ms) {
    const Fault f = fault(Op::kEpollWait, epfd);
    if (f.error != 0) {
      return fail_errno(f.error);
    }
    if (!fd_open(epfd)) return fail_errno(EBADF);
    if (!is(epfd, FileKind::kEpoll) || max_events <= 0) return fail_errno(EINVAL);
    check_spin();
    const int max =
        static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(max_events), f.limit));
    const TimePoint deadline = timeout_ms < 0 ? TimePoint::max() : now_ + milliseconds(timeout_ms);
    int n = 0;
    while (true) {
      n = collect(*table_[epfd], events, std::max(max, 1));
      if (n > 0 || now_ >= deadline) break;
      const TimePoint next = std::min({deadline, next_timerfd_due(), next_action_due()});
      if (next == TimePoint::max()) {
        failure(
            "epoll_wait(-1) blocks forever: nothing is ready, no timerfd is armed and no "
            "world action is pending (a lost timer, or a test that forgot to stop the loop)");
      }
      table_[epfd]->waiting = true;  // this thread waits in it now (EPOLLEXCLUSIVE wakeups)
      advance_to(next);
      if (!is(epfd, FileKind::kEpoll)) return fail_errno(EBADF);  // a world action closed it
      table_[epfd]->waiting = false;
    }
    table_[epfd]->idle = n == 0;
    std::uint32_t mix = 0;
    for (int i = 0; i < n; ++i) mix = mix * 31 + events[i].events;
    note(mix);
    return n;
  }

  int sys_eventfd(unsigned initial, int flags) {
    if (const int e = fault(Op::kEventfd, -1).error) return fail_errno(e);
    const int fd = allocate_fd();
    if (fd < 0) return -1;
    File& f = install(fd, FileKind::kEventfd);
    f.counter = initial;
    f.nonblock = (flags & EFD_NONBLOCK) != 0;
    return fd;
  }

  int sys_timerfd_create(int /*clock*/, int flags) {
    if (const int e = fault(Op::kTimerfdCreate, -1).error) return fail_errno(e);
    const int fd = allocate_fd();
    if (fd < 0) return -1;
    File& f = install(fd, FileKind::kTimerfd);
    f.nonblock = (flags & TFD_NONBLOCK) != 0;
    return fd;
  }

  int sys_timerfd_settime(int fd, int flags, const itimerspec* value, itimerspec* old) {
    if (const int e = fault(Op::kTimerfdSettime, fd).error) return fail_errno(e);
    if (!fd_open(fd)) return fail_errno(EBADF);
    if (!is(fd, FileKind::kTimerfd)) return fail_errno(EINVAL);
    const auto valid = [](const timespec& t) {
      return t.tv_sec >= 0 && t.tv_nsec >= 0 && t.tv_nsec < 1'000'000'000;
    };
    if ((flags & ~(TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET)) != 0 || !valid(value->it_value) ||
        !valid(value->it_interval)) {
      return fail_errno(EINVAL);  // timespec64_valid
    }
    File& f = *table_[fd];
    if (old != nullptr) *old = timer_setting(f);
    const auto to_duration = [](const timespec& t) {
      return std::chrono::seconds(t.tv_sec) + std::chrono::nanoseconds(t.tv_nsec);
    };
    f.ticks = 0;
    f.interval = std::chrono::duration_cast<Clock::duration>(to_duration(value->it_interval));
    if (value->it_value.tv_sec == 0 && value->it_value.tv_nsec == 0) {
      f.due = TimePoint::max();
    } else if ((flags & TFD_TIMER_ABSTIME) != 0) {
      f.due = TimePoint(std::chrono::duration_cast<Clock::duration>(to_duration(value->it_value)));
    } else {
      f.due = now_ + std::chrono::duration_cast<Clock::duration>(to_duration(value->it_value));
    }
    note(static_cast<std::uint64_t>(f.due.time_since_epoch().count()));
    expire_timerfds();
    return 0;
  }

  int sys_signalfd(int fd, const sigset_t* mask, int flags) {
    if (const int e = fault(Op::kSignalfd, fd).error) return fail_errno(e);
    if (fd != -1) {
      if (!is(fd, FileKind::kSignalfd)) return fail_errno(EINVAL);
      table_[fd]->mask = *mask;
      return fd;
    }
    const int new_fd = allocate_fd();
    if (new_fd < 0) return -1;
    File& f = install(new_fd, FileKind::kSignalfd);
    f.mask = *mask;
    sigemptyset(&f.pending);
    f.nonblock = (flags & SFD_NONBLOCK) != 0;
    return new_fd;
  }

  ssize_t sys_read(int fd, void* buffer, std::size_t size) {
    const Fault f = fault(Op::kRead, fd);
    ssize_t result;
    if (f.error != 0) {
      result = fail_errno(f.error);
    } else if (!fd_open(fd)) {
      result = fail_errno(EBADF);
    } else {
      result = read_file(*table_[fd], buffer, std::min(size, f.limit));
    }
    if (result > 0) trace_bytes(buffer, static_cast<std::size_t>(result));
    return result;
  }

  ssize_t sys_write(int fd, const void* buffer, std::size_t size) {
    const Fault f = fault(Op::kWrite, fd);
    ssize_t result;
    if (f.error != 0) {
      result = fail_errno(f.error);
    } else if (!fd_open(fd)) {
      result = fail_errno(EBADF);
    } else if (table_[fd]->kind == FileKind::kEventfd) {
      result = write_eventfd(*table_[fd], buffer, size);
    } else if (table_[fd]->kind == FileKind::kSocket) {
      result =
          socket_send(*table_[fd], buffer, std::min(size, f.limit), static_cast<std::size_t>(-1));
    } else {
      result = fail_errno(EINVAL);
    }
    if (result > 0) trace_bytes(buffer, static_cast<std::size_t>(result));
    return result;
  }

  ssize_t sys_send(int fd, const void* buffer, std::size_t size, int /*flags*/) {
    return send_checked(fault(Op::kSend, fd), fd, buffer, size);
  }

  ssize_t sys_sendmsg(int fd, const msghdr* message, int /*flags*/) {
    const Fault f = fault(Op::kSendmsg, fd);
    std::string gathered;
    for (std::size_t i = 0; i < message->msg_iovlen; ++i) {
      gathered.append(static_cast<const char*>(message->msg_iov[i].iov_base),
                      message->msg_iov[i].iov_len);
    }
    return send_checked(f, fd, gathered.data(), gathered.size());
  }

  int sys_socket(int domain, int type, int /*protocol*/) {
    if (const int e = fault(Op::kSocket, -1).error) return fail_errno(e);
    if (domain != AF_INET && domain != AF_INET6) return fail_errno(EAFNOSUPPORT);
    if ((type & 0xf) != SOCK_STREAM) return fail_errno(EPROTONOSUPPORT);
    const int fd = allocate_fd();
    if (fd < 0) return -1;
    File& f = install(fd, FileKind::kSocket);
    f.domain = domain;
    f.nonblock = (type & SOCK_NONBLOCK) != 0;
    return fd;
  }

  int sys_bind(int fd, const sockaddr* address, socklen_t /*length*/) {
    if (const int e = fault(Op::kOther, fd).error) return fail_errno(e);
    if (!is(fd, FileKind::kSocket)) return fail_errno(fd_open(fd) ? ENOTSOCK : EBADF);
    File& f = *table_[fd];
    if (f.bound || f.stream != kNoStream) return fail_errno(EINVAL);
    if (address->sa_family != f.domain) return fail_errno(EAFNOSUPPORT);
    std::uint16_t port = f.domain == AF_INET
                             ? ntohs(reinterpret_cast<const sockaddr_in*>(address)->sin_port)
                             : ntohs(reinterpret_cast<const sockaddr_in6*>(address)->sin6_port);
    if (port == 0) port = next_port_++;
    for (const auto& other : table_) {
      if (other && other->kind == FileKind::kSocket && other->bound && other->port == port &&
          other->domain == f.domain && !(other->reuse_port && f.reuse_port)) {
        return fail_errno(EADDRINUSE);
      }
    }
    f.bound = true;
    f.port = port;
    return 0;
  }

  int sys_listen(int fd, int backlog) {
    if (const int e = fault(Op::kOther, fd).error) return fail_errno(e);
    if (!is(fd, FileKind::kSocket)) return fail_errno(fd_open(fd) ? ENOTSOCK : EBADF);
    File& f = *table_[fd];
    if (f.stream != kNoStream) return fail_errno(EINVAL);
    if (!f.bound) {
      f.bound = true;
      f.port = next_port_++;
    }
    // inet_csk_listen_start -> inet_reuseport_add_sock: the first listen() joins the port's group.
    if (!f.listening && f.reuse_port) reuse_groups_[{f.domain, f.port}].push_back(fd);
    f.listening = true;
    f.backlog = std::clamp(backlog, 0, 4096);
    return 0;
  }

  int sys_accept4(int fd, sockaddr* address, socklen_t* length, int flags) {
    const Fault f = fault(Op::kAccept4, fd);
    int result;
    if (f.error != 0) {
      result = fail_errno(f.error);
    } else if (!is(fd, FileKind::kSocket)) {
      result = fail_errno(fd_open(fd) ? ENOTSOCK : EBADF);
    } else if (!table_[fd]->listening) {
      result = fail_errno(EINVAL);
    } else if (table_[fd]->accept_queue.empty()) {
      result = fail_errno(EAGAIN);
    } else {
      result = allocate_fd();  // EMFILE leaves the connection queued, as on Linux
      if (result >= 0) {
        File& listener = *table_[fd];
        const PeerId id = listener.accept_queue.front();
        listener.accept_queue.pop_front();
        Stream& s = *streams_[id];
        s.listener_fd = -1;
        File& socket = install(result, FileKind::kSocket);
        socket.domain = listener.domain;
        socket.nonblock = (flags & SOCK_NONBLOCK) != 0;
        socket.stream = id;
        s.end[kLocal].fd = result;
        if (address != nullptr && length != nullptr) {
          fill_address(s.domain, s.end[kRemote].port, address, length);
        }
        promote_syn(listener);
        progress();
      }
    }
    return result;
  }

  int sys_connect(int fd, const sockaddr* address, socklen_t length) {
    const int result = connect_socket(fd, address, length);
    const int error = result < 0 ? errno : 0;
    std::uint16_t port = 0;
    if (address->sa_family == AF_INET) {
      port = ntohs(reinterpret_cast<const sockaddr_in*>(address)->sin_port);
    } else if (address->sa_family == AF_INET6) {
      port = ntohs(reinterpret_cast<const sockaddr_in6*>(address)->sin6_port);
    }
    connect_calls_.push_back({now_, fd, address->sa_family, port, error});
    errno = error;
    return result;
  }

  // EINTR and EINPROGRESS mean the connection attempt goes on without the caller (connect(2)), so
  // an injected one of those starts the connect first and then reports the error, as
  // tests/support/fault_syscalls.hpp does on the real kernel; any other injected error fails the
  // call before it does anything.
  int connect_socket(int fd, const sockaddr* address, socklen_t length) {
    const int injected = fault(Op::kConnect, fd).error;
    if (injected == 0) return start_connect(fd, address, length);
    if (injected == EINTR || injected == EINPROGRESS) {
      if (start_connect(fd, address, length) != 0 && errno != EINPROGRESS) return -1;
    }
    return fail_errno(injected);
  }

  int start_connect(int fd, const sockaddr* address, socklen_t /*length*/) {
    if (!is(fd, FileKind::kSocket)) return fail_errno(fd_open(fd) ? ENOTSOCK : EBADF);
    File& f = *table_[fd];
    if (f.connect_pending) {  // a non-blocking connect: its outcome is reported once
      if (f.stream != kNoStream && streams_[f.stream]->syn_waiting) return fail_errno(EALREADY);
      f.connect_pending = false;
      if (f.stream != kNoStream) return 0;
      if (f.connect_error != 0) return fail_errno(std::exchange(f.connect_error, 0));
      f.refused = false;  // SO_ERROR took the error: this is a new attempt
    }
    if (f.stream != kNoStream) return fail_errno(EISCONN);
    const std::uint16_t port =
        address->sa_family == AF_INET
            ? ntohs(reinterpret_cast<const sockaddr_in*>(address)->sin_port)
            : ntohs(reinterpret_cast<const sockaddr_in6*>(address)->sin6_port);
    File* listener = find_listener(port, address->sa_family, next_port_);  // the port it gets
    const bool full = listener != nullptr &&
                      listener->accept_queue.size() > static_cast<std::size_t>(listener->backlog);
    if (listener == nullptr || (full && !f.nonblock)) {
      // Refused (an RST answers the SYN), or a blocking connect that would wait for room.
      const int error = listener == nullptr ? ECONNREFUSED : ETIMEDOUT;
      if (!f.nonblock) return fail_errno(error);
      f.connect_error = error;
      f.refused = true;
      f.connect_pending = true;
      wake(f, 0);
      return fail_errno(EINPROGRESS);
    }
    // Both ends in this process: the connecting socket plays the "remote" end of the stream.
    const PeerId id = new_stream(address->sa_family);
    Stream& s = *streams_[id];
    s.listener_fd = listener->fd;
    s.end[kRemote].port = next_port_++;
    s.end[kRemote].fd = fd;
    s.end[kLocal].port = port;
    f.stream = id;
    f.side = kRemote;
    if (full) {  // the SYN waits for room in the accept queue
      s.syn_waiting = true;
      listener->syn_queue.push_back(id);
    } else {
      enqueue_accept(*listener, id);
      wake(f, 0);
    }
    progress();
    if (f.nonblock) {  // established by the time anyone looks, unless the SYN waits
      f.connect_pending = true;
      return fail_errno(EINPROGRESS);
    }
    return 0;
  }

  int sys_poll(pollfd* fds, nfds_t count, int timeout_ms) {
    const TimePoint deadline = timeout_ms < 0 ? TimePoint::max() : now_ + milliseconds(timeout_ms);
    while (true) {
      int ready = 0;
      for (nfds_t i = 0; i < count; ++i) {
        fds[i].revents = 0;
        if (!fd_open(fds[i].fd)) {
          if (fds[i].fd >= 0) fds[i].revents = POLLNVAL;
        } else {
          const std::uint32_t mask = poll_mask(*table_[fds[i].fd]);
          fds[i].revents = static_cast<short>(
              mask & (static_cast<std::uint32_t>(fds[i].events) | POLLERR | POLLHUP));
        }
        if (fds[i].revents != 0) ++ready;
      }
      if (ready > 0 || now_ >= deadline) return ready;
      const TimePoint next = std::min({deadline, next_timerfd_due(), next_action_due()});
      if (next == TimePoint::max()) failure("poll(-1) blocks forever");
      advance_to(next);
    }
  }

  int sys_setsockopt(int fd, int level, int name, const void* value, socklen_t length) {
    if (const int e = fault(Op::kSetsockopt, fd).error) return fail_errno(e);
    if (!is(fd, FileKind::kSocket)) return fail_errno(fd_open(fd) ? ENOTSOCK : EBADF);
    File& f = *table_[fd];
    if (level == SOL_SOCKET && name == SO_REUSEPORT) f.reuse_port = true;
    if (level == SOL_SOCKET && name == SO_LINGER && length >= sizeof(linger)) {
      const auto* l = static_cast<const linger*>(value);
      f.linger_zero = l->l_onoff != 0 && l->l_linger == 0;
    }
    return 0;
  }

  int sys_getsockopt(int fd, int level, int name, void* value, socklen_t* length) {
    if (const int e = fault(Op::kGetsockopt, fd).error) return fail_errno(e);
    if (!is(fd, FileKind::kSocket)) return fail_errno(fd_open(fd) ? ENOTSOCK : EBADF);
    File& f = *table_[fd];
    if (level != SOL_SOCKET || *length < sizeof(int)) return fail_errno(ENOPROTOOPT);
    int out = 0;
    switch (name) {
      case SO_ERROR:
        if (f.stream != kNoStream) {
          out = std::exchange(end_of(f).error, 0);
        } else {
          out = std::exchange(f.connect_error, 0);
        }
        break;
      case SO_DOMAIN:
        out = f.domain;
        break;
      case SO_TYPE:
        out = SOCK_STREAM;
        break;
      default:
        return fail_errno(ENOPROTOOPT);
    }
    std::memcpy(value, &out, sizeof out);
    *length = sizeof out;
    return 0;
  }

  int sys_getsockname(int fd, sockaddr* address, socklen_t* length) {
    if (!is(fd, FileKind::kSocket)) return fail_errno(fd_open(fd) ? ENOTSOCK : EBADF);
    const File& f = *table_[fd];
    std::uint16_t port = f.port;
    if (f.stream != kNoStream) port = streams_[f.stream]->end[f.side].port;
    fill_address(f.domain, port, address, length);
    return 0;
  }

  int sys_getpeername(int fd, sockaddr* address, socklen_t* length) {
    if (!is(fd, FileKind::kSocket)) return fail_errno(fd_open(fd) ? ENOTSOCK : EBADF);
    const File& f = *table_[fd];
    if (f.stream == kNoStream) return fail_errno(ENOTCONN);
    const Stream& s = *streams_[f.stream];
    if (finished(s, f.side) || s.syn_waiting) return fail_errno(ENOTCONN);
    fill_address(f.domain, s.end[1 - f.side].port, address, length);
    return 0;
  }

  int sys_ioctl(int fd, unsigned long request, int* argument) {
    if (const int e = fault(Op::kOther, fd).error) return fail_errno(e);
    if (!is(fd, FileKind::kSocket)) return fail_errno(fd_open(fd) ? ENOTTY : EBADF);
    if (request != SIOCOUTQ) return fail_errno(EINVAL);
    const File& f = *table_[fd];
    // Linux counts our FIN's sequence number too until it is acknowledged (write_seq - snd_una);
    // here a FIN is acknowledged the moment it is delivered, after the send queue.
    int outq = 0;
    if (f.stream != kNoStream) {
      const Stream& s = *streams_[f.stream];
      const End& self = s.end[f.side];
      outq = static_cast<int>(unsent(self));
      if (self.fin_out && !self.reset && !s.end[1 - f.side].fin_in) ++outq;
    }
    *argument = outq;
    return 0;
  }

  int sys_fcntl(int fd, int command, int argument) {
    if (const int e = fault(Op::kFcntl, fd).error) return fail_errno(e);
    if (!fd_open(fd)) return fail_errno(EBADF);
    File& f = *table_[fd];
    switch (command) {
      case F_GETFL:
        return O_RDWR | (f.nonblock ? O_NONBLOCK : 0);
      case F_SETFL:
        f.nonblock = (argument & O_NONBLOCK) != 0;
        return 0;
      case F_GETFD:
        return FD_CLOEXEC;
      case F_SETFD:
        return 0;
      default:
        return fail_errno(EINVAL);
    }
  }

  int sys_shutdown(int fd, int how) {
    const Fault fault_result = fault(Op::kShutdown, fd);
    int result;
    if (fault_result.error != 0) {
      result = fail_errno(fault_result.error);
    } else if (!is(fd, FileKind::kSocket)) {
      result = fail_errno(fd_open(fd) ? ENOTSOCK : EBADF);
    } else if (table_[fd]->listening) {
      // inet_shutdown in LISTEN: SHUT_WR does nothing, SHUT_RD stops listening.
      result = 0;
      if (how == SHUT_RD || how == SHUT_RDWR) stop_listening(*table_[fd]);
    } else if (table_[fd]->stream == kNoStream) {
      result = fail_errno(ENOTCONN);
    } else {
      File& f = *table_[fd];
      Stream& s = *streams_[f.stream];
      result = 0;
      if (finished(s, f.side)) {
        result = fail_errno(ENOTCONN);  // TCP_CLOSE: both FINs went through
      } else if (how == SHUT_RD || how == SHUT_RDWR) {
        if (s.end[f.side].reset) {
          result = fail_errno(ENOTCONN);
        } else {
          s.end[f.side].shut_rd = true;
          wake(f, 0);
        }
      }
      if (result == 0 && (how == SHUT_WR || how == SHUT_RDWR)) result = end_shutdown(s, f.side);
    }
    return result;
  }

  int sys_close(int fd) {
    const Fault f = fault(Op::kClose, fd);
    const int error = !fd_open(fd) ? EBADF : f.error;
    if (recording_fd_calls_) fd_calls_.push_back({now_, Op::kClose, fd, 0, error});
    if (!fd_open(fd)) {
      return fail_errno(EBADF);
    }
    close_file(fd);
    progress();
    if (f.error != 0) return fail_errno(f.error);  // closed all the same
    return 0;
  }

 private:
  enum class FileKind : std::uint8_t { kSocket, kEpoll, kEventfd, kTimerfd, kSignalfd };
  static constexpr std::size_t kNoStream = static_cast<std::size_t>(-1);
  static constexpr int kRemote = 0;  // the connecting side
  static constexpr int kLocal = 1;   // the accepted side

  // One end of a TCP connection: its receive queue (`in`, at most `capacity_` bytes) and its send
  // queue (`out`, likewise): bytes move from a send queue into the other end's receive queue as
  // soon as it has room, which stands for transmission and the receive window.
  struct End {
    std::string in, out;  // from `in_offset` / `out_offset` on
    std::size_t in_offset = 0, out_offset = 0;
    bool fin_in = false;     // the other end's FIN arrived, after all its data (CLOSE_WAIT)
    bool shut_rd = false;    // shutdown(SHUT_RD)
    bool fin_out = false;    // this end shut down its sending side (FIN follows the send queue)
    bool reset = false;      // the connection is gone (an RST was sent or received)
    bool got_reset = false;  // an RST arrived from the other end
    bool closed = false;     // this end's owner closed it (an orphan until the other end is done)
    bool linger_zero = false;
    bool nospace = false;  // a writer found the send queue too full (tcp_poll's SOCK_NOSPACE)
    int error = 0;         // sk_err: reported once by read, write or SO_ERROR
    int fd = -1;           // the process's fd for this end, if it holds one
    std::uint16_t port = 0;
    TimePoint io_at{};  // the last read (any result but EAGAIN) or write through the fd
  };

  struct Stream {
    int domain = AF_INET;
    End end[2];
    bool established = true;
    bool syn_waiting = false;
    int listener_fd = -1;  // in this listener's accept (or SYN) queue
  };

  struct EpollItem {
    std::uint32_t events = 0;
    std::uint64_t data = 0;
    bool ready = false;     // on the ready list
    bool disabled = false;  // EPOLLONESHOT fired
  };

  struct File {
    FileKind kind;
    int fd = -1;
    std::vector<int> watched_by;  // epoll fds with this file in their interest list
    // sockets
    int domain = AF_INET;
    bool nonblock = false;
    bool bound = false, listening = false, reuse_port = false, linger_zero = false;
    std::uint16_t port = 0;
    int backlog = 0;
    int connect_error = 0;         // a refused non-blocking connect's error, until reported
    bool connect_pending = false;  // EINPROGRESS was returned; the next connect() reports
    bool refused = false;          // a connect failed: the socket is closed (tcp_done)
    std::deque<PeerId> accept_queue, syn_queue;
    std::size_t stream = kNoStream;
    int side = kLocal;
    // epoll
    std::map<int, EpollItem> items;
    std::deque<int> ready;
    bool waiting = false;  // a thread waits in epoll_wait on it (or is taken to, by block_all())
    bool idle = false;     // its last epoll_wait returned nothing
    // eventfd
    std::uint64_t counter = 0;
    // timerfd
    TimePoint due = TimePoint::max();
    Clock::duration interval{};
    std::uint64_t ticks = 0;
    // signalfd
    sigset_t mask{}, pending{};
  };

  // What timerfd_gettime would say: time left to the next expiry, and the interval.
  itimerspec timer_setting(const File& f) const {
    const auto to_timespec = [](Clock::duration d) {
      const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(d).count();
      return timespec{static_cast<time_t>(ns / 1'000'000'000),
                      static_cast<long>(ns % 1'000'000'000)};
    };
    itimerspec setting{};
    if (f.due != TimePoint::max())
      setting.it_value = to_timespec(std::max(f.due - now_, Clock::duration(1)));
    setting.it_interval = to_timespec(f.interval);
    return setting;
  }

  [[noreturn]] static void die(const char* message) {
    std::fprintf(stderr, "sim::Kernel: %s\n", message);
    std::abort();
  }

  void failure(const std::string& message) {
    const std::string report = message + "\nvirtual time " +
                               std::to_string(now_.time_since_epoch().count()) +
                               " ns; last calls:\n" + recent_calls();
    if (on_failure_) on_failure_(report);
    std::fprintf(stderr, "sim::Kernel: %s\n", report.c_str());
    std::abort();
  }

  static int fail_errno(int error) {
    errno = error;
    return -1;
  }

  Fault fault(Op op, int fd) {
    ++calls_;
    if (!faults_ || in_fault_) return Fault{};
    in_fault_ = true;
    const Fault f = faults_(op, fd);
    in_fault_ = false;
    return f;
  }

  // --- trace and spin detection ----------------------------------------------------------------

  // Adds `value` to the next call's trace line (and hash): what the arguments do not show.
  void note(std::uint64_t value) noexcept { note_ = note_ * 31 + value; }

  // Records a finished call: its name, two arguments, its result and errno (when it failed), and
  // what note() added. errno is left as the call set it.
  template <class Result>
  Result traced(const char* call, long a, long b, Result result) {
    const int saved = errno;
    trace(call, a, b, static_cast<long>(result),
          (result < 0 ? static_cast<std::uint64_t>(saved) << 32 : 0) ^ std::exchange(note_, 0));
    errno = saved;
    return result;
  }

  // Folds payload bytes into the trace hash (run-to-run equality covers contents, not only sizes).
  void trace_bytes(const void* data, std::size_t size) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (std::size_t i = 0; i < size; ++i) {
      hash_ ^= p[i];
      hash_ *= 0x100000001b3ULL;
    }
  }

  void trace(const char* call, long a, long b, long result, std::uint64_t extra = 0) {
    std::uint64_t h = hash_;
    const auto mix = [&h](std::uint64_t v) {
      h ^= v;
      h *= 0x100000001b3ULL;
    };
    for (const char* c = call; *c != '\0'; ++c) mix(static_cast<unsigned char>(*c));
    mix(static_cast<std::uint64_t>(a));
    mix(static_cast<std::uint64_t>(b));
    mix(static_cast<std::uint64_t>(result));
    mix(extra);
    mix(static_cast<std::uint64_t>(now_.time_since_epoch().count()));
    hash_ = h;
    if (!tracing_ && !keep_recent_) return;
    char line[160];
    std::snprintf(line, sizeof line, "%12.3f ms  %s(%ld, %ld) = %ld  [%llu]",
                  std::chrono::duration<double, std::milli>(now_ - kEpoch).count(), call, a, b,
                  result, static_cast<unsigned long long>(extra));
    if (tracing_) std::fprintf(stderr, "sim: %s\n", line);
    recent_.emplace_back(line);
    if (recent_.size() > 64) recent_.pop_front();
  }

  void progress() noexcept {
    idle_waits_ = 0;
    ++progress_marks_;
  }

  void check_spin() {
    if (now_ != spin_instant_) {
      spin_instant_ = now_;
      idle_waits_ = 0;
    }
    if (++idle_waits_ > spin_limit_) {
      failure("the loop spins: " + std::to_string(idle_waits_) +
              " epoll_wait calls at one virtual instant with no byte moved, no fd opened or "
              "closed, no time passing and nothing done from outside (posts and timers that "
              "keep waking the loop at one instant count as spinning too)");
    }
  }

  void set_now(TimePoint t) {
    if (t != now_) progress();
    now_ = t;
  }

  // --- fd table --------------------------------------------------------------------------------

  int allocate_fd() {
    if (open_fds() + 3 >= fd_limit_) return fail_errno(EMFILE);
    for (std::size_t i = 3; i < table_.size(); ++i) {
      if (table_[i] == nullptr) return static_cast<int>(i);
    }
    table_.emplace_back();
    return static_cast<int>(table_.size() - 1);
  }

  File& install(int fd, FileKind kind) {
    table_[static_cast<std::size_t>(fd)] = std::make_unique<File>();
    File& f = *table_[static_cast<std::size_t>(fd)];
    f.kind = kind;
    f.fd = fd;
    progress();
    return f;
  }

  bool is(int fd, FileKind kind) const { return fd_open(fd) && table_[fd]->kind == kind; }

  void close_file(int fd) {
    File& f = *table_[fd];
    // epoll forgets a closed file (no dup() here, so this is its last reference).
    for (const int epfd : f.watched_by) {
      if (!is(epfd, FileKind::kEpoll)) continue;
      File& ep = *table_[epfd];
      ep.items.erase(fd);
      ep.ready.erase(std::remove(ep.ready.begin(), ep.ready.end(), fd), ep.ready.end());
    }
    if (f.kind == FileKind::kEpoll) {
      for (const auto& [watched, item] : f.items) {
        if (!fd_open(watched)) continue;
        auto& list = table_[watched]->watched_by;
        list.erase(std::remove(list.begin(), list.end(), fd), list.end());
      }
    }
    if (f.kind == FileKind::kSocket) {
      if (f.listening) stop_listening(f);
      if (f.stream != kNoStream) {
        Stream& s = *streams_[f.stream];
        s.end[f.side].fd = -1;
        s.end[f.side].linger_zero = f.linger_zero;
        if (s.syn_waiting) {
          drop_syn(f.stream);  // SYN_SENT: closed with nothing sent (tcp_close_state -> TCP_CLOSE)
        } else {
          end_close(s, f.side);
        }
      }
    }
    table_[fd].reset();
  }

  // --- streams ---------------------------------------------------------------------------------

  PeerId new_stream(int family) {
    streams_.push_back(std::make_unique<Stream>());
    streams_.back()->domain = family;
    return streams_.size() - 1;
  }

  // The listener that a SYN from `remote_port` to `port` reaches: the one bound there, or the
  // member of its SO_REUSEPORT group that the flow's hash picks (reuseport_select_sock:
  // reciprocal_scale(hash, members), no BPF program).
  File* find_listener(std::uint16_t port, int family, std::uint16_t remote_port) {
    const auto group = reuse_groups_.find({family, port});
    if (group != reuse_groups_.end() && !group->second.empty()) {
      const std::vector<int>& members = group->second;
      const std::uint64_t pick =
          (std::uint64_t{flow_hash(remote_port, port)} * members.size()) >> 32;
      return table_[static_cast<std::size_t>(members[static_cast<std::size_t>(pick)])].get();
    }
    for (auto& f : table_) {
      if (f && f->kind == FileKind::kSocket && f->listening && f->port == port &&
          f->domain == family) {
        return f.get();
      }
    }
    return nullptr;
  }

  // A fixed stand-in for inet_ehashfn: murmur3's finalizer over both ports, which spreads
  // consecutive remote ports evenly.
  static std::uint32_t flow_hash(std::uint16_t remote_port, std::uint16_t local_port) {
    std::uint32_t h = (std::uint32_t{remote_port} << 16) | local_port;
    h ^= h >> 16;
    h *= 0x85ebca6bU;
    h ^= h >> 13;
    h *= 0xc2b2ae35U;
    h ^= h >> 16;
    return h;
  }

  // The SYN of `id` reaches `listener`: queued for accept(), or waiting for room.
  void route_syn(File& listener, PeerId id) {
    Stream& s = *streams_[id];
    s.listener_fd = listener.fd;
    if (listener.accept_queue.size() > static_cast<std::size_t>(listener.backlog)) {
      s.syn_waiting = true;
      listener.syn_queue.push_back(id);
    } else {
      enqueue_accept(listener, id);
    }
  }

  void enqueue_accept(File& listener, PeerId id) {
    Stream& s = *streams_[id];
    const bool waited = s.syn_waiting;
    s.syn_waiting = false;
    s.listener_fd = listener.fd;
    listener.accept_queue.push_back(id);
    wake(listener, EPOLLIN);
    // A connecting socket of the process that waited in SYN_SENT is established now:
    // tcp_finish_connect's sk_state_change wakes every waiter (EPOLLOUT from now on).
    if (waited) notify(s.end[kRemote], 0);
  }

  void promote_syn(File& listener) {
    while (!listener.syn_queue.empty() &&
           listener.accept_queue.size() <= static_cast<std::size_t>(listener.backlog)) {
      const PeerId id = listener.syn_queue.front();
      listener.syn_queue.pop_front();
      enqueue_accept(listener, id);
    }
  }

  void drop_syn(PeerId id) {
    Stream& s = *streams_[id];
    if (is(s.listener_fd, FileKind::kSocket)) {
      auto& q = table_[s.listener_fd]->syn_queue;
      q.erase(std::remove(q.begin(), q.end(), id), q.end());
    }
    s.syn_waiting = false;
    s.end[kRemote].closed = true;
    s.end[kRemote].reset = true;
    s.end[kLocal].reset = true;
    s.end[kLocal].closed = true;
  }

  End& end_of(File& f) { return streams_[f.stream]->end[f.side]; }

  static std::size_t available(const End& e) { return e.in.size() - e.in_offset; }
  static std::size_t unsent(const End& e) { return e.out.size() - e.out_offset; }

  static void consume(std::string& queue, std::size_t& offset, std::size_t n) {
    offset += n;
    if (offset == queue.size()) {
      queue.clear();
      offset = 0;
    } else if (offset > 64 * 1024) {
      queue.erase(0, offset);
      offset = 0;
    }
  }

  void notify(End& e, std::uint32_t mask) {
    if (e.fd >= 0 && fd_open(e.fd)) wake(*table_[e.fd], mask);
  }

  // Sends an RST from end `from`: both its queues are dropped; the other end keeps what it has
  // received, loses what it had not sent (tcp_write_queue_purge) and reports ECONNRESET once, or
  // EPIPE if its peer's FIN had arrived (tcp_reset in CLOSE_WAIT).
  void send_reset(Stream& s, int from) {
    End& self = s.end[from];
    End& other = s.end[1 - from];
    self.reset = true;
    self.in.clear();
    self.in_offset = 0;
    self.out.clear();
    self.out_offset = 0;
    if (!other.closed && !other.reset) {
      other.reset = true;
      other.got_reset = true;
      other.error = other.fin_in ? EPIPE : ECONNRESET;
      other.out.clear();
      other.out_offset = 0;
      notify(other, 0);
    }
  }

  // A listener closes (or shuts down its reading side): it leaves its SO_REUSEPORT group (the
  // last member takes its slot: reuseport_detach_sock), queued connections are reset (none moves
  // to another member: tcp_migrate_req=0), and SYNs still waiting go to what is left of the
  // group, or meet a closed port, which refuses them.
  void stop_listening(File& listener) {
    listener.listening = false;
    if (const auto group = reuse_groups_.find({listener.domain, listener.port});
        group != reuse_groups_.end()) {
      std::vector<int>& members = group->second;
      const auto self = std::find(members.begin(), members.end(), listener.fd);
      if (self != members.end()) {
        *self = members.back();
        members.pop_back();
      }
      if (members.empty()) reuse_groups_.erase(group);
    }
    for (const PeerId id : listener.accept_queue) reset_both(*streams_[id]);
    for (const PeerId id : listener.syn_queue) {
      Stream& s = *streams_[id];
      if (File* other = find_listener(listener.port, listener.domain, s.end[kRemote].port)) {
        route_syn(*other, id);  // still waiting: enqueue_accept wakes a connecting socket
        continue;
      }
      s.syn_waiting = false;
      End& connecting = s.end[kRemote];
      connecting.reset = true;
      connecting.got_reset = true;
      connecting.error = ECONNREFUSED;
      s.end[kLocal].reset = true;
      s.end[kLocal].closed = true;
      notify(connecting, 0);
    }
    listener.accept_queue.clear();
    listener.syn_queue.clear();
  }

  // Both FINs went through: the end is in TCP_CLOSE (LAST_ACK or TIME_WAIT done).
  bool finished(const Stream& s, int side) const {
    const End& self = s.end[side];
    return self.reset || (self.fin_in && self.fin_out && s.end[1 - side].fin_in);
  }

  void reset_both(Stream& s) {
    s.syn_waiting = false;
    send_reset(s, kLocal);
    s.end[kLocal].closed = true;
  }

  // Moves what end `from` has queued into the other end's receive queue, as far as it has room,
  // then its FIN once the send queue is empty. An orphan (closed) receiver answers data with RST.
  void transmit(Stream& s, int from) {
    End& self = s.end[from];
    End& other = s.end[1 - from];
    if (self.reset) return;
    if (unsent(self) > 0 && other.closed) {
      if (!other.reset) send_reset(s, 1 - from);
      notify(self, 0);
      return;
    }
    const std::size_t room = available(other) >= capacity_ ? 0 : capacity_ - available(other);
    const std::size_t n = std::min(room, unsent(self));
    if (n > 0) {
      other.in.append(self.out, self.out_offset, n);
      consume(self.out, self.out_offset, n);
      notify(other, EPOLLIN);
      if (self.nospace && writable(self)) {
        self.nospace = false;
        notify(self, EPOLLOUT);
      }
    }
    if (unsent(self) == 0 && self.fin_out && !other.fin_in && !other.reset) {
      other.fin_in = true;
      notify(other, 0);
    }
  }

  ssize_t end_send(Stream& s, int side, const void* data, std::size_t size, std::size_t limit) {
    End& self = s.end[side];
    if (self.error != 0) return fail_errno(std::exchange(self.error, 0));
    if (self.fin_out || self.reset || self.closed) return fail_errno(EPIPE);
    if (size == 0) return 0;
    const std::size_t space = unsent(self) >= capacity_ ? 0 : capacity_ - unsent(self);
    if (space == 0) {
      self.nospace = true;
      return fail_errno(EAGAIN);
    }
    const std::size_t n = std::min({size, space, std::max<std::size_t>(limit, 1)});
    self.out.append(static_cast<const char*>(data), n);
    if (n < size) self.nospace = true;
    transmit(s, side);
    progress();
    return static_cast<ssize_t>(n);
  }

  ssize_t end_recv(Stream& s, int side, void* buffer, std::size_t size) {
    End& self = s.end[side];
    const std::size_t have = available(self);
    if (have > 0 && size > 0) {
      const std::size_t n = std::min(size, have);
      std::memcpy(buffer, self.in.data() + self.in_offset, n);
      consume(self.in, self.in_offset, n);
      transmit(s, 1 - side);  // the window opened
      progress();
      return static_cast<ssize_t>(n);
    }
    if (self.fin_in || self.shut_rd) return 0;  // SOCK_DONE comes before sk_err in tcp_recvmsg
    if (self.error != 0) return fail_errno(std::exchange(self.error, 0));
    if (self.reset) return 0;
    return fail_errno(EAGAIN);
  }

  // EPOLLOUT for a sender: its send queue at most 2/3 full (sk_stream_min_wspace).
  bool writable(const End& sender) const { return unsent(sender) * 3 <= capacity_ * 2; }

  int end_shutdown(Stream& s, int side) {
    End& self = s.end[side];
    if (self.reset) return fail_errno(ENOTCONN);
    if (!self.fin_out) {
      self.fin_out = true;
      transmit(s, side);
      notify(self, 0);  // inet_shutdown's sk_state_change: EPOLLOUT now, in both modes
      progress();
    }
    return 0;
  }

  // close(): RST when unread bytes remain or SO_LINGER {1, 0} (tcp_close), else FIN after the
  // send queue, which an orphan keeps delivering.
  void end_close(Stream& s, int side) {
    End& self = s.end[side];
    if (self.closed) return;
    self.closed = true;
    if (!self.reset && (self.linger_zero || available(self) > 0)) {
      send_reset(s, side);
    } else if (!self.reset && !self.fin_out) {
      self.fin_out = true;
      transmit(s, side);
    }
    progress();
  }

  // send() and sendmsg() (gathered) after their fault was chosen: the checks, the transfer, the
  // payload into the trace hash.
  ssize_t send_checked(const Fault& f, int fd, const void* data, std::size_t size) {
    ssize_t result;
    if (f.error != 0) {
      result = fail_errno(f.error);
    } else if (!fd_open(fd)) {
      result = fail_errno(EBADF);
    } else if (table_[fd]->kind != FileKind::kSocket) {
      result = fail_errno(ENOTSOCK);
    } else {
      result = socket_send(*table_[fd], data, size, f.limit);
    }
    if (result > 0) trace_bytes(data, static_cast<std::size_t>(result));
    return result;
  }

  ssize_t socket_send(File& f, const void* data, std::size_t size, std::size_t limit) {
    if (f.stream == kNoStream) return fail_errno(EPIPE);  // sk_stream_wait_connect
    if (streams_[f.stream]->syn_waiting) return fail_errno(EAGAIN);
    End& self = streams_[f.stream]->end[f.side];
    const ssize_t n = end_send(*streams_[f.stream], f.side, data, size, limit);
    if (n > 0) self.io_at = now_;
    return n;
  }

  // --- reads of every kind of file ---------------------------------------------------------------

  ssize_t read_file(File& f, void* buffer, std::size_t size) {
    switch (f.kind) {
      case FileKind::kSocket: {
        if (size == 0) return 0;  // sock_read_iter: nothing asked, nothing done
        if (f.stream == kNoStream) {
          if (f.connect_error != 0) return fail_errno(std::exchange(f.connect_error, 0));
          return f.refused ? 0 : fail_errno(ENOTCONN);
        }
        if (streams_[f.stream]->syn_waiting) return fail_errno(EAGAIN);
        const ssize_t n = end_recv(*streams_[f.stream], f.side, buffer, size);
        if (n >= 0) streams_[f.stream]->end[f.side].io_at = now_;
        return n;
      }
      case FileKind::kEventfd: {
        if (size < 8) return fail_errno(EINVAL);
        if (f.counter == 0) return fail_errno(EAGAIN);
        const std::uint64_t value = std::exchange(f.counter, 0);
        std::memcpy(buffer, &value, sizeof value);
        wake(f, EPOLLOUT);  // eventfd_read wakes writers
        return 8;
      }
      case FileKind::kTimerfd: {
        if (size < 8) return fail_errno(EINVAL);
        if (f.ticks == 0) return fail_errno(EAGAIN);
        const std::uint64_t value = std::exchange(f.ticks, 0);
        std::memcpy(buffer, &value, sizeof value);
        return 8;
      }
      case FileKind::kSignalfd: {
        if (size < sizeof(signalfd_siginfo)) return fail_errno(EINVAL);
        for (int signo = 1; signo < NSIG; ++signo) {
          if (sigismember(&f.pending, signo) == 1) {
            sigdelset(&f.pending, signo);
            signalfd_siginfo info{};
            info.ssi_signo = static_cast<std::uint32_t>(signo);
            std::memcpy(buffer, &info, sizeof info);
            return sizeof info;
          }
        }
        return fail_errno(EAGAIN);
      }
      case FileKind::kEpoll:
        return fail_errno(EINVAL);
    }
    return fail_errno(EINVAL);
  }

  ssize_t write_eventfd(File& f, const void* buffer, std::size_t size) {
    if (size < 8) return fail_errno(EINVAL);
    std::uint64_t value = 0;
    std::memcpy(&value, buffer, sizeof value);
    if (value == ~std::uint64_t{0}) return fail_errno(EINVAL);
    if (value > ~std::uint64_t{0} - 1 - f.counter) return fail_errno(EAGAIN);
    f.counter += value;
    wake(f, EPOLLIN);  // eventfd_write wakes even for 0
    return 8;
  }

  // --- readiness -------------------------------------------------------------------------------

  std::uint32_t poll_mask(File& f) {
    switch (f.kind) {
      case FileKind::kSocket: {
        if (f.listening) return f.accept_queue.empty() ? 0u : EPOLLIN | EPOLLRDNORM;
        if (f.stream == kNoStream) {
          // Closed: tcp_done after a refused connect sets SHUTDOWN_MASK (IN, RDHUP too).
          std::uint32_t mask = EPOLLOUT | EPOLLWRNORM | EPOLLHUP;
          if (f.refused) mask |= EPOLLIN | EPOLLRDNORM | EPOLLRDHUP;
          if (f.connect_error != 0) mask |= EPOLLERR;
          return mask;
        }
        if (streams_[f.stream]->syn_waiting) return 0;  // SYN_SENT
        End& self = streams_[f.stream]->end[f.side];
        const bool rcv_shut = self.fin_in || self.shut_rd || self.reset;
        const bool snd_shut = self.fin_out || self.reset;
        std::uint32_t mask = 0;
        if (rcv_shut && snd_shut) mask |= EPOLLHUP;
        if (rcv_shut) mask |= EPOLLIN | EPOLLRDNORM | EPOLLRDHUP;
        if (available(self) > 0) mask |= EPOLLIN | EPOLLRDNORM;
        if (snd_shut || writable(self)) {
          mask |= EPOLLOUT | EPOLLWRNORM;
        } else {
          self.nospace = true;
        }
        if (self.error != 0) mask |= EPOLLERR;
        return mask;
      }
      case FileKind::kEventfd:  // eventfd_poll: writable while a write of 1 would not block
        return (f.counter > 0 ? EPOLLIN : 0u) | (f.counter < ~std::uint64_t{0} - 1 ? EPOLLOUT : 0u);
      case FileKind::kTimerfd:
        return f.ticks > 0 ? EPOLLIN : 0u;
      case FileKind::kSignalfd:
        for (int signo = 1; signo < NSIG; ++signo) {
          if (sigismember(&f.pending, signo) == 1) return EPOLLIN;
        }
        return 0;
      case FileKind::kEpoll: {
        for (const int fd : f.ready) {
          if (poll_mask(*table_[fd]) & (f.items[fd].events | EPOLLERR | EPOLLHUP)) return EPOLLIN;
        }
        return 0;
      }
    }
    return 0;
  }

  // A wakeup on `f` with key `mask` (0: every item, as a state change wakes all), as
  // ep_poll_callback: items whose interest shares a bit with the key go on their ready list, and
  // the set's waiter, if any, is woken (and leaves the set's wait queue). __wake_up_common wakes
  // every plain entry of the file's wait queue but stops after the first EPOLLEXCLUSIVE one whose
  // callback woke a waiter; exclusive entries are queued at the tail in ADD order, which is
  // watched_by's order.
  void wake(File& f, std::uint32_t mask) {
    bool exclusive_done = false;
    for (const int epfd : f.watched_by) {
      if (!is(epfd, FileKind::kEpoll)) continue;
      File& ep = *table_[epfd];
      auto it = ep.items.find(f.fd);
      if (it == ep.items.end()) continue;
      EpollItem& item = it->second;
      if (item.disabled) continue;
      if (mask != 0 && (mask & item.events) == 0) continue;
      const bool exclusive = (item.events & EPOLLEXCLUSIVE) != 0;
      if (exclusive && exclusive_done) continue;
      if (!item.ready) {
        item.ready = true;
        ep.ready.push_back(f.fd);
      }
      if (!ep.waiting) continue;
      ep.waiting = false;
      // ep_poll_callback's `ewake` for an exclusive item: the key must be the item's direction.
      switch (mask & (EPOLLIN | EPOLLOUT)) {
        case 0:
          exclusive_done = exclusive_done || exclusive;
          break;
        case EPOLLIN:
        case EPOLLOUT:
          exclusive_done =
              exclusive_done || (exclusive && (item.events & mask & (EPOLLIN | EPOLLOUT)) != 0);
          break;
        default:  // both: no exclusive wakeup counts
          break;
      }
    }
  }

  int epoll_control(File& ep, int op, File& target, epoll_event* event) {
    // do_epoll_ctl: "epoll adds to the wakeup queue at EPOLL_CTL_ADD time only, so EPOLLEXCLUSIVE
    // is not allowed for a EPOLL_CTL_MOD operation" (checked before the item is looked up), nor
    // beside other bits than EPOLLEXCLUSIVE_OK_BITS, nor for a nested epoll set.
    constexpr std::uint32_t kExclusiveOk =
        EPOLLIN | EPOLLOUT | EPOLLERR | EPOLLHUP | EPOLLWAKEUP | EPOLLET | EPOLLEXCLUSIVE;
    if (op != EPOLL_CTL_DEL && (event->events & EPOLLEXCLUSIVE) != 0) {
      if (op == EPOLL_CTL_MOD) return fail_errno(EINVAL);
      if (op == EPOLL_CTL_ADD &&
          (target.kind == FileKind::kEpoll || (event->events & ~kExclusiveOk) != 0)) {
        return fail_errno(EINVAL);
      }
    }
    auto it = ep.items.find(target.fd);
    switch (op) {
      case EPOLL_CTL_ADD: {
        if (it != ep.items.end()) return fail_errno(EEXIST);
        EpollItem& item = ep.items[target.fd];
        item.events = event->events;
        item.data = event->data.u64;
        target.watched_by.push_back(ep.fd);
        break;
      }
      case EPOLL_CTL_MOD: {
        if (it == ep.items.end()) return fail_errno(ENOENT);
        // An item added with EPOLLEXCLUSIVE is never modified: ep_modify is skipped, EINVAL stays.
        if ((it->second.events & EPOLLEXCLUSIVE) != 0) return fail_errno(EINVAL);
        it->second.events = event->events;
        it->second.data = event->data.u64;
        it->second.disabled = false;
        break;
      }
      case EPOLL_CTL_DEL: {
        if (it == ep.items.end()) return fail_errno(ENOENT);
        ep.items.erase(it);
        ep.ready.erase(std::remove(ep.ready.begin(), ep.ready.end(), target.fd), ep.ready.end());
        auto& list = target.watched_by;
        list.erase(std::remove(list.begin(), list.end(), ep.fd), list.end());
        return 0;
      }
      default:
        return fail_errno(EINVAL);
    }
    // ADD and MOD poll the file at once (ep_insert, ep_modify): ready now means on the list now.
    EpollItem& item = ep.items[target.fd];
    if (!item.ready && (poll_mask(target) & (item.events | EPOLLERR | EPOLLHUP)) != 0) {
      item.ready = true;
      ep.ready.push_back(target.fd);
    }
    return 0;
  }

  // ep_send_events: the ready list is scanned in order; a level-triggered item that reported goes
  // back on the tail, an edge-triggered one leaves until its next wakeup, and what the batch had
  // no room for goes back to the head.
  int collect(File& ep, epoll_event* events, int max) {
    std::deque<int> scan;
    scan.swap(ep.ready);
    int n = 0;
    std::size_t i = 0;
    for (; i < scan.size() && n < max; ++i) {
      const int fd = scan[i];
      auto it = ep.items.find(fd);
      if (it == ep.items.end()) continue;
      EpollItem& item = it->second;
      item.ready = false;
      if (item.disabled || !fd_open(fd)) continue;
      const std::uint32_t revents = poll_mask(*table_[fd]) & (item.events | EPOLLERR | EPOLLHUP);
      if (revents == 0) continue;
      events[n].events = revents;
      events[n].data.u64 = item.data;
      ++n;
      if ((item.events & EPOLLONESHOT) != 0) {
        item.disabled = true;
      } else if ((item.events & EPOLLET) == 0) {
        item.ready = true;
        ep.ready.push_back(fd);
      }
    }
    for (std::size_t j = scan.size(); j > i; --j) ep.ready.push_front(scan[j - 1]);
    return n;
  }

  // --- time ------------------------------------------------------------------------------------

  TimePoint next_timerfd_due() const {
    TimePoint next = TimePoint::max();
    for (const auto& f : table_) {
      if (f && f->kind == FileKind::kTimerfd) next = std::min(next, f->due);
    }
    return next;
  }

  TimePoint next_action_due() const {
    return actions_.empty() ? TimePoint::max() : actions_.begin()->first.first;
  }

  void expire_timerfds() {
    for (auto& f : table_) {
      if (!f || f->kind != FileKind::kTimerfd || f->due > now_) continue;
      std::uint64_t ticks = 1;
      if (f->interval > Clock::duration::zero()) {
        const auto late = (now_ - f->due) / f->interval;
        ticks += static_cast<std::uint64_t>(late);
        f->due += f->interval * (late + 1);
      } else {
        f->due = TimePoint::max();
      }
      f->ticks += ticks;
      wake(*f, EPOLLIN);
    }
  }

  void run_due_actions() {
    while (!actions_.empty() && actions_.begin()->first.first <= now_) {
      if (now_ != actions_instant_) {
        actions_instant_ = now_;
        actions_at_instant_ = 0;
      }
      if (++actions_at_instant_ > spin_limit_) {
        failure(
            "world actions keep scheduling more at one virtual instant (a driver that "
            "re-schedules an action at +0 forever)");
      }
      auto node = actions_.extract(actions_.begin());
      trace("world_action", 0, 0, 0);
      progress();
      // Another thread, as far as the library can tell: it runs no reactor.
      reactor::detail::RunFrame* saved = std::exchange(reactor::detail::running_reactors, nullptr);
      node.mapped()();
      reactor::detail::running_reactors = saved;
      progress();
    }
  }

  void fill_address(int family, std::uint16_t port, sockaddr* address, socklen_t* length) const {
    if (family == AF_INET6) {
      sockaddr_in6 a{};
      a.sin6_family = AF_INET6;
      a.sin6_port = htons(port);
      a.sin6_addr = in6addr_loopback;
      std::memcpy(address, &a, std::min<std::size_t>(*length, sizeof a));
      *length = sizeof a;
    } else {
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_port = htons(port);
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      std::memcpy(address, &a, std::min<std::size_t>(*length, sizeof a));
      *length = sizeof a;
    }
  }

  static constexpr TimePoint kEpoch = TimePoint(std::chrono::hours(1));

  inline static thread_local Kernel* current_ = nullptr;

  std::size_t capacity_;
  std::size_t fd_limit_ = 1024;
  std::size_t spin_limit_ = 10000;
  std::vector<std::unique_ptr<File>> table_;
  std::vector<std::unique_ptr<Stream>> streams_;
  std::map<std::pair<TimePoint, std::uint64_t>, std::function<void()>> actions_;
  std::uint64_t action_serial_ = 0;
  std::function<Fault(Op, int)> faults_;
  bool in_fault_ = false;
  std::function<void(const std::string&)> on_failure_;
  TimePoint now_ = kEpoch;
  TimePoint spin_instant_ = kEpoch;
  std::size_t idle_waits_ = 0;
  std::uint16_t next_port_ = 40000;
  std::uint64_t hash_ = 0xcbf29ce484222325ULL;
  std::uint64_t progress_marks_ = 0;
  std::map<std::pair<int, std::uint16_t>, std::vector<int>> reuse_groups_;  // (family, port)
  std::uint64_t calls_ = 0;
  std::vector<ConnectCall> connect_calls_;
  bool recording_fd_calls_ = false;
  std::vector<FdCall> fd_calls_;
  bool tracing_ = std::getenv("REACTOR_SIM_TRACE") != nullptr;
  bool keep_recent_ = true;
  std::uint64_t note_ = 0;
  TimePoint actions_instant_ = kEpoch;
  std::size_t actions_at_instant_ = 0;
  std::deque<std::string> recent_;
};

// The policy: every call goes to this thread's Kernel, and is traced there (trace_hash(), the
// failure report's last calls, REACTOR_SIM_TRACE=1).
struct SimSyscalls {
  static TimePoint now() noexcept { return Kernel::current().now(); }
  static int epoll_create1(int flags) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("epoll_create1", flags, 0, k.sys_epoll_create1(flags));
  }
  static int epoll_ctl(int epfd, int op, int fd, epoll_event* event) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("epoll_ctl", epfd * 16L + op, fd, k.sys_epoll_ctl(epfd, op, fd, event));
  }
  static int epoll_wait(int epfd, epoll_event* events, int max_events, int timeout_ms) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("epoll_wait", epfd, timeout_ms,
                    k.sys_epoll_wait(epfd, events, max_events, timeout_ms));
  }
  static int eventfd(unsigned initial, int flags) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("eventfd", initial, flags, k.sys_eventfd(initial, flags));
  }
  static int signalfd(int fd, const sigset_t* mask, int flags) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("signalfd", fd, flags, k.sys_signalfd(fd, mask, flags));
  }
  static int timerfd_create(int clock, int flags) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("timerfd_create", clock, flags, k.sys_timerfd_create(clock, flags));
  }
  static int timerfd_settime(int fd, int flags, const itimerspec* value, itimerspec* old) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("timerfd_settime", fd, flags, k.sys_timerfd_settime(fd, flags, value, old));
  }
  static int sigprocmask(int how, const sigset_t* /*set*/, sigset_t* old) noexcept {
    if (old != nullptr) sigemptyset(old);  // changes nothing: signals come from raise_signal()
    return Kernel::current().traced("sigprocmask", how, 0, 0);
  }
  static ssize_t read(int fd, void* buffer, std::size_t size) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("read", fd, static_cast<long>(size), k.sys_read(fd, buffer, size));
  }
  static ssize_t write(int fd, const void* buffer, std::size_t size) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("write", fd, static_cast<long>(size), k.sys_write(fd, buffer, size));
  }
  static ssize_t send(int fd, const void* buffer, std::size_t size, int flags) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("send", fd, static_cast<long>(size), k.sys_send(fd, buffer, size, flags));
  }
  static ssize_t sendmsg(int fd, const msghdr* message, int flags) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("sendmsg", fd, static_cast<long>(message->msg_iovlen),
                    k.sys_sendmsg(fd, message, flags));
  }
  static int socket(int domain, int type, int protocol) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("socket", domain, type, k.sys_socket(domain, type, protocol));
  }
  static int bind(int fd, const sockaddr* address, socklen_t length) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("bind", fd, length, k.sys_bind(fd, address, length));
  }
  static int listen(int fd, int backlog) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("listen", fd, backlog, k.sys_listen(fd, backlog));
  }
  static int accept4(int fd, sockaddr* address, socklen_t* length, int flags) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("accept4", fd, flags, k.sys_accept4(fd, address, length, flags));
  }
  static int connect(int fd, const sockaddr* address, socklen_t length) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("connect", fd, length, k.sys_connect(fd, address, length));
  }
  static int poll(pollfd* fds, nfds_t count, int timeout_ms) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("poll", static_cast<long>(count), timeout_ms,
                    k.sys_poll(fds, count, timeout_ms));
  }
  static int setsockopt(int fd, int level, int name, const void* value, socklen_t length) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("setsockopt", fd, level * 1000L + name,
                    k.sys_setsockopt(fd, level, name, value, length));
  }
  static int getsockopt(int fd, int level, int name, void* value, socklen_t* length) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("getsockopt", fd, level * 1000L + name,
                    k.sys_getsockopt(fd, level, name, value, length));
  }
  static int getsockname(int fd, sockaddr* address, socklen_t* length) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("getsockname", fd, 0, k.sys_getsockname(fd, address, length));
  }
  static int getpeername(int fd, sockaddr* address, socklen_t* length) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("getpeername", fd, 0, k.sys_getpeername(fd, address, length));
  }
  static int ioctl(int fd, unsigned long request, int* argument) noexcept {
    Kernel& k = Kernel::current();
    const int result = k.sys_ioctl(fd, request, argument);
    if (result == 0) k.note(static_cast<std::uint64_t>(*argument));
    return k.traced("ioctl", fd, static_cast<long>(request), result);
  }
  static int fcntl(int fd, int command, int argument) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("fcntl", fd, command * 100000L + argument, k.sys_fcntl(fd, command, argument));
  }
  static int shutdown(int fd, int how) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("shutdown", fd, how, k.sys_shutdown(fd, how));
  }
  static int close(int fd) noexcept {
    Kernel& k = Kernel::current();
    return k.traced("close", fd, 0, k.sys_close(fd));
  }
  static int unlink(const char* /*path*/) noexcept {
    errno = ENOENT;  // no file system here
    return Kernel::current().traced("unlink", 0, 0, -1);
  }
};

}  // namespace sim
