// Fuzz target: everything around a connection that connection_fuzzer leaves out. One input sets up
// a reactor (either trigger mode) whose connections arrive over one transport — socketpairs handed
// to adopt(), or real clients of an Acceptor on loopback TCP or on an abstract Unix socket — with
// a handler that has every hook (on_open, on_data, on_drain, on_eof, on_close), small limits and,
// when the input asks, 1-30 ms idle/read/write timeouts and a 1-20 ms linger. Then it interleaves:
// clients connecting, writing, reading, half-closing and vanishing; run_once (now and then waiting
// a few ms, so timeouts, lingering and accept back-off expire); handler actions; timers scheduled
// and cancelled from outside and from callbacks (one-shot, at a time point, periodic; a timer
// cancelling itself or another, throwing, posting); post()ed tasks; ConnectionHandle send/close,
// stale handles included; hooks that throw; handler copies that throw in the Acceptor; allocation
// failure on demand (the n-th allocation the library makes from now on fails); and, for every
// syscall, a fuzzed outcome (short transfers, EINTR, EAGAIN, ECONNRESET, EPIPE, ENOMEM from
// epoll_ctl, ENOTCONN from shutdown, accept4's EMFILE/ENFILE/ENOBUFS/ENOMEM back-off,
// ECONNABORTED/EPROTO/EPERM skips and EBADF). It ends with shutdown(grace) or with a drain (faults
// off, peers half-close and read until EOF). Invariants (FUZZ_CHECK):
//   - on_open once, before any other hook of its connection; on_close exactly once; nothing after
//     on_close; on_eof at most once and only after the peer half-closed or went away;
//   - a hook that threw while its connection was open closes it with Error::kHandlerException, and
//     that reason means a hook threw;
//   - every on_close reason is explained for that connection: an errno injected on its fd, a
//     limit its own traffic crossed, a timeout the input configured, an allocation that failed
//     while it was open, an abort by shutdown(grace), or a named consequence of what its peer did
//     (ECONNRESET/EPIPE/ENOTCONN after the peer vanished, kPeerHangup in level mode after it
//     half-closed or vanished);
//   - echo data: consumed input is a prefix of what the peer sent, accepted output a prefix of
//     consumed input, the peer receives a prefix of it (all of it when nothing failed);
//   - timers: never early, a cancelled or finished timer never runs, cancel() returns whether the
//     timer was pending (false for a one-shot inside its own callback), and at the end
//     pending_timers() equals the model's count;
//   - posted tasks run exactly once, in FIFO order, by the end (a post() that threw queued none);
//   - a handle is current exactly while its connection is open; a stale one reports not_connected;
//   - connection_count() equals the connections whose on_close has not run, after every step;
//   - shutdown(grace): afterwards connection_count() == 0, every connection got on_close once, the
//     acceptor is closed, and the report adds up (check_shutdown_report);
//   - every client of the Acceptor matched the accepted connection (TCP: by port), and a client
//     dropped at accept has a cause (a throwing copy, an allocation or registration failure).
// REACTOR_FUZZ_STATS=1 prints, at exit, how often each feature was reached.
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <reactor.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <new>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "fault_syscalls.hpp"
#include "fuzz_input.hpp"

// Issue 8 listed bugs this target trips over at once; REACTOR_FUZZ_ISSUE8_FIXED=0 steers around
// them instead of encoding them: with 0, an idle timeout comes with linger_timeout 0 (an
// idle close that lingers leaves a linger timer that can outlive its connection: see
// tests/fuzz/crashes/), and a connection whose timeout timer could not be armed may get on_close
// without on_open (Connection::open), tolerated only when an allocation failed. Both are fixed
// (issue 8), so it is 1: 0 rebuilds the target for the old code.
#ifndef REACTOR_FUZZ_ISSUE8_FIXED
#define REACTOR_FUZZ_ISSUE8_FIXED 1
#endif

// Acceptor::close() is noexcept but used to copy a Unix listener's path into a std::string, so an
// allocation failure there terminated the process (tests/fuzz/crashes/
// loop_fuzzer-acceptor-close-bad-alloc). Fixed: close() no longer allocates, so it is 1; with 0,
// allocation failures are not injected while a Unix acceptor is open.
#ifndef REACTOR_FUZZ_UNIX_ACCEPTOR_OOM
#define REACTOR_FUZZ_UNIX_ACCEPTOR_OOM 1
#endif

// GCC pairs the replaced operator new with free() below and warns of a mismatch that is not one.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

// --- allocation failure on demand ---------------------------------------------------------------
// Only allocations made while the library runs can fail: the harness marks its calls into the
// library with LibraryCall and its callbacks with HarnessCode, so its own bookkeeping (and
// libFuzzer's) never sees a failure.
namespace {

thread_local bool in_library = false;
thread_local int allocations_until_failure = 0;  // > 0: the n-th library allocation fails
thread_local std::size_t failed_allocations = 0;

bool fail_this_allocation() noexcept {
  if (!in_library || allocations_until_failure <= 0) return false;
  if (--allocations_until_failure > 0) return false;
  ++failed_allocations;
  return true;
}

struct LibraryCall {
  bool saved = std::exchange(in_library, true);
  ~LibraryCall() { in_library = saved; }
};
struct HarnessCode {
  bool saved = std::exchange(in_library, false);
  ~HarnessCode() { in_library = saved; }
};

// Runs `call` (a call into the library) with allocation failures armed.
template <class F>
auto library(F&& call) {
  const LibraryCall library_call;
  return call();
}

}  // namespace

void* operator new(std::size_t size) {
  if (fail_this_allocation()) throw std::bad_alloc();
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t size, const std::nothrow_t& /*tag*/) noexcept {
  if (fail_this_allocation()) return nullptr;
  return std::malloc(size == 0 ? 1 : size);
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t /*size*/) noexcept {
  std::free(p);
}

namespace {

using test::Call;
using test::Outcome;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// --- how often each feature was reached (REACTOR_FUZZ_STATS=1) ----------------------------------
// clang-format off
#define LOOP_FUZZ_FEATURES(X) \
  X(socketpair_connections) X(tcp_connections) X(unix_connections) X(accept_backoff_faults) \
  X(accept_skip_faults) X(accept_broken_listener) X(accept_dropped) X(copy_throws) X(on_open) \
  X(on_drain) X(on_eof) X(throw_on_open) X(throw_on_data) X(throw_on_drain) X(throw_on_eof) \
  X(throw_on_close) X(close_handler_exception) X(close_timed_out) X(close_canceled) \
  X(close_injected_errno) X(close_enomem_allocation) X(close_input_limit) \
  X(close_output_limit) X(close_peer_hangup) X(close_peer_consequence) X(close_clean) \
  X(failed_allocations) X(timers_scheduled) X(timers_fired) X(periodic_fired) \
  X(timer_self_cancel) X(timer_cancel_other) X(timer_throws) X(timers_cancelled_outside) \
  X(posts_ran) X(post_throws) X(handle_sends) X(handle_closes) X(stale_handle_calls) \
  X(shutdowns) X(shutdown_flushed) X(shutdown_aborted) X(drains)
// clang-format on

struct Stats {
#define LOOP_FUZZ_FIELD(name) std::size_t name = 0;
  LOOP_FUZZ_FEATURES(LOOP_FUZZ_FIELD)
#undef LOOP_FUZZ_FIELD
  ~Stats() {
    if (std::getenv("REACTOR_FUZZ_STATS") == nullptr) return;
#define LOOP_FUZZ_PRINT(name) std::fprintf(stderr, "loop_fuzzer %-26s %zu\n", #name, name);
    LOOP_FUZZ_FEATURES(LOOP_FUZZ_PRINT)
#undef LOOP_FUZZ_PRINT
  }
};
Stats stats;

enum class Transport { kSocketpair, kTcp, kUnix };
enum class Hook : std::uint8_t { kNone, kOnOpen, kOnData, kOnDrain, kOnEof, kOnClose, kCount };

constexpr std::size_t kNoTrack = static_cast<std::size_t>(-1);
constexpr std::size_t kMaxTracks = 8;
constexpr std::size_t kMaxTimers = 48;

char peer_byte(std::size_t index, std::size_t offset) {
  return static_cast<char>((offset * 7 + index * 13 + (offset >> 9)) & 0xff);
}

bool is_socket(int fd) {
  struct stat st {};
  return ::fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
}

template <class Trigger>
class Harness {
 public:
  using Loop = reactor::Reactor<Trigger, test::FaultSyscalls>;
  struct Handler;
  using Conn = reactor::Connection<Handler, Loop>;
  using Handle = reactor::ConnectionHandle<Loop>;

  struct Handler {
    Harness* harness;
    std::size_t index;

    Handler(Harness* h, std::size_t i) noexcept : harness(h), index(i) {}
    Handler(Handler&&) noexcept = default;
    // The Acceptor copies its prototype per connection; the input can make that copy throw.
    Handler(const Handler& other) : harness(other.harness), index(other.index) {
      HarnessCode harness_code;
      if (std::exchange(harness->throw_on_next_copy_, false)) {
        ++harness->drop_causes_;
        ++stats.copy_throws;
        throw std::runtime_error("fuzz: handler copy");
      }
    }
    Handler& operator=(const Handler&) = delete;
    Handler& operator=(Handler&&) = delete;

    void on_open(Conn& c) { harness->on_open(c, *this); }
    std::size_t on_data(Conn& c, std::string_view bytes) {
      return harness->on_data(c, index, bytes);
    }
    void on_drain(Conn& c) { harness->on_drain(c, index); }
    void on_eof(Conn& c) { harness->on_eof(c, index); }
    void on_close(Conn& c, std::error_code reason) { harness->on_close(c, index, reason); }
  };

  // What the harness knows about one connection and its peer; outlives both.
  struct Track {
    reactor::UniqueFd peer;
    std::uint16_t client_port = 0;  // TCP: the peer's local port
    std::string peer_sent, in, out, deferred, refused, peer_received;
    Conn* connection = nullptr;  // from on_open (or adopt) until on_close
    Handle handle;
    bool had_handle = false;
    int server_fd = -1;
    int opens = 0, closes = 0, eofs = 0, late_calls = 0;
    Hook throw_in = Hook::kNone;
    bool threw = false;         // a hook threw while the connection was open
    std::vector<int> injected;  // fatal errnos injected on its fd while it was open
    std::size_t failed_allocations_at_open = 0;
    bool output_limit_possible = false, input_limit_possible = false, canceled_possible = false;
    bool input_dropped = false, aborted = false;
    bool peer_shut = false, peer_gone = false, peer_eof = false;
    int peer_error = 0;
    bool dropped = false;  // an Acceptor client that never became a connection
    std::error_code reason;

    void echo(bool accepted, std::string_view bytes) {
      if (accepted) {
        out.append(bytes);
      } else if (refused.empty() && !bytes.empty()) {
        refused.assign(bytes);
      }
    }
  };

  struct TimerModel {
    reactor::TimerId id;
    Clock::time_point due;  // a lower bound of the real deadline
    Clock::duration period{};
    bool pending = true;
    int fired = 0;
  };

  explicit Harness(fuzz::FuzzInput& input) : input_(input) {}

  void run() {
    test::FaultScript script;
    script.choose([this](Call call, int fd) { return choose(call, fd); });
    script.rewrite_batches([this](std::span<epoll_event> batch) {
      HarnessCode harness_code;
      if (faults_on_ && batch.size() > 1 && input_.byte() < 64) {
        std::reverse(batch.begin(), batch.end());
      }
    });

    transport_ = static_cast<Transport>(input_.below(3));
    reactor::ReactorOptions reactor_options;
    reactor_options.read_buffer_size = 1024 * (1 + input_.below(4));
    reactor_options.max_reads_per_wakeup = 1 + static_cast<int>(input_.below(3));
    reactor_options.initial_events = 1 + static_cast<int>(input_.below(4));
    options_.high_water = 512 * (1 + input_.below(32));
    options_.low_water = options_.high_water / (1 + input_.below(4));
    options_.max_pending_output = options_.high_water * (1 + input_.below(8));
    options_.max_pending_input = 512 * (1 + input_.below(16));
    const auto timeout = [this] {
      return milliseconds(input_.below(4) == 0 ? 1 + input_.below(30) : 0);
    };
    options_.idle_timeout = timeout();
    options_.read_timeout = timeout();
    options_.write_timeout = timeout();
    switch (input_.below(3)) {
      case 0:
        options_.linger_timeout = milliseconds(0);
        break;
      case 1:
        options_.linger_timeout = milliseconds(1 + input_.below(20));
        break;
      default:
        break;  // the default, 2 s: lingering ends with the peer's EOF or shutdown's deadline
    }
#if !REACTOR_FUZZ_ISSUE8_FIXED
    if (options_.idle_timeout.count() != 0) options_.linger_timeout = milliseconds(0);
#endif
    max_output_ = std::max(options_.max_pending_output, options_.high_water);

    {
      Loop loop(reactor_options);
      loop_ = &loop;
      if (transport_ != Transport::kSocketpair) listen();
      faults_on_ = true;
      for (std::size_t i = 0, n = 1 + input_.below(3); i < n; ++i) connect();
      for (int steps = 0; !input_.empty() && steps < 1500 && !shut_down_; ++steps) {
        step();
        check_counts();
      }
      if (!shut_down_ && input_.flag()) shutdown_now();
      faults_on_ = false;
      allocations_until_failure = 0;
      if (!shut_down_) drain();
      finish_posted();
      check_all();
      acceptor_.reset();
      loop_ = nullptr;
    }
    for (Track& t : tracks_) t.peer.reset();  // a peer may hold a number a server socket had
    for (Track& t : tracks_) {
      if (t.server_fd >= 0) FUZZ_CHECK(::fcntl(t.server_fd, F_GETFD) == -1 && errno == EBADF);
    }
  }

 private:
  // --- setup -------------------------------------------------------------------------------------

  void listen() {
    reactor::ListenOptions listen_options;
    listen_options.connection = options_;
    listen_options.accept_budget = 1 + static_cast<int>(input_.below(4));
    listen_options.backlog = 64;
    reactor::Endpoint endpoint;
    if (transport_ == Transport::kTcp) {
      endpoint = reactor::Endpoint::from_host_port("127.0.0.1", 0);
    } else {
      static unsigned serial = 0;
      endpoint = reactor::Endpoint::unix_path("@reactor-loop-fuzzer-" + std::to_string(::getpid()) +
                                              "-" + std::to_string(serial++));
    }
    acceptor_ =
        std::make_unique<Acceptor>(*loop_, endpoint, Handler{this, kNoTrack}, listen_options);
    endpoint_ = acceptor_->local_endpoint();
  }

  // A new connection: a socketpair adopted by the reactor, or a client of the acceptor.
  void connect() {
    if (tracks_.size() >= kMaxTracks) return;
    const std::size_t i = tracks_.size();
    if (transport_ == Transport::kSocketpair) {
      int fds[2];
      FUZZ_CHECK(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) == 0);
      tracks_.emplace_back();
      tracks_[i].peer.reset(fds[1]);
      tracks_[i].throw_in = pick_throw();
      ++stats.socketpair_connections;
      std::error_code ec;
      opening_fd_ = fds[0];
      const std::size_t failures = failed_allocations;
      Conn* c;
      {
        LibraryCall library;
        c = reactor::adopt(*loop_, reactor::UniqueFd(fds[0]), Handler{this, i}, options_, ec);
      }
      opening_fd_ = -1;
      Track& t = tracks_[i];
      if (c == nullptr) {  // an injected epoll_ctl failure or a failed allocation
        FUZZ_CHECK(ec == std::errc::not_enough_memory);
        FUZZ_CHECK(t.opens == 0 && t.closes == 0);
        FUZZ_CHECK(opening_enomem_ || failed_allocations > failures);
        t.dropped = true;
        t.peer_gone = true;
        t.peer.reset();
      } else {
        if (t.opens == 0) {  // on_open did not run (see REACTOR_FUZZ_ISSUE8_FIXED)
          bind_track(t, *c);
          t.failed_allocations_at_open = failures;
        }
        t.server_fd = fds[0];
      }
      opening_enomem_ = false;
      return;
    }
    if (acceptor_ == nullptr || !acceptor_->is_open()) return;
    const bool tcp = transport_ == Transport::kTcp;
    reactor::UniqueFd client(
        ::socket(tcp ? AF_INET : AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    FUZZ_CHECK(client.get() >= 0);
    if (::connect(client.get(), endpoint_.data(), endpoint_.size()) != 0) {
      if (errno != EINPROGRESS) return;    // the listener is gone or its backlog is full
      pollfd p{client.get(), POLLOUT, 0};  // loopback: the handshake is a matter of microseconds
      int error = 0;
      socklen_t length = sizeof error;
      if (::poll(&p, 1, 1000) != 1 ||
          ::getsockopt(client.get(), SOL_SOCKET, SO_ERROR, &error, &length) != 0 || error != 0) {
        return;
      }
    }
    tracks_.emplace_back();
    Track& t = tracks_[i];
    if (tcp) {
      sockaddr_in local{};
      socklen_t length = sizeof local;
      FUZZ_CHECK(::getsockname(client.get(), reinterpret_cast<sockaddr*>(&local), &length) == 0);
      t.client_port = ntohs(local.sin_port);
    }
    t.peer = std::move(client);
    t.throw_in = pick_throw();
    clients_.push_back(i);
    ++(tcp ? stats.tcp_connections : stats.unix_connections);
  }

  Hook pick_throw() {
    const std::uint8_t b = input_.byte();
    return b < 200 ? Hook::kNone : static_cast<Hook>(1 + b % (static_cast<int>(Hook::kCount) - 1));
  }

  void bind_track(Track& t, Conn& c) {
    t.connection = &c;
    t.server_fd = c.native_handle();
    t.failed_allocations_at_open = failed_allocations;
  }

  // --- syscall outcomes
  // ----------------------------------------------------------------------------

  // The open connection whose socket is `fd`, if any.
  Track* track_of(int fd) {
    for (Track& t : tracks_) {
      if (t.connection != nullptr && t.connection->native_handle() == fd) return &t;
    }
    return nullptr;
  }

  Outcome inject(Track* t, int error) {
    if (t != nullptr) t->injected.push_back(error);
    return test::fail(error);
  }

  Outcome choose(Call call, int fd) {
    HarnessCode harness_code;  // runs inside the library's syscalls
    // An exhausted input reads as zeros: passing then keeps a retried call (EINTR) from looping.
    if (!faults_on_ || input_.empty()) return test::pass();
    if (call == Call::kEpollWait) {
      const std::uint8_t b = input_.byte();
      if (b < 40) return test::at_most(1 + input_.below(3));
      if (b < 50) return test::fail(EINTR);
      return test::pass();
    }
    if (call == Call::kAccept4) return choose_accept();
    if (acceptor_ != nullptr && fd == acceptor_->native_handle()) {
      if (call == Call::kEpollCtl && input_.byte() >= 248) return test::fail(ENOMEM);
      return test::pass();
    }
    Track* t = track_of(fd);
    // TCP in edge mode: a short read or write means "empty" or "full" (see reliability.md), and a
    // stray EAGAIN on a read is outside the syscall contract in edge mode on any socket.
    const bool tcp_edge = Trigger::kEdge && transport_ == Transport::kTcp;
    switch (call) {
      case Call::kRead:
      case Call::kSend:
      case Call::kSendmsg: {
        if (t == nullptr) return test::pass();
        const std::uint8_t b = input_.byte();
        if (b < 50 && !tcp_edge) return test::at_most(1 + input_.below(4096));
        if (b < 65) return test::fail(EINTR);
        if (b < 80 && !(Trigger::kEdge && call == Call::kRead)) return test::fail(EAGAIN);
        if (b >= 254) return inject(t, call == Call::kRead ? ECONNRESET : EPIPE);
        return test::pass();
      }
      case Call::kEpollCtl: {
        const bool opening =
            fd == opening_fd_ ||
            (t == nullptr && transport_ != Transport::kSocketpair && is_socket(fd) && !is_peer(fd));
        if (t == nullptr && !opening) return test::pass();  // the wakeup eventfd, the timerfd
        if (input_.byte() < 250) return test::pass();
        if (opening) {
          opening_enomem_ = true;
          ++drop_causes_;
        }
        return inject(t, ENOMEM);
      }
      case Call::kShutdown:
        if (t != nullptr && input_.byte() >= 248) return inject(t, ENOTCONN);
        return test::pass();
      default:
        return test::pass();
    }
  }

  bool is_peer(int fd) const {
    return std::any_of(tracks_.begin(), tracks_.end(),
                       [fd](const Track& t) { return t.peer.get() == fd; });
  }

  Outcome choose_accept() {
    const std::uint8_t b = input_.byte();
    if (b < 16 && backoff_faults_ < 3) {  // at most 10 + 20 + 40 ms of back-off per input
      ++backoff_faults_;
      ++stats.accept_backoff_faults;
      static constexpr int kShortOf[] = {EMFILE, ENFILE, ENOBUFS, ENOMEM};
      return test::fail(kShortOf[b % 4]);
    }
    if (b < 40) {
      ++stats.accept_skip_faults;
      static constexpr int kSkip[] = {ECONNABORTED, EPROTO, EPERM, EINTR};
      return test::fail(kSkip[b % 4]);
    }
    if (b < 48) return test::fail(EAGAIN);
    if (b == 255) {
      ++stats.accept_broken_listener;
      return test::fail(EBADF);  // the listener is broken: the acceptor closes itself
    }
    return test::pass();
  }

  // --- hooks
  // ---------------------------------------------------------------------------------------

  // Throws if the input planned a throw from `hook` on this connection (once).
  void maybe_throw(Track& t, Conn& c, Hook hook, std::size_t& counter) {
    if (t.throw_in != hook) return;
    t.throw_in = Hook::kNone;
    if (c.is_open()) t.threw = true;
    ++counter;
    throw std::runtime_error("fuzz: hook throws");
  }

  void check_alive(Track& t, Conn& c) {
    if (!c.is_open() || t.closes > 0 || t.opens != 1 || t.connection != &c) ++t.late_calls;
  }

  void on_open(Conn& c, Handler& handler) {
    HarnessCode harness_code;
    if (handler.index == kNoTrack) {  // accepted: the k-th accepted socket is the k-th client
      FUZZ_CHECK(acceptor_ != nullptr);
      const std::size_t k = static_cast<std::size_t>(acceptor_->accepted_count()) - 1;
      FUZZ_CHECK(k < clients_.size());
      handler.index = clients_[k];
      if (transport_ == Transport::kTcp) {
        LibraryCall library;
        FUZZ_CHECK(c.remote_endpoint().port() == tracks_[handler.index].client_port);
      }
    }
    Track& t = tracks_[handler.index];
    ++t.opens;
    ++stats.on_open;
    if (in_shutdown_) ++opened_in_shutdown_;  // accepted from the queue of a closing listener
    FUZZ_CHECK(t.opens == 1 && t.closes == 0 && c.is_open());
    bind_track(t, c);
    if (input_.byte() < 64) take_handle(t);
    maybe_throw(t, c, Hook::kOnOpen, stats.throw_on_open);
  }

  std::size_t on_data(Conn& c, std::size_t index, std::string_view bytes) {
    HarnessCode harness_code;
    Track& t = tracks_[index];
    check_alive(t, c);
    maybe_throw(t, c, Hook::kOnData, stats.throw_on_data);
    const std::uint8_t action = faults_on_ ? input_.byte() : 0;
    std::size_t consumed = bytes.size();
    if (action % 16 == 1) {
      consumed = input_.below(bytes.size() + 1);
      if (consumed < bytes.size()) t.input_dropped = true;
      if (bytes.size() - consumed > options_.max_pending_input) t.input_limit_possible = true;
    }
    const std::string taken(bytes.substr(0, consumed));
    t.in.append(taken);
    if (action % 16 == 9 || !t.deferred.empty()) {
      t.deferred.append(taken);
    } else {
      send(t, c, taken);
    }
    switch (action % 16) {
      case 2: {
        LibraryCall library;
        c.shutdown();
        break;
      }
      case 3:
        close_connection(index);
        break;
      case 4:
        abort_connection(index);
        break;
      case 5:
        pause_connection(index);
        break;
      case 6:
        resume_connection(input_.below(tracks_.size()));
        break;
      case 7:
        schedule_timer();
        break;
      case 8:
        cancel_timer();
        break;
      case 10:
        post_task();
        break;
      case 11:
        handle_op(input_.below(tracks_.size()));
        break;
      default:
        break;
    }
    return consumed;
  }

  void on_drain(Conn& c, std::size_t index) {
    HarnessCode harness_code;
    Track& t = tracks_[index];
    check_alive(t, c);
    ++stats.on_drain;
    maybe_throw(t, c, Hook::kOnDrain, stats.throw_on_drain);
  }

  void on_eof(Conn& c, std::size_t index) {
    HarnessCode harness_code;
    Track& t = tracks_[index];
    check_alive(t, c);
    ++t.eofs;
    ++stats.on_eof;
    FUZZ_CHECK(t.eofs == 1);
    FUZZ_CHECK(t.peer_shut || t.peer_gone);
    maybe_throw(t, c, Hook::kOnEof, stats.throw_on_eof);
    switch (faults_on_ ? input_.below(3) : 0) {
      case 0:
        close_connection(index);
        break;
      case 1: {
        LibraryCall library;
        c.shutdown();
        break;
      }
      default:
        break;  // left half-open; the drain closes it
    }
  }

  void on_close(Conn& c, std::size_t index, std::error_code reason) {
    HarnessCode harness_code;
    if (index == kNoTrack) {  // accepted, and closed without on_open: issue 8
      FUZZ_CHECK(!REACTOR_FUZZ_ISSUE8_FIXED && allocation_failures() > 0);
      return;
    }
    Track& t = tracks_[index];
    if (c.is_open() || t.closes > 0 || t.connection != &c) ++t.late_calls;
    ++t.closes;
    t.reason = reason;
    t.connection = nullptr;
    if (in_shutdown_) t.canceled_possible = true;
    count_reason(t);
    if (t.had_handle) {
      LibraryCall library;
      FUZZ_CHECK(!t.handle.is_current());
      FUZZ_CHECK(t.handle.send("late") == std::errc::not_connected);
      FUZZ_CHECK(t.handle.close() == std::errc::not_connected);
      ++stats.stale_handle_calls;
    }
    if (t.throw_in == Hook::kOnClose) {
      t.throw_in = Hook::kNone;
      ++stats.throw_on_close;
      throw std::runtime_error("fuzz: on_close throws");  // dropped by the library
    }
  }

  // --- connection actions (from steps, hooks, timers and posted tasks)
  // -----------------------------

  void send(Track& t, Conn& c, std::string_view bytes) {
    const std::size_t pending = c.pending_output_bytes();
    const bool accepted = library([&] { return c.send(bytes); });
    if (!accepted && pending + bytes.size() > max_output_) t.output_limit_possible = true;
    t.echo(accepted, bytes);
  }

  void send_deferred(std::size_t i) {
    Track& t = tracks_[i];
    if (t.connection != nullptr && !t.deferred.empty()) {
      const std::string bytes = std::exchange(t.deferred, {});
      send(t, *t.connection, bytes);
    }
  }

  void close_connection(std::size_t i) {
    if (Conn* c = tracks_[i].connection) {
      tracks_[i].input_dropped = true;
      LibraryCall library;
      c->close();
    }
  }
  void abort_connection(std::size_t i) {
    if (Conn* c = tracks_[i].connection) {
      tracks_[i].input_dropped = true;
      tracks_[i].aborted = true;
      const bool reset = input_.flag();
      LibraryCall library;
      c->abort(reset);
    }
  }
  void pause_connection(std::size_t i) {
    if (Conn* c = tracks_[i].connection) {
      LibraryCall library;
      c->pause_reading();
    }
  }
  void resume_connection(std::size_t i) {
    if (Conn* c = tracks_[i].connection) {
      LibraryCall library;
      c->resume_reading();
    }
  }

  void take_handle(Track& t) {
    if (t.had_handle || t.connection == nullptr) return;
    LibraryCall library;
    t.handle = t.connection->handle();
    // Only an allocation failure (the handle table could not grow) leaves it empty.
    t.had_handle = t.handle.reactor() != nullptr;
  }

  // handle_op() from inside the loop, where a handle takes the direct path this model follows (from
  // outside any run it posts, and posted bytes may be dropped by a close that comes first).
  void handle_op_in_loop(std::size_t i) {
    try {
      LibraryCall library;
      loop_->post([this, i] {
        HarnessCode harness_code;
        handle_op(i);
      });
    } catch (const std::bad_alloc&) {
      return;  // nothing was queued
    }
    run_loop(milliseconds(0));
  }

  // Through a ConnectionHandle: echo what was deferred, or close. A handle is current exactly
  // while its connection is open; a stale one reports not_connected and does nothing.
  void handle_op(std::size_t i) {
    Track& t = tracks_[i];
    take_handle(t);
    if (!t.had_handle) return;
    const bool open = t.connection != nullptr && t.connection->is_open();
    FUZZ_CHECK(library([&] { return t.handle.is_current(); }) == open);
    if (input_.flag()) {
      const std::string bytes = std::exchange(t.deferred, {});
      const std::size_t pending = open ? t.connection->pending_output_bytes() : 0;
      const std::error_code ec = library([&] { return t.handle.send(bytes); });
      if (ec && pending + bytes.size() > max_output_) t.output_limit_possible = true;
      ++stats.handle_sends;
      if (!open) {
        FUZZ_CHECK(ec == std::errc::not_connected);
        ++stats.stale_handle_calls;
      } else {
        // Refused: the connection is closing, or this send failed (on_close says why).
        FUZZ_CHECK(!ec || ec == std::errc::not_connected);
      }
      t.echo(!ec, bytes);
    } else {
      const std::error_code ec = library([&] { return t.handle.close(); });
      ++stats.handle_closes;
      FUZZ_CHECK(open ? !ec : ec == std::errc::not_connected);
      if (open) t.input_dropped = true;
    }
  }

  // --- timers and posted work --------------------------------------------------------------------

  void schedule_timer() {
    if (timers_.size() >= kMaxTimers) return;
    const std::size_t k = timers_.size();
    TimerModel model;
    const auto delay = milliseconds(input_.below(16));
    const std::size_t kind = input_.below(3);
    // schedule_every runs first after one period, at least 1 us.
    if (kind == 2) model.period = std::max<Clock::duration>(delay, std::chrono::microseconds(1));
    model.due = Clock::now() + (kind == 2 ? model.period : delay);
    timers_.push_back(model);
    ++stats.timers_scheduled;
    const std::size_t failures = failed_allocations;
    try {
      LibraryCall library;
      const auto callback = [this, k] { fire(k); };
      reactor::TimerId id;
      if (kind == 0) {
        id = loop_->schedule_after(delay, callback);
      } else if (kind == 1) {
        id = loop_->schedule_at(timers_[k].due, callback);
      } else {
        id = loop_->schedule_every(delay, callback);
      }
      timers_[k].id = id;
    } catch (const std::bad_alloc&) {
      FUZZ_CHECK(failed_allocations > failures);
      timers_[k].pending = false;
    }
  }

  void cancel_timer() {
    if (timers_.empty()) return;
    TimerModel& model = timers_[input_.below(timers_.size())];
    if (!model.id) return;  // never scheduled
    LibraryCall library;
    FUZZ_CHECK(loop_->cancel(model.id) == model.pending);
    if (model.pending) ++stats.timers_cancelled_outside;
    model.pending = false;
  }

  void fire(std::size_t k) {
    HarnessCode harness_code;
    const Clock::time_point now = Clock::now();
    {
      TimerModel& model = timers_[k];
      FUZZ_CHECK(model.pending);     // neither cancelled nor a one-shot that already ran
      FUZZ_CHECK(now >= model.due);  // never early
      ++model.fired;
      ++stats.timers_fired;
      if (model.period == Clock::duration::zero()) {
        model.pending = false;
      } else {
        ++stats.periodic_fired;
        model.due += model.period;  // the next deadline is at least one period on
      }
    }
    if (!faults_on_) return;
    switch (input_.below(8)) {
      case 0: {  // cancel itself: true while periodic, false for a one-shot (it already ran)
        TimerModel& model = timers_[k];
        LibraryCall library;
        FUZZ_CHECK(loop_->cancel(model.id) == model.pending);
        model.pending = false;
        ++stats.timer_self_cancel;
        break;
      }
      case 1: {
        if (timers_.empty()) break;
        TimerModel& other = timers_[input_.below(timers_.size())];
        if (!other.id) break;
        LibraryCall library;
        FUZZ_CHECK(loop_->cancel(other.id) == other.pending);
        other.pending = false;
        ++stats.timer_cancel_other;
        break;
      }
      case 2:
        schedule_timer();
        break;
      case 3:
        close_connection(input_.below(tracks_.size()));
        break;
      case 4:
        abort_connection(input_.below(tracks_.size()));
        break;
      case 5:
        post_task();
        break;
      case 6:
        ++stats.timer_throws;
        throw std::runtime_error("fuzz: timer throws");  // counted and dropped by the queue
      default:
        send_deferred(input_.below(tracks_.size()));
        break;
    }
  }

  void post_task() {
    if (posted_ >= 64) return;
    const std::size_t sequence = posted_;
    const std::uint8_t action = input_.byte();
    const std::size_t failures = failed_allocations;
    try {
      LibraryCall library;
      loop_->post([this, sequence, action] { run_posted(sequence, action); });
      ++posted_;
    } catch (const std::bad_alloc&) {
      FUZZ_CHECK(failed_allocations > failures);
      ++posted_;
      skipped_posts_.push_back(sequence);
    }
  }

  void run_posted(std::size_t sequence, std::uint8_t action) {
    HarnessCode harness_code;
    // FIFO: every earlier post ran (or was never queued because post() threw).
    while (std::find(skipped_posts_.begin(), skipped_posts_.end(), ran_posts_) !=
           skipped_posts_.end()) {
      ++ran_posts_;
    }
    FUZZ_CHECK(sequence == ran_posts_);
    ++ran_posts_;
    ++stats.posts_ran;
    if (!faults_on_) return;
    const std::size_t i = action % tracks_.size();
    switch (action / 32) {
      case 0:
        ++stats.post_throws;
        throw std::runtime_error("fuzz: posted task throws");  // dropped by the loop
      case 1:
        handle_op(i);
        break;
      case 2:
        close_connection(i);
        break;
      case 3:
        schedule_timer();
        break;
      case 4:
        post_task();
        break;
      default:
        send_deferred(i);
        break;
    }
  }

  // --- the peers
  // -----------------------------------------------------------------------------------

  void peer_write(std::size_t i, std::size_t size) {
    Track& t = tracks_[i];
    if (t.peer_gone || t.peer_shut) return;
    std::string bytes(size, '\0');
    for (std::size_t k = 0; k < size; ++k) bytes[k] = peer_byte(i, t.peer_sent.size() + k);
    const ssize_t n = ::send(t.peer.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n > 0) t.peer_sent.append(bytes.data(), static_cast<std::size_t>(n));
  }

  void peer_read(std::size_t i, std::size_t limit) {
    Track& t = tracks_[i];
    if (t.peer_gone) return;
    char buffer[16384];
    while (limit > 0 && !t.peer_eof && t.peer_error == 0) {
      const ssize_t n = ::read(t.peer.get(), buffer, std::min(limit, sizeof buffer));
      if (n > 0) {
        t.peer_received.append(buffer, static_cast<std::size_t>(n));
        limit -= static_cast<std::size_t>(n);
      } else if (n == 0) {
        t.peer_eof = true;
      } else {
        if (errno != EAGAIN && errno != EINTR) t.peer_error = errno;
        break;
      }
    }
  }

  void peer_shut(std::size_t i) {
    Track& t = tracks_[i];
    if (t.peer_gone || t.peer_shut) return;
    if (::shutdown(t.peer.get(), SHUT_WR) == 0) t.peer_shut = true;
  }

  // After the server side closed: the rest of its output, up to EOF or an error (TCP may still
  // be moving it across loopback).
  void peer_read_to_end(std::size_t i) {
    Track& t = tracks_[i];
    for (int round = 0; round < 50 && !t.peer_gone && !t.peer_eof && t.peer_error == 0; ++round) {
      peer_read(i, SIZE_MAX);
      pollfd p{t.peer.get(), POLLIN, 0};
      if (!t.peer_eof && t.peer_error == 0) ::poll(&p, 1, 10);
    }
  }

  // --- steps
  // ---------------------------------------------------------------------------------------

  void run_loop(milliseconds timeout) {
    LibraryCall library;
    loop_->run_once(timeout);
  }

  void step() {
    const std::size_t i = tracks_.empty() ? 0 : input_.below(tracks_.size());
    const bool any = !tracks_.empty();
    switch (input_.below(16)) {
      case 0:
      case 1:
        if (any) peer_write(i, 1 + input_.below(6000));
        break;
      case 2:
        if (any) peer_read(i, 1 + input_.below(30000));
        break;
      case 3:
      case 4:
      case 5:
        run_loop(milliseconds(0));
        break;
      case 6: {  // let time pass (timeouts, lingering, back-off), within a small budget per input
        const auto wait = milliseconds(1 + input_.below(12));
        if (slept_ + wait <= milliseconds(60)) {
          slept_ += wait;
          run_loop(wait);
        }
        break;
      }
      case 7:
        if (!any) break;
        if (input_.below(3) != 0) {
          peer_shut(i);
        } else if (!tracks_[i].peer_gone) {
          tracks_[i].peer.reset();  // vanishes, unread bytes and all
          tracks_[i].peer_gone = true;
        }
        break;
      case 8:
        if (input_.flag()) {
          schedule_timer();
        } else {
          cancel_timer();
        }
        break;
      case 9:
        post_task();
        break;
      case 10:
        if (any) handle_op_in_loop(i);
        break;
      case 11:
        if (!any) break;
        switch (input_.below(6)) {
          case 0:
            close_connection(i);
            break;
          case 1:
            abort_connection(i);
            break;
          case 2:
            if (Conn* c = tracks_[i].connection) {
              LibraryCall library;
              c->shutdown();
            }
            break;
          case 3:
            pause_connection(i);
            break;
          case 4:
            resume_connection(i);
            break;
          default:
            send_deferred(i);
            break;
        }
        break;
      case 12:
        connect();
        break;
      case 13:  // the n-th allocation the library makes from now on fails
        allocations_until_failure = 1 + static_cast<int>(input_.below(8));
        if (!REACTOR_FUZZ_UNIX_ACCEPTOR_OOM && transport_ == Transport::kUnix &&
            acceptor_->is_open()) {
          allocations_until_failure = 0;
        }
        break;
      case 14:
        throw_on_next_copy_ = input_.below(4) == 0;
        break;
      default:
        if (input_.below(8) == 0) shutdown_now();
        break;
    }
    note_dropped_clients();
  }

  // Acceptor clients accepted without becoming a connection: each needs a cause.
  void note_dropped_clients() {
    if (acceptor_ == nullptr) return;
    const std::size_t accepted = static_cast<std::size_t>(acceptor_->accepted_count());
    for (; checked_clients_ < accepted && checked_clients_ < clients_.size(); ++checked_clients_) {
      Track& t = tracks_[clients_[checked_clients_]];
      if (t.opens == 0) {
        t.dropped = true;
        ++dropped_;
        ++stats.accept_dropped;
      }
    }
    FUZZ_CHECK(dropped_ <= drop_causes_ + allocation_failures());
  }

  // Allocations that failed during this input.
  std::size_t allocation_failures() const {
    return failed_allocations - failures_at_start_;
  }

  std::size_t open_connections() const {
    return static_cast<std::size_t>(
        std::count_if(tracks_.begin(), tracks_.end(), [](const Track& t) { return t.connection; }));
  }

  void check_counts() {
#if REACTOR_FUZZ_ISSUE8_FIXED
    FUZZ_CHECK(loop_->connection_count() == open_connections());
#else  // an accepted connection may close without on_open (unseen here) when an allocation failed
    FUZZ_CHECK(loop_->connection_count() == open_connections() ||
               (loop_->connection_count() > open_connections() && allocation_failures() > 0));
#endif
    for (Track& t : tracks_) {
      if (t.had_handle) {
        LibraryCall library;
        FUZZ_CHECK(t.handle.is_current() == (t.connection != nullptr && t.connection->is_open()));
      }
    }
  }

  // --- the end
  // -------------------------------------------------------------------------------------

  // The report of shutdown(grace), against the connections open when it started and those it
  // accepted from the closing listener's queue. (A third count, should the core add one, belongs
  // here.)
  static void check_shutdown_report(const reactor::ShutdownReport& report, std::size_t counted) {
    FUZZ_CHECK(!report.error);
    FUZZ_CHECK(report.flushed + report.failed + report.aborted == counted);
  }

  void shutdown_now() {
    const std::size_t open_before = open_connections();
    FUZZ_CHECK(loop_->connection_count() == open_before);
    for (Track& t : tracks_) {
      // A connection closed once quiet, or aborted at the deadline, may leave input unread.
      if (t.connection != nullptr) t.input_dropped = true;
    }
    const auto grace = milliseconds(input_.below(4) == 0 ? 0 : input_.below(20));
    reactor::ShutdownReport report;
    in_shutdown_ = true;
    opened_in_shutdown_ = 0;
    {
      LibraryCall library;
      report = loop_->shutdown(grace);
    }
    in_shutdown_ = false;
    shut_down_ = true;
    ++stats.shutdowns;
    stats.shutdown_flushed += report.flushed;
    stats.shutdown_aborted += report.aborted;
    FUZZ_CHECK(loop_->connection_count() == 0);
    for (const Track& t : tracks_) FUZZ_CHECK(t.opens == 0 || t.closes == 1);
    if (acceptor_ != nullptr) FUZZ_CHECK(!acceptor_->is_open());
    check_shutdown_report(report, open_before + opened_in_shutdown_);
    note_dropped_clients();
    for (std::size_t i = 0; i < tracks_.size(); ++i) {
      if (tracks_[i].opens == 0) tracks_[i].dropped = true;  // the listener closed under it
      peer_read_to_end(i);
    }
  }

  // No more faults: unaccepted clients are dropped, paused connections resume, peers half-close
  // and read until EOF, and the harness closes what on_eof left half-open.
  void drain() {
    ++stats.drains;
    if (acceptor_ != nullptr) {
      LibraryCall library;
      acceptor_->close();
    }
    note_dropped_clients();
    for (std::size_t i = 0; i < tracks_.size(); ++i) {
      if (tracks_[i].opens == 0) tracks_[i].dropped = true;
      send_deferred(i);
      resume_connection(i);
      peer_shut(i);
    }
    for (int round = 0; round < 20000; ++round) {
      run_loop(milliseconds(0));
      bool done = true;
      for (std::size_t i = 0; i < tracks_.size(); ++i) {
        Track& t = tracks_[i];
        if (t.eofs > 0 && t.connection != nullptr) close_connection(i);
        peer_read(i, SIZE_MAX);
        done = done && (t.dropped || t.closes > 0) && (t.peer_gone || t.peer_eof || t.peer_error);
      }
      if (done) return;
    }
  }

  void finish_posted() {
    for (int round = 0; round < 16 && ran_posts_ + skipped_after() < posted_; ++round) {
      run_loop(milliseconds(0));
    }
  }
  std::size_t skipped_after() const {
    return static_cast<std::size_t>(
        std::count_if(skipped_posts_.begin(), skipped_posts_.end(),
                      [this](std::size_t s) { return s >= ran_posts_; }));
  }

  // Whether `reason` is explained for this connection (see the top of the file).
  bool explained(const Track& t, const std::error_code& reason) const {
    using reactor::Error;
    if (!reason) return true;
    if (reason == Error::kHandlerException) return t.threw;
    if (reason == Error::kOutputLimit) return t.output_limit_possible;
    if (reason == Error::kInputLimit) return t.input_limit_possible;
    if (reason == Error::kPeerHangup) return !Trigger::kEdge && (t.peer_shut || t.peer_gone);
    if (reason == std::errc::timed_out) {
      return (options_.idle_timeout + options_.read_timeout + options_.write_timeout).count() > 0;
    }
    if (reason == std::errc::operation_canceled) return t.canceled_possible;
    if (reason.category() != std::system_category() &&
        reason.category() != std::generic_category()) {
      return false;
    }
    const int error = reason.value();
    if (std::find(t.injected.begin(), t.injected.end(), error) != t.injected.end()) return true;
    if (error == ENOMEM) return failed_allocations > t.failed_allocations_at_open;
    // The peer vanished: reset (it closed with unread bytes), broken pipe, or a TCP socket the
    // reset already disconnected.
    if (error == ECONNRESET || error == EPIPE) return t.peer_gone;
    if (error == ENOTCONN) return t.peer_gone && transport_ == Transport::kTcp;
    return false;
  }

  void count_reason(const Track& t) {
    using reactor::Error;
    const std::error_code& r = t.reason;
    if (!r) {
      ++stats.close_clean;
    } else if (r == Error::kHandlerException) {
      ++stats.close_handler_exception;
    } else if (r == Error::kInputLimit) {
      ++stats.close_input_limit;
    } else if (r == Error::kOutputLimit) {
      ++stats.close_output_limit;
    } else if (r == Error::kPeerHangup) {
      ++stats.close_peer_hangup;
    } else if (r == std::errc::timed_out) {
      ++stats.close_timed_out;
    } else if (r == std::errc::operation_canceled) {
      ++stats.close_canceled;
    } else if (std::find(t.injected.begin(), t.injected.end(), r.value()) != t.injected.end()) {
      ++stats.close_injected_errno;
    } else if (r == std::errc::not_enough_memory) {
      ++stats.close_enomem_allocation;
    } else {
      ++stats.close_peer_consequence;
    }
  }

  static bool is_prefix(std::string_view prefix, std::string_view of) {
    return prefix.size() <= of.size() && of.substr(0, prefix.size()) == prefix;
  }

  void dump() const {
    static const bool verbose = std::getenv("REACTOR_FUZZ_VERBOSE") != nullptr;
    if (!verbose) return;
    std::fprintf(stderr, "%s, transport %d, %zu connections, %zu timers pending\n",
                 Trigger::kEdge ? "edge" : "level", static_cast<int>(transport_),
                 loop_->connection_count(), loop_->pending_timers());
    for (std::size_t i = 0; i < tracks_.size(); ++i) {
      const Track& t = tracks_[i];
      std::fprintf(stderr,
                   "  #%zu opens=%d closes=%d eofs=%d late=%d threw=%d reason='%s' peer_sent=%zu "
                   "in=%zu out=%zu peer_received=%zu dropped=%d aborted=%d peer_shut=%d gone=%d "
                   "eof=%d error=%d\n",
                   i, t.opens, t.closes, t.eofs, t.late_calls, t.threw, t.reason.message().c_str(),
                   t.peer_sent.size(), t.in.size(), t.out.size(), t.peer_received.size(),
                   t.input_dropped, t.aborted, t.peer_shut, t.peer_gone, t.peer_eof, t.peer_error);
    }
  }

  void check_all() {
    dump();
    FUZZ_CHECK(loop_->connection_count() == 0);
    FUZZ_CHECK(ran_posts_ + skipped_after() == posted_);
    std::size_t pending = 0;
    for (const TimerModel& model : timers_) pending += model.pending ? 1 : 0;
    FUZZ_CHECK(loop_->pending_timers() == pending);
    for (const Track& t : tracks_) {
      FUZZ_CHECK(t.late_calls == 0);
      FUZZ_CHECK(t.opens <= 1 && t.eofs <= t.opens);
      if (t.dropped && t.opens == 0 && t.connection == nullptr && t.closes == 0) continue;
#if REACTOR_FUZZ_ISSUE8_FIXED
      FUZZ_CHECK(t.opens == 1);
#else
      FUZZ_CHECK(t.opens == 1 || allocation_failures() > 0);
#endif
      FUZZ_CHECK(t.closes == 1);
      if (t.threw) FUZZ_CHECK(t.reason == reactor::Error::kHandlerException);
      FUZZ_CHECK(explained(t, t.reason));
      FUZZ_CHECK(is_prefix(t.in, t.peer_sent));
      FUZZ_CHECK(is_prefix(t.out, t.in));
      if (t.peer_gone) continue;
      FUZZ_CHECK(is_prefix(t.peer_received, t.out + t.refused));
      if (t.peer_received.size() > t.out.size()) FUZZ_CHECK(t.reason);
      if (!t.reason && !t.aborted && t.peer_error == 0) FUZZ_CHECK(t.peer_received == t.out);
      if (!t.reason && !t.input_dropped) FUZZ_CHECK(t.in == t.peer_sent);
    }
  }

  using Acceptor = reactor::Acceptor<Handler, Loop>;

  fuzz::FuzzInput& input_;
  Transport transport_ = Transport::kSocketpair;
  reactor::ConnectionOptions options_;
  std::size_t max_output_ = 0;
  std::size_t failures_at_start_ = failed_allocations;
  Loop* loop_ = nullptr;
  std::unique_ptr<Acceptor> acceptor_;
  reactor::Endpoint endpoint_;
  std::vector<Track> tracks_;
  std::vector<std::size_t> clients_;  // Acceptor mode: track indices in connect() order
  std::size_t checked_clients_ = 0;
  std::size_t dropped_ = 0;
  std::size_t drop_causes_ = 0;
  bool throw_on_next_copy_ = false;
  int opening_fd_ = -1;
  bool opening_enomem_ = false;
  int backoff_faults_ = 0;
  std::vector<TimerModel> timers_;
  std::size_t posted_ = 0;
  std::size_t ran_posts_ = 0;
  std::vector<std::size_t> skipped_posts_;
  milliseconds slept_{0};
  bool faults_on_ = false;
  bool in_shutdown_ = false;
  std::size_t opened_in_shutdown_ = 0;
  bool shut_down_ = false;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz::FuzzInput input(data, size);
  const std::size_t failures = failed_allocations;
  if (input.flag()) {
    Harness<reactor::EdgeTriggered>(input).run();
  } else {
    Harness<reactor::LevelTriggered>(input).run();
  }
  stats.failed_allocations += failed_allocations - failures;
  return 0;
}
