// Public, opt-in: TLS for connections, on OpenSSL 3 (link reactor::tls; Debian: libssl-dev). Not
// included by <reactor.hpp>: the core has no dependency beyond the standard library and Linux.
//
// TlsTransport is a transport (transport.hpp) that runs the TLS record layer between a Connection
// and its socket: the handshake runs inside the loop, non-blocking, before on_open; send() and the
// gathered flush encrypt; close() sends close_notify before the FIN and lingers for the peer's at
// most ConnectionOptions::linger_timeout; a peer that closes without close_notify is reported to
// on_close as TlsError::kTruncated, an error of its own. A failed or timed-out handshake is
// reported to the optional hook on_handshake_failed(Connection&, std::error_code) (on_open never
// ran, so on_close does not either). The certificates, verification, ALPN and versions come from a
// TlsContext (tls_context.hpp), whose reload() swaps certificates without a restart.
//
// I/O goes through the reactor's syscall policy (a BIO of ours calling Sys::read and Sys::send
// with MSG_NOSIGNAL), so fault injection and the simulated kernel run TLS too. Kernel TLS
// (SSL_OP_ENABLE_KTLS, docs/design.md "Transport seam") needs OpenSSL's own socket BIO, which
// writes without MSG_NOSIGNAL; it is used only where it cannot raise SIGPIPE and can work: the
// context asks for it (TlsOptions::ktls), the policy is the real kernel's (LinuxSyscalls), the
// process ignores SIGPIPE (the library never changes signal dispositions), and the kernel has the
// `tls` ULP (kernel_tls_support()). Otherwise the record layer stays in user space.
//
// Usage:
//   reactor::TlsContext context(reactor::TlsRole::kServer, {.certificates = {
//       reactor::TlsCertificate::from_files("cert.pem", "key.pem")}});
//   reactor::TlsAcceptor<Echo> acceptor(loop, endpoint, context, Echo{});
// The context must outlive the acceptors and connectors that hold it; it may go while connections
// it started are open (each keeps its own reference to the OpenSSL context it started with).
//
// Worth knowing: a peer's TCP half-close (FIN) without close_notify is a truncation here, not
// on_eof (TLS half-close is close_notify with the connection left open, which is on_eof). In
// TLS 1.3 a client finishes its handshake before the server has checked the client's
// certificate: a server that requires one and rejects it reports on_handshake_failed, while the
// client sees on_open (and on_result) first, then on_close with the server's alert. Failures that
// abort (a read or write timeout, abort(), an error) send no close_notify: the peer sees a
// truncation. Renegotiation is refused (SSL_OP_NO_RENEGOTIATION). A connector's Unix-socket
// endpoint has no name to check the certificate against: give the prototype a peer name. Bytes
// sent while the handshake runs (send(), or a handle's) are queued and go out after on_open.
//
// Threading: a TlsTransport belongs to its connection's reactor thread. Contexts are shared by
// any number of reactors (TlsContext::new_ssl and reload are thread-safe).
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>

#include "acceptor.hpp"
#include "connection.hpp"
#include "connector.hpp"
#include "pool.hpp"
#include "syscalls.hpp"
#include "tls_context.hpp"
#include "transport.hpp"

namespace reactor {

namespace detail {

// Test seam: take the kernel as having the `tls` ULP without asking it, so that OpenSSL's own
// socket BIO and its kernel-TLS fallback can be exercised on a kernel without it.
inline std::atomic<bool> tls_assume_kernel_tls{false};

// A BIO that reads and writes the socket through the syscall policy: send() with MSG_NOSIGNAL (a
// peer's reset never raises SIGPIPE), EINTR retried, EAGAIN turned into OpenSSL's retry flags. Its
// data is the transport, which keeps the fd and the errno of a failed call (OpenSSL may clobber
// errno before SSL_get_error returns).
template <class Sys, class Owner>
struct SysBio {
  static BIO_METHOD* method() noexcept {
    static BIO_METHOD* const kMethod = make();  // one per policy, for the whole program
    return kMethod;
  }

  static BIO_METHOD* make() noexcept {
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "reactor socket");
    if (m == nullptr) return nullptr;
    BIO_meth_set_write_ex(m, &write_ex);
    BIO_meth_set_read_ex(m, &read_ex);
    BIO_meth_set_ctrl(m, &ctrl);
    return m;
  }

  static int write_ex(BIO* bio, const char* data, std::size_t size, std::size_t* written) {
    BIO_clear_retry_flags(bio);
    auto& owner = *static_cast<Owner*>(BIO_get_data(bio));
    for (;;) {
      const ssize_t n = Sys::send(owner.fd_, data, size, MSG_NOSIGNAL);
      if (n >= 0) {
        *written = static_cast<std::size_t>(n);
        return 1;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        BIO_set_retry_write(bio);
      } else {
        owner.errno_ = errno;
      }
      return 0;
    }
  }

  static int read_ex(BIO* bio, char* data, std::size_t size, std::size_t* got) {
    BIO_clear_retry_flags(bio);
    auto& owner = *static_cast<Owner*>(BIO_get_data(bio));
    for (;;) {
      const ssize_t n = Sys::read(owner.fd_, data, size);
      if (n > 0) {
        *got = static_cast<std::size_t>(n);
        return 1;
      }
      if (n == 0) {  // EOF: OpenSSL tells close_notify from truncation, asking BIO_CTRL_EOF
        owner.eof_ = true;
        return 0;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        BIO_set_retry_read(bio);
      } else {
        owner.errno_ = errno;
      }
      return 0;
    }
  }

  static long ctrl(BIO* bio, int command, long /*number*/, void* /*pointer*/) {
    switch (command) {
      case BIO_CTRL_FLUSH:  // writes go straight to the socket
        return 1;
      case BIO_CTRL_EOF:  // OpenSSL 3 reports a read of 0 as truncation only when this says so
        return static_cast<Owner*>(BIO_get_data(bio))->eof_ ? 1 : 0;
      default:  // kernel TLS included: unsupported
        return 0;
    }
  }
};

}  // namespace detail

class TlsTransport {
 public:
  static constexpr bool kHandshake = true;
  // A TLS read returns at most one record: a short one says nothing about the socket.
  static constexpr bool kShortReadDrains = false;
  // A read may consume a partial record and then say EAGAIN: not a stale wakeup.
  static constexpr bool kEagainIsFinal = false;

  // No context: start() fails (std::errc::invalid_argument).
  TlsTransport() noexcept = default;

  // A prototype on `context` (server or client, as the context's role). `peer_name`, for a
  // client: the server's host name, sent as SNI and checked against its certificate (an IP
  // address is checked against the certificate's IP addresses and not sent). Empty: no SNI, and
  // no name check. The context must outlive the prototype and its copies (not the connections
  // they start).
  TlsTransport(const TlsContext& context,
               std::string peer_name = {})  // NOLINT: implicit on purpose
      : context_(&context), peer_name_(std::move(peer_name)) {}

  // Copies a prototype (the context and the peer's name), never a started connection's state.
  TlsTransport(const TlsTransport& other)
      : context_(other.context_), peer_name_(other.peer_name_) {}
  TlsTransport& operator=(const TlsTransport&) = delete;
  TlsTransport(TlsTransport&& other) noexcept
      : context_(other.context_),
        peer_name_(std::move(other.peer_name_)),
        ssl_(std::exchange(other.ssl_, nullptr)),
        fd_(other.fd_),
        errno_(other.errno_),
        failed_(other.failed_),
        eof_(other.eof_),
        established_(other.established_),
        socket_bio_(other.socket_bio_),
        handshake_timeout_(other.handshake_timeout_),
        error_(other.error_) {
    // A started transport's BIO points at its owner (a Connection never moves one; be safe).
    if (ssl_ != nullptr && BIO_get_data(SSL_get_rbio(ssl_)) == &other) {
      BIO_set_data(SSL_get_rbio(ssl_), this);
    }
  }
  TlsTransport& operator=(TlsTransport&&) = delete;
  ~TlsTransport() {
    if (ssl_ != nullptr) SSL_free(ssl_);
  }

  // A prototype's peer name (Connector sets it from the host it connects to, if empty).
  const std::string& peer_name() const noexcept { return peer_name_; }
  void set_peer_name(std::string name) noexcept { peer_name_ = std::move(name); }

  // --- After the handshake (from on_open on) ----------------------------------------------------
  // The ALPN protocol agreed on ("h2", "http/1.1"); empty when none was.
  std::string_view alpn() const noexcept {
    const unsigned char* data = nullptr;
    unsigned length = 0;
    if (ssl_ != nullptr) SSL_get0_alpn_selected(ssl_, &data, &length);
    return data == nullptr ? std::string_view()
                           : std::string_view(reinterpret_cast<const char*>(data), length);
  }
  // Server: the name the client asked for (SNI); client: the name it sent. Empty when none.
  std::string_view server_name() const noexcept {
    const char* name =
        ssl_ == nullptr ? nullptr : SSL_get_servername(ssl_, TLSEXT_NAMETYPE_host_name);
    return name == nullptr ? std::string_view() : std::string_view(name);
  }
  // "TLSv1.3", "TLSv1.2"; empty before start.
  std::string_view version() const noexcept {
    return ssl_ == nullptr ? std::string_view() : std::string_view(SSL_get_version(ssl_));
  }
  // TLS1_3_VERSION, TLS1_2_VERSION; 0 before start.
  int version_number() const noexcept { return ssl_ == nullptr ? 0 : SSL_version(ssl_); }
  std::string_view cipher() const noexcept {
    const char* name = ssl_ == nullptr ? nullptr : SSL_get_cipher_name(ssl_);
    return name == nullptr ? std::string_view() : std::string_view(name);
  }
  // Whether the kernel encrypts what we send / decrypts what we receive (kernel TLS).
  bool ktls_send() const noexcept {
    return ssl_ != nullptr && BIO_get_ktls_send(SSL_get_wbio(ssl_));
  }
  bool ktls_receive() const noexcept {
    return ssl_ != nullptr && BIO_get_ktls_recv(SSL_get_rbio(ssl_));
  }
  // The peer's certificate (a client's only when the server asked for one), owned by the SSL
  // object; nullptr when there is none.
  X509* peer_certificate() const noexcept {
    return ssl_ == nullptr ? nullptr : SSL_get0_peer_certificate(ssl_);
  }
  // The OpenSSL object, for what this class does not wrap; do not read or write through it.
  SSL* native_handle() const noexcept { return ssl_; }

  // Whether this kernel can take the record layer (the `tls` ULP): empty when it can, else why
  // not (ENOENT: no `tls` module). Asked once per process, with a throw-away socket.
  static std::error_code kernel_tls_support() noexcept {
    static const int kError = probe_kernel_tls();
    return kError == 0 ? std::error_code() : detail::errno_code(kError);
  }

  // --- The transport contract (transport.hpp), for Connection --------------------------------
  template <class Sys>
  void start(int fd, std::error_code& ec) noexcept {
    ec.clear();
    if (context_ == nullptr) {
      ec = std::make_error_code(std::errc::invalid_argument);
      return;
    }
    fd_ = fd;
    bool ktls = false;
    ssl_ = context_->new_ssl(ec, &handshake_timeout_, &ktls);
    if (ssl_ == nullptr) return;
    if (!context_->is_server() && !peer_name_.empty()) {
      if (!name_peer()) {
        ec = detail::tls_take_error(nullptr, EINVAL);
        return;
      }
    }
    if (use_socket_bio<Sys>(ktls)) {
      socket_bio_ = true;
      if (SSL_set_fd(ssl_, fd) != 1) ec = detail::tls_take_error(nullptr, ENOMEM);
      return;
    }
    BIO_METHOD* const method = detail::SysBio<Sys, TlsTransport>::method();
    BIO* bio = method == nullptr ? nullptr : BIO_new(method);
    if (bio == nullptr) {
      ec = detail::tls_take_error(nullptr, ENOMEM);
      return;
    }
    BIO_set_data(bio, this);  // the connection's transport: it never moves once started
    BIO_set_init(bio, 1);
    SSL_set_bio(ssl_, bio, bio);
    // Reads take what the socket holds, several records at once: one read() per wakeup, not two
    // per record (header, then body). What is left over is has_buffered_input().
    SSL_set_read_ahead(ssl_, 1);
  }

  std::chrono::milliseconds handshake_timeout() const noexcept { return handshake_timeout_; }

  template <class Sys>
  HandshakeStatus handshake(int /*fd*/) noexcept {
    clear_stale_errors();
    const int result = SSL_do_handshake(ssl_);
    if (result == 1) {
      peer_name_ = std::string();  // the prototype's part is done: free it
      established_ = true;
      return HandshakeStatus::kDone;
    }
    switch (SSL_get_error(ssl_, result)) {
      case SSL_ERROR_WANT_READ:
        return HandshakeStatus::kWantRead;
      case SSL_ERROR_WANT_WRITE:
        return HandshakeStatus::kWantWrite;
      default:
        failed(EPROTO);
        return HandshakeStatus::kFailed;
    }
  }

  template <class Sys>
  ssize_t read(int /*fd*/, char* buffer, std::size_t size) noexcept {
    std::size_t got = 0;
    clear_stale_errors();
    const int result = SSL_read_ex(ssl_, buffer, size, &got);
    if (result == 1) return static_cast<ssize_t>(got);
    switch (SSL_get_error(ssl_, result)) {
      case SSL_ERROR_WANT_READ:
      case SSL_ERROR_WANT_WRITE:  // a TLS 1.3 KeyUpdate answer waits for room: see docs/design.md
        errno = EAGAIN;
        return -1;
      case SSL_ERROR_ZERO_RETURN:  // close_notify: the peer's orderly end
        return 0;
      default:
        failed(EPROTO);
        errno = EPROTO;
        return -1;
    }
  }

  // Writes like the kernel does: everything, or up to where the socket is full (a short count
  // then means full, which edge mode relies on: its EPOLLOUT edge comes when the socket drains).
  // OpenSSL writes one record per call (SSL_MODE_ENABLE_PARTIAL_WRITE), so this loops.
  template <class Sys>
  ssize_t send(int /*fd*/, const char* data, std::size_t size) noexcept {
    return write_all(data, size, 0);
  }

  // One record per buffer at most (OpenSSL has no gathered write). A record OpenSSL could not
  // finish stays in its buffer and is taken as done when the same bytes are offered again
  // (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER): the output queue keeps them until written, at the
  // head of its first buffer.
  template <class Sys>
  ssize_t sendv(int /*fd*/, iovec* vectors, int count) noexcept {
    ssize_t total = 0;
    for (int i = 0; i < count; ++i) {
      const std::size_t size = vectors[i].iov_len;
      const ssize_t n = write_all(static_cast<const char*>(vectors[i].iov_base), size, total);
      if (n < 0) return -1;
      const ssize_t before = std::exchange(total, n);
      // This buffer did not go out whole: the socket is full, and OpenSSL may hold a record of
      // it, which only these bytes may complete.
      if (static_cast<std::size_t>(n - before) < size) break;
    }
    return total;
  }

  // close_notify (once, and only after a handshake that did not fail), then the FIN. A
  // close_notify the socket has no room for is not retried: the FIN still goes, and the peer sees
  // a truncation, which is what happened.
  template <class Sys>
  int shutdown_write(int fd) noexcept {
    send_close_notify();
    const int result = Sys::shutdown(fd, SHUT_WR);
    if (result != 0) error_ = detail::last_errno_code();
    return result;
  }

  // An orderly close without shutdown_write first (the peer's close_notify or FIN came first, or
  // no lingering): close_notify, so the peer sees our end as orderly too.
  template <class Sys>
  void before_close(int /*fd*/) noexcept {
    send_close_notify();
  }

  std::error_code error() const noexcept { return error_; }

  // For Connector: whether a failed handshake's error may pass on another try. Not: a
  // certificate that did not verify, a fatal alert from the peer (it refused our certificate,
  // version, ciphers or protocols; except internal_error and user_canceled), a version or cipher
  // we cannot agree on. Everything else (a peer that hung up, a timeout, a socket error) is.
  static bool is_retriable(const std::error_code& ec) noexcept {
    if (ec.category() == tls_verify_category()) return false;
    if (ec.category() != tls_category()) return true;
    const auto packed = static_cast<unsigned long>(static_cast<unsigned>(ec.value()));
    if (ERR_GET_LIB(packed) != ERR_LIB_SSL) return true;
    const int reason = ERR_GET_REASON(packed);
    if (reason >=
        SSL_AD_REASON_OFFSET) {  // an alert the peer sent: SSL_AD_REASON_OFFSET + its code
      const int alert = reason - SSL_AD_REASON_OFFSET;
      return alert == SSL_AD_INTERNAL_ERROR || alert == SSL_AD_USER_CANCELLED;
    }
    switch (reason) {
      case SSL_R_CERTIFICATE_VERIFY_FAILED:
      case SSL_R_WRONG_VERSION_NUMBER:
      case SSL_R_UNSUPPORTED_PROTOCOL:
      case SSL_R_NO_PROTOCOLS_AVAILABLE:
      case SSL_R_NO_SHARED_CIPHER:
      case SSL_R_NO_APPLICATION_PROTOCOL:
        return false;
      default:
        return true;
    }
  }

  bool has_buffered_input() const noexcept { return ssl_ != nullptr && SSL_has_pending(ssl_) == 1; }

 private:
  template <class, class>
  friend struct detail::SysBio;

  static int probe_kernel_tls() noexcept {
    const int probe = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe < 0) return errno;
    // Only an established socket may take the ULP: ENOTCONN means the kernel has it (and loaded
    // it, if it is a module); ENOENT means it does not (tcp_set_ulp, net/ipv4/tcp_ulp.c).
    int error = 0;
    if (::setsockopt(probe, IPPROTO_TCP, TCP_ULP, "tls", sizeof "tls") != 0) error = errno;
    ::close(probe);
    return error == ENOTCONN ? 0 : (error == 0 ? 0 : error);
  }

  template <class Sys>
  bool use_socket_bio(bool ktls) const noexcept {
    if constexpr (!std::is_same_v<Sys, LinuxSyscalls>) {
      return false;
    } else {
      if (!ktls) return false;
      if (!detail::tls_assume_kernel_tls.load(std::memory_order_relaxed) && kernel_tls_support()) {
        return false;
      }
      struct sigaction current {};
      return ::sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_IGN;
    }
  }

  // The client's expected server name: SNI (host names only, RFC 6066) and the certificate check.
  bool name_peer() noexcept {
    in6_addr address{};
    const bool literal = ::inet_pton(AF_INET, peer_name_.c_str(), &address) == 1 ||
                         ::inet_pton(AF_INET6, peer_name_.c_str(), &address) == 1;
    if (literal) {
      return X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl_), peer_name_.c_str()) == 1;
    }
    return SSL_set1_host(ssl_, peer_name_.c_str()) == 1 &&
           SSL_set_tlsext_host_name(ssl_, peer_name_.c_str()) == 1;
  }

  void send_close_notify() noexcept {
    if (ssl_ == nullptr || failed_ || !SSL_is_init_finished(ssl_) ||
        (SSL_get_shutdown(ssl_) & SSL_SENT_SHUTDOWN) != 0) {
      return;
    }
    clear_stale_errors();
    if (SSL_shutdown(ssl_) < 0) ERR_clear_error();
  }

  // After a failed handshake, read or write: the reason, then this thread's error queue cleared.
  // A peer gone without close_notify is a truncation (OpenSSL 3 reports that as an SSL error with
  // reason SSL_R_UNEXPECTED_EOF_WHILE_READING).
  void failed(int fallback) noexcept {
    // OpenSSL's socket BIO (kernel TLS) leaves a failed syscall's reason in errno only.
    if (socket_bio_ && errno_ == 0 && errno != 0 && errno != EAGAIN) errno_ = errno;
    failed_ = true;
    const unsigned long first = ERR_peek_error();
    // established_, not SSL_is_init_finished(): the fatal error has put the SSL back in init.
    if (established_ && ERR_GET_LIB(first) == ERR_LIB_SSL &&
        ERR_GET_REASON(first) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
      ERR_clear_error();
      error_ = make_error_code(TlsError::kTruncated);
      return;
    }
    error_ = detail::tls_take_error(ssl_, errno_ != 0 ? errno_ : fallback);
  }

  // write_all: `done` bytes went out before this buffer; returns them plus what of it went out,
  // or -1 (errno EAGAIN when nothing did and the socket is full; another error after failed()).
  // Pieces are at most one big output-queue chunk long (ChunkPool::kChunkCapacity): a record the
  // socket had no room for must be offered again whole, so its bytes must land in one chunk when
  // queued. A queued buffer is one chunk already; a direct write's rest starts an empty queue, and
  // such an append goes whole into a small chunk or else begins a big one (buffer.hpp).
  ssize_t write_all(const char* data, std::size_t size, ssize_t done) noexcept {
    std::size_t sent = 0;
    while (sent < size) {
      const std::size_t piece = std::min(size - sent, ChunkPool::kChunkCapacity);
      std::size_t written = 0;
      clear_stale_errors();
      const int result = SSL_write_ex(ssl_, data + sent, piece, &written);
      if (result != 1) {
        if (write_failed(result) < 0 && errno != EAGAIN) return -1;
        const ssize_t total = done + static_cast<ssize_t>(sent);
        if (total == 0) return -1;  // errno is EAGAIN
        return total;
      }
      sent += written;
    }
    return done + static_cast<ssize_t>(sent);
  }

  // SSL_get_error reads this thread's error queue: an entry left there by other code (the user's
  // own OpenSSL calls, say) would turn this connection's "want read" into a failure. Ours are
  // cleared as they are reported; peeking costs a thread-local lookup, clearing happens rarely.
  static void clear_stale_errors() noexcept {
    if (ERR_peek_error() != 0) ERR_clear_error();
  }

  ssize_t write_failed(int result) noexcept {
    switch (SSL_get_error(ssl_, result)) {
      case SSL_ERROR_WANT_WRITE:
      case SSL_ERROR_WANT_READ:
        errno = EAGAIN;
        return -1;
      default:
        failed(EPIPE);
        errno = EPROTO;
        return -1;
    }
  }

  const TlsContext* context_ = nullptr;
  std::string peer_name_;
  SSL* ssl_ = nullptr;
  int fd_ = -1;
  int errno_ = 0;  // a failed send or read in the BIO
  bool failed_ = false;
  bool eof_ = false;          // the BIO read the peer's FIN
  bool established_ = false;  // the handshake finished
  bool socket_bio_ = false;   // OpenSSL's own socket BIO (kernel TLS possible), not SysBio
  std::chrono::milliseconds handshake_timeout_{0};
  std::error_code error_;
};

// A TLS connection, and an acceptor whose connections are (construct it with a server
// TlsContext where a plain Acceptor takes nothing: TlsAcceptor<H> a(loop, endpoint, context, H{})).
template <class Handler, class R = Reactor<>>
using TlsConnection = Connection<Handler, R, TlsTransport>;

template <class Handler, class R = Reactor<>>
using TlsAcceptor = Acceptor<Handler, R, TlsTransport>;

// Every core: TlsPoolAcceptor<H> a(pool, endpoint, context, H{}, ListenOptions{}, balance).
template <class Handler, class R = Reactor<>>
using TlsPoolAcceptor = PoolAcceptor<Handler, R, TlsTransport>;

// A client: TlsConnector<H, OnResult> c(loop, context, H{}, on_result); c.connect("host", 443)
// checks the server's certificate against "host" (when the context verifies) and sends it as SNI.
template <class Handler, class OnResult, class R = Reactor<>>
using TlsConnector = Connector<Handler, OnResult, R, TlsTransport>;

}  // namespace reactor
