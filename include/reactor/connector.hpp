// Public: Connector<Handler, OnResult, Reactor, Transport>, outbound connections made on the loop
// without blocking it: host names resolved on worker threads (resolver.hpp), non-blocking connects
// (EINPROGRESS, then EPOLLOUT and SO_ERROR), Happy Eyeballs v2 over several addresses (RFC 8305),
// a timeout per attempt and an overall deadline, retries with exponential backoff and jitter, and
// an optional reconnect when the established connection drops. The connected socket becomes a
// Connection on the same reactor, in place: a TCP socket's fd stays in the epoll set (one
// EPOLL_CTL_MOD re-points it; a Unix socket, which connects without waiting there, is added) and
// nothing is asked of the kernel that the connector already knows.
//
//   reactor::Connector client(loop, MyHandler{}, [](auto* conn, std::error_code ec,
//                                                   const reactor::Endpoint& address) {
//     if (!conn) std::fprintf(stderr, "connect to %s: %s\n", ...);
//   });
//   client.connect("example.com", 80);
//
// States (docs/design.md, "Connector"): idle -> resolving (names only) -> connecting (one or more
// sockets in flight) -> connected; a round that fails goes to waiting (backoff) and starts again,
// until the tries run out (a reconnect's do not), the deadline passes, or every failure of the
// round was one that another round cannot mend (invalid_argument, address_family_not_supported, a
// handler that threw): then idle, with on_result(nullptr, error, address). Each state owns what it
// holds: resolving a lookup request, connecting the attempt sockets, waiting nothing but the timer;
// the one timer serves whichever deadline is earliest.
//
// With a transport that has a handshake (TLS: TlsConnector in reactor/tls.hpp) a connection is
// reported once its handshake is done; the connector stays `connecting` meanwhile (cancel()
// aborts the handshake). A failed handshake fails the round like a refused connect and is retried,
// unless the transport says another round cannot mend it (TlsTransport::is_retriable: a
// certificate that does not verify, a version or protocol the server refuses): that ends a
// connect at once, while a reconnect goes on retrying with its backoff. on_result gets the error;
// the handler's on_handshake_failed is not called for a connector's connections.
//
// Callbacks: on_result(conn, ec, address) runs on the loop thread, never from inside connect(),
// once per outcome: a connection (conn set, ec empty, address the one that won; the connection
// may already be closing if its on_open closed it or threw) or a failure (conn
// null; ec says what failed: an error in resolve_category() for the lookup, timed_out,
// connection_refused, network_unreachable, host_unreachable, ...; address the one whose attempt
// failed with ec (at the deadline: the attempt still in flight), empty when no address was
// reached: the name did not resolve, or the arguments were bad). After cancel(), disconnect() or
// the destructor no on_result runs. It may destroy the Connector, or call connect(), cancel() or
// disconnect(), and so may the handler's hooks; inside the new connection's on_open, which runs
// before on_result, connection() is already set (and if on_open calls one of them, or destroys the
// connector, no on_result follows). Exceptions from on_result are dropped. One exception to "on the
// loop, never inside another hook": out of memory for a reconnect's timer, on_result(nullptr,
// not_enough_memory) runs inside the dropped connection's on_close, before the handler's own.
//
// Handler: as for any Connection (concepts.hpp), with hooks taking the connection as `auto&`
// (its type is connection_type). It must be copyable (each connection gets a copy of the
// prototype) and not final: the connection's handler is a class derived from it, which also
// tells the connector when the connection closes.
//
// Threading: construct, use and destroy on the reactor's thread, before the reactor is destroyed.
// An established connection belongs to the reactor, like any other: destroying the Connector, or
// connect()ing again, leaves it open (and no longer reconnected).
#pragma once

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "concepts.hpp"
#include "connection.hpp"
#include "detail/watcher.hpp"
#include "endpoint.hpp"
#include "error.hpp"
#include "reactor.hpp"
#include "resolver.hpp"
#include "timer.hpp"

namespace reactor {

// Where a Connector is (state()).
enum class ConnectorState : std::uint8_t {
  kIdle,        // nothing in progress (never started, cancelled, failed, or the connection closed)
  kResolving,   // a host name lookup runs on a resolver thread
  kConnecting,  // connect attempts are in flight
  kWaiting,     // a round failed; the next starts after the backoff (or a reconnect's delay)
  kConnected,   // connection() is open
};

struct RetryOptions {
  // Rounds (resolve, then every address) per connect() or reconnect, the first included: 1 never
  // retries; 0 retries until the deadline, or for ever.
  int tries = 1;
  // Wait before the k-th retry (k from 0): min(max, initial * multiplier^k), then a random part
  // of it taken off (equal jitter: uniform in [d/2, d]), so that clients cut off together do not
  // come back together. Both durations are kept within [1 ms, 365 days]; a multiplier below 1 (or
  // NaN) counts as 1.
  std::chrono::milliseconds initial{100};
  std::chrono::milliseconds max{10000};
  double multiplier = 2.0;
};

struct ConnectOptions {
  // The timeouts and the deadline: zero (or less) means none, as in ConnectionOptions; long ones
  // saturate.
  // A host name lookup that takes longer is abandoned (its late result dropped); the round fails
  // with timed_out and an empty address.
  std::chrono::milliseconds resolve_timeout{5000};
  // One socket's connect that takes longer is closed (timed_out), and the next address is tried.
  std::chrono::milliseconds attempt_timeout{5000};
  // The whole connect — every round, lookup, attempt and backoff — ends by then: timed_out if it
  // is still resolving or connecting; and a retry that would start after it is not waited for
  // (the connect fails at once with the last round's error). Counted from connect(), or from a
  // reconnect's start.
  std::chrono::milliseconds deadline{0};
  // Happy Eyeballs: with several addresses (IPv6 and IPv4 interleaved, IPv6 first), the next
  // attempt starts this long after the previous one began, or as soon as one fails; the first to
  // connect wins and the others are closed. Never below 10 ms (RFC 8305 section 5).
  std::chrono::milliseconds attempt_delay{250};
  RetryOptions retry{};
  // When the established connection closes (for any reason, the handler's own close() included),
  // connect again after retry.initial (growing, as retries do, while connections keep dropping
  // within retry.max of opening), and keep retrying, with backoff, until connected: retry.tries
  // does not limit a reconnect; `deadline` does, when set (then on_result reports the failure).
  // Not during the reactor's graceful shutdown: a reconnect that falls due then is dropped, and
  // on_result reports operation_canceled (a connection that drops during it is not reconnected,
  // silently). Nor after cancel() or disconnect(). A graceful shutdown does not wait for, or stop,
  // a connect in progress.
  bool reconnect = false;
  // TCP_NODELAY on TCP sockets, set before connecting.
  bool tcp_nodelay = true;
  // Seed of the jitter's generator; 0 picks one per connector. Simulations set it.
  std::uint64_t seed = 0;
  // For the connection once established.
  ConnectionOptions connection{};
};

namespace detail {

// How a connection made by a connector tells it that it opened (before the user's on_open), that
// a handshake finished (after the user's on_open) or failed, and that it closed (before the
// user's on_close).
struct ConnectorLink {
  using Opened = void (*)(ConnectorLink& link, void* connection) noexcept;
  using Dropped = void (*)(ConnectorLink& link) noexcept;
  using Handshaken = void (*)(ConnectorLink& link, std::error_code ec) noexcept;
  ConnectorLink(Opened on_opened, Dropped on_dropped, Handshaken on_handshaken) noexcept
      : opened(on_opened), dropped(on_dropped), handshaken(on_handshaken) {}
  Opened opened;
  Dropped dropped;
  Handshaken handshaken;
};

// The handler of a connection made by a connector: the user's, plus a link back that on_open and
// on_close follow first (so the connector knows its connection inside the user's on_open, and the
// user's on_close may destroy the connector).
template <class Handler>
struct Dialed : Handler {
  Dialed(const Handler& prototype, ConnectorLink* link) : Handler(prototype), reactor_link_(link) {}

  template <class Conn>
  void on_open(Conn& connection) {
    if (reactor_link_ != nullptr) reactor_link_->opened(*reactor_link_, &connection);
    if constexpr (Conn::transport_type::kHandshake) {
      // After a handshake the connector reports now (without one, it does once open() returns),
      // also when the user's on_open threw (the connection then fails: its on_close follows).
      if constexpr (HasOnOpen<Handler, Conn>) {
        try {
          Handler::on_open(connection);
        } catch (...) {
          if (reactor_link_ != nullptr) reactor_link_->handshaken(*reactor_link_, {});
          throw;
        }
      }
      if (reactor_link_ != nullptr) reactor_link_->handshaken(*reactor_link_, {});
    } else if constexpr (HasOnOpen<Handler, Conn>) {
      Handler::on_open(connection);
    }
  }

  // Reported to on_result instead (a handshake that failed is a failed connect).
  template <class Conn>
  void on_handshake_failed(Conn& /*connection*/, std::error_code reason) {
    if (ConnectorLink* link = std::exchange(reactor_link_, nullptr)) {
      link->handshaken(*link, reason ? reason : std::make_error_code(std::errc::not_connected));
    }
  }

  template <class Conn>
  void on_close(Conn& connection, std::error_code reason) {
    if (ConnectorLink* link = std::exchange(reactor_link_, nullptr)) link->dropped(*link);
    if constexpr (HasOnClose<Handler, Conn>) Handler::on_close(connection, reason);
  }

  ConnectorLink* reactor_link_;
};

// A numeric IPv4 or IPv6 address ("127.0.0.1", "::1", "[::1]"), or an empty endpoint: a name.
// "localhost" is a name here (Endpoint::from_host_port takes it for 127.0.0.1), so that the
// resolver answers for it, ::1 included.
inline Endpoint numeric_endpoint(std::string_view host, std::uint16_t port) noexcept {
  if (host == "localhost") return {};
  std::error_code ec;
  return Endpoint::from_host_port(host, port, ec);  // empty, with ec set, for a name
}

// The order Happy Eyeballs tries addresses in: IPv6 and IPv4 alternating, IPv6 first, each family
// in the order given (RFC 8305 section 4); other families after them.
inline std::vector<Endpoint> interleave_families(const std::vector<Endpoint>& addresses) {
  std::vector<const Endpoint*> v6;
  std::vector<const Endpoint*> v4;
  std::vector<Endpoint> ordered;
  ordered.reserve(addresses.size());
  for (const Endpoint& a : addresses) {
    if (a.family() == AF_INET6) v6.push_back(&a);
    if (a.family() == AF_INET) v4.push_back(&a);
  }
  for (std::size_t i = 0; i < std::max(v6.size(), v4.size()); ++i) {
    if (i < v6.size()) ordered.push_back(*v6[i]);
    if (i < v4.size()) ordered.push_back(*v4[i]);
  }
  for (const Endpoint& a : addresses) {
    if (a.family() != AF_INET6 && a.family() != AF_INET && !a.empty()) ordered.push_back(a);
  }
  return ordered;
}

}  // namespace detail

template <class Handler, class OnResult, class R = Reactor<>, class Transport = PlainTransport>
class Connector : private detail::ConnectorLink {
  using Sys = typename R::syscalls;
  using Clock = std::chrono::steady_clock;
  static constexpr bool kHandshake = Transport::kHandshake;

 public:
  using handler_type = detail::Dialed<Handler>;
  using connection_type = Connection<handler_type, R, Transport>;

  static_assert(
      requires(int fd, const sockaddr* address, void* value, socklen_t* length) {
        { Sys::socket(AF_INET, SOCK_STREAM, 0) } -> std::same_as<int>;
        { Sys::connect(fd, address, socklen_t{}) } -> std::same_as<int>;
        { Sys::getsockopt(fd, SOL_SOCKET, SO_ERROR, value, length) } -> std::same_as<int>;
        { Sys::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, value, socklen_t{}) } -> std::same_as<int>;
      },
      "reactor: a Connector's syscall policy needs socket(), connect(), getsockopt() and "
      "setsockopt() with the kernel's signatures");
  static_assert(std::is_class_v<Handler> && !std::is_final_v<Handler>,
                "reactor: a Connector's handler must be a class that is not final (the "
                "connection's handler derives from it)");
  static_assert(std::is_copy_constructible_v<Handler>,
                "reactor: a Connector's handler must be copyable (each connection gets a copy)");
  static_assert(
      std::is_invocable_v<OnResult&, connection_type*, std::error_code, const Endpoint&>,
      "reactor: a Connector's on_result must be callable as "
      "on_result(Connection* conn, std::error_code ec, const reactor::Endpoint& address)");

  // Idle until connect(). `resolver` (its threads) is used for host names; it must outlive the
  // connector. Allocates nothing until connect().
  Connector(R& loop, Handler prototype, OnResult on_result, const ConnectOptions& options = {},
            Resolver& resolver = Resolver::shared())
      : Connector(loop, Transport(), std::move(prototype), std::move(on_result), options,
                  resolver) {}

  // As above, each connection getting a copy of `transport` (TlsTransport: the client's
  // TlsContext; its peer name, when empty, becomes the host given to connect(host, port)).
  Connector(R& loop, Transport transport, Handler prototype, OnResult on_result,
            const ConnectOptions& options = {}, Resolver& resolver = Resolver::shared())
      : ConnectorLink(&on_opened, &on_dropped, &on_handshaken),
        loop_(&loop),
        resolver_(&resolver),
        prototype_(std::move(prototype)),
        on_result_(std::move(on_result)),
        options_(options),
        transport_(std::move(transport)) {
    static_assert(ConnectionHandler<Handler, connection_type>,
                  "reactor: a Connector's handler must define on_data(auto& conn, "
                  "std::string_view); its hooks take the connection as auto& (its type is "
                  "Connector::connection_type, not Connection<Handler>)");
    static_assert(check_handler<Handler, connection_type>());
    constexpr std::chrono::milliseconds kShortest(1);
    constexpr std::chrono::milliseconds kLongest = std::chrono::hours(24 * 365);
    options_.attempt_delay =
        std::clamp(options_.attempt_delay, std::chrono::milliseconds(10), kLongest);
    options_.retry.initial = std::clamp(options_.retry.initial, kShortest, kLongest);
    options_.retry.max = std::clamp(options_.retry.max, options_.retry.initial, kLongest);
    if (!(options_.retry.multiplier >= 1.0)) options_.retry.multiplier = 1.0;  // NaN too
    rng_ =
        options_.seed != 0
            ? options_.seed
            : reinterpret_cast<std::uintptr_t>(this) ^
                  static_cast<std::uint64_t>(detail::clock_now<Sys>().time_since_epoch().count());
  }

  Connector(const Connector&) = delete;
  Connector& operator=(const Connector&) = delete;

  // Cancels whatever is in progress (no callback runs after this); closes its sockets and
  // abandons its lookup at once. An established connection stays open, no longer reconnected.
  ~Connector() {
    abandon();
    untrack();
    if (destroyed_ != nullptr) *destroyed_ = true;
  }

  // Starts connecting to `host` (a name, resolved on the resolver's threads; or a numeric IPv4
  // or IPv6 address, "[::1]" too, which skips the resolver) at `port`. Cancels what was in
  // progress first; an established connection is left open and no longer tracked. A port outside
  // 0..65535, an empty host or one containing a NUL fails (on_result, invalid_argument) without
  // trying. Throws std::bad_alloc only (out of memory for the target or its timer); the connector
  // is then idle, and the previous connection already untracked.
  template <detail::PortInteger Port>
  void connect(std::string_view host, Port port) {
    restart();
    if (host.empty() || host.find('\0') != std::string_view::npos ||
        !std::in_range<std::uint16_t>(port)) {
      refuse(std::make_error_code(std::errc::invalid_argument));
      return;
    }
    const auto port16 = static_cast<std::uint16_t>(port);
    if constexpr (kHandshake)
      peer_name_.assign(
          host.starts_with('[') && host.ends_with(']') ? host.substr(1, host.size() - 2) : host);
    const Endpoint numeric = detail::numeric_endpoint(host, port16);
    if (numeric.empty()) {
      host_.assign(host);
      port_ = port16;
    } else {
      addresses_.assign(1, numeric);
    }
    begin();
  }

  // Starts connecting to one address (IPv4, IPv6, or a Unix socket). As above; an empty endpoint
  // fails with invalid_argument.
  void connect(const Endpoint& endpoint) { connect(std::vector<Endpoint>{endpoint}); }

  // Starts connecting to these addresses, in Happy Eyeballs order. As above; empty endpoints are
  // skipped, and a list with none left fails with invalid_argument.
  void connect(std::vector<Endpoint> endpoints) {
    restart();
    std::erase_if(endpoints, [](const Endpoint& e) { return e.empty(); });
    if (endpoints.empty()) {
      refuse(std::make_error_code(std::errc::invalid_argument));
      return;
    }
    addresses_ = detail::interleave_families(endpoints);
    begin();
  }

  // Stops resolving, connecting or waiting to retry: sockets in flight are closed, a lookup is
  // abandoned, and no on_result runs afterwards. An established connection stays open but will
  // not be reconnected. Safe from any callback, on_result included.
  void cancel() noexcept {
    ++generation_;
    reconnect_ = false;
    abandon();
    state_ = connection_ != nullptr ? ConnectorState::kConnected : ConnectorState::kIdle;
  }

  // cancel(), and close() the established connection (flush, then close).
  void disconnect() noexcept {
    cancel();
    if (connection_type* connection = untrack()) connection->close();
    state_ = ConnectorState::kIdle;
  }

  ConnectorState state() const noexcept { return state_; }

  // The established connection, or nullptr: set before the handler's on_open runs, null again
  // from the moment it closes (before its on_close).
  connection_type* connection() const noexcept { return connection_; }

  // The address that won while connected; otherwise the one whose failure last_error() reports
  // (empty if none).
  const Endpoint& address() const noexcept { return address_; }

  // The most recent attempt's error (kept while retrying); empty after a success.
  std::error_code last_error() const noexcept { return last_error_; }

  // Sockets in flight now (Happy Eyeballs may have several).
  std::size_t attempts_in_flight() const noexcept { return attempts_.size(); }

 private:
  // One socket connecting to one address, waiting in the epoll set for EPOLLOUT.
  // A Unix socket whose listener's queue was full (connect: EAGAIN; there is no connect in
  // progress to wait for) is not in the epoll set: it calls connect() again at `again`, backing
  // off from 1 ms to 50 ms, until the attempt's timeout.
  struct Attempt : detail::Watcher {
    Attempt(Connector& connector, const Endpoint& to, Clock::time_point deadline) noexcept
        : Watcher(&on_attempt_op), owner(&connector), address(to), due(deadline) {}
    Connector* owner;
    Endpoint address;
    Clock::time_point due;
    Clock::time_point again = Clock::time_point::max();
    std::chrono::milliseconds again_wait{0};
  };

  // A lookup and who waits for it. `owner` and `generation` are read and written on the loop
  // thread only; the worker touches LookupRequest's part.
  struct Lookup : detail::LookupRequest {
    Connector* owner = nullptr;
    std::uint64_t generation = 0;
  };

  static void on_attempt_op(detail::Watcher& watcher, detail::WatcherOp op, std::uint32_t events,
                            void* /*argument*/) noexcept {
    if (op != detail::WatcherOp::kEvent) return;
    auto& attempt = static_cast<Attempt&>(watcher);
    attempt.owner->attempt_ready(attempt, events);
  }

  static void on_opened(ConnectorLink& link, void* connection) noexcept {
    auto& self = static_cast<Connector&>(link);
    self.connection_ = static_cast<connection_type*>(connection);
    self.handshaking_ = nullptr;
    self.connected_at_ = detail::clock_now<Sys>();
  }

  static void on_dropped(ConnectorLink& link) noexcept { static_cast<Connector&>(link).dropped(); }

  // The connection's handshake finished (after the user's on_open) or failed (instead of it).
  static void on_handshaken(ConnectorLink& link, std::error_code ec) noexcept {
    auto& self = static_cast<Connector&>(link);
    // on_open called cancel(), connect() or disconnect(): that connect is over, unreported.
    if (self.generation_ != self.handshake_generation_) return;
    self.handshaking_ = nullptr;
    if (self.timer_) self.loop_->cancel(std::exchange(self.timer_, TimerId{}));  // the deadline's
    if (!ec) {
      if (self.connection_ == nullptr) return;  // untracked meanwhile (defensive)
      self.state_ = ConnectorState::kConnected;
      self.reconnecting_ = false;
      self.report(self.connection_, {}, self.address_);
      return;
    }
    // A failed round. What another round cannot mend (the transport says: a certificate that
    // does not verify, a protocol or version the server refuses) ends a connect at once; a
    // reconnect keeps retrying with its backoff, as it does for everything (the server may be
    // mended). Everything else (a server that hung up mid-handshake, a timeout) is retried.
    if constexpr (requires { Transport::is_retriable(ec); }) {
      if (!Transport::is_retriable(ec) && !self.reconnecting_) {
        self.fail(ec, self.address_);
        return;
      }
    }
    self.last_error_ = ec;
    self.round_retriable_ = true;
    self.state_ = ConnectorState::kConnecting;
    self.round_failed(detail::clock_now<Sys>());
  }

  // A resolver worker, under the request's mutex (or the loop thread, when submit() could not
  // start a worker): only queue the result for the loop.
  static void post_lookup(void* loop, std::shared_ptr<detail::LookupRequest> request) noexcept {
    try {
      static_cast<R*>(loop)->post([request = std::move(request)] {
        auto& lookup = static_cast<Lookup&>(*request);
        if (lookup.owner != nullptr && lookup.owner->lookup_generation_ == lookup.generation) {
          lookup.owner->resolved(lookup);
        }
      });
    } catch (...) {
      // Out of memory for the posted task: the result is lost and resolve_timeout ends the wait.
    }
  }

  // connect(): drop what was in progress, and the established connection's link.
  void restart() noexcept {
    cancel();
    untrack();
    host_.clear();
    peer_name_.clear();
    addresses_.clear();
    reconnect_ = options_.reconnect;
    reconnecting_ = false;
    drops_ = 0;
    deadline_ = Clock::time_point::max();
    last_error_ = {};
    address_ = {};
  }

  void begin() {
    const Clock::time_point now = detail::clock_now<Sys>();
    deadline_ = after(now, options_.deadline);
    tries_ = 0;
    inside_connect([&] { start_round(now); });
  }

  // Bad arguments: fail on the next loop iteration, not inside connect().
  void refuse(std::error_code ec) {
    last_error_ = ec;
    address_ = {};
    refused_ = true;
    inside_connect([&] {
      state_ = ConnectorState::kWaiting;
      arm_timer(detail::clock_now<Sys>());
    });
  }

  // Runs connect()'s part that arms the timer: a timer that cannot be scheduled (no memory)
  // throws from connect(), leaving the connector idle, instead of being reported through
  // on_result, which must not run inside connect().
  template <class F>
  void inside_connect(F&& f) {
    in_connect_ = true;
    try {
      f();
    } catch (...) {
      in_connect_ = false;
      abandon();
      state_ = ConnectorState::kIdle;
      throw;
    }
    in_connect_ = false;
  }

  // A round: resolve (names), then try the addresses. Starts on the next timer expiry, never
  // inside the call that asked for it, so that on_result never runs inside connect().
  void start_round(Clock::time_point now) {
    if (tries_ < std::numeric_limits<int>::max()) ++tries_;
    round_retriable_ = false;
    if (host_.empty()) {  // addresses_ holds the target (set by connect())
      next_address_ = 0;
      next_start_ = now;
      state_ = ConnectorState::kConnecting;
      arm_timer(now);
      return;
    }
    state_ = ConnectorState::kResolving;
    resolve_due_ = after(now, options_.resolve_timeout);
    try {
      auto lookup = std::make_shared<Lookup>();
      lookup->host = host_;
      lookup->port = port_;
      lookup->target = loop_;
      lookup->complete = &post_lookup;
      lookup->owner = this;
      lookup->generation = ++lookup_generation_;
      lookup_ = lookup;
      resolver_->submit(std::move(lookup));
    } catch (...) {
      abandon_lookup();
      last_error_ = std::make_error_code(std::errc::not_enough_memory);
      refused_ = true;
      state_ = ConnectorState::kWaiting;
      resolve_due_ = now;
    }
    arm_timer(now);
  }

  void resolved(Lookup& lookup) noexcept {
    const Clock::time_point now = detail::clock_now<Sys>();
    std::shared_ptr<Lookup> keep = std::move(lookup_);
    keep->owner = nullptr;
    if (lookup.error) {
      last_error_ = lookup.error;
      address_ = {};
      round_failed(now);
      return;
    }
    try {
      addresses_ = detail::interleave_families(lookup.addresses);
      if (addresses_.empty()) last_error_ = {EAI_NONAME, resolve_category()};  // only empty ones
    } catch (...) {
      addresses_.clear();
      last_error_ = std::make_error_code(std::errc::not_enough_memory);
    }
    next_address_ = 0;
    state_ = ConnectorState::kConnecting;
    next_start_ = now;
    progress(now);
  }

  // The one timer fired: whatever deadline was due.
  void on_timer() noexcept {
    timer_ = {};
    const Clock::time_point now = detail::clock_now<Sys>();
    if (now >= deadline_ && state_ != ConnectorState::kIdle &&
        state_ != ConnectorState::kConnected) {
      // Name the attempt still in flight that started last, else the last one that failed.
      fail(std::make_error_code(std::errc::timed_out),
           attempts_.empty() ? address_ : attempts_.back()->address);
      return;
    }
    switch (state_) {
      case ConnectorState::kResolving:
        if (now >= resolve_due_) {
          abandon_lookup();
          last_error_ = std::make_error_code(std::errc::timed_out);
          address_ = {};
          round_failed(now);
          return;
        }
        break;
      case ConnectorState::kConnecting:
        for (std::size_t i = 0; i < attempts_.size();) {
          if (attempts_[i]->due <= now) {
            close_attempt(i, std::make_error_code(std::errc::timed_out));
            next_start_ = now;  // a failed attempt starts the next at once
          } else if (attempts_[i]->again <= now) {
            if (connect_again(i, now)) return;  // it won
          } else {
            ++i;
          }
        }
        progress(now);
        return;
      case ConnectorState::kWaiting:
        if (refused_) {
          refused_ = false;
          fail(last_error_, address_);
          return;
        }
        if (now >= retry_at_) {
          if (reconnecting_ && loop_->draining()) {  // no reconnect during a graceful shutdown
            fail(std::make_error_code(std::errc::operation_canceled), address_);
            return;
          }
          start_round(now);
          return;
        }
        break;
      case ConnectorState::kIdle:
      case ConnectorState::kConnected:
        return;
    }
    arm_timer(now);
  }

  // Connecting: start the next address when its time has come (or nothing is in flight), and
  // end the round when every address failed.
  void progress(Clock::time_point now) noexcept {
    while (next_address_ < addresses_.size() && (attempts_.empty() || now >= next_start_)) {
      const Endpoint address = addresses_[next_address_++];  // a copy: callbacks may free them
      switch (start_attempt(address, now)) {
        case Started::kWon:  // connected at once (a Unix socket): the round is over
          return;
        case Started::kInFlight:
          next_start_ = detail::saturating_add(now, options_.attempt_delay);
          break;
        case Started::kFailed:  // failed at once (ENETUNREACH, ...): the next starts now
          next_start_ = now;
          break;
      }
    }
    if (attempts_.empty()) {
      round_failed(now);
      return;
    }
    arm_timer(now);
  }

  enum class Started : std::uint8_t { kWon, kInFlight, kFailed };

  // Opens a socket and connects it: connected at once (a Unix socket) and won, in flight, or
  // failed at once (last_error_ says why).
  Started start_attempt(const Endpoint& address, Clock::time_point now) noexcept {
    const int fd = Sys::socket(address.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      note_failure(detail::last_errno_code(), address);
      return Started::kFailed;
    }
    if (options_.tcp_nodelay && !address.is_unix()) {
      const int on = 1;
      Sys::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    }
    if (Sys::connect(fd, address.data(), address.size()) == 0) {
      win(fd, nullptr, address);
      return Started::kWon;
    }
    // TCP: EINTR means the connect goes on asynchronously, as EINPROGRESS (connect(2)). Unix:
    // EAGAIN (the listener's queue is full) or EINTR leave nothing in progress: call it again.
    const bool queue_full = address.is_unix() && (errno == EAGAIN || errno == EINTR);
    if (errno != EINPROGRESS && errno != EINTR && !queue_full) {
      note_failure(detail::last_errno_code(), address);
      Sys::close(fd);
      return Started::kFailed;
    }
    std::unique_ptr<Attempt> attempt;
    try {
      attempt = std::make_unique<Attempt>(*this, address, after(now, options_.attempt_timeout));
      // Room for it now, so that push_back below cannot throw once the socket is registered.
      if (attempts_.size() == attempts_.capacity()) attempts_.reserve(2 * attempts_.size() + 2);
    } catch (...) {
      note_failure(std::make_error_code(std::errc::not_enough_memory), address);
      Sys::close(fd);
      return Started::kFailed;
    }
    attempt->fd = fd;
    if (queue_full) {
      attempt->again_wait = std::chrono::milliseconds(1);
      attempt->again = detail::saturating_add(now, attempt->again_wait);
      attempts_.push_back(std::move(attempt));
      return Started::kInFlight;
    }
    if (const std::error_code ec = loop_->add(*attempt, EPOLLOUT)) {
      note_failure(ec, address);
      Sys::close(fd);
      return Started::kFailed;
    }
    attempts_.push_back(std::move(attempt));
    return Started::kInFlight;
  }

  // A Unix socket's connect() again (its listener's queue was full). True when it connected and
  // won; otherwise the attempt waits longer, or failed and is closed (index then names the next).
  bool connect_again(std::size_t index, Clock::time_point now) noexcept {
    Attempt& attempt = *attempts_[index];
    if (Sys::connect(attempt.fd, attempt.address.data(), attempt.address.size()) == 0) {
      std::unique_ptr<Attempt> winner = std::move(attempts_[index]);
      attempts_.erase(attempts_.begin() + static_cast<std::ptrdiff_t>(index));
      win(std::exchange(winner->fd, -1), nullptr, winner->address);
      return true;
    }
    if (errno == EAGAIN) {
      attempt.again_wait = std::min(2 * attempt.again_wait, std::chrono::milliseconds(50));
      attempt.again = detail::saturating_add(now, attempt.again_wait);
      return false;
    }
    close_attempt(index, detail::last_errno_code());
    next_start_ = now;
    return false;
  }

  // EPOLLOUT (or EPOLLERR/EPOLLHUP): the connect is done; SO_ERROR says how.
  void attempt_ready(Attempt& attempt, std::uint32_t /*events*/) noexcept {
    int error = 0;
    socklen_t length = sizeof error;
    if (Sys::getsockopt(attempt.fd, SOL_SOCKET, SO_ERROR, &error, &length) != 0) error = errno;
    const auto it = std::find_if(attempts_.begin(), attempts_.end(),
                                 [&](const auto& a) { return a.get() == &attempt; });
    const auto index = static_cast<std::size_t>(it - attempts_.begin());
    if (error == 0) {
      std::unique_ptr<Attempt> winner = std::move(attempts_[index]);
      attempts_.erase(attempts_.begin() + static_cast<std::ptrdiff_t>(index));
      loop_->forget(*winner);  // its fd stays in the set, re-pointed at the connection
      win(std::exchange(winner->fd, -1), winner.get(), winner->address);
      return;
    }
    close_attempt(index, detail::errno_code(error));
    // As soon as one fails, the next address starts (RFC 8305 section 5).
    next_start_ = detail::clock_now<Sys>();
    progress(next_start_);
  }

  void close_attempt(std::size_t index, std::error_code reason) noexcept {
    Attempt& attempt = *attempts_[index];
    note_failure(reason, attempt.address);
    loop_->remove(attempt);
    Sys::close(std::exchange(attempt.fd, -1));
    attempts_.erase(attempts_.begin() + static_cast<std::ptrdiff_t>(index));
  }

  // `fd` connected to `address`: it becomes the connection; every other attempt is closed.
  // `in_epoll`: the winning attempt's socket, still in the epoll set.
  void win(int fd, const Attempt* in_epoll, Endpoint address) noexcept {
    abandon();
    address_ = address;
    last_error_ = {};
    state_ = ConnectorState::kConnected;
    const std::uint64_t generation = generation_;
    std::error_code ec;
    connection_type* connection = nullptr;
    if constexpr (kHandshake) {  // connecting until the handshake is done
      state_ = ConnectorState::kConnecting;
      handshake_generation_ = generation_;
    }
    const bool alive = call_user([&] {
      try {
        handler_type handler(prototype_, this);
        Transport transport(transport_);
        if constexpr (kHandshake) {
          // The name to verify: the prototype's, else the host connect() was given, else the
          // address itself (checked against the certificate's IP addresses).
          if (transport.peer_name().empty()) {
            transport.set_peer_name(!peer_name_.empty() ? peer_name_
                                    : address.is_unix() ? std::string()
                                                        : address.host());
          }
        }
        connection = connection_type::open(*loop_, fd, std::move(handler), options_.connection,
                                           !address.is_unix(), ec, in_epoll != nullptr,
                                           std::move(transport));
      } catch (...) {               // copying a prototype threw
        if (in_epoll != nullptr) {  // out of the set before the close (a fork()ed child...)
          detail::Watcher held(nullptr);
          held.fd = fd;
          held.registered = true;
          loop_->deregister(held);
        }
        Sys::close(fd);
        ec = make_error_code(Error::kHandlerException);
      }
    });
    // on_open destroyed the connector, or called connect(), cancel() or disconnect(), which
    // dealt with the connection (on_opened had made it ours): no on_result.
    if (!alive || generation != generation_) return;
    if (connection == nullptr) {  // no memory, or the handler threw: retried as a round's failure
      last_error_ = ec;
      address_ = address;
      round_retriable_ = retriable(ec);
      round_failed(detail::clock_now<Sys>());
      return;
    }
    if constexpr (kHandshake) {  // reported when the handshake is done (on_handshaken)
      if (connection_ != connection) handshaking_ = connection;
      // The overall deadline still holds (on_timer ends the handshake); attempt_timeout does not:
      // the context's handshake_timeout bounds the handshake.
      if (handshaking_ != nullptr && deadline_ != Clock::time_point::max()) {
        try {
          timer_ = loop_->schedule_at(deadline_, [this] { on_timer(); });
          timer_due_ = deadline_;
        } catch (...) {  // no memory for the timer: the handshake timeout still ends it
        }
      }
      return;
    }
    reconnecting_ = false;
    report(connection, {}, address);
  }

  void round_failed(Clock::time_point now) noexcept {
    abandon();
    const bool more = reconnecting_ || options_.retry.tries <= 0 || tries_ < options_.retry.tries;
    if (more && (round_retriable_ || retriable(last_error_))) {
      retry_at_ = detail::saturating_add(now, backoff(tries_ - 1));
      if (retry_at_ < deadline_) {
        state_ = ConnectorState::kWaiting;
        arm_timer(now);
        return;
      }
    }
    fail(last_error_, address_);
  }

  // Records an attempt's failure as the round's error, unless it is a permanent one (this family
  // is not supported here, an unusable address) and the round already has a retriable one to
  // report: one address's permanent error must not stop the retries the others call for.
  void note_failure(std::error_code ec, const Endpoint& address) noexcept {
    const bool transient = retriable(ec);
    if (!transient && round_retriable_) return;
    round_retriable_ = round_retriable_ || transient;
    last_error_ = ec;
    address_ = address;
  }

  static bool retriable(const std::error_code& ec) noexcept {
    return ec != std::errc::invalid_argument && ec != std::errc::address_family_not_supported &&
           ec != Error::kHandlerException;
  }

  void fail(std::error_code ec, Endpoint address) noexcept {
    abandon();
    if (!ec) ec = std::make_error_code(std::errc::not_connected);  // never a failure without why
    last_error_ = ec;
    address_ = address;
    state_ = connection_ != nullptr ? ConnectorState::kConnected : ConnectorState::kIdle;
    report(nullptr, ec, address);
  }

  void report(connection_type* connection, std::error_code ec, const Endpoint& address) noexcept {
    call_user([&] {
      try {
        on_result_(connection, ec, address);
      } catch (...) {
        // Nothing to report to; the outcome stands.
      }
    });
  }

  // Runs user code that may destroy this connector; false when it did (touch nothing then).
  template <class F>
  bool call_user(F&& f) noexcept {
    bool destroyed = false;
    bool* const outer = std::exchange(destroyed_, &destroyed);
    f();
    if (destroyed) {
      if (outer != nullptr) *outer = true;
      return false;
    }
    destroyed_ = outer;
    return true;
  }

  // The established connection closed (its handler's on_close, before the user's).
  void dropped() noexcept {
    connection_ = nullptr;
    state_ = ConnectorState::kIdle;
    // No reconnect during a graceful shutdown; the connection's own on_close tells the handler
    // (reporting it too would need a timer that outlives the shutdown).
    if (!reconnect_ || loop_->draining()) return;
    const Clock::time_point now = detail::clock_now<Sys>();
    if (now - connected_at_ >= options_.retry.max) drops_ = 0;  // it had stayed up: start over
    retry_at_ = detail::saturating_add(now, backoff(drops_));
    if (drops_ < std::numeric_limits<int>::max()) ++drops_;
    deadline_ = after(retry_at_, options_.deadline);
    tries_ = 0;
    reconnecting_ = true;
    state_ = ConnectorState::kWaiting;
    arm_timer(now);
  }

  // now + timeout, or never for a timeout of zero or less.
  static Clock::time_point after(Clock::time_point now,
                                 std::chrono::milliseconds timeout) noexcept {
    return timeout.count() > 0 ? detail::saturating_add(now, timeout) : Clock::time_point::max();
  }

  // The wait before retry k: min(max, initial * multiplier^k), less up to half of it at random.
  Clock::duration backoff(int k) noexcept {
    const double initial = static_cast<double>(options_.retry.initial.count());
    const double max = static_cast<double>(options_.retry.max.count());
    const double full =
        std::min(max, initial * std::pow(options_.retry.multiplier, std::max(k, 0)));
    // splitmix64: a few instructions, and deterministic for a given seed.
    rng_ += 0x9e3779b97f4a7c15ULL;
    std::uint64_t z = rng_;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    const double unit = static_cast<double>(z >> 11) * 0x1.0p-53;  // [0, 1)
    const double ms = full / 2 + unit * (full / 2);
    return std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double, std::milli>(ms));
  }

  // Keeps the one timer at the earliest deadline of the current state.
  void arm_timer(Clock::time_point now) {
    Clock::time_point due = Clock::time_point::max();
    switch (state_) {
      case ConnectorState::kResolving:
        due = resolve_due_;
        break;
      case ConnectorState::kConnecting:
        if (next_address_ < addresses_.size()) due = attempts_.empty() ? now : next_start_;
        for (const auto& attempt : attempts_) due = std::min({due, attempt->due, attempt->again});
        break;
      case ConnectorState::kWaiting:
        due = refused_ ? now : retry_at_;
        break;
      case ConnectorState::kIdle:
      case ConnectorState::kConnected:
        break;
    }
    if (state_ != ConnectorState::kIdle && state_ != ConnectorState::kConnected) {
      due = std::min(due, deadline_);
    }
    if (timer_ && timer_due_ == due) return;
    if (timer_) loop_->cancel(std::exchange(timer_, TimerId{}));
    if (due == Clock::time_point::max()) return;
    try {
      timer_ = loop_->schedule_at(due, [this] { on_timer(); });
      timer_due_ = due;
    } catch (...) {
      // No memory for a timer: inside connect(), throw from it; anywhere else (a callback of the
      // loop, which every caller returns from right after this) report the failure now rather
      // than wait for ever. A timer slot is reused after a cancel, so this is rare.
      if (in_connect_) throw;
      fail(std::make_error_code(std::errc::not_enough_memory), address_);
    }
  }

  // Releases everything the current state holds: attempt sockets, the lookup, the timer.
  void abandon() noexcept {
    if (connection_type* connection = std::exchange(handshaking_, nullptr)) {
      connection->handler().reactor_link_ = nullptr;  // cancelled: nothing more to report
      connection->abort();
    }
    while (!attempts_.empty()) {
      Attempt& attempt = *attempts_.back();
      loop_->remove(attempt);
      Sys::close(std::exchange(attempt.fd, -1));
      attempts_.pop_back();
    }
    abandon_lookup();
    if (timer_) loop_->cancel(std::exchange(timer_, TimerId{}));
    refused_ = false;
  }

  void abandon_lookup() noexcept {
    if (!lookup_) return;
    lookup_->abandon();
    lookup_->owner = nullptr;
    lookup_.reset();
  }

  // Forgets the established connection: it stays open, and its close no longer reaches us.
  connection_type* untrack() noexcept {
    connection_type* connection = std::exchange(connection_, nullptr);
    if (connection != nullptr) connection->handler().reactor_link_ = nullptr;
    if (state_ == ConnectorState::kConnected) state_ = ConnectorState::kIdle;
    return connection;
  }

  R* loop_;
  Resolver* resolver_;
  Handler prototype_;
  OnResult on_result_;
  ConnectOptions options_;
  [[no_unique_address]] Transport transport_;
  std::string peer_name_;                   // with a handshake: the host connect() was given
  connection_type* handshaking_ = nullptr;  // with a handshake: the connection doing it
  std::uint64_t handshake_generation_ = 0;  // generation_ when it started
  ConnectorState state_ = ConnectorState::kIdle;
  bool reconnect_ = false;
  bool reconnecting_ = false;  // this connect started from a dropped connection, not connect()
  bool refused_ = false;       // waiting only to report last_error_ (bad arguments, no memory)
  bool in_connect_ = false;
  bool round_retriable_ = false;  // this round had a failure worth another round    // inside
                                  // connect(): arm_timer() throws instead of reporting
  // The target: a host name and port, or addresses.
  std::string host_;
  std::uint16_t port_ = 0;
  // This round's addresses, in Happy Eyeballs order: the target's own (connect() with addresses),
  // or the lookup's.
  std::vector<Endpoint> addresses_;
  std::size_t next_address_ = 0;
  std::vector<std::unique_ptr<Attempt>> attempts_;
  std::shared_ptr<Lookup> lookup_;
  std::uint64_t lookup_generation_ = 0;
  int tries_ = 0;  // rounds started since connect() or the reconnect
  int drops_ = 0;  // reconnects in a row after short-lived connections
  Clock::time_point deadline_ = Clock::time_point::max();
  Clock::time_point resolve_due_{};
  Clock::time_point next_start_{};
  Clock::time_point retry_at_{};
  Clock::time_point connected_at_{};
  TimerId timer_;
  Clock::time_point timer_due_{};
  connection_type* connection_ = nullptr;
  Endpoint address_;
  std::error_code last_error_;
  std::uint64_t generation_ = 0;  // bumped by connect(), cancel(), disconnect()
  std::uint64_t rng_ = 0;
  bool* destroyed_ = nullptr;  // set while a user callback runs: the destructor marks it
};

}  // namespace reactor
