// Public, opt-in: TlsContext, the TLS settings (certificates, SNI, peer verification, ALPN,
// versions, ciphers) that the TLS transport (tls.hpp) hands each connection, reloadable while
// connections run; and the error categories of OpenSSL's errors. Not included by <reactor.hpp>:
// it needs OpenSSL 3 (link reactor::tls, which brings OpenSSL::SSL).
#pragma once

#include <openssl/err.h>
#include <openssl/opensslv.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "error.hpp"

static_assert(OPENSSL_VERSION_MAJOR >= 3, "reactor/tls_context.hpp needs OpenSSL 3");

namespace reactor {

enum class TlsVersion : int { k1_2 = TLS1_2_VERSION, k1_3 = TLS1_3_VERSION };
enum class TlsRole : std::uint8_t { kServer, kClient };
// kDefault: a client verifies the server, a server asks for no certificate. kNone: nobody is
// verified. kRequired: a server requests a client certificate and fails the handshake without one.
enum class TlsVerify : std::uint8_t { kDefault, kNone, kRequired };

// TLS failures that OpenSSL reports without an error of its own.
enum class TlsError {
  kTruncated = 1,    // the peer closed the TCP connection without close_notify
  kHandshakeFailed,  // a handshake failed and OpenSSL queued no reason
};

namespace detail {

// OpenSSL 3 packs an error as lib (8 bits from bit 23) | reason (23 bits): a non-negative int, so a
// packed code is the error_code's value as it is. System errors set bit 31 and carry an errno
// instead; tls_error_code() turns those into system-category codes.
static_assert(((static_cast<unsigned long>(ERR_LIB_MASK) << ERR_LIB_OFFSET) | ERR_REASON_MASK) <=
              static_cast<unsigned long>(INT_MAX));

class TlsCategory final : public std::error_category {
 public:
  const char* name() const noexcept override { return "reactor.tls"; }
  std::string message(int value) const override {
    // The reason strings are loaded with libssl's initialisation, which the first SSL_CTX does:
    // a code formatted before any (a test, a log line) would read "reason(240)" otherwise.
    OPENSSL_init_ssl(OPENSSL_INIT_LOAD_SSL_STRINGS | OPENSSL_INIT_LOAD_CRYPTO_STRINGS, nullptr);
    const auto code = static_cast<unsigned long>(value);
    const char* reason = ERR_reason_error_string(code);
    if (reason == nullptr) {
      char text[256];
      ERR_error_string_n(code, text, sizeof text);
      return text;
    }
    const char* lib = ERR_lib_error_string(code);
    return lib == nullptr ? std::string(reason) : std::string(lib) + ": " + reason;
  }
};

class TlsVerifyCategory final : public std::error_category {
 public:
  const char* name() const noexcept override { return "reactor.tls.verify"; }
  std::string message(int value) const override { return X509_verify_cert_error_string(value); }
};

class TlsErrorCategory final : public std::error_category {
 public:
  const char* name() const noexcept override { return "reactor.tls.error"; }
  std::string message(int value) const override {
    switch (static_cast<TlsError>(value)) {
      case TlsError::kTruncated:
        return "peer closed the connection without close_notify: data may be truncated";
      case TlsError::kHandshakeFailed:
        return "TLS handshake failed";
    }
    return "unknown reactor TLS error";
  }
};

}  // namespace detail

// OpenSSL's packed error codes (ERR_get_error()). Thread-safe; lives for the whole program.
inline const std::error_category& tls_category() noexcept {
  static const detail::TlsCategory kCategory;
  return kCategory;
}

// X509_V_ERR_* results of verifying the peer's certificate (SSL_get_verify_result()).
inline const std::error_category& tls_verify_category() noexcept {
  static const detail::TlsVerifyCategory kCategory;
  return kCategory;
}

// The category of reactor::TlsError values.
inline const std::error_category& tls_error_category() noexcept {
  static const detail::TlsErrorCategory kCategory;
  return kCategory;
}

inline std::error_code make_error_code(TlsError e) noexcept {
  return {static_cast<int>(e), tls_error_category()};
}

namespace detail {

// The code of one packed OpenSSL error; system errors (fopen, socket I/O) keep their errno.
inline std::error_code tls_error_code(unsigned long err) noexcept {
  if (ERR_SYSTEM_ERROR(err)) return errno_code(static_cast<int>(ERR_GET_REASON(err)));
  return {static_cast<int>(err), tls_category()};
}

// The first (root-cause) error on this thread's OpenSSL error queue, or `fallback` when the queue
// is empty. Always leaves the queue empty.
inline std::error_code tls_queue_error(std::error_code fallback) noexcept {
  const unsigned long err = ERR_get_error();
  ERR_clear_error();
  return err != 0 ? tls_error_code(err) : fallback;
}

// Why a TLS call on `ssl` (may be nullptr) failed: a failed verification of the peer's
// certificate (only when this side verifies it) in tls_verify_category(), else the first error on
// this thread's queue, else `fallback_errno` (0: none) as a system error, else kHandshakeFailed.
// Always leaves this thread's error queue empty.
inline std::error_code tls_take_error(SSL* ssl, int fallback_errno) noexcept {
  if (ssl != nullptr && (SSL_get_verify_mode(ssl) & SSL_VERIFY_PEER) != 0) {
    if (const long result = SSL_get_verify_result(ssl); result != X509_V_OK) {
      ERR_clear_error();
      return {static_cast<int>(result), tls_verify_category()};
    }
  }
  return tls_queue_error(fallback_errno != 0 ? errno_code(fallback_errno)
                                             : make_error_code(TlsError::kHandshakeFailed));
}

template <auto Free>
struct TlsFree {
  template <class T>
  void operator()(T* p) const noexcept {
    Free(p);
  }
};
using SslCtxPtr = std::unique_ptr<SSL_CTX, TlsFree<SSL_CTX_free>>;

// What an SSL_CTX's callbacks read. The CTX owns it through ex_data and frees it when its own
// reference count reaches zero, i.e. after the last SSL using it, so a reload() that drops a
// generation never frees a table under a handshake that is still running.
struct TlsCtxData {
  struct ServerName {
    std::string name;  // "example.com" or "*.example.com", matched without regard to case
    SSL_CTX* ctx;      // the CTX serving it: the default one or one of `contexts`
  };
  std::vector<unsigned char> alpn;  // server: its protocols in ALPN wire format, preferred first
  std::vector<ServerName> names;    // default CTX of a server with several certificates
  std::vector<SslCtxPtr> contexts;  // ... and the CTXs of its other certificates
};

inline void tls_free_ctx_data(void*, void* data, CRYPTO_EX_DATA*, int, long, void*) noexcept {
  delete static_cast<TlsCtxData*>(data);
}

// The process-wide ex_data slot of TlsCtxData; negative when OpenSSL could not allocate it.
inline int tls_ctx_data_index() noexcept {
  static const int kIndex =
      SSL_CTX_get_ex_new_index(0, nullptr, nullptr, nullptr, &tls_free_ctx_data);
  return kIndex;
}

// Keys are never read with a passphrase: OpenSSL's default callback would prompt on the terminal.
inline int tls_no_passphrase(char*, int, int, void*) noexcept {
  return 0;
}

inline bool tls_iequal(std::string_view a, std::string_view b) noexcept {
  const auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c; };
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(),
                                            [&](char x, char y) { return lower(x) == lower(y); });
}

// The entry serving `host`: an exact name first, then "*.rest" for one label followed by ".rest".
// A linear scan: certificates per server are few, and this runs once per handshake.
inline const TlsCtxData::ServerName* tls_find_server_name(
    const std::vector<TlsCtxData::ServerName>& names, std::string_view host) noexcept {
  if (!host.empty() && host.back() == '.') host.remove_suffix(1);
  for (const auto& entry : names) {
    if (!entry.name.starts_with("*.") && tls_iequal(entry.name, host)) return &entry;
  }
  const std::size_t dot = host.find('.');
  if (dot == 0 || dot == std::string_view::npos) return nullptr;
  for (const auto& entry : names) {
    if (entry.name.starts_with("*.") &&
        tls_iequal(std::string_view(entry.name).substr(1), host.substr(dot))) {
      return &entry;
    }
  }
  return nullptr;
}

// SNI: moves the connection to the CTX of the certificate that serves the requested name; no name
// or no match keeps the default certificate.
inline int tls_servername_cb(SSL* ssl, int* alert, void* arg) noexcept {
  const char* host = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
  if (host == nullptr) return SSL_TLSEXT_ERR_NOACK;
  const auto* entry = tls_find_server_name(static_cast<const TlsCtxData*>(arg)->names, host);
  if (entry == nullptr) return SSL_TLSEXT_ERR_NOACK;
  if (SSL_set_SSL_CTX(ssl, entry->ctx) == nullptr) {
    *alert = SSL_AD_INTERNAL_ERROR;
    return SSL_TLSEXT_ERR_ALERT_FATAL;
  }
  return SSL_TLSEXT_ERR_OK;
}

// ALPN on a server: the server's most preferred protocol that the client offers; none in common
// fails the handshake with a no_application_protocol alert (RFC 7301 section 3.2).
inline int tls_alpn_select_cb(SSL*, const unsigned char** out, unsigned char* out_size,
                              const unsigned char* offered, unsigned int offered_size,
                              void* arg) noexcept {
  if (offered_size == 0) return SSL_TLSEXT_ERR_NOACK;
  const std::vector<unsigned char>& ours = static_cast<const TlsCtxData*>(arg)->alpn;
  for (std::size_t i = 0; i < ours.size(); i += 1u + ours[i]) {
    for (unsigned int j = 0; j + 1u + offered[j] <= offered_size; j += 1u + offered[j]) {
      if (offered[j] == ours[i] && std::memcmp(offered + j + 1, &ours[i + 1], ours[i]) == 0) {
        *out = offered + j + 1;
        *out_size = offered[j];
        return SSL_TLSEXT_ERR_OK;
      }
      if (j + 1u + offered[j] == offered_size) break;
    }
  }
  return SSL_TLSEXT_ERR_ALERT_FATAL;
}

// The names a certificate serves when none are configured: its subjectAltName DNS names, else
// its subject CN.
inline std::vector<std::string> tls_certificate_names(X509* leaf) {
  std::vector<std::string> names;
  if (leaf == nullptr) return names;
  const auto text = [](const ASN1_STRING* s) {
    return std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                       static_cast<std::size_t>(ASN1_STRING_length(s)));
  };
  const std::unique_ptr<GENERAL_NAMES, TlsFree<GENERAL_NAMES_free>> alt(
      static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(leaf, NID_subject_alt_name, nullptr, nullptr)));
  for (int i = 0; i < sk_GENERAL_NAME_num(alt.get()); ++i) {
    const GENERAL_NAME* name = sk_GENERAL_NAME_value(alt.get(), i);
    if (name->type == GEN_DNS) names.push_back(text(name->d.dNSName));
  }
  X509_NAME* subject = X509_get_subject_name(leaf);
  const int cn = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
  if (names.empty() && cn >= 0) {
    names.push_back(text(X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, cn))));
  }
  return names;
}

using BioPtr = std::unique_ptr<BIO, TlsFree<BIO_free>>;

inline BioPtr tls_memory_bio(const std::string& text) noexcept {
  return BioPtr(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())));
}

// Passes each certificate in the PEM text to `take(X509*, index)`, which returns false when it
// fails (the X509 is freed after it returns: it up-refs what it keeps). Returns how many there
// were, or -1 when the text holds none, is malformed or `take` failed.
template <class Take>
int tls_read_certificates(const std::string& pem, Take take) noexcept {
  const BioPtr bio = tls_memory_bio(pem);
  for (int count = 0; bio; ++count) {
    const std::unique_ptr<X509, TlsFree<X509_free>> certificate(
        PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
    if (!certificate) {
      // Reading past the last certificate fails with PEM_R_NO_START_LINE: only that ends well.
      const unsigned long err = ERR_peek_last_error();
      if (count == 0 || ERR_GET_LIB(err) != ERR_LIB_PEM ||
          ERR_GET_REASON(err) != PEM_R_NO_START_LINE) {
        return -1;
      }
      ERR_clear_error();
      return count;
    }
    if (!take(certificate.get(), count)) return -1;
  }
  return -1;
}

}  // namespace detail

// A certificate chain (leaf first) and its private key, from PEM files or PEM text in memory.
// Files are read each time a TlsContext is built or reloaded. Keys must not be encrypted.
class TlsCertificate {
 public:
  static TlsCertificate from_files(std::string chain_file, std::string key_file) {
    return {true, std::move(chain_file), std::move(key_file)};
  }
  static TlsCertificate from_pem(std::string chain_pem, std::string key_pem) {
    return {false, std::move(chain_pem), std::move(key_pem)};
  }

  // SNI names this certificate serves ("example.com", "*.example.com"); empty: the DNS names of
  // its subjectAltName (its CN when it has none).
  std::vector<std::string> server_names;

 private:
  friend class TlsContext;
  TlsCertificate(bool files, std::string chain, std::string key)
      : files_(files), chain_(std::move(chain)), key_(std::move(key)) {}

  bool files_;
  std::string chain_;  // a path when files_, else PEM text
  std::string key_;
};

struct TlsOptions {
  // Server: at least one; the first is the default (no SNI, or no name matches). Client: an
  // optional client certificate (the first).
  std::vector<TlsCertificate> certificates;
  TlsVerify verify = TlsVerify::kDefault;
  std::string ca_file;  // PEM bundle to verify the peer against; ca_pem: the same in memory;
  std::string ca_pem;   // both empty: the system's default store
  std::vector<std::string> alpn;  // protocols, preferred first ("h2", "http/1.1"); 1..255 bytes
  TlsVersion min_version = TlsVersion::k1_2;
  TlsVersion max_version = TlsVersion::k1_3;
  std::string cipher_list;   // TLS 1.2 ciphers (OpenSSL cipher list syntax); empty: the default
  std::string ciphersuites;  // TLS 1.3 suites; empty: the default
  bool ktls = true;          // ask OpenSSL for kernel TLS; used only where it is available
  std::chrono::milliseconds handshake_timeout{10000};  // 0: none
};

// The TLS settings of one role, shared by all the connections that use them. Movable, not
// copyable; moving or destroying it must not race with calls on it, while reload() and new_ssl()
// may run on different threads at once. Connections keep the settings they started with.
class TlsContext {
 public:
  // Throws std::system_error (a tls_category() code, or a system one for files) whose what()
  // names the step that failed ("tls: certificate chain /path", "tls: private key", ...).
  TlsContext(TlsRole role, const TlsOptions& options) : role_(role) {
    std::string what;
    const std::error_code ec = init(options, &what);
    detail::throw_if(ec, what.c_str());
  }
  // On failure sets `ec` and leaves the context empty (valid() false).
  TlsContext(TlsRole role, const TlsOptions& options, std::error_code& ec) noexcept : role_(role) {
    ec = init(options, nullptr);
  }
  static TlsContext server(const TlsOptions& options) { return {TlsRole::kServer, options}; }
  static TlsContext client(const TlsOptions& options = {}) { return {TlsRole::kClient, options}; }

  bool valid() const noexcept { return state_ != nullptr; }
  TlsRole role() const noexcept { return role_; }
  bool is_server() const noexcept { return role_ == TlsRole::kServer; }

  // Builds new settings from `options` (same role) and swaps them in atomically: handshakes that
  // start afterwards use them, existing connections keep theirs. Callable from any thread,
  // concurrently with new_ssl(). On failure returns the error and keeps the current settings.
  std::error_code reload(const TlsOptions& options) noexcept {
    if (!state_) return make_error_code(std::errc::invalid_argument);
    Generation next;
    if (const std::error_code ec = build(role_, options, next, nullptr)) return ec;
    {
      const std::lock_guard lock(state_->mutex);
      std::swap(state_->current, next);
      ++state_->generation;
    }
    return {};  // `next`, now the old generation, drops its CTX reference here, outside the lock
  }

  // 1 after construction, +1 per successful reload(); 0 when empty.
  std::uint64_t generation() const noexcept { return read(&State::generation, std::uint64_t{0}); }
  // The handshake timeout of the current settings.
  std::chrono::milliseconds handshake_timeout() const noexcept {
    return read([](const State& s) { return s.current.handshake_timeout; },
                std::chrono::milliseconds{0});
  }
  // Whether the current settings ask for kernel TLS.
  bool ktls() const noexcept {
    return read([](const State& s) { return s.current.ktls; }, false);
  }

  // For the transport: a new SSL for one connection on the current settings, in this context's
  // role (accept or connect state); the caller owns it (SSL_free). nullptr with `ec` set on
  // failure. Callable from any thread, concurrently with reload(). `handshake_timeout` and
  // `ktls`, if given, receive the same generation's settings.
  SSL* new_ssl(std::error_code& ec, std::chrono::milliseconds* handshake_timeout = nullptr,
               bool* ktls = nullptr) const noexcept {
    ec.clear();
    if (!state_) {
      ec = make_error_code(std::errc::invalid_argument);
      return nullptr;
    }
    SSL_CTX* ctx = nullptr;
    {
      // Only a reference under the lock: SSL_new itself runs outside it, so that reactors
      // accepting on several threads do not queue up behind one another.
      const std::lock_guard lock(state_->mutex);
      ctx = state_->current.ctx.get();
      SSL_CTX_up_ref(ctx);
      if (handshake_timeout != nullptr) *handshake_timeout = state_->current.handshake_timeout;
      if (ktls != nullptr) *ktls = state_->current.ktls;
    }
    SSL* const ssl = SSL_new(ctx);  // takes its own reference to the CTX
    SSL_CTX_free(ctx);
    if (ssl == nullptr) {
      ec = detail::tls_queue_error(make_error_code(std::errc::not_enough_memory));
      return nullptr;
    }
    if (is_server()) {
      SSL_set_accept_state(ssl);
    } else {
      SSL_set_connect_state(ssl);
    }
    return ssl;
  }

 private:
  // One generation of settings; immutable once built.
  struct Generation {
    detail::SslCtxPtr ctx;  // the default CTX; it owns the SNI table and the other CTXs
    std::chrono::milliseconds handshake_timeout{0};
    bool ktls = false;
  };
  struct State {
    mutable std::mutex mutex;  // guards the two members below
    Generation current;
    std::uint64_t generation = 1;
  };

  template <class Get, class T>
  T read(Get get, T if_empty) const noexcept {
    if (!state_) return if_empty;
    const std::lock_guard lock(state_->mutex);
    return std::invoke(get, *state_);
  }

  std::error_code init(const TlsOptions& options, std::string* what) noexcept {
    Generation first;
    if (const std::error_code ec = build(role_, options, first, what)) return ec;
    state_.reset(new (std::nothrow) State);
    if (!state_) return make_error_code(std::errc::not_enough_memory);
    state_->current = std::move(first);
    return {};
  }

  // Sets `*what` (when not nullptr) to the failed step and returns `ec`.
  static std::error_code fail(std::string* what, std::error_code ec, std::string_view step,
                              std::string_view name = {}) {
    if (what != nullptr) {
      *what = step;
      if (!name.empty()) *what += std::string(" ").append(name);
    }
    return ec;
  }
  static std::error_code queued(std::errc fallback) noexcept {
    return detail::tls_queue_error(make_error_code(fallback));
  }

  static std::error_code build(TlsRole role, const TlsOptions& options, Generation& out,
                               std::string* what) noexcept {
    try {
      ERR_clear_error();  // so that the first queued error is the cause of our failure
      const bool server = role == TlsRole::kServer;
      const auto invalid = make_error_code(std::errc::invalid_argument);
      if (server && options.certificates.empty()) {
        return fail(what, invalid, "tls: a server needs a certificate");
      }
      if (options.min_version > options.max_version) {
        return fail(what, invalid, "tls: protocol version");
      }
      std::vector<unsigned char> alpn;
      for (const std::string& protocol : options.alpn) {
        if (protocol.empty() || protocol.size() > 255) return fail(what, invalid, "tls: ALPN");
        alpn.push_back(static_cast<unsigned char>(protocol.size()));
        alpn.insert(alpn.end(), protocol.begin(), protocol.end());
      }
      const TlsCertificate* first =
          options.certificates.empty() ? nullptr : &options.certificates.front();
      detail::TlsCtxData* table = nullptr;
      if (auto ec = make_ctx(role, options, first, alpn, out.ctx, table, what)) return ec;

      if (server && options.certificates.size() > 1) {
        for (std::size_t i = 0; i < options.certificates.size(); ++i) {
          const TlsCertificate& certificate = options.certificates[i];
          SSL_CTX* ctx = out.ctx.get();
          if (i > 0) {
            detail::SslCtxPtr extra;
            detail::TlsCtxData* unused = nullptr;
            if (auto ec = make_ctx(role, options, &certificate, alpn, extra, unused, what)) {
              return ec;
            }
            ctx = extra.get();
            table->contexts.push_back(std::move(extra));
          }
          std::vector<std::string> names =
              certificate.server_names.empty()
                  ? detail::tls_certificate_names(SSL_CTX_get0_certificate(ctx))
                  : certificate.server_names;
          for (std::string& name : names) table->names.push_back({std::move(name), ctx});
        }
        SSL_CTX_set_tlsext_servername_callback(out.ctx.get(), &detail::tls_servername_cb);
        SSL_CTX_set_tlsext_servername_arg(out.ctx.get(), table);
      }
      out.handshake_timeout = options.handshake_timeout;
      out.ktls = options.ktls;
      return {};
    } catch (const std::bad_alloc&) {
      return make_error_code(std::errc::not_enough_memory);
    }
  }

  // One SSL_CTX with all of `options` applied and `certificate` (may be nullptr) loaded; `data`
  // receives the TlsCtxData it owns.
  static std::error_code make_ctx(TlsRole role, const TlsOptions& options,
                                  const TlsCertificate* certificate,
                                  const std::vector<unsigned char>& alpn, detail::SslCtxPtr& out,
                                  detail::TlsCtxData*& data, std::string* what) {
    const bool server = role == TlsRole::kServer;
    detail::SslCtxPtr ctx(SSL_CTX_new(TLS_method()));
    if (!ctx) return fail(what, queued(std::errc::not_enough_memory), "tls: SSL_CTX_new");
    auto owned = std::make_unique<detail::TlsCtxData>();
    const int index = detail::tls_ctx_data_index();
    if (index < 0 || SSL_CTX_set_ex_data(ctx.get(), index, owned.get()) != 1) {
      return fail(what, queued(std::errc::not_enough_memory), "tls: SSL_CTX_set_ex_data");
    }
    data = owned.release();
    if (SSL_CTX_set_min_proto_version(ctx.get(), static_cast<int>(options.min_version)) != 1 ||
        SSL_CTX_set_max_proto_version(ctx.get(), static_cast<int>(options.max_version)) != 1) {
      return fail(what, queued(std::errc::invalid_argument), "tls: protocol version");
    }
    SSL_CTX_set_mode(ctx.get(), SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ENABLE_PARTIAL_WRITE |
                                    SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    // Without IGNORE_UNEXPECTED_EOF an EOF before close_notify is an error: TlsError::kTruncated.
    SSL_CTX_clear_options(ctx.get(), SSL_OP_IGNORE_UNEXPECTED_EOF);
    SSL_CTX_set_options(ctx.get(), SSL_OP_NO_RENEGOTIATION);
    if (options.ktls) SSL_CTX_set_options(ctx.get(), SSL_OP_ENABLE_KTLS);
    SSL_CTX_set_default_passwd_cb(ctx.get(), &detail::tls_no_passphrase);
    if (!options.cipher_list.empty() &&
        SSL_CTX_set_cipher_list(ctx.get(), options.cipher_list.c_str()) != 1) {
      return fail(what, queued(std::errc::invalid_argument), "tls: cipher list");
    }
    if (!options.ciphersuites.empty() &&
        SSL_CTX_set_ciphersuites(ctx.get(), options.ciphersuites.c_str()) != 1) {
      return fail(what, queued(std::errc::invalid_argument), "tls: ciphersuites");
    }
    if (certificate != nullptr) {
      if (auto ec = load_certificate(ctx.get(), *certificate, what)) return ec;
    }
    const bool verify =
        server ? options.verify == TlsVerify::kRequired : options.verify != TlsVerify::kNone;
    if (verify) {
      if (auto ec = load_ca(ctx.get(), options, what)) return ec;
      SSL_CTX_set_verify(ctx.get(),
                         SSL_VERIFY_PEER | (server ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0), nullptr);
    } else {
      SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_NONE, nullptr);
    }
    if (server) {
      // Resuming a session whose client certificate was verified needs a session id context.
      static constexpr unsigned char kSessionContext[] = "reactor";
      SSL_CTX_set_session_id_context(ctx.get(), kSessionContext, sizeof kSessionContext - 1);
      if (!alpn.empty()) {
        data->alpn = alpn;
        SSL_CTX_set_alpn_select_cb(ctx.get(), &detail::tls_alpn_select_cb, data);
      }
    } else if (!alpn.empty() &&
               SSL_CTX_set_alpn_protos(ctx.get(), alpn.data(),
                                       static_cast<unsigned int>(alpn.size())) != 0) {
      return fail(what, queued(std::errc::not_enough_memory), "tls: ALPN");
    }
    out = std::move(ctx);
    return {};
  }

  static std::error_code load_certificate(SSL_CTX* ctx, const TlsCertificate& certificate,
                                          std::string* what) {
    const auto invalid = std::errc::invalid_argument;
    const std::string_view origin = certificate.files_ ? std::string_view{} : "(PEM)";
    if (certificate.files_) {
      if (SSL_CTX_use_certificate_chain_file(ctx, certificate.chain_.c_str()) != 1) {
        return fail(what, queued(invalid), "tls: certificate chain", certificate.chain_);
      }
    } else if (detail::tls_read_certificates(certificate.chain_, [&](X509* x, int index) {
                 return (index == 0 ? SSL_CTX_use_certificate(ctx, x)
                                    : SSL_CTX_add1_chain_cert(ctx, x)) == 1;
               }) < 0) {
      return fail(what, queued(invalid), "tls: certificate chain", origin);
    }
    bool key_loaded = false;
    if (certificate.files_) {
      key_loaded =
          SSL_CTX_use_PrivateKey_file(ctx, certificate.key_.c_str(), SSL_FILETYPE_PEM) == 1;
    } else {
      const detail::BioPtr bio = detail::tls_memory_bio(certificate.key_);
      const std::unique_ptr<EVP_PKEY, detail::TlsFree<EVP_PKEY_free>> key(
          bio ? PEM_read_bio_PrivateKey(bio.get(), nullptr, &detail::tls_no_passphrase, nullptr)
              : nullptr);
      key_loaded = key && SSL_CTX_use_PrivateKey(ctx, key.get()) == 1;
    }
    if (!key_loaded) {
      // SSL_CTX_use_PrivateKey() itself rejects a key of the certificate's type that differs.
      const unsigned long err = ERR_peek_last_error();
      if (ERR_GET_LIB(err) == ERR_LIB_X509 && ERR_GET_REASON(err) == X509_R_KEY_VALUES_MISMATCH) {
        return fail(what, queued(invalid), "tls: key does not match certificate");
      }
      return fail(what, queued(invalid), "tls: private key",
                  certificate.files_ ? std::string_view(certificate.key_) : origin);
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
      return fail(what, queued(invalid), "tls: key does not match certificate");
    }
    return {};
  }

  static std::error_code load_ca(SSL_CTX* ctx, const TlsOptions& options, std::string* what) {
    const auto invalid = std::errc::invalid_argument;
    if (!options.ca_file.empty() && SSL_CTX_load_verify_file(ctx, options.ca_file.c_str()) != 1) {
      return fail(what, queued(invalid), "tls: CA file", options.ca_file);
    }
    X509_STORE* store = SSL_CTX_get_cert_store(ctx);
    if (!options.ca_pem.empty() && detail::tls_read_certificates(options.ca_pem, [&](X509* x, int) {
                                     return X509_STORE_add_cert(store, x) == 1;
                                   }) < 0) {
      return fail(what, queued(invalid), "tls: CA PEM");
    }
    if (options.ca_file.empty() && options.ca_pem.empty() &&
        SSL_CTX_set_default_verify_paths(ctx) != 1) {
      return fail(what, queued(invalid), "tls: default CA store");
    }
    return {};
  }

  TlsRole role_;
  std::unique_ptr<State> state_;  // nullptr: empty (construction failed, or moved from)
};

}  // namespace reactor

template <>
struct std::is_error_code_enum<reactor::TlsError> : std::true_type {};
