// Tests for include/reactor/tls.hpp over loopback TCP: TlsAcceptor and TlsConnector echo 4 MiB each
// way under TLS 1.3 and 1.2 in both trigger modes; SNI picks the certificate for the name asked
// (exact, wildcard, default); ALPN agrees or fails the handshake on both sides; a client rejects a
// server it cannot verify (unknown CA, another name, an expired certificate) with an X509 error and
// does not retry, accepts an IP address SAN, and kNone accepts a self-signed server; bad peers (a
// plain-text request, a silent or half ClientHello, half a record and a reset, a TCP close without
// close_notify, close_notify) end the way the header promises; close() lingers at most
// linger_timeout for a peer that never answers close_notify; reload() swaps certificates under an
// open connection; handshake failures are reported once over a mix of good and bad clients; many
// handshakes leak nothing; the kernel-TLS path (OpenSSL's socket BIO) only when SIGPIPE is ignored;
// a graceful shutdown serves out an established connection and ends a stuck handshake; a handler
// that closes or throws in on_open gets one on_close. Regression tests ([regression]) pin fixed
// bugs: a gathered flush and a full socket keep a blocked record whole and the bytes in order, a
// stale OpenSSL error queue fails no connection, the connector's on_open cancel/throw, deadline
// and IP checks, no read before on_open, abort's reason, a failed FIN's error. Every test gives
// back every fd it took.
//
// The test plays raw peers itself: plain sockets, and OpenSSL clients on memory BIOs (RawTls)
// whose records it moves to and from a non-blocking socket between iterations of the server's
// loop, so that it decides exactly which bytes reach the server and when.
#include <reactor/tls.hpp>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include <reactor.hpp>

#include "catch.hpp"
#include "fault_syscalls.hpp"
#include "loopback.hpp"
#include "tls_certs.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using reactor::ConnectOptions;
using reactor::Endpoint;
using reactor::TlsCertificate;
using reactor::TlsContext;
using reactor::TlsOptions;
using reactor::TlsRole;
using reactor::TlsVerify;
using reactor::TlsVersion;
using reactor_test::client_options;
using reactor_test::KeyType;
using reactor_test::Pem;
using reactor_test::server_options;
using reactor_test::TestCa;
using X509Ptr = reactor_test::detail::X509Ptr;
using LT = reactor::Reactor<reactor::LevelTriggered>;
using ET = reactor::Reactor<reactor::EdgeTriggered>;

// --- Certificates and contexts -----------------------------------------------------------------

X509Ptr parse_certificate(const std::string& pem) {
  const reactor_test::detail::BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  X509Ptr certificate(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!certificate) throw std::runtime_error("cannot parse a test certificate");
  return certificate;
}

// A certificate signed by its own key (no CA).
Pem self_signed(const std::string& cn) {
  namespace d = reactor_test::detail;
  const d::KeyPtr key = d::generate_key(KeyType::kEcdsaP256);
  const X509Ptr certificate = d::make_certificate(key.get(), cn, nullptr, false);
  d::sign(certificate.get(), key.get());
  return {d::certificate_pem(certificate.get()), d::key_pem(key.get())};
}

// A CA and a server certificate for localhost and 127.0.0.1, shared by the tests that need no
// other (ECDSA: cheap handshakes).
struct Pki {
  TestCa ca;
  Pem localhost = ca.issue({"localhost"}, {"127.0.0.1"});
};

const Pki& pki() {
  static const Pki shared;
  return shared;
}

// --- The server side
// ------------------------------------------------------------------------------

// What the server's connections saw, all of them together.
struct ServerLog {
  enum class OnOpen { kNothing, kClose, kThrow, kSendAndClose, kSendFileAndClose };
  OnOpen on_open = OnOpen::kNothing;
  bool echo = true;
  std::string greeting;  // kSendAndClose: sent by on_open; kSendFileAndClose: before the file
  // kSendFileAndClose: on_open sends the greeting, this range of this file, then the trailer.
  int file = -1;
  std::uint64_t file_offset = 0;
  std::uint64_t file_length = 0;
  std::string trailer;
  std::error_code send_file_result;

  int opened = 0;
  int closed = 0;
  int failed = 0;  // on_handshake_failed
  std::vector<std::error_code> close_reasons;
  std::vector<std::error_code> failure_reasons;
  std::string received;
  int version = 0;
  std::string alpn;
  std::string server_name;
  bool socket_bio = false;  // OpenSSL's own socket BIO (the kernel-TLS path) was in use
  bool ktls_send = false;
  bool ktls_receive = false;
  Clock::time_point opened_at{};
  Clock::time_point closed_at{};
  Clock::time_point failed_at{};
};

struct ServerHandler {
  ServerLog* log;

  void on_open(auto& connection) {
    ++log->opened;
    log->opened_at = Clock::now();
    const reactor::TlsTransport& tls = connection.transport();
    log->version = tls.version_number();
    log->alpn = std::string(tls.alpn());
    log->server_name = std::string(tls.server_name());
    log->socket_bio = BIO_method_type(SSL_get_wbio(tls.native_handle())) == BIO_TYPE_SOCKET;
    log->ktls_send = tls.ktls_send();
    log->ktls_receive = tls.ktls_receive();
    switch (log->on_open) {
      case ServerLog::OnOpen::kNothing:
        break;
      case ServerLog::OnOpen::kClose:
        connection.close();
        break;
      case ServerLog::OnOpen::kThrow:
        throw std::runtime_error("on_open throws");
      case ServerLog::OnOpen::kSendAndClose:
        connection.send(log->greeting);
        connection.close();
        break;
      case ServerLog::OnOpen::kSendFileAndClose:
        connection.send(log->greeting);
        log->send_file_result = connection.send_file(log->file, log->file_offset, log->file_length);
        connection.send(log->trailer);
        connection.close();
        break;
    }
  }
  void on_data(auto& connection, std::string_view bytes) {
    log->received.append(bytes);
    if (log->echo) connection.send(bytes);
  }
  void on_close(auto&, std::error_code reason) {
    ++log->closed;
    log->closed_at = Clock::now();
    log->close_reasons.push_back(reason);
  }
  void on_handshake_failed(auto&, std::error_code reason) {
    ++log->failed;
    log->failed_at = Clock::now();
    log->failure_reasons.push_back(reason);
  }
};

template <class Loop>
using Server = reactor::TlsAcceptor<ServerHandler, Loop>;

reactor::ListenOptions listen_options(std::chrono::milliseconds linger = 2000ms) {
  reactor::ListenOptions options;
  options.connection.linger_timeout = linger;
  return options;
}

Endpoint loopback() {
  return Endpoint::from_host_port("127.0.0.1", 0);
}

// --- The client side through TlsConnector
// ---------------------------------------------------------

struct ClientLog {
  std::string to_send;          // by on_open
  std::size_t close_after = 0;  // close once this many bytes came back (0: never)
  int opened = 0;
  int closed = 0;
  std::string received;
  std::error_code close_reason;
  int version = 0;
  std::string alpn;
  X509Ptr peer;  // the server's certificate
};

struct ClientHandler {
  ClientLog* log;

  void on_open(auto& connection) {
    ++log->opened;
    const reactor::TlsTransport& tls = connection.transport();
    log->version = tls.version_number();
    log->alpn = std::string(tls.alpn());
    if (X509* peer = tls.peer_certificate()) {
      X509_up_ref(peer);
      log->peer.reset(peer);
    }
    if (!log->to_send.empty()) connection.send(log->to_send);
  }
  void on_data(auto& connection, std::string_view bytes) {
    log->received.append(bytes);
    if (log->close_after != 0 && log->received.size() >= log->close_after) connection.close();
  }
  void on_close(auto&, std::error_code reason) {
    ++log->closed;
    log->close_reason = reason;
  }
};

struct Result {
  bool connected = false;
  std::error_code ec;
};

struct RecordResult {
  std::vector<Result>* results;
  template <class Conn>
  void operator()(Conn* connection, std::error_code ec, const Endpoint&) {
    results->push_back({connection != nullptr, ec});
  }
};

// One TLS client: its log, its on_result calls, its connector (to 127.0.0.1, with `peer_name` as
// SNI and for the certificate check).
template <class Loop>
struct Client {
  using Connector = reactor::TlsConnector<ClientHandler, RecordResult, Loop>;

  Client(Loop& loop, const TlsContext& context, std::string peer_name,
         const ConnectOptions& options = {})
      : connector(loop, reactor::TlsTransport(context, std::move(peer_name)), ClientHandler{&log},
                  RecordResult{&results}, options) {}

  void connect(std::uint16_t port) {
    connector.connect(Endpoint::from_host_port("127.0.0.1", port));
  }

  ClientLog log;
  std::vector<Result> results;
  Connector connector;
};

// Connect options under which a failure that were retried would show: several tries, short
// backoff. A verification or protocol failure must end the connect at the first.
ConnectOptions retrying() {
  ConnectOptions options;
  options.retry.tries = 5;
  options.retry.initial = 1ms;
  options.retry.max = 5ms;
  return options;
}

// --- Raw peers
// ---------------------------------------------------------------------------------------

// A blocking connect to 127.0.0.1:port (loopback completes it without the server accepting), then
// non-blocking.
reactor::UniqueFd raw_connect(std::uint16_t port) {
  reactor::UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(fd.get() >= 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0);
  REQUIRE(::fcntl(fd.get(), F_SETFL, ::fcntl(fd.get(), F_GETFL, 0) | O_NONBLOCK) == 0);
  return fd;
}

void send_all(int fd, std::string_view bytes) {
  REQUIRE(::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL) ==
          static_cast<ssize_t>(bytes.size()));
}

void reset(reactor::UniqueFd& fd) {
  const linger option{1, 0};
  REQUIRE(::setsockopt(fd.get(), SOL_SOCKET, SO_LINGER, &option, sizeof option) == 0);
  fd.reset();
}

// What a raw socket read until it stopped: bytes, then EOF or an error.
struct Drained {
  std::string bytes;
  bool eof = false;
  int error = 0;
  bool ended() const { return eof || error != 0; }
};

void read_some(int fd, Drained& out) {
  while (!out.ended()) {
    char buffer[16384];
    const ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n > 0) {
      out.bytes.append(buffer, static_cast<std::size_t>(n));
    } else if (n == 0) {
      out.eof = true;
    } else {
      if (errno != EAGAIN && errno != EINTR) out.error = errno;
      return;
    }
  }
}

// Runs `loop` in short steps (1 ms: the raw peers are stepped between them) until `done()`, at
// most `limit`.
template <class Loop, class Done>
bool drive(Loop& loop, Done done, std::chrono::milliseconds limit = 20s) {
  const auto deadline = Clock::now() + limit;
  while (!done()) {
    if (Clock::now() >= deadline) return false;
    loop.run_once(1ms);
  }
  return true;
}

// An OpenSSL client whose SSL reads and writes memory BIOs; pump() moves the records between them
// and a non-blocking socket. The test sees and controls every byte on the wire.
class RawTls {
 public:
  RawTls(const TlsContext& context, std::uint16_t port, const char* sni = nullptr)
      : fd_(raw_connect(port)) {
    std::error_code ec;
    ssl_ = context.new_ssl(ec);
    REQUIRE(ssl_ != nullptr);
    in_ = BIO_new(BIO_s_mem());
    out_ = BIO_new(BIO_s_mem());
    REQUIRE((in_ != nullptr && out_ != nullptr));
    SSL_set_bio(ssl_, in_, out_);  // the SSL owns both now
    if (sni != nullptr) REQUIRE(SSL_set_tlsext_host_name(ssl_, sni) == 1);
  }
  ~RawTls() { SSL_free(ssl_); }
  RawTls(const RawTls&) = delete;
  RawTls& operator=(const RawTls&) = delete;

  int fd() const { return fd_.get(); }
  reactor::UniqueFd& socket() { return fd_; }
  SSL* ssl() const { return ssl_; }

  // Records out (queued until the socket takes them), bytes in (until EAGAIN or EOF).
  void pump() {
    take_output();
    flush();
    while (fd_.get() >= 0 && !eof && error == 0) {
      char buffer[16384];
      const ssize_t n = ::read(fd_.get(), buffer, sizeof buffer);
      if (n > 0) {
        REQUIRE(BIO_write(in_, buffer, static_cast<int>(n)) == n);
      } else if (n == 0) {
        eof = true;
        BIO_set_mem_eof_return(in_, 0);  // SSL sees the EOF, not "retry"
      } else {
        if (errno != EAGAIN && errno != EINTR) error = errno;
        break;
      }
    }
  }

  // One handshake step; true once done. A failure fails the test.
  bool handshake_step() {
    const int result = SSL_do_handshake(ssl_);
    // Asked before pump(), whose BIO calls reset the retry flags SSL_get_error reads.
    const int error_kind = result == 1 ? SSL_ERROR_NONE : SSL_get_error(ssl_, result);
    pump();
    if (result == 1) return true;
    INFO("SSL_do_handshake: SSL_get_error " << error_kind);
    REQUIRE((error_kind == SSL_ERROR_WANT_READ || error_kind == SSL_ERROR_WANT_WRITE));
    return false;
  }

  // Encrypts `bytes` into records (queued for the socket).
  void write(std::string_view bytes) {
    std::size_t written = 0;
    REQUIRE(SSL_write_ex(ssl_, bytes.data(), bytes.size(), &written) == 1);
    REQUIRE(written == bytes.size());
    take_output();
  }

  // Decrypts what arrived; sets zero_return on the peer's close_notify.
  void read() {
    pump();
    for (;;) {
      char buffer[16384];
      std::size_t got = 0;
      const int result = SSL_read_ex(ssl_, buffer, sizeof buffer, &got);
      if (result == 1) {
        received.append(buffer, got);
        continue;
      }
      last_read_error = SSL_get_error(ssl_, result);
      if (last_read_error == SSL_ERROR_ZERO_RETURN) zero_return = true;
      ERR_clear_error();
      return;
    }
  }

  // The records the SSL wrote and the socket has not taken yet.
  std::string& outbox() { return outbox_; }
  bool flushed() const { return outbox_.empty(); }

  void flush() {
    while (!outbox_.empty() && fd_.get() >= 0) {
      const ssize_t n = ::send(fd_.get(), outbox_.data(), outbox_.size(), MSG_NOSIGNAL);
      if (n <= 0) {
        if (n < 0 && errno != EAGAIN && errno != EINTR) error = errno;
        return;
      }
      outbox_.erase(0, static_cast<std::size_t>(n));
    }
  }

  // Moves what the SSL wrote into the outbox.
  void take_output() {
    char buffer[16384];
    for (int n; (n = BIO_read(out_, buffer, sizeof buffer)) > 0;) {
      outbox_.append(buffer, static_cast<std::size_t>(n));
    }
  }

  std::string received;
  bool zero_return = false;
  int last_read_error = 0;
  bool eof = false;
  int error = 0;

 private:
  reactor::UniqueFd fd_;
  SSL* ssl_ = nullptr;
  BIO* in_ = nullptr;
  BIO* out_ = nullptr;
  std::string outbox_;
};

template <class Loop>
void handshake(Loop& loop, RawTls& client) {
  REQUIRE(drive(loop, [&] { return client.handshake_step(); }));
}

// Restores SIGPIPE's disposition on destruction.
class SigpipeIgnored {
 public:
  SigpipeIgnored() {
    struct sigaction ignore {};
    ignore.sa_handler = SIG_IGN;
    ::sigemptyset(&ignore.sa_mask);
    REQUIRE(::sigaction(SIGPIPE, &ignore, &saved_) == 0);
  }
  ~SigpipeIgnored() { ::sigaction(SIGPIPE, &saved_, nullptr); }
  SigpipeIgnored(const SigpipeIgnored&) = delete;
  SigpipeIgnored& operator=(const SigpipeIgnored&) = delete;

 private:
  struct sigaction saved_ {};
};

class AssumeKernelTls {
 public:
  AssumeKernelTls() : saved_(reactor::detail::tls_assume_kernel_tls.exchange(true)) {}
  ~AssumeKernelTls() { reactor::detail::tls_assume_kernel_tls.store(saved_); }
  AssumeKernelTls(const AssumeKernelTls&) = delete;
  AssumeKernelTls& operator=(const AssumeKernelTls&) = delete;

 private:
  bool saved_;
};

// Whether SIGPIPE is ignored now (the precondition of the kernel-TLS path).
bool sigpipe_ignored() {
  struct sigaction current {};
  return ::sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_IGN;
}

// Echoes `size` bytes through a TlsAcceptor and a TlsConnector on `loop`; checks both ends' bytes.
template <class Loop>
void echo_round_trip(Loop& loop, const TlsContext& server_context, const TlsContext& client_context,
                     std::size_t size, ServerLog& server_log, ClientLog& client_log) {
  Server<Loop> server(loop, loopback(), reactor::TlsTransport(server_context),
                      ServerHandler{&server_log});
  Client<Loop> client(loop, client_context, "localhost");
  const std::string payload = test::pattern(size, 7);
  client.log.to_send = payload;
  client.log.close_after = size;
  client.connect(server.local_endpoint().port());
  REQUIRE(drive(loop, [&] { return client.log.closed == 1 && server_log.closed == 1; }));
  REQUIRE(client.results.size() == 1);
  CHECK(client.results[0].connected);
  CHECK(!client.results[0].ec);
  CHECK(client.log.received.size() == size);
  CHECK(client.log.received == payload);
  CHECK(server_log.received == payload);
  CHECK(!client.log.close_reason);
  CHECK(server_log.close_reasons == std::vector<std::error_code>{std::error_code()});
  CHECK(server_log.failed == 0);
  client_log.version = client.log.version;
  client_log.alpn = client.log.alpn;
  client_log.opened = client.log.opened;
  client_log.closed = client.log.closed;
}

}  // namespace

// --- 1. Echo
// ----------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("4 MiB each way cross TLS 1.3 and TLS 1.2 byte for byte", "[tls][echo]", LT,
                   ET) {
  const std::size_t baseline = test::open_fd_count();
  {
    TlsOptions server = server_options(pki().localhost);
    TlsOptions client = client_options(pki().ca);
    const bool tls12 = GENERATE(false, true);  // TLS 1.2 forced on both sides
    const int expected = tls12 ? TLS1_2_VERSION : TLS1_3_VERSION;
    if (tls12) {
      server.min_version = server.max_version = TlsVersion::k1_2;
      client.min_version = client.max_version = TlsVersion::k1_2;
    }
    INFO("TLS 1." << (tls12 ? 2 : 3));
    const TlsContext server_context(TlsRole::kServer, server);
    const TlsContext client_context(TlsRole::kClient, client);
    ServerLog server_log;
    ClientLog client_log;
    TestType loop;
    echo_round_trip(loop, server_context, client_context, 4u << 20, server_log, client_log);
    CHECK(server_log.opened == 1);
    CHECK(client_log.opened == 1);
    CHECK(server_log.version == expected);
    CHECK(client_log.version == expected);
  }
  CHECK(test::open_fd_count() == baseline);
}

TEMPLATE_TEST_CASE("send_file over TLS copies the file through the transport in order",
                   "[tls][file]", LT, ET) {
  const std::string content = test::pattern(3 << 20, 21);
  char name[] = "/tmp/reactor_tls_file_XXXXXX";
  const int file = ::mkstemp(name);
  REQUIRE(file >= 0);
  ::unlink(name);
  REQUIRE(::write(file, content.data(), content.size()) == static_cast<ssize_t>(content.size()));
  const TlsContext server_context(TlsRole::kServer, server_options(pki().localhost));
  const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
  ServerLog server_log;
  server_log.on_open = ServerLog::OnOpen::kSendFileAndClose;
  server_log.greeting = "head";
  server_log.file = file;
  server_log.file_offset = 1000;
  server_log.file_length = content.size() - 2000;
  server_log.trailer = "tail";
  const std::string expected = "head" + content.substr(1000, content.size() - 2000) + "tail";
  TestType loop;
  Server<TestType> server(loop, loopback(), reactor::TlsTransport(server_context),
                          ServerHandler{&server_log});
  Client<TestType> client(loop, client_context, "localhost");
  client.log.close_after = expected.size();
  client.connect(server.local_endpoint().port());
  REQUIRE(drive(loop, [&] { return client.log.closed == 1 && server_log.closed == 1; }));
  ::close(file);
  CHECK(!server_log.send_file_result);
  CHECK(client.log.received.size() == expected.size());
  CHECK(client.log.received == expected);
  CHECK(server_log.close_reasons == std::vector<std::error_code>{std::error_code()});
}

// --- 2. SNI
// -------------------------------------------------------------------------------------------

TEST_CASE("SNI picks the exact name then the wildcard then the default certificate", "[tls][sni]") {
  const std::size_t baseline = test::open_fd_count();
  {
    const TestCa ca;
    const Pem fallback = ca.issue({"default.test"});
    const Pem alpha = ca.issue({"alpha.test"});
    const Pem beta = ca.issue({"*.beta.test"});
    TlsOptions options;
    options.certificates.push_back(TlsCertificate::from_pem(fallback.certificate, fallback.key));
    options.certificates.push_back(TlsCertificate::from_pem(alpha.certificate, alpha.key));
    options.certificates.push_back(TlsCertificate::from_pem(beta.certificate, beta.key));
    const TlsContext server_context(TlsRole::kServer, options);
    const TlsContext verifying(TlsRole::kClient, client_options(ca));
    TlsOptions trusting_options;
    trusting_options.verify = TlsVerify::kNone;  // other.test matches no certificate's name
    const TlsContext trusting(TlsRole::kClient, trusting_options);

    struct Case {
      const char* peer_name;
      const TlsContext* context;
      const Pem* expected;
    };
    const Case cases[] = {{"alpha.test", &verifying, &alpha},
                          {"x.beta.test", &verifying, &beta},
                          {"ALPHA.test", &verifying, &alpha},
                          {"other.test", &trusting, &fallback}};
    ServerLog logs[std::size(cases)];  // outlive the loop, whose destructor may call their hooks
    LT loop;
    for (std::size_t i = 0; i < std::size(cases); ++i) {
      const Case& c = cases[i];
      INFO("peer name " << c.peer_name);
      ServerLog& server_log = logs[i];
      server_log.echo = false;
      Server<LT> server(loop, loopback(), reactor::TlsTransport(server_context),
                        ServerHandler{&server_log});
      Client<LT> client(loop, *c.context, c.peer_name);
      client.log.close_after = 0;
      client.connect(server.local_endpoint().port());
      REQUIRE(drive(loop, [&] { return !client.results.empty() && server_log.opened == 1; }));
      REQUIRE(client.results[0].connected);
      REQUIRE(client.log.peer != nullptr);
      const X509Ptr expected = parse_certificate(c.expected->certificate);
      CHECK(X509_cmp(client.log.peer.get(), expected.get()) == 0);
      CHECK(server_log.server_name == c.peer_name);
      client.connector.disconnect();
      REQUIRE(drive(loop, [&] { return client.log.closed == 1 && server_log.closed == 1; }));
      CHECK(server_log.close_reasons == std::vector<std::error_code>{std::error_code()});
    }
  }
  CHECK(test::open_fd_count() == baseline);
}

// --- 3. ALPN
// ------------------------------------------------------------------------------------------

TEST_CASE("ALPN agrees on the protocol both offer and fails the handshake without one",
          "[tls][alpn]") {
  const std::size_t baseline = test::open_fd_count();
  {
    TlsOptions server = server_options(pki().localhost);
    server.alpn = {"h2", "http/1.1"};
    const TlsContext server_context(TlsRole::kServer, server);
    ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
    LT loop;
    Server<LT> listener(loop, loopback(), reactor::TlsTransport(server_context),
                        ServerHandler{&server_log});
    const std::uint16_t port = listener.local_endpoint().port();

    SECTION("an overlap is agreed on by both") {
      TlsOptions client = client_options(pki().ca);
      client.alpn = {"http/1.1"};
      const TlsContext client_context(TlsRole::kClient, client);
      Client<LT> c(loop, client_context, "localhost");
      c.log.to_send = "ping";
      c.log.close_after = 4;
      c.connect(port);
      REQUIRE(drive(loop, [&] { return c.log.closed == 1 && server_log.closed == 1; }));
      CHECK(c.log.alpn == "http/1.1");
      CHECK(server_log.alpn == "http/1.1");
      CHECK(c.log.received == "ping");
    }
    SECTION("no overlap fails on both sides") {
      TlsOptions client = client_options(pki().ca);
      client.alpn = {"spdy/3", "imap"};
      const TlsContext client_context(TlsRole::kClient, client);
      Client<LT> c(loop, client_context, "localhost", retrying());
      c.connect(port);
      REQUIRE(drive(loop, [&] { return !c.results.empty() && server_log.failed >= 1; }));
      REQUIRE(c.results.size() == 1);
      CHECK(!c.results[0].connected);
      INFO("client: " << c.results[0].ec.category().name() << " " << c.results[0].ec.message());
      CHECK(c.results[0].ec.category() == reactor::tls_category());
      CHECK(c.connector.state() == reactor::ConnectorState::kIdle);  // not retrying
      CHECK(server_log.failed == 1);
      CHECK(server_log.failure_reasons[0].category() == reactor::tls_category());
      CHECK(server_log.opened == 0);
      CHECK(server_log.closed == 0);
      CHECK(c.log.opened == 0);
      CHECK(c.log.closed == 0);
    }
  }
  CHECK(test::open_fd_count() == baseline);
}

// --- 4. Verification
// ------------------------------------------------------------------------------

namespace {

// Connects once (with retries allowed) to a server presenting `served`, as `peer_name`, with
// `client_context`; returns on_result's error and checks the server saw exactly one handshake.
std::error_code connect_once(const Pem& served, const TlsContext& client_context,
                             const std::string& peer_name, bool expect_success) {
  const TlsContext server_context(TlsRole::kServer, server_options(served));
  ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
  LT loop;
  server_log.echo = false;
  Server<LT> server(loop, loopback(), reactor::TlsTransport(server_context),
                    ServerHandler{&server_log});
  Client<LT> client(loop, client_context, peer_name, retrying());
  const auto start = Clock::now();
  client.connect(server.local_endpoint().port());
  REQUIRE(drive(
      loop, [&] { return !client.results.empty() && server_log.failed + server_log.opened >= 1; }));
  CHECK(Clock::now() - start < 5s);
  REQUIRE(client.results.size() == 1);
  CHECK(client.results[0].connected == expect_success);
  // One handshake at the server: the failure was not retried (the connector, idle, plans none).
  CHECK(server_log.failed + server_log.opened == 1);
  if (!expect_success) {
    CHECK(client.connector.state() == reactor::ConnectorState::kIdle);
    CHECK(server_log.failed == 1);
  } else {
    client.connector.disconnect();
    // Both ends closed before `client` goes: its log is the client connection's, and the loop's
    // destructor (after `client`'s) would report a still pending on_close into it.
    REQUIRE(drive(loop, [&] { return server_log.closed == 1 && client.log.closed == 1; }));
  }
  return client.results[0].ec;
}

}  // namespace

TEST_CASE("a client rejects a server it cannot verify with an X509 error and does not retry",
          "[tls][verify]") {
  const std::size_t baseline = test::open_fd_count();
  {
    const TestCa& ca = pki().ca;
    const TlsContext verifying(TlsRole::kClient, client_options(ca));

    SECTION("a certificate from another CA") {
      const TestCa other;
      const std::error_code ec =
          connect_once(other.issue({"localhost"}), verifying, "localhost", false);
      INFO(ec.category().name() << ": " << ec.message());
      CHECK(ec.category() == reactor::tls_verify_category());
      CHECK(ec.value() == X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY);
    }
    SECTION("a certificate for another name") {
      const std::error_code ec =
          connect_once(ca.issue({"elsewhere.test"}), verifying, "localhost", false);
      INFO(ec.category().name() << ": " << ec.message());
      CHECK(ec.category() == reactor::tls_verify_category());
      CHECK(ec.value() == X509_V_ERR_HOSTNAME_MISMATCH);
    }
    SECTION("an expired certificate") {
      const std::error_code ec = connect_once(
          ca.issue({"localhost"}, {}, KeyType::kEcdsaP256, true), verifying, "localhost", false);
      INFO(ec.category().name() << ": " << ec.message());
      CHECK(ec.category() == reactor::tls_verify_category());
      CHECK(ec.value() == X509_V_ERR_CERT_HAS_EXPIRED);
    }
    SECTION("an IP address peer name against a certificate without that IP") {
      const std::error_code ec =
          connect_once(ca.issue({"localhost"}), verifying, "127.0.0.1", false);
      INFO(ec.category().name() << ": " << ec.message());
      CHECK(ec.category() == reactor::tls_verify_category());
      CHECK(ec.value() == X509_V_ERR_IP_ADDRESS_MISMATCH);
    }
    SECTION("an IP address peer name against the certificate's IP address passes") {
      const std::error_code ec =
          connect_once(ca.issue({}, {"127.0.0.1"}), verifying, "127.0.0.1", true);
      CHECK(!ec);
    }
    SECTION("a kNone client accepts a self-signed server") {
      TlsOptions options;
      options.verify = TlsVerify::kNone;
      const TlsContext trusting(TlsRole::kClient, options);
      const std::error_code ec =
          connect_once(self_signed("localhost"), trusting, "localhost", true);
      CHECK(!ec);
    }
    SECTION("a verifying client rejects the same self-signed server") {
      const std::error_code ec =
          connect_once(self_signed("localhost"), verifying, "localhost", false);
      INFO(ec.category().name() << ": " << ec.message());
      CHECK(ec.category() == reactor::tls_verify_category());
      CHECK(ec.value() == X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT);
    }
  }
  CHECK(test::open_fd_count() == baseline);
}

TEST_CASE("connect by IP address checks the IP SAN and sends no SNI", "[tls][verify]") {
  const std::size_t baseline = test::open_fd_count();
  {
    const TlsContext server_context(TlsRole::kServer, server_options(pki().localhost));
    const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
    ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
    LT loop;
    Server<LT> server(loop, loopback(), reactor::TlsTransport(server_context),
                      ServerHandler{&server_log});
    std::vector<Result> results;
    ClientLog log;
    log.to_send = "by address";
    log.close_after = log.to_send.size();
    reactor::TlsConnector<ClientHandler, RecordResult, LT> connector(
        loop, reactor::TlsTransport(client_context), ClientHandler{&log}, RecordResult{&results});
    connector.connect("127.0.0.1", server.local_endpoint().port());  // the peer name from here
    REQUIRE(drive(loop, [&] { return log.closed == 1 && server_log.closed == 1; }));
    REQUIRE(results.size() == 1);
    CHECK(results[0].connected);
    CHECK(log.received == "by address");
    CHECK(server_log.server_name.empty());
  }
  CHECK(test::open_fd_count() == baseline);
}

// --- 5. Bad peers
// -----------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("a plain-text request instead of a ClientHello fails the handshake",
                   "[tls][bad-peer]", LT, ET) {
  const std::size_t baseline = test::open_fd_count();
  {
    const TlsContext server_context(TlsRole::kServer, server_options(pki().localhost));
    const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
    ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
    TestType loop;
    Server<TestType> server(loop, loopback(), reactor::TlsTransport(server_context),
                            ServerHandler{&server_log});
    const std::uint16_t port = server.local_endpoint().port();

    reactor::UniqueFd raw = raw_connect(port);
    send_all(raw.get(), "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    Drained answer;
    REQUIRE(drive(loop, [&] {
      read_some(raw.get(), answer);
      return server_log.failed == 1 && answer.ended();
    }));
    const std::error_code reason = server_log.failure_reasons.at(0);
    INFO(reason.category().name() << ": " << reason.message());
    CHECK(reason.category() == reactor::tls_category());
    CHECK(server_log.opened == 0);
    CHECK(server_log.closed == 0);
    CHECK(server_log.received.empty());
    CHECK((answer.eof || answer.error == ECONNRESET));
    CHECK(answer.bytes.find("HTTP") == std::string::npos);  // nothing echoed in the clear
    raw.reset();

    // The server goes on serving.
    Client<TestType> good(loop, client_context, "localhost");
    good.log.to_send = "after the garbage";
    good.log.close_after = good.log.to_send.size();
    good.connect(port);
    REQUIRE(drive(loop, [&] { return good.log.closed == 1 && server_log.closed == 1; }));
    CHECK(good.log.received == "after the garbage");
    CHECK(server_log.opened == 1);
    CHECK(server_log.failed == 1);
  }
  CHECK(test::open_fd_count() == baseline);
}

TEMPLATE_TEST_CASE("a client that stalls in the handshake is closed at the handshake timeout",
                   "[tls][bad-peer][timeout]", LT, ET) {
  const std::size_t baseline = test::open_fd_count();
  {
    TlsOptions options = server_options(pki().localhost);
    options.handshake_timeout = 200ms;
    const TlsContext server_context(TlsRole::kServer, options);
    const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
    ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
    TestType loop;
    Server<TestType> server(loop, loopback(), reactor::TlsTransport(server_context),
                            ServerHandler{&server_log});
    const std::uint16_t port = server.local_endpoint().port();

    std::unique_ptr<RawTls> half_hello;
    reactor::UniqueFd silent;
    int fd = -1;
    const auto start = Clock::now();
    const bool sends_half_hello = GENERATE(false, true);
    INFO((sends_half_hello ? "half a ClientHello" : "nothing sent"));
    if (!sends_half_hello) {
      silent = raw_connect(port);
      fd = silent.get();
    } else {
      half_hello = std::make_unique<RawTls>(client_context, port, "localhost");
      REQUIRE(SSL_do_handshake(half_hello->ssl()) != 1);
      half_hello->take_output();
      const std::string hello = half_hello->outbox();
      REQUIRE(hello.size() > 100);
      send_all(half_hello->fd(), std::string_view(hello).substr(0, hello.size() / 2));
      fd = half_hello->fd();
    }
    Drained answer;
    REQUIRE(drive(loop, [&] {
      read_some(fd, answer);
      return server_log.failed == 1 && answer.ended();
    }));
    const auto took = server_log.failed_at - start;
    INFO("closed after " << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
                         << " ms");
    CHECK(took >= 150ms);
    CHECK(took < 5s);
    CHECK(server_log.failure_reasons.at(0) == std::errc::timed_out);
    CHECK(server_log.opened == 0);
    CHECK(server_log.closed == 0);
    CHECK(answer.bytes.empty());  // a server that got no whole ClientHello says nothing
  }
  CHECK(test::open_fd_count() == baseline);
}

TEMPLATE_TEST_CASE("half a record then a reset closes the connection with an error",
                   "[tls][bad-peer]", LT, ET) {
  const std::size_t baseline = test::open_fd_count();
  {
    const TlsContext server_context(TlsRole::kServer, server_options(pki().localhost));
    const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
    ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
    TestType loop;
    server_log.echo = false;
    Server<TestType> server(loop, loopback(), reactor::TlsTransport(server_context),
                            ServerHandler{&server_log});
    const std::uint16_t port = server.local_endpoint().port();

    RawTls peer(client_context, port, "localhost");
    handshake(loop, peer);
    REQUIRE(drive(loop, [&] { return server_log.opened == 1; }));
    peer.write("whole record");
    REQUIRE(drive(loop, [&] {
      peer.pump();
      return server_log.received == "whole record";
    }));
    peer.write(test::pattern(1000, 3));
    std::string record = std::move(peer.outbox());
    REQUIRE(record.size() > 1000);
    send_all(peer.fd(), std::string_view(record).substr(0, record.size() / 2));
    reset(peer.socket());
    REQUIRE(drive(loop, [&] { return server_log.closed == 1; }));
    const std::error_code reason = server_log.close_reasons.at(0);
    INFO(reason.category().name() << ": " << reason.message());
    CHECK((reason == std::errc::connection_reset || reason == reactor::TlsError::kTruncated));
    CHECK(server_log.received == "whole record");  // nothing of the half record
    CHECK(server_log.failed == 0);

    // The server is unaffected.
    Client<TestType> good(loop, client_context, "localhost");
    server_log.echo = true;
    good.log.to_send = "still here";
    good.log.close_after = good.log.to_send.size();
    good.connect(port);
    REQUIRE(drive(loop, [&] { return good.log.closed == 1 && server_log.closed == 2; }));
    CHECK(good.log.received == "still here");
  }
  CHECK(test::open_fd_count() == baseline);
}

TEMPLATE_TEST_CASE("a TCP close without close_notify is a truncation after all the data",
                   "[tls][bad-peer][close]", LT, ET) {
  const std::size_t baseline = test::open_fd_count();
  {
    const TlsContext server_context(TlsRole::kServer, server_options(pki().localhost));
    const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
    ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
    TestType loop;
    server_log.echo = false;
    Server<TestType> server(loop, loopback(), reactor::TlsTransport(server_context),
                            ServerHandler{&server_log});
    RawTls peer(client_context, server.local_endpoint().port(), "localhost");
    handshake(loop, peer);
    const std::string data = test::pattern(300000, 11);
    for (std::size_t at = 0; at < data.size(); at += 16384) {
      peer.write(std::string_view(data).substr(at, 16384));
    }
    REQUIRE(drive(loop, [&] {
      peer.pump();
      return peer.flushed();
    }));
    SECTION("FIN without close_notify") {
      REQUIRE(::shutdown(peer.fd(), SHUT_WR) == 0);
      REQUIRE(drive(loop, [&] {
        peer.pump();
        return server_log.closed == 1;
      }));
      const std::error_code reason = server_log.close_reasons.at(0);
      INFO(reason.category().name() << ": " << reason.message());
      CHECK(reason == reactor::TlsError::kTruncated);
      CHECK(reason.category() == reactor::tls_error_category());
    }
    SECTION("close_notify first") {
      REQUIRE(SSL_shutdown(peer.ssl()) == 0);  // sent ours, theirs not yet received
      peer.take_output();
      REQUIRE(drive(loop, [&] {
        peer.read();
        return server_log.closed == 1 && peer.zero_return;
      }));
      CHECK(server_log.close_reasons.at(0) == std::error_code());
    }
    CHECK(server_log.opened == 1);
    CHECK(server_log.failed == 0);
    CHECK(server_log.received.size() == data.size());
    CHECK(server_log.received == data);
  }
  CHECK(test::open_fd_count() == baseline);
}

// --- 6. close_notify bound
// ------------------------------------------------------------------------

TEMPLATE_TEST_CASE("close lingers at most linger_timeout for a peer that never answers",
                   "[tls][close][timeout]", LT, ET) {
  const std::size_t baseline = test::open_fd_count();
  {
    const TlsContext server_context(TlsRole::kServer, server_options(pki().localhost));
    const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
    ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
    TestType loop;
    server_log.on_open = ServerLog::OnOpen::kSendAndClose;
    server_log.greeting = test::pattern(200000, 5);
    Server<TestType> server(loop, loopback(), reactor::TlsTransport(server_context),
                            ServerHandler{&server_log}, listen_options(300ms));
    RawTls peer(client_context, server.local_endpoint().port(), "localhost");
    handshake(loop, peer);
    // Reads everything, never sends close_notify, never closes.
    REQUIRE(drive(loop, [&] {
      peer.read();
      return server_log.closed == 1;
    }));
    const auto lingered = server_log.closed_at - server_log.opened_at;
    INFO("closed " << std::chrono::duration_cast<std::chrono::milliseconds>(lingered).count()
                   << " ms after on_open");
    CHECK(lingered >= 250ms);
    CHECK(lingered < 3s);
    CHECK(server_log.close_reasons.at(0) == std::error_code());  // everything was delivered
    peer.read();
    CHECK(peer.received == server_log.greeting);
    CHECK(peer.zero_return);
    CHECK(peer.last_read_error == SSL_ERROR_ZERO_RETURN);
  }
  CHECK(test::open_fd_count() == baseline);
}

// --- 7. Reload
// ----------------------------------------------------------------------------------------

TEST_CASE("reload swaps the certificate for new connections and keeps open ones echoing",
          "[tls][reload]") {
  const std::size_t baseline = test::open_fd_count();
  {
    const TestCa old_ca;
    const TestCa new_ca;
    const Pem old_pem = old_ca.issue({"localhost"});
    const Pem new_pem = new_ca.issue({"new.test"});
    TlsContext server_context(TlsRole::kServer, server_options(old_pem));
    const TlsContext old_client(TlsRole::kClient, client_options(old_ca));
    const TlsContext new_client(TlsRole::kClient, client_options(new_ca));
    ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
    LT loop;
    Server<LT> server(loop, loopback(), reactor::TlsTransport(server_context),
                      ServerHandler{&server_log});
    const std::uint16_t port = server.local_endpoint().port();

    Client<LT> open(loop, old_client, "localhost");
    open.log.to_send = "before";
    open.connect(port);
    REQUIRE(drive(loop, [&] { return open.log.received == "before"; }));
    CHECK(server_context.generation() == 1);
    REQUIRE(!server_context.reload(server_options(new_pem)));
    CHECK(server_context.generation() == 2);

    // The open connection keeps its session.
    REQUIRE(open.connector.connection() != nullptr);
    REQUIRE(open.connector.connection()->send(std::string_view("after")));
    REQUIRE(drive(loop, [&] { return open.log.received == "beforeafter"; }));

    // A new connection gets the new certificate: the new CA verifies it ...
    Client<LT> fresh(loop, new_client, "new.test");
    fresh.log.to_send = "fresh";
    fresh.log.close_after = 5;
    fresh.connect(port);
    REQUIRE(drive(loop, [&] { return fresh.log.closed == 1; }));
    REQUIRE(fresh.results.size() == 1);
    CHECK(fresh.results[0].connected);
    CHECK(fresh.log.received == "fresh");
    REQUIRE(fresh.log.peer != nullptr);
    CHECK(X509_cmp(fresh.log.peer.get(), parse_certificate(new_pem.certificate).get()) == 0);

    // ... and the old one no longer does.
    Client<LT> stale(loop, old_client, "localhost", retrying());
    stale.connect(port);
    REQUIRE(drive(loop, [&] { return !stale.results.empty(); }));
    REQUIRE(stale.results.size() == 1);
    CHECK(!stale.results[0].connected);
    CHECK(stale.results[0].ec.category() == reactor::tls_verify_category());
    CHECK(stale.results[0].ec.value() == X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY);

    // The old connection still echoes after all that.
    REQUIRE(open.connector.connection()->send(std::string_view("!")));
    REQUIRE(drive(loop, [&] { return open.log.received == "beforeafter!"; }));
    open.connector.disconnect();
    REQUIRE(drive(loop, [&] { return open.log.closed == 1 && server_log.closed == 2; }));
    CHECK(server_log.opened == 2);
  }
  CHECK(test::open_fd_count() == baseline);
}

// --- 8. Failures reported once ------------------------------------------------------------------

TEMPLATE_TEST_CASE("over 200 good and bad clients every handshake is reported exactly once",
                   "[tls][bad-peer][count]", LT, ET) {
  const std::size_t baseline = test::open_fd_count();
  {
    TlsOptions options = server_options(pki().localhost);
    options.handshake_timeout = 5s;
    const TlsContext server_context(TlsRole::kServer, options);
    const TlsContext good_context(TlsRole::kClient, client_options(pki().ca));
    const TestCa stranger;
    const TlsContext wrong_ca(TlsRole::kClient, client_options(stranger));
    ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
    TestType loop;
    Server<TestType> server(loop, loopback(), reactor::TlsTransport(server_context),
                            ServerHandler{&server_log});
    const std::uint16_t port = server.local_endpoint().port();

    // Kinds, by i % 5: 0, 1 good clients (echo, close); 2 plain text; 3 connect and close at
    // once; 4 a client that rejects the server's certificate.
    constexpr int kClients = 200;
    constexpr int kBatch = 50;
    int good = 0;
    int bad = 0;
    int good_echoed = 0;
    int rejected = 0;
    for (int first = 0; first < kClients; first += kBatch) {
      std::vector<std::unique_ptr<Client<TestType>>> clients;
      std::vector<reactor::UniqueFd> raws;
      int expected_failed = server_log.failed;
      for (int i = first; i < first + kBatch; ++i) {
        switch (i % 5) {
          case 0:
          case 1: {
            auto& c = clients.emplace_back(
                std::make_unique<Client<TestType>>(loop, good_context, "localhost"));
            c->log.to_send = "client " + std::to_string(i);
            c->log.close_after = c->log.to_send.size();
            c->connect(port);
            ++good;
            break;
          }
          case 2:
            raws.push_back(raw_connect(port));
            send_all(raws.back().get(), "GET / HTTP/1.0\r\n\r\n");
            ++bad;
            ++expected_failed;
            break;
          case 3:
            raw_connect(port).reset();
            ++bad;
            ++expected_failed;
            break;
          default: {
            auto& c = clients.emplace_back(
                std::make_unique<Client<TestType>>(loop, wrong_ca, "localhost"));
            c->connect(port);
            ++bad;
            ++expected_failed;
            break;
          }
        }
      }
      const auto clients_done = [&] {
        for (const auto& c : clients) {
          if (c->results.empty() || (c->results[0].connected && c->log.closed == 0)) return false;
        }
        return true;
      };
      REQUIRE(drive(loop, [&] {
        return clients_done() && server_log.failed == expected_failed &&
               server_log.closed == server_log.opened;
      }));
      for (const auto& c : clients) {
        REQUIRE(c->results.size() == 1);
        if (c->results[0].connected) {
          CHECK(c->log.received == c->log.to_send);
          CHECK(c->log.closed == 1);
          ++good_echoed;
        } else {
          CHECK(c->results[0].ec.category() == reactor::tls_verify_category());
          ++rejected;
        }
      }
    }
    CHECK(good == 80);
    CHECK(bad == 120);
    CHECK(good_echoed == good);
    CHECK(rejected == 40);
    CHECK(server_log.opened == good);
    CHECK(server_log.closed == good);
    CHECK(server_log.failed == bad);
    CHECK(server_log.failure_reasons.size() == static_cast<std::size_t>(bad));
    for (const std::error_code& reason : server_log.close_reasons) CHECK(!reason);
    CHECK(loop.connection_count() == 0);
  }
  CHECK(test::open_fd_count() == baseline);
}

// --- 9. Many handshakes -------------------------------------------------------------------------

// 50 clients at a time, each connecting 40 times in a row: 2000 handshakes (ECDSA P-256), each
// echoing a message and closing. About 4 s per trigger mode in a Debug+ASan build on 2 cores.
TEMPLATE_TEST_CASE("2000 handshakes with echo and close leak no fd", "[tls][stress]", LT, ET) {
  const std::size_t baseline = test::open_fd_count();
  {
    constexpr int kSlots = 50;
    constexpr int kRounds = 40;
    const TlsContext server_context(TlsRole::kServer, server_options(pki().localhost));
    const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
    ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
    TestType loop;
    Server<TestType> server(loop, loopback(), reactor::TlsTransport(server_context),
                            ServerHandler{&server_log});
    const std::uint16_t port = server.local_endpoint().port();
    std::vector<std::unique_ptr<Client<TestType>>> slots;
    std::vector<int> rounds(kSlots, 0);
    int echoed = 0;
    int failures = 0;
    for (int i = 0; i < kSlots; ++i) {
      slots.push_back(std::make_unique<Client<TestType>>(loop, client_context, "localhost"));
      slots.back()->log.to_send = "slot " + std::to_string(i);
      slots.back()->log.close_after = slots.back()->log.to_send.size();
      slots.back()->connect(port);
    }
    const auto start = Clock::now();
    const bool done = drive(
        loop,
        [&] {
          bool all = true;
          for (int i = 0; i < kSlots; ++i) {
            if (rounds[static_cast<std::size_t>(i)] == kRounds) continue;
            Client<TestType>& c = *slots[static_cast<std::size_t>(i)];
            const bool finished =
                !c.results.empty() && (!c.results[0].connected || c.log.closed == 1);
            if (finished) {
              if (c.results[0].connected && c.log.received == c.log.to_send) {
                ++echoed;
              } else {
                ++failures;
              }
              if (++rounds[static_cast<std::size_t>(i)] < kRounds) {
                c.results.clear();
                c.log.received.clear();
                c.log.closed = 0;
                c.log.peer.reset();
                c.connect(port);
              }
            }
            all = all && rounds[static_cast<std::size_t>(i)] == kRounds;
          }
          return all && server_log.closed == kSlots * kRounds;
        },
        60s);
    if (!done) {  // say where it stuck
      std::string stuck;
      for (int i = 0; i < kSlots; ++i) {
        const Client<TestType>& c = *slots[static_cast<std::size_t>(i)];
        if (rounds[static_cast<std::size_t>(i)] == kRounds) continue;
        stuck += "slot " + std::to_string(i) + " round " +
                 std::to_string(rounds[static_cast<std::size_t>(i)]) + ": connector state " +
                 std::to_string(static_cast<int>(c.connector.state())) + ", results " +
                 std::to_string(c.results.size()) + ", opened " + std::to_string(c.log.opened) +
                 ", received " + std::to_string(c.log.received.size()) + "/" +
                 std::to_string(c.log.to_send.size()) + "\n";
      }
      INFO("server opened " << server_log.opened << " closed " << server_log.closed << " failed "
                            << server_log.failed << " connections " << loop.connection_count()
                            << "\n"
                            << stuck);
      REQUIRE(done);
    }
    INFO("took "
         << std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count()
         << " ms");
    CHECK(echoed == kSlots * kRounds);
    CHECK(failures == 0);
    CHECK(server_log.opened == kSlots * kRounds);
    CHECK(server_log.closed == kSlots * kRounds);
    CHECK(server_log.failed == 0);
    CHECK(loop.connection_count() == 0);
  }
  CHECK(test::open_fd_count() == baseline);
}

// --- 10. Kernel TLS
// -------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("kernel TLS is used only where SIGPIPE is ignored and echo works either way",
                   "[tls][ktls]", LT, ET) {
  const std::size_t baseline = test::open_fd_count();
  {
    const std::error_code support = reactor::TlsTransport::kernel_tls_support();
    INFO("kernel_tls_support(): " << (support ? support.message() : std::string("available")));
    const TlsContext server_context(TlsRole::kServer, server_options(pki().localhost));
    const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
    REQUIRE(server_context.ktls());
    const std::size_t size = 256 * 1024;

    if (support) {
      CHECK(support.category() == std::system_category());
      CHECK(support.value() != 0);
      CHECK(support.value() != ENOTCONN);  // ENOTCONN means the module is there
    }
    SECTION("SIGPIPE at its default: the record layer stays ours") {
      REQUIRE(!sigpipe_ignored());
      const AssumeKernelTls assume;  // even when the kernel is taken to have the ULP
      ServerLog server_log;          // outlives the loop, whose destructor may call its hooks
      TestType loop;
      ClientLog client_log;
      echo_round_trip(loop, server_context, client_context, size, server_log, client_log);
      CHECK(!server_log.socket_bio);
      CHECK(!server_log.ktls_send);
      CHECK(!server_log.ktls_receive);
    }
    SECTION("SIGPIPE ignored and the ULP assumed: OpenSSL's socket BIO, user-space fallback") {
      const SigpipeIgnored ignored;
      const AssumeKernelTls assume;
      ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
      TestType loop;
      ClientLog client_log;
      echo_round_trip(loop, server_context, client_context, size, server_log, client_log);
      CHECK(server_log.socket_bio);
      if (support) {
        CHECK(!server_log.ktls_send);
        CHECK(!server_log.ktls_receive);
      }
    }
    if (!support) {
      SECTION("SIGPIPE ignored on a kernel with the tls ULP: the kernel sends") {
        const SigpipeIgnored ignored;
        ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
        TestType loop;
        ClientLog client_log;
        echo_round_trip(loop, server_context, client_context, size, server_log, client_log);
        CHECK(server_log.socket_bio);
        CHECK(server_log.ktls_send);
      }
    }
    CHECK(!reactor::detail::tls_assume_kernel_tls.load());
    CHECK(!sigpipe_ignored());
  }
  CHECK(test::open_fd_count() == baseline);
}

// --- 11. Graceful shutdown
// ------------------------------------------------------------------------

TEMPLATE_TEST_CASE("a graceful shutdown serves out a TLS connection and ends a stuck handshake",
                   "[tls][shutdown]", LT, ET) {
  const std::size_t baseline = test::open_fd_count();
  {
    TlsOptions options = server_options(pki().localhost);
    options.handshake_timeout = 400ms;
    const TlsContext server_context(TlsRole::kServer, options);
    const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
    ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
    TestType loop;
    Server<TestType> server(loop, loopback(), reactor::TlsTransport(server_context),
                            ServerHandler{&server_log}, listen_options(300ms));
    const std::uint16_t port = server.local_endpoint().port();

    RawTls established(client_context, port, "localhost");
    handshake(loop, established);
    REQUIRE(drive(loop, [&] { return server_log.opened == 1; }));
    reactor::UniqueFd stuck = raw_connect(port);
    REQUIRE(drive(loop, [&] { return loop.connection_count() == 2; }));
    established.write("last words");
    established.flush();
    REQUIRE(established.flushed());

    const auto start = Clock::now();
    const reactor::ShutdownReport report = loop.shutdown(3s, 50ms);
    const auto took = Clock::now() - start;
    INFO("shutdown took " << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
                          << " ms");
    CHECK(!report.error);
    CHECK(took < 3s + 1s);
    CHECK(report.flushed == 1);
    CHECK(report.failed == 1);
    CHECK(report.aborted == 0);
    CHECK(loop.connection_count() == 0);
    CHECK(server_log.received == "last words");
    CHECK(server_log.closed == 1);
    CHECK(server_log.close_reasons.at(0) == std::error_code());
    CHECK(server_log.failed == 1);
    CHECK(server_log.failure_reasons.at(0) == std::errc::timed_out);

    // The established client got its echo, then the server's close_notify.
    established.read();
    CHECK(established.received == "last words");
    CHECK(established.zero_return);
    Drained answer;
    read_some(stuck.get(), answer);
    CHECK(answer.ended());
    CHECK(answer.bytes.empty());
  }
  CHECK(test::open_fd_count() == baseline);
}

// --- 12. on_open closes or throws
// -------------------------------------------------------------------

TEMPLATE_TEST_CASE("a handler that closes or throws in on_open gets exactly one on_close",
                   "[tls][lifecycle]", LT, ET) {
  const std::size_t baseline = test::open_fd_count();
  {
    const TlsContext server_context(TlsRole::kServer, server_options(pki().localhost));
    const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
    ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
    TestType loop;
    const bool throws = GENERATE(false, true);
    INFO((throws ? "on_open throws" : "on_open closes"));
    server_log.on_open = throws ? ServerLog::OnOpen::kThrow : ServerLog::OnOpen::kClose;
    const std::error_code expected =
        throws ? make_error_code(reactor::Error::kHandlerException) : std::error_code();
    Server<TestType> server(loop, loopback(), reactor::TlsTransport(server_context),
                            ServerHandler{&server_log});
    Client<TestType> client(loop, client_context, "localhost");
    client.connect(server.local_endpoint().port());
    REQUIRE(drive(loop, [&] { return server_log.closed == 1 && client.log.closed == 1; }));
    CHECK(server_log.opened == 1);
    CHECK(server_log.failed == 0);
    CHECK(server_log.close_reasons == std::vector<std::error_code>{expected});
    REQUIRE(client.results.size() == 1);
    CHECK(client.results[0].connected);
    CHECK(client.log.opened == 1);
    if (!expected) CHECK(!client.log.close_reason);  // close_notify: orderly on the client too
    CHECK(loop.connection_count() == 0);
  }
  CHECK(test::open_fd_count() == baseline);
}

// --- 13. Regressions
// ------------------------------------------------------------------------------

namespace {

using FaultLT = reactor::Reactor<reactor::LevelTriggered, test::FaultSyscalls>;
using FaultET = reactor::Reactor<reactor::EdgeTriggered, test::FaultSyscalls>;

// Where two byte strings first differ (npos: nowhere), so that a failure names an offset instead
// of printing megabytes.
std::size_t first_difference(std::string_view got, std::string_view expected) {
  const std::size_t common = std::min(got.size(), expected.size());
  for (std::size_t i = 0; i < common; ++i) {
    if (got[i] != expected[i]) return i;
  }
  return got.size() == expected.size() ? std::string_view::npos : common;
}

// Runs `loop` for `period` whatever happens: to see that nothing more does.
template <class Loop>
void settle(Loop& loop, std::chrono::milliseconds period = 100ms) {
  const auto until = Clock::now() + period;
  while (Clock::now() < until) loop.run_once(1ms);
}

// Reads what arrived; once the server's close_notify is in, answers with a FIN, so that the
// server's close() need not linger.
void read_and_answer_close(RawTls& peer) {
  peer.read();
  if (peer.zero_return) ::shutdown(peer.fd(), SHUT_WR);
}

// A loopback TCP listener that never speaks: the kernel completes connects into its backlog, and
// accept() takes one (non-blocking; an invalid fd when none is there).
class PlainListener {
 public:
  PlainListener() : fd_(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)) {
    REQUIRE(fd_.get() >= 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd_.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0);
    REQUIRE(::listen(fd_.get(), 8) == 0);
    socklen_t size = sizeof address;
    REQUIRE(::getsockname(fd_.get(), reinterpret_cast<sockaddr*>(&address), &size) == 0);
    port_ = ntohs(address.sin_port);
  }
  std::uint16_t port() const { return port_; }
  reactor::UniqueFd accept() {
    return reactor::UniqueFd(::accept4(fd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
  }

 private:
  reactor::UniqueFd fd_;
  std::uint16_t port_ = 0;
};

// The server connection's fd, and how many sends the script has seen on it since on_open (-1:
// not armed yet: the handshake's own sends pass).
struct FaultTarget {
  int fd = -1;
  int sends = -1;
};

// A server handler for the fault tests: on_open arms `target`, then runs `action`.
struct ArmedHandler {
  ServerLog* log;
  FaultTarget* target;
  std::function<void(reactor::TlsConnection<ArmedHandler, FaultLT>&)> action;

  void on_open(reactor::TlsConnection<ArmedHandler, FaultLT>& connection) {
    ++log->opened;
    target->fd = connection.native_handle();
    target->sends = 0;
    if (action) action(connection);
  }
  void on_data(auto&, std::string_view bytes) { log->received.append(bytes); }
  void on_close(auto&, std::error_code reason) {
    ++log->closed;
    log->close_reasons.push_back(reason);
  }
  void on_handshake_failed(auto&, std::error_code reason) {
    ++log->failed;
    log->failure_reasons.push_back(reason);
  }
};

// on_open sends 16 KiB at a time (one full TLS record each) until a send finds the socket full and
// is queued, then closes. `log->greeting` gets everything it sent.
struct FillHandler {
  ServerLog* log;

  void on_open(auto& connection) {
    ++log->opened;
    constexpr std::size_t kRecord = 16384;
    static const std::string source = test::pattern(61 * kRecord, 17);
    for (std::size_t i = 0; connection.pending_output_bytes() == 0 && i < 4096; ++i) {
      const std::string_view record = std::string_view(source).substr((i % 61) * kRecord, kRecord);
      if (!connection.send(record)) break;
      log->greeting.append(record);
    }
    connection.close();
  }
  void on_data(auto&, std::string_view) {}
  void on_close(auto&, std::error_code reason) {
    ++log->closed;
    log->close_reasons.push_back(reason);
  }
  void on_handshake_failed(auto&, std::error_code reason) {
    ++log->failed;
    log->failure_reasons.push_back(reason);
  }
};

// Echoes; a message starting with "dirty" then leaves an error on the thread's OpenSSL error
// queue, as user code that parses an untrusted certificate and does not clear the queue would.
struct DirtyHandler {
  ServerLog* log;

  void on_open(auto&) { ++log->opened; }
  void on_data(auto& connection, std::string_view bytes) {
    log->received.append(bytes);
    connection.send(bytes);
    if (bytes.starts_with("dirty")) {
      static constexpr char kGarbage[] = "not a certificate";
      BIO* bio = BIO_new_mem_buf(kGarbage, -1);
      X509* certificate = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
      X509_free(certificate);
      BIO_free(bio);
    }
  }
  void on_close(auto&, std::error_code reason) {
    ++log->closed;
    log->close_reasons.push_back(reason);
  }
  void on_handshake_failed(auto&, std::error_code reason) {
    ++log->failed;
    log->failure_reasons.push_back(reason);
  }
};

// A client handler whose on_open runs the test's `action` (cancel, disconnect, throw).
struct PlannedLog {
  std::function<void()> action;
  int opened = 0;
  int closed = 0;
  std::error_code close_reason;
};

struct PlannedHandler {
  PlannedLog* log;

  void on_open(auto&) {
    ++log->opened;
    if (log->action) log->action();
  }
  void on_data(auto&, std::string_view) {}
  void on_close(auto&, std::error_code reason) {
    ++log->closed;
    log->close_reason = reason;
  }
};

// What a hand-opened server connection saw, in order.
struct OrderLog {
  int opened = 0;
  int closed = 0;
  int data_before_open = 0;  // on_data calls before on_open
  std::string received;
  std::vector<std::error_code> failures;
};

struct OrderHandler {
  OrderLog* log;

  void on_open(auto&) { ++log->opened; }
  void on_data(auto&, std::string_view bytes) {
    if (log->opened == 0) ++log->data_before_open;
    log->received.append(bytes);
  }
  void on_close(auto&, std::error_code) { ++log->closed; }
  void on_handshake_failed(auto&, std::error_code reason) { log->failures.push_back(reason); }
};

}  // namespace

TEST_CASE(
    "a gathered flush stops at the buffer whose record blocked so the peer gets every byte "
    "in order",
    "[tls][regression]") {
  const std::size_t baseline = test::open_fd_count();
  {
    constexpr std::size_t kChunk = reactor::ChunkPool::kChunkCapacity;
    const TlsContext server_context(TlsRole::kServer, server_options(pki().localhost));
    const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
    FaultTarget target;
    test::FaultScript script;
    // on_open's send finds the socket "full": all 8 buffers are queued. The gathered flush then
    // writes the first buffer's record, and the second's blocks (OpenSSL keeps it pending).
    script.choose([&target](test::Call call, int fd) {
      if (call != test::Call::kSend || fd != target.fd || target.sends < 0) return test::pass();
      const int k = target.sends++;
      return k == 0 || k == 2 ? test::fail(EAGAIN) : test::pass();
    });
    ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
    server_log.greeting = test::pattern(8 * kChunk, 13);
    FaultLT loop;
    reactor::TlsAcceptor<ArmedHandler, FaultLT> server(
        loop, loopback(), reactor::TlsTransport(server_context),
        ArmedHandler{&server_log, &target, [&server_log](auto& connection) {
                       connection.send(server_log.greeting);
                       connection.close();
                     }});
    RawTls peer(client_context, server.local_endpoint().port(), "localhost");
    handshake(loop, peer);
    const bool ended = drive(
        loop,
        [&] {
          read_and_answer_close(peer);
          return server_log.closed == 1 && (peer.zero_return || peer.eof || peer.error != 0);
        },
        5s);
    CHECK(ended);
    CHECK(target.sends >= 3);  // both faults were injected
    INFO("received " << peer.received.size() << " of " << server_log.greeting.size() << " bytes");
    CHECK(first_difference(peer.received, server_log.greeting) == std::string_view::npos);
    CHECK(peer.zero_return);
    CHECK(server_log.close_reasons == std::vector<std::error_code>{std::error_code()});
  }
  CHECK(test::open_fd_count() == baseline);
}

TEST_CASE("a 16 KiB send that finds the socket full is flushed later without SSL_R_BAD_LENGTH",
          "[tls][regression]") {
  const std::size_t baseline = test::open_fd_count();
  {
    const TlsContext server_context(TlsRole::kServer, server_options(pki().localhost));
    const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
    ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
    LT loop;
    reactor::TlsAcceptor<FillHandler, LT> server(loop, loopback(),
                                                 reactor::TlsTransport(server_context),
                                                 FillHandler{&server_log}, listen_options(5000ms));
    RawTls peer(client_context, server.local_endpoint().port(), "localhost");
    handshake(loop, peer);
    // The peer reads nothing until on_open has filled the socket and queued the rest.
    REQUIRE(drive(loop, [&] { return server_log.opened == 1; }));
    REQUIRE(server_log.closed == 0);
    REQUIRE(server_log.greeting.size() < 4096u * 16384u);  // the socket did fill up
    const bool ended = drive(loop, [&] {
      read_and_answer_close(peer);
      return server_log.closed == 1 && (peer.zero_return || peer.eof || peer.error != 0);
    });
    CHECK(ended);
    REQUIRE(server_log.close_reasons.size() == 1);
    const std::error_code reason = server_log.close_reasons[0];
    INFO("server on_close: " << reason.category().name() << ": " << reason.message());
    CHECK(!reason);
    INFO("received " << peer.received.size() << " of " << server_log.greeting.size() << " bytes");
    CHECK(first_difference(peer.received, server_log.greeting) == std::string_view::npos);
    CHECK(peer.zero_return);
    CHECK(server_log.failed == 0);
  }
  CHECK(test::open_fd_count() == baseline);
}

TEST_CASE("an error left on the thread's OpenSSL error queue fails no connection",
          "[tls][regression]") {
  const std::size_t baseline = test::open_fd_count();
  {
    const TlsContext server_context(TlsRole::kServer, server_options(pki().localhost));
    const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
    ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
    ET loop;
    reactor::TlsAcceptor<DirtyHandler, ET> server(
        loop, loopback(), reactor::TlsTransport(server_context), DirtyHandler{&server_log});
    const std::uint16_t port = server.local_endpoint().port();
    RawTls dirty(client_context, port, "localhost");
    RawTls clean(client_context, port, "localhost");
    handshake(loop, dirty);
    handshake(loop, clean);
    REQUIRE(drive(loop, [&] { return server_log.opened == 2; }));
    std::string dirty_sent;
    std::string clean_sent;
    for (int round = 0; round < 3; ++round) {
      INFO("round " << round);
      const std::string d = "dirty " + std::to_string(round);
      const std::string c = "clean " + std::to_string(round);
      dirty.write(d);
      dirty_sent += d;
      REQUIRE(drive(
          loop,
          [&] {
            dirty.read();
            return dirty.received == dirty_sent || dirty.eof || dirty.error != 0;
          },
          5s));
      INFO("server on_close: " << (server_log.close_reasons.empty()
                                       ? std::string("none")
                                       : server_log.close_reasons[0].message()));
      REQUIRE(server_log.closed == 0);
      // Other code on the loop's thread leaves an error too, between two iterations.
      ERR_raise(ERR_LIB_USER, ERR_R_INTERNAL_ERROR);
      loop.run_once(0ms);
      clean.write(c);
      clean_sent += c;
      REQUIRE(drive(
          loop,
          [&] {
            clean.read();
            return clean.received == clean_sent || clean.eof || clean.error != 0;
          },
          5s));
      REQUIRE(server_log.closed == 0);
      CHECK(dirty.received == dirty_sent);
      CHECK(clean.received == clean_sent);
    }
    INFO("server closed " << server_log.closed << " connections");
    CHECK(server_log.closed == 0);
    REQUIRE(SSL_shutdown(dirty.ssl()) == 0);
    REQUIRE(SSL_shutdown(clean.ssl()) == 0);
    dirty.take_output();
    clean.take_output();
    REQUIRE(drive(loop, [&] {
      dirty.read();
      clean.read();
      return server_log.closed == 2;
    }));
    CHECK(server_log.close_reasons ==
          std::vector<std::error_code>{std::error_code(), std::error_code()});
    CHECK(server_log.received.size() == dirty_sent.size() + clean_sent.size());
    ERR_clear_error();
  }
  CHECK(test::open_fd_count() == baseline);
}

TEST_CASE(
    "a TlsConnector reports nothing after on_open cancels or disconnects and reports once "
    "when on_open throws",
    "[tls][connector][regression]") {
  const std::size_t baseline = test::open_fd_count();
  {
    const TlsContext server_context(TlsRole::kServer, server_options(pki().localhost));
    const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
    ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
    server_log.echo = false;
    PlannedLog client_log;
    std::vector<Result> results;
    LT loop;
    Server<LT> server(loop, loopback(), reactor::TlsTransport(server_context),
                      ServerHandler{&server_log});
    reactor::TlsConnector<PlannedHandler, RecordResult, LT> connector(
        loop, reactor::TlsTransport(client_context, "localhost"), PlannedHandler{&client_log},
        RecordResult{&results});
    enum class Plan { kCancel, kDisconnect, kThrow };
    const Plan plan = GENERATE(Plan::kCancel, Plan::kDisconnect, Plan::kThrow);
    switch (plan) {
      case Plan::kCancel:
        client_log.action = [&connector] { connector.cancel(); };
        break;
      case Plan::kDisconnect:
        client_log.action = [&connector] { connector.disconnect(); };
        break;
      case Plan::kThrow:
        client_log.action = [] { throw std::runtime_error("on_open throws"); };
        break;
    }
    INFO("plan " << static_cast<int>(plan) << " (0 cancel, 1 disconnect, 2 throw)");
    connector.connect(Endpoint::from_host_port("127.0.0.1", server.local_endpoint().port()));
    REQUIRE(drive(
        loop, [&] { return client_log.opened == 1 && server_log.opened == 1; }, 5s));
    if (plan == Plan::kCancel) {
      settle(loop);
      CHECK(results.empty());
      CHECK(client_log.closed == 0);  // cancel() leaves the established connection open
      connector.disconnect();
    }
    REQUIRE(drive(
        loop, [&] { return client_log.closed == 1 && server_log.closed == 1; }, 5s));
    settle(loop);
    if (plan == Plan::kThrow) {
      REQUIRE(results.size() == 1);
      CHECK(results[0].connected);
      CHECK(!results[0].ec);
      CHECK(client_log.close_reason == make_error_code(reactor::Error::kHandlerException));
    } else {
      CHECK(results.empty());
      CHECK(!client_log.close_reason);
    }
    CHECK(client_log.opened == 1);
    CHECK(client_log.closed == 1);
    CHECK(connector.state() == reactor::ConnectorState::kIdle);
    CHECK(loop.connection_count() == 0);
  }
  CHECK(test::open_fd_count() == baseline);
}

TEST_CASE("a TlsConnector's deadline ends a handshake the server never answers",
          "[tls][connector][timeout][regression]") {
  const std::size_t baseline = test::open_fd_count();
  {
    TlsOptions client = client_options(pki().ca);
    client.handshake_timeout = 0ms;  // none: only the connect's deadline can end it
    const TlsContext client_context(TlsRole::kClient, client);
    ConnectOptions options;
    options.deadline = 300ms;
    LT loop;
    PlainListener silent;  // takes the TCP connection, never says a word of TLS
    Client<LT> c(loop, client_context, "localhost", options);
    loop.cancel(loop.schedule_after(1h, [] {}));  // the loop's timerfd exists from here on
    const std::size_t before = test::open_fd_count();
    reactor::UniqueFd accepted;
    const auto start = Clock::now();
    c.connect(silent.port());
    const bool reported = drive(
        loop,
        [&] {
          if (accepted.get() < 0) accepted = silent.accept();
          return !c.results.empty();
        },
        3s);
    const auto took = Clock::now() - start;
    INFO("on_result after " << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
                            << " ms");
    REQUIRE(reported);
    CHECK(took >= 250ms);
    CHECK(took < 3s);
    REQUIRE(c.results.size() == 1);
    CHECK(!c.results[0].connected);
    CHECK(c.results[0].ec == std::errc::timed_out);
    CHECK(c.log.opened == 0);
    CHECK(c.log.closed == 0);
    REQUIRE(accepted.get() >= 0);  // the TCP connect went through: it was the handshake that hung
    // The client's socket is closed: only the server's end of it is left, and it reads the EOF.
    CHECK(test::open_fd_count() == before + 1);
    Drained answer;
    REQUIRE(drive(loop, [&] {
      read_some(accepted.get(), answer);
      return answer.ended();
    }));
    CHECK(!answer.bytes.empty());  // the ClientHello
    CHECK(loop.connection_count() == 0);
  }
  CHECK(test::open_fd_count() == baseline);
}

TEST_CASE("a TlsConnector retries a server that hangs up in the middle of the handshake",
          "[tls][connector][regression]") {
  // An overloaded server or a proxy whose backend is down accepts and closes: that may pass, so
  // each try is made (the first fix of the connector gave up at the first, as for a certificate).
  const std::size_t baseline = test::open_fd_count();
  {
    const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
    LT loop;
    PlainListener hangs_up;
    Client<LT> c(loop, client_context, "localhost", retrying());
    c.connect(hangs_up.port());
    int accepted = 0;
    REQUIRE(drive(
        loop,
        [&] {
          for (reactor::UniqueFd fd = hangs_up.accept(); fd.get() >= 0; fd = hangs_up.accept()) {
            ++accepted;  // closed at once
          }
          return !c.results.empty();
        },
        5s));
    CHECK(accepted == 5);
    REQUIRE(c.results.size() == 1);
    CHECK(!c.results[0].connected);
    INFO(c.results[0].ec.category().name() << ": " << c.results[0].ec.message());
    CHECK(c.results[0].ec.category() == reactor::tls_category());  // unexpected EOF, by OpenSSL
    CHECK(reactor::TlsTransport::is_retriable(c.results[0].ec));
    CHECK(c.log.opened == 0);
  }
  CHECK(test::open_fd_count() == baseline);
}

TEST_CASE("a TlsConnector connecting to an IP address checks it against the certificate's IP SAN",
          "[tls][connector][verify][regression]") {
  const std::size_t baseline = test::open_fd_count();
  {
    const TlsContext verifying(TlsRole::kClient, client_options(pki().ca));
    // No peer name in the prototype: connect(Endpoint) names the peer by its address.
    SECTION("a certificate for localhost without the IP address fails") {
      const std::error_code ec = connect_once(pki().ca.issue({"localhost"}), verifying, "", false);
      INFO(ec.category().name() << ": " << ec.message());
      CHECK(ec.category() == reactor::tls_verify_category());
      CHECK(ec.value() == X509_V_ERR_IP_ADDRESS_MISMATCH);
    }
    SECTION("a certificate with the IP address passes") {
      const std::error_code ec = connect_once(pki().localhost, verifying, "", true);
      CHECK(!ec);
    }
  }
  CHECK(test::open_fd_count() == baseline);
}

TEMPLATE_TEST_CASE("resume_reading during the handshake never runs on_data before on_open",
                   "[tls][lifecycle][regression]", FaultLT, FaultET) {
  const std::size_t baseline = test::open_fd_count();
  {
    const TlsContext server_context(TlsRole::kServer, server_options(pki().localhost));
    const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
    OrderLog log;  // outlives the loop, whose destructor may call its hooks
    test::FaultScript script;
    TestType loop;
    PlainListener listener;
    RawTls peer(client_context, listener.port(), "localhost");
    reactor::UniqueFd accepted = listener.accept();
    REQUIRE(accepted.get() >= 0);
    const int server_fd = accepted.get();
    std::error_code ec;
    auto* connection = reactor::TlsConnection<OrderHandler, TestType>::open(
        loop, accepted.release(), OrderHandler{&log}, reactor::ConnectionOptions{}, true, ec, false,
        reactor::TlsTransport(server_context));
    REQUIRE(connection != nullptr);
    handshake(loop, peer);  // the client is done; its Finished is on its way
    // The server's NewSessionTicket write (after it reads the client's Finished) finds the socket
    // "full": its handshake stops there, with the client's first data read ahead and buffered.
    script.next(test::Call::kSend, test::fail(EAGAIN, server_fd));
    peer.write("early");
    peer.flush();
    REQUIRE(peer.flushed());
    REQUIRE(drive(
        loop, [&] { return script.pending(test::Call::kSend) == 0; }, 5s));
    REQUIRE(log.opened == 0);
    CHECK(connection->state() == reactor::ConnectionState::kHandshaking);
    CHECK(!connection->is_reading());
    connection->pause_reading();
    connection->resume_reading();
    loop.run_once(0ms);
    peer.write(" and late");  // a new edge for edge mode, whose EPOLLOUT edge was spent
    peer.flush();
    REQUIRE(drive(
        loop, [&] { return log.opened == 1 && log.received == "early and late"; }, 5s));
    CHECK(log.data_before_open == 0);
    CHECK(log.failures.empty());
    connection->close();
    REQUIRE(drive(loop, [&] {
      read_and_answer_close(peer);
      return log.closed == 1;
    }));
  }
  CHECK(test::open_fd_count() == baseline);
}

TEST_CASE("abort during the handshake reports operation_canceled to on_handshake_failed",
          "[tls][lifecycle][regression]") {
  const std::size_t baseline = test::open_fd_count();
  {
    const TlsContext server_context(TlsRole::kServer, server_options(pki().localhost));
    OrderLog log;  // outlives the loop, whose destructor may call its hooks
    LT loop;
    auto [ours, theirs] = test::socket_pair();
    std::error_code ec;
    auto* connection = reactor::TlsConnection<OrderHandler, LT>::open(
        loop, ours.release(), OrderHandler{&log}, reactor::ConnectionOptions{}, false, ec, false,
        reactor::TlsTransport(server_context));
    REQUIRE(connection != nullptr);
    loop.run_once(0ms);
    REQUIRE(connection->state() == reactor::ConnectionState::kHandshaking);
    connection->abort();
    REQUIRE(drive(
        loop, [&] { return !log.failures.empty(); }, 5s));
    settle(loop, 20ms);
    REQUIRE(log.failures.size() == 1);
    INFO(log.failures[0].category().name() << ": " << log.failures[0].message());
    CHECK(log.failures[0] == std::errc::operation_canceled);
    CHECK(log.opened == 0);
    CHECK(log.closed == 0);
    CHECK(loop.connection_count() == 0);
  }
  CHECK(test::open_fd_count() == baseline);
}

TEST_CASE("a shutdown whose FIN fails reports the error to on_close", "[tls][close][regression]") {
  const std::size_t baseline = test::open_fd_count();
  {
    const TlsContext server_context(TlsRole::kServer, server_options(pki().localhost));
    const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
    FaultTarget target;
    test::FaultScript script;
    // As after the peer's reset: shutdown(SHUT_WR) says ENOTCONN.
    script.choose([&target](test::Call call, int fd) {
      return call == test::Call::kShutdown && fd == target.fd ? test::fail(ENOTCONN) : test::pass();
    });
    ServerLog server_log;  // outlives the loop, whose destructor may call its hooks
    FaultLT loop;
    reactor::TlsAcceptor<ArmedHandler, FaultLT> server(
        loop, loopback(), reactor::TlsTransport(server_context),
        ArmedHandler{&server_log, &target, [](auto& connection) { connection.shutdown(); }});
    RawTls peer(client_context, server.local_endpoint().port(), "localhost");
    handshake(loop, peer);
    REQUIRE(drive(loop, [&] {
      peer.read();
      return server_log.closed == 1;
    }));
    CHECK(script.faults(test::Call::kShutdown) == 1);
    const std::error_code reason = server_log.close_reasons.at(0);
    INFO(reason.category().name() << ": " << reason.message());
    CHECK(reason == std::errc::not_connected);
    CHECK(server_log.opened == 1);
    CHECK(server_log.failed == 0);
  }
  CHECK(test::open_fd_count() == baseline);
}

TEST_CASE("adopt with a TlsTransport runs the handshake on a socket connected elsewhere",
          "[tls][adopt]") {
  const std::size_t baseline = test::open_fd_count();
  {
    const TlsContext server_context(TlsRole::kServer, server_options(pki().localhost));
    const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
    ServerLog server;
    ClientLog client;
    client.to_send = "over a socketpair";
    client.close_after = client.to_send.size();
    LT loop;
    int ends[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, ends) == 0);
    auto& accepted = reactor::adopt(loop, reactor::UniqueFd(ends[0]), ServerHandler{&server}, {},
                                    reactor::TlsTransport(server_context));
    std::error_code ec;
    auto* dialed = reactor::adopt(loop, reactor::UniqueFd(ends[1]), ClientHandler{&client}, {}, ec,
                                  reactor::TlsTransport(client_context, "localhost"));
    REQUIRE(dialed != nullptr);
    CHECK(!ec);
    CHECK(accepted.state() == reactor::ConnectionState::kHandshaking);  // on_open comes later
    CHECK(server.opened == 0);
    REQUIRE(drive(loop, [&] { return client.closed == 1 && server.closed == 1; }));
    CHECK(server.opened == 1);
    CHECK(client.opened == 1);
    CHECK(server.received == client.to_send);
    CHECK(client.received == client.to_send);
    CHECK(!client.close_reason);
    CHECK(server.close_reasons == std::vector<std::error_code>{std::error_code()});
    CHECK(server.version == TLS1_3_VERSION);
  }
  CHECK(test::open_fd_count() == baseline);
}

TEST_CASE("bytes sent during the handshake go out after on_open and in order",
          "[tls][adopt][regression]") {
  // A handle made while the connection still handshakes (adopt() returns it then): its send()
  // was refused inside the loop and dropped (after reporting success) from outside it.
  const std::size_t baseline = test::open_fd_count();
  {
    const TlsContext server_context(TlsRole::kServer, server_options(pki().localhost));
    const TlsContext client_context(TlsRole::kClient, client_options(pki().ca));
    ServerLog server;
    server.echo = false;
    ClientLog client;
    const std::string expected = "through a handle, then directly";
    client.close_after = expected.size();
    LT loop;
    int ends[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, ends) == 0);
    auto& accepted = reactor::adopt(loop, reactor::UniqueFd(ends[0]), ServerHandler{&server}, {},
                                    reactor::TlsTransport(server_context));
    REQUIRE(accepted.state() == reactor::ConnectionState::kHandshaking);
    const reactor::ConnectionHandle handle = accepted.handle();
    // From another thread: posted, run by the loop before the handshake is done.
    std::error_code posted = std::make_error_code(std::errc::io_error);
    std::thread([&] { posted = handle.send("through a handle, "); }).join();
    CHECK(!posted);
    loop.run_once(0ms);  // the posted send runs now, still in the handshake
    REQUIRE(accepted.state() == reactor::ConnectionState::kHandshaking);
    CHECK(accepted.send("then directly"));
    CHECK(accepted.pending_output_bytes() == expected.size());
    CHECK(server.opened == 0);
    reactor::adopt(loop, reactor::UniqueFd(ends[1]), ClientHandler{&client}, {},
                   reactor::TlsTransport(client_context, "localhost"));
    REQUIRE(drive(loop, [&] { return client.closed == 1 && server.closed == 1; }));
    CHECK(server.opened == 1);
    CHECK(client.received == expected);
    CHECK(!client.close_reason);
  }
  CHECK(test::open_fd_count() == baseline);
}
