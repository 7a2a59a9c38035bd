// Test-only: throw-away certificates made in memory with OpenSSL at test time (no committed keys,
// no openssl command): a test CA and the leaf certificates it issues for DNS names and IP
// addresses; TLS options for a server or client built on them; and TempDir, a temporary directory
// for tests that need PEM files.
#pragma once

#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <stdlib.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include <reactor/tls_context.hpp>

namespace reactor_test {

enum class KeyType { kEcdsaP256, kRsa2048 };

struct Pem {
  std::string certificate;
  std::string key;
};

namespace detail {

using reactor::detail::TlsFree;
using KeyPtr = std::unique_ptr<EVP_PKEY, TlsFree<EVP_PKEY_free>>;
using X509Ptr = std::unique_ptr<X509, TlsFree<X509_free>>;
using BioPtr = std::unique_ptr<BIO, TlsFree<BIO_free>>;

// Throws std::runtime_error naming `step` and OpenSSL's first queued error unless `ok`.
inline void check(bool ok, const char* step) {
  if (ok) return;
  char reason[256] = "no OpenSSL error";
  if (const unsigned long err = ERR_get_error(); err != 0) ERR_error_string_n(err, reason, 256);
  ERR_clear_error();
  throw std::runtime_error(std::string("tls_certs: ") + step + ": " + reason);
}

inline KeyPtr generate_key(KeyType type) {
  KeyPtr key(type == KeyType::kRsa2048 ? EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", size_t{2048})
                                       : EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
  check(key != nullptr, "key generation");
  return key;
}

inline std::string to_pem(int (*write)(BIO*, void*), void* object) {
  const BioPtr bio(BIO_new(BIO_s_mem()));
  check(bio && write(bio.get(), object) == 1, "PEM encoding");
  char* data = nullptr;
  const long size = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<std::size_t>(size));
}

inline std::string key_pem(EVP_PKEY* key) {
  return to_pem(
      [](BIO* bio, void* k) {
        return PEM_write_bio_PrivateKey(bio, static_cast<EVP_PKEY*>(k), nullptr, nullptr, 0,
                                        nullptr, nullptr);
      },
      key);
}

inline std::string certificate_pem(X509* certificate) {
  return to_pem([](BIO* bio, void* c) { return PEM_write_bio_X509(bio, static_cast<X509*>(c)); },
                certificate);
}

inline void add_extension(X509* certificate, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, issuer, certificate, nullptr, nullptr, 0);
  X509_EXTENSION* extension = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
  check(extension != nullptr, "certificate extension");
  const int added = X509_add_ext(certificate, extension, -1);
  X509_EXTENSION_free(extension);
  check(added == 1, "certificate extension");
}

// An unsigned certificate for `key` named `cn`, issued by `issuer` (nullptr: by itself), valid
// from now-1h to now+1d, or (expired) from now-2d to now-1d.
inline X509Ptr make_certificate(EVP_PKEY* key, const std::string& cn, X509* issuer, bool expired) {
  X509Ptr certificate(X509_new());
  check(certificate != nullptr, "X509_new");
  X509* const c = certificate.get();
  check(X509_set_version(c, X509_VERSION_3) == 1, "version");
  const std::unique_ptr<BIGNUM, TlsFree<BN_free>> serial(BN_new());
  check(serial && BN_rand(serial.get(), 63, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY) == 1, "serial");
  check(BN_to_ASN1_INTEGER(serial.get(), X509_get_serialNumber(c)) != nullptr, "serial");
  const long day = 24L * 3600;
  X509_gmtime_adj(X509_getm_notBefore(c), expired ? -2 * day : -3600);
  X509_gmtime_adj(X509_getm_notAfter(c), expired ? -day : day);
  X509_NAME* subject = X509_get_subject_name(c);
  check(X509_NAME_add_entry_by_txt(subject, "CN", MBSTRING_UTF8,
                                   reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1,
                                   0) == 1,
        "subject");
  check(X509_set_issuer_name(c, issuer ? X509_get_subject_name(issuer) : subject) == 1, "issuer");
  check(X509_set_pubkey(c, key) == 1, "public key");
  add_extension(c, issuer ? issuer : c, NID_subject_key_identifier, "hash");
  add_extension(c, issuer ? issuer : c, NID_authority_key_identifier, "keyid:always");
  return certificate;
}

inline void sign(X509* certificate, EVP_PKEY* key) {
  check(X509_sign(certificate, key, EVP_sha256()) > 0, "signature");
}

}  // namespace detail

// A certificate authority for tests: a fresh key and a self-signed CA:TRUE certificate.
class TestCa {
 public:
  explicit TestCa(KeyType type = KeyType::kEcdsaP256, const std::string& cn = "reactor test CA")
      : key_(detail::generate_key(type)) {
    certificate_ = detail::make_certificate(key_.get(), cn, nullptr, false);
    detail::add_extension(certificate_.get(), certificate_.get(), NID_basic_constraints,
                          "critical,CA:TRUE");
    detail::add_extension(certificate_.get(), certificate_.get(), NID_key_usage,
                          "critical,keyCertSign,cRLSign");
    detail::sign(certificate_.get(), key_.get());
    pem_ = detail::certificate_pem(certificate_.get());
  }

  const std::string& certificate_pem() const { return pem_; }

  // A leaf certificate and its new key for `dns_names` and `ip_addresses` (subjectAltName; the
  // first name is also the CN). `expired`: its validity ended a day ago.
  Pem issue(std::vector<std::string> dns_names, std::vector<std::string> ip_addresses = {},
            KeyType type = KeyType::kEcdsaP256, bool expired = false) const {
    const detail::KeyPtr key = detail::generate_key(type);
    std::string cn = !dns_names.empty()      ? dns_names.front()
                     : !ip_addresses.empty() ? ip_addresses.front()
                                             : "reactor test leaf";
    const detail::X509Ptr leaf =
        detail::make_certificate(key.get(), cn, certificate_.get(), expired);
    std::string alt;
    for (const std::string& name : dns_names) alt += (alt.empty() ? "DNS:" : ",DNS:") + name;
    for (const std::string& ip : ip_addresses) alt += (alt.empty() ? "IP:" : ",IP:") + ip;
    if (!alt.empty()) {
      detail::add_extension(leaf.get(), certificate_.get(), NID_subject_alt_name, alt);
    }
    detail::add_extension(leaf.get(), certificate_.get(), NID_basic_constraints, "CA:FALSE");
    detail::add_extension(leaf.get(), certificate_.get(), NID_ext_key_usage,
                          "serverAuth,clientAuth");
    detail::sign(leaf.get(), key_.get());
    return {detail::certificate_pem(leaf.get()), detail::key_pem(key.get())};
  }

 private:
  detail::KeyPtr key_;
  detail::X509Ptr certificate_;
  std::string pem_;
};

// A fresh temporary directory (mkdtemp under $TMPDIR or /tmp), removed with its contents by the
// destructor.
// A server serving `pem`, and a client trusting `ca` (contexts' other settings at their defaults).
inline reactor::TlsOptions server_options(const Pem& pem) {
  reactor::TlsOptions options;
  options.certificates.push_back(reactor::TlsCertificate::from_pem(pem.certificate, pem.key));
  return options;
}

inline reactor::TlsOptions client_options(const TestCa& ca) {
  reactor::TlsOptions options;
  options.ca_pem = ca.certificate_pem();
  return options;
}

class TempDir {
 public:
  TempDir() {
    const char* base = getenv("TMPDIR");
    std::string pattern =
        std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/reactor-tls-XXXXXX";
    if (mkdtemp(pattern.data()) == nullptr) {
      throw std::system_error(errno, std::system_category(), "mkdtemp " + pattern);
    }
    path_ = std::move(pattern);
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  // Writes `text` to the file `name` in this directory and returns its path.
  std::string write(const std::string& name, const std::string& text) const {
    std::string file = path_ + "/" + name;
    std::ofstream out(file, std::ios::binary);
    out << text;
    if (!out.flush()) throw std::runtime_error("cannot write " + file);
    return file;
  }

  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace reactor_test
