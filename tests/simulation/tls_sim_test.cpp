// Scenarios for TLS (include/reactor/tls.hpp) in the simulated world
// (tests/support/sim_kernel.hpp): TlsTransport's I/O goes through the reactor's syscall policy
// (detail::SysBio), so a TlsAcceptor and a TlsConnector on a Reactor<Trigger, SimSyscalls> run real
// OpenSSL handshakes and records over in-memory sockets, in virtual time, where instants are exact:
// a 1 MiB echo each way (also under short transfers, EINTR, EAGAIN, short epoll batches and small
// socket buffers), the handshake timeout, truncation (FIN without close_notify, mid-stream and
// mid-record), a reset mid-record, the clean close, the linger of close() for a peer that never
// answers close_notify, and random actions from seeds against invariants. Every case runs in both
// trigger modes.
//
// Two kinds of client: a TlsConnector on the same reactor as the server, and a "remote" TLS
// client (RemoteTlsClient), an SSL object of the client context on memory BIOs that the test
// pumps through a remote peer of the kernel (Kernel::peer_send / peer_recv): it holds no fd and
// lets a test put on the wire exactly a prefix of a record, or never answer.
//
// Determinism: OpenSSL's handshake draws randomness (client and server random, key shares,
// signature nonces, ticket keys) that this test cannot seed, so the bytes on the wire differ from
// run to run and so does Kernel::trace_hash(), which hashes them. What a run must repeat is its
// shape: every syscall the library makes, by kind, fd, size and result, at its virtual instant
// (RecordedSyscalls hashes that). The sizes are fixed as well because every record's length is:
// the leaf key is RSA (an RSA-PSS signature has the modulus' length, where an ECDSA one is DER
// and varies by a byte or two), and TLS 1.3's other fields are of fixed size.
#include <netinet/in.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <reactor.hpp>
#include <reactor/tls.hpp>

#include "catch.hpp"
#include "sim_kernel.hpp"
#include "tls_certs.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// epoll_wait calls at one virtual instant with nothing moving that the kernel reports as a spin.
constexpr std::size_t kSpinLimit = 100;
constexpr std::size_t kNone = static_cast<std::size_t>(-1);

// --- certificates and contexts -------------------------------------------------------------------

// Made once per process: key generation is the slow part of a TLS test.
struct Certs {
  reactor_test::TestCa ca;
  reactor_test::Pem leaf = ca.issue({"localhost"}, {"127.0.0.1"}, reactor_test::KeyType::kRsa2048);
};

const Certs& certs() {
  static const Certs kCerts;
  return kCerts;
}

reactor::TlsContext server_context(milliseconds handshake_timeout = 10s) {
  reactor::TlsOptions options;
  options.certificates.push_back(
      reactor::TlsCertificate::from_pem(certs().leaf.certificate, certs().leaf.key));
  options.handshake_timeout = handshake_timeout;
  return reactor::TlsContext(reactor::TlsRole::kServer, options);
}

reactor::TlsContext client_context() {
  reactor::TlsOptions options;
  options.ca_pem = certs().ca.certificate_pem();
  return reactor::TlsContext(reactor::TlsRole::kClient, options);
}

// --- the recorded shape of a run -----------------------------------------------------------------

// SimSyscalls, and a hash of each I/O call's kind, fd, size, result, errno and virtual instant
// (never its bytes: see the file comment), and a count of epoll_waits.
struct RecordedSyscalls : sim::SimSyscalls {
  static inline std::uint64_t hash = 0;
  static inline std::size_t epoll_waits = 0;

  static void reset() {
    hash = 0xcbf29ce484222325ULL;
    epoll_waits = 0;
  }
  static void record(std::uint64_t kind, long fd, long size, long result) {
    const int saved = errno;
    const std::uint64_t parts[] = {
        kind,
        static_cast<std::uint64_t>(fd),
        static_cast<std::uint64_t>(size),
        static_cast<std::uint64_t>(result),
        static_cast<std::uint64_t>(result < 0 ? saved : 0),
        static_cast<std::uint64_t>(sim::Kernel::current().now().time_since_epoch().count())};
    for (const std::uint64_t part : parts) hash = (hash ^ part) * 0x100000001b3ULL;
    errno = saved;
  }

  static int epoll_wait(int epfd, epoll_event* events, int max_events, int timeout_ms) noexcept {
    ++epoll_waits;
    const int n = sim::SimSyscalls::epoll_wait(epfd, events, max_events, timeout_ms);
    record(1, epfd, timeout_ms, n);
    return n;
  }
  static ssize_t read(int fd, void* buffer, std::size_t size) noexcept {
    const ssize_t n = sim::SimSyscalls::read(fd, buffer, size);
    record(2, fd, static_cast<long>(size), n);
    return n;
  }
  static ssize_t send(int fd, const void* buffer, std::size_t size, int flags) noexcept {
    const ssize_t n = sim::SimSyscalls::send(fd, buffer, size, flags);
    record(3, fd, static_cast<long>(size), n);
    return n;
  }
  static int accept4(int fd, sockaddr* address, socklen_t* length, int flags) noexcept {
    const int n = sim::SimSyscalls::accept4(fd, address, length, flags);
    record(4, fd, 0, n);
    return n;
  }
  static int connect(int fd, const sockaddr* address, socklen_t length) noexcept {
    const int n = sim::SimSyscalls::connect(fd, address, length);
    record(5, fd, 0, n);
    return n;
  }
  static int shutdown(int fd, int how) noexcept {
    const int n = sim::SimSyscalls::shutdown(fd, how);
    record(6, fd, how, n);
    return n;
  }
  static int close(int fd) noexcept {
    const int n = sim::SimSyscalls::close(fd);
    record(7, fd, 0, n);
    return n;
  }
};

class Rng {
 public:
  explicit Rng(std::uint64_t seed) : engine_(seed * 0x9e3779b97f4a7c15ULL + 1) {}
  std::size_t below(std::size_t n) { return n == 0 ? 0 : static_cast<std::size_t>(engine_() % n); }
  bool chance(std::size_t percent) { return below(100) < percent; }

 private:
  std::mt19937_64 engine_;
};

std::string payload(std::size_t size, std::uint64_t seed) {
  Rng rng(seed);
  std::string out(size, '\0');
  for (char& c : out) c = static_cast<char>(rng.below(256));
  return out;
}

Clock::time_point now() {
  return sim::Kernel::current().now();
}

double ms(Clock::duration d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

// --- the server ----------------------------------------------------------------------------------

// One connection the server opened (after its handshake).
struct ServerConn {
  std::string input;
  int opens = 0;
  int eofs = 0;
  int closes = 0;
  std::error_code reason;
  Clock::time_point opened_at{}, closed_at{};
  std::uint16_t peer_port = 0;
  std::size_t close_after = kNone;  // closes itself once it has received this many bytes
  std::function<void()> close;      // while open
  std::function<void()> resume;     // while open
};

struct ServerLog {
  std::deque<ServerConn> conns;
  std::vector<std::pair<Clock::time_point, std::error_code>> handshake_failures;
  bool echo = true;
  bool pause_on_open = false;
  std::function<std::size_t()> close_after;  // a new connection's ServerConn::close_after
};

// Echoes (unless the log says not to); closes at the peer's EOF. Each connection has its copy, so
// `index` is its own.
struct Server {
  ServerLog* log;
  std::size_t index = kNone;

  ServerConn& conn() { return log->conns[index]; }

  template <class Conn>
  void on_open(Conn& c) {
    index = log->conns.size();
    ServerConn& r = log->conns.emplace_back();
    ++r.opens;
    r.opened_at = now();
    r.peer_port = c.remote_endpoint().port();
    if (log->close_after) r.close_after = log->close_after();
    r.close = [&c] { c.close(); };
    r.resume = [&c] { c.resume_reading(); };
    if (log->pause_on_open) c.pause_reading();
  }
  template <class Conn>
  void on_data(Conn& c, std::string_view bytes) {
    ServerConn& r = conn();
    r.input.append(bytes);
    if (log->echo) c.send(bytes);
    if (r.input.size() >= r.close_after) c.close();
  }
  template <class Conn>
  void on_eof(Conn& c) {
    ++conn().eofs;
    c.close();
  }
  template <class Conn>
  void on_close(Conn& /*c*/, std::error_code reason) {
    ServerConn& r = conn();
    ++r.closes;
    r.reason = reason;
    r.closed_at = now();
    r.close = nullptr;
    r.resume = nullptr;
  }
  template <class Conn>
  void on_handshake_failed(Conn& /*c*/, std::error_code reason) {
    log->handshake_failures.emplace_back(now(), reason);
  }
};

// --- the connector's client ----------------------------------------------------------------------

struct ClientRec {
  std::string payload;             // sent from on_open
  bool close_when_echoed = false;  // close() once all that was sent came back
  std::string sent, input;
  int results = 0;
  bool connected = false;
  std::error_code result_ec;
  int opens = 0;
  int closes = 0;
  std::error_code reason;
  Clock::time_point opened_at{}, closed_at{};
  std::uint16_t port = 0;
  // While open.
  std::function<void(std::string_view)> send;
  std::function<void()> close;
  std::function<void(bool)> abort;  // abort(send_reset)
};

struct Client {
  ClientRec* rec;

  template <class Conn>
  void on_open(Conn& c) {
    ++rec->opens;
    rec->opened_at = now();
    rec->port = c.local_endpoint().port();
    ClientRec* r = rec;
    rec->send = [r, &c](std::string_view bytes) {
      if (c.send(bytes)) r->sent.append(bytes);
    };
    rec->close = [&c] { c.close(); };
    rec->abort = [&c](bool reset) { c.abort(reset); };
    if (!rec->payload.empty()) rec->send(rec->payload);
  }
  template <class Conn>
  void on_data(Conn& c, std::string_view bytes) {
    rec->input.append(bytes);
    if (rec->close_when_echoed && rec->input.size() == rec->sent.size()) c.close();
  }
  template <class Conn>
  void on_close(Conn& /*c*/, std::error_code reason) {
    ++rec->closes;
    rec->reason = reason;
    rec->closed_at = now();
    rec->send = nullptr;
    rec->close = nullptr;
    rec->abort = nullptr;
  }
};

struct Result {
  ClientRec* rec;
  template <class Conn>
  void operator()(Conn* c, std::error_code ec, const reactor::Endpoint& /*address*/) const {
    ++rec->results;
    rec->connected = c != nullptr;
    rec->result_ec = ec;
  }
};

// --- the world -----------------------------------------------------------------------------------

// The contexts, the logs, a kernel and a reactor on it, declared so that each outlives what uses
// it: the contexts and logs outlive the reactor (whose destructor closes what is still open), the
// kernel outlives all. Acceptors and connectors are declared by each test after its World.
template <class Trigger>
class World {
 public:
  using Loop = reactor::Reactor<Trigger, RecordedSyscalls>;
  using Acceptor = reactor::TlsAcceptor<Server, Loop>;
  using Dialer = reactor::TlsConnector<Client, Result, Loop>;

  reactor::TlsContext server_tls;
  reactor::TlsContext client_tls = client_context();
  ServerLog server;
  std::deque<ClientRec> clients;
  sim::Kernel kernel;
  Loop loop;
  // run_once calls in which nothing moved: no byte, fd, clock or world action (a spin).
  std::size_t idle_iterations = 0;

  explicit World(std::size_t stream_capacity = 64 * 1024, milliseconds handshake_timeout = 10s)
      : server_tls(server_context(handshake_timeout)), kernel(stream_capacity) {
    RecordedSyscalls::reset();
    kernel.set_spin_limit(kSpinLimit);
    // The reactor's timerfd comes with its first timer and stays: open it now, so that the fd
    // baselines hold it.
    loop.cancel(loop.schedule_after(1h, [] {}));
  }

  Acceptor serve(reactor::ListenOptions options = {}) {
    return Acceptor(loop, reactor::Endpoint::parse("127.0.0.1:4433"),
                    reactor::TlsTransport(server_tls), Server{&server}, options);
  }

  // A connector for a new client record (connect() it to "127.0.0.1", 4433).
  std::unique_ptr<Dialer> dialer(ClientRec*& rec, std::uint64_t seed = 1,
                                 reactor::ConnectionOptions connection = {}) {
    rec = &clients.emplace_back();
    reactor::ConnectOptions options;
    options.seed = seed;
    options.connection = connection;
    return std::make_unique<Dialer>(loop, reactor::TlsTransport(client_tls), Client{rec},
                                    Result{rec}, options);
  }

  // One loop iteration, waiting at most `limit` (virtual); counts iterations that moved nothing.
  void step(milliseconds limit) {
    const std::uint64_t before = kernel.progress_marks();
    const Clock::time_point at = now();
    loop.run_once(limit);
    if (kernel.progress_marks() == before && now() == at) ++idle_iterations;
  }

  template <class Done>
  bool run_until(Done done, milliseconds limit = 60s) {
    const Clock::time_point end = now() + limit;
    for (int i = 0; i < 1000000 && !done() && now() < end; ++i) step(left(end));
    return done();
  }
  void run_for(milliseconds span) {
    const Clock::time_point end = now() + span;
    for (int i = 0; i < 1000000 && now() < end; ++i) step(left(end));
  }

 private:
  milliseconds left(Clock::time_point end) const {
    return std::max(1ms, std::chrono::ceil<milliseconds>(end - now()));
  }
};

// --- a remote TLS client -------------------------------------------------------------------------

// A TLS client outside the process: an SSL object of `context` on memory BIOs, whose records the
// test moves through remote peer `peer` of the kernel by calling pump(). Sends only what pump()
// finds room for; keeps the rest.
class RemoteTlsClient {
 public:
  RemoteTlsClient(sim::Kernel& kernel, const reactor::TlsContext& context, sim::PeerId peer)
      : kernel_(&kernel), peer_(peer) {
    std::error_code ec;
    ssl_ = context.new_ssl(ec);
    REQUIRE(ssl_ != nullptr);
    network_in_ = BIO_new(BIO_s_mem());
    network_out_ = BIO_new(BIO_s_mem());
    SSL_set_bio(ssl_, network_in_, network_out_);  // the SSL owns both now
    SSL_set_connect_state(ssl_);
  }
  ~RemoteTlsClient() { SSL_free(ssl_); }
  RemoteTlsClient(const RemoteTlsClient&) = delete;
  RemoteTlsClient& operator=(const RemoteTlsClient&) = delete;

  // Moves what arrived into OpenSSL, advances the handshake, reads application data, and sends
  // what OpenSSL produced (as far as the peer's send queue has room).
  void pump() {
    for (;;) {
      std::string got;
      const ssize_t n = kernel_->peer_recv(peer_, got);
      if (n > 0) {
        BIO_write(network_in_, got.data(), static_cast<int>(got.size()));
        continue;
      }
      if (n == 0) eof_ = true;
      if (n < 0 && errno != EAGAIN) reset_ = true;
      break;
    }
    if (!SSL_is_init_finished(ssl_)) {
      if (SSL_do_handshake(ssl_) != 1) {
        const int error = SSL_get_error(ssl_, -1);
        if (error != SSL_ERROR_WANT_READ && error != SSL_ERROR_WANT_WRITE) failed_ = true;
        ERR_clear_error();
      }
    }
    if (SSL_is_init_finished(ssl_)) {
      char buffer[16384];
      std::size_t size = 0;
      while (SSL_read_ex(ssl_, buffer, sizeof buffer, &size) == 1) input_.append(buffer, size);
      if (SSL_get_error(ssl_, 0) == SSL_ERROR_ZERO_RETURN) close_notify_ = true;
      ERR_clear_error();
    }
    take_output();
    flush();
  }

  sim::PeerId peer() const { return peer_; }
  bool handshake_done() const { return SSL_is_init_finished(ssl_) == 1; }
  // The records of `bytes` (one or more), not sent: the test decides how much of them goes.
  std::string seal(std::string_view bytes) {
    std::size_t written = 0;
    REQUIRE(SSL_write_ex(ssl_, bytes.data(), bytes.size(), &written) == 1);
    REQUIRE(written == bytes.size());
    return drain();
  }
  // Our close_notify's record, not sent.
  std::string close_notify() {
    SSL_shutdown(ssl_);
    ERR_clear_error();
    return drain();
  }
  // Queues raw bytes for the wire (sent by pump()).
  void queue(std::string_view bytes) { wire_.append(bytes); }
  std::size_t unsent() const { return wire_.size(); }

  const std::string& input() const { return input_; }
  bool got_close_notify() const { return close_notify_; }
  bool got_eof() const { return eof_; }
  bool was_reset() const { return reset_; }
  bool failed() const { return failed_; }

 private:
  std::string drain() {
    std::string out;
    char buffer[16384];
    int n = 0;
    while ((n = BIO_read(network_out_, buffer, sizeof buffer)) > 0) out.append(buffer, n);
    return out;
  }
  void take_output() { wire_ += drain(); }
  void flush() {
    while (!wire_.empty()) {
      const ssize_t n = kernel_->peer_send(peer_, wire_);
      if (n <= 0) return;
      wire_.erase(0, static_cast<std::size_t>(n));
    }
  }

  sim::Kernel* kernel_;
  sim::PeerId peer_;
  SSL* ssl_ = nullptr;
  BIO* network_in_ = nullptr;
  BIO* network_out_ = nullptr;
  std::string wire_;
  std::string input_;
  bool eof_ = false;
  bool reset_ = false;
  bool failed_ = false;
  bool close_notify_ = false;
};

// Steps the loop and pumps `peer` until `done()`, at most `limit` of virtual time.
template <class W, class Done>
bool pump_until(W& world, RemoteTlsClient& peer, Done done, milliseconds limit = 10s) {
  const Clock::time_point end = now() + limit;
  for (int i = 0; i < 100000 && now() < end; ++i) {
    peer.pump();
    if (done()) return true;
    world.step(1ms);
  }
  peer.pump();
  return done();
}

// A remote TLS client connected to the world's server, its handshake done (the server's on_open
// ran).
template <class W>
std::unique_ptr<RemoteTlsClient> remote_client(W& world) {
  const std::optional<sim::PeerId> peer = world.kernel.connect(4433);
  REQUIRE(peer.has_value());
  auto client = std::make_unique<RemoteTlsClient>(world.kernel, world.client_tls, *peer);
  const std::size_t opened = world.server.conns.size();
  REQUIRE(pump_until(world, *client, [&] {
    return client->handshake_done() && world.server.conns.size() > opened;
  }));
  REQUIRE_FALSE(client->failed());
  return client;
}

// --- the echo ------------------------------------------------------------------------------------

enum class Faults { kOff, kHarmless };

// Faults that lose nothing, on about one call in six, drawn from `seed`: EINTR and short
// transfers on reads and sends (a record then reaches the peer in pieces cut anywhere: OpenSSL
// calls the BIO again for the rest, and a TLS read is never taken for "drained", so edge mode
// takes them too), EAGAIN on reads and sends in level mode only (edge mode trusts a read's EAGAIN
// as the kernel's last word, as the syscall contract allows), EINTR and batches of 1 to 3 events
// from epoll_wait, EINTR from accept4.
void install_harmless_faults(sim::Kernel& kernel, std::uint64_t seed, bool edge) {
  auto rng = std::make_shared<Rng>(seed ^ 0x7157ULL);
  kernel.set_faults([rng, edge](sim::Op op, int) -> sim::Fault {
    if (!rng->chance(16)) return {};
    const std::size_t r = rng->below(100);
    switch (op) {
      case sim::Op::kEpollWait:
        return r < 40 ? sim::Fault{EINTR} : sim::Fault{0, 1 + rng->below(3)};
      case sim::Op::kRead:
      case sim::Op::kSend:
      case sim::Op::kSendmsg:
        if (r < 25) return {EINTR};
        if (r < 40 && !edge) return {EAGAIN};
        return {0, 1 + rng->below(r < 70 ? 5 : 2048)};
      case sim::Op::kAccept4:
        return {EINTR};
      default:
        return {};
    }
  });
}

struct EchoRun {
  bool done = false;
  std::string sent_ok;  // "" when every check on the bytes passed, else what failed
  Clock::duration took{};
  std::uint64_t shape = 0;
  std::size_t epoll_waits = 0;
  std::size_t idle_iterations = 0;
  std::size_t stream_capacity = 0;
};

// 1 MiB from a connector's client to an echoing TlsAcceptor and back, then the client's close();
// the world drains.
template <class Trigger>
EchoRun echo(std::uint64_t seed, Faults faults) {
  constexpr std::size_t kSize = 1 << 20;
  Rng rng(seed);
  const std::size_t capacity =
      faults == Faults::kOff ? 64 * 1024 : std::size_t{512} << rng.below(5);  // 512 B to 8 KiB
  World<Trigger> world(capacity);
  auto acceptor = world.serve();
  const std::size_t fds = world.kernel.open_fds();
  ClientRec* client = nullptr;
  auto dialer = world.dialer(client, seed);
  client->payload = payload(kSize, seed);
  client->close_when_echoed = true;
  if (faults == Faults::kHarmless) install_harmless_faults(world.kernel, seed, Trigger::kEdge);
  const Clock::time_point t0 = now();
  dialer->connect("127.0.0.1", 4433);

  EchoRun run;
  run.stream_capacity = capacity;
  run.done = world.run_until(
      [&] {
        return client->closes == 1 && !world.server.conns.empty() &&
               world.server.conns[0].closes == 1;
      },
      60s);
  world.kernel.set_faults(nullptr);
  run.took = now() - t0;
  CAPTURE(client->reason.message(), client->sent.size(), client->input.size());
  CAPTURE(world.server.conns.empty() ? std::string("no server connection")
                                     : world.server.conns[0].reason.message());
  CAPTURE(world.server.conns.empty() ? 0 : world.server.conns[0].input.size());
  CHECK(client->results == 1);
  CHECK(client->connected);
  CHECK(client->opens == 1);
  CHECK(client->closes == 1);
  CHECK_FALSE(client->reason);
  REQUIRE(world.server.conns.size() == 1);
  const ServerConn& server = world.server.conns[0];
  CHECK(server.opens == 1);
  CHECK(server.closes == 1);
  CHECK(server.eofs == 1);  // the client's close_notify: an orderly end
  CHECK_FALSE(server.reason);
  CHECK(world.server.handshake_failures.empty());
  if (client->sent != client->payload) run.sent_ok += "client sent less than the payload; ";
  if (server.input != client->payload) run.sent_ok += "server input differs; ";
  if (client->input != client->payload) run.sent_ok += "echo differs; ";
  CHECK(world.kernel.open_fds() == fds);
  run.shape = RecordedSyscalls::hash;
  run.epoll_waits = RecordedSyscalls::epoll_waits;
  run.idle_iterations = world.idle_iterations;
  return run;
}

}  // namespace

// --- echo ----------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("a TLS echo of 1 MiB each way arrives byte for byte and repeats its shape",
                   "[tls][simulation][echo]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  const EchoRun first = echo<TestType>(1, Faults::kOff);
  REQUIRE(first.done);
  CHECK(first.sent_ok.empty());
  CAPTURE(first.sent_ok, first.epoll_waits, first.idle_iterations);
  // Nothing in this world waits on a timer: all of it happens at the instant it starts.
  CHECK(first.took == Clock::duration::zero());
  CHECK(first.idle_iterations <= 2);

  // The same seed, the same shape (syscalls, sizes, results, instants), though not the same bytes.
  const EchoRun second = echo<TestType>(1, Faults::kOff);
  REQUIRE(second.done);
  CHECK(second.sent_ok.empty());
  CHECK(second.shape == first.shape);
  CHECK(second.epoll_waits == first.epoll_waits);
  CHECK(second.took == first.took);
}

TEMPLATE_TEST_CASE(
    "a TLS echo under short transfers EINTR EAGAIN and small buffers arrives intact and on time",
    "[tls][simulation][echo][faults]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  for (std::uint64_t seed = 1; seed <= 4; ++seed) {
    CAPTURE(seed);
    const EchoRun run = echo<TestType>(seed, Faults::kHarmless);
    CAPTURE(run.stream_capacity, run.epoll_waits, run.idle_iterations, ms(run.took));
    REQUIRE(run.done);
    CHECK(run.sent_ok.empty());
    // No fault here costs virtual time: the echo completes at the instant it began.
    CHECK(run.took == Clock::duration::zero());
    // No spin: the kernel reports more than kSpinLimit idle epoll_waits at one instant itself;
    // a loop iteration that moved nothing is rare (an injected EAGAIN or EINTR costs one).
    CHECK(run.idle_iterations <= run.epoll_waits / 4 + 10);
    // Same seed, same faults, same shape.
    const EchoRun again = echo<TestType>(seed, Faults::kHarmless);
    CHECK(again.sent_ok.empty());
    CHECK(again.shape == run.shape);
  }
}

// --- handshake timeout ---------------------------------------------------------------------------

TEMPLATE_TEST_CASE(
    "a client that connects and never sends fails the handshake with timed_out exactly on time",
    "[tls][simulation][handshake]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  World<TestType> world(64 * 1024, 250ms);
  auto acceptor = world.serve();
  const std::size_t fds = world.kernel.open_fds();
  // Two silent clients: one sends nothing, the other the first 9 bytes of a ClientHello (a
  // record header announcing 300 bytes, then a handshake header).
  const std::optional<sim::PeerId> silent = world.kernel.connect(4433);
  REQUIRE(silent.has_value());
  world.run_until([&] { return world.kernel.peer_accepted(*silent); }, 1s);
  REQUIRE(world.kernel.peer_accepted(*silent));
  const Clock::time_point accepted = now();
  const std::optional<sim::PeerId> partial = world.kernel.connect(4433);
  REQUIRE(partial.has_value());
  REQUIRE(world.kernel.peer_send(*partial,
                                 std::string_view("\x16\x03\x01\x01\x2c\x01\x00\x01\x28", 9)) == 9);
  world.run_until([&] { return world.kernel.peer_accepted(*partial); }, 1s);

  const std::size_t waits_before = RecordedSyscalls::epoll_waits;
  REQUIRE(world.run_until([&] { return world.server.handshake_failures.size() == 2; }, 10s));
  // Both timed out at accept + 250 ms, in one wakeup of the handshake timer, with no wakeups in
  // between (nothing arrived).
  for (const auto& [at, reason] : world.server.handshake_failures) {
    CHECK(at == accepted + 250ms);
    CHECK(reason == std::errc::timed_out);
  }
  CHECK(RecordedSyscalls::epoll_waits - waits_before <= 4);
  CHECK(world.idle_iterations <= 2);
  CHECK(world.server.conns.empty());  // no on_open, so no on_close
  // Their sockets are closed: each peer reads EOF (or a reset, for the one with unread input).
  std::string got;
  CHECK(world.kernel.peer_recv(*silent, got) == 0);
  CHECK(world.kernel.open_fds() == fds);
  world.run_for(1s);
  CHECK(world.server.handshake_failures.size() == 2);
}

// --- truncation, reset and the clean close -------------------------------------------------------

TEMPLATE_TEST_CASE("a peer's FIN without close_notify mid-stream closes with kTruncated",
                   "[tls][simulation][close]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  World<TestType> world;
  world.server.echo = false;  // a sink: the client's abort leaves nothing unread, so it is a FIN
  auto acceptor = world.serve();
  ClientRec* client = nullptr;
  auto dialer = world.dialer(client);
  client->payload = payload(100000, 7);
  dialer->connect("127.0.0.1", 4433);
  REQUIRE(world.run_until(
      [&] { return !world.server.conns.empty() && world.server.conns[0].input.size() == 100000; }));
  world.run_for(5ms);  // the client has read the server's session tickets: nothing left unread
  REQUIRE(client->abort);
  client->abort(false);  // close() without close_notify
  REQUIRE(world.run_until([&] { return world.server.conns[0].closes == 1; }, 1s));
  const ServerConn& server = world.server.conns[0];
  CHECK(server.reason == reactor::TlsError::kTruncated);
  CHECK(server.eofs == 0);
  CHECK(server.input == client->payload);
  CHECK(client->closes == 1);
  CHECK_FALSE(client->reason);  // abort() reports an empty reason
}

TEMPLATE_TEST_CASE("a FIN in the middle of a record closes with kTruncated",
                   "[tls][simulation][close]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  World<TestType> world;
  auto acceptor = world.serve();
  auto client = remote_client(world);
  const std::string records = client->seal(payload(5000, 3));
  REQUIRE(records.size() > 5000);
  client->queue(std::string_view(records).substr(0, 2000));
  const Clock::time_point sent_at = now();
  REQUIRE(pump_until(world, *client, [&] { return client->unsent() == 0; }));
  world.run_for(5ms);
  CHECK(world.kernel.process_io_at(client->peer()) >= sent_at);  // the server read the prefix
  REQUIRE(world.server.conns[0].closes == 0);
  CHECK(world.server.conns[0].input.empty());
  world.kernel.peer_shutdown(client->peer());
  REQUIRE(world.run_until([&] { return world.server.conns[0].closes == 1; }, 1s));
  CHECK(world.server.conns[0].reason == reactor::TlsError::kTruncated);
  CHECK(world.server.conns[0].input.empty());
}

TEMPLATE_TEST_CASE("a reset in the middle of a record closes with an error",
                   "[tls][simulation][close]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  World<TestType> world;
  auto acceptor = world.serve();
  auto client = remote_client(world);
  // One whole record (echoed), then half of the next.
  client->queue(client->seal("hello"));
  REQUIRE(pump_until(world, *client, [&] { return client->input() == "hello"; }));
  const std::string records = client->seal(payload(5000, 4));
  client->queue(std::string_view(records).substr(0, 2500));
  REQUIRE(pump_until(world, *client, [&] { return client->unsent() == 0; }));
  world.run_for(5ms);
  REQUIRE(world.server.conns[0].closes == 0);
  world.kernel.peer_reset(client->peer());
  REQUIRE(world.run_until([&] { return world.server.conns[0].closes == 1; }, 1s));
  const ServerConn& server = world.server.conns[0];
  CAPTURE(server.reason.message(), server.reason.category().name());
  CHECK(server.reason);
  CHECK(server.reason != reactor::TlsError::kTruncated);
  CHECK(server.input == "hello");
}

TEMPLATE_TEST_CASE("a client's close sends close_notify and the server sees an orderly EOF",
                   "[tls][simulation][close]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  World<TestType> world;
  auto acceptor = world.serve();
  const std::size_t fds = world.kernel.open_fds();
  ClientRec* client = nullptr;
  auto dialer = world.dialer(client);
  client->payload = "ping";
  client->close_when_echoed = true;
  dialer->connect("127.0.0.1", 4433);
  REQUIRE(world.run_until([&] {
    return client->closes == 1 && !world.server.conns.empty() && world.server.conns[0].closes == 1;
  }));
  const ServerConn& server = world.server.conns[0];
  CHECK(server.eofs == 1);
  CHECK_FALSE(server.reason);
  CHECK(server.input == "ping");
  CHECK(client->input == "ping");
  CHECK_FALSE(client->reason);
  // Each saw the other's close_notify: no linger ran out.
  CHECK(client->closed_at == client->opened_at);
  CHECK(world.kernel.open_fds() == fds);
}

TEMPLATE_TEST_CASE("a remote client's close_notify then FIN is an orderly EOF for the server",
                   "[tls][simulation][close]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  World<TestType> world;
  auto acceptor = world.serve();
  auto client = remote_client(world);
  client->queue(client->seal("bye"));
  client->queue(client->close_notify());
  REQUIRE(pump_until(world, *client, [&] { return client->unsent() == 0; }));
  world.kernel.peer_shutdown(client->peer());
  REQUIRE(pump_until(world, *client, [&] { return world.server.conns[0].closes == 1; }));
  CHECK(world.server.conns[0].eofs == 1);
  CHECK_FALSE(world.server.conns[0].reason);
  CHECK(world.server.conns[0].input == "bye");
  REQUIRE(pump_until(world, *client, [&] { return client->got_eof(); }));
  CHECK(client->input() == "bye");
  CHECK(client->got_close_notify());  // the server's, before its FIN
}

// --- linger --------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE(
    "the server's close lingers exactly linger_timeout for a peer that never answers close_notify",
    "[tls][simulation][close][linger]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  World<TestType> world;
  reactor::ListenOptions options;
  options.connection.linger_timeout = 300ms;
  auto acceptor = world.serve(options);
  const std::size_t fds = world.kernel.open_fds();
  auto client = remote_client(world);
  client->queue(client->seal("data"));
  REQUIRE(pump_until(world, *client, [&] { return client->input() == "data"; }));
  world.run_for(7ms);  // the peer stops reading from here on

  const std::size_t waits_before = RecordedSyscalls::epoll_waits;
  const Clock::time_point closed_at = now();
  REQUIRE(world.server.conns[0].close);
  world.server.conns[0].close();
  REQUIRE(world.run_until([&] { return world.server.conns[0].closes == 1; }, 5s));
  CHECK(world.server.conns[0].closed_at == closed_at + 300ms);
  CHECK_FALSE(world.server.conns[0].reason);  // all of it reached the peer's receive queue
  CHECK(RecordedSyscalls::epoll_waits - waits_before <= 4);  // no spin while lingering
  CHECK(world.kernel.open_fds() == fds);
  // The peer finds the server's close_notify, then its FIN.
  client->pump();
  CHECK(client->got_close_notify());
  CHECK(client->got_eof());
}

// --- random actions ------------------------------------------------------------------------------

namespace {

// What one seed's world did, for the determinism check.
struct RandomRun {
  std::uint64_t shape = 0;
  std::size_t opens = 0;
  std::size_t handshake_failures = 0;
};

// Clients (connectors) arriving over 50 ms, each sending 1 to 5 messages of 1 B to 20 KiB at
// random moments, then ending in one of: close() once its echo is complete, close() at once,
// abort() (FIN without close_notify, or an RST when echoes were left unread), abort with RST, or
// nothing (the server ends it: it closes some connections after a random number of bytes); plus
// remote peers that never finish a handshake (silent, or sending garbage). Streams of 1 to 64 KiB.
// Invariants: each client's on_result once and, when connected, one on_open and one on_close;
// each server on_open one on_close; each failed handshake reported once; the bytes the server got
// a prefix of what its client sent, the client's echo a prefix of what the server got (all of it
// for a client that closed after its echo, when the server did not close first); the world
// drains to the fds it started with; no iteration of the loop idles at one instant more than a
// few times.
template <class Trigger>
RandomRun random_world(std::uint64_t seed) {
  Rng rng(seed);
  const std::size_t capacity = std::size_t{1024} << rng.below(7);
  World<Trigger> world(capacity, 200ms);
  world.server.close_after = [&rng] { return rng.chance(25) ? 1 + rng.below(30000) : kNone; };
  reactor::ListenOptions listen;
  listen.connection.linger_timeout = 100ms;
  auto acceptor = world.serve(listen);
  const std::size_t fds = world.kernel.open_fds();

  const std::size_t client_count = 3 + rng.below(6);
  std::vector<std::unique_ptr<typename World<Trigger>::Dialer>> dialers;
  std::vector<int> endings;
  reactor::ConnectionOptions connection;
  connection.linger_timeout = 100ms;
  for (std::size_t i = 0; i < client_count; ++i) {
    ClientRec* rec = nullptr;
    dialers.push_back(world.dialer(rec, seed * 100 + i + 1, connection));
    auto* dialer = dialers.back().get();
    const int ending = static_cast<int>(rng.below(5));
    endings.push_back(ending);
    rec->close_when_echoed = false;
    world.loop.schedule_after(milliseconds(rng.below(50)),
                              [dialer] { dialer->connect("127.0.0.1", 4433); });
    // The client's plan, from its open on (timers on the loop, so on the loop's thread).
    const std::size_t messages = 1 + rng.below(5);
    milliseconds at{0};
    for (std::size_t m = 0; m < messages; ++m) {
      at += milliseconds(rng.below(20));
      std::string message = payload(1 + rng.below(20000), seed * 1000 + i * 10 + m);
      world.loop.schedule_after(50ms + at, [rec, message = std::move(message)] {
        if (rec->send) rec->send(message);
      });
    }
    at += milliseconds(rng.below(30));
    world.loop.schedule_after(50ms + at, [rec, ending] {
      if (!rec->send) return;
      switch (ending) {
        case 0:
          rec->close_when_echoed = true;
          if (rec->input.size() == rec->sent.size()) rec->close();
          break;
        case 1:
          rec->close();
          break;
        case 2:
          rec->abort(false);
          break;
        case 3:
          rec->abort(true);
          break;
        default:
          break;
      }
    });
  }
  // Peers that never finish a handshake.
  const std::size_t strangers = rng.below(3);
  std::vector<sim::PeerId> stranger_peers;
  for (std::size_t i = 0; i < strangers; ++i) {
    const std::optional<sim::PeerId> peer = world.kernel.connect(4433);
    REQUIRE(peer.has_value());
    if (rng.chance(50)) world.kernel.peer_send(*peer, "GET / HTTP/1.1\r\n\r\n");
    stranger_peers.push_back(*peer);
  }

  const Clock::time_point t0 = now();
  const auto all_done = [&] {
    for (std::size_t i = 0; i < client_count; ++i) {
      const ClientRec& rec = world.clients[i];
      if (rec.results == 0 || (rec.connected && rec.closes == 0)) return false;
    }
    for (const ServerConn& conn : world.server.conns) {
      if (conn.closes == 0) return false;
    }
    return world.server.handshake_failures.size() == strangers;
  };
  // Clients whose plan ends with nothing stay open until the server ends them; those the server
  // does not end, the test closes after the plans ran out.
  world.run_for(200ms);
  for (std::size_t i = 0; i < client_count; ++i) {
    if (world.clients[i].close) world.clients[i].close();
  }
  const bool drained = world.run_until(all_done, 60s);
  CAPTURE(seed, capacity, client_count, strangers, ms(now() - t0));
  CHECK(drained);
  world.run_for(1s);  // nothing more happens

  RandomRun run;
  for (std::size_t i = 0; i < client_count; ++i) {
    const ClientRec& rec = world.clients[i];
    CAPTURE(i, endings[i], rec.reason.message());
    CHECK(rec.results == 1);
    CHECK(rec.connected);
    CHECK(rec.opens == (rec.connected ? 1 : 0));
    CHECK(rec.closes == rec.opens);
    const ServerConn* server = nullptr;
    for (const ServerConn& conn : world.server.conns) {
      if (conn.peer_port == rec.port) server = &conn;
    }
    if (rec.opens == 0) continue;
    // TLS 1.3: the client may finish its handshake before the server has read its Finished;
    // an RST from the client then can end the server's handshake, not an open connection.
    if (server == nullptr) continue;
    CHECK(rec.sent.substr(0, server->input.size()) == server->input);
    CHECK(server->input.substr(0, rec.input.size()) == rec.input);
    if (endings[i] == 0 && rec.closed_at > t0 && !rec.reason && server->close_after == kNone) {
      CHECK(rec.input == rec.sent);
    }
  }
  for (const ServerConn& conn : world.server.conns) {
    CHECK(conn.opens == 1);
    CHECK(conn.closes == 1);
  }
  // Every failed handshake once: the strangers', plus clients reset before the server finished
  // its side of the handshake.
  CHECK(world.server.handshake_failures.size() >= strangers);
  CHECK(world.server.handshake_failures.size() + world.server.conns.size() ==
        client_count + strangers);
  for (const auto& failure : world.server.handshake_failures) CHECK(failure.second);
  CHECK(world.kernel.open_fds() == fds);
  CHECK(world.idle_iterations <= 20);
  run.shape = RecordedSyscalls::hash;
  run.opens = world.server.conns.size();
  run.handshake_failures = world.server.handshake_failures.size();
  return run;
}

}  // namespace

TEMPLATE_TEST_CASE("random clients sending and closing at random keep every TLS invariant",
                   "[tls][simulation][random]", reactor::LevelTriggered, reactor::EdgeTriggered) {
  for (std::uint64_t seed = 1; seed <= 20; ++seed) {
    const RandomRun run = random_world<TestType>(seed);
    if (seed <= 2) {
      const RandomRun again = random_world<TestType>(seed);
      CHECK(again.shape == run.shape);
      CHECK(again.opens == run.opens);
    }
  }
}
