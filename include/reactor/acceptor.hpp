// Public: Acceptor<Handler, Reactor, Transport>, a listening socket (TCP over IPv4/IPv6, or Unix
// domain) that accepts connections and hands each to its reactor as a Connection<Handler> with a
// copy of the prototype handler (and of a prototype transport: TLS, see reactor/tls.hpp).
//
// Running out of fds (EMFILE, ENFILE) or kernel memory (ENOBUFS, ENOMEM) never busy-loops: the
// acceptor stops watching the listener and retries when one of the reactor's connections closes,
// or after a backoff (10 ms doubling to 1 s), whichever comes first; pending clients wait in the
// listen backlog meanwhile. Transient per-connection errors (ECONNABORTED, EPROTO, ...) are
// skipped. The listener is always level-triggered, whatever the reactor's trigger mode. When the
// reactor's graceful shutdown() closes it, it first accepts what its listen queue holds (the kernel
// completed those connections: closing the listener would reset them), and those are served out.
//
// Threading: construct, use and destroy on the reactor's thread; destroy before the reactor. It
// may be destroyed from inside any callback, including on_open of a connection it just accepted.
#pragma once

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <system_error>
#include <utility>

#include "connection.hpp"
#include "detail/watcher.hpp"
#include "endpoint.hpp"
#include "error.hpp"
#include "reactor.hpp"

namespace reactor {

template <class Handler, class R, class Transport>
class PoolAcceptor;

namespace detail {

// A listening socket that several acceptors share, one per reactor, each registering it with
// EPOLLEXCLUSIVE. The last acceptor to close it closes it.
struct SharedListener {
  int fd = -1;
  std::atomic<int> users{0};
};

// Where an acceptor hands the sockets it accepts, instead of opening them on its own reactor: a
// pool's dispatcher. `socket` is connected, non-blocking, close-on-exec, and now the sink's.
struct AcceptSink {
  void (*function)(void* context, int socket) noexcept = nullptr;
  void* context = nullptr;
};

// What a shared listener's acceptor calls when it stops accepting with connections possibly still
// queued (its per-wakeup budget ran out): the kernel will not wake another reactor for them, so
// the pool asks the next one to take a turn. `from` is this acceptor's reactor index.
struct AcceptKick {
  void (*function)(void* context, std::size_t from) noexcept = nullptr;
  void* context = nullptr;
  std::size_t from = 0;
};

}  // namespace detail

struct ListenOptions {
  int backlog = SOMAXCONN;
  bool reuse_address = true;     // SO_REUSEADDR (TCP only)
  bool reuse_port = false;       // SO_REUSEPORT, for one listener per reactor
  bool tcp_nodelay = true;       // TCP_NODELAY on every accepted TCP connection
  bool unlink_on_close = true;   // Unix sockets: remove the socket file the acceptor created
  int accept_budget = 64;        // accept4 calls per readiness event, so connections get a turn
  ConnectionOptions connection;  // applied to every accepted connection
};

template <class Handler, class R = Reactor<>, class Transport = PlainTransport>
class Acceptor : private detail::Watcher {
  using Sys = typename R::syscalls;
  using Clock = std::chrono::steady_clock;
  static constexpr std::chrono::milliseconds kFirstBackoff{10};
  static constexpr std::chrono::milliseconds kMaxBackoff{1000};
  static constexpr std::uint64_t kRequeueEvery = 16;  // a shared listener's accepts per requeue

 public:
  // Binds and listens on `endpoint` (port 0 picks an ephemeral port; see local_endpoint()).
  // Throws std::system_error naming the failed call ("socket", "setsockopt", "bind", "listen",
  // "getsockname", "epoll_ctl").
  Acceptor(R& loop, const Endpoint& endpoint, Handler prototype = Handler{},
           const ListenOptions& options = {})
      : Acceptor(loop, endpoint, Transport(), std::move(prototype), options) {}

  // As above, reporting failure through `ec` (the acceptor is then closed).
  Acceptor(R& loop, const Endpoint& endpoint, Handler prototype, const ListenOptions& options,
           std::error_code& ec) noexcept
      : Acceptor(loop, endpoint, Transport(), std::move(prototype), options, ec) {}

  // As the two above, each accepted connection getting a copy of `transport` (TlsTransport: the
  // server's TlsContext, see reactor/tls.hpp).
  Acceptor(R& loop, const Endpoint& endpoint, Transport transport, Handler prototype,
           const ListenOptions& options = {})
      : Watcher(&on_watcher_op),
        loop_(&loop),
        prototype_(std::move(prototype)),
        options_(options),
        transport_(std::move(transport)) {
    const char* what = nullptr;
    if (const std::error_code ec = open(endpoint, what)) detail::throw_error(ec, what);
  }

  Acceptor(R& loop, const Endpoint& endpoint, Transport transport, Handler prototype,
           const ListenOptions& options, std::error_code& ec) noexcept
      : Watcher(&on_watcher_op),
        loop_(&loop),
        prototype_(std::move(prototype)),
        options_(options),
        transport_(std::move(transport)) {
    const char* what = nullptr;
    ec = open(endpoint, what);
  }

  Acceptor(const Acceptor&) = delete;
  Acceptor& operator=(const Acceptor&) = delete;

  ~Acceptor() {
    if (destroyed_ != nullptr) *destroyed_ = true;
    close();
  }

  // Stops listening and closes the socket; connections already accepted are unaffected. Clients
  // still in the listen queue are reset by the kernel (a graceful shutdown() accepts them first).
  void close() noexcept { close(false); }

 private:
  template <class, class, class>
  friend class PoolAcceptor;

  // For PoolAcceptor: an acceptor on `shared`, a listening socket bound to `endpoint` that other
  // reactors' acceptors watch too (EPOLLEXCLUSIVE: one of them is woken per connection), or on
  // its own socket with its accepted sockets handed to `sink` (`shared` null).
  // The first acceptor of a shared socket (its fd still -1) opens it for all. `what` names the
  // call that failed, as for the throwing constructor.
  Acceptor(R& loop, detail::SharedListener* shared, const Endpoint& endpoint, Transport transport,
           Handler prototype, const ListenOptions& options, detail::AcceptSink sink,
           std::error_code& ec, const char*& what) noexcept
      : Watcher(&on_watcher_op),
        loop_(&loop),
        prototype_(std::move(prototype)),
        options_(options),
        transport_(std::move(transport)),
        shared_(shared),
        sink_(sink) {
    if (shared == nullptr) {
      ec = open(endpoint, what);
      return;
    }
    if (shared->fd < 0) {
      shared->users.store(1, std::memory_order_relaxed);  // a failed open() lets go of it
      ec = open(endpoint, what);
      if (!ec) shared->fd = fd;
      return;
    }
    what = "epoll_ctl";
    fd = shared->fd;
    local_ = endpoint;
    shared->users.fetch_add(1, std::memory_order_relaxed);
    ec = register_listener();
    if (ec) close(false);
  }

  // `accept_queued`: accept what the listen queue holds before closing (a graceful shutdown);
  // the last of a shared socket's acceptors does it once more after the others have let go.
  void close(bool accept_queued) noexcept {
    fd_waiter_.unlink();
    listener_.unlink();
    if (fd < 0) return;
    loop_->remove(*this);
    // A callback may destroy this acceptor (false) or close it (fd -1) while it accepts.
    if (accept_queued && (!accept_all() || fd < 0)) return;
    if (shared_ != nullptr) {
      if (shared_->users.fetch_sub(1, std::memory_order_acq_rel) != 1) {
        fd = -1;
        return;
      }
      // The last user: the socket is this acceptor's alone now, to drain once more and close.
      std::exchange(shared_, nullptr)->fd = -1;
      if (accept_queued && (!accept_all() || fd < 0)) return;
    }
    Sys::close(std::exchange(fd, -1));
    if (local_.is_unix() && options_.unlink_on_close) {
      // Straight from the sockaddr, which Endpoint keeps NUL-terminated: close() is noexcept and
      // must not allocate (a std::string copy could throw bad_alloc into std::terminate). An
      // abstract name starts with NUL and has no file.
      const char* path = reinterpret_cast<const sockaddr_un*>(local_.data())->sun_path;
      if (path[0] != '\0') Sys::unlink(path);
    }
  }

 public:
  bool is_open() const noexcept { return fd >= 0; }

  // The bound address, with the actual port when port 0 was asked for.
  const Endpoint& local_endpoint() const noexcept { return local_; }

  // True while accepting is suspended after running out of fds or memory.
  bool is_backing_off() const noexcept { return fd_waiter_.is_linked(); }

  std::uint64_t accepted_count() const noexcept { return accepted_; }
  // accept4 failures for lack of fds or memory (each starts or extends a backoff), and failures
  // to set up an accepted connection.
  std::uint64_t failed_count() const noexcept { return failed_; }
  // The most recent accept or setup error (empty if none yet).
  std::error_code last_error() const noexcept { return last_error_; }

  // The listening socket, or -1 when closed.
  int native_handle() const noexcept { return fd; }

 private:
  std::error_code open(const Endpoint& endpoint, const char*& what) noexcept {
    what = "socket";
    if (endpoint.empty()) return std::make_error_code(std::errc::address_family_not_supported);
    fd = Sys::socket(endpoint.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return detail::last_errno_code();
    const int on = 1;
    what = "setsockopt";
    if (!endpoint.is_unix() && options_.reuse_address &&
        Sys::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) != 0) {
      return close_with(detail::last_errno_code());
    }
    if (options_.reuse_port && Sys::setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &on, sizeof on) != 0) {
      return close_with(detail::last_errno_code());
    }
    what = "bind";
    if (Sys::bind(fd, endpoint.data(), endpoint.size()) != 0) {
      return close_with(detail::last_errno_code());
    }
    local_ = endpoint;  // bound: from here on close() may unlink a Unix socket file
    what = "listen";
    if (Sys::listen(fd, options_.backlog) != 0) return close_with(detail::last_errno_code());
    what = "getsockname";
    sockaddr_storage storage{};
    socklen_t length = sizeof storage;
    if (Sys::getsockname(fd, reinterpret_cast<sockaddr*>(&storage), &length) != 0) {
      return close_with(detail::last_errno_code());
    }
    if (!endpoint.is_unix()) {
      local_ = Endpoint::from_sockaddr(reinterpret_cast<sockaddr*>(&storage), length);
    }
    what = "epoll_ctl";
    if (const std::error_code ec = register_listener()) return close_with(ec);
    return {};
  }

  std::error_code register_listener() noexcept {
    if (const std::error_code ec = watch()) return ec;
    fd_waiter_.watcher = this;
    listener_.watcher = this;
    loop_->add_listener(listener_);
    return {};
  }

  // (Re)starts watching the listener. EPOLLEXCLUSIVE can only be given to EPOLL_CTL_ADD (MOD
  // fails with EINVAL), so a shared listener leaves the epoll set to stop watching, and joins it
  // again here.
  std::error_code watch() noexcept {
    if (shared_ != nullptr) return loop_->add(*this, EPOLLIN | EPOLLEXCLUSIVE);
    if (registered) return loop_->modify(*this, EPOLLIN);
    return loop_->add(*this, EPOLLIN);
  }

  std::error_code unwatch() noexcept {
    if (shared_ == nullptr) return loop_->modify(*this, 0);
    loop_->remove(*this);
    return {};
  }

  std::error_code close_with(const std::error_code& ec) noexcept {
    close();
    return ec;
  }

  static void on_watcher_op(detail::Watcher& watcher, detail::WatcherOp op,
                            std::uint32_t /*events*/, void* /*argument*/) noexcept {
    auto& self = static_cast<Acceptor&>(watcher);
    if (op == detail::WatcherOp::kClose) {  // the reactor is shutting down
      self.close(true);
      return;
    }
    if (op == detail::WatcherOp::kResume) {
      if (self.fd < 0) return;
      if (const std::error_code ec = self.watch()) {
        self.watch_later(ec);
        return;
      }
    }
    self.accept_some();
  }

  // Watching the listener failed: try again after the next backoff.
  void watch_later(const std::error_code& ec) noexcept {
    last_error_ = ec;
    loop_->wait_for_fds(fd_waiter_, detail::clock_now<Sys>() + backoff_);
    backoff_ = std::min(backoff_ * 2, kMaxBackoff);
  }

  // A shared listener's wake-ups go to the first idle acceptor in the socket's wait queue, and
  // epoll queues each one where it joined: leaving and rejoining after every kRequeueEvery
  // accepts moves this one to the back, behind the reactors that got fewer.
  void requeue() noexcept {
    if (accepted_ - requeued_at_ < kRequeueEvery) return;
    requeued_at_ = accepted_;
    loop_->remove(*this);
    if (const std::error_code ec = watch()) watch_later(ec);
  }

  // A shared listener takes at most kRequeueEvery connections per turn, then moves to the back of
  // the wake-up queue and, if it stopped for the budget, not for an empty queue, hands the next
  // turn to the next reactor: a burst that arrived at once (one wake-up) is spread too.
  void accept_some() noexcept {
    const int budget_asked = std::max(options_.accept_budget, 1);  // 0 would never accept: a spin
    if (shared_ == nullptr) {
      accept_up_to(budget_asked);
      return;
    }
    const int budget = std::min<int>(budget_asked, static_cast<int>(kRequeueEvery));
    const std::uint64_t before = accepted_;
    if (!accept_up_to(budget)) return;
    if (fd < 0 || fd_waiter_.is_linked()) return;
    requeue();
    if (accepted_ - before >= static_cast<std::uint64_t>(budget) && kick_.function != nullptr) {
      kick_.function(kick_.context, kick_.from);
    }
  }

  // The pool's turn for this acceptor (AcceptKick): accept if still listening and not backing off.
  void take_turn() noexcept {
    if (fd >= 0 && !fd_waiter_.is_linked()) accept_some();
  }

  // Accepts until the queue is empty (bounded, should clients keep arriving) for a closing
  // listener, which is no longer in the epoll set. Returns false if a callback destroyed this.
  bool accept_all() noexcept {
    // Twice what the queue can hold (a negative backlog means the kernel's maximum); it only
    // bounds the drain should clients keep arriving.
    const std::int64_t queue = options_.backlog <= 0 ? 65535 : options_.backlog;
    const std::int64_t limit = 2 * std::clamp<std::int64_t>(queue, 64, 65535);
    // No back-off here: the listener is closing. Out of fds or memory, what is still queued is
    // reset when it closes (counted in failed_count()).
    bool destroyed = false;
    destroyed_ = &destroyed;  // set by the destructor if a callback destroys this acceptor
    for (std::int64_t i = 0; i < limit && fd >= 0; ++i) {  // (a callback may close this)
      const int socket = Sys::accept4(fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (socket < 0) {
        const int error = errno;
        const Failure failure = classify(error);
        if (failure == Failure::kEmpty) break;
        if (failure != Failure::kRetry) last_error_ = detail::errno_code(error);
        if (failure == Failure::kRetry || failure == Failure::kSkip) continue;
        ++failed_;
        break;
      }
      ++accepted_;
      start(socket);
      if (destroyed) return false;
    }
    destroyed_ = nullptr;
    return true;
  }

  // Returns false if a callback destroyed this acceptor.
  bool accept_up_to(int budget) noexcept {
    bool destroyed = false;
    destroyed_ = &destroyed;  // set by the destructor if a callback destroys this acceptor
    for (int i = 0; i < budget && fd >= 0; ++i) {
      const int socket = Sys::accept4(fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (socket < 0) {
        if (!accept_failed(errno)) break;
        continue;
      }
      ++accepted_;
      backoff_ = kFirstBackoff;
      start(socket);
      if (destroyed) return false;
    }
    destroyed_ = nullptr;
    return true;
  }

  // Returns true when accepting should go on (the error concerned one connection only).
  bool accept_failed(int error) noexcept {
    switch (classify(error)) {
      case Failure::kRetry:
        return true;
      case Failure::kEmpty:
        return false;
      case Failure::kSkip:
        last_error_ = detail::errno_code(error);
        return true;
      // Stop watching the listener (level-triggered, it would report the same pending connection
      // forever) until fds are freed or the backoff ends.
      case Failure::kOutOfResources:
        last_error_ = detail::errno_code(error);
        ++failed_;
        back_off();
        return false;
      case Failure::kBroken:
        last_error_ = detail::errno_code(error);
        ++failed_;
        close();
        return false;
    }
    return false;
  }

  enum class Failure : std::uint8_t {
    kRetry,           // EINTR
    kEmpty,           // EAGAIN: nothing queued
    kSkip,            // this connection failed; the next may be fine
    kOutOfResources,  // no fd or memory for any connection for now
    kBroken,          // the listener itself is unusable
  };

  static Failure classify(int error) noexcept {
    switch (error) {
      case EINTR:
        return Failure::kRetry;
      case EAGAIN:
#if EAGAIN != EWOULDBLOCK
      case EWOULDBLOCK:
#endif
        return Failure::kEmpty;
      // The connection went away before it was accepted, or Linux passed on a network error
      // pending on it (accept(2), "Error handling"): skip it.
      case ECONNABORTED:
      case EPROTO:
      case ENETDOWN:
      case ENOPROTOOPT:
      case EHOSTDOWN:
      case ENONET:
      case EHOSTUNREACH:
      case EOPNOTSUPP:
      case ENETUNREACH:
      case EPERM:  // firewall rules forbade this connection
        return Failure::kSkip;
      case EMFILE:
      case ENFILE:
      case ENOBUFS:
      case ENOMEM:
        return Failure::kOutOfResources;
      default:  // EBADF, EINVAL, ENOTSOCK...
        return Failure::kBroken;
    }
  }

  void back_off() noexcept {
    if (unwatch()) {
      close();
      return;
    }
    loop_->wait_for_fds(fd_waiter_, detail::clock_now<Sys>() + backoff_);
    backoff_ = std::min(backoff_ * 2, kMaxBackoff);
  }

  void start(int socket) noexcept {
    if (options_.tcp_nodelay && !local_.is_unix()) {
      const int on = 1;
      Sys::setsockopt(socket, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    }
    if (sink_.function != nullptr) {
      sink_.function(sink_.context, socket);
      return;
    }
    std::error_code ec;
    try {
      Handler handler = prototype_;
      Connection<Handler, R, Transport>::open(*loop_, socket, std::move(handler),
                                              options_.connection, !local_.is_unix(), ec, false,
                                              Transport(transport_));
    } catch (...) {  // copying a prototype threw
      Sys::close(socket);
      ec = make_error_code(Error::kHandlerException);
    }
    if (ec) {
      ++failed_;
      last_error_ = ec;
    }
  }

  R* loop_;
  Handler prototype_;
  ListenOptions options_;
  [[no_unique_address]] Transport transport_;
  Endpoint local_;
  detail::FdWaiter fd_waiter_;
  detail::ListenerNode listener_;
  std::chrono::milliseconds backoff_ = kFirstBackoff;
  detail::SharedListener* shared_ = nullptr;  // not ours to close unless we are its last user
  detail::AcceptSink sink_;
  detail::AcceptKick kick_;
  std::uint64_t requeued_at_ = 0;  // accepted_ when a shared listener last rejoined its queue
  bool* destroyed_ = nullptr;
  std::uint64_t accepted_ = 0;
  std::uint64_t failed_ = 0;
  std::error_code last_error_;
};

}  // namespace reactor
