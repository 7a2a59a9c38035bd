// Tests for include/reactor/tls_context.hpp: building, reloading and failing TLS contexts, and the
// SNI, ALPN, verification and version settings they give two SSL objects that handshake in memory.
#include <reactor/tls_context.hpp>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "catch.hpp"
#include "tls_certs.hpp"

using reactor::TlsCertificate;
using reactor::TlsContext;
using reactor::TlsOptions;
using reactor::TlsRole;
using reactor::TlsVerify;
using reactor::TlsVersion;
using reactor_test::client_options;
using reactor_test::Pem;
using reactor_test::server_options;
using reactor_test::TestCa;

namespace {

using SslPtr = std::unique_ptr<SSL, reactor::detail::TlsFree<SSL_free>>;

SslPtr new_ssl(const TlsContext& context) {
  std::error_code ec;
  SslPtr ssl(context.new_ssl(ec));
  REQUIRE(ssl != nullptr);
  REQUIRE(!ec);
  return ssl;
}

// The outcome of one in-memory handshake.
struct Handshake {
  bool client_done = false;
  bool server_done = false;
  std::error_code client_error;
  std::error_code server_error;
  SslPtr client;
  SslPtr server;

  bool ok() const { return client_done && server_done; }
  // The CN of the certificate the server presented, as the client saw it.
  std::string server_cn() const {
    const std::unique_ptr<X509, reactor::detail::TlsFree<X509_free>> peer(
        SSL_get1_peer_certificate(client.get()));
    if (!peer) return "";
    char cn[256] = "";
    X509_NAME_get_text_by_NID(X509_get_subject_name(peer.get()), NID_commonName, cn, sizeof cn);
    return cn;
  }
  std::string alpn() const {
    const unsigned char* protocol = nullptr;
    unsigned int size = 0;
    SSL_get0_alpn_selected(client.get(), &protocol, &size);
    return std::string(reinterpret_cast<const char*>(protocol), size);
  }
};

// Handshakes a client SSL (asking for `sni` unless empty) with a server SSL over a BIO pair,
// stepping both until each has finished or failed. Errors are taken right after the call that
// failed: both sides share this thread's OpenSSL error queue.
Handshake handshake(SslPtr client, SslPtr server, const std::string& sni = "") {
  Handshake h;
  h.client = std::move(client);
  h.server = std::move(server);
  BIO* client_bio = nullptr;
  BIO* server_bio = nullptr;
  REQUIRE(BIO_new_bio_pair(&client_bio, 0, &server_bio, 0) == 1);
  SSL_set_bio(h.client.get(), client_bio, client_bio);
  SSL_set_bio(h.server.get(), server_bio, server_bio);
  if (!sni.empty()) REQUIRE(SSL_set_tlsext_host_name(h.client.get(), sni.c_str()) == 1);
  const auto step = [](SSL* ssl, bool& done, std::error_code& error) {
    if (done || error) return;
    const int rc = SSL_do_handshake(ssl);
    if (rc == 1) {
      done = true;
    } else if (const int why = SSL_get_error(ssl, rc);
               why != SSL_ERROR_WANT_READ && why != SSL_ERROR_WANT_WRITE) {
      error = reactor::detail::tls_take_error(ssl, 0);
    }
  };
  for (int round = 0; round < 20 && !h.ok(); ++round) {
    step(h.client.get(), h.client_done, h.client_error);
    step(h.server.get(), h.server_done, h.server_error);
  }
  return h;
}

std::string what_of(TlsRole role, const TlsOptions& options) {
  try {
    TlsContext context(role, options);
  } catch (const std::system_error& e) {
    return e.what();
  }
  return "no exception";
}

std::error_code error_of(TlsRole role, const TlsOptions& options) {
  std::error_code ec;
  const TlsContext context(role, options, ec);
  CHECK(context.valid() == !ec);
  return ec;
}

}  // namespace

TEST_CASE("a server context builds from PEM text and from PEM files", "[tls_context]") {
  const TestCa ca;
  const Pem leaf = ca.issue({"localhost"});
  const TlsContext from_pem = TlsContext::server(server_options(leaf));
  CHECK(from_pem.valid());
  CHECK(from_pem.is_server());
  CHECK(from_pem.role() == TlsRole::kServer);
  CHECK(from_pem.generation() == 1);
  CHECK(from_pem.handshake_timeout() == std::chrono::milliseconds(10000));
  CHECK(from_pem.ktls());

  const reactor_test::TempDir dir;
  TlsOptions files;
  files.certificates.push_back(TlsCertificate::from_files(dir.write("chain.pem", leaf.certificate),
                                                          dir.write("key.pem", leaf.key)));
  files.handshake_timeout = std::chrono::milliseconds(250);
  files.ktls = false;
  const TlsContext from_files = TlsContext::server(files);
  CHECK(from_files.valid());
  CHECK(from_files.handshake_timeout() == std::chrono::milliseconds(250));
  CHECK_FALSE(from_files.ktls());

  const Handshake h =
      handshake(new_ssl(TlsContext::client(client_options(ca))), new_ssl(from_files));
  CHECK(h.ok());
  CHECK(h.server_cn() == "localhost");
}

TEST_CASE("a chain file with an intermediate after the leaf is sent whole", "[tls_context]") {
  // The intermediate is a second CA whose certificate the client trusts only through the chain.
  const TestCa root;
  const TestCa other;
  const Pem leaf = root.issue({"chain.test"});
  TlsOptions options;
  options.certificates.push_back(
      TlsCertificate::from_pem(leaf.certificate + other.certificate_pem(), leaf.key));
  const TlsContext server = TlsContext::server(options);
  STACK_OF(X509)* chain = nullptr;
  SslPtr ssl = new_ssl(server);
  REQUIRE(SSL_get0_chain_certs(ssl.get(), &chain) == 1);
  CHECK(sk_X509_num(chain) == 1);
}

TEST_CASE("a missing certificate file fails naming the file with ENOENT", "[tls_context][errors]") {
  const TestCa ca;
  const Pem leaf = ca.issue({"localhost"});
  const reactor_test::TempDir dir;
  TlsOptions options;
  options.certificates.push_back(
      TlsCertificate::from_files(dir.path() + "/missing.pem", dir.write("key.pem", leaf.key)));
  CHECK(what_of(TlsRole::kServer, options)
            .find("tls: certificate chain " + dir.path() + "/missing.pem") != std::string::npos);
  const std::error_code ec = error_of(TlsRole::kServer, options);
  CHECK(ec == std::errc::no_such_file_or_directory);
  CHECK(ec.category() == std::system_category());

  options.certificates[0] =
      TlsCertificate::from_files(dir.write("chain.pem", leaf.certificate), dir.path() + "/nokey");
  CHECK(what_of(TlsRole::kServer, options).find("tls: private key " + dir.path() + "/nokey") !=
        std::string::npos);
  CHECK(error_of(TlsRole::kServer, options) == std::errc::no_such_file_or_directory);
}

TEST_CASE("a key that does not match the certificate is rejected", "[tls_context][errors]") {
  const TestCa ca;
  const Pem one = ca.issue({"one.test"});
  const Pem two = ca.issue({"two.test"});
  TlsOptions options;
  options.certificates.push_back(TlsCertificate::from_pem(one.certificate, two.key));
  CHECK(what_of(TlsRole::kServer, options).find("tls: key does not match certificate") !=
        std::string::npos);
  const std::error_code ec = error_of(TlsRole::kServer, options);
  CHECK(ec.category() == reactor::tls_category());
  CHECK(ERR_GET_REASON(static_cast<unsigned long>(ec.value())) == X509_R_KEY_VALUES_MISMATCH);
  CHECK(ec.message().find("key values mismatch") != std::string::npos);

  options.certificates[0] = TlsCertificate::from_pem(one.certificate, "not a key");
  CHECK(what_of(TlsRole::kServer, options).find("tls: private key") != std::string::npos);
  CHECK(error_of(TlsRole::kServer, options).category() == reactor::tls_category());

  options.certificates[0] = TlsCertificate::from_pem("not a certificate", one.key);
  CHECK(what_of(TlsRole::kServer, options).find("tls: certificate chain") != std::string::npos);
}

TEST_CASE("a server without a certificate is an invalid argument", "[tls_context][errors]") {
  CHECK(what_of(TlsRole::kServer, {}).find("tls: a server needs a certificate") !=
        std::string::npos);
  const std::error_code ec = error_of(TlsRole::kServer, {});
  CHECK(ec == std::errc::invalid_argument);
  CHECK_THROWS_AS(TlsContext::server({}), std::system_error);
}

TEST_CASE("a client builds with an in-memory CA and rejects a CA text without certificates",
          "[tls_context]") {
  const TestCa ca;
  const TlsContext client = TlsContext::client(client_options(ca));
  CHECK(client.valid());
  CHECK_FALSE(client.is_server());
  CHECK(TlsContext::client().valid());  // the system's default store

  TlsOptions garbage;
  garbage.ca_pem = "no certificates here";
  CHECK(what_of(TlsRole::kClient, garbage).find("tls: CA PEM") != std::string::npos);
  TlsOptions missing;
  missing.ca_file = "/nonexistent/reactor-ca.pem";
  CHECK(what_of(TlsRole::kClient, missing).find("tls: CA file /nonexistent/reactor-ca.pem") !=
        std::string::npos);
  CHECK(error_of(TlsRole::kClient, missing));
  missing.verify = TlsVerify::kNone;  // the CA is read only by a side that verifies
  CHECK_FALSE(error_of(TlsRole::kClient, missing));
}

TEST_CASE("ALPN names must be 1 to 255 bytes and cipher lists must parse",
          "[tls_context][errors]") {
  TlsOptions options;
  options.alpn = {"h2", std::string(256, 'x')};
  CHECK(what_of(TlsRole::kClient, options).find("tls: ALPN") != std::string::npos);
  CHECK(error_of(TlsRole::kClient, options) == std::errc::invalid_argument);
  options.alpn = {""};
  CHECK(error_of(TlsRole::kClient, options) == std::errc::invalid_argument);
  options.alpn = {std::string(255, 'x')};
  CHECK_FALSE(error_of(TlsRole::kClient, options));

  TlsOptions ciphers;
  ciphers.cipher_list = "NO-SUCH-CIPHER";
  CHECK(what_of(TlsRole::kClient, ciphers).find("tls: cipher list") != std::string::npos);
  CHECK(error_of(TlsRole::kClient, ciphers).category() == reactor::tls_category());
  ciphers.cipher_list.clear();
  ciphers.ciphersuites = "TLS_NO_SUCH_SUITE";
  CHECK(what_of(TlsRole::kClient, ciphers).find("tls: ciphersuites") != std::string::npos);
  ciphers.ciphersuites.clear();
  ciphers.min_version = TlsVersion::k1_3;
  ciphers.max_version = TlsVersion::k1_2;
  CHECK(error_of(TlsRole::kClient, ciphers) == std::errc::invalid_argument);
}

TEST_CASE("the error_code constructor leaves an empty context on failure",
          "[tls_context][errors]") {
  std::error_code ec;
  TlsContext context(TlsRole::kServer, {}, ec);
  CHECK(ec == std::errc::invalid_argument);
  CHECK_FALSE(context.valid());
  CHECK(context.generation() == 0);
  CHECK(context.handshake_timeout() == std::chrono::milliseconds(0));
  CHECK(context.new_ssl(ec) == nullptr);
  CHECK(ec == std::errc::invalid_argument);
  CHECK(context.reload({}) == std::errc::invalid_argument);
  CHECK(ERR_peek_error() == 0);
}

TEST_CASE("new_ssl gives an SSL in the context's role", "[tls_context]") {
  const TestCa ca;
  const TlsContext server = TlsContext::server(server_options(ca.issue({"localhost"})));
  const TlsContext client = TlsContext::client(client_options(ca));
  CHECK(SSL_is_server(new_ssl(server).get()) == 1);
  CHECK(SSL_is_server(new_ssl(client).get()) == 0);
}

TEST_CASE("reload swaps the generation and a failed reload keeps the old one", "[tls_context]") {
  const TestCa ca;
  TlsContext server = TlsContext::server(server_options(ca.issue({"old.test"})));
  SslPtr started_before = new_ssl(server);

  TlsOptions next = server_options(ca.issue({"new.test"}));
  next.handshake_timeout = std::chrono::milliseconds(500);
  CHECK_FALSE(server.reload(next));
  CHECK(server.generation() == 2);
  CHECK(server.handshake_timeout() == std::chrono::milliseconds(500));

  const TlsContext client = TlsContext::client(client_options(ca));
  CHECK(handshake(new_ssl(client), std::move(started_before)).server_cn() == "old.test");
  CHECK(handshake(new_ssl(client), new_ssl(server)).server_cn() == "new.test");

  CHECK(server.reload({}) == std::errc::invalid_argument);
  TlsOptions broken;
  broken.certificates.push_back(TlsCertificate::from_pem("garbage", ca.issue({"x.test"}).key));
  CHECK(server.reload(broken).category() == reactor::tls_category());
  CHECK(server.generation() == 2);
  CHECK(server.handshake_timeout() == std::chrono::milliseconds(500));
  CHECK(handshake(new_ssl(client), new_ssl(server)).server_cn() == "new.test");
  CHECK(ERR_peek_error() == 0);
}

TEST_CASE("a moved context keeps its generation and SSLs outlive their context", "[tls_context]") {
  const TestCa ca;
  TlsContext first = TlsContext::server(server_options(ca.issue({"moved.test"})));
  const TlsContext second = std::move(first);
  CHECK_FALSE(first.valid());  // NOLINT(bugprone-use-after-move): moved-from is empty
  CHECK(second.generation() == 1);

  SslPtr orphan;
  {
    const TlsContext gone = TlsContext::server(server_options(ca.issue({"gone.test"})));
    orphan = new_ssl(gone);
  }
  const TlsContext client = TlsContext::client(client_options(ca));
  CHECK(handshake(new_ssl(client), std::move(orphan)).server_cn() == "gone.test");
}

TEST_CASE("SNI picks the exact name then a one-label wildcard then the default",
          "[tls_context][sni]") {
  const TestCa ca;
  TlsOptions options = server_options(ca.issue({"default.test"}));
  for (const char* name : {"exact.test", "*.wild.test", "special.wild.test"}) {
    const Pem pem = ca.issue({name});
    options.certificates.push_back(TlsCertificate::from_pem(pem.certificate, pem.key));
  }
  const Pem renamed = ca.issue({"san.test"});
  options.certificates.push_back(TlsCertificate::from_pem(renamed.certificate, renamed.key));
  options.certificates.back().server_names = {"configured.test"};
  const TlsContext server = TlsContext::server(options);
  const TlsContext client = TlsContext::client(client_options(ca));

  const auto served = [&](const std::string& sni) {
    const Handshake h = handshake(new_ssl(client), new_ssl(server), sni);
    CHECK(h.ok());
    return h.server_cn();
  };
  CHECK(served("exact.test") == "exact.test");
  CHECK(served("EXACT.Test") == "exact.test");
  CHECK(served("a.wild.test") == "*.wild.test");
  CHECK(served("special.wild.test") == "special.wild.test");
  CHECK(served("a.b.wild.test") == "default.test");
  CHECK(served("wild.test") == "default.test");
  CHECK(served("unknown.test") == "default.test");
  CHECK(served("") == "default.test");
  CHECK(served("configured.test") == "san.test");
  CHECK(served("san.test") == "default.test");  // configured names replace the certificate's
  CHECK(served("default.test") == "default.test");

  // A connection started before a reload still reaches the old SNI table.
  SslPtr before = new_ssl(server);
  TlsContext reloaded = TlsContext::server(options);
  SslPtr old_generation = new_ssl(reloaded);
  REQUIRE_FALSE(reloaded.reload(server_options(ca.issue({"only.test"}))));
  CHECK(handshake(new_ssl(client), std::move(old_generation), "exact.test").server_cn() ==
        "exact.test");
  CHECK(handshake(new_ssl(client), new_ssl(reloaded), "exact.test").server_cn() == "only.test");
}

TEST_CASE("ALPN chooses the server's preference and no overlap fails the handshake",
          "[tls_context][alpn]") {
  const TestCa ca;
  TlsOptions server_side = server_options(ca.issue({"localhost"}));
  server_side.alpn = {"h2", "http/1.1"};
  const TlsContext server = TlsContext::server(server_side);

  TlsOptions client_side = client_options(ca);
  client_side.alpn = {"http/1.1", "h2"};
  Handshake h = handshake(new_ssl(TlsContext::client(client_side)), new_ssl(server));
  CHECK(h.ok());
  CHECK(h.alpn() == "h2");

  client_side.alpn = {"spdy/3", "http/1.1"};
  h = handshake(new_ssl(TlsContext::client(client_side)), new_ssl(server));
  CHECK(h.ok());
  CHECK(h.alpn() == "http/1.1");

  client_side.alpn = {};
  h = handshake(new_ssl(TlsContext::client(client_side)), new_ssl(server));
  CHECK(h.ok());
  CHECK(h.alpn().empty());

  client_side.alpn = {"spdy/3"};
  h = handshake(new_ssl(TlsContext::client(client_side)), new_ssl(server));
  CHECK_FALSE(h.client_done);
  CHECK_FALSE(h.server_done);
  REQUIRE(h.client_error.category() == reactor::tls_category());
  CHECK(ERR_GET_REASON(static_cast<unsigned long>(h.client_error.value())) ==
        SSL_R_TLSV1_ALERT_NO_APPLICATION_PROTOCOL);
  REQUIRE(h.server_error.category() == reactor::tls_category());
  CHECK(ERR_GET_REASON(static_cast<unsigned long>(h.server_error.value())) ==
        SSL_R_NO_APPLICATION_PROTOCOL);
}

TEST_CASE("a certificate from an unknown CA fails verification in the verify category",
          "[tls_context][verify]") {
  const TestCa ca;
  const TestCa stranger;
  const TlsContext server = TlsContext::server(server_options(stranger.issue({"localhost"})));
  const Handshake h = handshake(new_ssl(TlsContext::client(client_options(ca))), new_ssl(server));
  CHECK_FALSE(h.client_done);
  REQUIRE(h.client_error.category() == reactor::tls_verify_category());
  CHECK(h.client_error.value() == X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY);
  CHECK(h.client_error.message() == "unable to get local issuer certificate");
  CHECK(h.server_error);

  TlsOptions trusting = client_options(ca);
  trusting.verify = TlsVerify::kNone;
  CHECK(handshake(new_ssl(TlsContext::client(trusting)), new_ssl(server)).ok());
}

TEST_CASE("an expired certificate fails with X509_V_ERR_CERT_HAS_EXPIRED",
          "[tls_context][verify]") {
  const TestCa ca;
  const Pem expired =
      ca.issue({"localhost"}, {"127.0.0.1"}, reactor_test::KeyType::kEcdsaP256, true);
  const Handshake h = handshake(new_ssl(TlsContext::client(client_options(ca))),
                                new_ssl(TlsContext::server(server_options(expired))));
  REQUIRE(h.client_error.category() == reactor::tls_verify_category());
  CHECK(h.client_error.value() == X509_V_ERR_CERT_HAS_EXPIRED);
}

TEST_CASE("a server that requires a client certificate verifies it", "[tls_context][verify]") {
  const TestCa ca;
  TlsOptions server_side = server_options(ca.issue({"localhost"}));
  server_side.verify = TlsVerify::kRequired;
  server_side.ca_pem = ca.certificate_pem();
  const TlsContext server = TlsContext::server(server_side);

  TlsOptions with_certificate = client_options(ca);
  const Pem client_leaf = ca.issue({"client.test"}, {}, reactor_test::KeyType::kRsa2048);
  with_certificate.certificates.push_back(
      TlsCertificate::from_pem(client_leaf.certificate, client_leaf.key));
  Handshake h = handshake(new_ssl(TlsContext::client(with_certificate)), new_ssl(server));
  CHECK(h.ok());
  CHECK(SSL_get_verify_result(h.server.get()) == X509_V_OK);

  h = handshake(new_ssl(TlsContext::client(client_options(ca))), new_ssl(server));
  CHECK_FALSE(h.server_done);
  REQUIRE(h.server_error.category() == reactor::tls_category());
  CHECK(ERR_GET_REASON(static_cast<unsigned long>(h.server_error.value())) ==
        SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE);
}

TEST_CASE("TLS 1.2 only meets TLS 1.3 only in failure and 1.2 when both allow it",
          "[tls_context][version]") {
  const TestCa ca;
  TlsOptions server_side = server_options(ca.issue({"localhost"}));
  server_side.max_version = TlsVersion::k1_2;
  const TlsContext server = TlsContext::server(server_side);

  TlsOptions modern = client_options(ca);
  modern.min_version = TlsVersion::k1_3;
  Handshake h = handshake(new_ssl(TlsContext::client(modern)), new_ssl(server));
  CHECK_FALSE(h.ok());
  CHECK(h.client_error.category() == reactor::tls_category());
  CHECK(h.server_error.category() == reactor::tls_category());

  h = handshake(new_ssl(TlsContext::client(client_options(ca))), new_ssl(server));
  CHECK(h.ok());
  CHECK(SSL_version(h.client.get()) == TLS1_2_VERSION);
  h = handshake(new_ssl(TlsContext::client(client_options(ca))),
                new_ssl(TlsContext::server(server_options(ca.issue({"localhost"})))));
  CHECK(SSL_version(h.client.get()) == TLS1_3_VERSION);
}

TEST_CASE("tls_take_error reports the first queued error then errno then a fallback",
          "[tls_context][errors]") {
  ERR_raise(ERR_LIB_SSL, SSL_R_BAD_PACKET);
  ERR_raise(ERR_LIB_SSL, SSL_R_BAD_LENGTH);
  std::error_code ec = reactor::detail::tls_take_error(nullptr, ECONNRESET);
  CHECK(ec.category() == reactor::tls_category());
  CHECK(ERR_GET_REASON(static_cast<unsigned long>(ec.value())) == SSL_R_BAD_PACKET);
  CHECK(ec.message() == "SSL routines: bad packet");
  CHECK(ERR_peek_error() == 0);

  ec = reactor::detail::tls_take_error(nullptr, ECONNRESET);
  CHECK(ec == std::errc::connection_reset);
  ec = reactor::detail::tls_take_error(nullptr, 0);
  CHECK(ec == reactor::TlsError::kHandshakeFailed);
  CHECK(ec.message() == "TLS handshake failed");
  CHECK(std::error_code(reactor::TlsError::kTruncated).message() ==
        "peer closed the connection without close_notify: data may be truncated");
  CHECK(std::string(reactor::tls_category().name()) == "reactor.tls");
  CHECK(std::string(reactor::tls_verify_category().name()) == "reactor.tls.verify");
  CHECK(std::string(ec.category().name()) == "reactor.tls.error");
}

// Labelled [concurrency] so that a ThreadSanitizer build can run it alone.
TEST_CASE("reload on one thread races new_ssl on another without harm",
          "[tls_context][concurrency]") {
  const TestCa ca;
  const Pem first = ca.issue({"first.test"});
  const Pem second = ca.issue({"second.test", "*.second.test"});
  TlsOptions options = server_options(first);
  options.certificates.push_back(TlsCertificate::from_pem(second.certificate, second.key));
  TlsContext server = TlsContext::server(options);

  std::atomic<int> reload_failures{0};
  std::thread reloader([&] {
    for (int i = 0; i < 200; ++i) {
      if (server.reload(options)) ++reload_failures;
    }
  });
  int null_ssls = 0;
  int wrong_roles = 0;
  for (int i = 0; i < 2000; ++i) {
    std::error_code ec;
    SSL* ssl = server.new_ssl(ec);
    if (ssl == nullptr || ec) {
      ++null_ssls;
      continue;
    }
    if (SSL_is_server(ssl) != 1) ++wrong_roles;
    SSL_free(ssl);
  }
  reloader.join();
  CHECK(reload_failures == 0);
  CHECK(null_ssls == 0);
  CHECK(wrong_roles == 0);
  CHECK(server.generation() == 201);
  const Handshake h =
      handshake(new_ssl(TlsContext::client(client_options(ca))), new_ssl(server), "x.second.test");
  CHECK(h.server_cn() == "second.test");
}
