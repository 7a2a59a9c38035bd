// Tests for include/reactor/connector.hpp over loopback TCP (127.0.0.1, ::1) and abstract Unix
// sockets: a numeric address connects without the resolver and carries bytes both ways; a refused
// port, a server that never answers (a full accept queue), an overall deadline and a lookup that
// hangs each end in exactly one failure with the right error and address, on time; cancel() and
// the destructor stop a lookup, a connect or a backoff without a callback; retries back off with
// equal jitter; Happy Eyeballs falls back at once when IPv6 fails and staggers its attempts by
// attempt_delay; "localhost" goes through getaddrinfo; a thousand connects at once all echo;
// reconnect waits (no busy loop), stops at disconnect() and during a graceful shutdown; on_result
// and on_open may destroy the connector or connect again; an established connection outlives its
// connector; bad arguments (a host with a NUL too) fail through on_result, never inside connect();
// a resolve_timeout of zero means none; a lookup that answers only empty endpoints fails with
// EAI_NONAME; connect() forgets the previous connect's error and address; a Unix socket whose
// listener's queue is full (connect: EAGAIN) waits for room, and times out without spinning. Every
// test gives back every fd it took. Label `integration` and `threads` (lookups run on resolver
// threads; run under the tsan preset too).
//
// A server that never answers: a listener with a backlog of 0 that never accepts, whose accept
// queue the test fills with connections until a new one no longer completes. With the accept queue
// full Linux drops incoming SYNs (tcp_conn_request(); net.ipv4.tcp_abort_on_overflow is 0, so no
// RST) and the client keeps retransmitting, 1 s apart, which no attempt here waits for.
#include <reactor/connector.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <reactor.hpp>

#include "catch.hpp"
#include "loopback.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using reactor::ConnectOptions;
using reactor::ConnectorState;
using reactor::Endpoint;
using LT = reactor::Reactor<>;
using ET = reactor::Reactor<reactor::EdgeTriggered>;

// --- The server side
// -------------------------------------------------------------------------------

struct Echo {
  void on_data(auto& connection, std::string_view bytes) { connection.send(bytes); }
};

// Closes every connection as soon as it opens.
struct Slam {
  void on_open(auto& connection) { connection.close(); }
  void on_data(auto&, std::string_view) {}
};

template <class Loop, class Handler = Echo>
using Server = reactor::Acceptor<Handler, Loop>;

// --- The client side
// -------------------------------------------------------------------------------

// What one client connection saw.
struct Tally {
  int opened = 0;
  int closed = 0;
  std::string greeting;  // sent by on_open
  std::string received;
  bool close_after_echo = false;  // close once `greeting` has come back
  std::error_code close_reason;
  void* connection = nullptr;          // the Connection, set by on_open
  std::function<void()> on_open_hook;  // runs at the end of on_open
};

struct ClientHandler {
  Tally* tally;

  void on_open(auto& connection) {
    ++tally->opened;
    tally->connection = &connection;
    if (!tally->greeting.empty()) connection.send(tally->greeting);
    if (tally->on_open_hook) tally->on_open_hook();
  }
  void on_data(auto& connection, std::string_view bytes) {
    tally->received.append(bytes);
    if (tally->close_after_echo && tally->received.size() >= tally->greeting.size()) {
      connection.close();
    }
  }
  void on_close(auto&, std::error_code reason) {
    ++tally->closed;
    tally->close_reason = reason;
  }
};

// One on_result call.
struct Outcome {
  void* connection;
  std::error_code ec;
  Endpoint address;
  Clock::time_point at;
};

struct Outcomes {
  std::vector<Outcome> list;
  // Runs inside on_result, after the call was recorded; gets on_result's own address argument.
  std::function<void(const Outcome&, const Endpoint& address)> then;

  std::size_t successes() const {
    return static_cast<std::size_t>(std::count_if(
        list.begin(), list.end(), [](const Outcome& o) { return o.connection != nullptr; }));
  }
};

struct Record {
  Outcomes* outcomes;

  template <class Conn>
  void operator()(Conn* connection, std::error_code ec, const Endpoint& address) {
    outcomes->list.push_back({connection, ec, address, Clock::now()});
    if (outcomes->then) {
      const Outcome recorded = outcomes->list.back();
      outcomes->then(recorded, address);
    }
  }
};

template <class Loop>
using Client = reactor::Connector<ClientHandler, Record, Loop>;
template <class Loop>
using ClientConnection = typename Client<Loop>::connection_type;

template <class Loop>
ClientConnection<Loop>* connection_of(const Outcome& outcome) {
  return static_cast<ClientConnection<Loop>*>(outcome.connection);
}

// --- Resolvers the test controls
// ------------------------------------------------------------------

// A resolver that counts its lookups and answers `answer` (each address with the asked port), or
// asks getaddrinfo when `answer` is empty.
struct CountingResolver {
  explicit CountingResolver(std::vector<Endpoint> answer = {})
      : resolver(
            reactor::ResolverOptions{.max_threads = 1,
                                     .lookup = [calls = calls, answer = std::move(answer)](
                                                   const std::string& host, std::uint16_t port,
                                                   std::vector<Endpoint>& out) -> std::error_code {
                                       ++*calls;
                                       if (answer.empty())
                                         return reactor::system_lookup(host, port, out);
                                       for (const Endpoint& a : answer)
                                         out.push_back(Endpoint::from_host_port(a.host(), port));
                                       return {};
                                     }}) {}
  ~CountingResolver() { resolver.wait_idle(10s); }

  std::shared_ptr<std::atomic<int>> calls = std::make_shared<std::atomic<int>>(0);
  reactor::Resolver resolver;
};

// Lookups that hold until the test releases them, then answer 127.0.0.1 at the asked port.
struct HeldLookups {
  template <class Done>
  bool wait(Done done, std::chrono::milliseconds limit = 10s) {
    std::unique_lock lock(mutex);
    return changed.wait_for(lock, limit, [&] { return done(); });
  }
  void release() {
    const std::lock_guard lock(mutex);
    released = true;
    changed.notify_all();
  }

  std::mutex mutex;
  std::condition_variable changed;
  bool released = false;
  int started = 0;
  int finished = 0;
};

struct HeldResolver {
  HeldResolver()
      : resolver(reactor::ResolverOptions{
            .max_threads = 1,
            .lookup = [held = held](const std::string&, std::uint16_t port,
                                    std::vector<Endpoint>& out) -> std::error_code {
              std::unique_lock lock(held->mutex);
              ++held->started;
              held->changed.notify_all();
              held->changed.wait(lock, [&] { return held->released; });
              out.push_back(Endpoint::from_host_port("127.0.0.1", port));
              ++held->finished;
              held->changed.notify_all();
              return {};
            }}) {}
  // Never leaves a worker held, even when the test failed early. Declared after the loop, so
  // that a worker which (wrongly) still posts a result finds the loop alive.
  ~HeldResolver() {
    held->release();
    resolver.wait_idle(10s);
  }

  std::shared_ptr<HeldLookups> held = std::make_shared<HeldLookups>();
  reactor::Resolver resolver;
};

// --- Addresses that misbehave
// ---------------------------------------------------------------------

reactor::UniqueFd tcp_socket(int family) {
  reactor::UniqueFd fd(::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) throw std::system_error(errno, std::system_category(), "socket");
  return fd;
}

Endpoint bound_address(int fd) {
  sockaddr_storage address{};
  socklen_t length = sizeof address;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    throw std::system_error(errno, std::system_category(), "getsockname");
  }
  return Endpoint::from_sockaddr(reinterpret_cast<sockaddr*>(&address), length);
}

// A port nobody listens on: bound (so nothing else takes it meanwhile) but not listening, so a
// connect to it is answered with RST: connection_refused.
struct ClosedPort {
  ClosedPort() : fd(tcp_socket(AF_INET)) {
    const Endpoint any = Endpoint::parse("127.0.0.1:0");
    if (::bind(fd.get(), any.data(), any.size()) != 0) {
      throw std::system_error(errno, std::system_category(), "bind");
    }
    endpoint = bound_address(fd.get());
  }

  reactor::UniqueFd fd;
  Endpoint endpoint;
};

// Reserves [::1]:port the same way, when the machine lets it (no IPv6, or the port taken there:
// the connect to ::1 fails anyway, refused or unreachable). Returns an empty fd if not.
reactor::UniqueFd reserve_ipv6_loopback(std::uint16_t port) {
  reactor::UniqueFd fd(::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return fd;
  const Endpoint wanted = Endpoint::from_host_port("::1", port);
  if (::bind(fd.get(), wanted.data(), wanted.size()) != 0) fd.reset();
  return fd;
}

// A listener on 127.0.0.1 that answers no SYN (see the top of the file).
class Blackhole {
 public:
  Blackhole() : listener_(tcp_socket(AF_INET)) {
    const Endpoint any = Endpoint::parse("127.0.0.1:0");
    if (::bind(listener_.get(), any.data(), any.size()) != 0 || ::listen(listener_.get(), 0) != 0) {
      throw std::system_error(errno, std::system_category(), "bind/listen");
    }
    endpoint_ = bound_address(listener_.get());
    for (int i = 0; i < 64 && !full_; ++i) {
      reactor::UniqueFd probe(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
      if (::connect(probe.get(), endpoint_.data(), endpoint_.size()) != 0 && errno != EINPROGRESS) {
        throw std::system_error(errno, std::system_category(), "connect");
      }
      pollfd writable{probe.get(), POLLOUT, 0};
      if (::poll(&writable, 1, 200) == 0) {
        full_ = true;  // this SYN went unanswered: the queue is full (the probe is closed here)
      } else {
        fillers_.push_back(std::move(probe));
      }
    }
  }

  bool full() const { return full_; }
  const Endpoint& endpoint() const { return endpoint_; }

 private:
  reactor::UniqueFd listener_;
  std::vector<reactor::UniqueFd> fillers_;
  Endpoint endpoint_;
  bool full_ = false;
};

// An abstract Unix socket name no other test uses.
Endpoint abstract_endpoint(std::string_view what) {
  static std::atomic<int> counter{0};
  return Endpoint::unix_path("@reactor-connector-test-" + std::to_string(::getpid()) + "-" +
                             std::string(what) + "-" + std::to_string(++counter));
}

// An abstract Unix socket listener with a backlog of 0 that only the test accepts from, its queue
// filled: a non-blocking connect() to it fails with EAGAIN at once (unix_stream_connect(): with
// the listener's queue longer than its backlog, an O_NONBLOCK connect does not wait; nothing is in
// progress, so epoll has nothing to report). A backlog of 0 holds one connection.
class FullUnixListener {
 public:
  explicit FullUnixListener(std::string_view what)
      : listener_(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)),
        endpoint_(abstract_endpoint(what)) {
    if (!listener_ || ::bind(listener_.get(), endpoint_.data(), endpoint_.size()) != 0 ||
        ::listen(listener_.get(), 0) != 0) {
      throw std::system_error(errno, std::system_category(), "socket/bind/listen (AF_UNIX)");
    }
    for (int i = 0; i < 8 && !full_; ++i) {
      reactor::UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
      if (::connect(probe.get(), endpoint_.data(), endpoint_.size()) == 0) {
        fillers_.push_back(std::move(probe));
      } else if (errno == EAGAIN) {
        full_ = true;  // the probe is closed here
      } else {
        throw std::system_error(errno, std::system_category(), "connect (AF_UNIX)");
      }
    }
  }

  bool full() const { return full_; }
  const Endpoint& endpoint() const { return endpoint_; }
  // Accepts the oldest connection in the queue; an empty fd when there is none.
  reactor::UniqueFd accept_one() {
    return reactor::UniqueFd(
        ::accept4(listener_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
  }

 private:
  reactor::UniqueFd listener_;
  Endpoint endpoint_;
  std::vector<reactor::UniqueFd> fillers_;
  bool full_ = false;
};

// --- Driving the loop ----------------------------------------------------------------------------

// Creates the loop's timerfd (made with the first timer and kept), so that fd counts taken
// afterwards do not see it appear.
template <class Loop>
void warm_up(Loop& loop) {
  bool fired = false;
  loop.schedule_after(0ms, [&] { fired = true; });
  test::run_until(
      loop, [&] { return fired; }, 5s);
}

// Runs the loop for `period`: a window in which something must NOT happen.
template <class Loop>
void run_for(Loop& loop, std::chrono::milliseconds period) {
  const auto end = Clock::now() + period;
  test::run_until(
      loop, [&] { return Clock::now() >= end; }, period + 5s);
}

std::chrono::milliseconds ms_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(to - from);
}

}  // namespace

// --- Connecting
// -------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("a numeric address connects without the resolver and carries bytes both ways",
                   "[connector]", LT, ET) {
  using Loop = TestType;
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    Loop loop;
    Server<Loop> server(loop, Endpoint::parse("127.0.0.1:0"));
    CountingResolver resolver;
    tally.greeting = test::pattern(200000, 3);
    Client<Loop> client(loop, ClientHandler{&tally}, Record{&outcomes}, {}, resolver.resolver);
    CHECK(client.state() == ConnectorState::kIdle);
    CHECK(client.connection() == nullptr);

    client.connect("127.0.0.1", server.local_endpoint().port());
    CHECK(outcomes.list.empty());  // never from inside connect()
    CHECK(client.state() == ConnectorState::kConnecting);
    REQUIRE(test::run_until(loop, [&] { return tally.received.size() >= tally.greeting.size(); }));

    REQUIRE(outcomes.list.size() == 1);
    const Outcome& outcome = outcomes.list[0];
    CHECK(outcome.connection != nullptr);
    CHECK_FALSE(outcome.ec);
    CHECK(outcome.address == server.local_endpoint());
    CHECK(tally.received == tally.greeting);
    CHECK(tally.opened == 1);
    CHECK(client.state() == ConnectorState::kConnected);
    CHECK(client.connection() == outcome.connection);
    CHECK(client.address() == server.local_endpoint());
    CHECK_FALSE(client.last_error());
    CHECK(client.attempts_in_flight() == 0);
    CHECK(connection_of<Loop>(outcome)->remote_endpoint() == server.local_endpoint());
    CHECK(server.accepted_count() == 1);
    CHECK(*resolver.calls == 0);

    // disconnect() closes the connection (flushed, orderly) and reports nothing.
    client.disconnect();
    CHECK(client.state() == ConnectorState::kIdle);
    CHECK(client.connection() == nullptr);
    REQUIRE(test::run_until(loop, [&] { return loop.connection_count() == 0; }));
    CHECK(tally.closed == 1);
    CHECK_FALSE(tally.close_reason);
    CHECK(outcomes.list.size() == 1);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE("a bracketed IPv6 address connects to ::1 without the resolver", "[connector][ipv6]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    std::error_code ec;
    Server<LT> server(loop, Endpoint::parse("[::1]:0"), Echo{}, {}, ec);
    if (ec) {
      WARN("no IPv6 loopback here (" << ec.message() << "): nothing to test");
      CHECK(ec);
      return;
    }
    CountingResolver resolver;
    tally.greeting = "over IPv6";
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, {}, resolver.resolver);
    client.connect("[::1]", server.local_endpoint().port());
    REQUIRE(test::run_until(loop, [&] { return tally.received == tally.greeting; }));
    REQUIRE(outcomes.list.size() == 1);
    CHECK(outcomes.list[0].connection != nullptr);
    CHECK(outcomes.list[0].address.to_string() ==
          "[::1]:" + std::to_string(server.local_endpoint().port()));
    CHECK(*resolver.calls == 0);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEMPLATE_TEST_CASE("a refused port is reported once within a second", "[connector]", LT, ET) {
  using Loop = TestType;
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    Loop loop;
    warm_up(loop);
    const ClosedPort closed;
    const std::size_t fds_before = test::open_fd_count();
    Client<Loop> client(loop, ClientHandler{&tally}, Record{&outcomes});

    const auto start = Clock::now();
    client.connect("127.0.0.1", closed.endpoint.port());
    REQUIRE(test::run_until(
        loop, [&] { return !outcomes.list.empty(); }, 5s));
    const Outcome& outcome = outcomes.list[0];
    CHECK(ms_between(start, outcome.at) < 1s);
    CHECK(outcome.connection == nullptr);
    CHECK(outcome.ec == std::errc::connection_refused);
    CHECK(outcome.address.to_string() == "127.0.0.1:" + std::to_string(closed.endpoint.port()));
    CHECK(client.state() == ConnectorState::kIdle);
    CHECK(client.last_error() == std::errc::connection_refused);
    CHECK(client.attempts_in_flight() == 0);
    CHECK(test::open_fd_count() == fds_before);

    run_for(loop, 200ms);
    CHECK(outcomes.list.size() == 1);
    CHECK(tally.opened == 0);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE("an attempt the server never answers times out and its socket is closed",
          "[connector][timeout]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    warm_up(loop);
    const Blackhole blackhole;
    REQUIRE(blackhole.full());
    const std::size_t fds_before = test::open_fd_count();
    ConnectOptions options;
    options.attempt_timeout = 300ms;
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options);

    const auto start = Clock::now();
    client.connect(blackhole.endpoint());
    REQUIRE(test::run_until(
        loop, [&] { return client.attempts_in_flight() == 1; }, 5s));
    CHECK(test::open_fd_count() == fds_before + 1);
    CHECK(client.state() == ConnectorState::kConnecting);

    REQUIRE(test::run_until(
        loop, [&] { return !outcomes.list.empty(); }, 10s));
    const Outcome& outcome = outcomes.list[0];
    CHECK(ms_between(start, outcome.at) >= 300ms);
    CHECK(ms_between(start, outcome.at) < 3s);
    CHECK(outcome.connection == nullptr);
    CHECK(outcome.ec == std::errc::timed_out);
    CHECK(outcome.address == blackhole.endpoint());
    CHECK(client.state() == ConnectorState::kIdle);
    CHECK(client.attempts_in_flight() == 0);
    CHECK(test::open_fd_count() == fds_before);
    CHECK(loop.pending_timers() == 0);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE("an overall deadline shorter than the attempt timeout ends the connect at the deadline",
          "[connector][timeout]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    warm_up(loop);
    const Blackhole blackhole;
    REQUIRE(blackhole.full());
    const std::size_t fds_before = test::open_fd_count();
    ConnectOptions options;
    options.attempt_timeout = 5s;
    options.deadline = 300ms;
    options.retry.tries = 5;  // the deadline ends the retries too
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options);

    const auto start = Clock::now();
    client.connect(blackhole.endpoint());
    REQUIRE(test::run_until(
        loop, [&] { return !outcomes.list.empty(); }, 10s));
    const Outcome& outcome = outcomes.list[0];
    CHECK(ms_between(start, outcome.at) >= 300ms);
    CHECK(ms_between(start, outcome.at) < 3s);
    CHECK(outcome.ec == std::errc::timed_out);
    CHECK(outcome.address == blackhole.endpoint());
    CHECK(client.attempts_in_flight() == 0);
    CHECK(test::open_fd_count() == fds_before);

    run_for(loop, 200ms);
    CHECK(outcomes.list.size() == 1);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

// --- Resolving
// --------------------------------------------------------------------------------------

TEST_CASE("cancel during resolve abandons the lookup and reports nothing", "[connector][resolve]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    HeldResolver resolver;
    Server<LT> server(loop, Endpoint::parse("127.0.0.1:0"));
    ConnectOptions options;
    options.resolve_timeout = 200ms;
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options, resolver.resolver);

    client.connect("held.test", server.local_endpoint().port());
    CHECK(client.state() == ConnectorState::kResolving);
    REQUIRE(resolver.held->wait([&] { return resolver.held->started == 1; }));

    client.cancel();
    CHECK(client.state() == ConnectorState::kIdle);
    CHECK(loop.pending_timers() == 0);  // the resolve timeout went with it
    resolver.held->release();
    REQUIRE(resolver.held->wait([&] { return resolver.held->finished == 1; }));
    REQUIRE(resolver.resolver.wait_idle(10s));
    CHECK(resolver.resolver.threads() == 0);

    run_for(loop, 400ms);  // past the release and past resolve_timeout
    CHECK(outcomes.list.empty());
    CHECK(client.state() == ConnectorState::kIdle);
    CHECK(server.accepted_count() == 0);  // the late answer was not used
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE("destroying the connector during resolve reports nothing", "[connector][resolve]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    HeldResolver resolver;
    Server<LT> server(loop, Endpoint::parse("127.0.0.1:0"));
    ConnectOptions options;
    options.resolve_timeout = 200ms;
    auto client = std::make_unique<Client<LT>>(loop, ClientHandler{&tally}, Record{&outcomes},
                                               options, resolver.resolver);
    client->connect("held.test", server.local_endpoint().port());
    REQUIRE(resolver.held->wait([&] { return resolver.held->started == 1; }));

    client.reset();
    CHECK(loop.pending_timers() == 0);
    resolver.held->release();
    REQUIRE(resolver.resolver.wait_idle(10s));
    CHECK(resolver.held->finished == 1);

    run_for(loop, 400ms);
    CHECK(outcomes.list.empty());
    CHECK(server.accepted_count() == 0);
    CHECK(tally.opened == 0);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE(
    "a lookup slower than resolve_timeout fails with an empty address and its result is dropped",
    "[connector][resolve][timeout]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    HeldResolver resolver;
    Server<LT> server(loop, Endpoint::parse("127.0.0.1:0"));
    ConnectOptions options;
    options.resolve_timeout = 200ms;
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options, resolver.resolver);

    const auto start = Clock::now();
    client.connect("held.test", server.local_endpoint().port());
    REQUIRE(test::run_until(
        loop, [&] { return !outcomes.list.empty(); }, 10s));
    const Outcome& outcome = outcomes.list[0];
    CHECK(ms_between(start, outcome.at) >= 200ms);
    CHECK(ms_between(start, outcome.at) < 3s);
    CHECK(outcome.connection == nullptr);
    CHECK(outcome.ec == std::errc::timed_out);
    CHECK(outcome.address.empty());
    CHECK(client.state() == ConnectorState::kIdle);

    // The lookup finishes late: its answer must not start a connect nor a second callback.
    resolver.held->release();
    REQUIRE(resolver.resolver.wait_idle(10s));
    CHECK(resolver.held->finished == 1);
    run_for(loop, 300ms);
    CHECK(outcomes.list.size() == 1);
    CHECK(server.accepted_count() == 0);
    CHECK(client.state() == ConnectorState::kIdle);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE("a host name that does not resolve fails with a resolve error", "[connector][resolve]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    CountingResolver resolver;  // getaddrinfo
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, {}, resolver.resolver);
    client.connect("nosuch.invalid", 80);
    REQUIRE(test::run_until(
        loop, [&] { return !outcomes.list.empty(); }, 30s));
    const Outcome& outcome = outcomes.list[0];
    CHECK(outcome.connection == nullptr);
    INFO("error: " << outcome.ec.message());
    CHECK(&outcome.ec.category() == &reactor::resolve_category());
    CHECK(outcome.address.empty());
    CHECK(*resolver.calls == 1);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

// Zero (or less) means no timeout, as for every other duration (ConnectOptions). Fails on the
// connector of 4a86263: the lookup fell due at now + 0, so it was abandoned at once and the connect
// failed with timed_out.
TEST_CASE("a resolve_timeout of zero or less means none and the lookup is waited for",
          "[connector][resolve][timeout]") {
  for (const std::chrono::milliseconds timeout : {0ms, -1ms}) {
    CAPTURE(timeout.count());
    const std::size_t fds_at_start = test::open_fd_count();
    {
      Outcomes outcomes;
      Tally tally;
      LT loop;
      warm_up(loop);
      HeldResolver resolver;
      Server<LT> server(loop, Endpoint::parse("127.0.0.1:0"));
      ConnectOptions options;
      options.resolve_timeout = timeout;
      Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options, resolver.resolver);

      client.connect("held.test", server.local_endpoint().port());
      REQUIRE(resolver.held->wait([&] { return resolver.held->started == 1; }));
      run_for(loop, 300ms);
      CHECK(outcomes.list.empty());
      CHECK(client.state() == ConnectorState::kResolving);
      CHECK(loop.pending_timers() == 0);  // nothing to time

      resolver.held->release();
      REQUIRE(test::run_until(
          loop, [&] { return !outcomes.list.empty(); }, 10s));
      const Outcome& outcome = outcomes.list[0];
      CHECK(outcome.connection != nullptr);
      CHECK_FALSE(outcome.ec);
      CHECK(outcome.address == server.local_endpoint());
      CHECK(client.state() == ConnectorState::kConnected);
      client.disconnect();
      REQUIRE(test::run_until(loop, [&] { return loop.connection_count() == 0; }));
      CHECK(outcomes.list.size() == 1);
    }
    CHECK(test::open_fd_count() == fds_at_start);
  }
}

// A lookup whose every answer is an empty endpoint left nothing to try: a failed lookup, as when it
// answers nothing at all. Fails on the connector of 4a86263: the round ended with no attempt and no
// error, and on_result reported a failure with an empty error_code.
TEST_CASE("a lookup that answers only an empty endpoint fails with EAI_NONAME",
          "[connector][resolve]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    auto calls = std::make_shared<std::atomic<int>>(0);
    reactor::Resolver resolver(
        reactor::ResolverOptions{.max_threads = 1,
                                 .lookup = [calls](const std::string&, std::uint16_t,
                                                   std::vector<Endpoint>& out) -> std::error_code {
                                   ++*calls;
                                   out.push_back(Endpoint{});
                                   return {};
                                 }});
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, {}, resolver);

    client.connect("empty.test", 80);
    REQUIRE(test::run_until(
        loop, [&] { return !outcomes.list.empty(); }, 10s));
    const Outcome& outcome = outcomes.list[0];
    CHECK(outcome.connection == nullptr);
    CHECK(outcome.ec);
    CHECK(outcome.ec.value() == EAI_NONAME);
    CHECK(&outcome.ec.category() == &reactor::resolve_category());
    CHECK(outcome.address.empty());
    CHECK(client.state() == ConnectorState::kIdle);
    CHECK(client.last_error() == outcome.ec);
    CHECK(client.attempts_in_flight() == 0);
    CHECK(*calls == 1);

    run_for(loop, 100ms);
    CHECK(outcomes.list.size() == 1);
    CHECK(tally.opened == 0);
    CHECK(resolver.wait_idle(10s));
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

// connect() starts afresh: the previous connect's error and address are forgotten. Fails on the
// connector of 4a86263: last_error() and address() still showed the refused connect while the
// lookup ran, and the deadline reported the refused connect's address.
TEST_CASE(
    "a lookup that times out after an earlier refused connect reports an empty address and "
    "timed_out",
    "[connector][resolve][timeout]") {
  for (const bool by_deadline : {false, true}) {
    CAPTURE(by_deadline);
    const std::size_t fds_at_start = test::open_fd_count();
    {
      Outcomes outcomes;
      Tally tally;
      LT loop;
      warm_up(loop);
      const ClosedPort closed;
      HeldResolver resolver;
      ConnectOptions options;
      if (by_deadline) {
        options.deadline = 200ms;  // resolve_timeout stays 5 s
      } else {
        options.resolve_timeout = 200ms;
      }
      Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options, resolver.resolver);

      client.connect(closed.endpoint);
      REQUIRE(test::run_until(
          loop, [&] { return outcomes.list.size() == 1; }, 5s));
      CHECK(outcomes.list[0].ec == std::errc::connection_refused);
      CHECK(outcomes.list[0].address == closed.endpoint);
      CHECK(client.address() == closed.endpoint);

      const auto start = Clock::now();
      client.connect("held.test", closed.endpoint.port());
      CHECK(client.state() == ConnectorState::kResolving);
      CHECK_FALSE(client.last_error());
      CHECK(client.address().empty());
      REQUIRE(resolver.held->wait([&] { return resolver.held->started == 1; }));

      REQUIRE(test::run_until(
          loop, [&] { return outcomes.list.size() == 2; }, 10s));
      const Outcome& outcome = outcomes.list[1];
      CHECK(ms_between(start, outcome.at) >= 200ms);
      CHECK(ms_between(start, outcome.at) < 3s);
      CHECK(outcome.connection == nullptr);
      CHECK(outcome.ec == std::errc::timed_out);
      CHECK(outcome.address.empty());
      CHECK(client.state() == ConnectorState::kIdle);
      CHECK(client.last_error() == std::errc::timed_out);
      CHECK(client.address().empty());

      resolver.held->release();
      REQUIRE(resolver.resolver.wait_idle(10s));
      run_for(loop, 200ms);
      CHECK(outcomes.list.size() == 2);
      CHECK(tally.opened == 0);
    }
    CHECK(test::open_fd_count() == fds_at_start);
  }
}

// --- Cancelling
// ---------------------------------------------------------------------------------------

TEST_CASE("cancel during connect closes the sockets in flight and reports nothing",
          "[connector][cancel]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    warm_up(loop);
    const Blackhole blackhole;
    REQUIRE(blackhole.full());
    const std::size_t fds_before = test::open_fd_count();
    ConnectOptions options;
    options.attempt_timeout = 300ms;
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options);
    client.connect(blackhole.endpoint());
    REQUIRE(test::run_until(
        loop, [&] { return client.attempts_in_flight() == 1; }, 5s));
    CHECK(test::open_fd_count() == fds_before + 1);

    client.cancel();
    CHECK(client.attempts_in_flight() == 0);
    CHECK(client.state() == ConnectorState::kIdle);
    CHECK(test::open_fd_count() == fds_before);
    CHECK(loop.pending_timers() == 0);

    run_for(loop, 500ms);  // past the attempt timeout
    CHECK(outcomes.list.empty());
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE("cancel during the backoff stops the retries", "[connector][cancel][retry]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    warm_up(loop);
    const ClosedPort closed;
    const std::size_t fds_before = test::open_fd_count();
    ConnectOptions options;
    options.retry.tries = 3;
    options.retry.initial = 300ms;
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options);
    client.connect(closed.endpoint);
    REQUIRE(test::run_until(
        loop, [&] { return client.state() == ConnectorState::kWaiting; }, 5s));
    CHECK(outcomes.list.empty());
    CHECK(client.attempts_in_flight() == 0);
    CHECK(client.last_error() == std::errc::connection_refused);

    client.cancel();
    CHECK(client.state() == ConnectorState::kIdle);
    CHECK(loop.pending_timers() == 0);
    run_for(loop, 700ms);  // past the first two waits
    CHECK(outcomes.list.empty());
    CHECK(client.state() == ConnectorState::kIdle);
    CHECK(test::open_fd_count() == fds_before);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

// --- Retrying
// ---------------------------------------------------------------------------------------

TEST_CASE("retries back off with equal jitter before the one failure", "[connector][retry]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    const ClosedPort closed;
    ConnectOptions options;
    options.retry.tries = 3;
    options.retry.initial = 50ms;
    options.retry.multiplier = 2;
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options);

    const auto start = Clock::now();
    client.connect(closed.endpoint);
    REQUIRE(test::run_until(loop, [&] { return !outcomes.list.empty(); }));
    const Outcome& outcome = outcomes.list[0];
    // Two waits, of [25, 50] ms and [50, 100] ms (one round alone fails within a millisecond
    // here, and two rounds wait 50 ms at most).
    CHECK(ms_between(start, outcome.at) >= 75ms);
    CHECK(ms_between(start, outcome.at) < 3s);
    CHECK(outcome.ec == std::errc::connection_refused);
    CHECK(outcome.address == closed.endpoint);
    CHECK(client.last_error() == std::errc::connection_refused);
    CHECK(client.state() == ConnectorState::kIdle);

    run_for(loop, 300ms);
    CHECK(outcomes.list.size() == 1);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE("unlimited tries keep retrying until the deadline", "[connector][retry][timeout]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    const ClosedPort closed;
    ConnectOptions options;
    options.retry.tries = 0;
    options.retry.initial = 20ms;
    options.retry.multiplier = 1;
    options.deadline = 300ms;
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options);

    const auto start = Clock::now();
    client.connect(closed.endpoint);
    REQUIRE(test::run_until(
        loop, [&] { return !outcomes.list.empty(); }, 10s));
    const Outcome& outcome = outcomes.list[0];
    // Retries stop when the next one could not start before the deadline: at most one wait
    // (20 ms) early, never after it by more than a scheduling delay.
    CHECK(ms_between(start, outcome.at) >= 280ms);
    CHECK(ms_between(start, outcome.at) < 3s);
    CHECK((outcome.ec == std::errc::connection_refused || outcome.ec == std::errc::timed_out));
    run_for(loop, 100ms);
    CHECK(outcomes.list.size() == 1);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

// --- Happy Eyeballs
// ---------------------------------------------------------------------------------

TEST_CASE("happy eyeballs falls back to IPv4 at once when the IPv6 attempt fails",
          "[connector][happy-eyeballs]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    warm_up(loop);
    Server<LT> server(loop, Endpoint::parse("127.0.0.1:0"));
    const std::uint16_t port = server.local_endpoint().port();
    const reactor::UniqueFd v6_reserved = reserve_ipv6_loopback(port);  // nobody listens there
    CountingResolver resolver({Endpoint::parse("[::1]:0"), Endpoint::parse("127.0.0.1:0")});
    const std::size_t fds_before = test::open_fd_count();
    ConnectOptions options;
    options.attempt_delay = 2s;  // only a failure of the IPv6 attempt starts IPv4 before this
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options, resolver.resolver);

    const auto start = Clock::now();
    client.connect("dual-stack.test", port);
    REQUIRE(test::run_until(
        loop, [&] { return !outcomes.list.empty(); }, 10s));
    const Outcome& outcome = outcomes.list[0];
    CHECK(ms_between(start, outcome.at) < 1s);
    CHECK(outcome.connection != nullptr);
    CHECK(outcome.address.to_string() == "127.0.0.1:" + std::to_string(port));
    CHECK(*resolver.calls == 1);
    CHECK(client.attempts_in_flight() == 0);
    CHECK_FALSE(client.last_error());

    // Only the winner and its accepted peer remain: the IPv6 socket was closed.
    REQUIRE(test::run_until(loop, [&] { return server.accepted_count() == 1; }));
    CHECK(test::open_fd_count() == fds_before + 2);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE(
    "happy eyeballs starts the next address after attempt_delay and the first to connect wins",
    "[connector][happy-eyeballs]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    warm_up(loop);
    const Blackhole blackhole;
    REQUIRE(blackhole.full());
    Server<LT> good(loop, Endpoint::parse("127.0.0.1:0"));
    const std::size_t fds_before = test::open_fd_count();
    ConnectOptions options;
    options.attempt_delay = 100ms;
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options);

    const auto start = Clock::now();
    client.connect(std::vector<Endpoint>{blackhole.endpoint(), good.local_endpoint()});
    REQUIRE(test::run_until(
        loop, [&] { return client.attempts_in_flight() >= 1; }, 5s));
    CHECK(client.attempts_in_flight() == 1);  // the second waits for attempt_delay
    REQUIRE(test::run_until(
        loop, [&] { return !outcomes.list.empty(); }, 10s));
    const Outcome& outcome = outcomes.list[0];
    CHECK(ms_between(start, outcome.at) >= 100ms);
    CHECK(ms_between(start, outcome.at) < 3s);
    CHECK(outcome.connection != nullptr);
    CHECK(outcome.address == good.local_endpoint());
    CHECK(client.attempts_in_flight() == 0);

    // The blackholed attempt's socket was closed: only the winner and its peer remain.
    REQUIRE(test::run_until(loop, [&] { return good.accepted_count() == 1; }));
    CHECK(test::open_fd_count() == fds_before + 2);
    run_for(loop, 100ms);
    CHECK(outcomes.list.size() == 1);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE("happy eyeballs starts the next address as soon as an attempt times out",
          "[connector][happy-eyeballs][timeout]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    warm_up(loop);
    const Blackhole blackhole;
    REQUIRE(blackhole.full());
    Server<LT> good(loop, Endpoint::parse("127.0.0.1:0"));
    const std::size_t fds_before = test::open_fd_count();
    ConnectOptions options;
    options.attempt_delay = 1000ms;
    options.attempt_timeout = 1200ms;
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options);

    // 0 ms: the first blackholed attempt; 1000 ms: the second (the next is due at 2000 ms);
    // 1200 ms: the first times out, which starts the good address at once, while the second
    // blackholed attempt is still in flight.
    const auto start = Clock::now();
    client.connect(
        std::vector<Endpoint>{blackhole.endpoint(), blackhole.endpoint(), good.local_endpoint()});
    REQUIRE(test::run_until(
        loop, [&] { return client.attempts_in_flight() == 2; }, 10s));
    REQUIRE(test::run_until(
        loop, [&] { return !outcomes.list.empty(); }, 10s));
    const Outcome& outcome = outcomes.list[0];
    CHECK(ms_between(start, outcome.at) >= 1200ms);
    CHECK(ms_between(start, outcome.at) < 1800ms);
    CHECK(outcome.connection != nullptr);
    CHECK(outcome.address == good.local_endpoint());
    CHECK(client.attempts_in_flight() == 0);
    REQUIRE(test::run_until(loop, [&] { return good.accepted_count() == 1; }));
    CHECK(test::open_fd_count() == fds_before + 2);  // both blackholed sockets closed
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE("happy eyeballs never tries the second address when the first answers in time",
          "[connector][happy-eyeballs]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    Server<LT> first(loop, Endpoint::parse("127.0.0.1:0"));
    Server<LT> second(loop, Endpoint::parse("127.0.0.1:0"));
    ConnectOptions options;
    options.attempt_delay = 200ms;
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options);

    client.connect(std::vector<Endpoint>{first.local_endpoint(), second.local_endpoint()});
    REQUIRE(test::run_until(
        loop, [&] { return !outcomes.list.empty(); }, 10s));
    CHECK(outcomes.list[0].address == first.local_endpoint());
    run_for(loop, 400ms);  // well past attempt_delay
    CHECK(first.accepted_count() == 1);
    CHECK(second.accepted_count() == 0);
    CHECK(outcomes.list.size() == 1);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE("localhost resolves through getaddrinfo and connects", "[connector][resolve][system]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    Server<LT> v4(loop, Endpoint::parse("127.0.0.1:0"));
    const std::uint16_t port = v4.local_endpoint().port();
    // Listen on [::1] at the same port too when possible: getaddrinfo may put ::1 first.
    std::error_code ec;
    Server<LT> v6(loop, Endpoint::from_host_port("::1", port), Echo{}, {}, ec);
    tally.greeting = "hello through a name";
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes});  // Resolver::shared()

    client.connect("localhost", port);
    CHECK(client.state() == ConnectorState::kResolving);
    REQUIRE(test::run_until(
        loop, [&] { return tally.received == tally.greeting; }, 30s));
    REQUIRE(outcomes.list.size() == 1);
    const Outcome& outcome = outcomes.list[0];
    CHECK(outcome.connection != nullptr);
    CHECK(outcome.address.port() == port);
    CHECK((outcome.address.host() == "127.0.0.1" || outcome.address.host() == "::1"));
    CHECK(v4.accepted_count() + (ec ? 0 : v6.accepted_count()) == 1);
    CHECK(reactor::Resolver::shared().wait_idle(10s));
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

// --- Many at once -------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("a thousand concurrent connects all connect and echo", "[connector][many]", LT,
                   ET) {
  using Loop = TestType;
  rlimit limits{};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &limits) == 0);
  const test::FdLimit raised(limits.rlim_max);
  const std::size_t fds_at_start = test::open_fd_count();
  // Two fds per connection (both ends are here), and some room.
  const rlim_t hard = limits.rlim_max;
  const std::size_t count = hard == RLIM_INFINITY || hard >= 2200 ? 1000 : (hard - 200) / 2;
  if (count < 1000) WARN("RLIMIT_NOFILE hard limit " << hard << ": only " << count << " connects");
  {
    std::vector<Tally> tallies(count);
    std::vector<Outcomes> outcomes(count);
    Loop loop;
    reactor::ListenOptions listen;
    listen.backlog = 4096;
    Server<Loop> server(loop, Endpoint::parse("127.0.0.1:0"), Echo{}, listen);
    std::vector<std::unique_ptr<Client<Loop>>> clients;
    clients.reserve(count);
    for (std::size_t i = 0; i < count; ++i) {
      tallies[i].greeting = test::pattern(100, static_cast<std::uint32_t>(i + 1));
      tallies[i].close_after_echo = true;
      clients.push_back(
          std::make_unique<Client<Loop>>(loop, ClientHandler{&tallies[i]}, Record{&outcomes[i]}));
      clients.back()->connect(server.local_endpoint());
    }
    const auto all_closed = [&] {
      return loop.connection_count() == 0 &&
             std::all_of(tallies.begin(), tallies.end(),
                         [](const Tally& t) { return t.closed == 1; });
    };
    REQUIRE(test::run_until(loop, all_closed, 60s));

    std::size_t connected = 0;
    std::size_t echoed = 0;
    std::size_t single_outcome = 0;
    for (std::size_t i = 0; i < count; ++i) {
      if (outcomes[i].list.size() == 1) ++single_outcome;
      if (!outcomes[i].list.empty() && outcomes[i].list[0].connection != nullptr &&
          !outcomes[i].list[0].ec) {
        ++connected;
      }
      if (tallies[i].received == tallies[i].greeting) ++echoed;
    }
    CHECK(single_outcome == count);
    CHECK(connected == count);
    CHECK(echoed == count);
    CHECK(server.accepted_count() == count);
    CHECK(server.failed_count() == 0);
    for (const auto& client : clients) {
      if (client->state() != ConnectorState::kIdle) FAIL("a connector is not idle after its close");
    }
    clients.clear();
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

// --- Reconnecting -------------------------------------------------------------------------------

TEST_CASE("reconnect waits between drops and stops at disconnect", "[connector][reconnect]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    Server<LT, Slam> server(loop, Endpoint::parse("127.0.0.1:0"), Slam{});
    ConnectOptions options;
    options.reconnect = true;
    options.retry.initial = 50ms;
    options.retry.max = 200ms;
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options);
    constexpr std::size_t kConnections = 4;
    outcomes.then = [&](const Outcome&, const Endpoint&) {
      if (outcomes.list.size() == kConnections) {
        client.disconnect();
        loop.stop();
      }
    };
    bool gave_up = false;
    const reactor::TimerId safety = loop.schedule_after(20s, [&] {
      gave_up = true;
      loop.stop();
    });

    const std::uint64_t iterations_before = loop.loop_iterations();
    client.connect(server.local_endpoint());
    loop.run();
    const std::uint64_t iterations = loop.loop_iterations() - iterations_before;
    loop.cancel(safety);
    REQUIRE_FALSE(gave_up);
    REQUIRE(outcomes.list.size() == kConnections);
    CHECK(outcomes.successes() == kConnections);
    for (std::size_t i = 1; i < kConnections; ++i) {
      INFO("gap before connection " << i);
      CHECK(ms_between(outcomes.list[i - 1].at, outcomes.list[i].at) >= 25ms);
    }
    // A handful of events per connection, not a spin through the waits (≥ 175 ms in all).
    INFO("loop iterations: " << iterations);
    CHECK(iterations < 40 * kConnections);
    CHECK(client.state() == ConnectorState::kIdle);

    run_for(loop, 500ms);  // more than the longest wait
    CHECK(outcomes.list.size() == kConnections);
    CHECK(server.accepted_count() == kConnections);
    CHECK(client.state() == ConnectorState::kIdle);
    CHECK(loop.pending_timers() == 0);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE("reconnect does not happen during a graceful shutdown", "[connector][reconnect]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    Server<LT> server(loop, Endpoint::parse("127.0.0.1:0"));
    ConnectOptions options;
    options.reconnect = true;
    options.retry.initial = 20ms;
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options);
    client.connect(server.local_endpoint());
    REQUIRE(test::run_until(
        loop, [&] { return outcomes.list.size() == 1 && server.accepted_count() == 1; }));
    REQUIRE(outcomes.list[0].connection != nullptr);

    const reactor::ShutdownReport report = loop.shutdown(3s, 50ms);
    CHECK_FALSE(report.error);
    CHECK(report.aborted == 0);
    CHECK(tally.closed == 1);
    CHECK(client.state() == ConnectorState::kIdle);
    CHECK(client.connection() == nullptr);
    CHECK(loop.pending_timers() == 0);  // no reconnect scheduled

    run_for(loop, 300ms);
    CHECK(outcomes.list.size() == 1);
    CHECK(server.accepted_count() == 1);
    CHECK(client.state() == ConnectorState::kIdle);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

// --- Callbacks that change the connector --------------------------------------------------------

TEST_CASE("on_result may destroy the connector", "[connector][lifetime]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    Server<LT> tcp(loop, Endpoint::parse("127.0.0.1:0"));
    const Endpoint unix_name = abstract_endpoint("destroy-in-result");
    Server<LT> local(loop, unix_name);
    const ClosedPort closed;
    auto client = std::make_unique<Client<LT>>(loop, ClientHandler{&tally}, Record{&outcomes});
    std::string address_after_destroy;
    outcomes.then = [&](const Outcome&, const Endpoint& address) {
      client.reset();
      // on_result's arguments stay valid for the whole call, whatever it does.
      address_after_destroy = address.to_string();
    };

    Endpoint target;
    bool expect_connection = true;
    const auto start = [&](const Endpoint& to) {
      target = to;
      client->connect(target);
      CHECK(client->state() == ConnectorState::kConnecting);
    };
    SECTION("after a TCP connect") {
      start(tcp.local_endpoint());
    }
    SECTION("after a Unix socket connect") {
      start(unix_name);
    }
    SECTION("after a failure") {
      start(closed.endpoint);
      expect_connection = false;
    }
    INFO("connecting to " << target.to_string());
    REQUIRE(test::run_until(
        loop, [&] { return !outcomes.list.empty(); }, 10s));
    CHECK(client == nullptr);
    CHECK(address_after_destroy == target.to_string());
    CHECK((outcomes.list[0].connection != nullptr) == expect_connection);
    run_for(loop, 100ms);
    CHECK(outcomes.list.size() == 1);

    if (expect_connection) {
      // The connection did not go with the connector.
      CHECK(tally.closed == 0);
      connection_of<LT>(outcomes.list[0])->close();
      REQUIRE(test::run_until(loop, [&] { return loop.connection_count() == 0; }));
      CHECK(tally.closed == 1);
    }
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE("the handler's on_open may destroy the connector", "[connector][lifetime]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    Server<LT> tcp(loop, Endpoint::parse("127.0.0.1:0"));
    const Endpoint unix_name = abstract_endpoint("destroy-in-open");
    Server<LT> local(loop, unix_name);
    tally.greeting = "still talking";
    ConnectOptions options;
    options.reconnect = true;
    auto client =
        std::make_unique<Client<LT>>(loop, ClientHandler{&tally}, Record{&outcomes}, options);
    tally.on_open_hook = [&] { client.reset(); };

    const auto start = [&](const Endpoint& to) {
      client->connect(to);
      CHECK(client->state() == ConnectorState::kConnecting);
    };
    SECTION("over TCP") {
      start(tcp.local_endpoint());
    }
    SECTION("over a Unix socket") {
      start(unix_name);
    }
    REQUIRE(test::run_until(
        loop, [&] { return tally.received == tally.greeting; }, 10s));
    CHECK(client == nullptr);
    CHECK(tally.opened == 1);
    CHECK(outcomes.list.empty());  // the connector went before it could report

    // The connection is the reactor's: it closes normally, and no reconnect follows.
    static_cast<ClientConnection<LT>*>(tally.connection)->close();
    REQUIRE(test::run_until(loop, [&] { return loop.connection_count() == 0; }));
    CHECK(tally.closed == 1);
    run_for(loop, 200ms);
    CHECK(tally.opened == 1);
    CHECK(tcp.accepted_count() + local.accepted_count() == 1);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE("disconnect from the handler's on_open closes the new connection",
          "[connector][lifetime]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    Server<LT> server(loop, Endpoint::parse("127.0.0.1:0"));
    ConnectOptions options;
    options.reconnect = true;
    options.retry.initial = 10ms;
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options);
    tally.on_open_hook = [&] { client.disconnect(); };
    client.connect(server.local_endpoint());
    REQUIRE(test::run_until(
        loop, [&] { return tally.opened == 1; }, 10s));

    // disconnect() closes "the established connection": the one whose on_open is running too.
    CHECK(test::run_until(
        loop, [&] { return tally.closed == 1; }, 2s));
    CHECK(outcomes.list.empty());
    CHECK(client.state() == ConnectorState::kIdle);
    CHECK(client.connection() == nullptr);
    run_for(loop, 200ms);
    CHECK(server.accepted_count() == 1);  // and no reconnect
    CHECK(tally.opened == 1);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE("connect from inside on_result starts a second independent outcome",
          "[connector][lifetime]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    Server<LT> server(loop, Endpoint::parse("127.0.0.1:0"));
    const ClosedPort closed;
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes});
    std::size_t outcomes_when_connect_returned = 0;

    SECTION("after a failure") {
      outcomes.then = [&](const Outcome& outcome, const Endpoint&) {
        if (outcomes.list.size() != 1) return;
        CHECK(outcome.ec == std::errc::connection_refused);
        client.connect(server.local_endpoint());
        outcomes_when_connect_returned = outcomes.list.size();
      };
      client.connect(closed.endpoint);
      REQUIRE(test::run_until(
          loop, [&] { return outcomes.list.size() == 2; }, 10s));
      CHECK(outcomes_when_connect_returned == 1);
      CHECK(outcomes.list[1].connection != nullptr);
      CHECK_FALSE(outcomes.list[1].ec);
      CHECK(outcomes.list[1].address == server.local_endpoint());
      CHECK(client.state() == ConnectorState::kConnected);
      CHECK_FALSE(client.last_error());
    }
    SECTION("after a success: the first connection stays open") {
      outcomes.then = [&](const Outcome& outcome, const Endpoint&) {
        if (outcomes.list.size() != 1) return;
        CHECK(outcome.connection != nullptr);
        client.connect(closed.endpoint);
        outcomes_when_connect_returned = outcomes.list.size();
      };
      client.connect(server.local_endpoint());
      REQUIRE(test::run_until(
          loop, [&] { return outcomes.list.size() == 2; }, 10s));
      CHECK(outcomes_when_connect_returned == 1);
      CHECK(outcomes.list[1].connection == nullptr);
      CHECK(outcomes.list[1].ec == std::errc::connection_refused);
      CHECK(outcomes.list[1].address == closed.endpoint);
      CHECK(client.state() == ConnectorState::kIdle);
      CHECK(client.connection() == nullptr);
      CHECK(tally.closed == 0);
      CHECK(connection_of<LT>(outcomes.list[0])->is_open());
      connection_of<LT>(outcomes.list[0])->close();
      REQUIRE(test::run_until(loop, [&] { return loop.connection_count() == 0; }));
      CHECK(tally.closed == 1);
    }
    run_for(loop, 200ms);
    CHECK(outcomes.list.size() == 2);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE("an established connection outlives its connector", "[connector][lifetime]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    Server<LT> server(loop, Endpoint::parse("127.0.0.1:0"));
    ConnectOptions options;
    options.reconnect = true;
    options.retry.initial = 10ms;
    auto client =
        std::make_unique<Client<LT>>(loop, ClientHandler{&tally}, Record{&outcomes}, options);
    client->connect(server.local_endpoint());
    REQUIRE(test::run_until(
        loop, [&] { return !outcomes.list.empty(); }, 10s));
    REQUIRE(outcomes.list[0].connection != nullptr);
    auto* connection = connection_of<LT>(outcomes.list[0]);

    client.reset();
    const std::string message = test::pattern(50000, 9);
    REQUIRE(connection->send(message));
    REQUIRE(test::run_until(loop, [&] { return tally.received.size() >= message.size(); }));
    CHECK(tally.received == message);

    // Its close reaches no connector (ASan would see the freed one), and nothing reconnects.
    connection->close();
    REQUIRE(test::run_until(loop, [&] { return loop.connection_count() == 0; }));
    CHECK(tally.closed == 1);
    run_for(loop, 200ms);
    CHECK(server.accepted_count() == 1);
    CHECK(outcomes.list.size() == 1);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

// --- Unix sockets and bad arguments -------------------------------------------------------------

TEMPLATE_TEST_CASE("an abstract Unix socket endpoint connects", "[connector][unix]", LT, ET) {
  using Loop = TestType;
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    Loop loop;
    const Endpoint name = abstract_endpoint("unix");
    Server<Loop> server(loop, name);
    CountingResolver resolver;
    tally.greeting = test::pattern(70000, 5);
    Client<Loop> client(loop, ClientHandler{&tally}, Record{&outcomes}, {}, resolver.resolver);
    client.connect(name);
    CHECK(outcomes.list.empty());
    REQUIRE(test::run_until(loop, [&] { return tally.received.size() >= tally.greeting.size(); }));
    REQUIRE(outcomes.list.size() == 1);
    CHECK(outcomes.list[0].connection != nullptr);
    CHECK_FALSE(outcomes.list[0].ec);
    CHECK(outcomes.list[0].address == name);
    CHECK(outcomes.list[0].address.to_string() == name.to_string());
    CHECK(tally.received == tally.greeting);
    CHECK(client.state() == ConnectorState::kConnected);
    CHECK(*resolver.calls == 0);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

// A non-blocking connect() on a Unix socket that fails with EINTR did nothing (unlike TCP's,
// which goes on asynchronously): the connector must call it again. Linux rarely returns it, so a
// policy interrupts the first Unix connect() before it reaches the kernel. Fails on the connector
// of c162907, which waited for EPOLLOUT as for TCP: an unconnected Unix socket polls writable, its
// SO_ERROR is 0, and it reported a connection the listener never saw.
struct InterruptFirstUnixConnect : reactor::LinuxSyscalls {
  static inline int interrupted = 0;
  static int connect(int fd, const sockaddr* address, socklen_t length) noexcept {
    if (address->sa_family == AF_UNIX && interrupted == 0) {
      ++interrupted;
      errno = EINTR;
      return -1;
    }
    return ::connect(fd, address, length);
  }
};

TEST_CASE("a Unix connect interrupted by EINTR is called again and really connects",
          "[connector][unix]") {
  using Loop = reactor::Reactor<reactor::LevelTriggered, InterruptFirstUnixConnect>;
  const std::size_t fds_at_start = test::open_fd_count();
  {
    InterruptFirstUnixConnect::interrupted = 0;
    Outcomes outcomes;
    Tally tally;
    Loop loop;
    const Endpoint name = abstract_endpoint("eintr");
    Server<Loop> server(loop, name);
    tally.greeting = test::pattern(20000, 7);
    Client<Loop> client(loop, ClientHandler{&tally}, Record{&outcomes});
    client.connect(name);
    REQUIRE(test::run_until(loop, [&] { return tally.received.size() >= tally.greeting.size(); }));
    CHECK(InterruptFirstUnixConnect::interrupted == 1);
    REQUIRE(outcomes.list.size() == 1);
    CHECK(outcomes.list[0].connection != nullptr);
    CHECK_FALSE(outcomes.list[0].ec);
    CHECK(server.accepted_count() == 1);
    CHECK(tally.received == tally.greeting);  // echoed: the listener had the connection
    CHECK(tally.closed == 0);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

// A Unix socket's connect() answers EAGAIN while its listener's queue is full, and nothing is in
// progress to wait for: the connector calls connect() again, backing off, until there is room or
// the attempt times out. Both fail on the connector of b4541f8, where EAGAIN failed the connect at
// once (resource_unavailable_try_again, on the first loop iteration).
TEST_CASE("a Unix socket whose listener's queue is full connects once the listener accepts",
          "[connector][unix]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    warm_up(loop);
    FullUnixListener server("queue-full-then-accepts");
    REQUIRE(server.full());
    ConnectOptions options;
    options.attempt_timeout = 3s;
    tally.greeting = "through a full queue";
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options);

    reactor::UniqueFd filler;  // the connection that filled the queue, accepted 200 ms in
    Clock::time_point accepted_at = Clock::time_point::max();
    const auto start = Clock::now();
    client.connect(server.endpoint());
    loop.schedule_after(200ms, [&] {
      filler = server.accept_one();
      accepted_at = Clock::now();
    });
    // Nothing fails at once: the attempt waits for room.
    run_for(loop, 100ms);
    CHECK(outcomes.list.empty());
    CHECK(client.state() == ConnectorState::kConnecting);
    CHECK(client.attempts_in_flight() == 1);

    REQUIRE(test::run_until(
        loop, [&] { return !outcomes.list.empty(); }, 10s));
    REQUIRE(filler);
    const Outcome& outcome = outcomes.list[0];
    CHECK(outcome.connection != nullptr);
    CHECK_FALSE(outcome.ec);
    CHECK(outcome.address == server.endpoint());
    CHECK(outcome.at >= accepted_at);
    CHECK(ms_between(start, outcome.at) >= 200ms);
    CHECK(ms_between(start, outcome.at) < 2s);  // the backoff's 50 ms, not the 3 s timeout
    CHECK(client.state() == ConnectorState::kConnected);
    CHECK(client.attempts_in_flight() == 0);
    CHECK(tally.opened == 1);

    // The connector's socket is next in the queue, and its greeting comes through.
    reactor::UniqueFd accepted = server.accept_one();
    REQUIRE(accepted);
    std::string received;
    REQUIRE(test::run_until(
        loop,
        [&] {
          char buffer[256];
          const ssize_t n = ::recv(accepted.get(), buffer, sizeof buffer, MSG_DONTWAIT);
          if (n > 0) received.append(buffer, static_cast<std::size_t>(n));
          return received.size() >= tally.greeting.size();
        },
        5s));
    CHECK(received == tally.greeting);
    CHECK_FALSE(server.accept_one());

    client.disconnect();
    REQUIRE(test::run_until(loop, [&] { return loop.connection_count() == 0; }));
    CHECK(tally.closed == 1);
    CHECK(outcomes.list.size() == 1);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE(
    "a Unix socket whose listener never makes room times out at attempt_timeout without "
    "spinning",
    "[connector][unix][timeout]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    warm_up(loop);
    FullUnixListener server("queue-full-forever");
    REQUIRE(server.full());
    const std::size_t fds_before = test::open_fd_count();
    ConnectOptions options;
    options.attempt_timeout = 300ms;
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options);
    outcomes.then = [&](const Outcome&, const Endpoint&) { loop.stop(); };
    bool gave_up = false;
    const reactor::TimerId safety = loop.schedule_after(20s, [&] {
      gave_up = true;
      loop.stop();
    });

    const std::uint64_t iterations_before = loop.loop_iterations();
    const auto start = Clock::now();
    client.connect(server.endpoint());
    loop.run();
    const std::uint64_t iterations = loop.loop_iterations() - iterations_before;
    loop.cancel(safety);
    REQUIRE_FALSE(gave_up);
    REQUIRE(outcomes.list.size() == 1);
    const Outcome& outcome = outcomes.list[0];
    CHECK(outcome.connection == nullptr);
    CHECK(outcome.ec == std::errc::timed_out);
    CHECK(outcome.address == server.endpoint());
    CHECK(ms_between(start, outcome.at) >= 300ms);
    CHECK(ms_between(start, outcome.at) < 3s);
    // connect() again after 1, 2, 4, ... 50 ms: a dozen or so wake-ups in 300 ms, not a spin.
    INFO("loop iterations: " << iterations);
    CHECK(iterations < 200);
    CHECK(client.state() == ConnectorState::kIdle);
    CHECK(client.last_error() == std::errc::timed_out);
    CHECK(client.attempts_in_flight() == 0);
    CHECK(test::open_fd_count() == fds_before);
    CHECK(loop.pending_timers() == 0);

    // The queue holds only the connection that filled it.
    CHECK(server.accept_one());
    CHECK_FALSE(server.accept_one());
    run_for(loop, 200ms);
    CHECK(outcomes.list.size() == 1);
    CHECK(tally.opened == 0);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE("bad arguments fail through on_result and never inside connect", "[connector][errors]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    CountingResolver resolver;
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, {}, resolver.resolver);

    // Each section checks that connect() returned without calling on_result.
    SECTION("a port above 65535") {
      client.connect("127.0.0.1", 70000);
      CHECK(outcomes.list.empty());
    }
    SECTION("a negative port") {
      client.connect("127.0.0.1", -1);
      CHECK(outcomes.list.empty());
    }
    SECTION("a 64-bit port that would wrap to 16 bits") {
      client.connect("localhost", (std::uint64_t{1} << 40) + 80);
      CHECK(outcomes.list.empty());
    }
    SECTION("an empty host") {
      client.connect("", 80);
      CHECK(outcomes.list.empty());
    }
    SECTION("no endpoints") {
      client.connect(std::vector<Endpoint>{});
      CHECK(outcomes.list.empty());
    }
    SECTION("only empty endpoints") {
      client.connect(std::vector<Endpoint>{Endpoint{}, Endpoint{}});
      CHECK(outcomes.list.empty());
    }

    REQUIRE(test::run_until(
        loop, [&] { return !outcomes.list.empty(); }, 5s));
    const Outcome& outcome = outcomes.list[0];
    CHECK(outcome.connection == nullptr);
    CHECK(outcome.ec == std::errc::invalid_argument);
    CHECK(outcome.address.empty());
    CHECK(client.state() == ConnectorState::kIdle);
    CHECK(client.last_error() == std::errc::invalid_argument);
    run_for(loop, 100ms);
    CHECK(outcomes.list.size() == 1);
    CHECK(*resolver.calls == 0);
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

TEST_CASE("bad arguments still fail with invalid_argument after an earlier connect's deadline",
          "[connector][errors][timeout]") {
  const std::size_t fds_at_start = test::open_fd_count();
  {
    Outcomes outcomes;
    Tally tally;
    LT loop;
    Server<LT> server(loop, Endpoint::parse("127.0.0.1:0"));
    ConnectOptions options;
    options.deadline = 100ms;
    Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, options);
    client.connect(server.local_endpoint());
    REQUIRE(test::run_until(
        loop, [&] { return outcomes.list.size() == 1; }, 10s));
    CHECK(outcomes.list[0].connection != nullptr);
    run_for(loop, 200ms);  // the first connect's deadline is long past

    client.connect("", 80);
    CHECK(outcomes.list.size() == 1);
    REQUIRE(test::run_until(
        loop, [&] { return outcomes.list.size() == 2; }, 5s));
    CHECK(outcomes.list[1].ec == std::errc::invalid_argument);
    CHECK(outcomes.list[1].address.empty());
    // The first connection is no longer the connector's, but it is still open.
    CHECK(connection_of<LT>(outcomes.list[0])->is_open());
  }
  CHECK(test::open_fd_count() == fds_at_start);
}

// A host name is a C string to getaddrinfo and inet_pton: one with a NUL inside would be cut
// there, and "127.0.0.1\0x" would connect to 127.0.0.1. Fails on the connector of 4a86263: both
// hosts below reached the listener.
TEST_CASE("a host with an embedded NUL fails with invalid_argument and is never tried",
          "[connector][errors]") {
  using std::string_view_literals::operator""sv;
  for (const std::string_view host : {"127.0.0.1\0x"sv, "localhost\0.invalid"sv}) {
    CAPTURE(host.size());
    REQUIRE(host.find('\0') != std::string_view::npos);
    const std::size_t fds_at_start = test::open_fd_count();
    {
      Outcomes outcomes;
      Tally tally;
      LT loop;
      Server<LT> server(loop, Endpoint::parse("127.0.0.1:0"));
      CountingResolver resolver;
      Client<LT> client(loop, ClientHandler{&tally}, Record{&outcomes}, {}, resolver.resolver);

      client.connect(host, server.local_endpoint().port());
      CHECK(outcomes.list.empty());  // never from inside connect()
      REQUIRE(test::run_until(
          loop, [&] { return !outcomes.list.empty(); }, 5s));
      const Outcome& outcome = outcomes.list[0];
      CHECK(outcome.connection == nullptr);
      CHECK(outcome.ec == std::errc::invalid_argument);
      CHECK(outcome.address.empty());
      CHECK(client.state() == ConnectorState::kIdle);

      run_for(loop, 200ms);
      CHECK(outcomes.list.size() == 1);
      CHECK(server.accepted_count() == 0);
      CHECK(tally.opened == 0);
      CHECK(*resolver.calls == 0);
    }
    CHECK(test::open_fd_count() == fds_at_start);
  }
}
